"""Domain objects shared by services and repositories: frozen, typed, never ORM rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Scope(StrEnum):
    MODELS_READ = "models:read"
    INFERENCE = "inference"
    FILES_READ = "files:read"
    FILES_WRITE = "files:write"
    TRAINING = "training"
    DEPLOY = "deploy"
    ADMIN = "admin"  # the organisation's administrator: projects, keys, audit, grants
    PLATFORM_ADMIN = "platform:admin"  # the operator of the whole platform


ORG_SCOPES: frozenset[Scope] = frozenset(s for s in Scope if s is not Scope.PLATFORM_ADMIN)

# Roles are named bundles of scopes; a key is created with a role or with explicit scopes.
ROLES: dict[str, frozenset[Scope]] = {
    "owner": ORG_SCOPES,
    "developer": frozenset(
        {
            Scope.MODELS_READ,
            Scope.INFERENCE,
            Scope.FILES_READ,
            Scope.FILES_WRITE,
            Scope.TRAINING,
            Scope.DEPLOY,
        }
    ),
    "reader": frozenset({Scope.MODELS_READ, Scope.INFERENCE, Scope.FILES_READ}),
}


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Caps on one organisation, project or key; None: no cap at that level."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None

    @property
    def empty(self) -> bool:
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.max_concurrent_requests is None
        )

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in _fields(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RateLimits:
        return cls(**{k: data.get(k) for k in _fields(cls())}) if data else cls()


@dataclass(frozen=True, slots=True)
class Quotas:
    """An organisation's allowance per calendar month (UTC); None: unlimited."""

    monthly_tokens: int | None = None
    monthly_requests: int | None = None

    @property
    def empty(self) -> bool:
        return self.monthly_tokens is None and self.monthly_requests is None

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in _fields(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Quotas:
        return cls(**{k: data.get(k) for k in _fields(cls())}) if data else cls()


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


@dataclass(frozen=True, slots=True)
class Organization:
    id: str
    name: str
    weight: float
    created_at: float
    redact_pii: bool = False
    rate_limits: RateLimits = RateLimits()
    quotas: Quotas = Quotas()
    region: str = "local"


class ProjectStatus(StrEnum):
    ACTIVE = "active"
    ARCHIVED = "archived"


@dataclass(frozen=True, slots=True)
class Project:
    id: str
    org_id: str
    name: str
    is_default: bool
    status: ProjectStatus
    created_at: float
    archived_at: float | None
    rate_limits: RateLimits = RateLimits()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: everything but the secret, of which only an HMAC exists."""

    id: str
    org_id: str | None
    project_id: str | None
    name: str
    hint: str
    scopes: frozenset[Scope]
    created_by: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    rate_limits: RateLimits = RateLimits()

    @property
    def redacted_value(self) -> str:
        return f"sk-aiaas-{self.id.removeprefix('key_')}-...{self.hint}"


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key at the one moment its secret exists in the clear: right after creation."""

    key: ApiKey
    secret: str  # the whole `sk-aiaas-<id>-<secret>` token


@dataclass(frozen=True, slots=True)
class LimitLevel:
    """The rate limits of one level a request counts against: its org, project or key."""

    level: str  # "org", "project", "key"
    id: str
    limits: RateLimits


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the authenticated key and what it may do."""

    key_id: str
    org_id: str | None
    project_id: str | None
    scopes: frozenset[Scope]
    # What admission needs, read with the key so a request costs no further lookups: the
    # organisation's scheduling weight, its quotas, and the limits at each level that has some.
    weight: float = 1.0
    limits: tuple[LimitLevel, ...] = ()
    quotas: Quotas = Quotas()

    @property
    def is_platform_admin(self) -> bool:
        return Scope.PLATFORM_ADMIN in self.scopes

    def has(self, scope: Scope) -> bool:
        return scope in self.scopes or self.is_platform_admin


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did something, as the audit log records it."""

    type: str  # "api_key", "cli", "system"
    id: str | None = None

    @classmethod
    def of(cls, principal: Principal) -> Actor:
        return cls(type="api_key", id=principal.key_id)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    seq: int
    id: str
    org_id: str | None
    project_id: str | None
    actor: Actor
    action: str
    target_type: str
    target_id: str | None
    data: dict[str, Any] = field(default_factory=dict)
    created_at_us: int = 0
    prev_hash: str = ""
    hash: str = ""


class FilePurpose(StrEnum):
    FINE_TUNE = "fine-tune"
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"  # written by a batch (its output and error files), never uploaded
    DATASET = "dataset"
    USER_DATA = "user_data"


@dataclass(frozen=True, slots=True)
class StoredFile:
    """An uploaded file (OpenAI's File object); its bytes live encrypted in the blob store."""

    id: str
    org_id: str
    project_id: str
    filename: str
    purpose: FilePurpose
    bytes: int
    sha256: str | None
    blob_key: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Dataset:
    id: str
    org_id: str
    project_id: str
    name: str
    description: str
    created_at: float
    latest_version: int | None
    region: str = "local"  # the region of the node that holds its rows
    residency: str = "none"  # "strict": its rows never leave `region`

    @property
    def strict(self) -> bool:
        return self.residency == "strict"


@dataclass(frozen=True, slots=True)
class DatasetVersion:
    """An immutable version. The JSON documents are our own models' dumps (profile, spec, PII)."""

    id: str
    dataset_id: str
    org_id: str
    version: int
    format: str
    source_file_ids: list[str]
    rows: int
    bytes: int
    content_hash: str
    blob_key: str
    label_column: str | None
    task: str | None
    profile: dict[str, Any]
    preprocessing: dict[str, Any]
    pii: dict[str, Any] | None
    created_at: float


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a cursor-paged list; `has_more` comes from fetching `limit + 1` rows."""

    items: list[T]
    has_more: bool


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobControl(StrEnum):
    """A request to a running job's worker, read with its heartbeat."""

    CANCEL = "cancel"
    PAUSE = "pause"


@dataclass(frozen=True, slots=True)
class Job:
    """A training job. `spec` is the resolved plan the worker runs (see services/jobs.py)."""

    id: str
    org_id: str
    project_id: str
    kind: str
    model: str
    status: JobStatus
    dataset_version_id: str
    task: str
    target_column: str
    spec: dict[str, Any]
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    register_to: str | None
    fine_tuned_model: str | None
    model_version_id: str | None
    error: dict[str, Any] | None
    control: JobControl | None
    attempts: int
    worker: str | None  # the claim token of the worker that holds it
    epoch: int
    step: int
    trained_samples: int
    estimated_finish: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: dict[str, Any] | None = None  # what the job made (an optimisation's table)
    grant_id: str | None = None  # trains on another organisation's dataset through this grant


class BatchStatus(StrEnum):
    """OpenAI's batch states. validating -> in_progress -> finalizing -> completed; failed
    (the input file is unusable), expired (the completion window passed), cancelling ->
    cancelled."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        """A runner still has work to do on it."""
        return self in _ACTIVE_BATCH


_ACTIVE_BATCH = frozenset(
    {
        BatchStatus.VALIDATING,
        BatchStatus.IN_PROGRESS,
        BatchStatus.FINALIZING,
        BatchStatus.CANCELLING,
    }
)


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch of API requests read from an uploaded JSONL file (OpenAI's Batch object).

    Lines run as the key that created the batch (`key_id`), at background priority."""

    id: str
    org_id: str
    project_id: str
    key_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: float
    expires_at: float
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None  # why the input file was refused
    metadata: dict[str, str] | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    runner: str | None = None  # the claim token of the runner that holds it


@dataclass(frozen=True, slots=True)
class OptimisationRequest:
    """A create request for an optimisation job, parsed (see protocol/optimisations.py)."""

    model: str
    version: int | None
    variants: Sequence[dict[str, Any]]  # {"method": ..., method parameters}
    seed: int | None = None
    eval_text: str | None = None  # GGUF: the held-out text perplexity is measured on


@dataclass(frozen=True, slots=True)
class JobEvent:
    id: str
    job_id: str
    level: str  # "info", "warn", "error"
    type: str  # "message", "metrics"
    message: str
    data: dict[str, Any] | None
    created_at: float


@dataclass(frozen=True, slots=True)
class JobCheckpoint:
    id: str
    job_id: str
    epoch: int
    step: int
    metrics: dict[str, Any] | None
    blob_key: str | None  # None once a newer checkpoint superseded it
    bytes: int
    created_at: float


@dataclass(frozen=True, slots=True)
class RegisteredModel:
    id: str
    org_id: str
    project_id: str
    base: str
    task: str
    created_at: float
    latest_version: int | None


@dataclass(frozen=True, slots=True)
class Artifact:
    name: str  # "model.safetensors", "model.onnx", "preprocessing.json"
    blob_key: str
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """An immutable registered version: artifacts, evaluation and lineage."""

    id: str
    model_id: str
    org_id: str
    version: int
    artifacts: dict[str, Artifact]
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    dataset_version_id: str | None
    job_id: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class ModelAlias:
    model_id: str
    alias: str
    version: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class Target:
    """What a deployment (or its canary) serves: a fixed version, or an alias."""

    version: int | None = None
    alias: str | None = None


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    org_id: str
    project_id: str
    name: str  # the model id clients send
    model_id: str
    target: Target
    canary: Target | None
    canary_percent: float
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """What a deployment serves, as a create or update request gives it."""

    model_id: str
    target: Target
    canary: Target | None = None
    canary_percent: float = 0.0


# -- usage ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One metered request."""

    org_id: str
    project_id: str | None
    key_id: str | None
    model: str
    endpoint: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    items: int
    latency_ms: float
    request_id: str | None
    created_at: float
    grant_id: str | None = None  # the call used another organisation's object through it
    owner_org_id: str | None = None  # that object's owner
    batch: bool = False  # a line of a batch (/v1/batches), billed at the batch discount


@dataclass(frozen=True, slots=True)
class UsageGroup:
    bucket: int  # index of the bucket from the summary's start
    keys: dict[str, str | bool | None]
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    items: int


@dataclass(frozen=True, slots=True)
class UsageBucket:
    start: int
    end: int
    groups: list[UsageGroup]


@dataclass(frozen=True, slots=True)
class UsagePage:
    buckets: list[UsageBucket]
    next_start: int | None  # where the next page starts, if the range goes on


# -- grants ---------------------------------------------------------------------------------


class GrantPermission(StrEnum):
    """What a grantee may do with a shared object; each implies the ones before it."""

    USE = "use"  # call it, see it in listings
    TRAIN_ON = "train-on"  # train on it (dataset) or fine-tune from it (model), never read it
    READ = "read"  # download artifacts and rows, see previews, statistics and the profile

    @property
    def rank(self) -> int:
        return _PERMISSION_RANK[self]

    def allows(self, needed: GrantPermission) -> bool:
        return self.rank >= needed.rank


_PERMISSION_RANK = {GrantPermission.USE: 0, GrantPermission.TRAIN_ON: 1, GrantPermission.READ: 2}


class SharedKind(StrEnum):
    """The kinds of object an organisation can grant."""

    MODEL = "model"  # a registered model: all versions, or one
    DATASET = "dataset"  # a dataset: all versions, or one
    DEPLOYMENT = "deployment"  # a served deployment, called as `<owner org name>/<name>`


# The grantee of a public grant: every organisation, through the catalogue.
PUBLIC = "*"


@dataclass(frozen=True, slots=True)
class Grant:
    """One organisation's permission on another's object. `grantee_org_id` is PUBLIC for the
    catalogue; `version` None covers every version (and versions made later)."""

    id: str
    org_id: str  # the owner, who granted it
    grantee_org_id: str
    kind: SharedKind
    object_id: str
    version: int | None
    permission: GrantPermission
    max_requests_per_minute: int | None
    monthly_tokens: int | None
    created_by: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    @property
    def public(self) -> bool:
        return self.grantee_org_id == PUBLIC

    def status(self, at: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= at:
            return "expired"
        return "active"

    def active(self, at: float) -> bool:
        return self.status(at) == "active"

    def covers(self, version: int | None) -> bool:
        """Whether the grant reaches `version` (None: the object as a whole)."""
        return self.version is None or self.version == version
