"""Batch API throughput and its cost to interactive latency (issue 31), in one run.

On the bundled chat model `smollm2-135m-instruct`, ours at its defaults (as `make run` starts it:
16 slots, 16384 KV cells, threads = cores, one headroom slot, `AIAAS_BATCH_CONCURRENCY` 32; only
the data dir, the port and `AIAAS_MODELS` are set) and llama-server on the same GGUF, as
`bench/llm.py` runs it (`-np 16 -c 16384 -t/-tb <cores> --kv-unified`, its prompt cache on, as
by default). Each run measures:

1. **batch**: `--lines` (256) chat requests that share one ~170-token system prompt (distinct
   short user questions, temperature 0, `--max-tokens` 64) go through `/v1/batches` with the
   official `openai` client: upload (purpose `batch`), create, poll retrieve until completed.
   Completion tokens/s = the completion tokens of the output file / wall time from create to
   seen completed.
2. **ours, 16 clients**: the same requests from `--clients` (16) concurrent clients to ours'
   `/v1/chat/completions`, non-streamed (the work a batch line does); each client takes the next
   request when its answer is in. Tokens/s = completion tokens / wall time.
3. **llama-server, 16 clients**: the same, to llama-server's `/v1/chat/completions`.
4. **TTFT**: `--probes` (20) streamed chat requests, one at a time with a random 0.5-1 s pause
   between them, to the idle server: TTFT p50; then the same while a batch of `--probe-batch-lines`
   (512) lines runs (the probes start `--probe-warmup` s after it turned in_progress; it is
   cancelled after the last probe): TTFT p50, and the ratio.

The phases 1-3 send the same questions; each phase's user messages start with a ticket number of
their own (same length), so no prompt cache answers a whole prompt that an earlier phase or run
sent, and what a phase may reuse is the shared system prompt. Both servers are started once and
stay up; the phases run one at a time (1-3 in turns: odd runs batch first, even runs
llama-server first), so only one system works at a time. Around each of ours' phases the bench
reads ours' `/metrics` (admin key): decode steps, tokens, headroom admissions and cut steps, and
busy slots and queue sampled every second. Steps per token do not depend on how busy the machine
is, so they compare the batch with the clients where tok/s cannot.

    .venv/bin/python bench/batch.py --runs 1
    .venv/bin/python bench/batch.py --runs 3 --json bench/.cache/batch.json
    .venv/bin/python bench/batch.py --runs 1 --no-llama-server --no-ttft \
        --ours-env AIAAS_BATCH_CONCURRENCY=64                  # an A/B of ours' batch runner

Markdown tables go to stdout, progress to stderr. The exit status is 1 if setup failed or a
phase failed outright (errors in single requests are counted and reported instead).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from cold_start import _env_pair, _model_file, _read_through, _server_defaults
from cpu import ForeignCpu
from llm import _machine, _positive_float, _positive_int
from llm_systems import BenchSetup, LlamaServer, Ours, SetupError
from loadgen import client_limits, stream_request
from metrics import percentile
from peers import BENCH_DIR, CACHE_DIR, ProvisionError
from server import ServerError, ServerProcess, free_port

log = logging.getLogger("bench")

MODEL = "smollm2-135m-instruct"
CHAT_PATH = "/v1/chat/completions"
MIB = 1 << 20
_NOISY_CPU_PCT = 5.0
_POLL_S = 0.25  # batch retrieve interval: the wall time's resolution
_SETTLE_S = 1.0  # between phases: the last one's OpenMP threads stop spinning
_TERMINAL = {"completed", "failed", "expired", "cancelled"}
GOALS = {"batch_vs_ours": 1.0, "batch_vs_llama": 1.3, "ttft_ratio": 1.2}

# One app's system prompt: 178 prompt tokens with smollm2's chat template and a short question.
SYSTEM_PROMPT = (
    "You are Atlas, the help assistant of Northwind Learning, an online school for adults. "
    "Answer the learner's question in plain English, in two or three short sentences, as a "
    "friendly teacher would. Be accurate; if you are not sure of a fact, say so instead of "
    "guessing. Do not use lists, headings, tables or code unless the learner asks for them. "
    "Never ask for personal details such as an email address, a phone number or a payment card, "
    "and never give medical, legal or financial advice beyond general education: suggest a "
    "qualified professional instead. Keep a calm and encouraging tone, avoid jargon, and explain "
    "any technical word you must use. If the question is unclear, answer its most likely meaning. "
    "Courses run from September to June; support is open on weekdays from nine to five."
)
_TOPICS = (
    "photosynthesis", "the water cycle", "compound interest", "a solar eclipse",
    "the French Revolution", "machine learning", "a black hole", "inflation",
    "the immune system", "plate tectonics", "the internet", "a rainbow", "vaccines",
    "democracy", "gravity", "the stock market", "climate change", "DNA", "a volcano",
    "the Roman Empire", "electricity", "a hurricane", "the phases of the moon", "recycling",
    "bitcoin", "the human heart", "jazz music", "the Olympic Games", "a password manager",
    "coffee", "the printing press", "sleep",
)  # fmt: skip
_TEMPLATES = (
    "What is {}?",
    "Explain {} to a ten-year-old.",
    "Give me one fun fact about {}.",
    "Why does {} matter?",
    "Summarise {} in one sentence.",
    "What is a common misconception about {}?",
    "How would you describe {} to a beginner?",
    "Name two key ideas behind {}.",
    "Tell me briefly about the history of {}.",
    "How does {} affect everyday life?",
    "What should I ask an expert about {}?",
    "Share a short tip related to {}.",
    "What are the pros and cons of {}?",
    "Compare {} with something familiar.",
    "What should a student learn first about {}?",
    "Is {} still important today?",
)


def questions(seed: int = 0) -> list[str]:
    """The 512 distinct user questions (template x topic), in a fixed shuffled order."""
    pairs = [t.format(topic) for t in _TEMPLATES for topic in _TOPICS]
    random.Random(seed).shuffle(pairs)  # noqa: S311 - a fixed order, not a secret
    return pairs


QUESTIONS = questions()


def chat_body(model: str, question: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
        "max_tokens": max_tokens,
    }


def request_set(model: str, lines: int, max_tokens: int, tag: str) -> list[dict[str, Any]]:
    """The bodies of one measurement: `lines` questions (cycling the 512 when more are asked),
    each led by a ticket number made of `tag` (one per phase and run) and its index. The tag
    keeps every phase's prompts apart, so no prompt cache (ours' finished sequences,
    llama-server's slots and `--cache-ram`) answers a whole prompt from an earlier phase or
    run: what any phase may reuse is the shared system prompt. Every phase's prompts have the
    same length."""
    return [
        chat_body(model, f"(ticket {tag}-{i:04d}) {QUESTIONS[i % len(QUESTIONS)]}", max_tokens)
        for i in range(lines)
    ]


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Throughput:
    """One throughput phase: a batch or a closed loop of clients over the same requests."""

    name: str
    wall_s: float
    requests: int
    errors: int
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    finish_reasons: dict[str, int]
    foreign_cpu_pct: float | None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ok(self) -> int:
        return self.requests - self.errors


@dataclass(frozen=True, slots=True)
class Probes:
    """Streamed single requests, one at a time: their times to first token."""

    name: str
    ttfts_s: list[float]
    errors: int
    foreign_cpu_pct: float | None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def p50(self) -> float | None:
        return percentile(self.ttfts_s, 50)

    @property
    def p95(self) -> float | None:
        return percentile(self.ttfts_s, 95)


@dataclass(slots=True)
class RunResult:
    run: int
    batch: Throughput | None = None
    ours_clients: Throughput | None = None
    llama_clients: Throughput | None = None
    ttft_idle: Probes | None = None
    ttft_batch: Probes | None = None

    def ratios(self) -> dict[str, float | None]:
        return _ratios(
            self.batch.tok_s if self.batch else None,
            self.ours_clients.tok_s if self.ours_clients else None,
            self.llama_clients.tok_s if self.llama_clients else None,
            self.ttft_idle.p50 if self.ttft_idle else None,
            self.ttft_batch.p50 if self.ttft_batch else None,
        )


def _ratios(
    batch: float | None,
    ours: float | None,
    llama: float | None,
    idle: float | None,
    loaded: float | None,
) -> dict[str, float | None]:
    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "batch_vs_ours": div(batch, ours),
        "batch_vs_llama": div(batch, llama),
        "ttft_ratio": div(loaded, idle),
    }


@dataclass(frozen=True, slots=True)
class Settings:
    lines: int
    max_tokens: int
    clients: int
    probes: int
    probe_max_tokens: int
    probe_batch_lines: int
    probe_warmup_s: float
    request_timeout_s: float
    batch_timeout_s: float
    startup_timeout_s: float
    slots: int
    kv_cells: int
    threads: int
    ours_env: tuple[tuple[str, str], ...]
    llama_server: bool
    ttft: bool


_Phase = TypeVar("_Phase", Throughput, Probes)


# -- ours' engine, seen through /metrics ----------------------------------------------------------

_ENGINE_COUNTERS = {
    "steps": "aiaas_llm_decode_steps",
    "generated_tokens": "aiaas_llm_generated_tokens",
    "headroom_admissions": "aiaas_llm_headroom_admissions",
    "preempted_steps": "aiaas_llm_preempted_steps",
    "cached_prompt_tokens": "aiaas_llm_cached_prompt_tokens",
}
_ENGINE_GAUGES = {"busy_slots": "aiaas_llm_slots_busy", "queue": "aiaas_llm_queue_depth"}


class EngineWatch:
    """Ours' engine counters over a phase (decode steps, tokens, headroom admissions, cut
    steps) and its busy slots and queue, sampled every `every_s` from `/metrics` (admin key)."""

    def __init__(self, target: OursTarget, every_s: float = 1.0) -> None:
        self._client = httpx.Client(
            base_url=target.base_url,
            headers={"Authorization": f"Bearer {target.admin_key}"},
            timeout=30.0,
            trust_env=False,
        )
        self._model = target.model
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="engine-watch", daemon=True)
        self._start: dict[str, float] = {}
        self._end: dict[str, float] = {}
        self._samples: list[dict[str, float]] = []

    def __enter__(self) -> EngineWatch:
        self._start = self._scrape()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60.0)
        with contextlib.suppress(httpx.HTTPError):
            self._end = self._scrape()
        self._client.close()

    def summary(self) -> dict[str, float | None]:
        if not self._start or not self._end:
            return {}
        delta = {k: self._end.get(k, 0.0) - self._start.get(k, 0.0) for k in _ENGINE_COUNTERS}
        out: dict[str, float | None] = dict(delta)
        out["tokens_per_step"] = (
            delta["generated_tokens"] / delta["steps"] if delta["steps"] else None
        )
        for key in _ENGINE_GAUGES:
            values = [sample[key] for sample in self._samples if key in sample]
            out[f"mean_{key}"] = statistics.fmean(values) if values else None
        out["samples"] = len(self._samples)
        return out

    def _sample(self) -> None:
        while not self._stop.wait(self._every_s):
            with contextlib.suppress(httpx.HTTPError):
                self._samples.append(self._scrape())

    def _scrape(self) -> dict[str, float]:
        response = self._client.get("/metrics")
        response.raise_for_status()
        wanted = {f"{v}_total": k for k, v in _ENGINE_COUNTERS.items()}
        wanted |= {v: k for k, v in _ENGINE_GAUGES.items()}
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                key = wanted.get(sample.name)
                if key is not None and sample.labels.get("model") == self._model:
                    values[key] = float(sample.value)
        return values


# -- ours: the batch ----------------------------------------------------------------------------


@dataclass
class OursTarget:
    pid: int
    base_url: str
    api_key: str
    admin_key: str
    model: str = MODEL
    _client: openai.OpenAI | None = None

    def sdk(self, timeout_s: float) -> openai.OpenAI:
        if self._client is None:
            self._client = openai.OpenAI(
                base_url=self.base_url + "/v1",
                api_key=self.api_key,
                timeout=timeout_s,
                max_retries=2,
                http_client=httpx.Client(trust_env=False, timeout=timeout_s),
            )
        return self._client

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def _batch_file(bodies: Sequence[dict[str, Any]], tag: str) -> bytes:
    lines = (
        json.dumps(
            {"custom_id": f"{tag}-{i}", "method": "POST", "url": CHAT_PATH, "body": body},
            separators=(",", ":"),
        )
        for i, body in enumerate(bodies)
    )
    return ("\n".join(lines) + "\n").encode()


def _submit(client: openai.OpenAI, bodies: Sequence[dict[str, Any]], tag: str) -> tuple[str, float]:
    """Upload the file and create the batch: (batch id, perf_counter just before create)."""
    upload = client.files.create(file=(f"{tag}.jsonl", _batch_file(bodies, tag)), purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint=CHAT_PATH,
        completion_window="24h",
        metadata={"bench": tag},
    )
    return batch.id, started


def _wait(
    client: openai.OpenAI,
    batch_id: str,
    *,
    until: Callable[[Any], bool],
    timeout_s: float,
) -> Any:
    """Poll retrieve every `_POLL_S` until `until(batch)` or a terminal status (or raise)."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch) or batch.status in _TERMINAL:
            return batch
        if time.monotonic() >= deadline:
            raise SetupError(f"batch {batch_id} still {batch.status} after {timeout_s:.0f} s")
        time.sleep(_POLL_S)


