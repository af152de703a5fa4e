"""The output layer of a batched decode step, computed by ONNX Runtime instead of llama.cpp.

The output layer turns each last hidden state into one logit per vocabulary token. For Gemma 3
270M that is a 262,144 x 640 Q8_0 matrix, 63 % of the model's weights, and llama.cpp's CPU kernel
for it is slow for batches: on 2 cores it takes ~6 ms for one row but ~16 ms for two, ~24 ms for
four and ~29 ms for sixteen. ONNX Runtime's `MatMulNBits` holds the very same blocks (8-bit
weights, one scale per 32, zero point 128: Q8_0 exactly, nothing requantized) and multiplies them
in ~8 ms for one to four rows and ~17 ms for sixteen, with int8 activations in blocks of 32 as
llama.cpp does, and as exactly: against the product of the same hidden states and the dequantized
matrix in float64, over 768 greedy Gemma positions, both were off by at most 0.31 in a logit and
both picked another token than the exact product once (bench/llm_head.py). A whole decode step
(llama.cpp's graph up to the head, then ours): 14 against 23 ms for 2 rows, 17 against 33 ms for
4, 25 against 41 ms for 8, 41 against 57 ms for 16.

How: llama.cpp calls a graph callback (`cb_eval`) for each node; the tap asks for the node named
`result_norm`, the last hidden state after the final norm, which is the output layer's input.
When the step's rows go to ONNX Runtime, the tap copies that node's rows and returns false, which
ends the graph there: the KV cache was written by then, only the head is skipped. The engine then
writes ONNX Runtime's logits into llama.cpp's own logits buffer, so sampling, logprobs and every
sampler chain read them as they would llama.cpp's. One-row steps keep llama.cpp's head (faster
for a single row); the tap then only observes (~0.35 ms a step for the callback's node checks).

A model is served this way only if its output layer is Q8_0 with no bias; whatever else its graph
does after the head (a soft-cap, a scale) would show at start, when the engine checks that both
heads agree on a real step (`start_head`, `agrees`) and otherwise keeps llama.cpp's.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from aiaas.engines.llm.gguf_index import Q8_0, ggml_library, output_matrix, read_tensor_table
from aiaas.engines.llm.sampler import logits_view
from aiaas.engines.onnx_options import session_options

if TYPE_CHECKING:
    from aiaas.engines.llm.model import LlamaModel

log = logging.getLogger("aiaas.engines.llm")

BLOCK = 32  # Q8_0: 32 int8 weights and one float16 scale per block
_BLOCK_BYTES = 2 + BLOCK
# struct ggml_tensor (ggml.h, GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10): byte
# offsets of ne[0], data and name on 64-bit targets; checked against ggml_get_name at start.
_NE, _DATA, _NAME = 16, 248, 256
_TAPPED = b"result_norm\0"
# Largest logit difference between the two heads that still counts as the same model (each is
# within 0.31 of the exact product on Gemma 3); a wrong tap or a missing soft-cap is off by whole
# units.
AGREEMENT = 1.0
# Decoded at start by llama.cpp's output layer and by ONNX Runtime's, which must agree.
HEAD_CHECK_TEXT = "The quick brown fox jumps over the lazy dog, and then it runs into the woods."


class HiddenStateTap:
    """The `cb_eval` callback: keeps the `result_norm` rows of each step, and stops the graph
    there when `cut` is set."""

    def __init__(self) -> None:
        self.cut = False
        self.rows: np.ndarray | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._seen)

    def _seen(self, tensor: int, ask: bool, _user: int) -> bool:
        if ask:
            return ctypes.string_at(tensor + _NAME, len(_TAPPED)) == _TAPPED
        width, rows = ctypes.cast(tensor + _NE, ctypes.POINTER(ctypes.c_int64))[0:2]
        data = ctypes.cast(tensor + _DATA, ctypes.POINTER(ctypes.c_void_p))[0]
        values = ctypes.cast(data, ctypes.POINTER(ctypes.c_float))
        self.rows = np.ctypeslib.as_array(values, shape=(rows, width)).copy()
        return not self.cut


class OutputHead:
    """A GGUF model's Q8_0 output layer as an ONNX Runtime `MatMulNBits` session."""

    def __init__(self, session) -> None:  # type: ignore[no-untyped-def]
        self._session = session
        self.tap = HiddenStateTap()

    @classmethod
    def load(cls, path: Path, *, n_embd: int, n_vocab: int, threads: int) -> OutputHead | None:
        """The head of the GGUF file at `path`, or None where it is not one we can serve."""
        if not _tensor_layout_matches():
            return None
        blocks = q8_0_output_blocks(path, n_embd=n_embd, n_vocab=n_vocab)
        if blocks is None:
            return None
        scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).astype(np.float32)
        # int8 two's complement -> offset binary (q + 128): flip the sign bit
        weights = np.bitwise_xor(blocks[:, :, 2:], np.uint8(0x80))
        return cls(_session(weights, scales[:, :, 0], n_embd, threads))

    def compute(self, hidden: np.ndarray, out: np.ndarray) -> None:
        """Logits of `hidden` ([rows, n_embd] float32) into `out` ([rows, n_vocab] float32)."""
        import onnxruntime as ort

        binding = self._session.io_binding()
        binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(hidden))
        binding.bind_output("y", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        self._session.run_with_iobinding(binding)


def q8_0_output_blocks(path: Path, *, n_embd: int, n_vocab: int) -> np.ndarray | None:
    """The GGUF's output matrix as memory-mapped Q8_0 blocks, [n_vocab, n_embd / 32, 34] bytes
    (a float16 scale, then 32 int8 weights), or None where it is not plain Q8_0."""
    table = read_tensor_table(path)
    entry = output_matrix(table)
    if entry is None or entry.kind != Q8_0 or "output.bias" in table:
        return None
    if n_embd % BLOCK or entry.elements != n_embd * n_vocab:
        return None
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=entry.offset, shape=(entry.nbytes,))
    return raw.reshape(n_vocab, n_embd // BLOCK, _BLOCK_BYTES)


def dequantized(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 blocks as the exact float64 matrix they hold (scale x int8)."""
    scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).astype(np.float64)
    values = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).astype(np.float64)
    return (values * scales).reshape(blocks.shape[0], -1)


def agrees(ours: np.ndarray, llamas: np.ndarray) -> bool:
    """Whether our logits and llama.cpp's for the same rows are the same model's."""
    return bool(np.isfinite(ours).all() and np.abs(ours - llamas).max() < AGREEMENT)


def start_head(
    model: LlamaModel,
    open_context: Callable[[OutputHead | None], llama_cpp.llama_context_p],
    batch: llama_cpp.llama_batch,
    *,
    wanted: bool,
    n_batch: int,
    threads: int,
    name: str,
) -> OutputHead | None:
    """The head an engine serves `model` with, once its context is open: ours where it is
    `wanted`, loads, and agrees with llama.cpp's on `HEAD_CHECK_TEXT`; else None (llama.cpp's).

    `open_context(head)` opens the engine's context with `head`'s tap (None: without one),
    replacing any context it opened before; it is called again without the tap when the heads
    disagree. `batch` holds at least `n_batch` tokens; the check leaves the KV cache empty."""
    head = _load_head(model, threads=threads, name=name) if wanted else None
    ctx = open_context(head)
    if head is None or _head_agrees(head, ctx, batch, model, n_batch):
        return head
    log.warning("engine %s: the ONNX output layer disagrees with llama.cpp's", name)
    open_context(None)
    return None


def _load_head(model: LlamaModel, *, threads: int, name: str) -> OutputHead | None:
    try:
        return OutputHead.load(
            model.info.path,
            n_embd=llama_cpp.llama_model_n_embd(model.handle),
            n_vocab=model.n_vocab,
            threads=threads,
        )
    except (OSError, ValueError) as exc:
        log.warning("engine %s: llama.cpp keeps the output layer: %s", name, exc)
        return None


def _head_agrees(
    head: OutputHead,
    ctx: llama_cpp.llama_context_p,
    batch: llama_cpp.llama_batch,
    model: LlamaModel,
    n_batch: int,
) -> bool:
    """Decode a short text with llama.cpp's head and ours on the same hidden states."""
    tokens = model.tokenize(HEAD_CHECK_TEXT, add_special=True)[:n_batch]
    outputs = min(len(tokens), 4)
    for i, token in enumerate(tokens):
        batch.token[i] = token
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i >= len(tokens) - outputs
    batch.n_tokens = len(tokens)
    head.tap.cut = False
    try:
        if llama_cpp.llama_decode(ctx, batch) != 0 or head.tap.rows is None:
            return False
        llamas = logits_view(ctx, outputs, model.n_vocab).copy()
        ours = np.empty_like(llamas)
        head.compute(head.tap.rows, ours)
        return agrees(ours, llamas)
    finally:
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, -1, -1)


