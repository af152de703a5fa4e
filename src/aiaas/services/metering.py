"""The life of a metered request: quota and rate limits on the way in, usage on the way out.

`begin` runs as a route dependency, before any work; `end` runs when the response has been
sent (the request middleware calls it), so a stream is measured to its last chunk and its
concurrency is held until then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from aiaas.domain import Grant, LimitLevel, Principal, RateLimits, UsageRow
from aiaas.errors import InsufficientQuota, RateLimited, ServiceUnavailable
from aiaas.observability.metrics import Metrics
from aiaas.services.limits import Admission, RateLimiter
from aiaas.services.usage import UsageMeter

log = logging.getLogger("aiaas.metering")


@dataclass
class MeteredCall:
    """One metered request; the route fills in the model and what it used."""

    principal: Principal
    endpoint: str
    admission: Admission | None
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    model: str = "-"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    items: int = 0
    # Set when the call uses another organisation's object: the grant it goes through (billed
    # to the caller all the same; the owner sees it in its shared usage and, aggregated per
    # minute, in its audit log), and the admission of the grant's own cap.
    grant: Grant | None = None
    grant_admission: Admission | None = None
    # A line of a batch: its engine work waits behind interactive requests, and its usage is
    # flagged (and discounted in quotas).
    background: bool = False

    @property
    def org_id(self) -> str:
        return self.principal.org_id or "platform"

    def count(
        self, *, model: str, prompt_tokens: int = 0, completion_tokens: int = 0, items: int = 0
    ) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.items = items

    @property
    def headers(self) -> dict[str, str]:
        return self.admission.headers if self.admission else {}


class Metering:
    def __init__(self, limiter: RateLimiter, meter: UsageMeter, metrics: Metrics) -> None:
        self.limiter = limiter
        self.meter = meter
        self._metrics = metrics

    async def begin(self, principal: Principal, endpoint: str) -> MeteredCall:
        try:
            self.meter.check_quota(principal)
            admission = await self.limiter.admit(principal)
        except RateLimited as refused:
            reason = "quota" if isinstance(refused, InsufficientQuota) else refused.type
            self._metrics.rate_limited.labels(
                org=principal.org_id or "platform", reason=reason
            ).inc()
            raise
        except Exception as exc:  # the limiter's store (Redis) failed: refuse, never guess
            log.exception("rate limiter unavailable")
            raise ServiceUnavailable(
                "Rate limits cannot be checked right now; try again soon.",
                retry_after=1,
            ) from exc
        return MeteredCall(principal=principal, endpoint=endpoint, admission=admission)

    async def through(self, call: MeteredCall, grant: Grant | None) -> None:
        """The call reaches another organisation's object through `grant`: check the caps the
        owner set on it (429 like the organisation's own limits) and attribute the call."""
        if grant is None or call.grant is not None:
            return
        try:
            self.meter.check_grant_quota(grant)
            if grant.max_requests_per_minute is not None:
                level = LimitLevel(
                    level="grant",
                    id=grant.id,
                    limits=RateLimits(requests_per_minute=grant.max_requests_per_minute),
                )
                call.grant_admission = await self.limiter.admit_levels((level,))
        except RateLimited as refused:
            reason = "quota" if isinstance(refused, InsufficientQuota) else refused.type
            self._metrics.rate_limited.labels(org=call.org_id, reason=f"grant_{reason}").inc()
            raise
        call.grant = grant

    async def end(self, call: MeteredCall, *, status: int, request_id: str | None) -> None:
        elapsed = time.perf_counter() - call.started
        row = UsageRow(
            org_id=call.org_id,
            project_id=call.principal.project_id,
            key_id=call.principal.key_id,
            model=call.model,
            endpoint=call.endpoint,
            status=status,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            items=call.items,
            latency_ms=round(elapsed * 1000, 3),
            request_id=request_id,
            created_at=call.created_at,
            grant_id=call.grant.id if call.grant else None,
            owner_org_id=call.grant.org_id if call.grant else None,
            batch=call.background,
        )
        self.meter.record(row)
        labels = {"org": call.org_id, "model": call.model, "endpoint": call.endpoint}
        self._metrics.inference_requests.labels(status=str(status), **labels).inc()
        self._metrics.inference_latency.labels(**labels).observe(elapsed)
        if call.admission is not None:
            tokens = call.prompt_tokens + call.completion_tokens or call.items
            try:
                await self.limiter.release(call.admission, tokens=tokens if status < 400 else 0)
            except Exception:  # the response is sent; a lost decrement only expires later
                log.exception("could not release rate-limit counters")
        if call.grant_admission is not None:
            try:
                await self.limiter.release(call.grant_admission)
            except Exception:  # as above
                log.exception("could not release a grant's rate-limit counters")
