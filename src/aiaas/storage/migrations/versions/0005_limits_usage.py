"""rate limits, quotas, usage metering; job results

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("organizations") as batch:
        batch.add_column(sa.Column("rate_limits", sa.Text(), nullable=True))
        batch.add_column(sa.Column("quotas", sa.Text(), nullable=True))
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("rate_limits", sa.Text(), nullable=True))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("rate_limits", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("result", sa.Text(), nullable=True))
    op.create_table(
        "usage_records",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("org_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_usage_records")),
    )
    op.create_index("ix_usage_records_org_id_created_at", "usage_records", ["org_id", "created_at"])
    op.create_table(
        "usage_monthly",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("org_id", sa.String(length=64), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_usage_monthly")),
        sa.UniqueConstraint("org_id", "month", name="uq_usage_monthly_org_id_month"),
    )


def downgrade() -> None:
    op.drop_table("usage_monthly")
    op.drop_index("ix_usage_records_org_id_created_at", table_name="usage_records")
    op.drop_table("usage_records")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("result")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("rate_limits")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("rate_limits")
    with op.batch_alter_table("organizations") as batch:
        batch.drop_column("quotas")
        batch.drop_column("rate_limits")
