"""One registered classic model, served by ONNX Runtime: records in, predictions out.

A model version holds three artifacts written at registration: `model.onnx` (inputs named from
`INPUT_NAMES`, a dynamic batch axis, "logits" out), its fitted `PreprocessingSpec` and a
description (`model.json`). `ClassicModel.load` checks that the three agree before anything is
served, so a request can only fail on its own data.

Requests arrive two ways: raw records (column -> value) go through the same `transform` the
training job used, and Open Inference Protocol tensors go straight to the graph. Tensors are
checked first (`check_inputs`): an out-of-vocabulary token id would make ONNX Runtime's Gather
fail, and that must be the caller's 400, not our 500.

Plain synchronous code: callers own the threads. `InferenceSession.run` may be called from several
threads at once; the tokenizers are only read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import pandas as pd
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from pydantic import BaseModel, ConfigDict, PositiveInt
from tokenizers import Tokenizer

from aiaas.engines.embeddings.export import minilm_l6_v2_dir
from aiaas.engines.onnx_options import session_options
from aiaas.errors import InvalidRequest
from aiaas.specs.preprocessing import (
    PreprocessingSpec,
    TextStep,
    decode_labels,
    transform,
    unscale_targets,
)
from aiaas.specs.shapes import INPUT_NAMES, TOKENIZER_REF, InputShape, input_shape, model_inputs
from aiaas.specs.types import Task

__all__ = ["MAX_RECORDS", "ClassicModel", "Prediction", "TensorSpec"]

MAX_RECORDS = 10_000
OUTPUT_NAME = "logits"
# Memory a loaded model holds, for the pool's budget: twice the graph's size (measured steady
# state is about 1x, ONNX Runtime holding the initialisers; the second copy covers the load peak,
# bytes and parsed graph side by side, and the arena growing with batch activations), plus a
# session's fixed cost (threads, arena, the spec: measured 3-4 MiB) and ~10 MiB (measured) for
# each pretrained tokenizer.
_SESSION_OVERHEAD = 8 << 20
_TOKENIZER_OVERHEAD = 12 << 20
_DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
_DTYPES = {"FP32": np.dtype(np.float32), "INT64": np.dtype(np.int64)}
_EXPECTED = {"tabular": "FP32", "tokens": "INT64", "attention": "INT64", "images": "FP32"}
# What InferenceSession raises on a corrupt or unsupported graph (plain Exception subclasses).
_ORT_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NotImplemented,
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Open Inference Protocol names: "FP32", "INT64"
    shape: list[int]  # -1 for the batch axis and any other dynamic axis


@dataclass(frozen=True)
class Prediction:
    label: str | None  # classification
    probabilities: dict[str, float] | None  # classification: softmax over classes, by name
    value: float | None  # regression, in the label's own units


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tabular_dim: int
    text_column: str | None
    text_vocab_size: int | None
    text_length: int | None
    text_tokenizer: Literal["word", "wordpiece"] | None
    image_shape: tuple[int, int, int] | None
    n_outputs: PositiveInt


class _Description(BaseModel):
    """The parts of `model.json` serving relies on; the rest (architecture, options) is ignored."""

    model_config = ConfigDict(extra="ignore")

    format: Literal[1]
    task: Task
    input_names: tuple[str, ...]
    output_name: Literal["logits"]
    classes: list[str] | None
    input_shape: _Shape


class ClassicModel:
    def __init__(
        self,
        *,
        session: ort.InferenceSession,
        shape: InputShape,
        input_names: tuple[str, ...],
        preprocessing: PreprocessingSpec,
        tokenizers: dict[str, Tokenizer],
        memory_bytes: int,
    ) -> None:
        """Use `load`, which checks that these parts agree."""
        assert preprocessing.label is not None  # load checked it
        self._session = session
        self._shape = shape
        self.preprocessing = preprocessing
        self._tokenizers = tokenizers
        self.task: Task = preprocessing.label.task
        self.classes: list[str] | None = preprocessing.label.classes
        self.input_names = input_names
        self.memory_bytes = memory_bytes
        graph_inputs = {node.name: node for node in session.get_inputs()}
        self.inputs: list[TensorSpec] = [_tensor_spec(graph_inputs[name]) for name in input_names]
        (logits,) = (node for node in session.get_outputs() if node.name == OUTPUT_NAME)
        self.outputs: list[TensorSpec] = [_tensor_spec(logits)]
        self.preprocessings = {spec.name: spec for spec in self.inputs}
        self._vocab_size = shape.text_vocab_size or next(
            (t.get_vocab_size(with_added_tokens=True) for t in tokenizers.values()), None
        )
        self._columns = [step.column for step in preprocessing.features]

    @classmethod
    def load(
        cls,
        *,
        onnx: bytes,
        description: dict[str, Any],
        preprocessing: PreprocessingSpec,
        threads: int = 1,
    ) -> ClassicModel:
        """Open the graph and check it against its description and spec; ValueError if they
        disagree (a registry problem, not a request problem)."""
        about = _Description.model_validate(description)
        label = preprocessing.label
        if not preprocessing.fitted or label is None:
            raise ValueError("the preprocessing spec is not fitted or has no label")
        if label.task is not about.task or label.classes != about.classes:
            raise ValueError(
                f"the description says {about.task} with classes {about.classes}; "
                f"the spec says {label.task} with classes {label.classes}"
            )
        shape = input_shape(preprocessing)
        described = InputShape(**about.input_shape.model_dump())
        if shape != described:
            raise ValueError(f"the spec gives input shape {shape}; the description {described}")
        session = _session(onnx, threads)
        _check_graph(session, about.input_names, shape)
        tokenizers = _tokenizers(preprocessing)
        memory = 2 * len(onnx) + _SESSION_OVERHEAD + _TOKENIZER_OVERHEAD * len(tokenizers)
        return cls(
            session=session,
            shape=shape,
            input_names=about.input_names,
            preprocessing=preprocessing,
            tokenizers=tokenizers,
            memory_bytes=memory,
        )

    # -- records -------------------------------------------------------------------------------

    def encode_records(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Model inputs for raw records (column -> value; images as their encoded bytes).

        Columns the model does not read are ignored, so a record may carry its label or an id.
        CPU-bound (images are decoded here): call it from a worker thread.
        """
        if not records:
            raise InvalidRequest("at least one record is needed", param="records")
        if len(records) > MAX_RECORDS:
            raise InvalidRequest(
                f"{len(records)} records; at most {MAX_RECORDS} per request", param="records"
            )
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                kind = type(record).__name__
                raise InvalidRequest(
                    f"record {index} must map column names to values, not {kind}",
                    param="records",
                )
            for column in self._columns:
                if column not in record:
                    raise InvalidRequest(
                        f"record {index}: column {column!r} is missing", param=column
                    )
        frame = pd.DataFrame({c: [record[c] for record in records] for c in self._columns})
        try:
            features = transform(self.preprocessing, frame, tokenizers=self._tokenizers)
        except InvalidRequest as exc:
            row = self._first_failing_row(frame)
            where = f"record {row}: " if row is not None else ""
            raise InvalidRequest(f"{where}{exc.message}", param=exc.param) from exc
        return model_inputs(features, self._shape, self.input_names)

    def _first_failing_row(self, frame: pd.DataFrame) -> int | None:
        """Which record made `transform` fail. Rows transform independently, so halving finds
        the first bad one in about two passes over the frame; this runs on errors only."""
        start, end = 0, len(frame)
        if self._transforms(frame):
            return None
        while end - start > 1:
            middle = (start + end) // 2
            if self._transforms(frame.iloc[start:middle]):
                start = middle
            else:
                end = middle
        return None if self._transforms(frame.iloc[start:end]) else start

    def _transforms(self, frame: pd.DataFrame) -> bool:
        try:
            transform(self.preprocessing, frame, tokenizers=self._tokenizers)
        except InvalidRequest:
            return False
        return True

    # -- tensors -------------------------------------------------------------------------------

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """InvalidRequest (param: the input's name) unless `inputs` can go to `run` as they are."""
        check_tensors(inputs, self.inputs, self._check_array)

    def _check_array(self, spec: TensorSpec, array: np.ndarray) -> None:
        check_array(spec, array)
        name = spec.name
        if name == "tokens" and self._vocab_size is not None:
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= self._vocab_size:
                bad = low if low < 0 else high
                raise InvalidRequest(
                    f"input 'tokens' holds id {bad}; ids must lie in [0, {self._vocab_size})",
                    param=name,
                )
        if name == "attention" and not np.isin(array, (0, 1)).all():
            raise InvalidRequest("input 'attention' must hold only 0 and 1", param=name)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Logits float32 [n, n_outputs] for inputs that passed `check_inputs`."""
        feed = {name: np.ascontiguousarray(inputs[name]) for name in self.input_names}
        (logits,) = self._session.run([OUTPUT_NAME], feed)
        return np.asarray(logits, dtype=np.float32)

    def interpret(self, logits: np.ndarray) -> list[Prediction]:
        """Per row: the class and its probabilities, or the value in the label's units."""
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] != self._shape.n_outputs:
            wanted = f"[n, {self._shape.n_outputs}]"
            raise ValueError(f"logits of shape {list(logits.shape)}; {wanted} expected")
        if self.task is Task.REGRESSION:
            values = unscale_targets(self.preprocessing, logits[:, 0])
            return [Prediction(label=None, probabilities=None, value=float(v)) for v in values]
        probabilities = _softmax(logits.astype(np.float64))
        labels = decode_labels(self.preprocessing, probabilities.argmax(axis=1))
        classes = self.classes or []
        return [
            Prediction(
                label=label,
                probabilities={c: float(p) for c, p in zip(classes, row, strict=True)},
                value=None,
            )
            for label, row in zip(labels, probabilities, strict=True)
        ]


