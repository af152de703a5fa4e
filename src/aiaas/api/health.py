"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel

from aiaas.api.deps import PlatformAdminDep, PlatformDep
from aiaas.errors import ServiceUnavailable

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/health", response_model=Health, responses={503: {"description": "Still loading"}})
def health(platform: PlatformDep) -> Health:
    if not platform.readiness.ready:
        loading = ", ".join(sorted(platform.readiness.loading))
        raise ServiceUnavailable(f"Loading: {loading}.", retry_after=1)
    return Health()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def metrics(_admin: PlatformAdminDep, platform: PlatformDep) -> Response:
    return Response(platform.metrics.render(), media_type="text/plain; version=0.0.4")
