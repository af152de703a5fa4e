"""Usage metering and monthly quotas.

Every metered request (the inference routes) becomes one `UsageRow`: org, project, key, model,
endpoint, status, tokens or items, latency. Rows are queued in memory and written by a
background thread in batches (one transaction per flush, with the organisation's monthly
totals updated in the same transaction), never on the request path.

Quotas are checked against the month's totals as the database holds them (reloaded after every
flush, so other replicas' usage counts within a flush interval) plus what this process has not
written yet.

Calls through a grant (another organisation's object) are also audited, aggregated: per grant,
grantee and window (a UTC minute by default, `AIAAS_AUDIT_USAGE_WINDOW_S`) one `grant.used` event
in the owner's audit log, with both organisation ids and the window's requests, errors, tokens
and items, never one event per call or token. A call counts in the window in which it finished
(was recorded). The window's event is written once the window has ended, by the first flush
after that, in the same transaction as that flush's usage rows; until then the window's counts
of the rows already written stay in memory (`close()` writes every window, ended or not). So:
- each replica audits its own calls: several replicas write one event each for the same
  grant-minute, and a call recorded after its window's event was written (a race of
  microseconds) gets a second event for that window; the sum over the events is the count;
- a write that fails rolls back the rows and the events together, and both are retried;
- a process killed without `close()` loses the counts of its windows not yet written, as it
  loses its queued rows.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiaas.domain import Actor, Grant, Principal, UsageBucket, UsageGroup, UsagePage, UsageRow
from aiaas.errors import InsufficientQuota, InvalidRequest
from aiaas.services.audit import AuditService
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


def cost_of(row: UsageRow, batch_discount: float = 0.0) -> int:
    """Tokens a request costs: prompt plus completion, or its items where it has no tokens;
    a batch line costs `1 - batch_discount` of that (rounded up)."""
    tokens = row.prompt_tokens + row.completion_tokens
    cost = tokens if tokens else row.items
    return math.ceil(cost * (1.0 - batch_discount)) if row.batch else cost


def _add(sums: Sums, row: UsageRow, batch_discount: float) -> None:
    """Count a row toward its organisation's month and, for a call through a grant, toward the
    grant's month too (its `monthly_tokens` cap): the totals are keyed by org or grant id."""
    if counts_toward_quota(row):
        for subject in (row.org_id, row.grant_id):
            if subject is not None:
                found = sums[subject, month_of(row.created_at)]
                found[0] += 1
                found[1] += cost_of(row, batch_discount)


@dataclass(frozen=True, slots=True)
class GrantWindow:
    """The calls through one grant by one grantee in one window (the audit's `grant.used`)."""

    requests: int = 0
    errors: int = 0
    tokens: int = 0  # prompt + completion
    items: int = 0

    def plus(self, row: UsageRow) -> GrantWindow:
        return GrantWindow(
            requests=self.requests + 1,
            errors=self.errors + (not counts_toward_quota(row)),
            tokens=self.tokens + row.prompt_tokens + row.completion_tokens,
            items=self.items + row.items,
        )


# (grant id, owner org id, grantee org id, window start in unix seconds) -> its counts
GrantWindows = dict[tuple[str, str, str, int], GrantWindow]

GRANT_USED_ACTOR = Actor(type="system", id="usage-meter")