def _cancel_quietly(client: openai.OpenAI, batch_id: str, timeout_s: float = 120.0) -> None:
    """Cancel a batch and wait for it to end; never raises (cleanup)."""
    try:
        batch = client.batches.retrieve(batch_id)
        if batch.status not in _TERMINAL:
            client.batches.cancel(batch_id)
            _wait(client, batch_id, until=lambda b: False, timeout_s=timeout_s)
    except (openai.OpenAIError, SetupError) as exc:
        log.warning("could not cancel batch %s: %s", batch_id, exc)


def run_batch(target: OursTarget, settings: Settings, run: int) -> Throughput:
    client = target.sdk(settings.request_timeout_s)
    bodies = request_set(target.model, settings.lines, settings.max_tokens, f"{run}b")
    batch_id: str | None = None
    try:
        with ForeignCpu(target.pid) as foreign:
            batch_id, started = _submit(client, bodies, f"run{run}")
            first = _wait(
                client,
                batch_id,
                until=lambda b: b.status == "completed",
                timeout_s=settings.batch_timeout_s,
            )
            wall = time.perf_counter() - started
        if first.status != "completed":
            raise SetupError(f"batch {batch_id} ended {first.status}: {first.errors}")
        done = first
        batch_id = None  # over: nothing to cancel
    finally:
        if batch_id is not None:
            _cancel_quietly(client, batch_id)
    usage = Counter[str]()
    reasons = Counter[str]()
    answered = 0
    if done.output_file_id:
        for raw in client.files.content(done.output_file_id).text.splitlines():
            if not raw.strip():
                continue
            record = json.loads(raw)
            body = (record.get("response") or {}).get("body") or {}
            _add_usage(usage, body)
            reasons[_finish_reason(body)] += 1
            answered += 1
    refused = 0
    if done.error_file_id:
        error_text = client.files.content(done.error_file_id).text
        refused = sum(1 for raw in error_text.splitlines() if raw.strip())
        log.warning(
            "batch %s: %d lines in the error file, e.g. %s", done.id, refused, error_text[:300]
        )
    server_wall = (
        done.completed_at - done.created_at
        if done.completed_at is not None and done.created_at is not None
        else None
    )
    result = Throughput(
        name="batch",
        wall_s=wall,
        requests=len(bodies),
        errors=len(bodies) - answered,
        completion_tokens=usage["completion"],
        prompt_tokens=usage["prompt"],
        cached_tokens=usage["cached"],
        finish_reasons=dict(reasons),
        foreign_cpu_pct=foreign.percent,
        detail={
            "batch_id": done.id,
            "server_wall_s_whole_seconds": server_wall,
            "in_progress_at": done.in_progress_at,
            "finalizing_at": done.finalizing_at,
            "completed_at": done.completed_at,
            "request_counts": done.request_counts.model_dump() if done.request_counts else None,
            "error_file_lines": refused,
        },
    )
    _log_throughput(run, "ours batch", result)
    return result


