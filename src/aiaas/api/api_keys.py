"""Org-admin routes for API keys. A new key's secret appears in exactly one response."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from aiaas.api.deps import ID_PATTERN, After, KeysDep, Limit, OrgContextDep, path_id
from aiaas.domain import ROLES, RateLimits, Scope
from aiaas.ids import now
from aiaas.protocol.platform import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, ListResponse
from aiaas.services.keys import KeySpec

router = APIRouter(prefix="/v1/api_keys", tags=["api keys"])

KeyId = Annotated[str, path_id("An API key id.")]


def _spec(body: ApiKeyCreate) -> KeySpec:
    if body.scopes is not None:
        scopes = frozenset(Scope(s) for s in body.scopes)
    else:
        scopes = ROLES[body.role or "developer"]
    expires_at = now() + body.expires_in if body.expires_in is not None else None
    return KeySpec(
        name=body.name,
        scopes=scopes,
        expires_at=expires_at,
        rate_limits=body.rate_limits.to_domain() if body.rate_limits else RateLimits(),
    )


@router.post("", response_model=ApiKeyCreated, status_code=status.HTTP_201_CREATED)
def create_api_key(body: ApiKeyCreate, ctx: OrgContextDep, keys: KeysDep) -> ApiKeyCreated:
    issued = keys.create(
        org_id=ctx.org_id, project_id=body.project_id, spec=_spec(body), actor=ctx.actor
    )
    return ApiKeyCreated.from_issued(issued)


@router.get("", response_model=ListResponse[ApiKeyPublic])
def list_api_keys(
    ctx: OrgContextDep,
    keys: KeysDep,
    after: After = None,
    limit: Limit = 20,
    project_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    include_revoked: Annotated[bool, Query()] = False,
) -> ListResponse[ApiKeyPublic]:
    page = keys.list(
        org_id=ctx.org_id,
        project_id=project_id,
        include_revoked=include_revoked,
        after=after,
        limit=limit,
    )
    data = [ApiKeyPublic.from_domain(k) for k in page.items]
    return ListResponse[ApiKeyPublic].of(data, has_more=page.has_more)


@router.get("/{key_id}", response_model=ApiKeyPublic)
def retrieve_api_key(key_id: KeyId, ctx: OrgContextDep, keys: KeysDep) -> ApiKeyPublic:
    return ApiKeyPublic.from_domain(keys.get(org_id=ctx.org_id, key_id=key_id))


@router.delete("/{key_id}", response_model=ApiKeyPublic)
def revoke_api_key(key_id: KeyId, ctx: OrgContextDep, keys: KeysDep) -> ApiKeyPublic:
    """Revoke the key: it stops working at once and stays listed (with `revoked_at`)."""
    return ApiKeyPublic.from_domain(keys.revoke(org_id=ctx.org_id, key_id=key_id, actor=ctx.actor))
