"""Pure ASGI middleware: request context (id, access log, metrics) and the body size limit."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aiaas.errors import PayloadTooLarge
from aiaas.ids import unique_hex
from aiaas.observability.logs import request_id_var

log = logging.getLogger("aiaas.access")

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Give every request an id (echoed as `x-request-id`), log it once, and count it.

    The route label is the matched template (`/v1/api_keys/{key_id}`), never the raw path, so
    metric cardinality stays bounded whatever clients send.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id") or ""
        request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else unique_hex()
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append("x-request-id", request_id)
                metered = scope.get("state", {}).get("metered")
                if metered is not None:
                    for name, value in metered.headers.items():
                        headers.append(name, value)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Metered before the last byte leaves: a client that reads its usage right
                # after a response always finds the request counted.
                await end_metering()
            await send(message)

        async def end_metering() -> None:
            metered = scope.get("state", {}).pop("metered", None)
            if metered is not None and platform is not None:
                await platform.metering.end(metered, status=status, request_id=request_id)

        platform = getattr(scope["app"].state, "platform", None)
        if platform is not None:
            platform.metrics.http_in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            org = scope.get("state", {}).get("org_id") or "-"
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "org": org,
                },
            )
            await end_metering()  # a response cut short (client gone, error) is metered too
            if platform is not None:
                platform.metrics.http_in_flight.dec()
                labels = {"method": scope["method"], "route": route, "org": org}
                platform.metrics.http_requests.labels(status=str(status), **labels).inc()
                platform.metrics.http_latency.labels(**labels).observe(elapsed)
            request_id_var.reset(token)


class BodyLimitMiddleware:
    """Refuse bodies over the limit: at once from Content-Length, or while streaming in."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        overrides: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.overrides = dict(overrides or {})  # (method, path) -> its own limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.overrides.get((scope["method"], scope["path"]), self.max_bytes)
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._reject(send, limit)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # An HTTPException passes through FastAPI's body parsing untouched.
                    raise HTTPException(413, detail=self._message(limit))
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    def _message(limit: int) -> str:
        return f"Request body is larger than the limit of {limit} bytes."

    async def _reject(self, send: Send, limit: int) -> None:
        body = json.dumps(PayloadTooLarge(self._message(limit)).body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
