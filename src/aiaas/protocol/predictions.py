"""Schemas of `/v1/predictions`: raw records in, labels and probabilities out."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from aiaas.protocol.platform import ModelRef, Request

MAX_RECORDS = 10_000
Base64 = Annotated[str, StringConstraints(max_length=16 * 1024 * 1024)]


class PredictionRequest(Request):
    model: ModelRef = Field(description="A deployment's name.")
    records: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=MAX_RECORDS,
        description="Rows as column -> value, with the columns the model was trained on.",
    )
    texts: list[Annotated[str, StringConstraints(max_length=100_000)]] | None = Field(
        default=None,
        max_length=MAX_RECORDS,
        description="For a text model with one text column: the texts.",
    )
    images: list[Base64] | None = Field(
        default=None,
        max_length=1024,
        description="For an image model: base64-encoded PNG/JPEG/... images.",
    )

    @model_validator(mode="after")
    def _one_input(self) -> PredictionRequest:
        given = [x for x in (self.records, self.texts, self.images) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of records, texts or images")
        if not given[0]:
            raise ValueError("give at least one input")
        return self


class PredictionItem(BaseModel):
    index: int
    label: str | None = None
    probabilities: dict[str, float] | None = None
    value: float | None = None


class PredictionResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    model_version: int
    model_version_id: str
    registered_model: str
    canary: bool
    data: list[PredictionItem]
