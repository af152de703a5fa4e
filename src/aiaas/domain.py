"""Domain objects shared by services and repositories: frozen, typed, never ORM rows."""

from __future__ import annotations

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
class Organization:
    id: str
    name: str
    weight: float
    created_at: float
    redact_pii: bool = False


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

    @property
    def redacted_value(self) -> str:
        return f"sk-aiaas-{self.id.removeprefix('key_')}-...{self.hint}"


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key at the one moment its secret exists in the clear: right after creation."""

    key: ApiKey
    secret: str  # the whole `sk-aiaas-<id>-<secret>` token


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the authenticated key and what it may do."""

    key_id: str
    org_id: str | None
    project_id: str | None
    scopes: frozenset[Scope]

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
