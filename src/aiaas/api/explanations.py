"""`/v1/explanations`: per record, the prediction and why (columns, tokens, a heatmap); a large
request becomes a job whose result is a file."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from aiaas.api.deps import After, InferenceCtxDep, Limit, PlatformDep, metered, path_id
from aiaas.domain import Job
from aiaas.protocol.explanations import (
    ExplanationJob,
    ExplanationRequest,
    ExplanationResponse,
)
from aiaas.protocol.fine_tuning import FineTuningJobEvent
from aiaas.protocol.platform import ListResponse
from aiaas.services.explanations import ExplanationService
from aiaas.services.metering import MeteredCall

router = APIRouter(prefix="/v1/explanations", tags=["explanations"])

JobId = Annotated[str, path_id("An explanation job id.")]


async def get_explanations(platform: PlatformDep) -> ExplanationService:
    return platform.explanations


ExplanationsDep = Annotated[ExplanationService, Depends(get_explanations)]


@router.post(
    "",
    response_model=ExplanationResponse,
    responses={202: {"model": ExplanationJob, "description": "A large request, queued as a job."}},
)
async def explain(
    body: ExplanationRequest,
    ctx: InferenceCtxDep,
    service: ExplanationsDep,
    call: Annotated[MeteredCall, Depends(metered("explanations"))],
) -> JSONResponse:
    """Explain each record's prediction with the chosen method, on the same weights and
    preprocessing that predict."""
    call.model = body.model
    answer = await service.explain(
        org_id=ctx.org_id,
        project_id=ctx.project_id,
        actor=ctx.actor,
        model=body.model,
        records=body.records,
        texts=body.texts,
        images=body.images,
        method=body.method,
        options=body.options.model_dump(exclude_none=True),
        weight=ctx.principal.weight,
        call=call,
    )
    if isinstance(answer, Job):
        job = ExplanationJob.from_domain(answer)
        return JSONResponse(job.model_dump(mode="json"), status_code=202)
    version = answer.served.routed.version
    # The items are built to `ExplanationItem`'s shape (services/explanations.render) and sent
    # as they are: validating thousands of attributions again would cost more than a cheap
    # method's own work.
    return JSONResponse(
        {
            "object": "explanation",
            "model": body.model,
            "model_version": version.version,
            "model_version_id": version.id,
            "registered_model": version.model_id,
            "canary": answer.served.routed.canary,
            "method": answer.method,
            "options": answer.options,
            "baseline": answer.baseline,
            "output": answer.output,
            "data": answer.items,
        }
    )


@router.get("/jobs", response_model=ListResponse[ExplanationJob])
def list_explanation_jobs(
    ctx: InferenceCtxDep, service: ExplanationsDep, after: After = None, limit: Limit = 20
) -> ListResponse[ExplanationJob]:
    page = service.jobs.list(org_id=ctx.org_id, after=after, limit=limit, metadata={})
    data = [ExplanationJob.from_domain(j) for j in page.items]
    return ListResponse[ExplanationJob].of(data, has_more=page.has_more)


@router.get("/jobs/{job_id}", response_model=ExplanationJob)
def retrieve_explanation_job(
    job_id: JobId, ctx: InferenceCtxDep, service: ExplanationsDep
) -> ExplanationJob:
    return ExplanationJob.from_domain(service.jobs.get(org_id=ctx.org_id, job_id=job_id))


@router.get("/jobs/{job_id}/events", response_model=ListResponse[FineTuningJobEvent])
def list_explanation_job_events(
    job_id: JobId,
    ctx: InferenceCtxDep,
    service: ExplanationsDep,
    after: After = None,
    limit: Limit = 20,
) -> ListResponse[FineTuningJobEvent]:
    page = service.jobs.events(org_id=ctx.org_id, job_id=job_id, after=after, limit=limit)
    data = [FineTuningJobEvent.from_domain(e) for e in page.items]
    return ListResponse[FineTuningJobEvent].of(data, has_more=page.has_more)


@router.post("/jobs/{job_id}/cancel", response_model=ExplanationJob)
async def cancel_explanation_job(
    job_id: JobId, ctx: InferenceCtxDep, service: ExplanationsDep
) -> ExplanationJob:
    job = await asyncio.to_thread(service.cancel, org_id=ctx.org_id, job_id=job_id, actor=ctx.actor)
    return ExplanationJob.from_domain(job)
