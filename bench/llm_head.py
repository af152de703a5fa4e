"""How exact the output layer is: llama.cpp's quantized head against the widened BF16 head.

Greedy-decodes 16 prompts in lockstep on the original GGUF and on its widened copy
(engines/llm/wide_head.py), feeding both the same tokens, and compares each one's logits with the
exact product of the same hidden state and the dequantized output matrix (float64). The hidden
state is read from llama.cpp's `result_norm` node through its graph callback. Prints the largest
error of each head and how often its greedy pick differs from the exact one. In-process, no
server; the widened copy is written to bench/.cache/wide-head once.

    .venv/bin/python bench/llm_head.py [--steps 48] [--model PATH]
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from aiaas.engines.llm.bundled import gemma3_path
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.wide_head import weights_for

CACHE = Path(__file__).parent / ".cache"
TOPICS = [
    "the history of the printing press", "how volcanoes form", "a recipe for bread",
    "the rules of chess", "why the sky is blue", "the life of bees",
    "how computers store numbers", "a trip to the mountains", "the causes of rain",
    "how to learn a language", "the moon landing", "a day at the market", "ocean currents",
    "the invention of the telephone", "photosynthesis", "the game of football",
]  # fmt: skip
# struct ggml_tensor (ggml.h): ne at byte 16, data at 248, name at 256.
NE, DATA, NAME = 16, 248, 256


class HiddenState:
    """Keeps a copy of the `result_norm` tensor of every decode (the head's input)."""

    def __init__(self) -> None:
        self.rows: np.ndarray | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._seen)

    def _seen(self, tensor: int, ask: bool, _user: int) -> bool:
        if ask:
            return ctypes.string_at(tensor + NAME, 12) == b"result_norm\0"
        width, rows = ctypes.cast(tensor + NE, ctypes.POINTER(ctypes.c_int64))[0:2]
        data = ctypes.cast(tensor + DATA, ctypes.POINTER(ctypes.c_void_p))[0]
        values = ctypes.cast(data, ctypes.POINTER(ctypes.c_float))
        self.rows = np.ctypeslib.as_array(values, shape=(rows, width)).copy()
        return True


def context(model: LlamaModel, hidden: HiddenState | None) -> llama_cpp.llama_context_p:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 8192, 512, 512
    params.n_seq_max, params.kv_unified = len(TOPICS), True
    params.n_threads = params.n_threads_batch = 2
    if hidden is not None:
        params.cb_eval = hidden.callback
    return llama_cpp.llama_init_from_model(model.handle, params)


def decode(
    ctx: llama_cpp.llama_context_p,
    batch: llama_cpp.llama_batch,
    feed: list[list[int]],
    pos: list[int],
    n_vocab: int,
) -> np.ndarray:
    n = 0
    for seq, tokens in enumerate(feed):
        for i, token in enumerate(tokens):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos[seq] + i, 1
            batch.seq_id[n][0], batch.logits[n] = seq, i == len(tokens) - 1
            n += 1
    batch.n_tokens = n
    assert llama_cpp.llama_decode(ctx, batch) == 0
    pointer = llama_cpp.llama_get_logits(ctx)
    size = len(feed) * n_vocab
    buffer = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float * size)).contents
    return np.frombuffer(buffer, dtype=np.float32).reshape(len(feed), n_vocab).copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the bundled Gemma 3)")
    args = parser.parse_args()
    source = args.model or gemma3_path(CACHE)
    widened = weights_for(source, CACHE / "wide-head", "on")
    if widened == source:
        raise SystemExit(f"{source.name}: nothing to widen")
    reader = gguf.GGUFReader(source)
    tensors = {t.name: t for t in reader.tensors}
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    exact_matrix = gguf.quants.dequantize(head.data, head.tensor_type).astype(np.float64)

    hidden = HiddenState()
    original, wide = LlamaModel(source), LlamaModel(source, weights=widened)
    contexts = {"quantized": context(original, hidden), "bf16": context(wide, None)}
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    feed = [
        original.tokenize(f"Tag {i}. Write about {topic}:", add_special=True)
        for i, topic in enumerate(TOPICS)
    ]
    pos = [0] * len(TOPICS)
    worst = {name: 0.0 for name in contexts}
    missed = {name: 0 for name in contexts}
    margins: list[float] = []
    for _ in range(args.steps):
        logits = {
            name: decode(ctx, batch, feed, pos, original.n_vocab) for name, ctx in contexts.items()
        }
        assert hidden.rows is not None
        exact = hidden.rows.astype(np.float64) @ exact_matrix.T
        picks = exact.argmax(axis=1)
        ranked = np.sort(exact, axis=1)
        margins.extend((ranked[:, -1] - ranked[:, -2]).tolist())
        for name, values in logits.items():
            worst[name] = max(worst[name], float(np.abs(values - exact).max()))
            missed[name] += int((values.argmax(axis=1) != picks).sum())
        pos = [p + len(f) for p, f in zip(pos, feed, strict=True)]
        feed = [[int(token)] for token in picks]
    total = args.steps * len(TOPICS)
    print(f"# {source.name}: {head.tensor_type.name} head vs its BF16 copy, {total} positions")
    print("| head | largest logit error | greedy picks unlike the exact product |")
    print("|---|---:|---:|")
    for name in contexts:
        print(f"| {name} | {worst[name]:.3f} | {missed[name]} of {total} |")
    print(f"median top-2 margin {np.median(margins):.2f}")


if __name__ == "__main__":
    main()
