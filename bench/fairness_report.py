"""Results of the tenancy benchmark (`bench/fairness.py`), as markdown tables and as raw JSON.

Per scenario: the quiet tenant's TTFT alone and next to the noisy tenant, the noisy tenant's TTFT,
and the output tokens both delivered within the window in which all streams ran together. Then
the two goals: the quiet tenant's loaded/idle TTFT ratio (ours fair, against the others) and
ours' throughput with fair admission against FIFO.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llm_report import _ms
from loadgen import LevelRun, RequestRecord
from metrics import percentile, summarize

__all__ = [
    "FOREIGN_CPU_WARN_PCT",
    "ContendedMetrics",
    "ContendedRun",
    "QuietRun",
    "RunInfo",
    "ScenarioResult",
    "contended_metrics",
    "render_markdown",
    "write_json",
]

# Goals of the tenancy issue.
QUIET_TTFT_RATIO_GOAL = 1.5  # quiet TTFT p50 under load / alone, ours fair
FAIR_THROUGHPUT_GOAL = 0.95  # ours fair tok/s / ours fifo tok/s
# Share of all cores other programs may take during a phase before its row is flagged.
FOREIGN_CPU_WARN_PCT = 5.0


@dataclass(frozen=True, slots=True)
class QuietRun:
    run: LevelRun
    foreign_cpu_pct: float | None


@dataclass(frozen=True, slots=True)
class ContendedRun:
    quiet: LevelRun
    noisy: LevelRun
    # (start, end) of the quiet tenant's run, in the seconds both runs' records count from.
    window: tuple[float, float]
    foreign_cpu_pct: float | None


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    name: str
    version: str = ""
    argv: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    idle: QuietRun | None = None
    contended: ContendedRun | None = None
    error: str | None = None  # set when the server could not be provisioned, started or run


@dataclass(frozen=True, slots=True)
class RunInfo:
    command: str
    machine: str
    model: str
    threads: int
    slots: int
    max_tokens: int
    noisy_streams: int
    load: str


@dataclass(frozen=True, slots=True)
class ContendedMetrics:
    """Latencies in seconds; token rates count only tokens that arrived within the window."""

    window_s: float
    quiet_ttft_p50: float | None
    quiet_ttft_p95: float | None
    quiet_ok: int
    quiet_sent: int
    # Noisy requests sent within the window.
    noisy_ttft_p50: float | None
    noisy_ok: int
    noisy_sent: int
    quiet_tok_s: float
    noisy_tok_s: float

    @property
    def total_tok_s(self) -> float:
        return self.quiet_tok_s + self.noisy_tok_s


def contended_metrics(run: ContendedRun) -> ContendedMetrics:
    start, end = run.window
    quiet_ok = [r for r in run.quiet.records if r.ok]
    in_window = [r for r in run.noisy.records if start <= r.start <= end]
    quiet_ttfts = [t for r in quiet_ok if (t := r.ttft) is not None]
    noisy_ttfts = [t for r in in_window if r.ok and (t := r.ttft) is not None]
    width = end - start
    return ContendedMetrics(
        window_s=width,
        quiet_ttft_p50=percentile(quiet_ttfts, 50),
        quiet_ttft_p95=percentile(quiet_ttfts, 95),
        quiet_ok=len(quiet_ok),
        quiet_sent=len(run.quiet.records),
        noisy_ttft_p50=percentile(noisy_ttfts, 50),
        noisy_ok=sum(1 for r in in_window if r.ok),
        noisy_sent=len(in_window),
        quiet_tok_s=_tokens_within(run.quiet.records, start, end) / width if width > 0 else 0.0,
        noisy_tok_s=_tokens_within(run.noisy.records, start, end) / width if width > 0 else 0.0,
    )


def _tokens_within(records: Sequence[RequestRecord], start: float, end: float) -> float:
    """Output tokens that arrived in [start, end]: each request's tokens, spread over its chunks
    (a server may pack several tokens into one chunk)."""
    total = 0.0
    for record in records:
        times = record.content_times
        if record.ok and times:
            inside = sum(1 for t in times if start <= t <= end)
            total += record.output_tokens * inside / len(times)
    return total


def render_markdown(info: RunInfo, results: Sequence[ScenarioResult]) -> str:
    lines = [
        "# Tenancy benchmark: quiet tenant next to a noisy one",
        "",
        f"- machine: {info.machine}",
        f"- model: {info.model}",
        f"- threads: {info.threads} per server, {info.slots} slots for "
        f"{info.noisy_streams} + 1 streams; max_tokens {info.max_tokens}, temperature 0",
        f"- load: {info.load}",
        f"- command: `{info.command}`",
    ]
    lines += [f"- {r.name}: {_describe(r)}" for r in results]
    lines += ["", *_table(results), "", *_goals(results)]
    return "\n".join(lines) + "\n"


def _describe(result: ScenarioResult) -> str:
    if result.error is not None:
        return f"FAILED: {result.error.splitlines()[0] if result.error else 'failed'}"
    settings = " ".join(f"{k}={v}" for k, v in sorted(result.env.items()) if k != "AIAAS_DATA_DIR")
    return "; ".join(p for p in (result.version, settings or " ".join(result.argv[1:])) if p)


def _table(results: Sequence[ScenarioResult]) -> list[str]:
    header = [
        "scenario",
        "quiet alone TTFT p50 / p95 ms",
        "quiet loaded TTFT p50 / p95 ms",
        "loaded/alone p50",
        "noisy TTFT p50 ms",
        "total out tok/s",
        "noisy / quiet tok/s",
        "ok/sent quiet, noisy",
        "other CPU % alone / loaded",
    ]
    table = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    flagged = False
    for result in results:
        if result.idle is None or result.contended is None:
            continue
        idle = summarize(result.idle.run)
        loaded = contended_metrics(result.contended)
        cpu = (result.idle.foreign_cpu_pct, result.contended.foreign_cpu_pct)
        flag = any((pct or 0.0) > FOREIGN_CPU_WARN_PCT for pct in cpu)
        flagged |= flag
        cells = [
            result.name + ("\\*" if flag else ""),
            f"{_ms(idle.ttft_p50)} / {_ms(idle.ttft_p95)}",
            f"{_ms(loaded.quiet_ttft_p50)} / {_ms(loaded.quiet_ttft_p95)}",
            _ratio(loaded.quiet_ttft_p50, idle.ttft_p50),
            _ms(loaded.noisy_ttft_p50),
            f"{loaded.total_tok_s:.1f}",
            f"{loaded.noisy_tok_s:.1f} / {loaded.quiet_tok_s:.1f}",
            f"{loaded.quiet_ok}/{loaded.quiet_sent}, {loaded.noisy_ok}/{loaded.noisy_sent}",
            " / ".join("—" if pct is None else f"{pct:.0f}" for pct in cpu),
        ]
        table.append("| " + " | ".join(cells) + " |")
    table += [
        "",
        "Loaded numbers cover the window in which the quiet tenant ran next to the noisy one: "
        "tok/s counts the tokens that arrived within it, noisy TTFT the noisy requests sent "
        "within it.",
    ]
    if flagged:
        table.append(
            f"\\* other programs used more than {FOREIGN_CPU_WARN_PCT:.0f}% of the CPU "
            "during a phase; rerun on a quiet machine."
        )
    return table


def _goals(results: Sequence[ScenarioResult]) -> list[str]:
    by_name = {r.name: r for r in results if r.idle is not None and r.contended is not None}
    ratios = {
        name: ratio
        for name, result in by_name.items()
        if (ratio := _ttft_ratio(result)) is not None
    }
    lines = ["## Goals", ""]
    fair = ratios.get("ours-fair")
    if fair is None:
        lines.append("- (a) quiet TTFT: ours-fair did not run")
    else:
        others = ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items() if n != "ours-fair")
        verdict = "met" if fair <= QUIET_TTFT_RATIO_GOAL else "NOT met"
        lines.append(
            f"- (a) quiet TTFT p50 under load / alone, ours-fair: {fair:.2f}x "
            f"(goal <= {QUIET_TTFT_RATIO_GOAL}x): {verdict}" + (f"; {others}" if others else "")
        )
    if "ours-fair" in by_name and "ours-fifo" in by_name:
        fair_tok = contended_metrics(_contended(by_name["ours-fair"])).total_tok_s
        fifo_tok = contended_metrics(_contended(by_name["ours-fifo"])).total_tok_s
        share = fair_tok / fifo_tok if fifo_tok > 0 else 0.0
        verdict = "met" if share >= FAIR_THROUGHPUT_GOAL else "NOT met"
        lines.append(
            f"- (b) total tok/s, ours-fair / ours-fifo: {fair_tok:.1f} / {fifo_tok:.1f} = "
            f"{share:.2f} (goal >= {FAIR_THROUGHPUT_GOAL}): {verdict}"
        )
    else:
        lines.append("- (b) throughput: needs both ours-fair and ours-fifo")
    return lines


def _contended(result: ScenarioResult) -> ContendedRun:
    if result.contended is None:
        raise ValueError(f"{result.name} has no contended run")
    return result.contended


def _ttft_ratio(result: ScenarioResult) -> float | None:
    if result.idle is None or result.contended is None:
        return None
    idle = summarize(result.idle.run).ttft_p50
    loaded = contended_metrics(result.contended).quiet_ttft_p50
    return None if idle is None or loaded is None or idle == 0 else loaded / idle


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "—"
    return f"{numerator / denominator:.2f}"


def write_json(path: Path, info: RunInfo, results: Sequence[ScenarioResult]) -> None:
    """Everything measured, down to each request's chunk arrival times."""
    document = {
        "info": dataclasses.asdict(info),
        "scenarios": [_scenario_json(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def _scenario_json(result: ScenarioResult) -> dict[str, object]:
    document: dict[str, object] = {
        "name": result.name,
        "version": result.version,
        "argv": list(result.argv),
        "env": {k: v for k, v in result.env.items() if k != "AIAAS_DATA_DIR"},
        "error": result.error,
    }
    if result.idle is not None:
        document["alone"] = {
            "metrics": dataclasses.asdict(summarize(result.idle.run)),
            "foreign_cpu_pct": result.idle.foreign_cpu_pct,
            "requests": _records(result.idle.run),
        }
    if result.contended is not None:
        run = result.contended
        document["loaded"] = {
            "metrics": dataclasses.asdict(contended_metrics(run)),
            "window": list(run.window),
            "foreign_cpu_pct": run.foreign_cpu_pct,
            "quiet_requests": _records(run.quiet),
            "noisy_requests": _records(run.noisy),
        }
    return document


def _records(run: LevelRun) -> list[dict[str, object]]:
    return [dataclasses.asdict(record) for record in run.records]
