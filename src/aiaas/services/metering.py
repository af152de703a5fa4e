"""The life of a metered request: quota and rate limits on the way in, usage on the way out.

`begin` runs as a route dependency, before any work; `end` runs when the response has been
sent (the request middleware calls it), so a stream is measured to its last chunk and its
concurrency is held until then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from aiaas.domain import Principal, UsageRow
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
                headers={"Retry-After": "1"},
            ) from exc
        return MeteredCall(principal=principal, endpoint=endpoint, admission=admission)

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
