"""Grants between organisations (`/v1/grants`) and the public catalogue (`/v1/catalog`)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, status

from aiaas.api.deps import (
    AdminDep,
    After,
    Limit,
    ModelsReadCtxDep,
    OrgContextDep,
    PlatformDep,
    PrincipalDep,
    path_id,
)
from aiaas.domain import Actor
from aiaas.ids import now
from aiaas.protocol.grants import CatalogEntry, GrantCreate, GrantPublic
from aiaas.protocol.platform import ListResponse
from aiaas.services.grants import GrantService, NewGrant

router = APIRouter(tags=["grants"])

GrantId = Annotated[str, path_id("A grant id.")]


async def get_grants(platform: PlatformDep) -> GrantService:
    return platform.grants


GrantsDep = Annotated[GrantService, Depends(get_grants)]


@router.post("/v1/grants", response_model=GrantPublic, status_code=status.HTTP_201_CREATED)
def create_grant(body: GrantCreate, ctx: OrgContextDep, grants: GrantsDep) -> GrantPublic:
    """Share one of the organisation's objects with another organisation (or everyone)."""
    grant = grants.create(
        org_id=ctx.org_id,
        new=NewGrant(
            grantee=body.grantee,
            kind=body.object_type,
            object_id=body.object_id,
            permission=body.permission,
            version=body.version,
            max_requests_per_minute=body.max_requests_per_minute,
            monthly_tokens=body.monthly_tokens,
            expires_at=float(body.expires_at) if body.expires_at is not None else None,
        ),
        actor=ctx.actor,
    )
    return GrantPublic.from_domain(grant, at=now())


@router.get("/v1/grants", response_model=ListResponse[GrantPublic])
def list_grants(
    ctx: OrgContextDep,
    grants: GrantsDep,
    direction: Annotated[
        Literal["given", "received"],
        Query(description="given: the organisation's grants to others; received: to it."),
    ] = "given",
    after: After = None,
    limit: Limit = 20,
) -> ListResponse[GrantPublic]:
    page = grants.list(
        ctx.principal, org_id=ctx.org_id, direction=direction, after=after, limit=limit
    )
    at = now()
    data = [GrantPublic.from_domain(g, at=at) for g in page.items]
    return ListResponse[GrantPublic].of(data, has_more=page.has_more)


@router.get("/v1/grants/{grant_id}", response_model=GrantPublic)
def retrieve_grant(grant_id: GrantId, principal: PrincipalDep, grants: GrantsDep) -> GrantPublic:
    return GrantPublic.from_domain(grants.get(principal, grant_id), at=now())


@router.delete("/v1/grants/{grant_id}", response_model=GrantPublic)
def revoke_grant(grant_id: GrantId, principal: AdminDep, grants: GrantsDep) -> GrantPublic:
    """Revoke: the grantor or a platform admin. It takes effect on the next request."""
    grant = grants.revoke(principal, grant_id=grant_id, actor=Actor.of(principal))
    return GrantPublic.from_domain(grant, at=now())


@router.get("/v1/catalog", response_model=ListResponse[CatalogEntry])
def list_catalog(
    _ctx: ModelsReadCtxDep, grants: GrantsDep, after: After = None, limit: Limit = 20
) -> ListResponse[CatalogEntry]:
    """Models and datasets their owners shared with every organisation."""
    page = grants.catalog(after=after, limit=limit)
    data = [
        CatalogEntry.from_domain(e.grant, owner_name=e.owner_name, region=e.region)
        for e in page.items
    ]
    return ListResponse[CatalogEntry].of(data, has_more=page.has_more)
