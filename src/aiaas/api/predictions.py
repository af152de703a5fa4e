"""`POST /v1/predictions`: raw records, texts or images in; labels and probabilities out."""

from __future__ import annotations

from fastapi import APIRouter

from aiaas.api.deps import InferenceCtxDep, PredictionsDep
from aiaas.protocol.predictions import PredictionItem, PredictionRequest, PredictionResponse

router = APIRouter(prefix="/v1/predictions", tags=["predictions"])


@router.post("", response_model=PredictionResponse)
async def predict(
    body: PredictionRequest, ctx: InferenceCtxDep, predictions: PredictionsDep
) -> PredictionResponse:
    """The deployment's preprocessing spec is applied to the inputs exactly as in training."""
    served, results = await predictions.predict(
        org_id=ctx.org_id,
        name=body.model,
        records=body.records,
        texts=body.texts,
        images=body.images,
    )
    version = served.routed.version
    return PredictionResponse(
        model=body.model,
        model_version=version.version,
        model_version_id=version.id,
        registered_model=version.model_id,
        canary=served.routed.canary,
        data=[
            PredictionItem(index=i, label=p.label, probabilities=p.probabilities, value=p.value)
            for i, p in enumerate(results)
        ],
    )
