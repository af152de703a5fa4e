"""Shared fixtures for engine tests: the bundled MiniLM, exported once per test session, and the
bundled GGUF models, loaded once per test session, with a sink that collects a request's events."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aiaas.engines.embeddings.encoder import SentenceEncoder
from aiaas.engines.embeddings.export import (
    ExportedModel,
    export_sentence_encoder,
    minilm_l6_v2_dir,
)
from aiaas.engines.llm.bundled import gemma3_path, smollm2_path
from aiaas.engines.llm.engine import EngineConfig, LlmEngine
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.params import Delta, Event, Failed, Final, TokenLogprob

MODEL_ID = "all-minilm-l6-v2"

_SUBJECTS = ["The tenant", "Our scheduler", "A tired engineer", "The red fox", "Every replica"]
_VERBS = ["rejected", "batched", "quietly summarised", "jumped over", "re-indexed"]
_OBJECTS = ["the embeddings request", "forty-two invoices", "a lazy dog", "the café menu"]
_TAILS = [
    "before lunch.",
    "because the queue was full!",
    "— naïve, but it worked?",
    "in Zürich and 東京.",
    "with a latency of 3.5 ms (p99).",
]


# Not sentences: one word, nothing, punctuation. Mean pooling then averages two or three
# vectors, which is where int8 drifts most from fp32.
EDGE_CASES = ["Hello", "", "   ?!  "]


def generated_sentences(count: int, *, seed: int = 7) -> list[str]:
    """Sentences of very different lengths, some beyond 128 and 256 tokens, so truncation and
    padding are exercised as well as plain short inputs."""
    rng = random.Random(seed)
    sentences = []
    for index in range(count):
        clauses = 1 + (index % 9) * (index % 4) + (40 if index % 17 == 0 else 0)
        parts = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_TAILS)}"
            for _ in range(clauses)
        ]
        sentences.append(" ".join(parts))
    return sentences


@pytest.fixture(scope="session", autouse=True)
def _offline() -> Iterator[None]:
    """Nothing may come from a model hub; loads use local files only anyway."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_l6_v2_dir()


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embeddings-cache")


@pytest.fixture(scope="session")
def minilm_export(minilm_dir: Path, export_cache: Path) -> ExportedModel:
    return export_sentence_encoder(minilm_dir, export_cache, name=MODEL_ID)


@pytest.fixture(scope="session")
def fp32_encoder(minilm_export: ExportedModel) -> SentenceEncoder:
    return SentenceEncoder(minilm_export, variant="fp32", intra_op_threads=2)


@pytest.fixture(scope="session")
def int8_encoder(minilm_export: ExportedModel) -> SentenceEncoder:
    return SentenceEncoder(minilm_export, variant="int8", intra_op_threads=2)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaModel]:
    loaded = LlamaModel(smollm2_path(Path(tmp_path_factory.mktemp("models"))))
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaModel]:
    """Gemma 3: sliding-window layers, no chat template."""
    loaded = LlamaModel(gemma3_path(Path(tmp_path_factory.mktemp("models"))))
    yield loaded
    loaded.close()


def started_engine(model: LlamaModel, **config: Any) -> LlmEngine:
    """A started engine on `model`: 4 slots over 4096 cells, no headroom, no prefix cache, no
    guesses, with `config` on top."""
    engine = unstarted_engine(model, **config)
    engine.start()
    return engine


def unstarted_engine(model: LlamaModel, **config: Any) -> LlmEngine:
    """As `started_engine`, not started yet: requests submitted now are all waiting when its
    thread starts, so it admits them together, however soon its thread gets to run."""
    base: dict[str, Any] = {
        "n_slots": 4,
        "n_ctx": 4096,
        "context_length": 1024,
        "n_batch": 256,
        "n_threads": 2,
        "headroom_slots": 0,
        "prefix_cache_entries": 0,
        "draft_tokens": 0,
    }
    return LlmEngine(model, EngineConfig(**(base | config)), name="test")


# Two engines' greedy tokens for one prompt can part where the model is torn between two tokens,
# with neither wrong. llama.cpp's CPU flash attention over the F16 KV cache rounds Q to F16 and
# sums the weighted V rows in F16 for steps under 64 rows, but stays in F32 (its tiled kernel)
# from 64 rows on, and it sums a sequence's cells in the order they lie in the unified cache. So
# which requests share a step (four prompts prefilled together are 64+ rows) and which cells a
# finished request freed move the logits: teacher-forced on the bundled models (AVX2, 2 threads),
# by up to 2.6, and the gap between a position's top two by up to 0.58 (SmolLM2) and 0.42 (Gemma
# 3) where that gap is under 2. SmolLM2's greedy continuation of "Counting: one two three four,
# ..." has " four" 0.023 above " three" at its 11th token; a 95-row prefill puts " three" 0.15
# above. The two output heads on the same hidden states differ by under 0.01 in a gap.
NEAR_TIE = 1.0  # most the top-two gap may move between two runs: the sum of both runs' gaps


def common_greedy_prefix(got: Run, expected: Run, *, near_tie: float = NEAR_TIE) -> int:
    """How many leading tokens `got` shares with `expected`, two greedy runs of one prompt with
    logprobs (a top of 2 or more): all of them, texts equal, or those before the first token where
    they part, which must be a near-tie in both: their top two swapped, and the two gaps together
    under `near_tie`. After it they continue different texts, which are not compared."""
    for position, (ours, theirs) in enumerate(zip(got.logprobs, expected.logprobs, strict=False)):
        if ours.token_bytes == theirs.token_bytes:
            continue
        assert len(ours.top) >= 2 and len(theirs.top) >= 2, "ask for logprobs=2 or more"
        ours_gap = ours.top[0][2] - ours.top[1][2]
        theirs_gap = theirs.top[0][2] - theirs.top[1][2]
        swapped = (ours.top[1][1], theirs.top[1][1]) == (theirs.token_bytes, ours.token_bytes)
        assert swapped and ours_gap + theirs_gap < near_tie, (
            f"token {position}: {ours.token!r} (top {ours.top[:2]}) where the reference has "
            f"{theirs.token!r} (top {theirs.top[:2]}): not a near-tie swap (gaps {ours_gap:.3f} "
            f"+ {theirs_gap:.3f}, at most {near_tie})"
        )
        return position
    assert len(got.logprobs) == len(expected.logprobs)
    assert got.text == expected.text
    return len(got.logprobs)


@dataclass
class Run:
    """One request's events, as a sink collects them on the engine thread."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    final: Final | None = None
    failed: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def sink(self, event: Event) -> None:
        if isinstance(event, Delta):
            self.text += event.text
            self.logprobs.extend(event.logprobs)
        elif isinstance(event, Final):
            self.text += event.text
            self.logprobs.extend(event.logprobs)
            self.final = event
            self.done.set()
        elif isinstance(event, Failed):
            self.failed = event.message
            self.done.set()
