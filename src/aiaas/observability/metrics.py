"""Prometheus metrics in a registry the app owns (never prometheus_client's global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from aiaas.engines.llm.params import EngineStats, SizeCounts
from aiaas.engines.llm.residency import ResidentModel
from aiaas.scheduling.batcher import BATCH_SIZE_BUCKETS, BatcherStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "aiaas_http_requests",
            "HTTP requests served, by route template, method, status and organisation.",
            ["method", "route", "status", "org"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "aiaas_http_request_duration_seconds",
            "Time from request start to the end of the response body.",
            ["method", "route", "org"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_in_flight = Gauge(
            "aiaas_http_requests_in_flight",
            "Requests being served now.",
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "aiaas_auth_failures",
            "Requests rejected with 401.",
            registry=self.registry,
        )

        self.inference_requests = Counter(
            "aiaas_inference_requests",
            "Metered requests (chat, completions, embeddings, predictions), by outcome.",
            ["org", "model", "endpoint", "status"],
            registry=self.registry,
        )
        self.inference_latency = Histogram(
            "aiaas_inference_request_duration_seconds",
            "Time from a metered request's admission to the end of its response.",
            ["org", "model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "aiaas_rate_limited",
            "Requests refused with 429 by a rate limit or quota (reason: requests, tokens, quota).",
            ["org", "reason"],
            registry=self.registry,
        )
        self.llm_ttft = Histogram(
            "aiaas_llm_time_to_first_token_seconds",
            "Time from a generation request to its first token.",
            ["model", "org"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.llm_tokens = Counter(
            "aiaas_llm_tokens",
            "Prompt and completion tokens, by model and organisation.",
            ["model", "org", "kind"],
            registry=self.registry,
        )
        self.embedding_tokens = Counter(
            "aiaas_embedding_tokens",
            "Input tokens embedded, by model and organisation.",
            ["model", "org", "kind"],
            registry=self.registry,
        )

        self.llm_residency = _ResidencyEvents(self.registry)

        self.predictions = Counter(
            "aiaas_predictions",
            "Rows predicted by deployed models, by deployment name, version and organisation.",
            ["model", "version", "org", "route"],
            registry=self.registry,
        )

    def watch_llm_residency(
        self, source: Callable[[], Iterable[ResidentModel]], budget_bytes: int
    ) -> None:
        """Export the memory each loaded LLM holds, and the budget they share."""
        self.registry.register(_ResidencyCollector(source, budget_bytes))

    def watch_classic_pool(self, source: Callable[[], tuple[int, int, int]]) -> None:
        """Export the trained-model pool: (models loaded, bytes they hold, evictions so far)."""
        self.registry.register(_PoolCollector(source))

    def watch_engines(self, source: Callable[[], Iterable[tuple[str, EngineStats]]]) -> None:
        """Export engine state (slots, queue, KV) read at scrape time, never cached."""
        self.registry.register(_EngineCollector(source))

    def watch_batchers(self, source: Callable[[], Iterable[tuple[str, BatcherStats]]]) -> None:
        """Export the dynamic batchers (embeddings, trained models): queue and batch sizes."""
        self.registry.register(_BatcherCollector(source))

    def watch_jobs(self, source: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Export jobs per (organisation, state), read from the database at scrape time."""
        self.registry.register(_JobsCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class _EngineFamily:
    """One engine metric (labelled by model): its family, and what it reads from the stats."""

    name: str
    help: str
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily]
    read: Callable[[EngineStats], float]


