"""`POST /v1/predictions`: raw records, texts or images in; labels and probabilities out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from aiaas.api.deps import InferenceCtxDep, PlatformDep, PredictionsDep, metered
from aiaas.protocol.predictions import PredictionItem, PredictionRequest, PredictionResponse
from aiaas.services.metering import MeteredCall
from aiaas.services.privacy import PrivacyService

router = APIRouter(prefix="/v1/predictions", tags=["predictions"])


async def get_privacy(platform: PlatformDep) -> PrivacyService:
    return platform.privacy


@router.post("", response_model=PredictionResponse)
async def predict(
    body: PredictionRequest,
    ctx: InferenceCtxDep,
    predictions: PredictionsDep,
    call: Annotated[MeteredCall, Depends(metered("predictions"))],
    privacy: Annotated[PrivacyService, Depends(get_privacy)],
    response: Response,
) -> PredictionResponse:
    """The deployment's preprocessing spec is applied to the inputs exactly as in training."""
    call.model = body.model
    texts, records, screened = await privacy.screen_prediction_inputs(  # the org's policy
        call.principal, body.texts, body.records
    )
    response.headers.update(screened.headers)
    served, results = await predictions.predict(
        org_id=ctx.org_id,
        name=body.model,
        records=records,
        texts=texts,
        images=body.images,
        weight=ctx.principal.weight,
        call=call,
    )
    call.count(model=body.model, items=len(results))
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