def _session(weights: np.ndarray, scales: np.ndarray, n_embd: int, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n_vocab = weights.shape[0]
    zero_points = np.full(scales.size, 128, dtype=np.uint8)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "w", "s", "zp"],
        ["y"],
        domain="com.microsoft",
        K=n_embd,
        N=n_vocab,
        bits=8,
        block_size=BLOCK,
        accuracy_level=4,  # int8 activations in blocks, as llama.cpp's Q8_0 kernel
    )
    graph = helper.make_graph(
        [node],
        "output_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", n_embd])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n_vocab])],
        initializer=[
            numpy_helper.from_array(np.ascontiguousarray(weights), "w"),
            numpy_helper.from_array(np.ascontiguousarray(scales), "s"),
            numpy_helper.from_array(zero_points, "zp"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    # Its threads must not spin after a run: llama.cpp's threads need the cores next.
    options = session_options(threads=threads, optimise=False)
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _tensor_layout_matches() -> bool:
    """Whether `struct ggml_tensor`'s name sits where the tap reads it (ggml_get_name agrees)."""
    lib = ggml_library("ggml-base")
    if lib is None or ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    lib.ggml_get_name.restype = ctypes.c_void_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    probe = ctypes.create_string_buffer(512)
    address = ctypes.addressof(probe)
    return lib.ggml_get_name(address) == address + _NAME
