"""OpenAI `/v1/models`: the models this caller may use."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from aiaas.api.deps import ModelsReadDep
from aiaas.errors import ModelNotFound
from aiaas.protocol.openai import Model, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(_principal: ModelsReadDep) -> ModelList:
    # Engines register their models here as they arrive (LLM, embeddings, deployments).
    return ModelList(data=[])


@router.get("/{model}", response_model=Model)
def retrieve_model(model: Annotated[str, Path(max_length=256)], _principal: ModelsReadDep) -> Model:
    raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