class UsageMeter:
    def __init__(
        self,
        db: Database,
        *,
        flush_interval_s: float = 1.0,
        max_pending: int = 1000,
        audit: AuditService | None = None,
        audit_window_s: int = 60,
        batch_discount: float = 0.0,
    ) -> None:
        """With `audit`, calls through grants are audited per grant and `audit_window_s`.
        Batch lines count `1 - batch_discount` of their tokens toward monthly quotas."""
        self._db = db
        self._batch_discount = batch_discount
        self._audit = audit
        self._audit_window_s = audit_window_s
        # Counts of the grant calls already written whose window's event is not: only the
        # flush (under _flush_lock) reads or replaces it.
        self._grant_windows: GrantWindows = {}
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
            _add(self._pending_sums, row, self._batch_discount)
            full = len(self._pending) >= self._max_pending
        if full:
            self._wake.set()

    # -- quotas --------------------------------------------------------------------------------

    def month_usage(self, org_id: str, at: float | None = None) -> tuple[int, int]:
        """(requests, tokens) of the organisation (or grant) this calendar month (UTC)."""
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

    def check_grant_quota(self, grant: Grant) -> None:
        """A grant's `monthly_tokens` cap: the grantee's calls through it this month."""
        if grant.monthly_tokens is None:
            return
        _requests, tokens = self.month_usage(grant.id)
        if tokens >= grant.monthly_tokens:
            raise InsufficientQuota(
                f"You exceeded the quota of {grant.monthly_tokens} tokens this month that the "
                f"owner set on grant {grant.id}. Ask the owner to raise it."
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

    def flush(self, *, every_window: bool = False) -> None:
        """Write what is queued, and the audit events of the grant windows that have ended (of
        all of them with `every_window`), in one transaction; reload the month's totals."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                self._writing, self._writing_sums = batch, self._pending_sums
                self._pending_sums = defaultdict(lambda: [0, 0])
            # The windows as they will be once this batch is written; they replace the held
            # ones only when the transaction commits (a failed write counts nothing twice).
            windows = self._with_grant_calls(batch)
            ended = self._ended(windows, None if every_window else time.time())
            try:
                if batch or ended:
                    self._write(batch, ended)
            except BaseException:
                with self._lock:  # put them back in front, in order
                    self._pending = batch + self._pending
                    for row in batch:
                        _add(self._pending_sums, row, self._batch_discount)
                    self._writing, self._writing_sums = [], defaultdict(lambda: [0, 0])
                raise
            for key in ended:
                del windows[key]
            self._grant_windows = windows
            self._reload_totals(written=True)

    def _with_grant_calls(self, batch: Sequence[UsageRow]) -> GrantWindows:
        """The held grant windows plus the calls through grants in `batch` (a new dict)."""
        windows = dict(self._grant_windows)
        if self._audit is None:
            return windows
        width = self._audit_window_s
        for row in batch:
            if row.grant_id is None or row.owner_org_id is None:
                continue
            finished = row.created_at + row.latency_ms / 1000
            key = (row.grant_id, row.owner_org_id, row.org_id, int(finished // width * width))
            windows[key] = windows.get(key, GrantWindow()).plus(row)
        return windows

    def _ended(self, windows: GrantWindows, now: float | None) -> GrantWindows:
        """The windows whose end is at or before `now` (all of them when `now` is None)."""
        return {
            key: counts
            for key, counts in sorted(windows.items(), key=lambda item: (item[0][3], item[0]))
            if now is None or key[3] + self._audit_window_s <= now
        }

    def _write(self, batch: Sequence[UsageRow], ended: GrantWindows | None = None) -> None:
        monthly: Sums = defaultdict(lambda: [0, 0])
        for row in batch:
            _add(monthly, row, self._batch_discount)
        with self._db.write() as conn:
            if batch:
                usage_repo.insert_records(conn, batch)
            for (org_id, month), (requests, tokens) in sorted(monthly.items()):
                usage_repo.add_monthly(
                    conn, org_id=org_id, month=month, requests=requests, tokens=tokens
                )
            audit = self._audit
            for (grant_id, owner_org_id, grantee_org_id, start), counts in (ended or {}).items():
                if audit is None:  # never: windows are only counted with an audit log
                    break
                audit.record(
                    conn,
                    actor=GRANT_USED_ACTOR,
                    action="grant.used",
                    target_type="grant",
                    target_id=grant_id,
                    org_id=owner_org_id,
                    data={
                        "grantee_org_id": grantee_org_id,
                        "minute": start,
                        "window_s": self._audit_window_s,
                        "requests": counts.requests,
                        "errors": counts.errors,
                        "tokens": counts.tokens,
                        "items": counts.items,
                    },
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
            self.flush(every_window=True)
        except Exception:  # shutting down: say what is lost rather than hide it
            log.exception(
                "could not write %d usage records and %d grant audit windows at shutdown",
                len(self._pending),
                len(self._grant_windows),
            )

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
        shared: bool = False,
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
                shared=shared,
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
