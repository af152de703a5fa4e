"""Numbers for one closed-loop level: throughput, time to first token, inter-token latency."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from loadgen import LevelRun, TokenCount

__all__ = ["LevelMetrics", "percentile", "summarize"]


@dataclass(frozen=True, slots=True)
class LevelMetrics:
    """Latencies are seconds; `None` where no successful request produced the sample."""

    concurrency: int
    requests: int
    errors: int
    output_tokens: int
    wall_s: float
    # All output tokens of the level over its wall time: what the server delivers when busy.
    output_tok_s: float
    mean_output_tokens: float
    ttft_p50: float | None
    ttft_p95: float | None
    # Gap between successive content chunks, pooled over every request of the level.
    itl_p50: float | None
    # Per request: (end - first token) / (tokens - 1); immune to servers that coalesce chunks.
    tpot_p50: float | None
    # How the successful requests' output tokens were counted (see `loadgen.TokenCount`).
    token_counts: tuple[TokenCount, ...]
    # Successful requests by the finish_reason their stream ended with ("-" for none).
    finish_reasons: dict[str, int]


def summarize(run: LevelRun) -> LevelMetrics:
    ok = [r for r in run.records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    ttfts = [t for r in ok if (t := r.ttft) is not None]
    gaps = [gap for r in ok for gap in r.inter_token]
    tpots = [
        (r.end - r.content_times[0]) / (r.output_tokens - 1)
        for r in ok
        if r.content_times and r.output_tokens > 1
    ]
    return LevelMetrics(
        concurrency=run.concurrency,
        requests=len(run.records),
        errors=len(run.records) - len(ok),
        output_tokens=output_tokens,
        wall_s=run.wall_s,
        output_tok_s=output_tokens / run.wall_s if run.wall_s > 0 else 0.0,
        mean_output_tokens=output_tokens / len(ok) if ok else 0.0,
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
        itl_p50=percentile(gaps, 50),
        tpot_p50=percentile(tpots, 50),
        token_counts=tuple(sorted({r.token_count for r in ok})),
        finish_reasons=dict(Counter(r.finish_reason or "-" for r in ok)),
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
