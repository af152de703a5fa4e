"""privacy policies per organisation and project (issue 28)

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "privacy_policies",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("org_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), server_default="", nullable=False),
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_privacy_policies_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_privacy_policies")),
        sa.UniqueConstraint("org_id", "project_id", name="uq_privacy_policies_org_id_project_id"),
    )


def downgrade() -> None:
    op.drop_table("privacy_policies")
