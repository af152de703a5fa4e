"""The dynamic batcher, driven by the real MiniLM encoder and instrumented through its work
function: what each batch held is recorded as the model saw it."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from aiaas.engines.embeddings.encoder import SentenceEncoder
from aiaas.errors import InvalidRequest, PayloadTooLarge, RateLimited, ServiceUnavailable
from aiaas.scheduling.batcher import BatcherConfig, DynamicBatcher

from .conftest import generated_sentences

TokenIds = list[int]
DEADLINE_S = 30.0


class RecordingWork:
    """The encoder's `encode_ids`, recording every batch; optionally held at a gate so a test
    can line requests up behind a running batch."""

    def __init__(self, encoder: SentenceEncoder, *, hold_first: bool = False) -> None:
        self.encoder = encoder
        self.batches: list[list[TokenIds]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not hold_first:
            self.gate.set()

    def __call__(self, batch: list[TokenIds]) -> np.ndarray:
        self.batches.append([list(ids) for ids in batch])
        self.started.set()
        if not self.gate.wait(DEADLINE_S):
            raise TimeoutError("the test never opened the gate")
        return self.encoder.encode_ids(batch)

    def ran(self, ids: TokenIds) -> bool:
        return any(ids in batch for batch in self.batches)


def batcher_for(work: RecordingWork, **limits: Any) -> DynamicBatcher[TokenIds, np.ndarray]:
    return DynamicBatcher(work, size=len, config=BatcherConfig(**limits), name="test-embeddings")


async def eventually(condition: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def assert_vectors(got: Sequence[np.ndarray], want: np.ndarray) -> None:
    # A batch pads to its own longest input; that moves the floats, not the vectors.
    np.testing.assert_allclose(np.stack(got), want, atol=2e-5)


def test_concurrent_submitters_each_get_their_own_vectors_in_order(
    fp32_encoder: SentenceEncoder,
) -> None:
    sentences = generated_sentences(160, seed=11)
    rng = random.Random(3)
    requests = [rng.sample(sentences, rng.randint(1, 4)) for _ in range(64)]
    work = RecordingWork(fp32_encoder)

    async def scenario() -> list[list[np.ndarray]]:
        async with batcher_for(work, max_batch_items=16, max_wait_ms=10) as batcher:

            async def one(texts: list[str], tenant: str) -> list[np.ndarray]:
                ids = await asyncio.to_thread(fp32_encoder.tokenize, texts)
                return await batcher.submit(ids, tenant=tenant)

            return await asyncio.gather(
                *(one(texts, f"t{i % 5}") for i, texts in enumerate(requests))
            )

    results = asyncio.run(scenario())

    for texts, vectors in zip(requests, results, strict=True):
        assert len(vectors) == len(texts)
        assert_vectors(vectors, fp32_encoder.encode(texts))
    assert max(len(batch) for batch in work.batches) > 4  # more than any one request holds
    assert sum(len(batch) for batch in work.batches) == sum(len(texts) for texts in requests)


def test_batches_stay_within_item_and_padded_token_limits(fp32_encoder: SentenceEncoder) -> None:
    sentences = generated_sentences(120, seed=5)
    rng = random.Random(9)
    requests = [rng.sample(sentences, rng.randint(1, 6)) for _ in range(40)]
    tokenised = [fp32_encoder.tokenize(texts) for texts in requests]
    work = RecordingWork(fp32_encoder)

    async def scenario() -> list[list[np.ndarray]]:
        limits = {"max_batch_items": 8, "max_batch_tokens": 512, "max_wait_ms": 20}
        async with batcher_for(work, workers=2, **limits) as batcher:
            return await asyncio.gather(*(batcher.submit(ids) for ids in tokenised))

    results = asyncio.run(scenario())

    for batch in work.batches:
        assert len(batch) <= 8
        assert len(batch) * max(len(ids) for ids in batch) <= 512
        assert [len(ids) for ids in batch] == sorted(len(ids) for ids in batch)
    assert max(len(batch) for batch in work.batches) > 1
    for texts, vectors in zip(requests, results, strict=True):
        assert_vectors(vectors, fp32_encoder.encode(texts))


def test_a_cancelled_request_never_reaches_the_model(fp32_encoder: SentenceEncoder) -> None:
    first, gone, after = (fp32_encoder.tokenize([text]) for text in ("one", "two gone", "three"))
    work = RecordingWork(fp32_encoder, hold_first=True)

    async def scenario() -> tuple[list[np.ndarray], list[np.ndarray]]:
        async with batcher_for(work, max_wait_ms=0) as batcher:
            running = asyncio.create_task(batcher.submit(first))
            await asyncio.to_thread(work.started.wait, DEADLINE_S)
            waiting = asyncio.create_task(batcher.submit(gone))
            await eventually(lambda: batcher.stats().waiting_items == 1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert batcher.stats().waiting_items == 0
            work.gate.set()
            return await running, await batcher.submit(after)

    done_first, done_after = asyncio.run(scenario())

    assert not work.ran(gone[0])
    assert_vectors(done_first, fp32_encoder.encode(["one"]))
    assert_vectors(done_after, fp32_encoder.encode(["three"]))


def test_items_of_a_client_that_left_are_dropped_before_their_batch_runs(
    fp32_encoder: SentenceEncoder,
) -> None:
    # One short and one long input: sorted and split into two batches, the short one first.
    short, long = fp32_encoder.tokenize(["tiny", generated_sentences(18)[17]])
    assert len(long) > 200
    work = RecordingWork(fp32_encoder, hold_first=True)

    async def scenario() -> int:
        async with batcher_for(work, max_wait_ms=0) as batcher:
            request = asyncio.create_task(batcher.submit([long, short]))
            await asyncio.to_thread(work.started.wait, DEADLINE_S)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            work.gate.set()
            await batcher.submit([short])  # runs after the dropped batch would have
            return batcher.stats().dropped_items

    dropped = asyncio.run(scenario())

    assert work.batches[0] == [short]
    assert not work.ran(long)
    assert dropped == 1


def test_a_full_queue_answers_429_with_retry_after(fp32_encoder: SentenceEncoder) -> None:
    ids = fp32_encoder.tokenize(["a", "b", "c", "d", "e"])
    work = RecordingWork(fp32_encoder, hold_first=True)

    async def scenario() -> None:
        async with batcher_for(work, max_queued_items=4, max_wait_ms=0) as batcher:
            running = asyncio.create_task(batcher.submit(ids[:2]))
            await asyncio.to_thread(work.started.wait, DEADLINE_S)
            queued = asyncio.create_task(batcher.submit(ids[:4]))
            await eventually(batcher.is_overloaded)

            with pytest.raises(RateLimited) as refused:
                await batcher.submit(ids[4:])
            assert refused.value.status == 429
            assert refused.value.retry_after == 1
            with pytest.raises(PayloadTooLarge):
                await batcher.submit(ids)  # could never fit, so not worth a retry

            work.gate.set()
            assert len(await running) == 2 and len(await queued) == 4
            assert not batcher.is_overloaded()

    asyncio.run(scenario())


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on(
    fp32_encoder: SentenceEncoder,
) -> None:
    work = RecordingWork(fp32_encoder)

    async def scenario() -> None:
        async with batcher_for(work) as batcher:
            with pytest.raises(InvalidRequest, match="token ids"):
                await batcher.submit([[101, 10**6, 102]])  # not in the vocabulary
            with pytest.raises(InvalidRequest, match="size 0"):
                await batcher.submit([[]])
            assert len(await batcher.submit(fp32_encoder.tokenize(["still fine"]))) == 1

    asyncio.run(scenario())


def test_close_answers_waiting_requests_503_and_finishes_running_ones(
    fp32_encoder: SentenceEncoder,
) -> None:
    first, waiting_ids = fp32_encoder.tokenize(["running"]), fp32_encoder.tokenize(["waiting"])
    work = RecordingWork(fp32_encoder, hold_first=True)

    async def scenario() -> None:
        batcher = batcher_for(work, max_wait_ms=0)
        batcher.start()
        running = asyncio.create_task(batcher.submit(first))
        await asyncio.to_thread(work.started.wait, DEADLINE_S)
        waiting = asyncio.create_task(batcher.submit(waiting_ids))
        await eventually(lambda: batcher.stats().waiting_items == 1)

        closing = asyncio.create_task(batcher.aclose())
        with pytest.raises(ServiceUnavailable):
            await waiting
        work.gate.set()
        await closing
        assert_vectors(await running, fp32_encoder.encode(["running"]))
        with pytest.raises(ServiceUnavailable):
            await batcher.submit(first)

    asyncio.run(scenario())
