"""Batches and their finished parts. Only this module writes `batches` and `batch_parts`.

A runner holds a batch by writing its claim token into `runner` and refreshing `heartbeat_at`;
every write a runner makes names its token, so a runner that lost its claim (it stalled, another
took the batch over) changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, or_, select, update

from aiaas.domain import Batch, BatchStatus, Page
from aiaas.ids import now
from aiaas.storage.repos.paging import fetch_page
from aiaas.storage.tables import batch_parts, batches

ACTIVE = [s.value for s in BatchStatus if s.active]


@dataclass(frozen=True, slots=True)
class BatchPart:
    part: int
    blob_key: str
    lines: list[int]
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int


def _batch(row: Row[Any]) -> Batch:
    return Batch(
        id=row.id,
        org_id=row.org_id,
        project_id=row.project_id,
        key_id=row.key_id,
        endpoint=row.endpoint,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=BatchStatus(row.status),
        created_at=row.created_at,
        expires_at=row.expires_at,
        total=row.total,
        completed=row.completed,
        failed=row.failed,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cached_tokens=row.cached_tokens,
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        errors=json.loads(row.errors) if row.errors else None,
        metadata=json.loads(row.user_metadata) if row.user_metadata else None,
        in_progress_at=row.in_progress_at,
        finalizing_at=row.finalizing_at,
        completed_at=row.completed_at,
        failed_at=row.failed_at,
        expired_at=row.expired_at,
        cancelling_at=row.cancelling_at,
        cancelled_at=row.cancelled_at,
        runner=row.runner,
    )


def insert_batch(conn: Connection, batch: Batch) -> None:
    conn.execute(
        insert(batches).values(
            id=batch.id,
            org_id=batch.org_id,
            project_id=batch.project_id,
            key_id=batch.key_id,
            endpoint=batch.endpoint,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status.value,
            total=0,
            completed=0,
            failed=0,
            input_tokens=0,
            output_tokens=0,
            cached_tokens=0,
            user_metadata=json.dumps(batch.metadata) if batch.metadata else None,
            created_at=batch.created_at,
            expires_at=batch.expires_at,
        )
    )


def get_batch(conn: Connection, *, org_id: str, batch_id: str) -> Batch | None:
    row = conn.execute(
        select(batches).where(batches.c.id == batch_id, batches.c.org_id == org_id)
    ).first()
    return _batch(row) if row else None


def held(conn: Connection, *, batch_id: str, runner: str) -> Batch | None:
    """The batch, if `runner` still holds it."""
    row = conn.execute(
        select(batches).where(batches.c.id == batch_id, batches.c.runner == runner)
    ).first()
    return _batch(row) if row else None


def list_batches(conn: Connection, *, org_id: str, after: str | None, limit: int) -> Page[Batch]:
    rows, more = fetch_page(
        conn,
        batches,
        where=[batches.c.org_id == org_id],
        after=after,
        limit=limit,
        newest_first=True,
    )
    return Page(items=[_batch(r) for r in rows], has_more=more)


def claimable(conn: Connection, *, stale_before: float, limit: int) -> list[str]:
    """Ids of active batches nobody holds (or whose runner stopped heartbeating), oldest first."""
    rows = conn.execute(
        select(batches.c.id)
        .where(
            batches.c.status.in_(ACTIVE),
            or_(batches.c.runner.is_(None), batches.c.heartbeat_at < stale_before),
        )
        .order_by(batches.c.seq)
        .limit(limit)
    )
    return [r.id for r in rows]


def claim(conn: Connection, *, batch_id: str, runner: str, stale_before: float) -> bool:
    """Take the batch for `runner`; False when another runner took it first."""
    done = conn.execute(
        update(batches)
        .where(
            batches.c.id == batch_id,
            batches.c.status.in_(ACTIVE),
            or_(batches.c.runner.is_(None), batches.c.heartbeat_at < stale_before),
        )
        .values(runner=runner, heartbeat_at=now())
    )
    return done.rowcount == 1


def heartbeat(conn: Connection, *, runner: str, batch_ids: Sequence[str]) -> set[str]:
    """Refresh the runner's claims; the ids it still holds."""
    if not batch_ids:
        return set()
    conn.execute(
        update(batches)
        .where(batches.c.id.in_(list(batch_ids)), batches.c.runner == runner)
        .values(heartbeat_at=now())
    )
    rows = conn.execute(
        select(batches.c.id).where(batches.c.id.in_(list(batch_ids)), batches.c.runner == runner)
    )
    return {r.id for r in rows}