def _session(onnx: bytes, threads: int) -> ort.InferenceSession:
    # No busy-waiting between calls: idle gaps would burn the cores other engines need.
    options = session_options(threads=threads)
    try:
        return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as exc:
        raise ValueError(f"ONNX Runtime cannot load the graph: {exc}") from exc


def _check_graph(
    session: ort.InferenceSession, input_names: tuple[str, ...], shape: InputShape
) -> None:
    """The graph takes exactly the described inputs, each with its dtype and sizes, and has a
    dynamic batch axis everywhere (the batcher stacks rows of different requests)."""
    unknown = [name for name in input_names if name not in INPUT_NAMES]
    if unknown or len(set(input_names)) != len(input_names):
        raise ValueError(f"input names {list(input_names)}: each must be one of {INPUT_NAMES}")
    graph = {node.name: _tensor_spec(node) for node in session.get_inputs()}
    if set(graph) != set(input_names):
        raise ValueError(f"the graph takes {sorted(graph)}; the description {list(input_names)}")
    outputs = {node.name: _tensor_spec(node) for node in session.get_outputs()}
    if OUTPUT_NAME not in outputs:
        raise ValueError(f"the graph has no {OUTPUT_NAME!r} output, only {sorted(outputs)}")
    sizes = {
        "tabular": [shape.tabular_dim],
        "tokens": [shape.text_length or -1],
        "attention": [shape.text_length or -1],
        "images": list(shape.image_shape or (-1, -1, -1)),
    }
    expected = [(graph[name], _EXPECTED[name], sizes[name]) for name in input_names]
    expected.append((outputs[OUTPUT_NAME], "FP32", [shape.n_outputs]))
    for spec, datatype, dims in expected:
        if spec.datatype != datatype:
            raise ValueError(f"graph tensor {spec.name!r} is {spec.datatype}, {datatype} expected")
        if spec.shape[0] != -1:
            raise ValueError(f"graph tensor {spec.name!r} has a fixed batch size {spec.shape[0]}")
        fits = len(spec.shape) == 1 + len(dims) and all(
            got in (want, -1) for got, want in zip(spec.shape[1:], dims, strict=True)
        )
        if not fits:
            raise ValueError(
                f"graph tensor {spec.name!r} has shape {spec.shape}; [-1, *{dims}] expected"
            )


