"""Schemas of grants (`/v1/grants`) and the public catalogue (`/v1/catalog`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from aiaas.domain import PUBLIC, Grant, GrantPermission, SharedKind
from aiaas.protocol.platform import ModelRef, Name, Request

# An organisation id, an organisation name, or "*" (everyone: the public catalogue).
Grantee = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class GrantCreate(Request):
    grantee: Grantee = Field(
        description="The organisation to share with (id or name), or '*' for the public "
        "catalogue (models and datasets only)."
    )
    object_type: SharedKind = Field(description="model, dataset or deployment.")
    object_id: ModelRef = Field(description="The model id, dataset id or deployment id.")
    version: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="One version only; default: every version."
    )
    permission: GrantPermission = Field(
        description="use < train-on < read; each implies the ones before it."
    )
    max_requests_per_minute: int | None = Field(
        default=None, ge=1, le=10**9, description="A cap on the grantee's calls through it."
    )
    monthly_tokens: int | None = Field(
        default=None, ge=1, le=10**15, description="A cap on the grantee's tokens a month."
    )
    expires_at: int | None = Field(
        default=None, ge=0, le=2**41, description="Unix seconds; default: never."
    )


class GrantPublic(BaseModel):
    id: str
    object: Literal["grant"] = "grant"
    organization_id: str = Field(description="The owner, who granted it.")
    grantee: str = Field(description="The grantee organisation's id, or '*'.")
    object_type: SharedKind
    object_id: str
    version: int | None
    permission: GrantPermission
    max_requests_per_minute: int | None
    monthly_tokens: int | None
    status: Literal["active", "expired", "revoked"]
    created_at: int
    expires_at: int | None
    revoked_at: int | None

    @classmethod
    def from_domain(cls, grant: Grant, *, at: float) -> GrantPublic:
        return cls(
            id=grant.id,
            organization_id=grant.org_id,
            grantee=grant.grantee_org_id,
            object_type=grant.kind,
            object_id=grant.object_id,
            version=grant.version,
            permission=grant.permission,
            max_requests_per_minute=grant.max_requests_per_minute,
            monthly_tokens=grant.monthly_tokens,
            status=grant.status(at),  # type: ignore[arg-type]
            created_at=int(grant.created_at),
            expires_at=int(grant.expires_at) if grant.expires_at is not None else None,
            revoked_at=int(grant.revoked_at) if grant.revoked_at is not None else None,
        )


class CatalogEntry(BaseModel):
    """A model or dataset (version) its owner put in the public catalogue."""

    id: str = Field(description="The grant's id.")
    object: Literal["catalog.entry"] = "catalog.entry"
    object_type: SharedKind
    object_id: str
    version: int | None
    permission: GrantPermission
    owned_by: Name = Field(description="The owner organisation's name.")
    owner_id: str
    region: str = Field(description="A dataset's region, or the owner's for a model.")
    created_at: int

    @classmethod
    def from_domain(cls, grant: Grant, *, owner_name: str, region: str) -> CatalogEntry:
        return cls(
            id=grant.id,
            object_type=grant.kind,
            object_id=grant.object_id,
            version=grant.version,
            permission=grant.permission,
            owned_by=owner_name,
            owner_id=grant.org_id,
            region=region,
            created_at=int(grant.created_at),
        )


__all__ = ["PUBLIC", "CatalogEntry", "GrantCreate", "GrantPublic"]
