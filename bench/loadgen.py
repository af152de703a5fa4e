"""Closed-loop streaming load against an OpenAI-compatible endpoint.

`concurrency` clients each send a request, read its SSE stream to the end and send the next one,
so the server always holds exactly that many requests. Every request becomes a `RequestRecord`
with the timing of each content chunk; `bench/metrics.py` turns a `LevelRun` into numbers.

The caller owns the `httpx.AsyncClient` (base URL, auth header, timeouts) and decides what each
request carries through a `BodyFactory`, so the same loop drives completions, chat or any other
endpoint that streams OpenAI-style chunks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import httpx

__all__ = [
    "BodyFactory",
    "LevelRun",
    "RequestRecord",
    "StreamError",
    "client_limits",
    "run_closed_loop",
    "sse_events",
    "stream_request",
]

# (client index, request index within that client) -> JSON body of the request.
BodyFactory = Callable[[int, int], Mapping[str, object]]

_ERROR_TEXT_LIMIT = 300


class StreamError(Exception):
    """The stream broke the SSE/JSON contract or carried an error event."""


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request's timing. Times are seconds since the level began (`time.perf_counter`)."""

    client: int
    index: int
    start: float
    end: float
    # Arrival time of every chunk that carried non-empty text.
    content_times: tuple[float, ...]
    # `usage.completion_tokens` when the server sent it, otherwise the number of content chunks.
    output_tokens: int
    tokens_from_usage: bool
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        """Time to first token: request sent until the first chunk with text arrived."""
        return self.content_times[0] - self.start if self.content_times else None

    @property
    def inter_token(self) -> tuple[float, ...]:
        """Gaps between successive content chunks."""
        times = self.content_times
        return tuple(b - a for a, b in itertools.pairwise(times))


@dataclass(frozen=True, slots=True)
class LevelRun:
    """Every request of one closed-loop level, sorted by start time."""

    concurrency: int
    wall_s: float
    records: tuple[RequestRecord, ...]


def client_limits(concurrency: int) -> httpx.Limits:
    """Connection limits that never make a client wait for a pooled connection."""
    return httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)


async def run_closed_loop(
    client: httpx.AsyncClient,
    path: str,
    make_body: BodyFactory,
    *,
    concurrency: int,
    requests_per_client: int | None = None,
    duration_s: float | None = None,
) -> LevelRun:
    """Run `concurrency` clients until each sent `requests_per_client` or `duration_s` passed.

    In duration mode a client starts no request after the deadline, but the ones in flight run to
    the end and count, so `wall_s` may exceed `duration_s` by up to one request.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if (requests_per_client is None) == (duration_s is None):
        raise ValueError("give exactly one of requests_per_client and duration_s")

    origin = time.perf_counter()
    deadline = None if duration_s is None else origin + duration_s

    async def one_client(client_index: int) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        index = 0
        while requests_per_client is None or index < requests_per_client:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            body = make_body(client_index, index)
            record = await stream_request(
                client, path, body, origin=origin, client_index=client_index, index=index
            )
            records.append(record)
            index += 1
        return records

    per_client = await asyncio.gather(*(one_client(c) for c in range(concurrency)))
    wall_s = time.perf_counter() - origin
    records = sorted((r for rs in per_client for r in rs), key=lambda r: r.start)
    return LevelRun(concurrency=concurrency, wall_s=wall_s, records=tuple(records))


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    body: Mapping[str, object],
    *,
    origin: float,
    client_index: int = 0,
    index: int = 0,
) -> RequestRecord:
    """POST one streaming request and time its chunks; failures become `record.error`."""
    start = time.perf_counter()
    content_times: list[float] = []
    usage_tokens: int | None = None
    error: str | None = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != httpx.codes.OK:
                text = (await response.aread()).decode(errors="replace")
                raise StreamError(f"HTTP {response.status_code}: {text[:_ERROR_TEXT_LIMIT]}")
            async for event in sse_events(response.aiter_lines()):
                if "error" in event:
                    raise StreamError(f"error event: {_short(event['error'])}")
                if _content_text(event):
                    content_times.append(time.perf_counter())
                if (tokens := _completion_tokens(event)) is not None:
                    usage_tokens = tokens
    except (httpx.HTTPError, StreamError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    return RequestRecord(
        client=client_index,
        index=index,
        start=start - origin,
        end=end - origin,
        content_times=tuple(t - origin for t in content_times),
        output_tokens=usage_tokens if usage_tokens is not None else len(content_times),
        tokens_from_usage=usage_tokens is not None,
        error=error,
    )


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, object]]:
    """The JSON objects of a `data:` event stream, up to `data: [DONE]` or the end of the stream.

    Follows the SSE framing: an event is the `data:` lines up to a blank line, joined by newlines;
    comments (`:`) and other fields are skipped.
    """
    data: list[str] = []
    async for line in lines:
        if line:
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value.removeprefix(" "))
            continue
        if not data:
            continue
        payload, data = "\n".join(data), []
        if payload == "[DONE]":
            return
        yield _parse_event(payload)
    if data and (payload := "\n".join(data)) != "[DONE]":
        yield _parse_event(payload)


def _parse_event(payload: str) -> dict[str, object]:
    try:
        event = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise StreamError(f"event is not JSON: {payload[:_ERROR_TEXT_LIMIT]!r}") from exc
    if not isinstance(event, dict):
        raise StreamError(f"event is not a JSON object: {payload[:_ERROR_TEXT_LIMIT]!r}")
    return event


def _content_text(event: Mapping[str, object]) -> str:
    """The text a chunk adds: `choices[0].text` (completions) or `.delta.content` (chat)."""
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    text = choice.get("text")
    if isinstance(text, str):
        return text
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _completion_tokens(event: Mapping[str, object]) -> int | None:
    usage = event.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def _short(value: object) -> str:
    return json.dumps(value)[:_ERROR_TEXT_LIMIT]