_ENGINE_FAMILIES = (
    _EngineFamily(
        "aiaas_llm_slots", "Sequence slots of the engine.", GaugeMetricFamily, attrgetter("slots")
    ),
    _EngineFamily(
        "aiaas_llm_slots_busy",
        "Slots holding a request now.",
        GaugeMetricFamily,
        attrgetter("busy_slots"),
    ),
    _EngineFamily(
        "aiaas_llm_queue_depth",
        "Requests waiting for a slot.",
        GaugeMetricFamily,
        attrgetter("waiting"),
    ),
    _EngineFamily(
        "aiaas_llm_kv_reserved_cells",
        "KV cells reserved by running requests.",
        GaugeMetricFamily,
        attrgetter("reserved_cells"),
    ),
    _EngineFamily(
        "aiaas_llm_decode_steps",
        "llama_decode calls made by the engine.",
        CounterMetricFamily,
        attrgetter("steps"),
    ),
    _EngineFamily(
        "aiaas_llm_generated_tokens",
        "Tokens the engine has sampled.",
        CounterMetricFamily,
        attrgetter("generated_tokens"),
    ),
    _EngineFamily(
        "aiaas_llm_headroom_admissions",
        "Requests started in a slot kept free for an organisation with nothing running.",
        CounterMetricFamily,
        attrgetter("headroom_admissions"),
    ),
    _EngineFamily(
        "aiaas_llm_preempted_steps",
        "Decode steps cut short so that a request taking the headroom starts at once.",
        CounterMetricFamily,
        attrgetter("preemptions"),
    ),
    _EngineFamily(
        "aiaas_llm_cached_prompt_tokens",
        "Prompt tokens read from the prefix cache instead of decoded.",
        CounterMetricFamily,
        attrgetter("cached_prompt_tokens"),
    ),
    _EngineFamily(
        "aiaas_llm_prefix_cache_entries",
        "Finished sequences kept in the KV cache for prompts that start the same way.",
        GaugeMetricFamily,
        attrgetter("prefix_cache_entries"),
    ),
    _EngineFamily(
        "aiaas_llm_prefix_cache_cells",
        "KV cells the prefix cache holds.",
        GaugeMetricFamily,
        attrgetter("prefix_cache_cells"),
    ),
    _EngineFamily(
        "aiaas_llm_draft_tokens",
        "Guesses at a sequence's next tokens sent with its decode step (speculative decoding).",
        CounterMetricFamily,
        attrgetter("draft_tokens"),
    ),
    _EngineFamily(
        "aiaas_llm_accepted_draft_tokens",
        "Guesses that sampling confirmed: tokens gained without a step of their own.",
        CounterMetricFamily,
        attrgetter("accepted_draft_tokens"),
    ),
    _EngineFamily(
        "aiaas_llm_onnx_head_steps",
        "Decode steps whose output layer ONNX Runtime computed instead of llama.cpp.",
        CounterMetricFamily,
        attrgetter("onnx_head_steps"),
    ),
)


# The size of each decode step, as histograms (llama.cpp's server reports the mean of the first
# as `n_busy_slots_per_decode`): how full the engine's batches are.
_STEP_HISTOGRAMS = (
    (
        "aiaas_llm_step_sequences",
        "Sequences (slots) with tokens in one decode step.",
        attrgetter("step_sequences"),
    ),
    (
        "aiaas_llm_step_tokens",
        "Tokens in one decode step: each decoding slot's next token and its guesses, plus "
        "prompt chunks.",
        attrgetter("step_tokens"),
    ),
)


