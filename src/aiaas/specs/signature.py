"""The declared signature of an imported ONNX model: its tensors and, for a classifier, labels.

An organisation that imports its own ONNX graph says what it takes and gives; the import checks
that declaration against the graph (`aiaas.engines.classic.imported`), and serving checks every
request against it, so a bad request is the caller's 400 before ONNX Runtime sees it. Read by
`protocol/` (the request), `engines/classic` (serving) and `services/` (the import).

Tensors use the Open Inference Protocol's names: FP32 and INT64 (what the classic engine and
`/v2/.../infer` speak). The first axis of every tensor is the batch axis and is dynamic (-1):
the batcher stacks rows of concurrent requests along it. Other axes are a size or -1.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

__all__ = ["ImportedTask", "ModelSignature", "ScoresKind", "TensorSignature"]

Datatype = Literal["FP32", "INT64"]
ScoresKind = Literal["auto", "logits", "probabilities"]
ImportedTask = Literal["classification", "regression", "tensor"]
MAX_RANK = 8
MAX_LABELS = 10_000

# Spellings people use for the two datatypes (numpy, ONNX, torch), folded to the OIP names.
_DATATYPE_ALIASES = {
    "fp32": "FP32",
    "float": "FP32",
    "float32": "FP32",
    "tensor(float)": "FP32",
    "torch.float32": "FP32",
    "int64": "INT64",
    "long": "INT64",
    "tensor(int64)": "INT64",
    "torch.int64": "INT64",
}

TensorName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
]
Label = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
]
Dimension = Annotated[int, Field(ge=-1, le=2**31 - 1)]


class TensorSignature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: TensorName
    datatype: Datatype = Field(description="FP32 or INT64 (float32 and int64 are accepted too).")
    shape: list[Dimension] = Field(
        min_length=1,
        max_length=MAX_RANK,
        description="Sizes per axis; -1 for a dynamic axis. The first axis is the batch: -1.",
    )

    @field_validator("datatype", mode="before")
    @classmethod
    def _fold_datatype(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _DATATYPE_ALIASES.get(value.strip().lower(), value.strip().upper())
        return value

    @model_validator(mode="after")
    def _batch_axis(self) -> TensorSignature:
        if self.shape[0] != -1:
            raise ValueError(
                f"tensor {self.name!r}: the first axis is the batch axis and must be -1 (dynamic)"
            )
        if 0 in self.shape:
            raise ValueError(f"tensor {self.name!r}: an axis of size 0")
        return self


class ModelSignature(BaseModel):
    """What an imported ONNX model takes and gives, stored as its `signature.json`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: list[TensorSignature] = Field(min_length=1, max_length=16)
    outputs: list[TensorSignature] = Field(
        min_length=1,
        max_length=1,
        description="The output served (a graph may have more; name the one to serve).",
    )
    labels: list[Label] | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_LABELS,
        description="Class names, in the order of the output's last axis: a classifier.",
    )
    scores: ScoresKind = Field(
        default="auto",
        description="A classifier's output: logits (softmax is applied) or probabilities; "
        "auto decides at import from a test run.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSignature:
        names = [t.name for t in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError("input names must be unique")
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must be unique")
            (output,) = self.outputs
            if output.datatype != "FP32" or len(output.shape) != 2:
                raise ValueError(
                    f"with labels, output {output.name!r} must be FP32 per-class scores of "
                    "shape [-1, n_classes]"
                )
            if output.shape[1] not in (-1, len(self.labels)):
                raise ValueError(
                    f"output {output.name!r} has {output.shape[1]} scores per row; "
                    f"{len(self.labels)} labels are given"
                )
        return self

    @property
    def output(self) -> TensorSignature:
        return self.outputs[0]

    @property
    def task(self) -> ImportedTask:
        """classification (labels given), regression (one number per row), else tensor."""
        if self.labels is not None:
            return "classification"
        if self.output.shape[1:] in ([], [1]):
            return "regression"
        return "tensor"
