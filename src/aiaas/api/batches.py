"""OpenAI's Batch API (`/v1/batches`): create from an uploaded file, list, retrieve, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from aiaas.api.deps import After, InferenceCtxDep, Limit, PlatformDep, path_id
from aiaas.protocol.batches import BatchCreate, BatchObject
from aiaas.protocol.platform import ListResponse
from aiaas.services.batches import BatchService

router = APIRouter(prefix="/v1/batches", tags=["batches"])

BatchId = Annotated[str, path_id("A batch id.")]


async def get_batches(platform: PlatformDep) -> BatchService:
    return platform.batches


BatchesDep = Annotated[BatchService, Depends(get_batches)]


@router.post("", response_model=BatchObject)
def create_batch(body: BatchCreate, ctx: InferenceCtxDep, batches: BatchesDep) -> BatchObject:
    """Queue the file's requests; they run as the calling key, behind interactive traffic."""
    assert ctx.project_id is not None
    batch = batches.create(
        principal=ctx.principal, org_id=ctx.org_id, project_id=ctx.project_id, request=body
    )
    return BatchObject.from_domain(batch)


@router.get("", response_model=ListResponse[BatchObject])
def list_batches(
    ctx: InferenceCtxDep, batches: BatchesDep, after: After = None, limit: Limit = 20
) -> ListResponse[BatchObject]:
    """Newest first."""
    page = batches.list(org_id=ctx.org_id, after=after, limit=limit)
    data = [BatchObject.from_domain(b) for b in page.items]
    return ListResponse[BatchObject].of(data, has_more=page.has_more)


@router.get("/{batch_id}", response_model=BatchObject)
def retrieve_batch(batch_id: BatchId, ctx: InferenceCtxDep, batches: BatchesDep) -> BatchObject:
    return BatchObject.from_domain(batches.get(org_id=ctx.org_id, batch_id=batch_id))


@router.post("/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(batch_id: BatchId, ctx: InferenceCtxDep, batches: BatchesDep) -> BatchObject:
    """Stop sending lines; the output and error files then hold what was done (the rest as
    `batch_cancelled` errors)."""
    batch = batches.cancel(org_id=ctx.org_id, batch_id=batch_id, actor=ctx.actor)
    return BatchObject.from_domain(batch)