def _add_usage(usage: Counter[str], body: dict[str, Any]) -> None:
    u = body.get("usage") or {}
    usage["completion"] += int(u.get("completion_tokens") or 0)
    usage["prompt"] += int(u.get("prompt_tokens") or 0)
    details = u.get("prompt_tokens_details") or {}
    usage["cached"] += int(details.get("cached_tokens") or 0)


def _finish_reason(body: dict[str, Any]) -> str:
    choices = body.get("choices") or [{}]
    return str(choices[0].get("finish_reason") or "-")


# -- clients: the same requests, non-streamed ---------------------------------------------------


async def run_clients(
    name: str,
    base_url: str,
    headers: dict[str, str],
    model: str,
    pid: int,
    settings: Settings,
    run: int,
    tag: str,
) -> Throughput:
    bodies = request_set(model, settings.lines, settings.max_tokens, tag)
    queue: Iterator[int] = iter(range(len(bodies)))
    usage = Counter[str]()
    reasons = Counter[str]()
    errors: list[str] = []
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)

    async def one_client(client: httpx.AsyncClient) -> None:
        for index in queue:  # shared: each client takes the next request
            try:
                response = await client.post(CHAT_PATH, json=bodies[index])
                if response.status_code != httpx.codes.OK:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    continue
                body = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            _add_usage(usage, body)
            reasons[_finish_reason(body)] += 1

    async with httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=timeout,
        limits=client_limits(settings.clients),
        trust_env=False,
    ) as client:
        with ForeignCpu(pid) as foreign:
            started = time.perf_counter()
            await asyncio.gather(*(one_client(client) for _ in range(settings.clients)))
            wall = time.perf_counter() - started
    if errors:
        log.warning("%s: %d failed requests, e.g. %s", name, len(errors), errors[0])
    result = Throughput(
        name=name,
        wall_s=wall,
        requests=len(bodies),
        errors=len(errors),
        completion_tokens=usage["completion"],
        prompt_tokens=usage["prompt"],
        cached_tokens=usage["cached"],
        finish_reasons=dict(reasons),
        foreign_cpu_pct=foreign.percent,
    )
    _log_throughput(run, name, result)
    return result