def update_held(conn: Connection, *, batch_id: str, runner: str, **values: Any) -> bool:
    """Write the runner's progress (status, counts, times, files); False when it lost the claim.
    `errors` is a list, stored as JSON."""
    if "errors" in values and values["errors"] is not None:
        values["errors"] = json.dumps(values["errors"])
    if isinstance(values.get("status"), BatchStatus):
        values["status"] = values["status"].value
    done = conn.execute(
        update(batches).where(batches.c.id == batch_id, batches.c.runner == runner).values(**values)
    )
    return done.rowcount == 1


def release(conn: Connection, *, batch_id: str, runner: str) -> None:
    conn.execute(
        update(batches)
        .where(batches.c.id == batch_id, batches.c.runner == runner)
        .values(runner=None, heartbeat_at=None)
    )


def request_cancel(conn: Connection, *, org_id: str, batch_id: str) -> bool:
    """validating / in_progress -> cancelling; False when the batch is past that."""
    done = conn.execute(
        update(batches)
        .where(
            batches.c.id == batch_id,
            batches.c.org_id == org_id,
            batches.c.status.in_([BatchStatus.VALIDATING.value, BatchStatus.IN_PROGRESS.value]),
        )
        .values(status=BatchStatus.CANCELLING.value, cancelling_at=now())
    )
    return done.rowcount == 1


def status_of(conn: Connection, *, batch_id: str) -> BatchStatus | None:
    value = conn.execute(select(batches.c.status).where(batches.c.id == batch_id)).scalar()
    return BatchStatus(value) if value else None


def add_part(conn: Connection, *, batch_id: str, runner: str, part: BatchPart) -> bool:
    """Record a written part and add its counts to the batch's (in SQL, so two writers never
    lose each other's counts); False, and nothing written, when `runner` lost the batch."""
    done = conn.execute(
        update(batches)
        .where(batches.c.id == batch_id, batches.c.runner == runner)
        .values(
            completed=batches.c.completed + part.completed,
            failed=batches.c.failed + part.failed,
            input_tokens=batches.c.input_tokens + part.input_tokens,
            output_tokens=batches.c.output_tokens + part.output_tokens,
            cached_tokens=batches.c.cached_tokens + part.cached_tokens,
        )
    )
    if done.rowcount != 1:
        return False
    conn.execute(
        insert(batch_parts).values(
            batch_id=batch_id,
            part=part.part,
            blob_key=part.blob_key,
            lines=json.dumps(part.lines),
            completed=part.completed,
            failed=part.failed,
            input_tokens=part.input_tokens,
            output_tokens=part.output_tokens,
            cached_tokens=part.cached_tokens,
        )
    )
    return True


def parts(conn: Connection, *, batch_id: str) -> list[BatchPart]:
    rows = conn.execute(
        select(batch_parts).where(batch_parts.c.batch_id == batch_id).order_by(batch_parts.c.part)
    )
    return [
        BatchPart(
            part=r.part,
            blob_key=r.blob_key,
            lines=json.loads(r.lines),
            completed=r.completed,
            failed=r.failed,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            cached_tokens=r.cached_tokens,
        )
        for r in rows
    ]


def remove_parts(conn: Connection, *, batch_id: str) -> None:
    conn.execute(delete(batch_parts).where(batch_parts.c.batch_id == batch_id))
