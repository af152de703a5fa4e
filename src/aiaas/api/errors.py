"""Render every failure as an OpenAI error body: ours, the framework's, and the unexpected.

Registered once on the app. Starlette finds a handler by walking the exception's class
hierarchy, so the `ApiError` handler covers the whole tree in `aiaas.errors`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

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


# Pydantic names the member of a union it tried ("str", "list[str]", "function-after[...]")
# inside the location; those are types, not parameters.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_type_tag(part: str) -> bool:
    return part in _TYPE_TAGS or ("[" in part and part.endswith("]"))


def _param(loc: tuple[Any, ...]) -> str | None:
    in_request = bool(loc) and loc[0] in {"body", "query", "path", "header"}
    parts = [str(p) for p in loc[1:] if not _is_type_tag(str(p))] if in_request else []
    if not parts:
        return None
    text = parts[0]
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """The first problem, phrased the way OpenAI phrases it, naming the parameter."""
    first = exc.errors()[0] if exc.errors() else {"type": "invalid", "loc": (), "msg": "invalid"}
    kind, loc = first.get("type", ""), tuple(first.get("loc", ()))
    param = _param(loc)
    if kind == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        )
    if kind == "extra_forbidden":
        return InvalidRequest(
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    if kind == "missing":
        if param is None:
            return InvalidRequest("The request body is missing.", code="missing_body")
        return InvalidRequest(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    where = f" for '{param}'" if param else ""
    return InvalidRequest(
        f"Invalid value{where}: {first.get('msg', 'invalid')}.", param=param, code="invalid_value"
    )


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
