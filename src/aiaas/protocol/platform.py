"""Request and response schemas of the platform API (organisations, projects, keys, audit).

Requests forbid unknown fields, so a typo is a 400 naming the field instead of a silent no-op.
Responses are built from domain objects with `from_domain`; a table row is never a response.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from aiaas.domain import (
    ApiKey,
    AuditEvent,
    IssuedKey,
    Organization,
    Project,
    Quotas,
    RateLimits,
    Scope,
)

T = TypeVar("T")

# An object id as the platform issues them; anything else (NUL bytes, 10 kB junk) is a 400 here.
IdStr = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]

# A model id or deployment name as clients send it: 1-256 characters, no control characters
# (PostgreSQL refuses NUL in text, and no name of ours has one).
MODEL_REF_PATTERN = r"^[^\x00-\x1f\x7f]{1,256}$"
ModelRef = Annotated[str, StringConstraints(pattern=MODEL_REF_PATTERN)]

# A display name: 1-256 characters, no control characters.
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False

    @classmethod
    def of(cls, data: list[Any], *, has_more: bool) -> ListResponse[Any]:
        return cls(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )


# -- organisations ---------------------------------------------------------------------------


Cap = Annotated[int, Field(ge=1, le=10**15)]


class RateLimitsBody(BaseModel):
    """Caps at one level (organisation, project or key); a missing or null field: no cap."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: Cap | None = Field(default=None, description="Requests per minute.")
    tokens_per_minute: Cap | None = Field(
        default=None, description="Prompt plus completion tokens (or input items) per minute."
    )
    max_concurrent_requests: Cap | None = Field(
        default=None, description="Requests being served at once."
    )

    @classmethod
    def from_domain(cls, limits: RateLimits) -> RateLimitsBody:
        return cls(**limits.to_dict())

    def to_domain(self) -> RateLimits:
        return RateLimits(**self.model_dump())


class QuotasBody(BaseModel):
    """An organisation's allowance per calendar month (UTC); a missing or null field: none."""

    model_config = ConfigDict(extra="forbid")

    monthly_tokens: Cap | None = None
    monthly_requests: Cap | None = None

    @classmethod
    def from_domain(cls, quotas: Quotas) -> QuotasBody:
        return cls(**quotas.to_dict())

    def to_domain(self) -> Quotas:
        return Quotas(**self.model_dump())


# A region label: lower-case letters, digits and dashes (AIAAS_REGION's form).
Region = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]


class OrganizationCreate(Request):
    name: Name
    region: Region | None = Field(
        default=None, description="Where the organisation is; default: this node's region."
    )


class OrganizationUpdate(Request):
    """Fields left out stay as they are. Weight, rate limits and quotas: the operator only."""

    redact_pii: bool | None = Field(
        default=None,
        description="Redact personal data from every dataset made in this organisation.",
    )
    weight: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description="Share of contended capacity, relative to other organisations (default 1).",
    )
    rate_limits: RateLimitsBody | None = Field(
        default=None, description="Replaces the organisation's rate limits ({} removes them)."
    )
    quotas: QuotasBody | None = Field(
        default=None, description="Replaces the organisation's monthly quotas ({} removes them)."
    )


class OrganizationPublic(BaseModel):
    object: Literal["organization"] = "organization"
    id: str
    name: str
    created_at: int
    redact_pii: bool = False
    weight: float = 1.0
    rate_limits: RateLimitsBody = Field(default_factory=RateLimitsBody)
    quotas: QuotasBody = Field(default_factory=QuotasBody)
    region: str = "local"

    @classmethod
    def from_domain(cls, org: Organization) -> OrganizationPublic:
        return cls(
            id=org.id,
            name=org.name,
            created_at=int(org.created_at),
            redact_pii=org.redact_pii,
            weight=org.weight,
            rate_limits=RateLimitsBody.from_domain(org.rate_limits),
            quotas=QuotasBody.from_domain(org.quotas),
            region=org.region,
        )


class OrganizationCreated(OrganizationPublic):
    project_id: str = Field(description="The organisation's default project.")
    api_key: str = Field(description="An org-admin key. Shown once; store it now.")


# -- projects --------------------------------------------------------------------------------


class ProjectCreate(Request):
    name: Name


class ProjectUpdate(Request):
    """Fields left out stay as they are."""

    name: Name | None = None
    rate_limits: RateLimitsBody | None = Field(
        default=None, description="Replaces the project's rate limits ({} removes them)."
    )


