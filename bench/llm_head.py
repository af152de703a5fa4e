"""The output layer: llama.cpp's Q8_0 kernel against ours (ONNX Runtime, engines/llm/head.py).

Two measurements, in-process, no server:

- accuracy: greedy-decodes 16 prompts in lockstep and compares, at every position, llama.cpp's
  logits and ours (from the very same hidden state, tapped at `result_norm`) with the exact
  product of that hidden state and the dequantized Q8_0 matrix (float64): the largest error of
  each, and how often each one's greedy pick differs from the exact one;
- cost: one `llama_decode` step by its number of rows with logits, with llama.cpp's head and with
  the graph cut at `result_norm` plus our head (median of 15 steps).

    .venv/bin/python bench/llm_head.py [--steps 48] [--rows 1,2,4,8,16] [--model PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import llama_cpp
import numpy as np
from aiaas.engines.llm.bundled import gemma3_path
from aiaas.engines.llm.head import OutputHead, dequantized, q8_0_output_blocks
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.sampler import logits_view

CACHE = Path(__file__).parent / ".cache"
TOPICS = [
    "the history of the printing press", "how volcanoes form", "a recipe for bread",
    "the rules of chess", "why the sky is blue", "the life of bees",
    "how computers store numbers", "a trip to the mountains", "the causes of rain",
    "how to learn a language", "the moon landing", "a day at the market", "ocean currents",
    "the invention of the telephone", "photosynthesis", "the game of football",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the bundled Gemma 3)")
    args = parser.parse_args()
    path = args.model or gemma3_path(CACHE)
    model = LlamaModel(path)
    n_embd = llama_cpp.llama_model_n_embd(model.handle)
    head = OutputHead.load(path, n_embd=n_embd, n_vocab=model.n_vocab, threads=args.threads)
    if head is None:
        raise SystemExit(f"{path.name}: its output layer is not Q8_0")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 8192, 512, 512
    params.n_seq_max, params.kv_unified = len(TOPICS), True
    params.n_threads = params.n_threads_batch = args.threads
    params.cb_eval = head.tap.callback
    ctx = llama_cpp.llama_init_from_model(model.handle, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(feed: list[list[int]], pos: list[int], *, cut: bool) -> None:
        n = 0
        for seq, tokens in enumerate(feed):
            for i, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos[seq] + i, 1
                batch.seq_id[n][0], batch.logits[n] = seq, i == len(tokens) - 1
                n += 1
        batch.n_tokens = n
        head.tap.cut = cut
        assert llama_cpp.llama_decode(ctx, batch) == 0

    # accuracy
    blocks = q8_0_output_blocks(path, n_embd=n_embd, n_vocab=model.n_vocab)
    assert blocks is not None
    matrix = dequantized(blocks)
    feed = [
        model.tokenize(f"Tag {i}. Write about {topic}:", add_special=True)
        for i, topic in enumerate(TOPICS)
    ]
    pos = [0] * len(TOPICS)
    worst = {"llama.cpp Q8_0": 0.0, "ours (ONNX Runtime)": 0.0}
    missed = dict.fromkeys(worst, 0)
    for _ in range(args.steps):
        decode(feed, pos, cut=False)
        assert head.tap.rows is not None
        llamas = logits_view(ctx, len(TOPICS), model.n_vocab).copy()
        ours = np.empty_like(llamas)
        head.compute(head.tap.rows, ours)
        exact = head.tap.rows.astype(np.float64) @ matrix.T
        picks = exact.argmax(axis=1)
        for name, values in zip(worst, (llamas, ours), strict=True):
            worst[name] = max(worst[name], float(np.abs(values - exact).max()))
            missed[name] += int((values.argmax(axis=1) != picks).sum())
        pos = [p + len(f) for p, f in zip(pos, feed, strict=True)]
        feed = [[int(token)] for token in picks]
    total = args.steps * len(TOPICS)
    print(f"# {path.name}: output layer against the exact product, {total} greedy positions")
    print("| head | largest logit error | greedy picks unlike the exact product |")
    print("|---|---:|---:|")
    for name in worst:
        print(f"| {name} | {worst[name]:.3f} | {missed[name]} of {total} |")

    # cost
    print(f"\n# one decode step, {args.threads} threads, median of 15 (ms)")
    print("| rows with logits | llama.cpp head | ours: graph to result_norm + ONNX head |")
    print("|---:|---:|---:|")
    for rows in [int(r) for r in args.rows.split(",")]:
        timings: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(15):
            for cut in (False, True):
                started = time.perf_counter()
                decode([[1000 + i] for i in range(rows)], pos[:rows], cut=cut)
                if cut:
                    head.compute(head.tap.rows, logits_view(ctx, rows, model.n_vocab))
                timings[cut].append(time.perf_counter() - started)
                pos[:rows] = [p + 1 for p in pos[:rows]]
        llama_ms, ours_ms = (1e3 * float(np.median(timings[cut])) for cut in (False, True))
        print(f"| {rows} | {llama_ms:.1f} | {ours_ms:.1f} |")


if __name__ == "__main__":
    main()
