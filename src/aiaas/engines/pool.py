"""The model pool: which models can be served, which are loaded, and whether they are ready.

LLMs are loaded on demand under a memory budget (`engines/llm/residency.py`); the configured
ones (bundled, `AIAAS_GGUF_MODELS`) are loaded at start while they fit, pinned ones first.
Embedding models load in a background thread after start, so `/health` can answer 503 while a
model loads; a request for an embedding model that is still loading gets 503 too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aiaas.engines.embeddings.encoder import InMemoryEncoder, SentenceEncoder
from aiaas.engines.embeddings.export import ExportedModel, Variant, export_sentence_encoder
from aiaas.engines.llm.residency import LlmLease, LlmResidency, LlmSpec, LoadedLlm
from aiaas.errors import ConfigurationError, InvalidRequest, ModelNotFound, ServiceUnavailable
from aiaas.scheduling.batcher import BatcherConfig, DynamicBatcher
from aiaas.scheduling.fair import SchedulingMode, make_policy

__all__ = ["EmbedderSpec", "LlmSpec", "LoadedEmbedder", "LoadedLlm", "ModelPool"]

log = logging.getLogger("aiaas.engines.pool")


@dataclass
class LoadedEmbedder:
    id: str
    encoder: SentenceEncoder
    batcher: DynamicBatcher[list[int], np.ndarray]
    created: int
    owned_by: str = "aiaas"


@dataclass(frozen=True, slots=True)
class EmbedderSpec:
    """How to load one sentence encoder: export (cached) and serve one ONNX variant."""

    id: str
    locate: Callable[[], Path]  # the sentence-transformers folder
    cache_dir: Path
    variant: Variant
    threads: int
    batch: BatcherConfig


def serve_encoder(
    model: ExportedModel | InMemoryEncoder,
    *,
    id: str,
    threads: int,
    batch: BatcherConfig,
    scheduling: SchedulingMode,
    batcher_name: str,
    created: int,
    variant: Variant = "fp32",
) -> LoadedEmbedder:
    """A sentence encoder behind its own started batcher: `batch.workers` forward passes at
    once, each on `threads / workers` ONNX Runtime threads."""
    encoder = SentenceEncoder(
        model, variant=variant, intra_op_threads=max(1, threads // batch.workers)
    )
    batcher: DynamicBatcher[list[int], np.ndarray] = DynamicBatcher(
        encoder.encode_ids,
        size=len,
        config=batch,
        name=batcher_name,
        policy=make_policy(scheduling),
    )
    batcher.start()
    return LoadedEmbedder(id=id, encoder=encoder, batcher=batcher, created=created)


class ModelPool:
    def __init__(self, llms: LlmResidency, *, scheduling: SchedulingMode = "fair") -> None:
        self.residency = llms
        self.scheduling: SchedulingMode = scheduling
        self._configured: dict[str, LlmSpec] = {}  # served LLM id -> how to load it
        self._embedders: dict[str, LoadedEmbedder] = {}
        self._loading: set[str] = set()  # embedders (and configured LLMs) loading at start
        self._lock = threading.Lock()

    def load_in_background(
        self, specs: list[LlmSpec | EmbedderSpec], on_done: Callable[[str], None]
    ) -> threading.Thread:
        """Load the configured models: pinned LLMs, then the others in order, LLMs while they
        fit the budget (the rest load on their first request)."""
        llms = [spec for spec in specs if isinstance(spec, LlmSpec)]
        with self._lock:
            self._configured.update((spec.id, spec) for spec in llms)
            self._loading.update(spec.id for spec in specs)
        pinned = [spec for spec in llms if spec.pinned]
        ordered = [*pinned, *(spec for spec in specs if spec not in pinned)]

        def load_all() -> None:
            for spec in ordered:
                try:
                    if isinstance(spec, EmbedderSpec):
                        self.load_embedder(spec)
                    elif spec.pinned or self._fits(spec):
                        self.residency.load(spec)
                    else:
                        log.info("model %s waits for its first request: over budget", spec.id)
                except Exception as exc:  # noqa: BLE001 - the loader's top level: one bad model
                    # must not stop the others or leave /health at 503 for ever
                    self._failed(spec, exc)
                finally:
                    with self._lock:
                        self._loading.discard(spec.id)
                    on_done(spec.id)

        thread = threading.Thread(target=load_all, name="model-loader", daemon=True)
        thread.start()
        return thread

    def _failed(self, spec: LlmSpec | EmbedderSpec, exc: Exception) -> None:
        """A configured model that cannot load is not served (nor listed): logged, dropped."""
        if isinstance(exc, ConfigurationError):
            log.error("could not load model %s: %s", spec.id, exc)
        else:
            log.error("loading model %s failed", spec.id, exc_info=exc)
        with self._lock:
            self._configured.pop(spec.id, None)

    def _fits(self, spec: LlmSpec) -> bool:
        source = spec.locate()
        try:
            return self.residency.would_fit(source.file.size, spec.id)
        finally:
            source.file.close()

    def load_embedder(self, spec: EmbedderSpec) -> LoadedEmbedder:
        started = time.perf_counter()
        exported = export_sentence_encoder(spec.locate(), spec.cache_dir, name=spec.id)
        loaded = serve_encoder(
            exported,
            id=spec.id,
            variant=spec.variant,
            threads=spec.threads,
            batch=spec.batch,
            scheduling=self.scheduling,
            batcher_name=spec.id,
            created=int(time.time()),
        )
        with self._lock:
            self._embedders[spec.id] = loaded
        log.info(
            "loaded embedding model %s (%s) in %.1f s",
            spec.id,
            spec.variant,
            time.perf_counter() - started,
            extra={"model": spec.id},
        )
        return loaded

    def embedder(self, model_id: str) -> LoadedEmbedder:
        with self._lock:
            loaded = self._embedders.get(model_id)
            loading = model_id in self._loading
            llm = model_id in self._configured
        if loaded is not None:
            return loaded
        if loading and not llm:
            raise ServiceUnavailable(f"The model '{model_id}' is still loading.", retry_after=2)
        if llm:
            raise InvalidRequest(
                f"The model '{model_id}' is a text-generation model; it does not serve embeddings.",
                param="model",
                code="model_not_embedding",
            )
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")

    def embedders(self) -> list[LoadedEmbedder]:
        with self._lock:
            return list(self._embedders.values())

    def configured_llm(self, model_id: str) -> LlmSpec | None:
        """A configured (bundled or settings-named) LLM by its id; an embedding model's id is
        a 400 that says to use /v1/embeddings; None for any other id."""
        with self._lock:
            spec = self._configured.get(model_id)
            embedder = model_id in self._embedders or (model_id in self._loading and spec is None)
        if spec is None and embedder:
            raise InvalidRequest(
                f"The model '{model_id}' is an embedding model; use /v1/embeddings.",
                param="model",
                code="model_not_generative",
            )
        return spec

    def configured_llms(self) -> list[LlmSpec]:
        with self._lock:
            return list(self._configured.values())

    async def acquire_llm(self, spec: LlmSpec) -> LlmLease:
        return await self.residency.acquire(spec)

    def llms(self) -> list[LoadedLlm]:
        """The LLMs loaded now."""
        return self.residency.loaded()

    def llm_file(self, model_id: str) -> Path | None:
        """The GGUF file of a configured LLM (None: no such LLM)."""
        with self._lock:
            spec = self._configured.get(model_id)
        if spec is None:
            return None
        source = spec.locate()
        source.file.close()
        return None if source.file.in_memory else source.file.path

    def close(self) -> None:
        with self._lock:
            embedders, self._embedders = list(self._embedders.values()), {}
        for embedder in embedders:
            embedder.batcher.close()
        self.residency.close()
