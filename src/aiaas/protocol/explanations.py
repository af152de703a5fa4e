"""Schemas of `/v1/explanations`: the records of `/v1/predictions` in, per record the prediction
and its attributions out (per column, per token, or a heatmap), or a job for a large request."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from aiaas.domain import Job
from aiaas.protocol.platform import ModelRef, Request
from aiaas.protocol.predictions import MAX_RECORDS, Base64

Method = Literal[
    "integrated_gradients",
    "shapley_sampling",
    "kernel_shap",
    "occlusion",
    "attention",
    "feature_ablation",
]
NamedBaseline = Literal["typical", "zeros", "mean", "black", "white", "pad"]
Text = Annotated[str, StringConstraints(max_length=100_000)]


class ExplanationOptions(Request):
    """A method's settings; each is optional and has a documented default."""

    n_steps: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="integrated_gradients, attention: steps of the path integral (default 50).",
    )
    baseline: NamedBaseline | dict[str, Any] | None = Field(
        default=None,
        description="What an input is compared with. Tables: `mean` (default: each numeric "
        "column at its training mean, each categorical one at its most frequent value), "
        "`typical` (each column at the value training filled its gaps with), `zeros`, or a "
        "record of column values (the others at their mean); "
        "images: `mean` (default: the training images' mean colour), `black`, `white`; text: "
        "`pad` (every token replaced by padding).",
    )
    target: (
        Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00]+$")]
        | None
    ) = Field(default=None, description="The class to explain (default: the predicted one).")
    n_samples: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="shapley_sampling (default 25 permutations), kernel_shap (default 200).",
    )
    window: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Images: the occlusion window and the patch the other perturbation methods "
        "remove, in model pixels (default a quarter of the shorter side).",
    )
    stride: int | None = Field(
        default=None, ge=1, le=4096, description="Occlusion's stride (default half the window)."
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="The sampling methods' draws (default 0)."
    )

    @model_validator(mode="after")
    def _no_nul(self) -> ExplanationOptions:
        # A job keeps its options in the database, and PostgreSQL's JSON refuses NUL.
        if isinstance(self.baseline, dict) and "\\u0000" in json.dumps(self.baseline):
            raise ValueError("the baseline record holds a NUL character")
        return self


class ExplanationRequest(Request):
    model: ModelRef = Field(
        description="A deployment's name (as for /v1/predictions), `name@version` or "
        "`name@alias` for a version of the model it serves."
    )
    records: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=MAX_RECORDS,
        description="Rows as column -> value, with the columns the model was trained on.",
    )
    texts: list[Text] | None = Field(
        default=None,
        max_length=MAX_RECORDS,
        description="For a text model with one text column: the texts.",
    )
    images: list[Base64] | None = Field(
        default=None,
        max_length=1024,
        description="For an image model: base64-encoded PNG/JPEG/... images.",
    )
    method: Method = Field(default="integrated_gradients", description="The attribution method.")
    options: ExplanationOptions = Field(default_factory=ExplanationOptions)

    @model_validator(mode="after")
    def _one_input(self) -> ExplanationRequest:
        given = [x for x in (self.records, self.texts, self.images) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of records, texts or images")
        if not given[0]:
            raise ValueError("give at least one input")
        return self


class ExplainedPrediction(BaseModel):
    """What /v1/predictions answers for the same record."""

    label: str | None = None
    probabilities: dict[str, float] | None = None
    value: float | None = None


class ColumnAttribution(BaseModel):
    column: str
    value: Any = Field(description="The record's value in this column.")
    attribution: float | None


class TokenAttribution(BaseModel):
    token: str
    start: int | None = Field(description="Character span of the token in the text.")
    end: int | None
    attribution: float | None
    attention: float | None = Field(
        default=None, description="Method `attention`: the attention weight the token received."
    )


class ImageAttribution(BaseModel):
    column: str
    width: int = Field(description="The input image's size, which the PNG has.")
    height: int
    heatmap_png: str = Field(
        description="Base64 RGBA PNG to lay over the image: red raised the explained output, "
        "blue lowered it, opacity by strength."
    )
    heatmap: list[list[float | None]] = Field(
        description="Per pixel at the model's input resolution (summed over channels)."
    )


class ExplanationItem(BaseModel):
    index: int
    prediction: ExplainedPrediction
    target: str | None = Field(description="The class explained (null for regression).")
    output: float | None = Field(
        description="The explained output for the record: the class's logit, or the predicted "
        "value in the label's units."
    )
    baseline_output: float | None
    convergence_delta: float | None = Field(
        default=None,
        description="Path methods: sum(attributions) - (output - baseline_output).",
    )
    columns: list[ColumnAttribution] | None = Field(
        default=None, description="Tables: one value per input column, largest first."
    )
    text_column: str | None = None
    tokens: list[TokenAttribution] | None = Field(
        default=None, description="Text: one value per token, in text order."
    )
    image: ImageAttribution | None = None


class ExplanationResponse(BaseModel):
    object: Literal["explanation"] = "explanation"
    model: str
    model_version: int
    model_version_id: str
    registered_model: str
    canary: bool
    method: str
    options: dict[str, Any] = Field(description="The options used, defaults included.")
    baseline: dict[str, Any] = Field(description="The baseline each kind of input was given.")
    output: Literal["logit", "value"] = Field(
        description="What `output` and the attributions measure."
    )
    data: list[ExplanationItem]


class ExplanationJob(BaseModel):
    """A large explanation request, run as a job; its result is a JSON Lines file (one
    `ExplanationItem` per line) in the Files API."""

    object: Literal["explanation.job"] = "explanation.job"
    id: str
    model: str
    model_version: int | None
    method: str
    records: int
    status: str
    created_at: int
    finished_at: int | None
    error: dict[str, Any] | None
    result_file_id: str | None = Field(
        default=None, description="GET /v1/files/{id}/content once the job has succeeded."
    )
    result: dict[str, Any] | None = None

    @classmethod
    def from_domain(cls, job: Job) -> ExplanationJob:
        result = job.result or {}
        return cls(
            id=job.id,
            model=job.spec["model"],
            model_version=job.spec.get("version"),
            method=job.spec["method"],
            records=job.spec["records"],
            status=job.status.value,
            created_at=int(job.created_at),
            finished_at=int(job.finished_at) if job.finished_at is not None else None,
            error=job.error,
            result_file_id=result.get("file_id"),
            result=job.result,
        )
