"""OpenAI `/v1/models`: the served models, and the caller's organisation's trained models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import SerializeAsAny

from aiaas.api.deps import AdminDep, ModelPath, ModelsReadDep, PlatformDep
from aiaas.protocol.openai import Model, ModelList, ModelResidency
from aiaas.services.models import ModelCatalog

router = APIRouter(prefix="/v1/models", tags=["models"])


async def get_catalog(platform: PlatformDep) -> ModelCatalog:
    return ModelCatalog(
        platform.inference, platform.registry, platform.deployments, platform.grants
    )


CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]


@router.get("", response_model=ModelList)
def list_models(principal: ModelsReadDep, catalog: CatalogDep) -> ModelList:
    return ModelList(data=catalog.list(principal))


@router.post("/{model:path}/load", response_model=ModelResidency)
async def load_model(
    model: ModelPath, principal: AdminDep, platform: PlatformDep
) -> ModelResidency:
    """Load a language model before its traffic arrives (admins)."""
    return await platform.inference.load(principal, model)


@router.post("/{model:path}/unload", response_model=ModelResidency)
async def unload_model(
    model: ModelPath, principal: AdminDep, platform: PlatformDep
) -> ModelResidency:
    """Unload an idle language model now (409 while it serves requests)."""
    return await platform.inference.unload(principal, model)


# `:path`: a shared deployment's id is `<owner org>/<name>`. app.py includes this router after
# the registry's and the deployments', whose `/v1/models/{model}/...` routes must match first.
@router.get("/{model:path}", response_model=SerializeAsAny[Model])
def retrieve_model(model: ModelPath, principal: ModelsReadDep, catalog: CatalogDep) -> Model:
    return catalog.get(principal, model)
