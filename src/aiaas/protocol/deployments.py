"""Schemas of deployments (`/v1/deployments`) and model aliases (`/v1/models/{id}/aliases`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from aiaas.domain import Deployment, DeploymentSpec, ModelAlias, Target
from aiaas.protocol.platform import ModelRef, Request

AliasName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")]
ModelId = ModelRef
ServedName = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:-]+$")
]


class TargetIn(Request):
    """A version number or an alias (resolved per request), not both."""

    version: int | None = Field(default=None, ge=1, le=2**31 - 1)
    alias: AliasName | None = None

    @model_validator(mode="after")
    def _one(self) -> TargetIn:
        if (self.version is None) == (self.alias is None):
            raise ValueError("give exactly one of version or alias")
        return self

    def target(self) -> Target:
        return Target(version=self.version, alias=self.alias)


class CanaryIn(TargetIn):
    percent: float = Field(gt=0, le=100, description="Share of requests the canary answers.")


class DeploymentCreate(Request):
    model: ModelId = Field(description="A registered model id (e.g. ft:mlp:acme::...).")
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)
    alias: AliasName | None = Field(default=None, description="Serve whatever the alias names.")
    name: ServedName | None = Field(
        default=None, description="The model id clients send; default: the model's own id."
    )
    canary: CanaryIn | None = None

    @model_validator(mode="after")
    def _one_target(self) -> DeploymentCreate:
        if self.version is not None and self.alias is not None:
            raise ValueError("give a version or an alias, not both")
        return self

    def spec(self) -> DeploymentSpec:
        target = Target(version=self.version, alias=self.alias)
        if self.version is None and self.alias is None:
            target = Target(alias="latest")
        return DeploymentSpec(
            model_id=self.model,
            target=target,
            canary=self.canary.target() if self.canary else None,
            canary_percent=self.canary.percent if self.canary else 0.0,
        )


class DeploymentUpdate(Request):
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)
    alias: AliasName | None = None
    canary: CanaryIn | None = Field(default=None, description="Omit (or null) to end a canary.")

    @model_validator(mode="after")
    def _one(self) -> DeploymentUpdate:
        if (self.version is None) == (self.alias is None):
            raise ValueError("give exactly one of version or alias")
        return self

    def spec(self, model_id: str) -> DeploymentSpec:
        return DeploymentSpec(
            model_id=model_id,
            target=Target(version=self.version, alias=self.alias),
            canary=self.canary.target() if self.canary else None,
            canary_percent=self.canary.percent if self.canary else 0.0,
        )


class TargetPublic(BaseModel):
    version: int | None
    alias: str | None


class CanaryPublic(TargetPublic):
    percent: float


class DeploymentPublic(BaseModel):
    id: str
    object: Literal["deployment"] = "deployment"
    name: str
    model: str
    target: TargetPublic
    canary: CanaryPublic | None
    created_at: int
    updated_at: int

    @classmethod
    def from_domain(cls, deployment: Deployment) -> DeploymentPublic:
        canary = deployment.canary
        return cls(
            id=deployment.id,
            name=deployment.name,
            model=deployment.model_id,
            target=TargetPublic(version=deployment.target.version, alias=deployment.target.alias),
            canary=CanaryPublic(
                version=canary.version, alias=canary.alias, percent=deployment.canary_percent
            )
            if canary
            else None,
            created_at=int(deployment.created_at),
            updated_at=int(deployment.updated_at),
        )


class DeploymentDeleted(BaseModel):
    id: str
    object: Literal["deployment.deleted"] = "deployment.deleted"
    deleted: bool = True


class AliasSet(Request):
    version: int = Field(ge=1, le=2**31 - 1)


class AliasPublic(BaseModel):
    object: Literal["model.alias"] = "model.alias"
    model: str
    alias: str
    version: int
    updated_at: int

    @classmethod
    def from_domain(cls, alias: ModelAlias) -> AliasPublic:
        return cls(
            model=alias.model_id,
            alias=alias.alias,
            version=alias.version,
            updated_at=int(alias.updated_at),
        )


class AliasList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AliasPublic]
