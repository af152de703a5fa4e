"""An imported ONNX model, served by its declared signature: tensors or records in, outputs out.

An organisation brings a graph it exported itself (torch.onnx.export, tf2onnx, skl2onnx) and
declares its inputs and output (`aiaas.specs.signature.ModelSignature`). `ImportedModel.load`
checks the declaration against the graph and runs one test batch, so serving only ever fails on
a request's own data, which `check_inputs` turns into a 400 before ONNX Runtime sees it.

It offers what `ClassicPool` and the prediction service use of a trained `ClassicModel`
(`input_names`, `inputs`, `outputs`, `task`, `classes`, `memory_bytes`, `check_inputs`,
`encode_records`, `run`, `interpret`): Open Inference Protocol tensors go straight to the graph,
`/v1/predictions` records map input names to (nested lists of) numbers, and a classifier's
scores become a label and probabilities like a trained classifier's.

Plain synchronous code: callers own the threads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from aiaas.engines.classic.model import MAX_RECORDS, Prediction, TensorSpec, check_tensors
from aiaas.engines.onnx_options import session_options
from aiaas.errors import InvalidRequest
from aiaas.specs.signature import ModelSignature, TensorSignature

__all__ = [
    "ImportedModel",
    "ImportedTask",
    "SignatureMismatch",
    "check_self_contained",
    "graph_signature",
    "open_session",
]

_DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
_DTYPES = {"FP32": np.dtype(np.float32), "INT64": np.dtype(np.int64)}
_SESSION_OVERHEAD = 8 << 20
MAX_ELEMENTS = 16_000_000
# What InferenceSession raises on a graph it cannot open or run (plain Exception subclasses).
ORT_ERRORS: tuple[type[Exception], ...] = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NoModel,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
    ort_state.EngineError,
)


class ImportedTask(StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    TENSOR = "tensor"


class SignatureMismatch(ValueError):
    """The declared signature does not describe the graph; the message says what differs."""


class ImportedModel:
    def __init__(
        self, *, session: ort.InferenceSession, signature: ModelSignature, memory_bytes: int
    ) -> None:
        """Use `load`, which checks the signature against the graph."""
        self._session = session
        self.signature = signature
        self.preprocessing = None  # no preprocessing spec: inputs are tensors
        self.task = ImportedTask(signature.task)
        self.classes: list[str] | None = list(signature.labels) if signature.labels else None
        self.input_names = tuple(t.name for t in signature.inputs)
        self.inputs = [_spec(t) for t in signature.inputs]
        self.outputs = [_spec(signature.output)]
        self.memory_bytes = memory_bytes

    @classmethod
    def load(
        cls, *, onnx: bytes | str, signature: ModelSignature, threads: int = 1, size: int = 0
    ) -> ImportedModel:
        """Open the graph (its bytes, or a path) and check it against `signature`;
        `SignatureMismatch` where they differ, ValueError where the graph cannot be opened."""
        session = open_session(onnx, threads)
        check_signature(session, signature)
        nbytes = len(onnx) if isinstance(onnx, bytes) else size
        return cls(
            session=session, signature=signature, memory_bytes=2 * nbytes + _SESSION_OVERHEAD
        )

    def metadata(self) -> dict[str, Any]:
        """What the graph says about itself (producer, opset-independent facts), for display."""
        meta = self._session.get_modelmeta()
        return {
            "producer": meta.producer_name or None,
            "graph_name": meta.graph_name or None,
            "domain": meta.domain or None,
            "model_version": meta.version,
            "custom_metadata": dict(meta.custom_metadata_map),
            "graph_inputs": [_describe(node) for node in self._session.get_inputs()],
            "graph_outputs": [_describe(node) for node in self._session.get_outputs()],
        }

    # -- a test run at import -------------------------------------------------------------------

    def smoke_test(self) -> np.ndarray:
        """Run two rows of zeros (dynamic axes of size 1) and check the output against the
        declaration; returns the output. ValueError with ONNX Runtime's reason on failure."""
        feed = {
            spec.name: np.zeros(
                [2, *(1 if d == -1 else d for d in spec.shape[1:])], spec_dtype(spec)
            )
            for spec in self.inputs
        }
        try:
            output = self.run(feed)
        except ORT_ERRORS as exc:
            raise ValueError(f"the graph failed on a test batch of zeros: {exc}") from exc
        declared = self.outputs[0]
        mismatch = output.ndim != len(declared.shape) or any(
            want not in (-1, got)
            for want, got in zip(declared.shape[1:], output.shape[1:], strict=False)
        )
        if mismatch or output.shape[0] != 2:
            raise SignatureMismatch(
                f"output {declared.name!r} is declared {declared.shape}; a test batch of 2 rows "
                f"gave shape {list(output.shape)}"
            )
        return output

    # -- requests --------------------------------------------------------------------------------

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """InvalidRequest (param: the input's name) unless `inputs` fit the signature."""
        check_tensors(inputs, self.inputs)

    def encode_records(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Tensors from records that map each input's name to its value for one row (a number
        or nested lists of numbers, shaped like the input without its batch axis)."""
        if self.task is ImportedTask.TENSOR:
            raise InvalidRequest(
                "This model's output is a tensor, not a label or a value: call it through the "
                "Open Inference Protocol (POST /v2/models/{name}/infer).",
                param="records",
            )
        if not records:
            raise InvalidRequest("at least one record is needed", param="records")
        if len(records) > MAX_RECORDS:
            raise InvalidRequest(
                f"{len(records)} records; at most {MAX_RECORDS} per request", param="records"
            )
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise InvalidRequest(
                    f"record {index} must map input names to values, not {type(record).__name__}",
                    param="records",
                )
            for name in self.input_names:
                if name not in record:
                    raise InvalidRequest(
                        f"record {index}: input {name!r} is missing; this model takes "
                        f"{list(self.input_names)}",
                        param=name,
                    )
        return {
            spec.name: _array([record[spec.name] for record in records], spec)
            for spec in self.inputs
        }

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The served output for inputs that passed `check_inputs` (batch axis first)."""
        feed = {name: np.ascontiguousarray(inputs[name]) for name in self.input_names}
        (output,) = self._session.run([self.outputs[0].name], feed)
        return np.asarray(output, dtype=_DTYPES[self.outputs[0].datatype])

    def interpret(self, outputs: np.ndarray) -> list[Prediction]:
        """Per row: the label and its probabilities (a classifier), or the value."""
        outputs = np.asarray(outputs)
        if self.task is ImportedTask.REGRESSION:
            values = outputs.reshape(outputs.shape[0], -1)[:, 0]
            return [Prediction(label=None, probabilities=None, value=float(v)) for v in values]
        if self.task is ImportedTask.TENSOR:
            raise InvalidRequest(
                "This model's output is a tensor: use the Open Inference Protocol."
            )
        scores = outputs.astype(np.float64)
        probabilities = scores if self.signature.scores == "probabilities" else _softmax(scores)
        classes = self.classes or []
        return [
            Prediction(
                label=classes[int(row.argmax())],
                probabilities={c: float(p) for c, p in zip(classes, row, strict=True)},
                value=None,
            )
            for row in probabilities
        ]


