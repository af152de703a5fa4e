"""The model registry: a trained model's versions, their metrics, lineage and artifacts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import StreamingResponse

from aiaas.api.deps import (
    After,
    Limit,
    ModelPath,
    ModelsReadCtxDep,
    PlatformDep,
    RegistryDep,
    TrainingDep,
)
from aiaas.protocol.platform import ListResponse
from aiaas.protocol.registry import ModelDeleted, ModelVersionPublic
from aiaas.services.bundles import BundleService

router = APIRouter(prefix="/v1/models", tags=["models"])

VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1, description="A version number.")]
ArtifactName = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="An artifact's file name.")
]

_BUNDLE_CHUNK = 1 << 20

_MEDIA_TYPES = {
    ".safetensors": "application/octet-stream",
    ".onnx": "application/octet-stream",
    ".json": "application/json",
}


@router.get("/{model}/versions", response_model=ListResponse[ModelVersionPublic])
def list_versions(
    model: ModelPath,
    ctx: ModelsReadCtxDep,
    registry: RegistryDep,
    after: After = None,
    limit: Limit = 20,
) -> ListResponse[ModelVersionPublic]:
    page = registry.list_versions(org_id=ctx.org_id, model_id=model, after=after, limit=limit)
    data = [ModelVersionPublic.from_domain(v) for v in page.items]
    return ListResponse[ModelVersionPublic].of(data, has_more=page.has_more)


@router.get("/{model}/versions/{version}", response_model=ModelVersionPublic)
def retrieve_version(
    model: ModelPath, version: VersionNumber, ctx: ModelsReadCtxDep, registry: RegistryDep
) -> ModelVersionPublic:
    found = registry.read_version(org_id=ctx.org_id, model_id=model, version=version)
    return ModelVersionPublic.from_domain(found)


@router.get(
    "/{model}/versions/{version}/artifacts/{name}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_artifact(
    model: ModelPath,
    version: VersionNumber,
    name: ArtifactName,
    ctx: ModelsReadCtxDep,
    registry: RegistryDep,
) -> StreamingResponse:
    """The artifact's bytes: model.safetensors, model.onnx, preprocessing.json, model.json."""
    found = registry.read_version(org_id=ctx.org_id, model_id=model, version=version)
    artifact, chunks = registry.open_artifact(found, name)
    suffix = name[name.rfind(".") :] if "." in name else ""
    return StreamingResponse(
        chunks,
        media_type=_MEDIA_TYPES.get(suffix, "application/octet-stream"),
        headers={
            "Content-Length": str(artifact.bytes),
            "Content-Disposition": f'attachment; filename="{artifact.name}"',
        },
    )


async def get_bundles(platform: PlatformDep) -> BundleService:
    return platform.bundles


BundlesDep = Annotated[BundleService, Depends(get_bundles)]


@router.get(
    "/{model}/versions/{version}/bundle",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
def download_bundle(
    model: ModelPath, version: VersionNumber, ctx: ModelsReadCtxDep, bundles: BundlesDep
) -> StreamingResponse:
    """An edge bundle: the version's ONNX graph, preprocessing, labels, a runner that needs only
    numpy and onnxruntime, a README and a manifest of sha256 sums, as one zip."""
    built = bundles.build(org_id=ctx.org_id, model_id=model, version=version)
    return StreamingResponse(
        _chunks(built.file),
        media_type="application/zip",
        headers={
            "Content-Length": str(built.bytes),
            "Content-Disposition": f'attachment; filename="{built.filename}"',
        },
    )


def _chunks(file: IO[bytes]) -> Iterator[bytes]:
    with file:
        while chunk := file.read(_BUNDLE_CHUNK):
            yield chunk


@router.delete("/{model}", response_model=ModelDeleted)
def delete_model(model: ModelPath, ctx: TrainingDep, registry: RegistryDep) -> ModelDeleted:
    """Delete a trained model with all its versions (OpenAI: delete a fine-tuned model)."""
    registry.delete_model(org_id=ctx.org_id, model_id=model, actor=ctx.actor)
    return ModelDeleted(id=model)