def _log_throughput(run: int, name: str, result: Throughput) -> None:
    log.info(
        "run %d, %s: %d completion tokens in %.1f s = %.1f tok/s (%d errors, other CPU %s%%)",
        *(run, name, result.completion_tokens, result.wall_s, result.tok_s, result.errors),
        _pct(result.foreign_cpu_pct),
    )
    if (result.foreign_cpu_pct or 0.0) > _NOISY_CPU_PCT:
        log.warning("run %d, %s: other programs used the CPU; timings are unreliable", run, name)


# -- TTFT probes --------------------------------------------------------------------------------


async def _probe_series(
    target: OursTarget, settings: Settings, tag: str, rng: random.Random
) -> tuple[list[float], list[str]]:
    """`settings.probes` streamed chat requests, one at a time, a random 0.5-1 s apart."""
    ttfts: list[float] = []
    errors: list[str] = []
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(
        base_url=target.base_url, headers=target.headers, timeout=timeout, trust_env=False
    ) as client:
        for k in range(settings.probes):
            await asyncio.sleep(rng.uniform(0.5, 1.0))
            question = QUESTIONS[(k * 37 + 11) % len(QUESTIONS)]
            body = chat_body(target.model, f"({tag}.{k}) {question}", settings.probe_max_tokens)
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            record = await stream_request(client, CHAT_PATH, body, origin=time.perf_counter())
            if record.error is not None or record.ttft is None:
                errors.append(record.error or "no content token")
            else:
                ttfts.append(record.ttft)
    return ttfts, errors


def run_probes_idle(target: OursTarget, settings: Settings, run: int) -> Probes:
    rng = random.Random(run)  # noqa: S311 - the pauses between probes
    with ForeignCpu(target.pid) as foreign:
        ttfts, errors = asyncio.run(_probe_series(target, settings, f"idle{run}", rng))
    result = Probes("ttft idle", ttfts, len(errors), foreign.percent)
    _log_probes(run, result, errors)
    return result


