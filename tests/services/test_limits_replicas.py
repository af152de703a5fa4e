"""Concurrency caps shared by replicas on one Redis (issue 29): each replica counts under a key of
its own that a heartbeat keeps alive, so the places of a replica that died are free again within
`CONCURRENCY_TTL_S`, not held for ten minutes.

Two `RateLimiter`s on one Redis stand for two replicas (the real limiter, the real Redis); the
last test kills a real server with a stream in flight and starts it again.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from aiaas.domain import LimitLevel, RateLimits
from aiaas.errors import RateLimited
from aiaas.services.limits import (
    CONCURRENCY_HEARTBEAT_S,
    CONCURRENCY_TTL_S,
    Admission,
    RateLimiter,
    RedisConcurrency,
)
from tests.conftest import Server, create_org, require_service

pytestmark = pytest.mark.services

CHAT_MODEL = "smollm2-135m-instruct"
HOLD_STREAM = {
    "model": CHAT_MODEL,
    "messages": [{"role": "user", "content": "Say hi."}],
    "max_tokens": 1000,
    "stream": True,
    "logit_bias": {"0": -100, "2": -100},  # no end token: it streams until the client leaves
}


@pytest.fixture(scope="module")
def redis_url() -> str:
    return require_service("AIAAS_TEST_REDIS_URL", "Redis")


def _level(cap: int) -> tuple[LimitLevel, ...]:
    """A fresh key-level cap, so tests never meet in Redis."""
    limits = RateLimits(max_concurrent_requests=cap)
    return (LimitLevel(level="key", id=f"key_{secrets.token_hex(6)}", limits=limits),)


async def _admit_all(
    limiter: RateLimiter, levels: tuple[LimitLevel, ...], n: int
) -> list[Admission]:
    held = []
    for _ in range(n):
        admission = await limiter.admit_levels(levels)
        assert admission is not None
        held.append(admission)
    return held


async def _refused(limiter: RateLimiter, levels: tuple[LimitLevel, ...]) -> bool:
    try:
        admission = await limiter.admit_levels(levels)
    except RateLimited as refused:
        assert "concurrent requests" in refused.message
        return True
    assert admission is not None
    await limiter.release(admission)
    return False


def test_a_dead_replicas_places_free_up_within_the_ttl(redis_url: str) -> None:
    async def scenario() -> tuple[float, float]:
        levels = _level(3)
        alive, dying = RateLimiter.from_url(redis_url), RateLimiter.from_url(redis_url)
        try:
            await _admit_all(dying, levels, 3)  # never released: the replica "dies" holding them
            assert await _refused(alive, levels)
            assert await _refused(dying, levels)
            # The heartbeat keeps a live replica's places taken well past the TTL.
            await asyncio.sleep(CONCURRENCY_TTL_S + 2 * CONCURRENCY_HEARTBEAT_S)
            assert await _refused(alive, levels)
            # It dies: no heartbeat, no release. Its places come back within the TTL.
            assert isinstance(dying.concurrency, RedisConcurrency)
            await dying.concurrency.stop_heartbeat()
            died = time.monotonic()
            while await _refused(alive, levels):
                assert time.monotonic() - died < CONCURRENCY_TTL_S + 2, "places never came back"
                await asyncio.sleep(0.05)
            freed_after = time.monotonic() - died
            # All three are usable, and the cap holds again at three.
            mine = await _admit_all(alive, levels, 3)
            assert await _refused(alive, levels)
            for admission in mine:
                await alive.release(admission)
            return freed_after, CONCURRENCY_TTL_S
        finally:
            await alive.aclose()

    freed_after, ttl = asyncio.run(scenario())
    print(f"a dead replica's places came back {freed_after:.2f} s after its heartbeat stopped")
    # Freed by the key's expiry: at most the TTL after the last heartbeat (≤ 1 s before death).
    assert freed_after <= ttl + 0.5


def test_replicas_share_one_cap_exactly(redis_url: str) -> None:
    async def scenario() -> None:
        levels = _level(5)
        replicas = [RateLimiter.from_url(redis_url) for _ in range(2)]
        try:
            # 40 admissions race across both replicas: exactly 5 get in.
            async def try_admit(limiter: RateLimiter) -> Admission | None:
                try:
                    return await limiter.admit_levels(levels)
                except RateLimited:
                    return None

            tries = [try_admit(replicas[i % 2]) for i in range(40)]
            admitted = [(i, a) for i, a in enumerate(await asyncio.gather(*tries)) if a]
            assert len(admitted) == 5
            # A release on either replica frees a place for the other.
            i, first = admitted[0]
            await replicas[i % 2].release(first)
            other = replicas[(i + 1) % 2]
            again = await other.admit_levels(levels)
            assert again is not None
            assert await _refused(replicas[i % 2], levels)
            for j, admission in [*admitted[1:], (i + 1, again)]:
                await replicas[j % 2].release(admission)
            # Everything given back: the whole cap is free again, on either replica.
            for limiter in replicas:
                for admission in await _admit_all(limiter, levels, 5):
                    await limiter.release(admission)
        finally:
            for limiter in replicas:
                await limiter.aclose()

    asyncio.run(scenario())


def test_a_graceful_shutdown_gives_its_places_back_at_once(redis_url: str) -> None:
    async def scenario() -> None:
        levels = _level(2)
        leaving, staying = RateLimiter.from_url(redis_url), RateLimiter.from_url(redis_url)
        try:
            await _admit_all(leaving, levels, 2)
            assert await _refused(staying, levels)
            await leaving.aclose()
            assert not await _refused(staying, levels)
        finally:
            await staying.aclose()

    asyncio.run(scenario())


@pytest.fixture
def redis_server(make_server: Callable[..., Server], redis_url: str) -> Iterator[Server]:
    srv = make_server("sqlite", models=CHAT_MODEL, redis_url=redis_url)
    srv.start()
    yield srv
    srv.stop()


def _chat(server: Server, key: str) -> int:
    body = {**HOLD_STREAM, "stream": False, "max_tokens": 2, "logit_bias": {}}
    with server.client(key) as client:
        return client.post("/v1/chat/completions", json=body).status_code


def test_a_killed_server_does_not_hold_its_streams_places(redis_server: Server) -> None:
    org = create_org(redis_server)
    with redis_server.client(org.api_key) as client:
        made = client.post(
            "/v1/api_keys", json={"name": "one", "rate_limits": {"max_concurrent_requests": 1}}
        )
    assert made.status_code == 201, made.text
    key = made.json()["value"]
    stream = httpx.Client(
        base_url=redis_server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    with stream, stream.stream("POST", "/v1/chat/completions", json=HOLD_STREAM) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # held: a dropped iterator would close the stream
        first = next(line for line in lines if line.startswith("data:"))
        assert '"error"' not in first, first
        assert _chat(redis_server, key) == 429, first  # the stream holds the only place
        assert redis_server.process is not None
        redis_server.process.kill()  # SIGKILL: no release, no graceful shutdown
        redis_server.process.wait()
        killed = time.monotonic()
    redis_server.process = None
    redis_server.start()  # a new replica (the same data dir)
    while (status := _chat(redis_server, key)) == 429:
        assert time.monotonic() - killed < CONCURRENCY_TTL_S + 5, "the dead replica's place held"
        time.sleep(0.1)
    assert status == 200
    print(f"killed server's place free again {time.monotonic() - killed:.1f} s after the kill")
