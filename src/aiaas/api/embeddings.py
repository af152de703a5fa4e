"""OpenAI `/v1/embeddings`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from aiaas.api.deps import PlatformDep, metered
from aiaas.protocol.openai import EmbeddingList, EmbeddingRequest
from aiaas.services.embeddings import EmbeddingService
from aiaas.services.metering import MeteredCall

router = APIRouter(prefix="/v1", tags=["inference"])


async def get_embeddings(platform: PlatformDep) -> EmbeddingService:
    return platform.embeddings


@router.post("/embeddings", response_model=EmbeddingList)
async def create_embeddings(
    body: EmbeddingRequest,
    call: Annotated[MeteredCall, Depends(metered("embeddings"))],
    embeddings: Annotated[EmbeddingService, Depends(get_embeddings)],
) -> EmbeddingList:
    call.model = body.model
    result = await embeddings.embed(call, body)
    call.count(model=body.model, prompt_tokens=result.usage.prompt_tokens, items=len(result.data))
    return result
