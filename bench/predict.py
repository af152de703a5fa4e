"""Predictions/s over HTTP: ours against BentoML serving the same ONNX file, one at a time.

Ours trains a small `mlp` on a generated tabular dataset through its own API and deploys it; then
it is restarted to serve only (no training worker). The ONNX file ours registered is served by
BentoML with its adaptive batching (`bench/predict_peer_bentoml.py`). Each route gets a warm-up
and then a fixed window of closed-loop load: `--concurrency` clients, each sending its next
request as soon as the previous answer arrived. Every route carries the same encoded rows.

    .venv/bin/python bench/predict.py
    .venv/bin/python bench/predict.py --quick
    .venv/bin/python bench/predict.py --systems bentoml --onnx model.onnx   # the peer alone

The markdown table goes to stdout, progress to stderr; the exit status is 1 if a system failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import io
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import uvloop
from aiaas.specs.preprocessing import PreprocessingSpec, transform

from cpu import ForeignCpu
from memory import PeakRssSampler, process_tree
from metrics import percentile
from peers import BENCH_DIR, BENTOML_VERSION, ProvisionError, ensure_bentoml_python
from server import ServerError, ServerProcess, free_port

log = logging.getLogger("bench")

SYSTEMS = ("ours", "bentoml")
GOAL_THROUGHPUT = 1.5  # ours' requests/s over BentoML's, with a p95 no worse
REPO = BENCH_DIR.parent
LOGS = BENCH_DIR / ".cache" / "logs"
DISTINCT_ROWS = 256  # requests cycle through these rows
# The peer gets ours' versions of these: the same ONNX runtime, and the same event loop and HTTP
# parser under uvicorn (it uses uvloop and httptools whenever they are installed).
SHARED_WITH_PEER = ("onnxruntime", "numpy", "uvloop", "httptools")
JSON_HEADERS = {"content-type": "application/json"}
# An answer checker returns the logits it found (None where the route gives probabilities).
Check = Callable[[Any], list[float] | None]
# Sends body `index` on behalf of client `client`: None for a good answer, else the error's kind.
Send = Callable[[int, int], Awaitable[str | None]]


class BenchError(Exception):
    """A server answered a setup call other than its contract says."""


@dataclass(frozen=True, slots=True)
class Setup:
    """What training on ours left: its data dir and key, the deployment's name, the files."""

    data_dir: Path | None
    api_key: str
    model: str
    onnx_path: Path
    spec_json: str | None


@dataclass(frozen=True, slots=True)
class Workload:
    """The rows every route sends: raw records and the encoded model input of each."""

    records: list[dict[str, float]]
    tabular: np.ndarray  # float32 [n, D]
    input_name: str
    classes: int
    rows_per_request: int

    def chunks(self) -> Iterator[slice]:
        step = self.rows_per_request
        return (slice(i, i + step) for i in range(0, len(self.tabular) - step + 1, step))


@dataclass(frozen=True, slots=True)
class Route:
    system: str
    label: str
    url: str
    bodies: list[bytes]
    check: Check
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Measurement:
    route: Route
    latencies: list[float]  # seconds, successful requests only
    errors: Counter[str]
    wall_s: float
    peak_rss: int
    foreign_cpu: float | None
    server_cpu_s: float  # CPU time the server's process tree used during the window
    first_logits: list[float] | None

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def server_cpu_ms_per_request(self) -> float | None:
        return 1000 * self.server_cpu_s / len(self.latencies) if self.latencies else None

    def ms(self, q: float) -> float | None:
        value = percentile(self.latencies, q)
        return None if value is None else 1000 * value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    load_before = os.getloadavg()
    results: list[Measurement] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="aiaas-bench-predict-") as tmp:
        try:
            setup = _setup(args, Path(tmp))
            workload = _workload(args, setup)
        except (ServerError, BenchError, httpx.HTTPError) as exc:
            log.error("setup failed: %s", exc)
            return 1
        for system in args.systems:
            run = _run_ours if system == "ours" else _run_bentoml
            try:
                results += run(args, setup, workload, Path(tmp))
            except (ServerError, ProvisionError, BenchError, httpx.HTTPError) as exc:
                log.error("%s failed: %s", system, exc)
                failed = True
    _report(args, workload, results, load_before)
    return 1 if failed else 0


