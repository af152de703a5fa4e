"""OpenAI chat completions and completions: the routes.

The routes only authenticate, validate, call the inference service and render: a serving object
(`services/serving.py`) turns the engine's events into a typed response or stream chunks, and a
stream goes out as server-sent events.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from aiaas.api.deps import PlatformDep, metered
from aiaas.api.sse import event_stream
from aiaas.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
)
from aiaas.services.inference import InferenceService
from aiaas.services.metering import MeteredCall
from aiaas.services.serving import ChatServing, CompletionServing

router = APIRouter(prefix="/v1", tags=["inference"])

ChatCallDep = Annotated[MeteredCall, Depends(metered("chat.completions"))]
CompletionCallDep = Annotated[MeteredCall, Depends(metered("completions"))]


async def get_inference(platform: PlatformDep) -> InferenceService:
    return platform.inference


InferenceServiceDep = Annotated[InferenceService, Depends(get_inference)]


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone: a non-streamed generation stops then."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    call: ChatCallDep,
    inference: InferenceServiceDep,
) -> ChatCompletion | StreamingResponse:
    call.model = body.model
    gens = await inference.chat(call, body)
    serving = ChatServing(body, gens, call)
    if body.stream:
        return event_stream(serving.stream())
    return await serving.full(_until_disconnected(request))


@router.post("/completions", response_model=Completion)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    call: CompletionCallDep,
    inference: InferenceServiceDep,
) -> Completion | StreamingResponse:
    call.model = body.model
    gens = await inference.complete(call, body)
    serving = CompletionServing(body, gens, call)
    if body.stream:
        return event_stream(serving.stream())
    return await serving.full(_until_disconnected(request))
