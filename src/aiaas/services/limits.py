"""Rate limits per organisation, project and key, on the `limits` library's counters.

Every metered request counts against each level (its org, its project, its key) that has caps:

- **requests per minute**: a moving window (exact: the requests of the last 60 seconds); a
  request over the cap is refused and not counted;
- **tokens per minute**: tokens are known only when a request ends, so they are added then
  (a fixed one-minute window that may overshoot), and a level whose minute is spent refuses
  new requests until the window turns, like OpenAI's;
- **concurrent requests**: a count raised on admission and lowered when the response ends.

Request and token counters live in the library's memory storage (one replica), or in Redis when
`AIAAS_REDIS_URL` is set, so every replica shares them. Every answer of a level with a request
or token cap carries OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers
(for the tightest level of each kind), the 429 that refuses a request included.

Concurrency is counted per replica. Alone, a replica keeps the counts in memory. With Redis,
each replica keeps its own count of each level under a key of its own (`…/r/<replica>`) that
expires `CONCURRENCY_TTL_S` after it was last written; a heartbeat rewrites the replica's
counts every `CONCURRENCY_HEARTBEAT_S`, and admission sums the counts of the live replicas (a
Lua script, so two replicas never both take the last place). A replica that dies stops its
heartbeat: its places are free again within `CONCURRENCY_TTL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from limits import RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from limits.storage import storage_from_string

from aiaas.domain import LimitLevel, Principal
from aiaas.errors import RateLimited
from aiaas.ids import unique_hex

log = logging.getLogger("aiaas.limits")

# A replica's concurrency counts in Redis outlive its last heartbeat by this much: the longest a
# dead replica's places stay taken.
CONCURRENCY_TTL_S = 5.0
CONCURRENCY_HEARTBEAT_S = 1.0
WINDOW_S = 60.0  # the request and token windows: a wait is never longer (the library rounds up)


@dataclass
class Admission:
    """A request let through: what it holds, and the `x-ratelimit-*` headers it reports."""

    levels: tuple[LimitLevel, ...]
    concurrency_keys: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


class Concurrency(Protocol):
    """Places taken per level key, across the replicas that share them."""

    async def acquire(self, key: str, cap: int) -> bool: ...

    async def release(self, key: str) -> None: ...

    async def aclose(self) -> None: ...


class LocalConcurrency:
    """One replica: plain counts in memory (they end with the process)."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    async def acquire(self, key: str, cap: int) -> bool:
        if self._held.get(key, 0) >= cap:
            return False
        self._held[key] = self._held.get(key, 0) + 1
        return True

    async def release(self, key: str) -> None:
        left = self._held.get(key, 0) - 1
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)

    def running(self, key: str) -> int:
        return self._held.get(key, 0)

    async def aclose(self) -> None:
        self._held.clear()


# KEYS[1]: the level's set of replicas; KEYS[2]: this replica's count.
# ARGV: replica id, this replica's count with the new request, cap, ttl (ms), count key prefix.
# Returns the places taken (this request included), negated when over the cap (then undone).
_ACQUIRE = """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local total = 0
for _, replica in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local n = redis.call('GET', ARGV[5] .. replica)
  if n then
    total = total + tonumber(n)
  else
    redis.call('SREM', KEYS[1], replica)
  end
end
if total > tonumber(ARGV[3]) then
  local own = tonumber(ARGV[2]) - 1
  if own > 0 then
    redis.call('SET', KEYS[2], own, 'PX', ARGV[4])
  else
    redis.call('DEL', KEYS[2])
    redis.call('SREM', KEYS[1], ARGV[1])
  end
  return -total
end
return total
"""

# KEYS[1], KEYS[2] and ARGV[1] as above; ARGV[2]: this replica's count; ARGV[3]: ttl (ms).
_WRITE = """
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  redis.call('SADD', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('DEL', KEYS[2])
  redis.call('SREM', KEYS[1], ARGV[1])
end
return 0
"""


