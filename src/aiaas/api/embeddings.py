"""OpenAI `/v1/embeddings`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from aiaas.api.deps import PlatformDep, require
from aiaas.domain import Principal, Scope
from aiaas.protocol.openai import EmbeddingList, EmbeddingRequest
from aiaas.services.embeddings import EmbeddingService

router = APIRouter(prefix="/v1", tags=["inference"])


def get_embeddings(platform: PlatformDep) -> EmbeddingService:
    return platform.embeddings


@router.post("/embeddings", response_model=EmbeddingList)
async def create_embeddings(
    body: EmbeddingRequest,
    principal: Annotated[Principal, Depends(require(Scope.INFERENCE))],
    embeddings: Annotated[EmbeddingService, Depends(get_embeddings)],
) -> EmbeddingList:
    return await embeddings.embed(principal, body)
