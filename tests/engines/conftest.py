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
    engine = LlmEngine(model, EngineConfig(**(base | config)), name="test")
    engine.start()
    return engine


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
