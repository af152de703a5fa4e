"""`/v1/optimisations`: measured int8, pruned and graph-optimised variants of a model version."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends

from aiaas.api.deps import After, Limit, PlatformDep, TrainingDep, path_id
from aiaas.protocol.fine_tuning import FineTuningJobEvent
from aiaas.protocol.optimisations import OptimisationCreate, OptimisationJob
from aiaas.protocol.platform import ListResponse
from aiaas.services.optimisations import OptimisationService

router = APIRouter(prefix="/v1/optimisations", tags=["optimisations"])

JobId = Annotated[str, path_id("An optimisation job id.")]


async def get_optimisations(platform: PlatformDep) -> OptimisationService:
    return platform.optimisations


OptimisationsDep = Annotated[OptimisationService, Depends(get_optimisations)]


@router.post("", response_model=OptimisationJob)
async def create_optimisation(
    body: OptimisationCreate, ctx: TrainingDep, service: OptimisationsDep
) -> OptimisationJob:
    """Queue a job that builds each variant, measures it against its parent on the same test
    split and registers it as a new version of the model."""
    assert ctx.project_id is not None
    job = await asyncio.to_thread(
        service.create,
        org_id=ctx.org_id,
        project_id=ctx.project_id,
        actor=ctx.actor,
        request=body.request(),
    )
    return OptimisationJob.from_domain(job)


@router.get("", response_model=ListResponse[OptimisationJob])
def list_optimisations(
    ctx: TrainingDep, service: OptimisationsDep, after: After = None, limit: Limit = 20
) -> ListResponse[OptimisationJob]:
    page = service.jobs.list(org_id=ctx.org_id, after=after, limit=limit, metadata={})
    data = [OptimisationJob.from_domain(j) for j in page.items]
    return ListResponse[OptimisationJob].of(data, has_more=page.has_more)


@router.get("/{job_id}", response_model=OptimisationJob)
def retrieve_optimisation(
    job_id: JobId, ctx: TrainingDep, service: OptimisationsDep
) -> OptimisationJob:
    return OptimisationJob.from_domain(service.jobs.get(org_id=ctx.org_id, job_id=job_id))


@router.get("/{job_id}/events", response_model=ListResponse[FineTuningJobEvent])
def list_optimisation_events(
    job_id: JobId,
    ctx: TrainingDep,
    service: OptimisationsDep,
    after: After = None,
    limit: Limit = 20,
) -> ListResponse[FineTuningJobEvent]:
    page = service.jobs.events(org_id=ctx.org_id, job_id=job_id, after=after, limit=limit)
    data = [FineTuningJobEvent.from_domain(e) for e in page.items]
    return ListResponse[FineTuningJobEvent].of(data, has_more=page.has_more)


@router.post("/{job_id}/cancel", response_model=OptimisationJob)
def cancel_optimisation(
    job_id: JobId, ctx: TrainingDep, service: OptimisationsDep
) -> OptimisationJob:
    job = service.jobs.cancel(org_id=ctx.org_id, job_id=job_id, actor=ctx.actor)
    return OptimisationJob.from_domain(job)