def run_probes_with_batch(target: OursTarget, settings: Settings, run: int) -> Probes:
    client = target.sdk(settings.request_timeout_s)
    bodies = request_set(target.model, settings.probe_batch_lines, settings.max_tokens, f"{run}p")
    rng = random.Random(run)  # noqa: S311 - the pauses between probes
    batch_id: str | None = None
    try:
        batch_id, _ = _submit(client, bodies, f"probe{run}")
        started = _wait(client, batch_id, until=lambda b: b.status != "validating", timeout_s=120.0)
        if started.status != "in_progress":
            raise SetupError(f"the probe batch ended {started.status} before the probes")
        time.sleep(settings.probe_warmup_s)
        before = client.batches.retrieve(batch_id)
        with ForeignCpu(target.pid) as foreign:
            t0 = time.perf_counter()
            ttfts, errors = asyncio.run(_probe_series(target, settings, f"loaded{run}", rng))
            window = time.perf_counter() - t0
        after = client.batches.retrieve(batch_id)
    finally:
        if batch_id is not None:
            _cancel_quietly(client, batch_id)
    ran_throughout = after.status == "in_progress"
    if not ran_throughout:
        log.warning(
            "run %d: the probe batch was %s before the last probe; raise --probe-batch-lines",
            *(run, after.status),
        )
    result = Probes(
        "ttft with batch",
        ttfts,
        len(errors),
        foreign.percent,
        detail={
            "batch_id": batch_id,
            "batch_ran_throughout": ran_throughout,
            "window_s": window,
            # Counters move when parts are written (every 64 lines or 2 s), so these lag.
            "lines_done_before": before.request_counts.completed if before.request_counts else None,
            "lines_done_after": after.request_counts.completed if after.request_counts else None,
            "output_tokens_before": before.usage.output_tokens if before.usage else None,
            "output_tokens_after": after.usage.output_tokens if after.usage else None,
        },
    )
    _log_probes(run, result, errors)
    return result


def _log_probes(run: int, result: Probes, errors: list[str]) -> None:
    log.info(
        "run %d, %s: TTFT p50 %s ms, p95 %s ms over %d (%d errors, other CPU %s%%)",
        *(run, result.name, _ms(result.p50), _ms(result.p95), len(result.ttfts_s)),
        *(result.errors, _pct(result.foreign_cpu_pct)),
    )
    if errors:
        log.warning("run %d, %s: e.g. %s", run, result.name, errors[0])


# -- the run --------------------------------------------------------------------------------------


def _warm_up(target: OursTarget, settings: Settings) -> None:
    """Load the model (ours loads LLMs on demand) and check the batch path end to end."""
    with httpx.Client(
        base_url=target.base_url,
        headers=target.headers,
        timeout=settings.request_timeout_s,
        trust_env=False,
    ) as http:
        response = http.post(CHAT_PATH, json=chat_body(target.model, "Hello!", 8))
        if response.status_code != httpx.codes.OK:
            raise SetupError(f"ours: warm-up answered {response.status_code}: {response.text}")
        log.info("ours: warm-up usage %s", response.json().get("usage"))
    client = target.sdk(settings.request_timeout_s)
    bodies = [chat_body(target.model, q, 8) for q in QUESTIONS[:2]]
    batch_id, _ = _submit(client, bodies, "warm-up")
    try:
        done = _wait(client, batch_id, until=lambda b: False, timeout_s=300.0)
    finally:
        _cancel_quietly(client, batch_id)
    if done.status != "completed" or not done.output_file_id:
        raise SetupError(f"ours: the warm-up batch ended {done.status}: {done.errors}")


def _warm_up_peer(base_url: str, model: str, settings: Settings) -> None:
    with httpx.Client(base_url=base_url, timeout=settings.request_timeout_s, trust_env=False) as c:
        response = c.post(CHAT_PATH, json=chat_body(model, "Hello!", 8))
        if response.status_code != httpx.codes.OK:
            raise SetupError(f"llama-server: warm-up answered {response.status_code}")
        log.info("llama-server: warm-up usage %s", response.json().get("usage"))


