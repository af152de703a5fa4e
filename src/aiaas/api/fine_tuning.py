"""OpenAI's fine-tuning jobs API (`/v1/fine_tuning/jobs`), running the platform's training."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from aiaas.api.deps import After, Limit, PlatformDep, TrainingDep, path_id
from aiaas.errors import InvalidRequest
from aiaas.protocol.fine_tuning import (
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobCreate,
)
from aiaas.protocol.platform import ListResponse
from aiaas.services.jobs import JobService

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

JobId = Annotated[str, path_id("A fine-tuning job id.")]


async def get_jobs(platform: PlatformDep) -> JobService:
    return platform.jobs


JobsDep = Annotated[JobService, Depends(get_jobs)]


@router.post("", response_model=FineTuningJob)
def create_job(body: JobCreate, ctx: TrainingDep, jobs: JobsDep) -> FineTuningJob:
    """Queue a training job; everything that could make it fail later is checked now."""
    assert ctx.project_id is not None
    job = jobs.create(
        org_id=ctx.org_id, project_id=ctx.project_id, actor=ctx.actor, request=body.request()
    )
    return FineTuningJob.from_domain(job)


@router.get("", response_model=ListResponse[FineTuningJob])
def list_jobs(
    request: Request,
    ctx: TrainingDep,
    jobs: JobsDep,
    after: After = None,
    limit: Limit = 20,
) -> ListResponse[FineTuningJob]:
    """Newest first. Filter by metadata as OpenAI does: `?metadata[key]=value`."""
    page = jobs.list(
        org_id=ctx.org_id, after=after, limit=limit, metadata=_metadata_filter(request)
    )
    data = [FineTuningJob.from_domain(j) for j in page.items]
    return ListResponse[FineTuningJob].of(data, has_more=page.has_more)


def _metadata_filter(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            key = name[len("metadata[") : -1]
            if not 1 <= len(key) <= 64 or len(value) > 512 or len(out) >= 16:
                raise InvalidRequest(f"metadata filter {name!r} is not valid", param="metadata")
            out[key] = value
    return out


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob)
def retrieve_job(fine_tuning_job_id: JobId, ctx: TrainingDep, jobs: JobsDep) -> FineTuningJob:
    return FineTuningJob.from_domain(jobs.get(org_id=ctx.org_id, job_id=fine_tuning_job_id))


@router.get("/{fine_tuning_job_id}/events", response_model=ListResponse[FineTuningJobEvent])
def list_events(
    fine_tuning_job_id: JobId,
    ctx: TrainingDep,
    jobs: JobsDep,
    after: After = None,
    limit: Limit = 20,
) -> ListResponse[FineTuningJobEvent]:
    """Newest first, as OpenAI lists them."""
    page = jobs.events(org_id=ctx.org_id, job_id=fine_tuning_job_id, after=after, limit=limit)
    data = [FineTuningJobEvent.from_domain(e) for e in page.items]
    return ListResponse[FineTuningJobEvent].of(data, has_more=page.has_more)


@router.get(
    "/{fine_tuning_job_id}/checkpoints", response_model=ListResponse[FineTuningJobCheckpoint]
)
def list_checkpoints(
    fine_tuning_job_id: JobId,
    ctx: TrainingDep,
    jobs: JobsDep,
    after: After = None,
    limit: Limit = 10,
) -> ListResponse[FineTuningJobCheckpoint]:
    """One per finished epoch, newest first."""
    job = jobs.get(org_id=ctx.org_id, job_id=fine_tuning_job_id)
    page = jobs.checkpoints(org_id=ctx.org_id, job_id=job.id, after=after, limit=limit)
    data = [FineTuningJobCheckpoint.from_domain(c, job) for c in page.items]
    return ListResponse[FineTuningJobCheckpoint].of(data, has_more=page.has_more)


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_job(fine_tuning_job_id: JobId, ctx: TrainingDep, jobs: JobsDep) -> FineTuningJob:
    job = jobs.cancel(org_id=ctx.org_id, job_id=fine_tuning_job_id, actor=ctx.actor)
    return FineTuningJob.from_domain(job)


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob)
def pause_job(fine_tuning_job_id: JobId, ctx: TrainingDep, jobs: JobsDep) -> FineTuningJob:
    """A running job checkpoints where it is and stops; `resume` queues it again."""
    job = jobs.pause(org_id=ctx.org_id, job_id=fine_tuning_job_id, actor=ctx.actor)
    return FineTuningJob.from_domain(job)


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob)
def resume_job(fine_tuning_job_id: JobId, ctx: TrainingDep, jobs: JobsDep) -> FineTuningJob:
    job = jobs.resume(org_id=ctx.org_id, job_id=fine_tuning_job_id, actor=ctx.actor)
    return FineTuningJob.from_domain(job)
