"""The relational schema, as SQLAlchemy Core tables.

Alembic migrations under `migrations/versions` create exactly these tables; a test checks that
the migrated database and this metadata agree. Every table has an integer `seq` for stable
ordering and cursor paging, and a public string `id`.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

organizations = Table(
    "organizations",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("name", String(256), nullable=False, unique=True),
    Column("weight", Float, nullable=False, default=1.0),
    Column("created_at", Float, nullable=False),
    # 1: every dataset made in this organisation is PII-redacted, whatever the request says.
    Column("redact_pii", Integer, nullable=False, default=0, server_default="0"),
)

projects = Table(
    "projects",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("name", String(256), nullable=False),
    Column("is_default", Integer, nullable=False, default=0),
    Column("status", String(16), nullable=False, default="active"),
    Column("created_at", Float, nullable=False),
    Column("archived_at", Float, nullable=True),
    UniqueConstraint("org_id", "name", name="uq_projects_org_id_name"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    # NULL org and project: the platform operator's key.
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=True),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=True),
    Column("name", String(256), nullable=False),
    Column("secret_hmac", String(64), nullable=False),
    Column("hint", String(16), nullable=False),
    Column("scopes", Text, nullable=False),
    Column("created_by", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Column("last_used_at", Float, nullable=True),
    Index("ix_api_keys_org_id", "org_id"),
)

data_keys = Table(
    "data_keys",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    # An organisation id, or "platform" for the operator's own blobs.
    Column("owner", String(64), nullable=False, unique=True),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    # Assigned from audit_head under its row lock, so the chain has no gaps.
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("id", String(64), nullable=False, unique=True),
    Column("org_id", String(64), nullable=True),
    Column("project_id", String(64), nullable=True),
    Column("actor_type", String(32), nullable=False),
    Column("actor_id", String(64), nullable=True),
    Column("action", String(64), nullable=False),
    Column("target_type", String(32), nullable=False),
    Column("target_id", String(64), nullable=True),
    Column("data", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_events_org_id_seq", "org_id", "seq"),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# A row is created in state "uploading" before its blob is written and becomes "processed" once
# the blob is in place; "deleting" rows have a blob on its way out. Only "processed" rows are
# visible, so a crash at any point leaves nothing half-made, and the start-up sweep finishes the
# job (see FileService.sweep).
files = Table(
    "files",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
    Column("filename", String(512), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("sha256", String(64), nullable=True),
    Column("blob_key", String(256), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_by", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Index("ix_files_org_id_seq", "org_id", "seq"),
)

datasets = Table(
    "datasets",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
    Column("name", String(256), nullable=False),
    Column("description", Text, nullable=False, default=""),
    # "creating" until its first version is ready: a failed first version leaves no dataset.
    Column("status", String(16), nullable=False),
    Column("created_by", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("org_id", "name", name="uq_datasets_org_id_name"),
)

# Immutable once "ready". Same life cycle as files: "creating" → "ready" → "deleting".
dataset_versions = Table(
    "dataset_versions",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("dataset_id", String(64), ForeignKey("datasets.id"), nullable=False),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("format", String(16), nullable=False),
    Column("source_file_ids", Text, nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("content_hash", String(80), nullable=False),
    Column("blob_key", String(256), nullable=False),
    Column("label_column", String(256), nullable=True),
    Column("task", String(32), nullable=True),
    # JSON documents: the inferred profile, the fitted preprocessing spec, the PII report.
    Column("profile", Text, nullable=False),
    Column("preprocessing", Text, nullable=False),
    Column("pii", Text, nullable=True),
    Column("created_by", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("dataset_id", "version", name="uq_dataset_versions_dataset_id_version"),
)
