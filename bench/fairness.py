"""Tenancy benchmark: does a quiet organisation keep its latency next to a noisy one?

A noisy tenant (org `noisy`, its own API key) keeps `--noisy` closed-loop streams of
`/v1/completions` going while a quiet tenant (org `quiet`) sends one stream; with fewer slots than
streams the server holds a queue, and its admission order decides who waits. Scenarios, one
server at a time:

- `ours-fair`: ours with its default weighted-fair admission between organisations;
- `ours-fifo`: ours without fairness: `AIAAS_SCHEDULING=fifo` and no headroom slot
  (`AIAAS_LLM_HEADROOM_SLOTS=0`);
- `llama-server`: llama.cpp's server (first come, first served; the tenants are just clients).

On each server the quiet tenant first runs alone (its idle TTFT), then next to the noisy one.
Run it with the project's venv:

    .venv/bin/python bench/fairness.py --quick

Markdown tables go to stdout, progress to stderr; `--json PATH` keeps every request's timings.
See bench/README.md for the flags and the goals.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from cpu import ForeignCpu
from fairness_report import (
    FOREIGN_CPU_WARN_PCT,
    ContendedRun,
    QuietRun,
    RunInfo,
    ScenarioResult,
    render_markdown,
    write_json,
)
from llm import (
    COMPLETIONS_PATH,
    LoadPlan,
    _describe_model,
    _machine,
    _model_file,
    _positive_float,
    _positive_int,
    warm_up,
)
from llm_systems import BenchSetup, Connection, LlamaServer, Ours, SetupError, System
from loadgen import PauseFactory, RequestRecord, client_limits, run_closed_loop
from peers import BENCH_DIR, CACHE_DIR, ProvisionError
from server import ServerError, ServerProcess, free_port

log = logging.getLogger("bench")

SCENARIOS = ("ours-fair", "ours-fifo", "llama-server")


@dataclass(frozen=True, slots=True)
class Plan:
    load: LoadPlan  # bodies, prompts, timeouts: the same as bench/llm.py's
    noisy_streams: int
    quiet_requests: int | None  # None: the quiet tenant runs for `quiet_duration_s`
    quiet_duration_s: float | None
    idle_requests: int
    noisy_warmup_s: float
    quiet_think_s: float

    def quiet_pause(self) -> PauseFactory:
        """A think time in [0, quiet_think_s) before each quiet request, the same every run."""

        def pause(client: int, index: int) -> float:
            return random.Random(f"{client}.{index}").uniform(0.0, self.quiet_think_s)  # noqa: S311

        return pause


def make_system(scenario: str, setup: BenchSetup) -> System:
    if scenario == "ours-fair":
        return Ours(setup, env={"AIAAS_SCHEDULING": "fair"})
    if scenario == "ours-fifo":
        return Ours(setup, env={"AIAAS_SCHEDULING": "fifo", "AIAAS_LLM_HEADROOM_SLOTS": "0"})
    if scenario == "llama-server":
        return LlamaServer(setup)
    raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")


def tenants(system: System, client: httpx.Client) -> tuple[Connection, Connection]:
    """(noisy, quiet): two organisations on ours; one shared connection on a peer without them."""
    if isinstance(system, Ours):
        return system.create_org(client, "noisy"), system.create_org(client, "quiet")
    connection = system.connect(client)
    return connection, connection


def measure_scenario(scenario: str, setup: BenchSetup, plan: Plan) -> ScenarioResult:
    """Start one server, run the quiet tenant alone, then next to the noisy one; stop it."""
    system = make_system(scenario, setup)
    log.info("%s: preparing", scenario)
    version = system.prepare()
    port = free_port()
    launch = system.launch(port)
    base_url = f"http://127.0.0.1:{port}"
    log_path = CACHE_DIR / "logs" / f"fairness-{scenario}.log"
    log.info("%s: starting (log: %s)", scenario, log_path)
    with ServerProcess(scenario, launch.argv, env=launch.env, log_path=log_path) as server:
        server.wait_healthy(base_url + launch.health_path, timeout_s=plan.load.startup_timeout_s)
        with httpx.Client(base_url=base_url, timeout=30.0) as client:
            noisy, quiet = tenants(system, client)
        idle, contended = asyncio.run(
            _run_phases(scenario, base_url, noisy, quiet, server.pid, plan)
        )
    return ScenarioResult(
        name=scenario,
        version=version,
        argv=tuple(launch.argv),
        env={k: v for k, v in launch.env.items() if k.startswith("AIAAS_")},
        idle=idle,
        contended=contended,
    )


async def _run_phases(
    scenario: str, base_url: str, noisy: Connection, quiet: Connection, pid: int, plan: Plan
) -> tuple[QuietRun, ContendedRun]:
    timeout = httpx.Timeout(plan.load.request_timeout_s, connect=10.0)
    async with (
        httpx.AsyncClient(
            base_url=base_url,
            headers=noisy.headers,
            timeout=timeout,
            limits=client_limits(plan.noisy_streams),
        ) as noisy_client,
        httpx.AsyncClient(
            base_url=base_url, headers=quiet.headers, timeout=timeout, limits=client_limits(1)
        ) as quiet_client,
    ):
        await warm_up(scenario, noisy_client, noisy.model, plan.load)
        await warm_up(scenario, quiet_client, quiet.model, plan.load)
        idle = await _quiet_alone(scenario, quiet_client, quiet.model, pid, plan)
        contended = await _quiet_next_to_noisy(
            scenario, (noisy_client, noisy.model), (quiet_client, quiet.model), pid, plan
        )
    return idle, contended


async def _quiet_alone(
    scenario: str, client: httpx.AsyncClient, model: str, pid: int, plan: Plan
) -> QuietRun:
    log.info("%s: quiet tenant alone, %d requests", scenario, plan.idle_requests)
    with ForeignCpu(pid) as foreign:
        run = await run_closed_loop(
            client,
            COMPLETIONS_PATH,
            plan.load.body_factory(model, 1, tag="idle."),
            concurrency=1,
            requests_per_client=plan.idle_requests,
            pause=plan.quiet_pause(),
        )
    _check_cpu(scenario, "idle", foreign.percent)
    _log_errors(scenario, "quiet (idle)", run.records)
    return QuietRun(run=run, foreign_cpu_pct=foreign.percent)


async def _quiet_next_to_noisy(
    scenario: str,
    noisy: tuple[httpx.AsyncClient, str],
    quiet: tuple[httpx.AsyncClient, str],
    pid: int,
    plan: Plan,
) -> ContendedRun:
    """The noisy streams start, warm up, then the quiet one runs; the window is the quiet run."""
    (noisy_client, noisy_model), (quiet_client, quiet_model) = noisy, quiet
    origin = time.perf_counter()
    stop = asyncio.Event()
    noisy_task = asyncio.create_task(
        run_closed_loop(
            noisy_client,
            COMPLETIONS_PATH,
            plan.load.body_factory(noisy_model, plan.noisy_streams, tag="noisy."),
            concurrency=plan.noisy_streams,
            stop=stop,
            origin=origin,
        )
    )
    log.info(
        "%s: %d noisy streams, quiet tenant joins after %.0f s",
        *(scenario, plan.noisy_streams, plan.noisy_warmup_s),
    )
    try:
        await asyncio.sleep(plan.noisy_warmup_s)
        with ForeignCpu(pid) as foreign:
            window_start = time.perf_counter() - origin
            quiet_run = await run_closed_loop(
                quiet_client,
                COMPLETIONS_PATH,
                plan.load.body_factory(quiet_model, 1, tag="quiet."),
                concurrency=1,
                requests_per_client=plan.quiet_requests,
                duration_s=plan.quiet_duration_s,
                pause=plan.quiet_pause(),
                origin=origin,
            )
            window_end = time.perf_counter() - origin
    finally:
        stop.set()
    log.info("%s: quiet tenant done; draining the noisy streams", scenario)
    noisy_run = await noisy_task
    _check_cpu(scenario, "contended", foreign.percent)
    _log_errors(scenario, "quiet", quiet_run.records)
    _log_errors(scenario, "noisy", noisy_run.records)
    return ContendedRun(
        quiet=quiet_run,
        noisy=noisy_run,
        window=(window_start, window_end),
        foreign_cpu_pct=foreign.percent,
    )


def _check_cpu(scenario: str, phase: str, percent: float | None) -> None:
    if (percent or 0.0) > FOREIGN_CPU_WARN_PCT:
        log.warning(
            "%s: other programs used %.0f%% of the CPU during the %s phase; "
            "its numbers are unreliable",
            *(scenario, percent, phase),
        )


def _log_errors(scenario: str, who: str, records: Sequence[RequestRecord]) -> None:
    errors = [r.error for r in records if r.error is not None]
    if errors:
        log.warning("%s: %d %s requests failed; first: %s", scenario, len(errors), who, errors[0])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(format="[bench %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    plan = _plan(args)
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
        noisy_streams=plan.noisy_streams,
        load=_describe_load(plan),
    )
    results: list[ScenarioResult] = []
    for scenario in args.scenarios:
        # A fresh data dir per scenario: ours starts without the other run's orgs or files.
        with tempfile.TemporaryDirectory(prefix="aiaas-fairness-") as work_dir:
            setup = BenchSetup(
                repo=BENCH_DIR.parent,
                model_path=model_path,
                threads=args.threads,
                slots=args.slots,
                work_dir=Path(work_dir),
                llama_sdist=args.llama_sdist,
            )
            try:
                results.append(measure_scenario(scenario, setup, plan))
            except (ProvisionError, ServerError, SetupError, httpx.HTTPError) as exc:
                log.error("%s: %s", scenario, exc)
                results.append(ScenarioResult(name=scenario, error=f"{type(exc).__name__}: {exc}"))
    sys.stdout.write(render_markdown(info, results))
    if args.json is not None:
        write_json(args.json, info, results)
        log.info("raw results written to %s", args.json)
    return 1 if any(r.error for r in results) else 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tenancy benchmark: a quiet tenant's TTFT next to a noisy one, fair vs FIFO."
    )
    add = parser.add_argument
    add(
        "--scenarios",
        type=_scenario_list,
        default=list(SCENARIOS),
        metavar="LIST",
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all, in that order)",
    )
    add("--slots", type=_positive_int, default=8, metavar="N", help="server slots (default 8)")
    add("--noisy", type=_positive_int, default=16, metavar="N", help="noisy streams (default 16)")
    add(
        "--quiet-requests",
        type=_positive_int,
        metavar="N",
        help="quiet requests next to the noisy tenant (default 24; --quick 6)",
    )
    add("--duration", type=_positive_float, metavar="S", help="quiet tenant runs S s, not a count")
    add(
        "--idle-requests",
        type=_positive_int,
        metavar="N",
        help="quiet requests on the idle server (default 12; --quick 4)",
    )
    add(
        "--warmup",
        type=float,
        metavar="S",
        help="seconds the noisy tenant runs before the quiet one joins (default 5; --quick 3)",
    )
    add(
        "--quiet-think",
        type=float,
        default=1.0,
        metavar="S",
        help="quiet think time, uniform in [0, S) before each request (default 1; 0: none)",
    )
    add("--quick", action="store_true", help="a smoke run: fewer requests, shorter warm-up")
    add("--max-tokens", type=_positive_int, default=64, metavar="N", help="default 64")
    add("--threads", type=_positive_int, default=2, metavar="N", help="per server (default 2)")
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
    if args.duration is not None and args.quiet_requests is not None:
        parser.error("--duration excludes --quiet-requests")
    if args.quiet_think < 0 or (args.warmup is not None and args.warmup < 0):
        parser.error("--quiet-think and --warmup must be >= 0")
    return args


def _plan(args: argparse.Namespace) -> Plan:
    quiet_requests = args.quiet_requests or (6 if args.quick else 24)
    return Plan(
        load=LoadPlan(
            levels=(),
            duration_s=None,
            max_tokens=args.max_tokens,
            unique_prompts=True,
            request_timeout_s=args.request_timeout,
            startup_timeout_s=args.startup_timeout,
        ),
        noisy_streams=args.noisy,
        quiet_requests=None if args.duration is not None else quiet_requests,
        quiet_duration_s=args.duration,
        idle_requests=args.idle_requests or (4 if args.quick else 12),
        noisy_warmup_s=args.warmup if args.warmup is not None else (3.0 if args.quick else 5.0),
        quiet_think_s=args.quiet_think,
    )


def _describe_load(plan: Plan) -> str:
    quiet = (
        f"{plan.quiet_requests} requests"
        if plan.quiet_requests is not None
        else f"{plan.quiet_duration_s:g} s"
    )
    return (
        f"streaming {COMPLETIONS_PATH}, prompts tagged unique; quiet tenant: 1 closed-loop "
        f"stream, think time uniform in [0, {plan.quiet_think_s:g}) s, {plan.idle_requests} "
        f"requests alone, then {quiet} next to the noisy tenant's {plan.noisy_streams} "
        f"closed-loop streams (no think time), which start {plan.noisy_warmup_s:g} s earlier"
    )


def _scenario_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in SCENARIOS for n in names):
        raise argparse.ArgumentTypeError(f"choose from {','.join(SCENARIOS)}")
    return names


if __name__ == "__main__":
    sys.exit(main())
