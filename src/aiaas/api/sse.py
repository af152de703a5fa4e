"""Server-sent events in OpenAI's framing, in one place.

Each chunk is `data: <JSON>\\n\\n`; an error after the first byte becomes one
`data: {"error": ...}` event; `data: [DONE]` always comes last.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from aiaas.errors import ApiError, ServerError

log = logging.getLogger("aiaas.api")


async def _frames(chunks: AsyncIterator[BaseModel | bytes]) -> AsyncIterator[bytes]:
    """Frame each chunk; a chunk given as bytes is JSON the caller already rendered."""
    try:
        async for chunk in chunks:
            body = chunk if isinstance(chunk, bytes) else chunk.model_dump_json().encode()
            yield b"data: " + body + b"\n\n"
    except ApiError as exc:
        yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
    except Exception:
        log.exception("stream failed")
        error = ServerError("The server had an error while processing your request.")
        yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def event_stream(chunks: AsyncIterator[BaseModel | bytes]) -> StreamingResponse:
    return StreamingResponse(
        _frames(chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
