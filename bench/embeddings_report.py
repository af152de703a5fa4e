"""The Markdown report of `bench/embeddings.py`: one table per batch size, ratios, goals."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from embeddings import Level, SystemRun

__all__ = ["FOREIGN_CPU_FLAG", "report"]

GOAL_RATIO = 1.5  # ours' sentences/s over infinity's, 32 clients of one sentence, p95 no worse
GOAL_CONCURRENCY = 32
GOAL_SENTENCES_S = 390.0  # ours, best level, through HTTP
FOREIGN_CPU_FLAG = 5.0  # % of the machine used by other programs; above it a level is flagged


def report(
    args: argparse.Namespace,
    runs: Mapping[str, SystemRun],
    load_before: tuple[float, float, float],
) -> None:
    load_after = os.getloadavg()
    print(f"$ {shlex.join(sys.orig_argv)}\n")
    print(
        f"{_machine()}; load average (1/5/15 min) {_load(load_before)} before, "
        f"{_load(load_after)} after.  Model all-minilm-l6-v2 (384 dimensions), "
        f"{args.threads} inference threads per system.  Closed loop, {args.warmup:g} s warm-up "
        f"then {_window(args)} per level; English-like sentences of 8 to 30 words (seed "
        f"{args.seed}).\n"
    )
    for name, run in runs.items():
        what = run.target.label if run.target else "-"
        print(f"- `{name}`: {what}" + (f" — **failed**: {run.error}" if run.error else ""))
    for batch in args.batch_sizes:
        _table(runs, batch)
    _ratios(runs, args)
    _agreement(runs)
    _goals(runs)


def _table(runs: Mapping[str, SystemRun], batch: int) -> None:
    print(f"\n### {batch} sentence{'s' if batch > 1 else ''} per request\n")
    print(
        "| system | clients | sentences/s | p50 ms | p95 ms | errors | peak RSS MiB "
        "| server CPU ms/sentence | other CPU % |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, run in runs.items():
        for level in (lv for lv in run.levels if lv.batch == batch):
            sentences = len(level.latencies) * level.batch
            cpu_ms = 1000 * level.server_cpu_s / sentences if sentences else None
            foreign = _num(level.foreign_cpu, ".1f")
            if (level.foreign_cpu or 0) > FOREIGN_CPU_FLAG:
                foreign += " ⚠"
            cells = [
                name,
                str(level.concurrency),
                f"{level.sentences_per_s:,.0f}",
                _num(level.ms(50), ".1f"),
                _num(level.ms(95), ".1f"),
                str(sum(level.errors.values())),
                f"{level.peak_rss / 2**20:,.0f}",
                _num(cpu_ms, ".2f"),
                foreign,
            ]
            print(f"| {' | '.join(cells)} |")


def _ratios(runs: Mapping[str, SystemRun], args: argparse.Namespace) -> None:
    ours = runs.get("ours")
    peers = [name for name in runs if name != "ours" and runs[name].levels]
    if ours is None or not ours.levels or not peers:
        return
    print("\n### ours / peer (sentences/s above 1 and p95 below 1 favour ours)\n")
    print(
        "| clients | sentences/request | "
        + " | ".join(f"vs {p}: sent/s, p95" for p in peers)
        + " |"
    )
    print("|--:|--:|" + "--:|" * len(peers))
    for level in ours.levels:
        cells = [str(level.concurrency), str(level.batch)]
        for peer in peers:
            other = _find(runs[peer].levels, level.concurrency, level.batch)
            if other is None or not other.latencies or not level.latencies:
                cells.append("-")
                continue
            throughput = level.sentences_per_s / other.sentences_per_s
            p95 = (level.ms(95) or 0) / (other.ms(95) or 1)
            cells.append(f"x{throughput:.2f}, x{p95:.2f}")
        print(f"| {' | '.join(cells)} |")


def _agreement(runs: Mapping[str, SystemRun]) -> None:
    """Cosine similarity of each system's vectors for the same fixed sentences."""
    probes = {name: np.asarray(run.probe) for name, run in runs.items() if run.probe is not None}
    if len(probes) < 2:
        return
    reference = "st" if "st" in probes else next(iter(probes))
    ref = probes[reference] / np.linalg.norm(probes[reference], axis=1, keepdims=True)
    parts = []
    for name, vectors in probes.items():
        if name != reference:
            unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
            parts.append(f"{name} {float(np.min(np.sum(unit * ref, axis=1))):.5f}")
    lowest = ", ".join(parts)
    print(f"\nSame sentences, lowest cosine similarity to `{reference}`'s vectors: {lowest}")


def _goals(runs: Mapping[str, SystemRun]) -> None:
    ours = runs.get("ours")
    if ours is None or not ours.levels:
        return
    print()
    mine = _find(ours.levels, GOAL_CONCURRENCY, 1)
    peer = _find(runs["infinity"].levels, GOAL_CONCURRENCY, 1) if "infinity" in runs else None
    if mine is not None and peer is not None and mine.latencies and peer.latencies:
        ratio = mine.sentences_per_s / peer.sentences_per_s
        p95 = (mine.ms(95) or 0) / (peer.ms(95) or 1)
        met = ratio >= GOAL_RATIO and p95 <= 1
        print(
            f"- Goal 1, {GOAL_CONCURRENCY} clients of one sentence: ours x{ratio:.2f} infinity's "
            f"sentences/s, p95 x{p95:.2f} (>= x{GOAL_RATIO} with p95 <= x1): "
            f"**{'met' if met else 'missed'}**"
        )
    else:
        print(f"- Goal 1 (vs infinity, {GOAL_CONCURRENCY} clients x 1 sentence): not measured")
    best = max(ours.levels, key=lambda lv: lv.sentences_per_s)
    met = best.sentences_per_s >= GOAL_SENTENCES_S
    print(
        f"- Goal 2, ours' best level: {best.sentences_per_s:,.0f} sentences/s at "
        f"{best.concurrency} clients x {best.batch} (>= {GOAL_SENTENCES_S:.0f}): "
        f"**{'met' if met else 'missed'}**"
    )


def _find(levels: list[Level], concurrency: int, batch: int) -> Level | None:
    return next((lv for lv in levels if (lv.concurrency, lv.batch) == (concurrency, batch)), None)


def _machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB RAM, no GPU"


def _window(args: argparse.Namespace) -> str:
    if args.requests_per_client is not None:
        return f"{args.requests_per_client} requests per client"
    return f"{args.duration:g} s"


def _load(values: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
