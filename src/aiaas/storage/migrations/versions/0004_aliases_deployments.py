"""model aliases and deployments

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("model_id", sa.String(length=256), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("alias", sa.String(length=64), nullable=True),
        sa.Column("canary_version", sa.Integer(), nullable=True),
        sa.Column("canary_alias", sa.String(length=64), nullable=True),
        sa.Column("canary_percent", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_deployments_model_id_models")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_deployments_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_deployments_project_id_projects")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_deployments")),
        sa.UniqueConstraint("id", name=op.f("uq_deployments_id")),
        sa.UniqueConstraint("org_id", "name", name="uq_deployments_org_id_name"),
    )
    op.create_table(
        "model_aliases",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=256), nullable=False),
        sa.Column("org_id", sa.String(length=64), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_model_aliases_model_id_models")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_model_aliases_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_model_aliases")),
        sa.UniqueConstraint("id", name=op.f("uq_model_aliases_id")),
        sa.UniqueConstraint("model_id", "alias", name="uq_model_aliases_model_id_alias"),
    )


def downgrade() -> None:
    op.drop_table("model_aliases")
    op.drop_table("deployments")
