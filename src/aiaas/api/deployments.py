"""Platform routes: deployments (`/v1/deployments`) and model aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, status

from aiaas.api.deps import (
    After,
    DeployDep,
    Limit,
    ModelPath,
    ModelsReadCtxDep,
    PlatformDep,
    RegistryDep,
    path_id,
)
from aiaas.protocol.deployments import (
    AliasList,
    AliasName,
    AliasPublic,
    AliasSet,
    DeploymentCreate,
    DeploymentDeleted,
    DeploymentPublic,
    DeploymentUpdate,
)
from aiaas.protocol.platform import ListResponse
from aiaas.services.deployments import DeploymentService

router = APIRouter(tags=["deployments"])

DeploymentId = Annotated[str, path_id("A deployment id.")]
AliasPath = Annotated[AliasName, Path(description="An alias name.")]


async def get_deployments(platform: PlatformDep) -> DeploymentService:
    return platform.deployments


DeploymentsDep = Annotated[DeploymentService, Depends(get_deployments)]


@router.post(
    "/v1/deployments", response_model=DeploymentPublic, status_code=status.HTTP_201_CREATED
)
def create_deployment(
    body: DeploymentCreate, ctx: DeployDep, deployments: DeploymentsDep
) -> DeploymentPublic:
    """Serve a registered model under a name: a version, an alias, or (neither) its latest."""
    assert ctx.project_id is not None
    deployment = deployments.create(
        org_id=ctx.org_id,
        project_id=ctx.project_id,
        actor=ctx.actor,
        name=body.name,
        spec=body.spec(),
    )
    return DeploymentPublic.from_domain(deployment)


@router.get("/v1/deployments", response_model=ListResponse[DeploymentPublic])
def list_deployments(
    ctx: ModelsReadCtxDep, deployments: DeploymentsDep, after: After = None, limit: Limit = 20
) -> ListResponse[DeploymentPublic]:
    page = deployments.list(org_id=ctx.org_id, after=after, limit=limit)
    data = [DeploymentPublic.from_domain(d) for d in page.items]
    return ListResponse[DeploymentPublic].of(data, has_more=page.has_more)


@router.get("/v1/deployments/{deployment_id}", response_model=DeploymentPublic)
def retrieve_deployment(
    deployment_id: DeploymentId, ctx: ModelsReadCtxDep, deployments: DeploymentsDep
) -> DeploymentPublic:
    return DeploymentPublic.from_domain(
        deployments.get(org_id=ctx.org_id, deployment_id=deployment_id)
    )


@router.post("/v1/deployments/{deployment_id}", response_model=DeploymentPublic)
def update_deployment(
    deployment_id: DeploymentId,
    body: DeploymentUpdate,
    ctx: DeployDep,
    deployments: DeploymentsDep,
) -> DeploymentPublic:
    """Point the deployment at another version or alias, start, change or end a canary."""
    current = deployments.get(org_id=ctx.org_id, deployment_id=deployment_id)
    updated = deployments.update(
        org_id=ctx.org_id,
        deployment_id=deployment_id,
        actor=ctx.actor,
        spec=body.spec(current.model_id),
    )
    return DeploymentPublic.from_domain(updated)


@router.delete("/v1/deployments/{deployment_id}", response_model=DeploymentDeleted)
def delete_deployment(
    deployment_id: DeploymentId, ctx: DeployDep, deployments: DeploymentsDep
) -> DeploymentDeleted:
    deployments.delete(org_id=ctx.org_id, deployment_id=deployment_id, actor=ctx.actor)
    return DeploymentDeleted(id=deployment_id)


@router.get("/v1/models/{model}/aliases", response_model=AliasList)
def list_aliases(model: ModelPath, ctx: ModelsReadCtxDep, registry: RegistryDep) -> AliasList:
    aliases = registry.list_aliases(org_id=ctx.org_id, model_id=model)
    return AliasList(data=[AliasPublic.from_domain(a) for a in aliases])


@router.put("/v1/models/{model}/aliases/{alias}", response_model=AliasPublic)
def set_alias(
    model: ModelPath, alias: AliasPath, body: AliasSet, ctx: DeployDep, registry: RegistryDep
) -> AliasPublic:
    """Make or move an alias; deployments serving it switch at their next request."""
    found = registry.set_alias(
        org_id=ctx.org_id, model_id=model, alias=alias, version=body.version, actor=ctx.actor
    )
    return AliasPublic.from_domain(found)


@router.delete("/v1/models/{model}/aliases/{alias}", status_code=status.HTTP_204_NO_CONTENT)
def delete_alias(model: ModelPath, alias: AliasPath, ctx: DeployDep, registry: RegistryDep) -> None:
    registry.delete_alias(org_id=ctx.org_id, model_id=model, alias=alias, actor=ctx.actor)
