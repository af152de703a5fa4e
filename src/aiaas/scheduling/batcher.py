"""Dynamic batching: merge concurrent requests into few, well-filled calls of a work function.

Callers `await batcher.submit(items, tenant=..., weight=...)` and get one result per item, in
their order. Behind that door:

    submit (event loop) --push--> AdmissionPolicy: waiting requests, at most max_queued_items
    work thread(s), each in a loop:
        take a batch: one planned earlier, or wait up to max_wait_ms for a full one, take
        items in the policy's order, sort them by size and cut them into batches that respect
        max_batch_items and max_batch_tokens (the first is run, the rest wait for a free
        thread), dropping items whose client left;
        results = work(batch); results go back to each request's future through
        loop.call_soon_threadsafe

Sorting pays because a batch costs its item count times its longest item (everything is padded
to it): short and long inputs that arrive together run as two calls instead of one padded call.

A work thread forms its own next batch the moment it finishes one. (A scheduler thread that
formed batches for an executor's threads cost two thread wake-ups per batch; on a busy two-core
box each waited for a CPU, and traces showed work threads idle 15 % of the time with requests
waiting.) The event loop only pushes and awaits; everything the threads share sits behind one
condition variable.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, NamedTuple, Protocol, TypeVar, cast

from aiaas.errors import (
    ConfigurationError,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    ServiceUnavailable,
)
from aiaas.scheduling.fair import AdmissionPolicy, FifoPolicy, Ticket

__all__ = ["BatchRequest", "BatcherConfig", "BatcherStats", "DynamicBatcher", "Results"]

In = TypeVar("In")  # one input item, e.g. a list of token ids
Out = TypeVar("Out")  # its result, e.g. a vector
Row = TypeVar("Row", covariant=True)


class Results(Protocol[Row]):
    """What `work` returns: one result per item, by position (a list, or a numpy matrix)."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> Row: ...


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    max_batch_items: int = 32
    max_batch_tokens: int = 8192  # per work call: items x size of its largest item (padded)
    max_wait_ms: float = 5.0  # how long a waiting item may be held back to fill a batch
    max_queued_items: int = 2048  # waiting items before submit answers 429
    workers: int = 1  # work calls in flight at once
    # The fixed cost of one work call, in size units: sorted items are split into two calls
    # only where the padding saved outweighs it. MiniLM on ORT: 16 to 64 all run mixed-length
    # traffic 2x faster than one padded call; 32 makes fewer calls.
    batch_overhead_tokens: int = 32
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        counts = (self.max_batch_items, self.max_batch_tokens, self.max_queued_items, self.workers)
        if min(counts) < 1 or self.batch_overhead_tokens < 1 or self.max_wait_ms < 0:
            raise ConfigurationError(f"batcher limits must be positive: {self}")


@dataclass(frozen=True, slots=True)
class BatcherStats:
    waiting_requests: int
    waiting_items: int
    in_flight: int  # work calls running now
    batches: int  # work calls finished
    items: int  # items those calls held
    dropped_items: int  # items never run because their client left
    # Finished batches by item count: [i] counts those of at most BATCH_SIZE_BUCKETS[i] items
    # (and more than the bucket before); the last entry, those larger than every bucket.
    batch_sizes: tuple[int, ...] = ()


BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(eq=False)
class BatchRequest(Generic[In, Out]):
    """One `submit` call: its items, where their results go, and how far it has got."""

    items: list[In]
    sizes: list[int]
    future: asyncio.Future[list[Out]]
    loop: asyncio.AbstractEventLoop
    arrived: float  # time.monotonic() at submit
    remaining: int  # items whose result is still missing
    results: list[Out | None]  # filled by position as batches finish
    taken: int = 0  # items handed to batches so far
    closed: bool = False  # answered, failed or cancelled: its leftover items are skipped


class _Item(NamedTuple, Generic[In, Out]):
    request: BatchRequest[In, Out]
    offset: int  # where in the request's items
    size: int