def measure(
    settings: Settings, runs: int, llama_sdist: Path | None, work_dir: Path
) -> tuple[list[RunResult], dict[str, str]]:
    model_path = _model_file(MODEL)
    setup = BenchSetup(
        repo=BENCH_DIR.parent,
        model_path=model_path,
        threads=settings.threads,
        slots=settings.slots,
        work_dir=work_dir,
        llama_sdist=llama_sdist,
    )
    info: dict[str, str] = {
        "model_file": f"{model_path.name} ({model_path.stat().st_size / MIB:.1f} MiB)"
    }
    peer = LlamaServer(setup)
    if settings.llama_server:
        log.info("llama-server: preparing (the first run builds it: 4 to 8 min on 2 cores)")
        info["llama_server"] = peer.prepare()
    ours = Ours(
        setup,
        env={
            "AIAAS_MODELS": MODEL,
            "AIAAS_LLM_KV_CELLS": str(settings.kv_cells),
            "HF_HUB_OFFLINE": "1",
            **dict(settings.ours_env),
        },
    )
    info["ours"] = ours.prepare()
    _read_through(model_path)
    results: list[RunResult] = []
    with contextlib.ExitStack() as stack:
        port = free_port()
        launch = ours.launch(port)
        base_url = f"http://127.0.0.1:{port}"
        log_path = CACHE_DIR / "logs" / "batch-ours.log"
        log.info("ours: starting (log: %s)", log_path)
        # cwd: from bench/, our `llm.py` would shadow the `llm` package smollm2's package imports.
        server = stack.enter_context(
            ServerProcess("ours", launch.argv, env=launch.env, log_path=log_path, cwd=work_dir)
        )
        server.wait_healthy(base_url + launch.health_path, timeout_s=settings.startup_timeout_s)
        with httpx.Client(base_url=base_url, timeout=30.0, trust_env=False) as client:
            connection = ours.connect(client)
        api_key = connection.headers["Authorization"].removeprefix("Bearer ")
        # `Ours` keeps its data dir at work_dir/ours-data; the server wrote the key there.
        admin_key = (work_dir / "ours-data" / "admin-key").read_text().strip()
        target = OursTarget(pid=server.pid, base_url=base_url, api_key=api_key, admin_key=admin_key)
        stack.callback(lambda: target._client.close() if target._client else None)
        _warm_up(target, settings)

        peer_server: ServerProcess | None = None
        peer_url = peer_model = ""
        if settings.llama_server:
            peer_port = free_port()
            peer_launch = peer.launch(peer_port)
            info["llama_server_argv"] = shlex.join(_peer_flags(peer_launch.argv))
            peer_url = f"http://127.0.0.1:{peer_port}"
            peer_log = CACHE_DIR / "logs" / "batch-llama-server.log"
            log.info("llama-server: starting (log: %s)", peer_log)
            peer_server = stack.enter_context(
                ServerProcess(
                    "llama-server", peer_launch.argv, env=peer_launch.env, log_path=peer_log
                )
            )
            peer_server.wait_healthy(
                peer_url + peer_launch.health_path, timeout_s=settings.startup_timeout_s
            )
            with httpx.Client(base_url=peer_url, timeout=30.0, trust_env=False) as client:
                peer_model = peer.connect(client).model
            _warm_up_peer(peer_url, peer_model, settings)

        for run in range(1, runs + 1):
            result = RunResult(run=run)

            def batch(result: RunResult = result, run: int = run) -> None:
                with EngineWatch(target) as watch:
                    done = run_batch(target, settings, run)
                result.batch = _with_engine(done, watch)

            def ours_clients(result: RunResult = result, run: int = run) -> None:
                with EngineWatch(target) as watch:
                    done = asyncio.run(
                        run_clients(
                            f"ours, {settings.clients} clients",
                            target.base_url,
                            target.headers,
                            target.model,
                            target.pid,
                            settings,
                            run,
                            f"{run}o",
                        )
                    )
                result.ours_clients = _with_engine(done, watch)

            def llama_clients(result: RunResult = result, run: int = run) -> None:
                if peer_server is None:
                    return
                result.llama_clients = asyncio.run(
                    run_clients(
                        f"llama-server, {settings.clients} clients",
                        peer_url,
                        {},
                        peer_model,
                        peer_server.pid,
                        settings,
                        run,
                        f"{run}l",
                    )
                )

            phases = [batch, ours_clients, llama_clients]
            if run % 2 == 0:
                phases.reverse()
            for phase in phases:
                time.sleep(_SETTLE_S)
                phase()
            if settings.ttft:
                time.sleep(_SETTLE_S)
                with EngineWatch(target) as watch:
                    idle = run_probes_idle(target, settings, run)
                result.ttft_idle = _with_engine(idle, watch)
                time.sleep(_SETTLE_S)
                with EngineWatch(target) as watch:
                    loaded = run_probes_with_batch(target, settings, run)
                result.ttft_batch = _with_engine(loaded, watch)
            results.append(result)
            log.info("run %d: ratios %s", run, _fmt_ratios(result.ratios()))
    return results, info


def _with_engine(phase: _Phase, watch: EngineWatch) -> _Phase:
    return replace(phase, detail=phase.detail | {"engine": watch.summary()})


# -- report ---------------------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def medians(results: Sequence[RunResult]) -> dict[str, float | None]:
    def tok_s(pick: Callable[[RunResult], Throughput | None]) -> float | None:
        return _median([t.tok_s if (t := pick(r)) is not None else None for r in results])

    def p50(pick: Callable[[RunResult], Probes | None]) -> float | None:
        return _median([p.p50 if (p := pick(r)) is not None else None for r in results])

    m = {
        "batch_tok_s": tok_s(lambda r: r.batch),
        "ours_clients_tok_s": tok_s(lambda r: r.ours_clients),
        "llama_clients_tok_s": tok_s(lambda r: r.llama_clients),
        "ttft_idle_p50_s": p50(lambda r: r.ttft_idle),
        "ttft_batch_p50_s": p50(lambda r: r.ttft_batch),
    }
    ratios = _ratios(
        m["batch_tok_s"],
        m["ours_clients_tok_s"],
        m["llama_clients_tok_s"],
        m["ttft_idle_p50_s"],
        m["ttft_batch_p50_s"],
    )
    # Also the median of the per-run ratios (each run's systems shared that run's load).
    per_run = {k: _median([r.ratios()[k] for r in results]) for k in ratios}
    return (
        m
        | {f"ratio_{k}": v for k, v in ratios.items()}
        | {f"median_run_ratio_{k}": v for k, v in per_run.items()}
    )


