"""The LLM residency manager on the bundled SmolLM2: measured memory, the budget's refusals,
pinning, and GGUF bytes served from an in-memory file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aiaas.engines.llm.bundled import smollm2_path
from aiaas.engines.llm.engine import EngineConfig
from aiaas.engines.llm.model_file import ModelFile
from aiaas.engines.llm.residency import LlmResidency, LlmSource, LlmSpec
from aiaas.errors import InvalidRequest

CONFIG = EngineConfig(
    n_slots=2, n_ctx=1024, context_length=512, n_threads=2, onnx_head=False, draft_tokens=0
)


def smol(tmp_path: Path, *, key: str = "smol", pinned: bool = False) -> LlmSpec:
    return LlmSpec.from_path(key, lambda: smollm2_path(tmp_path), pinned=pinned)


def test_a_model_larger_than_the_whole_budget_is_a_400(tmp_path: Path) -> None:
    residency = LlmResidency(CONFIG, budget_bytes=16 << 20)
    with pytest.raises(InvalidRequest) as refused:
        residency.load(smol(tmp_path))
    assert refused.value.code == "model_too_large"
    assert "16 MiB" in refused.value.message
    assert residency.loaded() == []


def test_memory_is_measured_and_the_least_recently_used_idle_model_makes_room(
    tmp_path: Path,
) -> None:
    size = smollm2_path(tmp_path).stat().st_size
    residency = LlmResidency(CONFIG, budget_bytes=1 << 40)
    first = residency.load(smol(tmp_path, key="a"))
    try:
        # Its weights, plus the KV cache and buffers the load added.
        assert first.resident_bytes > size
        # A budget for one: loading a second model unloads the idle first one.
        residency.budget_bytes = first.resident_bytes + first.resident_bytes // 2
        second = residency.load(smol(tmp_path, key="b"))
        assert [m.key for m in residency.loaded()] == ["b"]
        assert second.resident_bytes > size
    finally:
        residency.close()


def test_a_pinned_model_is_never_unloaded_to_make_room(tmp_path: Path) -> None:
    residency = LlmResidency(CONFIG, budget_bytes=1 << 40, room_wait_s=0.2)
    pinned = residency.load(smol(tmp_path, key="pinned", pinned=True))
    try:
        residency.budget_bytes = pinned.resident_bytes + pinned.resident_bytes // 2
        with pytest.raises(Exception) as busy:
            residency.load(smol(tmp_path, key="other"))
        assert getattr(busy.value, "status", None) == 503
        assert [m.key for m in residency.loaded()] == ["pinned"]
    finally:
        residency.close()


def test_gguf_bytes_in_memory_are_served_and_freed_on_unload(tmp_path: Path) -> None:
    data = smollm2_path(tmp_path).read_bytes()
    opened: list[ModelFile] = []

    def locate() -> LlmSource:
        chunks = (data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20))
        opened.append(ModelFile.in_memory_from("test-smol", chunks))
        return LlmSource(opened[-1], chat_template="{{ messages[0]['content'] }}")

    residency = LlmResidency(CONFIG, budget_bytes=1 << 40)

    async def lease_twice() -> None:
        spec = LlmSpec(id="mv_test", locate=locate, name="imported-smol")
        one, two = await asyncio.gather(residency.acquire(spec), residency.acquire(spec))
        assert one.llm is two.llm  # one load for both (single flight)
        assert one.llm.id == "imported-smol" and one.llm.file.in_memory
        assert one.llm.template is not None
        one.release()
        two.release()

    try:
        asyncio.run(lease_twice())
        assert len(opened) == 1 and opened[0].open
        assert residency.unload("mv_test")
        assert not opened[0].open  # the in-memory file is closed with the model
    finally:
        residency.close()