class ProjectPublic(BaseModel):
    object: Literal["project"] = "project"
    id: str
    name: str
    organization_id: str
    status: Literal["active", "archived"]
    is_default: bool
    created_at: int
    archived_at: int | None
    rate_limits: RateLimitsBody = Field(default_factory=RateLimitsBody)

    @classmethod
    def from_domain(cls, project: Project) -> ProjectPublic:
        return cls(
            id=project.id,
            name=project.name,
            organization_id=project.org_id,
            status=project.status.value,
            is_default=project.is_default,
            created_at=int(project.created_at),
            archived_at=int(project.archived_at) if project.archived_at is not None else None,
            rate_limits=RateLimitsBody.from_domain(project.rate_limits),
        )


# -- API keys --------------------------------------------------------------------------------

OrgScopeName = Literal[
    "models:read", "inference", "files:read", "files:write", "training", "deploy", "admin"
]


class ApiKeyCreate(Request):
    name: Name
    project_id: IdStr | None = Field(
        default=None, description="Defaults to the organisation's default project."
    )
    scopes: list[OrgScopeName] | None = Field(default=None, min_length=1, max_length=16)
    role: Literal["owner", "developer", "reader"] | None = None
    expires_in: int | None = Field(
        default=None, ge=1, le=10 * 366 * 86400, description="Lifetime in seconds."
    )
    rate_limits: RateLimitsBody | None = Field(
        default=None, description="This key's own caps, on top of its project's and org's."
    )

    @model_validator(mode="after")
    def _one_of_scopes_or_role(self) -> ApiKeyCreate:
        if self.scopes is not None and self.role is not None:
            raise ValueError("give either scopes or role, not both")
        return self


class ApiKeyPublic(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: str
    name: str
    redacted_value: str
    organization_id: str | None
    project_id: str | None
    scopes: list[str]
    created_at: int
    expires_at: int | None
    last_used_at: int | None
    revoked_at: int | None
    rate_limits: RateLimitsBody = Field(default_factory=RateLimitsBody)

    @classmethod
    def from_domain(cls, key: ApiKey) -> ApiKeyPublic:
        def opt(value: float | None) -> int | None:
            return int(value) if value is not None else None

        return cls(
            id=key.id,
            name=key.name,
            redacted_value=key.redacted_value,
            organization_id=key.org_id,
            project_id=key.project_id,
            scopes=sorted(key.scopes),
            created_at=int(key.created_at),
            expires_at=opt(key.expires_at),
            last_used_at=opt(key.last_used_at),
            revoked_at=opt(key.revoked_at),
            rate_limits=RateLimitsBody.from_domain(key.rate_limits),
        )


class ApiKeyCreated(ApiKeyPublic):
    value: str = Field(description="The whole secret key. Shown once; store it now.")

    @classmethod
    def from_issued(cls, issued: IssuedKey) -> ApiKeyCreated:
        return cls(**ApiKeyPublic.from_domain(issued.key).model_dump(), value=issued.secret)


# -- audit -----------------------------------------------------------------------------------


class AuditActor(BaseModel):
    type: str
    id: str | None


class AuditTarget(BaseModel):
    type: str
    id: str | None


class AuditEventPublic(BaseModel):
    object: Literal["audit_event"] = "audit_event"
    id: str
    seq: int
    type: str
    effective_at: float
    organization_id: str | None
    project_id: str | None
    actor: AuditActor
    target: AuditTarget
    data: dict[str, Any]
    hash: str
    prev_hash: str

    @classmethod
    def from_domain(cls, event: AuditEvent) -> AuditEventPublic:
        return cls(
            id=event.id,
            seq=event.seq,
            type=event.action,
            effective_at=event.created_at_us / 1_000_000,
            organization_id=event.org_id,
            project_id=event.project_id,
            actor=AuditActor(type=event.actor.type, id=event.actor.id),
            target=AuditTarget(type=event.target_type, id=event.target_id),
            data=event.data,
            hash=event.hash,
            prev_hash=event.prev_hash,
        )


class AuditVerification(BaseModel):
    object: Literal["audit.verification"] = "audit.verification"
    ok: bool
    events: int
    broken_at_seq: int | None = None
    reason: str | None = None


__all__ = [
    "ApiKeyCreate",
    "ApiKeyCreated",
    "ApiKeyPublic",
    "AuditEventPublic",
    "AuditVerification",
    "ErrorResponse",
    "ListResponse",
    "OrganizationCreate",
    "OrganizationCreated",
    "OrganizationPublic",
    "ProjectCreate",
    "ProjectPublic",
    "ProjectUpdate",
    "Scope",
]
