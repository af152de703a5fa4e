"""Usage metering and monthly quotas.

Every metered request (the inference routes) becomes one `UsageRow`: org, project, key, model,
endpoint, status, tokens or items, latency. Rows are queued in memory and written by a
background thread in batches (one transaction per flush, with the organisation's monthly
totals updated in the same transaction), never on the request path.

Quotas are checked against the month's totals as the database holds them (reloaded after every
flush, so other replicas' usage counts within a flush interval) plus what this process has not
written yet.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

from aiaas.domain import Principal, UsageBucket, UsageGroup, UsagePage, UsageRow
from aiaas.errors import InsufficientQuota, InvalidRequest
from aiaas.storage.db import Database
from aiaas.storage.repos import usage as usage_repo

log = logging.getLogger("aiaas.usage")

Sums = defaultdict[tuple[str, str], list[int]]

BUCKET_WIDTHS = {"1h": 3600, "1d": 86400}
MAX_BUCKETS = {"1h": 168, "1d": 31}


def month_of(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m")


def counts_toward_quota(row: UsageRow) -> bool:
    return row.status < 400


def cost_of(row: UsageRow) -> int:
    """Tokens a request costs: prompt plus completion, or its items where it has no tokens."""
    tokens = row.prompt_tokens + row.completion_tokens
    return tokens if tokens else row.items


def _add(sums: Sums, row: UsageRow) -> None:
    if counts_toward_quota(row):
        found = sums[row.org_id, month_of(row.created_at)]
        found[0] += 1
        found[1] += cost_of(row)


class UsageMeter:
    def __init__(
        self, db: Database, *, flush_interval_s: float = 1.0, max_pending: int = 1000
    ) -> None:
        self._db = db
        self._interval = flush_interval_s
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time
        self._pending: list[UsageRow] = []
        self._writing: list[UsageRow] = []  # taken by a flush, not yet in the totals
        # (org, month) -> [requests, tokens] of the rows above that count toward quotas
        self._pending_sums: Sums = defaultdict(lambda: [0, 0])
        self._writing_sums: Sums = defaultdict(lambda: [0, 0])
        self._totals: dict[str, tuple[int, int]] = {}
        self._totals_month = ""
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._reload_totals()
        self._thread = threading.Thread(target=self._run, name="usage-meter", daemon=True)
        self._thread.start()

    def record(self, row: UsageRow) -> None:
        """Queue a record (cheap: no I/O)."""
        with self._lock:
            self._pending.append(row)
            _add(self._pending_sums, row)
            full = len(self._pending) >= self._max_pending
        if full:
            self._wake.set()

    # -- quotas --------------------------------------------------------------------------------

    def month_usage(self, org_id: str, at: float | None = None) -> tuple[int, int]:
        """(requests, tokens) of the organisation this calendar month (UTC)."""
        month = month_of(time.time() if at is None else at)
        with self._lock:
            requests, tokens = (
                self._totals.get(org_id, (0, 0)) if self._totals_month == month else (0, 0)
            )
            for sums in (self._writing_sums, self._pending_sums):
                found = sums.get((org_id, month))
                if found:
                    requests += found[0]
                    tokens += found[1]
        return requests, tokens

    def check_quota(self, principal: Principal) -> None:
        quotas = principal.quotas
        if quotas.empty or principal.org_id is None:
            return
        requests, tokens = self.month_usage(principal.org_id)
        if quotas.monthly_requests is not None and requests >= quotas.monthly_requests:
            raise InsufficientQuota(
                f"You exceeded your current quota of {quotas.monthly_requests} requests this "
                "month. Ask your platform operator to raise it."
            )
        if quotas.monthly_tokens is not None and tokens >= quotas.monthly_tokens:
            raise InsufficientQuota(
                f"You exceeded your current quota of {quotas.monthly_tokens} tokens this month. "
                "Ask your platform operator to raise it."
            )

    # -- writing -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the writer's top level: keep the rows and retry next time
                log.exception("writing usage records failed; retrying")

    def flush(self) -> None:
        """Write what is queued, in one transaction, and reload the month's totals."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                self._writing, self._writing_sums = batch, self._pending_sums
                self._pending_sums = defaultdict(lambda: [0, 0])
            try:
                if batch:
                    self._write(batch)
            except BaseException:
                with self._lock:  # put them back in front, in order
                    self._pending = batch + self._pending
                    for row in batch:
                        _add(self._pending_sums, row)
                    self._writing, self._writing_sums = [], defaultdict(lambda: [0, 0])
                raise
            self._reload_totals(written=True)

    def _write(self, batch: Sequence[UsageRow]) -> None:
        monthly: Sums = defaultdict(lambda: [0, 0])
        for row in batch:
            _add(monthly, row)
        with self._db.write() as conn:
            usage_repo.insert_records(conn, batch)
            for (org_id, month), (requests, tokens) in sorted(monthly.items()):
                usage_repo.add_monthly(
                    conn, org_id=org_id, month=month, requests=requests, tokens=tokens
                )

    def _reload_totals(self, *, written: bool = False) -> None:
        month = month_of(time.time())
        with self._db.read() as conn:
            totals = usage_repo.month_totals(conn, month)
        with self._lock:
            self._totals, self._totals_month = totals, month
            if written:
                self._writing, self._writing_sums = [], defaultdict(lambda: [0, 0])

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.flush()
        except Exception:  # shutting down: say what is lost rather than hide it
            log.exception("could not write %d usage records at shutdown", len(self._pending))

    # -- reading -------------------------------------------------------------------------------

    def summary(
        self,
        *,
        org_id: str,
        start: int,
        end: int | None,
        bucket_width: str,
        group_by: Sequence[str],
        limit: int | None = None,
        models: Sequence[str] = (),
        project_ids: Sequence[str] = (),
    ) -> UsagePage:
        """Usage per bucket (every bucket in the range, empty ones too), grouped like OpenAI's
        usage API."""
        width = BUCKET_WIDTHS.get(bucket_width)
        if width is None:
            raise InvalidRequest(
                f"bucket_width must be one of {', '.join(BUCKET_WIDTHS)}.", param="bucket_width"
            )
        unknown = [g for g in group_by if g not in usage_repo.GROUP_COLUMNS]
        if unknown:
            raise InvalidRequest(
                f"Cannot group by {unknown[0]!r}; choose from "
                f"{', '.join(usage_repo.GROUP_COLUMNS)}.",
                param="group_by",
            )
        most = MAX_BUCKETS[bucket_width]
        limit = most if limit is None else limit
        if not 1 <= limit <= most:
            raise InvalidRequest(
                f"limit must be between 1 and {most} for bucket_width {bucket_width}.",
                param="limit",
            )
        if end is None:  # up to now: through the end of the bucket that holds this moment
            end = start + max(1, math.ceil((time.time() - start) / width)) * width
        if end <= start:
            raise InvalidRequest("end_time must be after start_time.", param="end_time")
        n_buckets = -(-(end - start) // width)
        shown = min(n_buckets, limit)
        page_end = min(end, start + shown * width)
        self.flush()  # this process's own recent requests are visible at once
        with self._db.read() as conn:
            groups = usage_repo.summarize(
                conn,
                org_id=org_id,
                start=start,
                end=page_end,
                width_s=width,
                group_by=list(dict.fromkeys(group_by)),
                models=models,
                project_ids=project_ids,
            )
        by_bucket: dict[int, list[UsageGroup]] = defaultdict(list)
        for group in groups:
            by_bucket[group.bucket].append(group)
        buckets = [
            UsageBucket(
                start=start + i * width,
                end=min(start + (i + 1) * width, page_end),
                groups=by_bucket.get(i, []),
            )
            for i in range(shown)
        ]
        return UsagePage(buckets=buckets, next_start=page_end if page_end < end else None)