@contextlib.contextmanager
def _serving(
    name: str, argv: list[str], env: Mapping[str, str], health_url: str, *, timeout_s: float
) -> Iterator[ServerProcess]:
    """A started, healthy server, stopped when the block ends however it ends."""
    log_path = LOGS / f"predict-{name}.log"
    with ServerProcess(name, argv, env=env, log_path=log_path, cwd=REPO) as server:
        server.wait_healthy(health_url, timeout_s=timeout_s)
        yield server


def _expect(response: httpx.Response, status: int | None = None) -> Any:
    """The JSON of a 2xx answer (or of `status` exactly)."""
    ok = response.is_success if status is None else response.status_code == status
    if not ok:
        raise BenchError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code} (expected {status or '2xx'}): {response.text[:300]}"
        )
    return response.json()


# --- ours: train and deploy, then serve ----------------------------------------------------------


def _ours(
    args: argparse.Namespace, data_dir: Path, *, training: bool
) -> tuple[str, list[str], dict[str, str]]:
    """(base URL, argv, environment) of an `aiaas serve` on a free port."""
    port = free_port()
    argv = [sys.executable, "-m", "aiaas", "serve", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIAAS_")}
    env |= {
        "AIAAS_DATA_DIR": str(data_dir),
        "AIAAS_MODELS": "",
        "AIAAS_LOG_LEVEL": "warning",
        "AIAAS_TRAINING_THREADS": str(args.threads),
        "AIAAS_TRAINING_WORKERS": "1" if training else "0",
        "AIAAS_CLASSIC_THREADS": str(args.threads),
        "AIAAS_CLASSIC_MAX_BATCH": str(args.max_batch),
    }
    if args.max_wait_ms is not None:
        env["AIAAS_CLASSIC_MAX_WAIT_MS"] = str(args.max_wait_ms)
    return f"http://127.0.0.1:{port}", argv, env


def _setup(args: argparse.Namespace, tmp: Path) -> Setup:
    """Train and deploy a model on ours and fetch its files; or take `--onnx` as it is."""
    if args.onnx is not None:
        return Setup(None, "", "", args.onnx, None)
    data_dir = tmp / "data"
    base, argv, env = _ours(args, data_dir, training=True)
    log.info("ours: training an mlp on %d rows x %d features", args.samples, args.features)
    with (
        _serving("ours-setup", argv, env, f"{base}/health", timeout_s=args.startup_timeout),
        httpx.Client(base_url=base, timeout=120) as http,
    ):
        admin = (data_dir / "admin-key").read_text().strip()
        org = _expect(
            http.post(
                "/v1/organizations",
                json={"name": "bench"},
                headers={"Authorization": f"Bearer {admin}"},
            )
        )
        http.headers["Authorization"] = f"Bearer {org['api_key']}"
        model = _train(http, args)
        _expect(http.post("/v1/deployments", json={"model": model}), 201)
        artifacts = f"/v1/models/{model}/versions/1/artifacts"
        onnx = _expect_bytes(http.get(f"{artifacts}/model.onnx"))
        spec_json = _expect_bytes(http.get(f"{artifacts}/preprocessing.json")).decode()
    onnx_path = tmp / "model.onnx"
    onnx_path.write_bytes(onnx)
    return Setup(data_dir, org["api_key"], model, onnx_path, spec_json)


def _expect_bytes(response: httpx.Response) -> bytes:
    if not response.is_success:
        _expect(response)
    return response.content


def _train(http: httpx.Client, args: argparse.Namespace) -> str:
    """Upload the dataset, train an `mlp` job to the end; its fine-tuned model id."""
    buffer = io.BytesIO()
    _dataset(args).to_parquet(buffer, index=False)
    upload = _expect(
        http.post(
            "/v1/files",
            data={"purpose": "dataset"},
            files={"file": ("bench.parquet", buffer.getvalue())},
        )
    )
    dataset = _expect(http.post("/v1/datasets", json={"name": "bench", "file_ids": [upload["id"]]}))
    job = _expect(
        http.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "mlp",
                "training_file": dataset["version"]["id"],
                "seed": args.seed,
                "hyperparameters": {"n_epochs": args.epochs},
            },
        )
    )
    deadline = time.monotonic() + args.train_timeout
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise BenchError(f"job {job['id']} still {job['status']} after {args.train_timeout} s")
        time.sleep(0.5)
        job = _expect(http.get(f"/v1/fine_tuning/jobs/{job['id']}"))
    if job["status"] != "succeeded":
        raise BenchError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
    return str(job["fine_tuned_model"])