class RedisConcurrency:
    """Concurrency shared by the replicas on one Redis, each counting under its own key.

    Each replica's counts are authoritative in its own memory; every write of its key (admit,
    release, heartbeat) sets the key to that count under a per-key lock, so writes never arrive
    out of order and a key that expired under a stalled event loop is rewritten whole by the
    next heartbeat."""

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = "aiaas",
        ttl_s: float = CONCURRENCY_TTL_S,
        heartbeat_s: float = CONCURRENCY_HEARTBEAT_S,
        replica: str | None = None,
    ) -> None:
        import redis.asyncio  # the `redis` extra; the limiter's Redis storage needs it too

        # Timeouts: a Redis that stops answering fails admissions (503), never hangs them.
        self._redis: Any = redis.asyncio.Redis.from_url(
            redis_url.removeprefix("async+"), socket_timeout=5.0, socket_connect_timeout=5.0
        )
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._heartbeat_s = heartbeat_s
        self.replica = replica or unique_hex()[:16]
        self._held: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._write = self._redis.register_script(_WRITE)
        self._heartbeat: asyncio.Task[None] | None = None
        self._beating = True

    def _keys(self, key: str) -> tuple[str, str, str]:
        """(replica set, this replica's count, the count keys' prefix); the braces keep a
        level's keys in one Redis Cluster slot, as a script needs."""
        base = f"{self._prefix}/concurrent/{{{key}}}"
        return f"{base}/replicas", f"{base}/r/{self.replica}", f"{base}/r/"

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def acquire(self, key: str, cap: int) -> bool:
        self._start_heartbeat()
        replicas, own, counts = self._keys(key)
        async with self._lock(key):
            held = self._held.get(key, 0)
            total = await self._acquire(
                keys=[replicas, own], args=[self.replica, held + 1, cap, self._ttl_ms, counts]
            )
            if int(total) < 0:
                return False
            self._held[key] = held + 1
            return True

    async def release(self, key: str) -> None:
        replicas, own, _ = self._keys(key)
        async with self._lock(key):
            left = max(0, self._held.get(key, 0) - 1)
            if left:
                self._held[key] = left
            else:
                self._held.pop(key, None)
            await self._write(keys=[replicas, own], args=[self.replica, left, self._ttl_ms])

    def running(self, key: str) -> int:
        """This replica's own count of `key`."""
        return self._held.get(key, 0)

    async def beat(self) -> None:
        """Rewrite every count this replica holds, with a fresh expiry."""
        for key in list(self._held):
            replicas, own, _ = self._keys(key)
            async with self._lock(key):
                held = self._held.get(key, 0)
                if held and self._beating:
                    await self._write(keys=[replicas, own], args=[self.replica, held, self._ttl_ms])

    def _start_heartbeat(self) -> None:
        if self._beating and (self._heartbeat is None or self._heartbeat.done()):
            self._heartbeat = asyncio.get_running_loop().create_task(
                self._beat_forever(), name=f"concurrency-heartbeat-{self.replica}"
            )

    async def _beat_forever(self) -> None:
        while self._beating:
            await asyncio.sleep(self._heartbeat_s)
            if not self._beating:
                return
            try:
                await self.beat()
            except Exception:  # Redis away: the next beat tries again
                log.warning("could not refresh the concurrency counts in Redis", exc_info=True)

    async def stop_heartbeat(self) -> None:
        """Stop refreshing (what a replica that dies does): its counts expire on their own."""
        self._beating = False
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """Shut down: stop the heartbeat, give back what is still held, close the client."""
        await self.stop_heartbeat()
        try:
            for key in list(self._held):
                replicas, own, _ = self._keys(key)
                await self._write(keys=[replicas, own], args=[self.replica, 0, self._ttl_ms])
            await self._redis.aclose()
        except Exception:  # shutting down: the keys expire anyway
            log.warning("could not give back the concurrency counts in Redis", exc_info=True)
        self._held.clear()


