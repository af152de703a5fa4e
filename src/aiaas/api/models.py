"""OpenAI `/v1/models`: the served models, and the caller's organisation's trained models."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import SerializeAsAny

from aiaas.api.deps import ModelPath, ModelsReadDep, PlatformDep
from aiaas.errors import ModelNotFound
from aiaas.protocol.openai import Model, ModelList
from aiaas.protocol.registry import RegisteredModelPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(principal: ModelsReadDep, platform: PlatformDep) -> ModelList:
    served = platform.inference.models()
    trained: list[Model] = []
    if principal.org_id is not None:
        registered = platform.registry.list_models(org_id=principal.org_id)
        trained = [RegisteredModelPublic.from_domain(m) for m in registered]
        # A deployment under its own name is a model id clients can send, too.
        names = {m.id for m in registered}
        trained += [
            Model(id=d.name, created=int(d.created_at), owned_by=d.org_id)
            for d in platform.deployments.list(org_id=principal.org_id).items
            if d.name not in names
        ]
    return ModelList(data=[*served, *trained])


@router.get("/{model}", response_model=SerializeAsAny[Model])
def retrieve_model(
    model: ModelPath,
    principal: ModelsReadDep,
    platform: PlatformDep,
) -> Model:
    try:
        return platform.inference.model(model)
    except ModelNotFound:
        if principal.org_id is None:
            raise
        found = platform.registry.find_model(org_id=principal.org_id, model_id=model)
        if found is not None:
            return RegisteredModelPublic.from_domain(found)
        deployment = platform.deployments.find(org_id=principal.org_id, name=model)
        if deployment is None:
            raise
        return Model(
            id=deployment.name, created=int(deployment.created_at), owned_by=deployment.org_id
        )
