"""`create_app(settings)`: the FastAPI application and its lifespan.

The lifespan builds the `Platform` (off the event loop: migrations and key files are blocking
work), bootstraps the operator's key on the first start, and closes everything on shutdown.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from aiaas import __version__
from aiaas.api import (
    api_keys,
    audit,
    batches,
    datasets,
    deployments,
    embeddings,
    explanations,
    files,
    fine_tuning,
    grants,
    health,
    imports,
    llm,
    models,
    oip,
    optimisations,
    organizations,
    predictions,
    privacy,
    projects,
    registry,
    usage,
)
from aiaas.api.errors import install_error_handlers
from aiaas.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from aiaas.domain import IssuedKey
from aiaas.platform import Platform
from aiaas.protocol.platform import ErrorResponse
from aiaas.services.imports import MAX_TOKENIZER_BYTES
from aiaas.settings import Settings

_ERROR_RESPONSES: dict[str, str] = {
    "400": "Invalid request",
    "401": "Missing, malformed, unknown, revoked or expired API key",
    "403": "The key lacks a scope this route needs",
    "404": "Not found, or not visible to this organisation",
    "413": "Request body too large",
}


def _announce_admin_key(issued: IssuedKey, settings: Settings) -> None:
    # Printed once, to the operator's terminal: never through the logs.
    print(
        "\n  aiaas: created the platform-admin API key (shown once):\n\n"
        f"    {issued.secret}\n\n"
        f"  It is also saved, readable by you only, in {settings.admin_key_path}\n",
        file=sys.stdout,
        flush=True,
    )


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        platform = await asyncio.to_thread(Platform.open, settings)
        try:
            issued = await asyncio.to_thread(platform.bootstrap_admin_key)
            if issued is not None:
                _announce_admin_key(issued, settings)
            platform.start_models()
            platform.start_metering()
            platform.start_jobs()
            platform.start_batches()
            app.state.platform = platform
            yield
        finally:
            await platform.stop_batches()  # before the engines close: finished lines are kept
            await platform.metering.limiter.aclose()  # its Redis client lives on this loop
            await asyncio.to_thread(platform.close)

    app = FastAPI(
        title="aiaas",
        version=__version__,
        description="Self-hosted, multi-tenant AI models as a service.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        # An upload is limited by its file size (plus room for the multipart framing).
        overrides={
            ("POST", "/v1/files"): settings.max_file_bytes + 64 * 1024,
            # A model and, for an encoder, its tokenizer.json (their own limits apply as well).
            ("POST", "/v1/models/import"): settings.max_import_bytes
            + MAX_TOKENIZER_BYTES
            + (1 << 20),
        },
    )
    app.add_middleware(RequestContextMiddleware)
    for router in (
        health.router,
        llm.router,
        embeddings.router,
        files.router,
        datasets.router,
        fine_tuning.router,
        imports.router,  # before models: its routes take any path under /v1/models
        registry.router,
        deployments.router,
        models.router,  # after registry and deployments: its retrieve route takes any path
        predictions.router,
        explanations.router,
        optimisations.router,
        oip.router,
        organizations.router,
        projects.router,
        api_keys.router,
        audit.router,
        usage.router,
        grants.router,
        privacy.router,
        batches.router,
    ):
        app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with our error contract: 400 (not 422) and one error body everywhere."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    error_ref = {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    }
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for code, description in _ERROR_RESPONSES.items():
                if code != "401" or operation.get("security"):
                    responses.setdefault(code, {"description": description, **error_ref})
    app.openapi_schema = schema
    return schema
