"""OpenAI `/v1/embeddings`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from aiaas.api.deps import PlatformDep, metered
from aiaas.protocol.openai import EmbeddingList, EmbeddingRequest
from aiaas.services.embeddings import EmbeddingService
from aiaas.services.metering import MeteredCall
from aiaas.services.privacy import PrivacyService

router = APIRouter(prefix="/v1", tags=["inference"])


async def get_embeddings(platform: PlatformDep) -> EmbeddingService:
    return platform.embeddings


async def get_privacy(platform: PlatformDep) -> PrivacyService:
    return platform.privacy


@router.post("/embeddings", response_model=EmbeddingList)
async def create_embeddings(
    body: EmbeddingRequest,
    call: Annotated[MeteredCall, Depends(metered("embeddings"))],
    embeddings: Annotated[EmbeddingService, Depends(get_embeddings)],
    privacy: Annotated[PrivacyService, Depends(get_privacy)],
    response: Response,
) -> EmbeddingList:
    call.model = body.model
    body, screened = await privacy.screen_embeddings(call.principal, body)  # the org's policy
    response.headers.update(screened.headers)
    result = await embeddings.embed(call, body)
    call.count(model=body.model, prompt_tokens=result.usage.prompt_tokens, items=len(result.data))
    return result