def _tensor_spec(node: Any) -> TensorSpec:
    """ORT's NodeArg (typed Any: onnxruntime ships no stubs) as an OIP tensor description."""
    datatype = _DATATYPES.get(node.type)
    if datatype is None:
        raise ValueError(f"graph tensor {node.name!r} has type {node.type}; FP32 or INT64 only")
    return TensorSpec(
        name=node.name,
        datatype=datatype,
        shape=[dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape],
    )


def _tokenizers(spec: PreprocessingSpec) -> dict[str, Tokenizer]:
    """The pretrained tokenizers the spec's wordpiece text steps look up (word steps carry
    their own vocabulary)."""
    refs = {
        step.tokenizer_ref
        for step in spec.features
        if isinstance(step, TextStep) and step.tokenizer == "wordpiece"
    }
    unknown = sorted(str(ref) for ref in refs if ref != TOKENIZER_REF)
    if unknown:
        raise ValueError(f"unknown tokenizers {unknown}; only {TOKENIZER_REF!r} is available")
    if not refs:
        return {}
    return {TOKENIZER_REF: Tokenizer.from_file(str(minilm_l6_v2_dir() / "tokenizer.json"))}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def check_tensors(
    inputs: dict[str, np.ndarray],
    specs: Sequence[TensorSpec],
    check: Callable[[TensorSpec, np.ndarray], None] | None = None,
) -> None:
    """InvalidRequest (param: the input's name) unless `inputs` are exactly the inputs `specs`
    declare, each passing `check` (default `check_array`), with one batch size."""
    names = [spec.name for spec in specs]
    for name in names:
        if name not in inputs:
            raise InvalidRequest(f"input {name!r} is missing; this model takes {names}", param=name)
    for name in inputs:
        if name not in names:
            raise InvalidRequest(f"unknown input {name!r}; this model takes {names}", param=name)
    batch: int | None = None
    for spec in specs:
        array = inputs[spec.name]
        (check or check_array)(spec, array)
        if batch is None:
            batch = array.shape[0]
        elif array.shape[0] != batch:
            raise InvalidRequest(
                f"input {spec.name!r} has {array.shape[0]} rows; "
                f"input {specs[0].name!r} has {batch}",
                param=spec.name,
            )