class _EngineCollector(Collector):
    """Every family in `_ENGINE_FAMILIES`, one sample per engine (labelled by its model), and
    the step-size histograms."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, EngineStats]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        families = [
            (spec, spec.kind(spec.name, spec.help, labels=["model"])) for spec in _ENGINE_FAMILIES
        ]
        histograms = [
            (read, HistogramMetricFamily(name, doc, labels=["model"]))
            for name, doc, read in _STEP_HISTOGRAMS
        ]
        for model, stats in self._source():
            for spec, family in families:
                family.add_metric([model], spec.read(stats))
            for read, histogram in histograms:
                sizes: SizeCounts = read(stats)
                if sizes.counts:
                    histogram.add_metric([model], _cumulative(sizes), sum_value=sizes.total)
        for _, family in families:
            yield family
        for _, histogram in histograms:
            yield histogram


def _cumulative(sizes: SizeCounts) -> list[tuple[str, float]]:
    """Prometheus buckets (`le` bound, steps at most that size) from per-bucket counts."""
    buckets, running = [], 0
    for bound, count in zip((*map(str, sizes.bounds), "+Inf"), sizes.counts, strict=True):
        running += count
        buckets.append((bound, float(running)))
    return buckets


class _PoolCollector(Collector):
    def __init__(self, source: Callable[[], tuple[int, int, int]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        loaded, memory, evictions = self._source()
        yield GaugeMetricFamily(
            "aiaas_classic_models_loaded", "Trained models loaded for serving.", value=loaded
        )
        yield GaugeMetricFamily(
            "aiaas_classic_memory_bytes",
            "Estimated memory the loaded trained models hold.",
            value=memory,
        )
        yield CounterMetricFamily(
            "aiaas_classic_evictions",
            "Trained models unloaded to stay under the memory budget.",
            value=evictions,
        )


class _BatcherCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[tuple[str, BatcherStats]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily(
            "aiaas_batcher_queue_depth", "Requests waiting in a batcher.", labels=["model"]
        )
        items = GaugeMetricFamily(
            "aiaas_batcher_queued_items", "Items waiting in a batcher.", labels=["model"]
        )
        running = GaugeMetricFamily(
            "aiaas_batcher_batches_running", "Batches being computed now.", labels=["model"]
        )
        dropped = CounterMetricFamily(
            "aiaas_batcher_dropped_items",
            "Items never run because their client left.",
            labels=["model"],
        )
        sizes = HistogramMetricFamily(
            "aiaas_batch_size", "Items per computed batch.", labels=["model"]
        )
        for model, stats in self._source():
            waiting.add_metric([model], stats.waiting_requests)
            items.add_metric([model], stats.waiting_items)
            running.add_metric([model], stats.in_flight)
            dropped.add_metric([model], stats.dropped_items)
            cumulative, buckets = 0, []
            for bound, count in zip(
                (*map(str, BATCH_SIZE_BUCKETS), "+Inf"), stats.batch_sizes, strict=False
            ):
                cumulative += count
                buckets.append((bound, cumulative))
            if buckets:
                sizes.add_metric([model], buckets, sum_value=stats.items)
        yield from (waiting, items, running, dropped, sizes)


class _JobsCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        # Named without a database read when the collector is registered.
        yield GaugeMetricFamily("aiaas_jobs", "Jobs by organisation and state.")

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "aiaas_jobs", "Jobs by organisation and state.", labels=["org", "state"]
        )
        for org, state, count in self._source():
            jobs.add_metric([org, state], count)
        yield jobs


class _ResidencyEvents:
    """LLM loads and unloads, as the residency manager reports them (its observer)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.loads = Counter(
            "aiaas_llm_loads",
            "LLMs loaded (at start, on demand, by an admin).",
            ["model"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            "aiaas_llm_load_seconds",
            "Time to load an LLM: open the GGUF, start the engine, decode a first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.unloads = Counter(
            "aiaas_llm_unloads",
            "LLMs unloaded, by reason (budget: to make room for another; admin: on request).",
            ["model", "reason"],
            registry=registry,
        )

    def loaded(self, model: str, seconds: float, resident_bytes: int) -> None:
        self.loads.labels(model=model).inc()
        self.load_seconds.labels(model=model).observe(seconds)

    def unloaded(self, model: str, reason: str) -> None:
        self.unloads.labels(model=model, reason=reason).inc()


class _ResidencyCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[ResidentModel]], budget_bytes: int) -> None:
        self._source = source
        self._budget = budget_bytes

    def collect(self) -> Iterator[Metric]:
        resident = GaugeMetricFamily(
            "aiaas_llm_resident_bytes",
            "Memory a loaded LLM holds (its GGUF plus what its load added), measured at load.",
            labels=["model", "key"],
        )
        for model in self._source():  # key: the version id of a registered model
            resident.add_metric([model.id, model.key], model.resident_bytes)
        yield resident
        yield GaugeMetricFamily(
            "aiaas_llm_memory_budget_bytes",
            "Memory the loaded LLMs may hold together (AIAAS_LLM_MEMORY_BUDGET_MB).",
            value=self._budget,
        )
