"""The Open Inference Protocol v2 (KServe / Triton) over REST: typed tensors in and out."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, StringConstraints

from aiaas.errors import InvalidRequest
from aiaas.protocol.platform import Request

TensorName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
_NUMPY = {"FP32": np.float32, "INT64": np.int64}
MAX_ELEMENTS = 16_000_000


class RequestInput(Request):
    name: TensorName
    shape: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(min_length=1, max_length=8)
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any]

    def array(self, expected: str) -> np.ndarray:
        """The tensor as numpy, checked: the model's datatype, and as many values as the shape
        says (data may be flat, row-major, or nested)."""
        if self.datatype != expected:
            raise InvalidRequest(
                f"input {self.name!r} is {self.datatype}; the model takes {expected}",
                param=self.name,
            )
        count = math.prod(self.shape)
        if count > MAX_ELEMENTS:
            raise InvalidRequest(
                f"input {self.name!r} has {count} elements; at most {MAX_ELEMENTS}",
                param=self.name,
            )
        # JSON numbers only: numpy would also parse "0.5" and true, which a typed tensor is not.
        kinds = (int,) if expected == "INT64" else (int, float)
        try:
            values = np.asarray(self.data, dtype=object).reshape(-1).tolist()
            if any(isinstance(v, bool) or not isinstance(v, kinds) for v in values):
                raise ValueError(f"{expected} data must be JSON numbers")
            if expected == "INT64":
                array = np.asarray(values, dtype=np.int64)
            else:
                with np.errstate(over="ignore"):  # too large for FP32: inf, refused below
                    array = np.asarray(values, dtype=np.float64).astype(np.float32)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidRequest(
                f"input {self.name!r}: data is not {expected} ({exc})", param=self.name
            ) from exc
        if array.size != count:
            raise InvalidRequest(
                f"input {self.name!r} has {array.size} values; shape {self.shape} needs {count}",
                param=self.name,
            )
        if expected == "FP32" and not np.isfinite(array).all():
            raise InvalidRequest(f"input {self.name!r} has NaN or infinite values", param=self.name)
        return array.reshape(self.shape)


class RequestOutput(Request):
    name: TensorName
    parameters: dict[str, Any] | None = None


class InferenceRequest(Request):
    id: str | None = Field(default=None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=16)
    outputs: list[RequestOutput] | None = Field(default=None, max_length=16)

    def tensors(self, inputs: Mapping[str, str], outputs: Collection[str]) -> dict[str, np.ndarray]:
        """The inputs as numpy, checked against a model that takes `inputs` (name -> datatype)
        and gives `outputs`: each input known and given once, each asked-for output known."""
        arrays: dict[str, np.ndarray] = {}
        for tensor in self.inputs:
            if tensor.name not in inputs:
                raise InvalidRequest(
                    f"unknown input {tensor.name!r}; the model takes {sorted(inputs)}",
                    param=tensor.name,
                )
            if tensor.name in arrays:
                raise InvalidRequest(f"input {tensor.name!r} is given twice", param=tensor.name)
            arrays[tensor.name] = tensor.array(inputs[tensor.name])
        for wanted in self.outputs or []:
            if wanted.name not in outputs:
                raise InvalidRequest(
                    f"unknown output {wanted.name!r}; the model gives {sorted(outputs)}",
                    param="outputs",
                )
        return arrays


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None
    id: str | None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


def numpy_type(datatype: str) -> type[np.generic]:
    return _NUMPY[datatype]
