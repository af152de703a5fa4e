"""The metrics registry: every engine family reads its own stat, and embedding tokens are counted
apart from the LLMs' tokens."""

from __future__ import annotations

from dataclasses import replace

from aiaas.engines.llm.params import (
    STEP_SEQUENCE_BUCKETS,
    STEP_TOKEN_BUCKETS,
    EngineStats,
    SizeTally,
)
from aiaas.observability.metrics import Metrics

STATS = EngineStats(
    slots=8,
    busy_slots=1,
    waiting=2,
    reserved_cells=3,
    prompt_tokens=4,
    generated_tokens=5,
    steps=6,
    headroom_admissions=7,
    preemptions=9,
    cached_prompt_tokens=10,
    prefix_cache_entries=11,
    prefix_cache_cells=12,
    draft_tokens=13,
    accepted_draft_tokens=14,
    onnx_head_steps=15,
)

# family -> (type, the sample line for model "m"); a counter is exposed with "_total"
ENGINE = {
    "aiaas_llm_slots": ("gauge", 'aiaas_llm_slots{model="m"} 8.0'),
    "aiaas_llm_slots_busy": ("gauge", 'aiaas_llm_slots_busy{model="m"} 1.0'),
    "aiaas_llm_queue_depth": ("gauge", 'aiaas_llm_queue_depth{model="m"} 2.0'),
    "aiaas_llm_kv_reserved_cells": ("gauge", 'aiaas_llm_kv_reserved_cells{model="m"} 3.0'),
    "aiaas_llm_decode_steps": ("counter", 'aiaas_llm_decode_steps_total{model="m"} 6.0'),
    "aiaas_llm_generated_tokens": ("counter", 'aiaas_llm_generated_tokens_total{model="m"} 5.0'),
    "aiaas_llm_headroom_admissions": (
        "counter",
        'aiaas_llm_headroom_admissions_total{model="m"} 7.0',
    ),
    "aiaas_llm_preempted_steps": ("counter", 'aiaas_llm_preempted_steps_total{model="m"} 9.0'),
    "aiaas_llm_cached_prompt_tokens": (
        "counter",
        'aiaas_llm_cached_prompt_tokens_total{model="m"} 10.0',
    ),
    "aiaas_llm_prefix_cache_entries": ("gauge", 'aiaas_llm_prefix_cache_entries{model="m"} 11.0'),
    "aiaas_llm_prefix_cache_cells": ("gauge", 'aiaas_llm_prefix_cache_cells{model="m"} 12.0'),
    "aiaas_llm_draft_tokens": ("counter", 'aiaas_llm_draft_tokens_total{model="m"} 13.0'),
    "aiaas_llm_accepted_draft_tokens": (
        "counter",
        'aiaas_llm_accepted_draft_tokens_total{model="m"} 14.0',
    ),
    "aiaas_llm_onnx_head_steps": ("counter", 'aiaas_llm_onnx_head_steps_total{model="m"} 15.0'),
}


def test_each_engine_family_reads_its_stat() -> None:
    metrics = Metrics()
    metrics.watch_engines(lambda: [("m", STATS)])
    lines = metrics.render().decode().splitlines()
    for name, (kind, sample) in ENGINE.items():
        assert f"# TYPE {_exposed(name, kind)} {kind}" in lines
        assert sample in lines


def test_engine_families_are_declared_with_no_engine() -> None:
    metrics = Metrics()
    metrics.watch_engines(list)
    lines = metrics.render().decode().splitlines()
    for name, (kind, _) in ENGINE.items():
        assert f"# TYPE {_exposed(name, kind)} {kind}" in lines


def test_embedding_tokens_have_their_own_family() -> None:
    metrics = Metrics()
    metrics.embedding_tokens.labels(model="e", org="org_1", kind="prompt").inc(7)
    text = metrics.render().decode()
    assert 'aiaas_embedding_tokens_total{kind="prompt",model="e",org="org_1"} 7.0' in text
    assert "aiaas_llm_tokens_total{" not in text


def _exposed(name: str, kind: str) -> str:
    return f"{name}_total" if kind == "counter" else name


def test_step_sizes_are_histograms_per_model() -> None:
    sequences, tokens = SizeTally(STEP_SEQUENCE_BUCKETS), SizeTally(STEP_TOKEN_BUCKETS)
    for size in (1, 1, 3, 8, 100):  # 100: past every bound
        sequences.observe(size)
    for size in (1, 40, 512, 9000):
        tokens.observe(size)
    stats = replace(STATS, step_sequences=sequences.snapshot(), step_tokens=tokens.snapshot())
    metrics = Metrics()
    metrics.watch_engines(lambda: [("m", stats)])
    lines = metrics.render().decode().splitlines()
    assert "# TYPE aiaas_llm_step_sequences histogram" in lines
    assert "# TYPE aiaas_llm_step_tokens histogram" in lines
    for sample in (
        'aiaas_llm_step_sequences_bucket{le="1",model="m"} 2.0',
        'aiaas_llm_step_sequences_bucket{le="3",model="m"} 3.0',
        'aiaas_llm_step_sequences_bucket{le="8",model="m"} 4.0',
        'aiaas_llm_step_sequences_bucket{le="64",model="m"} 4.0',
        'aiaas_llm_step_sequences_bucket{le="+Inf",model="m"} 5.0',
        'aiaas_llm_step_sequences_count{model="m"} 5.0',
        'aiaas_llm_step_sequences_sum{model="m"} 113.0',
        'aiaas_llm_step_tokens_bucket{le="32",model="m"} 1.0',
        'aiaas_llm_step_tokens_bucket{le="64",model="m"} 2.0',
        'aiaas_llm_step_tokens_bucket{le="512",model="m"} 3.0',
        'aiaas_llm_step_tokens_bucket{le="+Inf",model="m"} 4.0',
        'aiaas_llm_step_tokens_sum{model="m"} 9553.0',
    ):
        assert sample in lines, sample
    # An engine that has made no step yet (or none at all) shows the families, empty.
    metrics = Metrics()
    metrics.watch_engines(list)
    assert "# TYPE aiaas_llm_step_tokens histogram" in metrics.render().decode().splitlines()
