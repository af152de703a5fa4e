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
from typing import Literal

import httpx

__all__ = [
    "BodyFactory",
    "LevelRun",
    "PauseFactory",
    "RequestRecord",
    "StreamError",
    "TokenCount",
    "client_limits",
    "run_closed_loop",
    "sse_events",
    "stream_request",
]

# (client index, request index within that client) -> JSON body of the request.
BodyFactory = Callable[[int, int], Mapping[str, object]]
# (client index, request index within that client) -> seconds to wait before sending it.
PauseFactory = Callable[[int, int], float]

# Where a request's output token count came from, best first: the server's `usage`; the body's
# `max_tokens` when the stream ended with finish_reason "length"; the number of content chunks
# (low when a server packs several tokens into one chunk).
TokenCount = Literal["usage", "max_tokens", "chunks"]

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
    output_tokens: int
    token_count: TokenCount
    finish_reason: str | None
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
    stop: asyncio.Event | None = None,
    pause: PauseFactory | None = None,
    origin: float | None = None,
) -> LevelRun:
    """Run `concurrency` clients until each sent `requests_per_client` or `duration_s` passed.

    In duration mode a client starts no request after the deadline, but the ones in flight run to
    the end and count, so `wall_s` may exceed `duration_s` by up to one request. `stop` ends the
    run the same way when it is set (it may replace both limits, for a load that runs alongside
    another). `pause(client, index)` is a think time in seconds before each request. Request
    times are measured from `origin` (a `time.perf_counter()` reading; default: this call), so
    runs that share one origin share one clock; `wall_s` always counts from this call.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if requests_per_client is not None and duration_s is not None:
        raise ValueError("give at most one of requests_per_client and duration_s")
    if requests_per_client is None and duration_s is None and stop is None:
        raise ValueError("give requests_per_client, duration_s or stop")

    start = time.perf_counter()
    origin = start if origin is None else origin
    deadline = None if duration_s is None else start + duration_s

    def ended() -> bool:
        past_deadline = deadline is not None and time.perf_counter() >= deadline
        return past_deadline or (stop is not None and stop.is_set())

    async def one_client(client_index: int) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        index = 0
        while requests_per_client is None or index < requests_per_client:
            if pause is not None and (seconds := pause(client_index, index)) > 0:
                await asyncio.sleep(seconds)
            if ended():
                break
            body = make_body(client_index, index)
            record = await stream_request(
                client, path, body, origin=origin, client_index=client_index, index=index
            )
            records.append(record)
            index += 1
        return records

    per_client = await asyncio.gather(*(one_client(c) for c in range(concurrency)))
    wall_s = time.perf_counter() - start
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
    finish_reason: str | None = None
    error: str | None = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != httpx.codes.OK:
                text = (await response.aread()).decode(errors="replace")
                raise StreamError(f"HTTP {response.status_code}: {text[:_ERROR_TEXT_LIMIT]}")
            async for event in sse_events(response.aiter_lines()):
                if event.get("error") is not None:
                    raise StreamError(f"error event: {_short(event['error'])}")
                if _content_text(event):
                    content_times.append(time.perf_counter())
                if (tokens := _completion_tokens(event)) is not None:
                    usage_tokens = tokens
                finish_reason = _finish_reason(event) or finish_reason
    except (httpx.HTTPError, StreamError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    output_tokens, token_count = _output_tokens(
        usage_tokens, finish_reason, body.get("max_tokens"), len(content_times)
    )
    return RequestRecord(
        client=client_index,
        index=index,
        start=start - origin,
        end=end - origin,
        content_times=tuple(t - origin for t in content_times),
        output_tokens=output_tokens,
        token_count=token_count,
        finish_reason=finish_reason,
        error=error,
    )


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, object]]:
    """The JSON objects of a `data:` event stream, up to `data: [DONE]`.

    Follows the SSE framing: an event is the `data:` lines up to a blank line, joined by newlines;
    comments (`:`) and other fields are skipped. A stream that ends before `[DONE]` was cut off
    (a crash, a dropped connection) and raises `StreamError` after its last event.
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
    if data:
        if (payload := "\n".join(data)) == "[DONE]":
            return
        yield _parse_event(payload)
    raise StreamError("the stream ended before data: [DONE]")


def _parse_event(payload: str) -> dict[str, object]:
    try:
        event = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise StreamError(f"event is not JSON: {payload[:_ERROR_TEXT_LIMIT]!r}") from exc
    if not isinstance(event, dict):
        raise StreamError(f"event is not a JSON object: {payload[:_ERROR_TEXT_LIMIT]!r}")
    return event


def _first_choice(event: Mapping[str, object]) -> dict[str, object]:
    choices = event.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}  # e.g. the usage chunk, whose `choices` is empty


def _content_text(event: Mapping[str, object]) -> str:
    """The text a chunk adds: `choices[0].text` (completions) or `.delta.content` (chat)."""
    choice = _first_choice(event)
    text = choice.get("text")
    if isinstance(text, str):
        return text
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _output_tokens(
    usage_tokens: int | None, finish_reason: str | None, max_tokens: object, chunks: int
) -> tuple[int, TokenCount]:
    if usage_tokens is not None:
        return usage_tokens, "usage"
    if finish_reason == "length" and isinstance(max_tokens, int) and max_tokens >= chunks:
        return max_tokens, "max_tokens"
    return chunks, "chunks"


def _finish_reason(event: Mapping[str, object]) -> str | None:
    reason = _first_choice(event).get("finish_reason")
    return reason if isinstance(reason, str) else None


def _completion_tokens(event: Mapping[str, object]) -> int | None:
    usage = event.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def _short(value: object) -> str:
    return json.dumps(value)[:_ERROR_TEXT_LIMIT]
