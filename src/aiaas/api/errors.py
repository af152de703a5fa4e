"""Render every failure as an OpenAI error body: ours, the framework's, and the unexpected.

Registered once on the app. Starlette finds a handler by walking the exception's class
hierarchy, so the `ApiError` handler covers the whole tree in `aiaas.errors`.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aiaas.errors import (
    ApiError,
    AuthenticationFailed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServerError,
)
from aiaas.protocol.validation import invalid_request

log = logging.getLogger("aiaas.api")


def error_response(error: ApiError) -> JSONResponse:
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if isinstance(error, AuthenticationFailed):
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error: ApiError
    if exc.status_code == 404:
        error = NotFound(
            f"Unknown request URL: {request.method} {request.url.path}. "
            "Please check the URL for typos.",
            code="unknown_url",
        )
    elif exc.status_code == 405:
        error = MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.url.path}.",
            headers=dict(exc.headers or {}),
        )
    elif exc.status_code == 413:
        error = PayloadTooLarge(str(exc.detail))
    else:
        error = ApiError(str(exc.detail), headers=dict(exc.headers or {}))
        error.status = exc.status_code
        error.code = None
    return error_response(error)


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """The first problem, phrased the way OpenAI phrases it, naming the parameter."""
    return invalid_request(exc.errors())


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "unhandled error on %s %s",
        request.method,
        request.url.path,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return error_response(ServerError("The server had an error while processing your request."))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
