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
    # JSON objects (domain.RateLimits, domain.Quotas); NULL: none set.
    Column("rate_limits", Text, nullable=True),
    Column("quotas", Text, nullable=True),
    # Where the organisation is (AIAAS_REGION of the node it was made on, unless given).
    Column("region", String(64), nullable=False, default="local", server_default="local"),
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
    Column("rate_limits", Text, nullable=True),
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
    Column("rate_limits", Text, nullable=True),
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
    # The region of the node that holds its rows; "strict" residency keeps them there.
    Column("region", String(64), nullable=False, default="local", server_default="local"),
    Column("residency", String(16), nullable=False, default="none", server_default="none"),
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

# One durable queue for every kind of job. `worker` is the claim token of the process that runs
# it: every write a worker makes is fenced by it, so a worker whose job was taken back (missed
# heartbeats) can no longer change anything. `control` carries a request to the running worker
# ("cancel", "pause"), which it reads with its heartbeat.
jobs = Table(
    "jobs",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("model", String(64), nullable=False),
    Column("status", String(24), nullable=False),
    # No foreign key: a finished job keeps naming the version it trained on after that version
    # is deleted (an unfinished job's version cannot be deleted; see DatasetService).
    Column("dataset_version_id", String(64), nullable=False),
    Column("task", String(32), nullable=False),
    Column("target_column", String(256), nullable=False),
    # JSON: the resolved hyperparameters, architecture options and preprocessing plan.
    Column("spec", Text, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("suffix", String(64), nullable=True),
    Column("user_metadata", Text, nullable=True),
    Column("register_to", String(256), nullable=True),
    Column("fine_tuned_model", String(256), nullable=True),
    Column("model_version_id", String(64), nullable=True),
    Column("error", Text, nullable=True),
    # JSON: what the job made, beyond a model name (an optimisation's comparison table).
    Column("result", Text, nullable=True),
    Column("control", String(16), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker", String(128), nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("epoch", Integer, nullable=False, default=0),
    Column("step", BigInteger, nullable=False, default=0),
    Column("trained_samples", BigInteger, nullable=False, default=0),
    Column("estimated_finish", Float, nullable=True),
    Column("created_by", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    # The grant a job trains through on another organisation's dataset (`train-on`); the
    # worker reads the rows under it and stops when it ends.
    Column("grant_id", String(64), nullable=True),
    Index("ix_jobs_org_id_seq", "org_id", "seq"),
    Index("ix_jobs_status_seq", "status", "seq"),
)

job_events = Table(
    "job_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False),
    Column("level", String(8), nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Index("ix_job_events_job_id_seq", "job_id", "seq"),
)

# A row per checkpoint the worker wrote. Only the newest keeps its blob (the one a resume
# reads); older rows stay for their metrics with `blob_key` NULL.
job_checkpoints = Table(
    "job_checkpoints",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("metrics", Text, nullable=True),
    Column("blob_key", String(256), nullable=True),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_job_checkpoints_job_id_seq", "job_id", "seq"),
)

# The registry: a model is a name in an organisation; its versions are immutable artifacts with
# metrics and lineage. A model exists once its first version is ready (same life cycle as
# datasets: "creating" → "ready" → "deleting").
models = Table(
    "models",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(256), nullable=False, unique=True),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
    Column("base", String(64), nullable=False),
    Column("task", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_by", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Index("ix_models_org_id_seq", "org_id", "seq"),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("model_id", String(256), ForeignKey("models.id"), nullable=False),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    # JSON: {name: {"blob_key", "bytes", "sha256", "format"}}, the evaluation, the lineage.
    Column("artifacts", Text, nullable=False),
    Column("metrics", Text, nullable=False),
    Column("lineage", Text, nullable=False),
    Column("dataset_version_id", String(64), ForeignKey("dataset_versions.id"), nullable=True),
    Column("job_id", String(64), nullable=True),
    Column("created_by", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("model_id", "version", name="uq_model_versions_model_id_version"),
    Index("ix_model_versions_dataset_version_id", "dataset_version_id"),
)

# A named pointer to a version of a model (`production`, `staging`, any name); moving it moves
# every deployment that serves the alias at once.
model_aliases = Table(
    "model_aliases",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("model_id", String(256), ForeignKey("models.id"), nullable=False),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_by", String(64), nullable=True),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("model_id", "alias", name="uq_model_aliases_model_id_alias"),
)

# A model served under a name: a fixed version or an alias (resolved per request), with an
# optional canary (another version or alias) taking a share of the requests.
deployments = Table(
    "deployments",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
    Column("name", String(256), nullable=False),
    Column("model_id", String(256), ForeignKey("models.id"), nullable=False),
    Column("version", Integer, nullable=True),
    Column("alias", String(64), nullable=True),
    Column("canary_version", Integer, nullable=True),
    Column("canary_alias", String(64), nullable=True),
    Column("canary_percent", Float, nullable=False, default=0.0),
    Column("created_by", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("org_id", "name", name="uq_deployments_org_id_name"),
)

# An organisation's permission on another's object (services/grants.py); revoking stamps
# `revoked_at` and keeps the row, so the audit trail and the owner's usage still name it.
grants = Table(
    "grants",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("grantee_org_id", String(64), nullable=False),  # an org id, or "*" (public)
    Column("kind", String(32), nullable=False),
    Column("object_id", String(256), nullable=False),
    Column("version", Integer, nullable=True),
    Column("permission", String(16), nullable=False),
    Column("max_requests_per_minute", Integer, nullable=True),
    Column("monthly_tokens", BigInteger, nullable=True),
    Column("created_by", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    # 1 once the audit log holds the grant's expiry (recorded the first time it is seen).
    Column("expiry_audited", Integer, nullable=False, default=0, server_default="0"),
    Index("ix_grants_grantee_kind_object", "grantee_org_id", "kind", "object_id"),
    Index("ix_grants_org_id", "org_id"),
)

# One row per metered request (inference routes), written in batches off the request path.
usage_records = Table(
    "usage_records",
    metadata,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("org_id", String(64), nullable=False),
    Column("project_id", String(64), nullable=True),
    Column("key_id", String(64), nullable=True),
    Column("model", String(256), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("status", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("items", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("request_id", String(128), nullable=True),
    Column("created_at", Float, nullable=False),
    # A call through a grant: the grant, and the organisation that shared the object (the
    # caller, `org_id`, is billed; the owner reads what its shares are used for).
    Column("grant_id", String(64), nullable=True),
    Column("owner_org_id", String(64), nullable=True),
    # A line of a batch: shown apart in summaries, counted at the batch discount in quotas.
    Column("batch", Integer, nullable=False, default=0, server_default="0"),
    Index("ix_usage_records_org_id_created_at", "org_id", "created_at"),
    Index("ix_usage_records_owner_org_id_created_at", "owner_org_id", "created_at"),
)

# Running totals per organisation and calendar month (UTC), updated in the same transaction as
# the records they sum: what monthly quotas are checked against. `org_id` also holds grant ids
# (`grant_...`): the calls through a grant, which its `monthly_tokens` cap is checked against.
usage_monthly = Table(
    "usage_monthly",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("org_id", String(64), nullable=False),
    Column("month", String(7), nullable=False),  # "2026-11"
    Column("requests", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    UniqueConstraint("org_id", "month", name="uq_usage_monthly_org_id_month"),
)

# Privacy policies (issue 28): one row per organisation (`project_id` ""), and optionally one per
# project, which then replaces the organisation's for that project. `policy` is the JSON of
# privacy.policy.PrivacyPolicy (modes per entry point, modes per file purpose, entity types,
# pseudonymise).
privacy_policies = Table(
    "privacy_policies",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("project_id", String(64), nullable=False, default="", server_default=""),
    Column("policy", Text, nullable=False),
    Column("updated_by", String(64), nullable=True),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("org_id", "project_id", name="uq_privacy_policies_org_id_project_id"),
)

# Batches (OpenAI's /v1/batches): the input file's lines run as the creating key at background
# priority; a runner holds a batch by `runner` + `heartbeat_at` (a dead runner's batch is taken
# over). `errors` and `user_metadata` are JSON.
batches = Table(
    "batches",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("org_id", String(64), ForeignKey("organizations.id"), nullable=False),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("errors", Text, nullable=True),
    Column("user_metadata", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("in_progress_at", Float, nullable=True),
    Column("finalizing_at", Float, nullable=True),
    Column("completed_at", Float, nullable=True),
    Column("failed_at", Float, nullable=True),
    Column("expired_at", Float, nullable=True),
    Column("cancelling_at", Float, nullable=True),
    Column("cancelled_at", Float, nullable=True),
    Column("runner", String(128), nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Index("ix_batches_org_id_seq", "org_id", "seq"),
    Index("ix_batches_status_seq", "status", "seq"),
)

# A batch's finished lines, written in parts as they finish: each part is one encrypted blob
# (JSON Lines of results) and this row, inserted after the blob is whole, lists its line numbers
# and counts; a restart skips the lines the rows name. Removed once the batch's files exist.
batch_parts = Table(
    "batch_parts",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("batch_id", String(64), ForeignKey("batches.id"), nullable=False),
    Column("part", Integer, nullable=False),
    Column("blob_key", String(256), nullable=False),
    Column("lines", Text, nullable=False),  # JSON list of the line numbers it holds
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    UniqueConstraint("batch_id", "part", name="uq_batch_parts_batch_id_part"),
)