def render(
    results: Sequence[RunResult],
    settings: Settings,
    info: dict[str, str],
    command: str,
    machine: str,
) -> str:
    s = settings
    env = "".join(f" {k}={v}" for k, v in s.ours_env)
    lines = [
        f"## Batch API (issue 31): `{MODEL}`",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}",
        f"- model file: {info['model_file']}",
        f"- requests: {s.lines} chat requests, one shared system prompt (~170 tokens), distinct "
        f"short user questions, temperature 0, max_tokens {s.max_tokens}; the batch and the "
        f"{s.clients} clients (non-streamed `{CHAT_PATH}`, each client takes the next request) "
        "send the same bodies, each phase's user messages led by a ticket number of its own "
        "(so only the system prompt is in any prompt cache from before)",
        f"- ours: {info['ours']}, defaults (`AIAAS_LLM_SLOTS={s.slots}`, "
        f"`AIAAS_LLM_KV_CELLS={s.kv_cells}`, `AIAAS_LLM_THREADS={s.threads}`, "
        f"`AIAAS_MODELS={MODEL}`{env}); both servers started once, phases one at a time",
    ]
    if "llama_server" in info:
        lines.append(
            f"- llama-server: {info['llama_server']}, `{info.get('llama_server_argv', '')}` "
            "(prompt cache on: `cache_prompt` defaults to true)"
        )
    lines += [
        f"- TTFT: {s.probes} streamed chat requests (max_tokens {s.probe_max_tokens}, the same "
        "system prompt, a unique question), one at a time, 0.5-1 s apart; idle, then while a "
        f"batch of {s.probe_batch_lines} lines runs (from {s.probe_warmup_s:g} s after it "
        "turned in_progress; cancelled after the last probe)",
        "",
        "### Runs",
        "",
        "| run | batch tok/s | ours clients tok/s | llama-server clients tok/s "
        "| batch / ours | batch / llama | TTFT p50 idle ms | TTFT p50 with batch ms | ratio "
        "| other CPU % (batch / ours / llama / idle / with batch) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratios = r.ratios()
        cpu = " / ".join(
            _pct(x.foreign_cpu_pct if x else None)
            for x in (r.batch, r.ours_clients, r.llama_clients, r.ttft_idle, r.ttft_batch)
        )
        lines.append(
            f"| {r.run} | {_tok(r.batch)} | {_tok(r.ours_clients)} | {_tok(r.llama_clients)} "
            f"| {_x(ratios['batch_vs_ours'])} | {_x(ratios['batch_vs_llama'])} "
            f"| {_ms(r.ttft_idle.p50 if r.ttft_idle else None)} "
            f"| {_ms(r.ttft_batch.p50 if r.ttft_batch else None)} | {_x(ratios['ttft_ratio'])} "
            f"| {cpu} |"
        )
    lines += [
        "",
        "### Phases",
        "",
        "| run | phase | wall s | ok / requests | completion tokens | tok/req | prompt tok/req "
        "| cached tok/req | finish reasons |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for t in (r.batch, r.ours_clients, r.llama_clients):
            if t is None:
                continue
            ok = max(t.ok, 1)
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(t.finish_reasons.items()))
            lines.append(
                f"| {r.run} | {t.name} | {t.wall_s:.1f} | {t.ok} / {t.requests} "
                f"| {t.completion_tokens} | {t.completion_tokens / ok:.1f} "
                f"| {t.prompt_tokens / ok:.1f} | {t.cached_tokens / ok:.1f} | {reasons} |"
            )
    lines += [
        "",
        "| run | probes | TTFT p50 ms | p95 ms | min ms | max ms | errors | batch during probes |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for p in (r.ttft_idle, r.ttft_batch):
            if p is None:
                continue
            during = "-"
            if "window_s" in p.detail:
                d = p.detail
                during = (
                    f"{'ran throughout' if d['batch_ran_throughout'] else 'ENDED EARLY'}; "
                    f"lines done {d['lines_done_before']} → {d['lines_done_after']} "
                    f"in {d['window_s']:.0f} s"
                )
            lo = min(p.ttfts_s) if p.ttfts_s else None
            hi = max(p.ttfts_s) if p.ttfts_s else None
            lines.append(
                f"| {r.run} | {p.name} | {_ms(p.p50)} | {_ms(p.p95)} | {_ms(lo)} | {_ms(hi)} "
                f"| {p.errors} | {during} |"
            )
    lines += [
        "",
        "Ours' engine in each of its phases (`/metrics` before and after, busy slots and queue "
        "sampled every second):",
        "",
        "| run | phase | decode steps | tokens / step | mean busy slots | mean queue "
        "| headroom admissions | steps cut | cached prompt tokens |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for x in (r.batch, r.ours_clients, r.ttft_idle, r.ttft_batch):
            e = x.detail.get("engine") if x is not None else None
            if not e or x is None:
                continue
            lines.append(
                f"| {r.run} | {x.name} | {e['steps']:.0f} | {_f(e['tokens_per_step'], 2)} "
                f"| {_f(e['mean_busy_slots'])} | {_f(e['mean_queue'])} "
                f"| {e['headroom_admissions']:.0f} | {e['preempted_steps']:.0f} "
                f"| {e['cached_prompt_tokens']:.0f} |"
            )
    m = medians(results)
    lines += [
        "",
        f"### Medians of {len(results)} run(s)",
        "",
        "| | value | goal | |",
        "|---|---:|---:|---|",
        f"| batch tok/s | {_f(m['batch_tok_s'])} | | |",
        f"| ours, {s.clients} clients tok/s | {_f(m['ours_clients_tok_s'])} | | |",
        f"| llama-server, {s.clients} clients tok/s | {_f(m['llama_clients_tok_s'])} | | |",
        f"| TTFT p50 idle ms | {_ms(m['ttft_idle_p50_s'])} | | |",
        f"| TTFT p50 with a batch running ms | {_ms(m['ttft_batch_p50_s'])} | | |",
        _goal_row("batch / ours clients", m["ratio_batch_vs_ours"], "batch_vs_ours", ">="),
        _goal_row(
            "batch / llama-server clients", m["ratio_batch_vs_llama"], "batch_vs_llama", ">="
        ),
        _goal_row("TTFT with batch / idle", m["ratio_ttft_ratio"], "ttft_ratio", "<="),
        "",
        "Ratios of the medians; medians of the per-run ratios: "
        + ", ".join(
            f"{k} {_x(m[f'median_run_ratio_{k}'])}"
            for k in ("batch_vs_ours", "batch_vs_llama", "ttft_ratio")
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def _goal_row(label: str, value: float | None, key: str, op: str) -> str:
    goal = GOALS[key]
    if value is None:
        verdict = "-"
    elif (value >= goal) if op == ">=" else (value <= goal):
        verdict = "met"
    else:
        verdict = f"missed by {abs(value - goal) / goal * 100:.0f}%"
    return f"| {label} | {_x(value)} | {op} {goal:g}x | {verdict} |"


def _peer_flags(argv: Sequence[str]) -> list[str]:
    flags, skip = ["llama-server"], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg in ("-m", "--port", "--host"):
            skip = True
        else:
            flags.append(arg)
    return flags


def _fmt_ratios(ratios: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {_x(v)}" for k, v in ratios.items())


def _tok(t: Throughput | None) -> str:
    return "-" if t is None else f"{t.tok_s:.1f}"


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _json(
    results: Sequence[RunResult],
    settings: Settings,
    info: dict[str, str],
    command: str,
    machine: str,
) -> dict[str, Any]:
    def dump(x: Throughput | Probes | None) -> dict[str, Any] | None:
        if x is None:
            return None
        extra = {"tok_s": x.tok_s} if isinstance(x, Throughput) else {"p50": x.p50, "p95": x.p95}
        return asdict(x) | extra

    return {
        "command": command,
        "machine": machine,
        "settings": asdict(settings),
        "info": info,
        "runs": [
            {
                "run": r.run,
                "batch": dump(r.batch),
                "ours_clients": dump(r.ours_clients),
                "llama_clients": dump(r.llama_clients),
                "ttft_idle": dump(r.ttft_idle),
                "ttft_batch": dump(r.ttft_batch),
                "ratios": r.ratios(),
            }
            for r in results
        ],
        "medians": medians(results),
    }


# -- main -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(format="[bench %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    defaults = _server_defaults()
    settings = Settings(
        lines=args.lines,
        max_tokens=args.max_tokens,
        clients=args.clients,
        probes=args.probes,
        probe_max_tokens=args.probe_max_tokens,
        probe_batch_lines=args.probe_batch_lines,
        probe_warmup_s=args.probe_warmup,
        request_timeout_s=args.request_timeout,
        batch_timeout_s=args.batch_timeout,
        startup_timeout_s=args.startup_timeout,
        slots=defaults["slots"],
        kv_cells=defaults["kv_cells"],
        threads=defaults["threads"],
        ours_env=tuple(args.ours_env),
        llama_server=not args.no_llama_server,
        ttft=not args.no_ttft,
    )
    command = shlex.join([sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    machine = _machine()
    # A `kill` (or `timeout`) unwinds like Ctrl-C: the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        with tempfile.TemporaryDirectory(prefix="aiaas-batch-bench-") as work_dir:
            results, info = measure(settings, args.runs, args.llama_sdist, Path(work_dir))
    except (ProvisionError, ServerError, SetupError, httpx.HTTPError, openai.OpenAIError) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    sys.stdout.write(render(results, settings, info, command, machine))
    if args.json is not None:
        args.json.write_text(
            json.dumps(_json(results, settings, info, command, machine), indent=2) + "\n"
        )
        log.info("results written to %s", args.json)
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Batch API throughput vs concurrent clients (ours and llama-server), and "
        "interactive TTFT while a batch runs, on smollm2-135m-instruct."
    )
    add = parser.add_argument
    add("--runs", type=_positive_int, default=3, metavar="N", help="default 3; medians reported")
    add("--lines", type=_positive_int, default=256, metavar="N", help="requests (default 256)")
    add("--max-tokens", type=_positive_int, default=64, metavar="N", help="default 64")
    add("--clients", type=_positive_int, default=16, metavar="N", help="default 16")
    add("--probes", type=_positive_int, default=20, metavar="N", help="TTFT probes (default 20)")
    add("--probe-max-tokens", type=_positive_int, default=16, metavar="N", help="default 16")
    add(
        "--probe-batch-lines",
        type=_positive_int,
        default=512,
        metavar="N",
        help="the batch running under the second probe series (default 512)",
    )
    add(
        "--probe-warmup",
        type=_positive_float,
        default=5.0,
        metavar="S",
        help="seconds between that batch turning in_progress and the first probe (default 5)",
    )
    add(
        "--ours-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for ours (repeatable), e.g. AIAAS_BATCH_CONCURRENCY=64",
    )
    add("--no-llama-server", action="store_true", help="skip llama-server (for A/B runs of ours)")
    add("--no-ttft", action="store_true", help="skip the TTFT probes (throughput only)")
    add("--json", type=Path, metavar="PATH", help="write every run, the medians and ratios here")
    add("--llama-sdist", type=Path, metavar="PATH", help="as in bench/llm.py")
    add("--startup-timeout", type=_positive_float, default=300.0, metavar="S", help="default 300")
    add("--request-timeout", type=_positive_float, default=600.0, metavar="S", help="default 600")
    add(
        "--batch-timeout",
        type=_positive_float,
        default=1800.0,
        metavar="S",
        help="longest wait for a batch to complete (default 1800)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
