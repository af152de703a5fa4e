"""OpenAI `/v1/models`: the models this caller may use."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from aiaas.api.deps import ModelsReadDep, PlatformDep
from aiaas.protocol.openai import Model, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(_principal: ModelsReadDep, platform: PlatformDep) -> ModelList:
    return ModelList(data=platform.inference.models())


@router.get("/{model}", response_model=Model)
def retrieve_model(
    model: Annotated[str, Path(max_length=256)], _principal: ModelsReadDep, platform: PlatformDep
) -> Model:
    return platform.inference.model(model)
