"""LLMs loaded on demand under a memory budget.

Many more GGUF models may be callable (configured ones, and every organisation's registered
versions) than fit in memory. A request takes a *lease* on its model:

    acquire(spec)   loaded  -> lease it
                    loading -> wait for that load (single flight; at most `max_waiting` wait,
                               then 429), then lease it
                    new     -> load it in a thread: make room first by unloading the least
                               recently used idle models (waiting, up to `room_wait_s`, for
                               busy ones to finish), load, measure, and make room again if
                               the measurement was more than the estimate

A model is *idle* when no lease is held and its engine has nothing running or waiting; only
idle, unpinned models are ever unloaded, so a request (streamed or not) is never cut by an
unload. A request holds its lease from before tokenising until its generations are submitted;
from then on the engine's own queue keeps the model busy.

Memory is measured, not guessed: a model holds its GGUF's bytes (mapped from disk, or an
in-memory file: all of them once `start` has decoded a token) plus the anonymous memory the
load added (KV cache, compute buffers, the ONNX head), read from /proc around the load. Loads
run one at a time so measurements do not mix. A model that alone exceeds the budget is a 400.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiaas.engines.llm.chat_template import ChatTemplate
from aiaas.engines.llm.engine import EngineConfig, LlmEngine
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.model_file import ModelFile, anonymous_rss_bytes, return_freed_memory
from aiaas.errors import Conflict, InvalidRequest, RateLimited, ServerError, ServiceUnavailable
from aiaas.scheduling.fair import SchedulingMode, make_policy

log = logging.getLogger("aiaas.engines.llm.residency")

MIB = 1 << 20
ROOM_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class LlmSource:
    """An opened GGUF, and the chat template that overrides the file's own (None: keep it)."""

    file: ModelFile
    chat_template: str | None = None


@dataclass(frozen=True, slots=True)
class LlmSpec:
    """How to load one GGUF model."""

    id: str  # the key: a configured model's id, or a registered version's id
    locate: Callable[[], LlmSource]
    name: str | None = None  # what clients call it (default: the id)
    pinned: bool = False  # never unloaded to make room
    owned_by: str = "aiaas"
    created: int | None = None

    @property
    def served_as(self) -> str:
        return self.name or self.id

    @staticmethod
    def from_path(
        id: str, path: Callable[[], Path], *, chat_template: str | None = None, pinned: bool = False
    ) -> LlmSpec:
        """A model from a file on disk (bundled, or named in the settings)."""

        def locate() -> LlmSource:
            return LlmSource(ModelFile.on_disk(path()), chat_template)

        return LlmSpec(id=id, locate=locate, pinned=pinned)


@dataclass
class LoadedLlm:
    id: str  # the name it is served as
    key: str
    engine: LlmEngine
    template: ChatTemplate | None
    created: int
    file: ModelFile
    owned_by: str = "aiaas"
    pinned: bool = False
    resident_bytes: int = 0
    load_seconds: float = 0.0
    _leases: int = field(default=0, repr=False)
    _recency: float = field(default_factory=time.monotonic, repr=False)

    @property
    def model(self) -> LlamaModel:
        return self.engine.model

    def _idle(self) -> bool:
        return not self._leases and self.engine.idle()


class LlmLease:
    """A hold on a loaded model: it is not unloaded until `release` (idempotent)."""

    def __init__(self, llm: LoadedLlm, residency: LlmResidency) -> None:
        self.llm = llm
        self._residency = residency
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._residency._release(self.llm)