def open_session(onnx: bytes | str, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU; ValueError with ORT's reason if it cannot open."""
    options = session_options(threads=threads)
    try:
        return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        raise ValueError(f"ONNX Runtime cannot load the graph: {_short(exc)}") from exc


def check_self_contained(source: bytes | str) -> None:
    """ValueError unless `source` is an ONNX model whose weights are all inside it. A tensor
    stored as external data names a file that ONNX Runtime would read from the server's disk
    (relative to the model's folder, or to the working directory when loaded from bytes)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = (
            onnx.load_model_from_string(source)
            if isinstance(source, bytes)
            else onnx.load(source, load_external_data=False)
        )
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"not an ONNX model ({_short(exc, 500)})") from exc
    graphs = [model.graph, *(_function_graphs(model))]
    for graph in graphs:
        for tensor in _tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(
                    f"tensor {tensor.name!r} is stored as external data; import a graph that "
                    "holds all its weights (onnx.save(model, path, save_as_external_data=False); "
                    "ONNX files are limited to 2 GB)"
                )


def _function_graphs(model: Any) -> Iterator[Any]:
    """Model-local functions, as objects with `node` lists (their tensor attributes count)."""
    for function in model.functions:
        yield _Nodes(function.node)


class _Nodes:
    def __init__(self, nodes: Any) -> None:
        self.node = nodes
        self.initializer: list[Any] = []
        self.sparse_initializer: list[Any] = []


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds: initialisers and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def graph_signature(session: ort.InferenceSession) -> dict[str, list[dict[str, Any]]]:
    """The graph's own inputs and outputs, as a signature would declare them (for messages)."""
    return {
        "inputs": [_describe(node) for node in session.get_inputs()],
        "outputs": [_describe(node) for node in session.get_outputs()],
    }


def check_signature(session: ort.InferenceSession, signature: ModelSignature) -> None:
    """`SignatureMismatch` listing every difference between the declaration and the graph."""
    problems: list[str] = []
    graph_inputs = {node.name: node for node in session.get_inputs()}
    graph_outputs = {node.name: node for node in session.get_outputs()}
    declared = {t.name for t in signature.inputs}
    missing = [name for name in graph_inputs if name not in declared]
    unknown = [t.name for t in signature.inputs if t.name not in graph_inputs]
    if missing:
        problems.append(f"the graph also takes {missing}, which the signature does not declare")
    if unknown:
        problems.append(f"the graph has no input named {unknown}")
    for tensor in signature.inputs:
        if tensor.name in graph_inputs:
            problems += _compare("input", tensor, graph_inputs[tensor.name], strict=True)
    output = signature.output
    if output.name not in graph_outputs:
        problems.append(
            f"the graph has no output named {output.name!r} (it gives {sorted(graph_outputs)})"
        )
    else:
        problems += _compare("output", output, graph_outputs[output.name], strict=False)
    if problems:
        raise SignatureMismatch(
            "The signature does not match the graph: "
            + "; ".join(problems)
            + f". The graph's own signature: {graph_signature(session)}"
        )


def _compare(kind: str, tensor: TensorSignature, node: Any, *, strict: bool) -> list[str]:
    """How a declared tensor differs from the graph's (`node`: ORT's NodeArg). Inputs are
    `strict`: a size the graph fixes must be declared as that size, since requests are checked
    against the declaration; an output's sizes only need to agree where both give one."""
    where = f"{kind} {tensor.name!r}"
    datatype = _DATATYPES.get(node.type)
    if datatype is None:
        return [f"{where} is {node.type} in the graph; only FP32 and INT64 tensors are served"]
    problems = []
    if datatype != tensor.datatype:
        problems.append(f"{where} is declared {tensor.datatype}; the graph has {datatype}")
    shape = _graph_shape(node)
    if shape is None:  # the graph does not say (an output whose shape inference gave up)
        return problems
    if len(shape) != len(tensor.shape):
        problems.append(
            f"{where} is declared with {len(tensor.shape)} axes {tensor.shape}; "
            f"the graph has {len(shape)} {shape}"
        )
        return problems
    if shape[0] != -1 and strict:
        problems.append(
            f"{where} has a fixed batch size {shape[0]} in the graph; export it with a dynamic "
            "first axis (torch.onnx.export(..., dynamic_axes={name: {0: 'batch'}}))"
        )
    for axis, (want, got) in enumerate(zip(tensor.shape, shape, strict=True)):
        if axis == 0 or got == -1:
            continue
        if want != got and (strict or want != -1):
            problems.append(f"{where} axis {axis} is declared {want}; the graph has {got}")
    return problems


def _graph_shape(node: Any) -> list[int] | None:
    shape = node.shape
    if shape is None or not isinstance(shape, list | tuple):
        return None
    return [dim if isinstance(dim, int) and dim > 0 else -1 for dim in shape]


def _describe(node: Any) -> dict[str, Any]:
    shape = _graph_shape(node)
    return {
        "name": node.name,
        "datatype": _DATATYPES.get(node.type, node.type),
        "shape": shape if shape is not None else None,
    }


def _spec(tensor: TensorSignature) -> TensorSpec:
    return TensorSpec(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))


