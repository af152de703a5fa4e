"""Results of an LLM benchmark run, as markdown tables and as raw JSON.

One table per concurrency level, one row per system. When `ours` ran, every peer row also
shows ours/peer ratios: a tok/s ratio above 1 and a TTFT ratio below 1 favour ours.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadgen import LevelRun
from metrics import LevelMetrics

__all__ = ["LevelResult", "RunInfo", "SystemResult", "render_markdown", "write_json"]

OURS = "ours"
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class LevelResult:
    metrics: LevelMetrics
    peak_rss_bytes: int
    # Share of all cores that programs other than the server and the bench used meanwhile.
    foreign_cpu_pct: float | None
    run: LevelRun


@dataclass(frozen=True, slots=True)
class SystemResult:
    name: str
    version: str = ""
    argv: tuple[str, ...] = ()
    startup_s: float | None = None
    idle_rss_bytes: int | None = None
    levels: tuple[LevelResult, ...] = ()
    # Set when the system could not be provisioned, started or measured.
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What the header states, so a table can be traced back to how it was made."""

    command: str
    machine: str
    model: str
    threads: int
    slots: int
    max_tokens: int
    load: str


def render_markdown(info: RunInfo, results: Sequence[SystemResult]) -> str:
    lines = [
        "# LLM serving benchmark",
        "",
        f"- machine: {info.machine}",
        f"- model: {info.model}",
        f"- threads: {info.threads} per server, {info.slots} parallel slots; "
        f"max_tokens {info.max_tokens}, temperature 0, streaming",
        f"- load: {info.load}",
        f"- command: `{info.command}`",
    ]
    lines += [f"- {r.name}: {_describe(r)}" for r in results]
    concurrencies = sorted({lv.metrics.concurrency for r in results for lv in r.levels})
    for concurrency in concurrencies:
        lines += ["", *_level_table(concurrency, results)]
    if concurrencies:
        lines += _footnotes(results)
    return "\n".join(lines) + "\n"


def _footnotes(results: Sequence[SystemResult]) -> list[str]:
    notes = [
        "",
        "other CPU %: share of all cores used by programs other than the server and the bench "
        "during the level; above a few percent the level's numbers are unreliable.",
    ]
    if any(_estimated(lv.metrics) for r in results for lv in r.levels):
        notes += [
            "",
            "\\* the server reported no usage: a stream that ended with finish_reason `length` "
            "counts as max_tokens, any other as its number of content chunks.",
        ]
    return notes


def write_json(path: Path, info: RunInfo, results: Sequence[SystemResult]) -> None:
    """Everything measured, down to each request's chunk arrival times."""
    document = {"info": dataclasses.asdict(info), "systems": [_system_json(r) for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def _describe(result: SystemResult) -> str:
    if result.error is not None:
        first_line = result.error.splitlines()[0] if result.error else "failed"
        return f"FAILED: {first_line}"
    parts = [result.version]
    if result.startup_s is not None:
        parts.append(f"ready in {result.startup_s:.1f} s")
    if result.idle_rss_bytes is not None:
        parts.append(f"idle RSS {result.idle_rss_bytes / _MIB:.0f} MiB")
    return "; ".join(p for p in parts if p)


def _level_table(concurrency: int, results: Sequence[SystemResult]) -> list[str]:
    rows = [
        (r.name, lv) for r in results for lv in r.levels if lv.metrics.concurrency == concurrency
    ]
    ours = next((lv.metrics for name, lv in rows if name == OURS), None)
    header = [
        "system",
        "out tok/s",
        "TTFT p50 ms",
        "TTFT p95 ms",
        "ITL p50 ms",
        "TPOT p50 ms",
        "tok/req",
        "peak RSS MiB",
        "ok/sent",
        "other CPU %",
    ]
    if ours is not None:
        header += ["ours/peer tok/s", "ours/peer TTFT p50"]
    table = [
        f"## concurrency {concurrency}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    for name, level in rows:
        m = level.metrics
        cells = [
            name,
            f"{m.output_tok_s:.1f}",
            _ms(m.ttft_p50),
            _ms(m.ttft_p95),
            _ms(m.itl_p50),
            _ms(m.tpot_p50),
            f"{m.mean_output_tokens:.1f}" + ("\\*" if _estimated(m) else ""),
            f"{level.peak_rss_bytes / _MIB:.0f}",
            f"{m.requests - m.errors}/{m.requests}",
            "—" if level.foreign_cpu_pct is None else f"{level.foreign_cpu_pct:.0f}",
        ]
        if ours is not None:
            peer = name != OURS
            cells += [
                _ratio(ours.output_tok_s, m.output_tok_s) if peer else "—",
                _ratio(ours.ttft_p50, m.ttft_p50) if peer else "—",
            ]
        table.append("| " + " | ".join(cells) + " |")
    return table


def _estimated(metrics: LevelMetrics) -> bool:
    return any(count != "usage" for count in metrics.token_counts)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    milliseconds = seconds * 1000
    return f"{milliseconds:.0f}" if milliseconds >= 100 else f"{milliseconds:.1f}"


def _ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "—"
    return f"{ours / peer:.2f}"


def _system_json(result: SystemResult) -> dict[str, object]:
    return {
        "name": result.name,
        "version": result.version,
        "argv": list(result.argv),
        "startup_s": result.startup_s,
        "idle_rss_bytes": result.idle_rss_bytes,
        "error": result.error,
        "levels": [
            {
                "metrics": dataclasses.asdict(level.metrics),
                "peak_rss_bytes": level.peak_rss_bytes,
                "foreign_cpu_pct": level.foreign_cpu_pct,
                "wall_s": level.run.wall_s,
                "requests": [dataclasses.asdict(record) for record in level.run.records],
            }
            for level in result.levels
        ],
    }