class ResidencyObserver(Protocol):
    def loaded(self, model: str, seconds: float, resident_bytes: int) -> None: ...

    def unloaded(self, model: str, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ResidentModel:
    """One loaded model, for metrics and the admin routes."""

    id: str
    key: str
    resident_bytes: int
    pinned: bool
    idle: bool


class LlmResidency:
    def __init__(
        self,
        config: EngineConfig,
        *,
        budget_bytes: int,
        scheduling: SchedulingMode = "fair",
        observer: ResidencyObserver | None = None,
        room_wait_s: float = 120.0,
    ) -> None:
        self.config = config
        self.budget_bytes = budget_bytes
        # How long a load waits for busy models to go idle before it answers 503.
        self.room_wait_s = room_wait_s
        self._scheduling: SchedulingMode = scheduling
        self._observer = observer
        self._loaded: dict[str, LoadedLlm] = {}
        self._loading: dict[str, concurrent.futures.Future[LoadedLlm]] = {}
        self._waiting: Counter[str] = Counter()
        self._measured: dict[str, int] = {}  # key -> resident bytes when last loaded
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time: measurements do not mix
        self._closed = False

    # -- the request's side ----------------------------------------------------------------------

    async def acquire(self, spec: LlmSpec) -> LlmLease:
        """A lease on `spec`'s model, loading it first if need be (the caller waits)."""
        for _ in range(3):  # a model unloaded between its load and our lease is loaded again
            with self._lock:
                found = self._loaded.get(spec.id)
                if found is not None:
                    return self._lease(found)
                future = self._loading.get(spec.id)
                if future is None:
                    future = self._start_load(spec)
                if self._waiting[spec.id] >= self.config.max_waiting:
                    raise RateLimited(
                        f"Model {spec.served_as} is loading with {self._waiting[spec.id]} "
                        "requests waiting for it; try again soon.",
                        retry_after=2,
                    )
                self._waiting[spec.id] += 1
            try:
                await asyncio.wrap_future(future)
            finally:
                with self._lock:
                    self._waiting[spec.id] -= 1
                    if not self._waiting[spec.id]:
                        del self._waiting[spec.id]
        raise ServiceUnavailable(
            f"Model {spec.served_as} was unloaded as soon as it loaded; try again.", retry_after=2
        )

    def _lease(self, llm: LoadedLlm) -> LlmLease:
        llm._leases += 1
        llm._recency = time.monotonic()
        return LlmLease(llm, self)

    def _release(self, llm: LoadedLlm) -> None:
        with self._lock:
            llm._leases -= 1
            llm._recency = time.monotonic()

    def _start_load(self, spec: LlmSpec) -> concurrent.futures.Future[LoadedLlm]:
        """Begin loading `spec` in a thread (the pool lock is held)."""
        if self._closed:
            raise ServiceUnavailable("The server is shutting down.", retry_after=5)
        future: concurrent.futures.Future[LoadedLlm] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # a waiter that gives up never cancels the load
        self._loading[spec.id] = future
        threading.Thread(
            target=self._load_into, args=(spec, future), name="llm-loader", daemon=True
        ).start()
        return future

    def _load_into(self, spec: LlmSpec, future: concurrent.futures.Future[LoadedLlm]) -> None:
        try:
            loaded = self.load(spec)
        except BaseException as exc:  # noqa: BLE001 - every waiter gets the load's own error
            with self._lock:
                self._loading.pop(spec.id, None)
            future.set_exception(exc)
        else:
            with self._lock:
                self._loading.pop(spec.id, None)
            future.set_result(loaded)

    # -- loading ---------------------------------------------------------------------------------

    def load(self, spec: LlmSpec) -> LoadedLlm:
        """Load `spec` now (blocking), within the budget; an already loaded model is returned."""
        with self._load_lock:
            with self._lock:
                found = self._loaded.get(spec.id)
            if found is not None:
                return found
            source = spec.locate()
            try:
                return self._load_measured(spec, source)
            except BaseException:
                source.file.close()
                raise

    def _load_measured(self, spec: LlmSpec, source: LlmSource) -> LoadedLlm:
        name = spec.served_as
        expected = self._measured.get(spec.id, source.file.size)
        self._refuse_if_too_large(name, expected, measured=spec.id in self._measured)
        self._wait_for_room(name, expected, keep=spec.id)
        started = time.perf_counter()
        anon_before = anonymous_rss_bytes()
        model = _open_model(source.file.path, name)
        engine = LlmEngine(model, self.config, name=name, policy=make_policy(self._scheduling))
        try:
            engine.start()
        except BaseException:
            model.close()
            raise
        resident = source.file.size + max(0, anonymous_rss_bytes() - anon_before)
        seconds = time.perf_counter() - started
        template_source = source.chat_template or model.info.chat_template
        template = (
            ChatTemplate(
                template_source, bos_token=model.info.bos_text, eos_token=model.info.eos_text
            )
            if template_source
            else None
        )
        loaded = LoadedLlm(
            id=name,
            key=spec.id,
            engine=engine,
            template=template,
            created=spec.created or int(time.time()),
            file=source.file,
            owned_by=spec.owned_by,
            pinned=spec.pinned,
            resident_bytes=resident,
            load_seconds=seconds,
        )
        self._measured[spec.id] = resident
        try:
            self._refuse_if_too_large(name, resident, measured=True)
            self._wait_for_room(name, resident, keep=spec.id)
        except BaseException:
            self._shut(loaded)
            raise
        with self._lock:
            self._loaded[spec.id] = loaded
        if self._observer is not None:
            self._observer.loaded(name, seconds, resident)
        log.info(
            "loaded model %s (%s) in %.1f s, %d MiB resident",
            name,
            model.info.description,
            seconds,
            resident // MIB,
            extra={"model": name, "context_length": engine.context_length},
        )
        return loaded

    def _refuse_if_too_large(self, name: str, need: int, *, measured: bool) -> None:
        if need > self.budget_bytes:
            how = "holds" if measured else "needs at least"
            raise InvalidRequest(
                f"The model '{name}' {how} {need // MIB} MiB, more than the whole LLM memory "
                f"budget ({self.budget_bytes // MIB} MiB, AIAAS_LLM_MEMORY_BUDGET_MB): it "
                "cannot be loaded on this server.",
                param="model",
                code="model_too_large",
            )

    def _wait_for_room(self, name: str, need: int, *, keep: str) -> None:
        """Make room for `need` bytes, waiting (up to `room_wait_s`) for busy models to finish
        what they serve; then 503."""
        deadline = time.monotonic() + self.room_wait_s
        while not self._make_room(need, keep=keep):
            if time.monotonic() >= deadline or self._closed:
                raise self._budget_busy(name, need)
            time.sleep(ROOM_POLL_S)

    def _budget_busy(self, name: str, need: int) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"The model '{name}' needs {need // MIB} MiB and the LLM memory budget is held by "
            "models that are serving requests or pinned; try again shortly.",
            retry_after=2,
        )

    def _make_room(self, need: int, *, keep: str) -> bool:
        """Unload idle, unpinned models (least recently used first) until `need` more bytes
        fit; False when they cannot (what stays is busy or pinned)."""
        victims: list[LoadedLlm] = []
        with self._lock:
            held = sum(m.resident_bytes for k, m in self._loaded.items() if k != keep)
            candidates = sorted(
                (m for k, m in self._loaded.items() if k != keep and not m.pinned),
                key=lambda m: m._recency,
            )
            for candidate in candidates:
                if held + need <= self.budget_bytes:
                    break
                if candidate._idle():
                    del self._loaded[candidate.key]
                    victims.append(candidate)
                    held -= candidate.resident_bytes
            fits = held + need <= self.budget_bytes
        for victim in victims:
            self._shut(victim, reason="budget")
        return fits

    # -- unloading -------------------------------------------------------------------------------

    def unload(self, key: str, *, reason: str = "admin") -> bool:
        """Unload a loaded model now; False when it is not loaded; 409 while it is busy."""
        with self._lock:
            found = self._loaded.get(key)
            if found is None:
                return False
            if not found._idle():
                raise Conflict(
                    f"The model '{found.id}' is serving requests; it is unloaded only when idle.",
                    param="model",
                    code="model_busy",
                )
            del self._loaded[key]
        self._shut(found, reason=reason)
        return True

    def _shut(self, llm: LoadedLlm, *, reason: str | None = None) -> None:
        llm.engine.close()
        llm.model.close()
        llm.file.close()
        return_freed_memory()
        if reason is not None:
            if self._observer is not None:
                self._observer.unloaded(llm.id, reason)
            log.info("unloaded model %s (%s)", llm.id, reason, extra={"model": llm.id})

    # -- reading ---------------------------------------------------------------------------------

    def get(self, key: str) -> LoadedLlm | None:
        with self._lock:
            return self._loaded.get(key)

    def loading(self, key: str) -> bool:
        with self._lock:
            return key in self._loading

    def loaded(self) -> list[LoadedLlm]:
        with self._lock:
            return list(self._loaded.values())

    def resident(self) -> list[ResidentModel]:
        with self._lock:
            models = list(self._loaded.values())
            return [
                ResidentModel(m.id, m.key, m.resident_bytes, m.pinned, m._idle()) for m in models
            ]

    def would_fit(self, spec_size: int, key: str) -> bool:
        """Whether a model of about `spec_size` bytes fits beside those loaded (start-up)."""
        need = self._measured.get(key, spec_size)
        with self._lock:
            held = sum(m.resident_bytes for m in self._loaded.values())
        return held + need <= self.budget_bytes

    def close(self) -> None:
        with self._lock:
            self._closed = True
            loaded, self._loaded = list(self._loaded.values()), {}
        for llm in loaded:
            self._shut(llm)


def _open_model(path: Path, name: str) -> LlamaModel:
    try:
        return LlamaModel(path)
    except Exception as exc:  # a registered file llama.cpp refuses is the server's fault
        raise ServerError(f"The model '{name}' could not be loaded: {exc}") from exc
