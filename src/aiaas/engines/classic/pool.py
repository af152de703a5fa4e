"""The classic model pool: registered models loaded on first use and unloaded when memory runs out.

There may be many more model versions than fit in memory, so the pool loads one the first time a
request names it and keeps it while it is used:

    get(key, load)  cached -> the loaded model
                    loading -> await the same load (single flight; a failure reaches every
                               waiter and caches nothing)
                    new -> load in a worker thread, start its batcher, then unload the least
                           recently used other models until the total fits the budget

A model with requests in flight is never unloaded; it is skipped and the next one is tried, so
the budget can be overrun for as long as those requests run. Each model has its own batcher, so
concurrent requests for one model share a forward pass.

The pool's tables are touched on the event loop and, for `entries`/`evict`/`close`, from any
thread; one lock guards them, and each model's in-flight count has its own lock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from aiaas.engines.classic.imported import ImportedModel
from aiaas.engines.classic.model import ClassicModel
from aiaas.errors import ServiceUnavailable
from aiaas.scheduling.batcher import BatcherConfig, BatcherStats, BatchRequest, DynamicBatcher
from aiaas.scheduling.fair import AdmissionPolicy

__all__ = ["ClassicPool", "LoadedClassic", "PoolEntry", "Row", "ServedModel"]

log = logging.getLogger("aiaas.engines.classic")

Row = tuple[np.ndarray, ...]  # one record: an array per input, in input_names order, no batch axis
ServedModel = ClassicModel | ImportedModel  # trained here, or imported with a signature
PolicyFactory = Callable[[], AdmissionPolicy[BatchRequest[Row, np.ndarray]]]


@dataclass
class LoadedClassic:
    key: str
    model: ServedModel
    batcher: DynamicBatcher[Row, np.ndarray]
    last_used: float  # time.time(), for display
    _recency: float = field(default_factory=time.monotonic, repr=False)  # orders the LRU
    _in_flight: int = field(default=0, repr=False)
    _retired: bool = field(default=False, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        *,
        tenant: str,
        weight: float,
        background: bool = False,
    ) -> np.ndarray:
        """Logits float32 [n, n_outputs]; the rows go through the batcher, merged with other
        requests' rows (`background`: a batch's, behind every interactive request)."""
        self.model.check_inputs(inputs)
        columns = [inputs[name] for name in self.model.input_names]
        rows: list[Row] = list(zip(*columns, strict=True))
        with self._pinned():
            logits = await self.batcher.submit(
                rows, tenant=tenant, weight=weight, background=background
            )
        return np.stack(logits)

    async def encode_records(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """`model.encode_records` in a worker thread, counted as in flight: the model cannot be
        evicted between encoding a request and its `infer`."""
        with self._pinned():
            return await asyncio.to_thread(self.model.encode_records, records)

    @contextmanager
    def _pinned(self) -> Iterator[None]:
        with self._guard:
            if self._retired:  # unloaded since `get` returned it
                raise ServiceUnavailable(
                    f"model {self.key} was just unloaded; try again", retry_after=1
                )
            self._in_flight += 1
            self.touch()
        try:
            yield
        finally:
            with self._guard:
                self._in_flight -= 1
                self.touch()

    def touch(self) -> None:
        self.last_used = time.time()
        self._recency = time.monotonic()

    def in_flight(self) -> int:
        with self._guard:
            return self._in_flight

    def _retire(self) -> bool:
        """Mark it unloaded unless requests are running; True if it was marked."""
        with self._guard:
            if self._in_flight:
                return False
            self._retired = True
            return True


@dataclass(frozen=True)
class PoolEntry:
    key: str
    state: Literal["loading", "ready"]
    memory_bytes: int  # 0 while loading: unknown until the model is open
    last_used: float  # time.time(); for a loading model, when its load began


class ClassicPool:
    def __init__(
        self,
        *,
        memory_budget_bytes: int,
        batch: BatcherConfig,
        threads: int,
        policy: PolicyFactory | None = None,
    ) -> None:
        """`threads` is what each model's ONNX Runtime session should use: `load` functions
        pass `pool.threads` to `ClassicModel.load`. `policy` makes each batcher's admission
        policy (default: first come, first served)."""
        self.memory_budget_bytes = memory_budget_bytes
        self.batch = batch
        self.threads = threads
        self._policy = policy
        self._lock = threading.Lock()
        self._ready: dict[str, LoadedClassic] = {}
        self._loading: dict[str, asyncio.Task[LoadedClassic]] = {}
        self._load_started: dict[str, float] = {}
        self._evictions = 0
        self._closed = False

    async def get(self, key: str, load: Callable[[], ServedModel]) -> LoadedClassic:
        """The loaded model for `key`, loading it with `load` (in a worker thread) if needed."""
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("the classic model pool is closed")
            loaded = self._ready.get(key)
            if loaded is not None:
                loaded.touch()
                return loaded
            task = self._loading.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(key, load))
                task.add_done_callback(_retrieve)
                self._loading[key] = task
                self._load_started[key] = time.time()
        # A waiter that gives up must not cancel the load the others wait for.
        return await asyncio.shield(task)

    async def _load(self, key: str, load: Callable[[], ServedModel]) -> LoadedClassic:
        try:
            started = time.perf_counter()
            model, batcher = await asyncio.to_thread(self._open, key, load)
            loaded = LoadedClassic(key=key, model=model, batcher=batcher, last_used=time.time())
            with self._lock:
                closed = self._closed
                if not closed:
                    self._ready[key] = loaded
        finally:
            with self._lock:
                self._loading.pop(key, None)
                self._load_started.pop(key, None)
        if closed:
            await batcher.aclose()
            raise ServiceUnavailable("the classic model pool is closed")
        log.info(
            "loaded classic model %s in %.2f s (~%d MiB)",
            key,
            time.perf_counter() - started,
            model.memory_bytes >> 20,
            extra={"model": key},
        )
        evicted = self._evict_to_fit(keep=key)
        if evicted:
            await asyncio.to_thread(_close_all, evicted)
        return loaded

    def _open(
        self, key: str, load: Callable[[], ServedModel]
    ) -> tuple[ServedModel, DynamicBatcher[Row, np.ndarray]]:
        model = load()

        def run(rows: list[Row]) -> np.ndarray:
            stacked = {
                name: np.stack([row[i] for row in rows]) for i, name in enumerate(model.input_names)
            }
            return model.run(stacked)

        def work(batch: list[Row]) -> np.ndarray | list[np.ndarray]:
            shapes = [tuple(array.shape for array in row) for row in batch]
            if len(set(shapes)) == 1:
                return run(batch)
            # Rows of different requests may differ along an imported model's dynamic axes:
            # one forward pass per shape.
            results: list[np.ndarray] = [np.empty(0)] * len(batch)
            for shape in dict.fromkeys(shapes):
                indices = [i for i, s in enumerate(shapes) if s == shape]
                for i, row in zip(indices, run([batch[i] for i in indices]), strict=True):
                    results[i] = row
            return results

        batcher: DynamicBatcher[Row, np.ndarray] = DynamicBatcher(
            work,
            config=self.batch,
            policy=self._policy() if self._policy is not None else None,
            name=f"classic-{key}",
        )
        batcher.start()
        return model, batcher

    def _evict_to_fit(self, *, keep: str) -> list[LoadedClassic]:
        """Unload idle models, least recently used first, until the total fits the budget."""
        evicted: list[LoadedClassic] = []
        with self._lock:
            total = sum(loaded.model.memory_bytes for loaded in self._ready.values())
            others = sorted(
                (loaded for key, loaded in self._ready.items() if key != keep),
                key=lambda loaded: loaded._recency,
            )
            for loaded in others:
                if total <= self.memory_budget_bytes:
                    break
                if not loaded._retire():
                    continue  # requests in flight: try the next one
                del self._ready[loaded.key]
                total -= loaded.model.memory_bytes
                evicted.append(loaded)
                self._evictions += 1
        for loaded in evicted:
            log.info(
                "evicted classic model %s (%d MiB in use, budget %d MiB)",
                loaded.key,
                total >> 20,
                self.memory_budget_bytes >> 20,
                extra={"model": loaded.key},
            )
        return evicted

    def batcher_stats(self) -> list[tuple[str, BatcherStats]]:
        with self._lock:
            loaded = list(self._ready.items())
        return [(key, entry.batcher.stats()) for key, entry in loaded]

    def entries(self) -> list[PoolEntry]:
        with self._lock:
            ready = [
                PoolEntry(key, "ready", loaded.model.memory_bytes, loaded.last_used)
                for key, loaded in self._ready.items()
            ]
            loading = [
                PoolEntry(key, "loading", 0, started) for key, started in self._load_started.items()
            ]
        return ready + loading

    def loaded(self, key: str) -> bool:
        with self._lock:
            return key in self._ready

    def evictions(self) -> int:
        """Models unloaded to make room (not those unloaded by `evict` or `close`)."""
        with self._lock:
            return self._evictions

    def evict(self, key: str) -> bool:
        """Unload one model now, e.g. when its version is archived; False if it is not loaded or
        has requests in flight. Blocks while its batcher stops (no batch is running)."""
        with self._lock:
            loaded = self._ready.get(key)
            if loaded is None or not loaded._retire():
                return False
            del self._ready[key]
        loaded.batcher.close()
        return True

    def close(self) -> None:
        """Unload everything; running batches finish, waiting requests get 503. A load still in
        progress is closed when it finishes."""
        with self._lock:
            self._closed = True
            loaded, self._ready = list(self._ready.values()), {}
        _close_all(loaded)


def _close_all(models: list[LoadedClassic]) -> None:
    for loaded in models:
        loaded.batcher.close()


def _retrieve(task: asyncio.Task[LoadedClassic]) -> None:
    """Mark a failed load's error as seen: its waiters have it, or all of them left."""
    if not task.cancelled():
        task.exception()