def _dataset(args: argparse.Namespace) -> pd.DataFrame:
    """Gaussian features labelled by a random linear teacher."""
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.samples, args.features)).astype(np.float32)
    teacher = rng.normal(size=(args.features, args.classes))
    y = (x @ teacher + rng.normal(scale=2.0, size=(args.samples, args.classes))).argmax(1)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(args.features)])
    frame["label"] = [f"c{v}" for v in y]
    return frame


def _run_ours(
    args: argparse.Namespace, setup: Setup, workload: Workload, tmp: Path
) -> list[Measurement]:
    if setup.data_dir is None:
        raise BenchError("ours needs its own trained model; drop --onnx to measure it")
    base, argv, env = _ours(args, setup.data_dir, training=False)
    headers = {"Authorization": f"Bearer {setup.api_key}"}
    with _serving("ours", argv, env, f"{base}/health", timeout_s=args.startup_timeout) as server:
        _check_metadata(base, setup.model, headers, workload)
        _wait_model_ready(base, setup.model, headers, timeout_s=args.startup_timeout)
        routes = [
            Route(
                "ours",
                "OIP /v2/models/{name}/infer",
                f"{base}/v2/models/{setup.model}/infer",
                _oip_bodies(workload),
                _oip_check(workload),
                headers,
            ),
            Route(
                "ours",
                "/v1/predictions",
                f"{base}/v1/predictions",
                _prediction_bodies(workload, setup.model),
                _prediction_check(workload),
                headers,
            ),
        ]
        return [_measure(route, server.pid, args) for route in routes]


def _check_metadata(base: str, model: str, headers: Mapping[str, str], work: Workload) -> None:
    """The width ours says its model takes must be the width of the rows we encoded."""
    meta = _expect(httpx.get(f"{base}/v2/models/{model}", headers=headers, timeout=60))
    tensor = meta["inputs"][0]
    if tensor["name"] != work.input_name or tensor["shape"][-1] != work.tabular.shape[1]:
        raise BenchError(f"ours' model takes {tensor}; the ONNX file {work.tabular.shape}")