def spec_dtype(spec: TensorSpec) -> np.dtype[Any]:
    return _DTYPES[spec.datatype]


def _array(rows: list[Any], spec: TensorSpec) -> np.ndarray:
    """One input's values of every record as a tensor: JSON numbers only (no strings, no
    booleans), rectangular, integers for INT64."""
    name = spec.name
    try:
        values = np.array(rows, dtype=object)
    except ValueError as exc:  # numpy refuses some ragged nestings outright
        raise InvalidRequest(
            f"input {name!r}: the records' values do not form a {spec.shape} tensor ({exc})",
            param=name,
        ) from exc
    if values.size > MAX_ELEMENTS:
        raise InvalidRequest(
            f"input {name!r} has {values.size} values; at most {MAX_ELEMENTS}", param=name
        )
    kinds = (int,) if spec.datatype == "INT64" else (int, float)
    flat = values.reshape(-1).tolist()
    if any(isinstance(v, bool) or not isinstance(v, kinds) for v in flat):
        what = "integers" if spec.datatype == "INT64" else "numbers"
        raise InvalidRequest(
            f"input {name!r} must be {what} shaped {spec.shape[1:]} per record (a number or "
            "nested lists of numbers, the same shape in every record)",
            param=name,
        )
    try:
        if spec.datatype == "INT64":
            array = values.astype(np.int64)
        else:
            array = values.astype(np.float64).astype(np.float32)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidRequest(f"input {name!r}: {exc}", param=name) from exc
    return array


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _short(exc: BaseException, limit: int = 2000) -> str:
    text = str(exc).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