class _State(StrEnum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class DynamicBatcher(Generic[In, Out]):
    def __init__(
        self,
        work: Callable[[list[In]], Results[Out]],
        *,
        size: Callable[[In], int] | None = None,
        config: BatcherConfig | None = None,
        policy: AdmissionPolicy[BatchRequest[In, Out]] | None = None,
        name: str = "batcher",
    ) -> None:
        """`work` maps a batch to one result per item, in order; it runs on a work thread.
        `size` (e.g. tokens per item) must be cheap: it runs on the caller's thread in submit."""
        self.name = name
        self.config = config or BatcherConfig()
        self._work = work
        self._size = size or (lambda _item: 1)
        self._policy: AdmissionPolicy[BatchRequest[In, Out]] = (
            policy if policy is not None else FifoPolicy()
        )
        self._cond = threading.Condition()
        self._state = _State.NEW
        self._waiting_items = 0
        self._waiting_size = 0
        self._in_flight = 0
        self._size_counts = [0] * (len(BATCH_SIZE_BUCKETS) + 1)
        self._batches = self._items_run = self._dropped = 0  # counters for stats()
        self._planned: deque[list[_Item[In, Out]]] = deque()  # cut from a round, not yet run
        self._planning = False  # a thread is cutting a round into batches, outside the lock
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._state is not _State.NEW:
                raise RuntimeError(f"batcher {self.name} is {self._state}; it starts once")
            self._state = _State.RUNNING
        self._threads = [
            threading.Thread(target=self._serve, name=f"{self.name}-work_{i}", daemon=True)
            for i in range(self.config.workers)
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop taking work: waiting requests get 503, batches already running finish."""
        stopped = ServiceUnavailable(f"{self.name} stopped")
        self._fail_waiting(stopped)
        for thread in self._threads:
            thread.join()
        self._fail_waiting(stopped)  # batches a thread cut from its last round but never ran

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)  # joining threads must not block the loop

    async def __aenter__(self) -> DynamicBatcher[In, Out]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the public doors ----------------------------------------------------------------------

    async def submit(
        self,
        items: Sequence[In],
        *,
        tenant: str = "-",
        weight: float = 1.0,
        background: bool = False,
    ) -> list[Out]:
        """Results for exactly `items`, in order. 429 when the queue is full; cancelling the
        awaiting task withdraws the items that have not run yet.

        `background` (a batch line) waits behind every interactive request and may fill only
        half the queue, so a batch never makes an interactive request a 429."""
        if not items:
            return []
        self._check_sizes(sizes := [self._size(item) for item in items])
        loop = asyncio.get_running_loop()
        request: BatchRequest[In, Out] = BatchRequest(
            items=list(items),
            sizes=sizes,
            future=loop.create_future(),
            loop=loop,
            arrived=time.monotonic(),
            remaining=len(sizes),
            results=[None] * len(sizes),
        )
        with self._cond:
            if self._state is not _State.RUNNING:
                raise ServiceUnavailable(f"{self.name} is not running")
            limit = self.config.max_queued_items // (2 if background else 1)
            if self._waiting_items + len(items) > limit and not (
                background and not self._waiting_items  # a big line still runs when alone
            ):
                raise RateLimited(
                    f"{self.name} has {self._waiting_items} items waiting "
                    f"(limit {limit}); try again soon.",
                    retry_after=self.config.retry_after_s,
                )
            ticket = Ticket(
                item=request,
                tenant=tenant,
                weight=weight,
                cost=float(sum(sizes)),
                background=background,
            )
            self._policy.push(ticket)
            self._waiting_items += len(items)
            self._waiting_size += sum(sizes)
            self._cond.notify()  # one idle work thread is enough; busy ones look on their own
        try:
            return await request.future
        except asyncio.CancelledError:
            with self._cond:
                self._withdraw(request)
            raise

    def is_overloaded(self) -> bool:
        """True when the queue is full: a router can answer 429 without building the request."""
        with self._cond:
            return self._waiting_items >= self.config.max_queued_items

    def stats(self) -> BatcherStats:
        with self._cond:
            return BatcherStats(
                waiting_requests=len(self._policy),
                waiting_items=self._waiting_items,
                in_flight=self._in_flight,
                batches=self._batches,
                items=self._items_run,
                dropped_items=self._dropped,
                batch_sizes=tuple(self._size_counts),
            )

    def _check_sizes(self, sizes: list[int]) -> None:
        if (count := len(sizes)) > self.config.max_queued_items:
            limit = self.config.max_queued_items
            raise PayloadTooLarge(
                f"{count} inputs; {self.name} queues at most {limit}", param="input"
            )
        for index, size in enumerate(sizes):
            if not 1 <= size <= self.config.max_batch_tokens:
                raise InvalidRequest(
                    f"input {index} has size {size}; {self.name} takes 1 to "
                    f"{self.config.max_batch_tokens} per item",
                    param="input",
                )

    # -- work threads ----------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._run(batch)
        except BaseException:  # a policy raised: nobody may wait forever on dead threads
            self._fail_waiting(ServiceUnavailable(f"{self.name} stopped"))
            raise

    def _next_batch(self) -> list[_Item[In, Out]] | None:
        """The next batch for this (free) thread, without the items of gone clients; None once
        closed."""
        while True:
            with self._cond:
                claimed = self._claim()
            if claimed is None:
                return None
            batch, planned = claimed
            if not planned:  # cut outside the lock, so that `submit` never waits on it
                rest: list[list[_Item[In, Out]]] = []
                try:
                    batch.sort(key=lambda item: item.size)  # stable: equal sizes keep order
                    sizes = [item.size for item in batch]
                    first, *rest = (batch[a:b] for a, b in _plan_batches(sizes, self.config))
                    batch = first
                finally:
                    with self._cond:
                        self._planning = False
                        self._planned.extend(rest)
                        self._cond.notify_all()
            with self._cond:
                live = [item for item in batch if not item.request.closed]
                self._dropped += len(batch) - len(live)
                if live:
                    self._in_flight += 1
                    return live

    def _claim(self) -> tuple[list[_Item[In, Out]], bool] | None:
        """(a batch planned earlier, True), or (a round of items taken in policy order, False)
        once one is full or its oldest item has waited max_wait_ms; None once closed (lock
        held)."""
        config = self.config
        while True:
            if self._state is _State.CLOSED:
                return None
            if self._planned:
                return self._planned.popleft(), True
            if self._planning:  # its other batches go before any newer round
                self._cond.wait()
                continue
            head = self._policy.peek()
            if head is None:
                self._cond.wait()
                continue
            full = (
                self._waiting_items >= config.max_batch_items
                or self._waiting_size >= config.max_batch_tokens
            )
            left = head.item.arrived + config.max_wait_ms / 1000 - time.monotonic()
            if full or left <= 0:
                self._planning = True
                return self._take(), False
            self._cond.wait(left)

    def _take(self) -> list[_Item[In, Out]]:
        """Items in policy order up to one batch's item count and summed size (lock held)."""
        taken: list[_Item[In, Out]] = []
        total = 0
        while len(taken) < self.config.max_batch_items and (ticket := self._policy.peek()):
            request = ticket.item
            while request.taken < len(request.items) and len(taken) < self.config.max_batch_items:
                size = request.sizes[request.taken]
                if taken and total + size > self.config.max_batch_tokens:
                    break
                taken.append(_Item(request, request.taken, size))
                total += size
                request.taken += 1
            if request.taken < len(request.items):
                break  # the round is full; the rest of this request leads the next one
            self._policy.pop()
        self._waiting_items -= len(taken)
        self._waiting_size -= total
        return taken

    def _run(self, batch: list[_Item[In, Out]]) -> None:
        """Run `work` on one batch and hand its results back; a failing batch fails its
        requests, not this thread."""
        error: BaseException | None = None
        results: Results[Out] = ()
        try:
            results = self._work([item.request.items[item.offset] for item in batch])
        except Exception as exc:  # noqa: BLE001 - whatever `work` raises goes to the callers
            error = exc
        else:
            if len(results) != len(batch):
                error = ServerError(f"{self.name}: {len(results)} results for {len(batch)} items")
        answers: list[tuple[BatchRequest[In, Out], BaseException | None]] = []
        with self._cond:
            self._in_flight -= 1
            self._batches += 1
            self._items_run += len(batch)
            self._size_counts[bisect.bisect_left(BATCH_SIZE_BUCKETS, len(batch))] += 1
            for position, item in enumerate(batch):
                request = item.request
                if request.closed:
                    continue
                if error is not None:
                    self._withdraw(request)
                    answers.append((request, error))
                    continue
                request.results[item.offset] = results[position]
                request.remaining -= 1
                if request.remaining == 0:
                    request.closed = True
                    answers.append((request, None))
        for request, failure in answers:
            _post(request, failure)

    def _withdraw(self, request: BatchRequest[In, Out]) -> None:
        """Close a request and drop its items that are still waiting (lock held)."""
        request.closed = True
        if self._policy.remove(request):
            left = request.sizes[request.taken :]
            self._waiting_items -= len(left)
            self._waiting_size -= sum(left)
            self._dropped += len(left)
            self._cond.notify_all()

    def _fail_waiting(self, error: BaseException) -> None:
        """Answer every request not yet done with `error` and refuse new work."""
        failed: list[BatchRequest[In, Out]] = []
        with self._cond:
            self._state = _State.CLOSED  # also when a work thread died: refuse new work
            self._cond.notify_all()
            requests = [item.request for batch in self._planned for item in batch]
            self._planned.clear()
            while len(self._policy):
                requests.append(self._policy.pop().item)
            for request in dict.fromkeys(requests):  # once each, in order
                if not request.closed:
                    request.closed = True
                    failed.append(request)
            self._waiting_items = self._waiting_size = 0
        for request in failed:
            _post(request, error)


def _plan_batches(sizes: list[int], config: BatcherConfig) -> list[tuple[int, int]]:
    """Cut ascending `sizes` into runs [start, end) that minimise the padded cost
    sum(overhead + count * largest), each within max_batch_items and max_batch_tokens."""
    count = len(sizes)
    best = [0.0] + [math.inf] * count
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        largest = sizes[end - 1]
        for start in range(end - 1, max(end - config.max_batch_items, 0) - 1, -1):
            if (end - start) * largest > config.max_batch_tokens:
                break
            cost = best[start] + config.batch_overhead_tokens + (end - start) * largest
            if cost <= best[end]:  # on a tie, the larger batch
                best[end], cut[end] = cost, start
    runs: list[tuple[int, int]] = []
    end = count
    while end > 0:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]


def _post(request: BatchRequest[In, Out], error: BaseException | None) -> None:
    """Complete a request's future on its own loop's thread."""
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
        request.loop.call_soon_threadsafe(_settle, request, error)


def _settle(request: BatchRequest[In, Out], error: BaseException | None) -> None:
    if request.future.done():  # cancelled by its caller meanwhile
        return
    if error is not None:
        request.future.set_exception(error)
    else:
        request.future.set_result(cast(list[Out], request.results))
