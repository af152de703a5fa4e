"""`POST /v1/predictions`: raw records, texts or images in; labels and probabilities out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from aiaas.api.deps import InferenceCtxDep, PlatformDep, PredictionsDep, metered
from aiaas.protocol.predictions import PredictionRequest, PredictionResponse
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
    return await predictions.respond(
        org_id=ctx.org_id,
        model=body.model,
        records=records,
        texts=texts,
        images=body.images,
        weight=ctx.principal.weight,
        call=call,
    )
