"""The model pool: which models are loaded, what each can do, and whether it is ready.

Loading happens in a background thread after start so `/health` can answer 503 while a model
loads; a request for a model that is still loading gets 503 too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from aiaas.engines.embeddings.encoder import InMemoryEncoder, SentenceEncoder
from aiaas.engines.embeddings.export import ExportedModel, Variant, export_sentence_encoder
from aiaas.engines.llm.chat_template import ChatTemplate
from aiaas.engines.llm.engine import EngineConfig, LlmEngine
from aiaas.engines.llm.model import LlamaModel
from aiaas.errors import ConfigurationError, InvalidRequest, ModelNotFound, ServiceUnavailable
from aiaas.scheduling.batcher import BatcherConfig, DynamicBatcher
from aiaas.scheduling.fair import SchedulingMode, make_policy

log = logging.getLogger("aiaas.engines.pool")

M = TypeVar("M")


@dataclass
class LoadedLlm:
    id: str
    engine: LlmEngine
    template: ChatTemplate | None
    created: int
    owned_by: str = "aiaas"

    @property
    def model(self) -> LlamaModel:
        return self.engine.model


@dataclass(frozen=True, slots=True)
class LlmSpec:
    """How to load one GGUF model."""

    id: str
    locate: Callable[[], Path]
    chat_template: str | None = None  # overrides the GGUF's own, if given


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


@dataclass
class ModelPool:
    config: EngineConfig
    scheduling: SchedulingMode = "fair"
    _llms: dict[str, LoadedLlm] = field(default_factory=dict)
    _embedders: dict[str, LoadedEmbedder] = field(default_factory=dict)
    _loading: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load_in_background(
        self, specs: list[LlmSpec | EmbedderSpec], on_done: Callable[[str], None]
    ) -> threading.Thread:
        with self._lock:
            self._loading.update(spec.id for spec in specs)

        def load_all() -> None:
            for spec in specs:
                try:
                    if isinstance(spec, EmbedderSpec):
                        self.load_embedder(spec)
                    else:
                        self.load_llm(spec)
                except ConfigurationError as exc:
                    log.error("could not load model %s: %s", spec.id, exc)
                except Exception:  # the loader's top level: one bad model must not
                    # stop the others from loading or leave /health at 503 for ever
                    log.exception("loading model %s failed", spec.id)
                finally:
                    with self._lock:
                        self._loading.discard(spec.id)
                    on_done(spec.id)

        thread = threading.Thread(target=load_all, name="model-loader", daemon=True)
        thread.start()
        return thread

    def load_llm(self, spec: LlmSpec) -> LoadedLlm:
        started = time.perf_counter()
        model = LlamaModel(spec.locate())
        engine = LlmEngine(model, self.config, name=spec.id, policy=make_policy(self.scheduling))
        try:
            engine.start()
        except BaseException:
            model.close()
            raise
        source = spec.chat_template or model.info.chat_template
        template = (
            ChatTemplate(source, bos_token=model.info.bos_text, eos_token=model.info.eos_text)
            if source
            else None
        )
        loaded = LoadedLlm(id=spec.id, engine=engine, template=template, created=int(time.time()))
        with self._lock:
            self._llms[spec.id] = loaded
        log.info(
            "loaded model %s (%s) in %.1f s",
            spec.id,
            model.info.description,
            time.perf_counter() - started,
            extra={"model": spec.id, "context_length": engine.context_length},
        )
        return loaded

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
        return self._find(
            self._embedders,
            model_id,
            wrong_kind="is a text-generation model; it does not serve embeddings",
            code="model_not_embedding",
        )

    def embedders(self) -> list[LoadedEmbedder]:
        with self._lock:
            return list(self._embedders.values())

    def llm(self, model_id: str) -> LoadedLlm:
        return self._find(
            self._llms,
            model_id,
            wrong_kind="is an embedding model; use /v1/embeddings",
            code="model_not_generative",
        )

    def _find(self, table: dict[str, M], model_id: str, *, wrong_kind: str, code: str) -> M:
        """The loaded model, or the error that says why not: loading, other kind, unknown."""
        with self._lock:
            loaded = table.get(model_id)
            loading = model_id in self._loading
            known = model_id in self._llms or model_id in self._embedders
        if loaded is not None:
            return loaded
        if loading:
            raise ServiceUnavailable(f"The model '{model_id}' is still loading.", retry_after=2)
        if known:
            raise InvalidRequest(f"The model '{model_id}' {wrong_kind}.", param="model", code=code)
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")

    def llms(self) -> list[LoadedLlm]:
        with self._lock:
            return list(self._llms.values())

    def close(self) -> None:
        with self._lock:
            loaded, self._llms = list(self._llms.values()), {}
            embedders, self._embedders = list(self._embedders.values()), {}
        for embedder in embedders:
            embedder.batcher.close()
        for llm in loaded:
            llm.engine.close()
            llm.model.close()
