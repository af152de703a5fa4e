"""The BentoML peer of `bench/predict.py`: one ONNX classifier behind BentoML's adaptive batching.

Runs in the BentoML venv (`peers.ensure_bentoml_python`), never in the project's, as

    BENCH_ONNX_PATH=model.onnx bentoml serve predict_peer_bentoml:OnnxClassifier --port P

One request carries one OIP-shaped tensor, as ours takes on `/v2/models/{name}/infer`:

    POST /infer  {"inputs": [{"name": "tabular", "shape": [1, D], "datatype": "FP32",
                              "data": [...]}]}
    -> [{"name": "logits", "shape": [1, C], "datatype": "FP32", "data": [...]}]

`inputs` is the API's one batchable argument: BentoML's dispatcher concatenates the lists of
concurrent requests (up to `max_batch_size` tensors), `infer` stacks their rows into one matrix for
one onnxruntime call, and the dispatcher hands each request its own slice of the returned list.

The session options mirror ours (`aiaas.engines.classic.model`): all graph optimisations,
sequential execution, `BENCH_ORT_THREADS` intra-op threads, no spinning between calls.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import onnxruntime as ort
from pydantic import BaseModel

# BentoML reads the batching limits from the decorator when it imports this module, so they can
# only come from the environment the bench starts it with.
_MAX_BATCH = int(os.environ.get("BENCH_MAX_BATCH", "64"))
# A deadline, not a batch window: the dispatcher drops (503) requests it expects to miss it, and
# picks its own wait from the batch times it measures.
_MAX_LATENCY_MS = int(os.environ.get("BENCH_MAX_LATENCY_MS", "1000"))


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


def _session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@bentoml.service(
    workers=1,
    threads=1,
    # Ours runs without an access log; a line per request would cost BentoML CPU ours does not pay.
    logging={"access": {"enabled": False}},
)
class OnnxClassifier:
    def __init__(self) -> None:
        self._session = _session(
            os.environ["BENCH_ONNX_PATH"], int(os.environ.get("BENCH_ORT_THREADS", "2"))
        )
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name

    @bentoml.api(batchable=True, max_batch_size=_MAX_BATCH, max_latency_ms=_MAX_LATENCY_MS)
    def infer(self, inputs: list[Tensor]) -> list[Tensor]:
        rows = [np.asarray(t.data, dtype=np.float32).reshape(t.shape) for t in inputs]
        logits = self._session.run([self._output], {self._input: np.concatenate(rows)})[0]
        out, start = [], 0
        for tensor in inputs:
            part = logits[start : start + tensor.shape[0]]
            start += tensor.shape[0]
            out.append(
                Tensor(
                    name="logits",
                    shape=list(part.shape),
                    datatype="FP32",
                    data=part.ravel().tolist(),
                )
            )
        return out
