"""`GET /v1/usage`: the organisation's metered usage (org admins; the operator names an org)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query

from aiaas.api.deps import ID_PATTERN, OrgContextDep, PlatformDep
from aiaas.errors import InvalidRequest
from aiaas.protocol.platform import MODEL_REF_PATTERN
from aiaas.protocol.usage import GroupBy, UsagePagePublic

router = APIRouter(prefix="/v1", tags=["usage"])

_LAST_YEAR_2100 = 4_102_444_800


@router.get("/usage", response_model=UsagePagePublic)
async def usage(
    ctx: OrgContextDep,
    platform: PlatformDep,
    start_time: Annotated[
        int | None, Query(ge=0, le=_LAST_YEAR_2100, description="Unix seconds (inclusive).")
    ] = None,
    end_time: Annotated[
        int | None, Query(ge=1, le=_LAST_YEAR_2100, description="Unix seconds (exclusive).")
    ] = None,
    bucket_width: Annotated[str, Query(pattern=r"^(1h|1d)$")] = "1d",
    group_by: Annotated[list[GroupBy] | None, Query(max_length=4)] = None,
    models: Annotated[
        list[Annotated[str, Query(pattern=MODEL_REF_PATTERN)]] | None, Query(max_length=100)
    ] = None,
    project_ids: Annotated[
        list[Annotated[str, Query(pattern=ID_PATTERN)]] | None, Query(max_length=100)
    ] = None,
    limit: Annotated[int | None, Query(ge=1, le=168, description="Buckets per page.")] = None,
    page: Annotated[
        str | None, Query(pattern=r"^[0-9]{1,12}$", description="`next_page` of the last page.")
    ] = None,
    shared: Annotated[
        bool,
        Query(
            description="The calls other organisations made through this one's grants "
            "(group by grant_id and organization_id to see who used what), not its own."
        ),
    ] = False,
) -> UsagePagePublic:
    """Usage per day (or hour) bucket, grouped by model, project, key or endpoint."""
    if page is not None:
        start_time = int(page)
    if start_time is None:  # the last seven days, including today (UTC)
        today = int(time.time()) // 86400 * 86400
        start_time = today - 6 * 86400
    if end_time is not None and end_time <= start_time:
        raise InvalidRequest("end_time must be after start_time.", param="end_time")
    summary = await asyncio.to_thread(
        platform.metering.meter.summary,
        org_id=ctx.org_id,
        start=start_time,
        end=end_time,
        bucket_width=bucket_width,
        group_by=group_by or [],
        limit=limit,
        models=models or [],
        project_ids=project_ids or [],
        shared=shared,
    )
    return UsagePagePublic.from_domain(summary)
