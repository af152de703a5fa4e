"""Rate limits per organisation, project and key, on the `limits` library's counters.

Every metered request counts against each level (its org, its project, its key) that has caps:

- **requests per minute**: a moving window (exact: the requests of the last 60 seconds); a
  request over the cap is refused and not counted;
- **tokens per minute**: tokens are known only when a request ends, so they are added then
  (a fixed one-minute window that may overshoot), and a level whose minute is spent refuses
  new requests until the window turns, like OpenAI's;
- **concurrent requests**: a counter raised on admission and lowered when the response ends.

Counters live in the library's memory storage (one replica), or in Redis when
`AIAAS_REDIS_URL` is set, so every replica shares them. A replica that dies with requests in
flight leaves their concurrency counts behind until the counter's key expires
(`CONCURRENCY_LEASE_S`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from limits import RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from limits.storage import storage_from_string

from aiaas.domain import LimitLevel, Principal
from aiaas.errors import RateLimited

CONCURRENCY_LEASE_S = 600


@dataclass
class Admission:
    """A request let through: what it holds, and the `x-ratelimit-*` headers it reports."""

    levels: tuple[LimitLevel, ...]
    concurrency_keys: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


class RateLimiter:
    def __init__(self, storage: Storage, *, prefix: str = "aiaas") -> None:
        self._storage = storage
        self._prefix = prefix
        self._requests = MovingWindowRateLimiter(storage)
        self._tokens = FixedWindowRateLimiter(storage)

    @classmethod
    def from_url(cls, redis_url: str | None) -> RateLimiter:
        """Memory storage, or Redis (through redis-py's asyncio client) when a URL is given."""
        if not redis_url:
            return cls(storage_from_string("async+memory://"))  # type: ignore[arg-type]
        uri = redis_url if redis_url.startswith("async+") else f"async+{redis_url}"
        return cls(storage_from_string(uri, implementation="redispy"))  # type: ignore[arg-type]

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
                    raise _refused(
                        level, "tokens per min (TPM)", tpm, stats.reset_time - now, "tokens"
                    )
        for level in levels:
            rpm = level.limits.requests_per_minute
            if rpm is not None and not await self._requests.test(_per_minute(rpm), *_ids(level)):
                stats = await self._requests.get_window_stats(_per_minute(rpm), *_ids(level))
                raise _refused(
                    level, "requests per min (RPM)", rpm, stats.reset_time - now, "requests"
                )
        for level in levels:
            rpm = level.limits.requests_per_minute
            if rpm is not None:
                await self._requests.hit(_per_minute(rpm), *_ids(level))
        admission = Admission(levels=levels)
        for level in levels:
            cap = level.limits.max_concurrent_requests
            if cap is None:
                continue
            key = f"{self._prefix}/concurrent/{level.level}/{level.id}"
            running = await self._storage.incr(key, CONCURRENCY_LEASE_S, 1)
            admission.concurrency_keys.append(key)
            if running > cap:
                await self.release(admission)
                raise _refused(level, "concurrent requests", cap, 1.0, "requests")
        admission.headers = await self._headers(levels, now)
        return admission

    async def release(self, admission: Admission, *, tokens: int = 0) -> None:
        """The request ended: free its concurrency and charge its tokens."""
        for key in admission.concurrency_keys:
            left = await self._storage.incr(key, CONCURRENCY_LEASE_S, -1)
            if left < 0:  # the key expired under running requests: never go below zero
                await self._storage.incr(key, CONCURRENCY_LEASE_S, -left)
        admission.concurrency_keys.clear()
        if tokens > 0:
            for level in admission.levels:
                tpm = level.limits.tokens_per_minute
                if tpm is not None:
                    await self._tokens.hit(_per_minute(tpm), *_ids(level), cost=tokens)

    async def _headers(self, levels: tuple[LimitLevel, ...], now: float) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers, for the tightest level of each kind."""
        headers: dict[str, str] = {}
        for kind, attr, limiter in (
            ("requests", "requests_per_minute", self._requests),
            ("tokens", "tokens_per_minute", self._tokens),
        ):
            tightest: tuple[int, int, float] | None = None  # remaining, cap, reset
            for level in levels:
                cap = getattr(level.limits, attr)
                if cap is None:
                    continue
                stats = await limiter.get_window_stats(_per_minute(cap), *_ids(level))
                if tightest is None or stats.remaining < tightest[0]:
                    tightest = (stats.remaining, cap, stats.reset_time)
            if tightest is not None:
                remaining, cap, reset = tightest
                headers[f"x-ratelimit-limit-{kind}"] = str(cap)
                headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
                headers[f"x-ratelimit-reset-{kind}"] = duration(max(reset - now, 0.0))
        return headers


def _per_minute(amount: int) -> RateLimitItemPerMinute:
    return RateLimitItemPerMinute(amount)


def _ids(level: LimitLevel) -> tuple[str, str]:
    return level.level, level.id


def _refused(level: LimitLevel, what: str, cap: int, wait_s: float, kind: str) -> RateLimited:
    wait_s = max(wait_s, 0.001)
    error = RateLimited(
        f"Rate limit reached for {_LEVEL_NAMES[level.level]} {level.id} on {what}: "
        f"Limit {cap}. Please try again in {duration(wait_s)}.",
        retry_after=wait_s,
    )
    error.type = kind
    return error


_LEVEL_NAMES = {"org": "organization", "project": "project", "key": "API key", "grant": "grant"}


def duration(seconds: float) -> str:
    """A wait as OpenAI writes it: `120ms`, `7s`, `1m30s`."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"
