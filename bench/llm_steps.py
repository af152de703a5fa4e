"""What one `llama_decode` step costs, by its number of rows with logits (in-process, no server).

The LLM engine's speculation planner learns this table as it runs (`engines/llm/speculate.py`);
this script measures it directly: n sequences x 1 token, every token with logits, after a
40-token prompt in each sequence, median of `--repeats` steps. On a 2-core machine with
gemma-3-270m the cost is far from linear: llama.cpp's CPU matrix kernels tile rows by 4.

    .venv/bin/python bench/llm_steps.py                       # rows 1..16, 20, 24, 32
    .venv/bin/python bench/llm_steps.py --rows 7,8,15,16 --repeats 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
from aiaas.engines.llm.bundled import gemma3_path

PROMPT_TOKENS = 40
DEFAULT_ROWS = [*range(1, 17), 20, 24, 32]


def main() -> None:
    if "GOMP_SPINCOUNT" not in os.environ:
        # The same spin as `aiaas serve` (workers wait through the short gap between steps);
        # OpenMP reads it when llama.cpp's library loads, so start again with it set.
        env = {**os.environ, "GOMP_SPINCOUNT": "20000000"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # noqa: S606 (itself)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, DEFAULT_ROWS)), help="row counts")
    parser.add_argument("--repeats", type=int, default=20, help="steps per row count (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the bundled Gemma 3)")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    path = args.model or gemma3_path(Path(__file__).parent / ".cache")
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(
        str(path).encode(), llama_cpp.llama_model_default_params()
    )
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 16384, 512, 512
    params.n_seq_max = max(rows)
    params.n_threads = params.n_threads_batch = args.threads
    params.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    for seq in range(max(rows)):
        decode([(100 + (seq * 7 + j) % 5000, j, seq, False) for j in range(PROMPT_TOKENS)])
    print(f"# {path.name}, {args.threads} threads, median of {args.repeats} steps")
    print("| rows with logits | ms per step | ms per row |")
    print("|---:|---:|---:|")
    for n in rows:
        seconds = []
        for r in range(args.repeats):
            started = time.perf_counter()
            decode([(1000 + r, PROMPT_TOKENS, seq, True) for seq in range(n)])
            seconds.append(time.perf_counter() - started)
            for seq in range(n):  # back to the prompt, so every step sees the same cache
                llama_cpp.llama_memory_seq_rm(memory, seq, PROMPT_TOKENS, -1)
        ms = statistics.median(seconds) * 1e3
        print(f"| {n} | {ms:.1f} | {ms / n:.2f} |", flush=True)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
