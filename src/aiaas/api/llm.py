"""OpenAI chat completions and completions: the routes.

The routes only authenticate, validate, call the inference service and render: a serving object
(`services/serving.py`) turns the engine's events into a typed response or stream chunks, and a
stream goes out as server-sent events.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
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
from aiaas.services.privacy import PrivacyService
from aiaas.services.serving import ChatServing, CompletionServing

router = APIRouter(prefix="/v1", tags=["inference"])

ChatCallDep = Annotated[MeteredCall, Depends(metered("chat.completions"))]
CompletionCallDep = Annotated[MeteredCall, Depends(metered("completions"))]


async def get_inference(platform: PlatformDep) -> InferenceService:
    return platform.inference


InferenceServiceDep = Annotated[InferenceService, Depends(get_inference)]


async def get_privacy(platform: PlatformDep) -> PrivacyService:
    return platform.privacy


PrivacyDep = Annotated[PrivacyService, Depends(get_privacy)]


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
    privacy: PrivacyDep,
    response: Response,
) -> ChatCompletion | StreamingResponse:
    call.model = body.model
    body, screened = await privacy.screen_chat(call.principal, body)  # the org's policy
    gens = await inference.chat(call, body)
    serving = ChatServing(body, gens, call)
    if body.stream:
        return _with_headers(event_stream(serving.stream()), screened.headers)
    response.headers.update(screened.headers)
    return await serving.full(_until_disconnected(request))


@router.post("/completions", response_model=Completion)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    call: CompletionCallDep,
    inference: InferenceServiceDep,
    privacy: PrivacyDep,
    response: Response,
) -> Completion | StreamingResponse:
    call.model = body.model
    body, screened = await privacy.screen_completion(call.principal, body)  # the org's policy
    gens = await inference.complete(call, body)
    serving = CompletionServing(body, gens, call)
    if body.stream:
        return _with_headers(event_stream(serving.stream()), screened.headers)
    response.headers.update(screened.headers)
    return await serving.full(_until_disconnected(request))


def _with_headers(stream: StreamingResponse, headers: dict[str, str]) -> StreamingResponse:
    stream.headers.update(headers)
    return stream
