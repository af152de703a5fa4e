"""grants between organisations; jobs and usage records name the grant they went through;
regions of organisations and datasets, and dataset residency

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "grants",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.String(length=64), nullable=False),
        sa.Column("grantee_org_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("object_id", sa.String(length=256), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("permission", sa.String(length=16), nullable=False),
        sa.Column("max_requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("monthly_tokens", sa.BigInteger(), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.Column("expiry_audited", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_grants_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_grants")),
        sa.UniqueConstraint("id", name=op.f("uq_grants_id")),
    )
    op.create_index(
        "ix_grants_grantee_kind_object", "grants", ["grantee_org_id", "kind", "object_id"]
    )
    op.create_index("ix_grants_org_id", "grants", ["org_id"])
    with op.batch_alter_table("organizations") as batch:
        batch.add_column(
            sa.Column("region", sa.String(length=64), server_default="local", nullable=False)
        )
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(
            sa.Column("region", sa.String(length=64), server_default="local", nullable=False)
        )
        batch.add_column(
            sa.Column("residency", sa.String(length=16), server_default="none", nullable=False)
        )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("grant_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("grant_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("owner_org_id", sa.String(length=64), nullable=True))
    op.create_index(
        "ix_usage_records_owner_org_id_created_at",
        "usage_records",
        ["owner_org_id", "created_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_usage_records_owner_org_id_created_at", table_name="usage_records")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("owner_org_id")
        batch.drop_column("grant_id")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("grant_id")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("residency")
        batch.drop_column("region")
    with op.batch_alter_table("organizations") as batch:
        batch.drop_column("region")
    op.drop_index("ix_grants_org_id", table_name="grants")
    op.drop_index("ix_grants_grantee_kind_object", table_name="grants")
    op.drop_table("grants")
