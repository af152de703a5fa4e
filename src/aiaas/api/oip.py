"""The Open Inference Protocol v2 for deployed models: health, metadata, readiness, infer.

`{name}` is a deployment's name in the caller's organisation, or `<owner org>/<name>` for another
organisation's deployment shared with it (so `{name}` may hold a slash); `/versions/{v}` pins a
version of the deployed model (without it, the deployment's target or canary answers).

Routes match in the order they are defined, and `{name:path}` takes any path: each route with a
longer suffix is defined before the shorter ones it would otherwise shadow (versioned before
unversioned, the bare metadata route last).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from aiaas import __version__
from aiaas.api.deps import (
    InferenceCtxDep,
    ModelPath,
    ModelsReadCtxDep,
    ModelsReadDep,
    PlatformDep,
    PredictionsDep,
    metered,
)
from aiaas.protocol.oip import (
    InferenceRequest,
    InferenceResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ResponseOutput,
    ServerMetadata,
    TensorMetadata,
)
from aiaas.services.metering import MeteredCall
from aiaas.services.predictions import PredictionService

OipCallDep = Annotated[MeteredCall, Depends(metered("oip.infer"))]
router = APIRouter(prefix="/v2", tags=["open-inference-protocol"])

VersionPath = Annotated[str, Path(pattern=r"^[0-9]{1,9}$", description="A version number.")]


@router.get("", response_model=ServerMetadata)
def server_metadata(_principal: ModelsReadDep) -> ServerMetadata:
    return ServerMetadata(name="aiaas", version=__version__, extensions=[])


@router.get("/health/live", response_model=Live)
def live(_principal: ModelsReadDep) -> Live:
    return Live(live=True)


@router.get("/health/ready", response_model=Ready)
def ready(_principal: ModelsReadDep, platform: PlatformDep) -> Ready:
    return Ready(ready=platform.readiness.ready)


async def _metadata(
    predictions: PredictionService, org_id: str, name: str, version: int | None
) -> ModelMetadata:
    served = await predictions.serve(org_id=org_id, name=name, version=version, split=False)
    model = served.loaded.model
    versions = await predictions.versions(org_id=org_id, deployment=served.routed.deployment)
    return ModelMetadata(
        name=name,
        versions=[str(v) for v in versions],
        platform="onnxruntime_onnx",
        inputs=[
            TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.inputs
        ],
        outputs=[
            TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.outputs
        ],
        parameters={
            "task": model.task.value,
            "classes": model.classes,
            "model": served.routed.deployment.model_id,
            "version": served.routed.version.version,
        },
    )


@router.get("/models/{name:path}/versions/{version}", response_model=ModelMetadata)
async def model_version_metadata(
    name: ModelPath, version: VersionPath, ctx: ModelsReadCtxDep, predictions: PredictionsDep
) -> ModelMetadata:
    return await _metadata(predictions, ctx.org_id, name, int(version))


async def _ready(
    predictions: PredictionService, org_id: str, name: str, version: int | None
) -> ModelReady:
    ready = await predictions.ready_all(org_id=org_id, name=name, version=version)
    return ModelReady(name=name, ready=ready)


@router.get("/models/{name:path}/versions/{version}/ready", response_model=ModelReady)
async def model_version_ready(
    name: ModelPath, version: VersionPath, ctx: ModelsReadCtxDep, predictions: PredictionsDep
) -> ModelReady:
    return await _ready(predictions, ctx.org_id, name, int(version))


@router.get("/models/{name:path}/ready", response_model=ModelReady)
async def model_ready(
    name: ModelPath, ctx: ModelsReadCtxDep, predictions: PredictionsDep
) -> ModelReady:
    """Whether the model (its target and any canary) is loaded; asking starts loading it."""
    return await _ready(predictions, ctx.org_id, name, None)


async def _infer(
    predictions: PredictionService,
    org_id: str,
    name: str,
    version: int | None,
    body: InferenceRequest,
    call: MeteredCall,
) -> InferenceResponse:
    call.model = name
    served, logits = await predictions.infer(
        org_id=org_id,
        name=name,
        version=version,
        request=body,
        weight=call.principal.weight,
        call=call,
    )
    call.count(model=name, items=int(logits.shape[0]) if logits.ndim else 1)
    output = served.loaded.model.outputs[0]  # "logits" (trained), or an imported model's own
    return InferenceResponse(
        model_name=name,
        model_version=str(served.routed.version.version),
        id=body.id,
        outputs=[
            ResponseOutput(
                name=output.name,
                shape=list(logits.shape),
                datatype=output.datatype,
                data=logits.reshape(-1).tolist(),
            )
        ],
    )


@router.post("/models/{name:path}/versions/{version}/infer", response_model=InferenceResponse)
async def infer_version(
    name: ModelPath,
    version: VersionPath,
    body: InferenceRequest,
    ctx: InferenceCtxDep,
    predictions: PredictionsDep,
    call: OipCallDep,
) -> InferenceResponse:
    return await _infer(predictions, ctx.org_id, name, int(version), body, call)


@router.post("/models/{name:path}/infer", response_model=InferenceResponse)
async def infer(
    name: ModelPath,
    body: InferenceRequest,
    ctx: InferenceCtxDep,
    predictions: PredictionsDep,
    call: OipCallDep,
) -> InferenceResponse:
    return await _infer(predictions, ctx.org_id, name, None, body, call)


@router.get("/models/{name:path}", response_model=ModelMetadata)
async def model_metadata(
    name: ModelPath, ctx: ModelsReadCtxDep, predictions: PredictionsDep
) -> ModelMetadata:
    return await _metadata(predictions, ctx.org_id, name, None)