def _wait_model_ready(
    base: str, model: str, headers: Mapping[str, str], *, timeout_s: float
) -> None:
    """Asking for readiness starts loading the model; ask until it says ready."""
    deadline = time.monotonic() + timeout_s
    while not _expect(httpx.get(f"{base}/v2/models/{model}/ready", headers=headers))["ready"]:
        if time.monotonic() > deadline:
            raise BenchError(f"model {model} not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


# --- the peer --------------------------------------------------------------------------------


def _run_bentoml(
    args: argparse.Namespace, setup: Setup, workload: Workload, tmp: Path
) -> list[Measurement]:
    shared = {name: importlib.metadata.version(name) for name in SHARED_WITH_PEER}
    python = ensure_bentoml_python(same_as_ours=shared)
    port = free_port()
    argv = [str(python.parent / "bentoml"), "serve", "predict_peer_bentoml:OnnxClassifier"]
    argv += ["--working-dir", str(BENCH_DIR), "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ) | {
        "BENCH_ONNX_PATH": str(setup.onnx_path),
        "BENCH_ORT_THREADS": str(args.threads),
        "BENCH_MAX_BATCH": str(args.max_batch),
        "BENCH_MAX_LATENCY_MS": str(args.bentoml_max_latency_ms),
        "BENTOML_HOME": str(tmp / "bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    base = f"http://127.0.0.1:{port}"
    with _serving("bentoml", argv, env, f"{base}/readyz", timeout_s=args.startup_timeout) as server:
        route = Route(
            "bentoml",
            "/infer (batchable)",
            f"{base}/infer",
            _oip_bodies(workload),
            _bentoml_check(workload),
        )
        return [_measure(route, server.pid, args)]


# --- bodies and answers --------------------------------------------------------------------


def _workload(args: argparse.Namespace, setup: Setup) -> Workload:
    """Fresh rows from the training distribution, encoded with ours' preprocessing spec (or,
    with `--onnx` alone, standard normal features of the model's width)."""
    session = ort.InferenceSession(str(setup.onnx_path), providers=["CPUExecutionProvider"])
    model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]
    rng = np.random.default_rng(args.seed + 1)
    frame = pd.DataFrame(
        rng.normal(size=(DISTINCT_ROWS, args.features)).astype(np.float32),
        columns=[f"x{i}" for i in range(args.features)],
    )
    if setup.spec_json is not None:
        features = transform(PreprocessingSpec.model_validate_json(setup.spec_json), frame)
        if features.tabular is None:
            raise BenchError("the preprocessing spec gives no tabular input")
        tabular = features.tabular.astype(np.float32)
    else:
        tabular = rng.normal(size=(DISTINCT_ROWS, model_input.shape[-1])).astype(np.float32)
    if tabular.shape[1] != model_input.shape[-1]:
        raise BenchError(f"rows are {tabular.shape}; the ONNX input is {model_input.shape}")
    records = [{k: float(v) for k, v in row.items()} for row in frame.to_dict("records")]
    return Workload(
        records, tabular, model_input.name, int(model_output.shape[-1]), args.rows_per_request
    )


def _oip_bodies(work: Workload) -> list[bytes]:
    def body(rows: np.ndarray) -> dict[str, Any]:
        tensor = {"name": work.input_name, "shape": list(rows.shape), "datatype": "FP32"}
        return {"inputs": [tensor | {"data": rows.ravel().tolist()}]}

    return [json.dumps(body(work.tabular[part])).encode() for part in work.chunks()]


def _prediction_bodies(work: Workload, model: str) -> list[bytes]:
    return [
        json.dumps({"model": model, "records": work.records[part]}).encode()
        for part in work.chunks()
    ]


def _logits(tensor: Mapping[str, Any], work: Workload) -> list[float]:
    expected = [work.rows_per_request, work.classes]
    if tensor["shape"] != expected or len(tensor["data"]) != expected[0] * expected[1]:
        raise ValueError(f"logits of shape {tensor['shape']}, expected {expected}")
    return list(tensor["data"])


def _oip_check(work: Workload) -> Check:
    return lambda answer: _logits(answer["outputs"][0], work)


def _bentoml_check(work: Workload) -> Check:
    return lambda answer: _logits(answer[0], work)


def _prediction_check(work: Workload) -> Check:
    def check(answer: Any) -> None:
        items = answer["data"]
        if len(items) != work.rows_per_request or items[0].get("label") is None:
            raise ValueError(f"{len(items)} items, first {items[0] if items else None}")

    return check


# --- load ------------------------------------------------------------------------------------


def _measure(route: Route, pid: int, args: argparse.Namespace) -> Measurement:
    first_logits = _probe(route)
    log.info(
        "%s %s: warm-up %.0f s, then %.0f s at concurrency %d (%s client)",
        route.system,
        route.label,
        args.warmup,
        args.seconds,
        args.concurrency,
        args.client,
    )
    uvloop.run(_closed_loop(route, args, args.warmup))
    client_cpu, server_cpu = time.process_time(), _tree_cpu_s(pid)
    with PeakRssSampler(pid) as rss, ForeignCpu(pid) as cpu:
        latencies, errors, wall = uvloop.run(_closed_loop(route, args, args.seconds))
    client_cpu, server_cpu = time.process_time() - client_cpu, _tree_cpu_s(pid) - server_cpu
    log.info(
        "  %d answers; the load generator used %.0f%% of a core",
        len(latencies),
        100 * client_cpu / wall,
    )
    if errors:
        log.warning("%s %s errors: %s", route.system, route.label, dict(errors.most_common(5)))
    return Measurement(
        route, latencies, errors, wall, rss.peak_bytes, cpu.percent, server_cpu, first_logits
    )


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process tree under `pid` has used so far."""
    ticks = 0
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:  # exited
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # utime and stime are fields 14 and 15
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _probe(route: Route) -> list[float] | None:
    """One request before the load: it must pass the check; its logits are compared later."""
    headers = {**route.headers, **JSON_HEADERS}
    answer = _expect(httpx.post(route.url, content=route.bodies[0], headers=headers, timeout=60))
    try:
        return route.check(answer)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise BenchError(f"{route.system} {route.label}: {exc}; answer {answer}") from exc


async def _closed_loop(
    route: Route, args: argparse.Namespace, seconds: float
) -> tuple[list[float], Counter[str], float]:
    """Clients send until `seconds` have passed; (latencies of successes, errors, wall time)."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    senders = {"raw": _raw_sender, "httpx": _httpx_sender}
    async with senders[args.client](route, args.concurrency, args.request_timeout) as send:
        started = time.perf_counter()
        deadline = started + seconds

        async def one_client(client: int) -> None:
            index = client
            while (sent := time.perf_counter()) < deadline:
                error = await send(client, index % len(route.bodies))
                index += args.concurrency
                if error is None:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors[error] += 1

        await asyncio.gather(*(one_client(c) for c in range(args.concurrency)))
        wall = time.perf_counter() - started
    return latencies, errors, wall


@contextlib.asynccontextmanager
async def _raw_sender(route: Route, concurrency: int, timeout_s: float) -> AsyncIterator[Send]:
    """A keep-alive connection per client, each request's bytes built once: the client spends
    ~70 us of CPU per request (httpx: ~2.5 ms, a core at 400 requests/s on a 2-core machine)."""
    url = urlsplit(route.url)
    head = f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in {**route.headers, **JSON_HEADERS}.items())
    requests = [f"{head}Content-Length: {len(b)}\r\n\r\n".encode() + b for b in route.bodies]
    connections = [RawConnection(url.hostname or "", url.port or 80) for _ in range(concurrency)]

    async def send(client: int, index: int) -> str | None:
        connection = connections[client]
        try:
            async with asyncio.timeout(timeout_s):
                status, body = await connection.exchange(requests[index])
        except (OSError, EOFError, asyncio.LimitOverrunError, ValueError) as exc:
            connection.close()  # TimeoutError is an OSError
            return type(exc).__name__
        return _verdict(route, status, body)

    try:
        yield send
    finally:
        for connection in connections:
            connection.close()


@contextlib.asynccontextmanager
async def _httpx_sender(route: Route, concurrency: int, timeout_s: float) -> AsyncIterator[Send]:
    """One shared `httpx.AsyncClient` with a connection per client."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {**route.headers, **JSON_HEADERS}
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout_s) as client:

        async def send(_client: int, index: int) -> str | None:
            try:
                response = await client.post(route.url, content=route.bodies[index])
            except httpx.HTTPError as exc:
                return type(exc).__name__
            return _verdict(route, response.status_code, response.content)

        yield send


def _verdict(route: Route, status: int, body: bytes) -> str | None:
    """None for a good answer, else what went wrong, short enough to count by kind."""
    if status != httpx.codes.OK:
        return f"HTTP {status}"
    try:
        route.check(json.loads(body))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return f"bad answer: {str(exc)[:60]}"
    return None


class RawConnection:
    """One keep-alive HTTP/1.1 connection, opened on first use and again after an error."""

    def __init__(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send a whole request; (status, body) of the answer, which must have a length."""
        if self._streams is None:
            self._streams = await asyncio.open_connection(*self._address)
        reader, writer = self._streams
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        length, close = None, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = value.strip() == b"close"
        if length is None:
            raise ValueError("an answer without Content-Length")
        body = await reader.readexactly(length)
        if close:
            self.close()
        return int(head[9:12]), body

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


# --- report ----------------------------------------------------------------------------------


def _report(
    args: argparse.Namespace,
    work: Workload,
    results: Sequence[Measurement],
    load_before: tuple[float, float, float],
) -> None:
    load_after = os.getloadavg()
    ort_version = importlib.metadata.version("onnxruntime")
    print(f"$ {shlex.join(sys.orig_argv)}\n")
    print(
        f"{os.cpu_count()} cores; load average (1/5/15 min) "
        f"{' '.join(f'{v:.2f}' for v in load_before)} before, "
        f"{' '.join(f'{v:.2f}' for v in load_after)} after.  "
        f"Model: {args.onnx or 'ours mlp'}, {work.tabular.shape[1]} inputs, {work.classes} "
        f"classes; onnxruntime {ort_version} with {args.threads} intra-op threads on both "
        f"sides; max batch {args.max_batch}; bentoml {BENTOML_VERSION} (max_latency_ms "
        f"{args.bentoml_max_latency_ms}).  Load: {args.concurrency} clients, closed loop, "
        f"{args.rows_per_request} row(s) per request, {args.warmup:.0f} s warm-up, "
        f"{args.seconds:.0f} s window, {args.client} client.\n"
    )
    print(
        "| system | route | requests/s | rows/s | p50 ms | p95 ms | p99 ms | errors "
        "| peak RSS MiB | server CPU ms/req | foreign CPU % |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for m in results:
        cells = [
            m.route.system,
            m.route.label,
            f"{m.requests_per_s:,.0f}",
            f"{m.requests_per_s * args.rows_per_request:,.0f}",
            *(_num(m.ms(q), ".1f") for q in (50, 95, 99)),
            str(sum(m.errors.values())),
            f"{m.peak_rss / 2**20:,.0f}",
            _num(m.server_cpu_ms_per_request, ".2f"),
            _num(m.foreign_cpu, ".1f"),
        ]
        print(f"| {' | '.join(cells)} |")
    _ratios(results)


def _ratios(results: Sequence[Measurement]) -> None:
    peer = next((m for m in results if m.route.system == "bentoml"), None)
    if peer is None or not peer.latencies:
        return
    print()
    for ours in (m for m in results if m.route.system == "ours" and m.latencies):
        throughput = ours.requests_per_s / peer.requests_per_s
        p95 = (ours.ms(95) or 0) / (peer.ms(95) or 1)
        met = throughput >= GOAL_THROUGHPUT and p95 <= 1
        print(
            f"- ours {ours.route.label} / bentoml: requests/s x{throughput:.2f}, p95 x{p95:.2f} "
            f"(goal: >= x{GOAL_THROUGHPUT} with p95 <= x1: {'met' if met else 'missed'})"
        )
        if ours.first_logits is not None and peer.first_logits is not None:
            diff = np.abs(np.subtract(ours.first_logits, peer.first_logits)).max()
            print(f"  same rows, same logits: max |difference| {diff:.2g}")


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Predictions/s: ours vs BentoML, same ONNX.")
    add = parser.add_argument
    add("--systems", default=",".join(SYSTEMS), help="comma-separated, in order (default: all)")
    add("--concurrency", type=int, default=32, help="closed-loop clients (default 32)")
    add("--client", choices=("raw", "httpx"), default="raw", help="load generator (default raw)")
    add("--seconds", type=float, default=20.0, help="measured window per route (default 20)")
    add("--warmup", type=float, default=3.0, help="unmeasured load first (default 3)")
    add("--quick", action="store_true", help="1 s warm-up, 5 s window")
    add("--rows-per-request", type=int, default=1, help="rows in each request (default 1)")
    add("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    add("--max-batch", type=int, default=64, help="largest batch, both sides (default 64)")
    add("--max-wait-ms", type=float, help="ours: AIAAS_CLASSIC_MAX_WAIT_MS (the server's)")
    add("--bentoml-max-latency-ms", type=int, default=1000, help="BentoML's deadline (1000)")
    add("--samples", type=int, default=2000, help="training rows (default 2000)")
    add("--features", type=int, default=32, help="default 32")
    add("--classes", type=int, default=4, help="default 4")
    add("--epochs", type=int, default=3, help="default 3")
    add("--seed", type=int, default=0, help="default 0")
    add("--onnx", type=Path, help="serve this file on the peer instead of training on ours")
    add("--startup-timeout", type=float, default=120.0, help="seconds to turn healthy")
    add("--train-timeout", type=float, default=600.0, help="seconds for the training job")
    add("--request-timeout", type=float, default=30.0, help="read timeout per request")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(args.systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.onnx is not None and "ours" in args.systems:
        parser.error("--onnx skips ours' training; pass --systems bentoml with it")
    if not 1 <= args.rows_per_request <= DISTINCT_ROWS:
        parser.error(f"--rows-per-request must be in 1..{DISTINCT_ROWS}")
    if args.onnx is not None and not args.onnx.is_file():
        parser.error(f"--onnx {args.onnx}: no such file")
    if args.quick:
        args.warmup, args.seconds = 1.0, 5.0
    return args


if __name__ == "__main__":
    sys.exit(main())