class RateLimiter:
    def __init__(
        self,
        storage: Storage,
        *,
        prefix: str = "aiaas",
        concurrency: Concurrency | None = None,
    ) -> None:
        self._storage = storage
        self._prefix = prefix
        self._requests = MovingWindowRateLimiter(storage)
        self._tokens = FixedWindowRateLimiter(storage)
        self.concurrency: Concurrency = concurrency or LocalConcurrency()

    @classmethod
    def from_url(cls, redis_url: str | None, **concurrency: Any) -> RateLimiter:
        """Memory storage, or Redis (through redis-py's asyncio client) when a URL is given;
        `concurrency`: RedisConcurrency's options (ttl_s, heartbeat_s, replica)."""
        if not redis_url:
            return cls(storage_from_string("async+memory://"))  # type: ignore[arg-type]
        uri = redis_url if redis_url.startswith("async+") else f"async+{redis_url}"
        return cls(
            storage_from_string(uri, implementation="redispy"),  # type: ignore[arg-type]
            concurrency=RedisConcurrency(redis_url, **concurrency),
        )

    async def aclose(self) -> None:
        await self.concurrency.aclose()

    async def admit(self, principal: Principal) -> Admission | None:
        """Count a new request against every level with caps, or raise 429 without counting it.

        None when no level has caps (the common case costs nothing)."""
        return await self.admit_levels(principal.limits)

    async def admit_levels(self, levels: tuple[LimitLevel, ...]) -> Admission | None:
        """`admit` for any levels: an org, project or key's, or a grant's own cap."""
        if not levels:
            return None
        now = time.time()
        for level in levels:
            tpm = level.limits.tokens_per_minute
            if tpm is not None:
                stats = await self._tokens.get_window_stats(_per_minute(tpm), *_ids(level))
                if stats.remaining <= 0:
                    raise await self._refused(
                        levels, level, "tokens per min (TPM)", tpm, stats.reset_time - now, "tokens"
                    )
        for level in levels:
            rpm = level.limits.requests_per_minute
            if rpm is not None and not await self._requests.test(_per_minute(rpm), *_ids(level)):
                stats = await self._requests.get_window_stats(_per_minute(rpm), *_ids(level))
                raise await self._refused(
                    levels, level, "requests per min (RPM)", rpm, stats.reset_time - now, "requests"
                )
        for level in levels:
            rpm = level.limits.requests_per_minute
            if rpm is not None:
                await self._requests.hit(_per_minute(rpm), *_ids(level))
        admission = Admission(levels=levels)
        try:
            for level in levels:
                cap = level.limits.max_concurrent_requests
                if cap is None:
                    continue
                key = f"{level.level}/{level.id}"
                if not await self.concurrency.acquire(key, cap):
                    raise await self._refused(
                        levels, level, "concurrent requests", cap, 1.0, "requests"
                    )
                admission.concurrency_keys.append(key)
            admission.headers = await self._headers(levels, now)
        except BaseException:
            # Refused, the store failed or the client left: give back what was taken, or the
            # heartbeat would keep it taken for as long as this replica lives.
            try:
                await asyncio.shield(self.release(admission))
            except Exception:  # the count itself is given back; the heartbeat rewrites Redis
                log.warning("could not give back the concurrency counts", exc_info=True)
            raise
        return admission

    async def release(self, admission: Admission, *, tokens: int = 0) -> None:
        """The request ended: free its concurrency and charge its tokens."""
        for key in admission.concurrency_keys:
            await self.concurrency.release(key)
        admission.concurrency_keys.clear()
        if tokens > 0:
            for level in admission.levels:
                tpm = level.limits.tokens_per_minute
                if tpm is not None:
                    await self._tokens.hit(_per_minute(tpm), *_ids(level), cost=tokens)

    async def _refused(
        self,
        levels: tuple[LimitLevel, ...],
        level: LimitLevel,
        what: str,
        cap: int,
        wait_s: float,
        kind: str,
    ) -> RateLimited:
        """The 429 for `level`, carrying the same `x-ratelimit-*` headers as an answer would."""
        wait_s = min(max(wait_s, 0.001), WINDOW_S)
        error = RateLimited(
            f"Rate limit reached for {_LEVEL_NAMES[level.level]} {level.id} on {what}: "
            f"Limit {cap}. Please try again in {duration(wait_s)}.",
            retry_after=wait_s,
            headers=await self._headers(levels, time.time()),
        )
        error.type = kind
        return error

    async def _headers(self, levels: tuple[LimitLevel, ...], now: float) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers, for the tightest level of each kind (the fewest
        left; of those, the one that waits longest)."""
        headers: dict[str, str] = {}
        for kind, attr, limiter in (
            ("requests", "requests_per_minute", self._requests),
            ("tokens", "tokens_per_minute", self._tokens),
        ):
            tightest: tuple[int, float, int] | None = None  # remaining, -reset, cap
            for level in levels:
                cap = getattr(level.limits, attr)
                if cap is None:
                    continue
                stats = await limiter.get_window_stats(_per_minute(cap), *_ids(level))
                candidate = (max(0, stats.remaining), -stats.reset_time, cap)
                if tightest is None or candidate[:2] < tightest[:2]:
                    tightest = candidate
            if tightest is not None:
                remaining, reset, cap = tightest
                headers[f"x-ratelimit-limit-{kind}"] = str(cap)
                headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
                wait_s = min(max(-reset - now, 0.0), WINDOW_S)
                headers[f"x-ratelimit-reset-{kind}"] = duration(wait_s)
        return headers


def _per_minute(amount: int) -> RateLimitItemPerMinute:
    return RateLimitItemPerMinute(amount)


def _ids(level: LimitLevel) -> tuple[str, str]:
    return level.level, level.id


_LEVEL_NAMES = {"org": "organization", "project": "project", "key": "API key", "grant": "grant"}


def duration(seconds: float) -> str:
    """A wait as OpenAI writes it: `120ms`, `7s`, `1m30s`."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"
