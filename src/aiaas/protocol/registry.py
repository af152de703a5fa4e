"""Schemas of the model registry (`/v1/models/{model}/versions`), a platform API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from aiaas.domain import ModelVersion, RegisteredModel
from aiaas.protocol.openai import Model


class ArtifactPublic(BaseModel):
    name: str
    bytes: int
    sha256: str


class ModelVersionPublic(BaseModel):
    id: str
    object: Literal["model.version"] = "model.version"
    model: str
    version: int
    created_at: int
    artifacts: list[ArtifactPublic]
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    dataset_version_id: str | None
    job_id: str | None

    @classmethod
    def from_domain(cls, version: ModelVersion) -> ModelVersionPublic:
        return cls(
            id=version.id,
            model=version.model_id,
            version=version.version,
            created_at=int(version.created_at),
            artifacts=[
                ArtifactPublic(name=a.name, bytes=a.bytes, sha256=a.sha256)
                for a in sorted(version.artifacts.values(), key=lambda a: a.name)
            ],
            metrics=version.metrics,
            lineage=version.lineage,
            dataset_version_id=version.dataset_version_id,
            job_id=version.job_id,
        )


class RegisteredModelPublic(Model):
    """A trained model in `/v1/models`: OpenAI's Model plus what the registry knows."""

    base: str
    task: str
    latest_version: int | None

    @classmethod
    def from_domain(cls, model: RegisteredModel) -> RegisteredModelPublic:
        return cls(
            id=model.id,
            created=int(model.created_at),
            owned_by=model.org_id,
            base=model.base,
            task=model.task,
            latest_version=model.latest_version,
        )


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