def check_array(spec: TensorSpec, array: np.ndarray) -> None:
    """InvalidRequest unless `array` has the declared datatype and shape (any batch size and
    dynamic axes), no empty axis and, for floats, only finite values."""
    name = spec.name
    if not isinstance(array, np.ndarray):
        raise InvalidRequest(f"input {name!r} must be an array", param=name)
    dtype = _DTYPES[spec.datatype]
    if array.dtype != dtype:
        raise InvalidRequest(
            f"input {name!r} must be {spec.datatype} ({dtype}), not {array.dtype}", param=name
        )
    if array.ndim != len(spec.shape):
        raise InvalidRequest(
            f"input {name!r} must have {len(spec.shape)} dimensions {spec.shape}, "
            f"not {array.ndim} {list(array.shape)}",
            param=name,
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if axis and want != -1 and want != got:
            raise InvalidRequest(
                f"input {name!r} must have shape {spec.shape}, not {list(array.shape)}",
                param=name,
            )
    if array.shape[0] < 1:
        raise InvalidRequest(f"input {name!r} has no rows", param=name)
    if 0 in array.shape:
        raise InvalidRequest(f"input {name!r} is empty {list(array.shape)}", param=name)
    if spec.datatype == "FP32" and not np.isfinite(array).all():
        raise InvalidRequest(f"input {name!r} holds NaN or infinite values", param=name)
