"""The job queue, its events and checkpoints. Only this module writes `jobs`, `job_events` and
`job_checkpoints`.

Claiming is a compare-and-set on `status` under the write lock, so two runners never take the same
job. A claim hands the worker a token (`worker`); every later write of that worker names the token
and changes nothing once the job was taken back (a missed heartbeat, a cancel), so a worker that
lost its job cannot overwrite what happened since.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update

from aiaas.domain import Job, JobCheckpoint, JobControl, JobEvent, JobStatus, Page
from aiaas.ids import new_id, now
from aiaas.storage.repos.paging import fetch_page
from aiaas.storage.tables import job_checkpoints, job_events, jobs, organizations

ACTIVE = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)


def _loads(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


def _job(row: Row[Any]) -> Job:
    return Job(
        id=row.id,
        org_id=row.org_id,
        project_id=row.project_id,
        kind=row.kind,
        model=row.model,
        status=JobStatus(row.status),
        dataset_version_id=row.dataset_version_id,
        task=row.task,
        target_column=row.target_column,
        spec=json.loads(row.spec),
        seed=row.seed,
        suffix=row.suffix,
        metadata=_loads(row.user_metadata),
        register_to=row.register_to,
        fine_tuned_model=row.fine_tuned_model,
        model_version_id=row.model_version_id,
        error=_loads(row.error),
        control=JobControl(row.control) if row.control else None,
        attempts=row.attempts,
        worker=row.worker,
        epoch=row.epoch,
        step=row.step,
        trained_samples=row.trained_samples,
        estimated_finish=row.estimated_finish,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        result=_loads(row.result),
        grant_id=row.grant_id,
    )


# -- jobs --------------------------------------------------------------------------------------


def insert_job(
    conn: Connection,
    *,
    job_id: str,
    org_id: str,
    project_id: str,
    kind: str,
    model: str,
    dataset_version_id: str,
    task: str,
    target_column: str,
    spec: dict[str, Any],
    seed: int,
    suffix: str | None,
    metadata: dict[str, str] | None,
    register_to: str | None,
    created_by: str | None,
    grant_id: str | None = None,
) -> Job:
    conn.execute(
        insert(jobs).values(
            id=job_id,
            org_id=org_id,
            project_id=project_id,
            kind=kind,
            model=model,
            status=JobStatus.QUEUED.value,
            dataset_version_id=dataset_version_id,
            task=task,
            target_column=target_column,
            spec=json.dumps(spec, allow_nan=False),
            seed=seed,
            suffix=suffix,
            user_metadata=json.dumps(metadata) if metadata is not None else None,
            register_to=register_to,
            attempts=0,
            epoch=0,
            step=0,
            trained_samples=0,
            created_by=created_by,
            created_at=now(),
            grant_id=grant_id,
        )
    )
    found = get_job_any(conn, job_id=job_id)
    assert found is not None
    return found


def get_job(
    conn: Connection, *, org_id: str, job_id: str, kind: str | Iterable[str] | None = None
) -> Job | None:
    where = [jobs.c.id == job_id, jobs.c.org_id == org_id]
    if kind is not None:
        where.append(_of_kind(kind))
    row = conn.execute(select(jobs).where(*where)).first()
    return _job(row) if row else None


def _of_kind(kind: str | Iterable[str]) -> Any:
    """A filter on one kind of job, or on any of several."""
    return jobs.c.kind == kind if isinstance(kind, str) else jobs.c.kind.in_(list(kind))


def get_job_any(conn: Connection, *, job_id: str) -> Job | None:
    """A job whatever its organisation: for the runner and its workers only."""
    row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
    return _job(row) if row else None


def list_jobs(
    conn: Connection,
    *,
    org_id: str,
    after: str | None,
    limit: int,
    metadata: dict[str, str],
    kind: str | Iterable[str] | None = None,
) -> Page[Job]:
    where = [jobs.c.org_id == org_id]
    if kind is not None:
        where.append(_of_kind(kind))
    if not metadata:
        rows, more = fetch_page(
            conn, jobs, where=where, after=after, limit=limit, newest_first=True
        )
        return Page(items=[_job(r) for r in rows], has_more=more)
    # Metadata is a small JSON document: filter in Python over the org's jobs, page after that.
    candidates = [
        _job(r) for r in conn.execute(select(jobs).where(*where).order_by(jobs.c.seq.desc()))
    ]
    matching = [
        j for j in candidates if all((j.metadata or {}).get(k) == v for k, v in metadata.items())
    ]
    if after is not None:
        ids = [j.id for j in matching]
        matching = matching[ids.index(after) + 1 :] if after in ids else []
    return Page(items=matching[:limit], has_more=len(matching) > limit)


def transition(
    conn: Connection,
    *,
    job_id: str,
    expected: Iterable[JobStatus],
    status: JobStatus,
    held_by: str | None = None,
    **values: Any,
) -> bool:
    """Move a job to `status` if it is in one of `expected` (and held by that worker token, when
    given). Leaving `running` releases the claim and any pending request."""
    where = [jobs.c.id == job_id, jobs.c.status.in_([s.value for s in expected])]
    if held_by is not None:
        where.append(jobs.c.worker == held_by)
    if status is not JobStatus.RUNNING:
        values.setdefault("worker", None)
        values.setdefault("control", None)
        values.setdefault("estimated_finish", None)
    if status.finished:
        values.setdefault("finished_at", now())
    result = conn.execute(update(jobs).where(*where).values(status=status.value, **values))
    return result.rowcount == 1


def request_control(conn: Connection, *, job_id: str, control: JobControl) -> bool:
    result = conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING.value)
        .values(control=control.value)
    )
    return result.rowcount == 1


def claim_next(conn: Connection, *, worker: str, kinds: Iterable[str]) -> Job | None:
    """Take the queued job of the organisation with the fewest running jobs per unit of its
    weight (oldest first within it), so one tenant's long queue does not hold the others back
    and a heavier organisation gets proportionally more workers."""
    running = (
        select(jobs.c.org_id, func.count().label("n"))
        .where(jobs.c.status == JobStatus.RUNNING.value)
        .group_by(jobs.c.org_id)
        .subquery()
    )
    weight = func.coalesce(func.nullif(organizations.c.weight, 0), 1.0)
    share = func.coalesce(running.c.n, 0) / weight
    candidate = conn.execute(
        select(jobs.c.id)
        .select_from(
            jobs.outerjoin(running, running.c.org_id == jobs.c.org_id).join(
                organizations, organizations.c.id == jobs.c.org_id
            )
        )
        .where(jobs.c.status == JobStatus.QUEUED.value, jobs.c.kind.in_(list(kinds)))
        .order_by(share, jobs.c.seq)
        .limit(1)
    ).scalar_one_or_none()
    if candidate is None:
        return None
    stamp = now()
    claimed = conn.execute(
        update(jobs)
        .where(jobs.c.id == candidate, jobs.c.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.RUNNING.value,
            worker=worker,
            heartbeat_at=stamp,
            attempts=jobs.c.attempts + 1,
            started_at=func.coalesce(jobs.c.started_at, stamp),
            control=None,
        )
    )
    return get_job_any(conn, job_id=candidate) if claimed.rowcount == 1 else None


def heartbeat(
    conn: Connection, *, job_id: str, worker: str, **progress: Any
) -> tuple[bool, JobControl | None]:
    """Refresh the worker's claim: whether it still holds the job, and any pending request."""
    result = conn.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id, jobs.c.worker == worker, jobs.c.status == JobStatus.RUNNING.value
        )
        .values(heartbeat_at=now(), **progress)
    )
    if result.rowcount != 1:
        return False, None
    control = conn.execute(select(jobs.c.control).where(jobs.c.id == job_id)).scalar_one()
    return True, JobControl(control) if control else None


def set_progress(conn: Connection, *, job_id: str, worker: str, **progress: Any) -> None:
    """The epoch and step a worker reached (also sent with heartbeats, but this is exact)."""
    conn.execute(
        update(jobs).where(jobs.c.id == job_id, jobs.c.worker == worker).values(**progress)
    )


def stale(conn: Connection, *, heartbeat_before: float) -> list[Job]:
    """Running jobs whose worker stopped sending heartbeats."""
    rows = conn.execute(
        select(jobs).where(
            jobs.c.status == JobStatus.RUNNING.value, jobs.c.heartbeat_at < heartbeat_before
        )
    )
    return [_job(r) for r in rows]


def requeue(conn: Connection, *, job_id: str, worker: str) -> bool:
    """Give a job whose worker died back to the queue (a pending cancel or pause wins)."""
    control = conn.execute(
        select(jobs.c.control).where(jobs.c.id == job_id, jobs.c.worker == worker)
    ).scalar_one_or_none()
    target = {
        JobControl.CANCEL.value: JobStatus.CANCELLED,
        JobControl.PAUSE.value: JobStatus.PAUSED,
    }.get(control or "", JobStatus.QUEUED)
    return transition(
        conn, job_id=job_id, expected=[JobStatus.RUNNING], status=target, held_by=worker
    )


def count_using_dataset_versions(conn: Connection, *, version_ids: list[str]) -> int:
    """Jobs not yet finished that read one of these dataset versions."""
    return conn.execute(
        select(func.count())
        .select_from(jobs)
        .where(
            jobs.c.dataset_version_id.in_(version_ids),
            jobs.c.status.in_([s.value for s in ACTIVE]),
        )
    ).scalar_one()


# -- events ------------------------------------------------------------------------------------


def add_event(
    conn: Connection,
    *,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        insert(job_events).values(
            id=new_id("ftevent", sep="-"),
            job_id=job_id,
            level=level,
            type=type,
            message=message,
            data=json.dumps(data, allow_nan=False) if data is not None else None,
            created_at=now(),
        )
    )


def list_events(conn: Connection, *, job_id: str, after: str | None, limit: int) -> Page[JobEvent]:
    rows, more = fetch_page(
        conn,
        job_events,
        where=[job_events.c.job_id == job_id],
        after=after,
        limit=limit,
        newest_first=True,
    )
    return Page(
        items=[
            JobEvent(
                id=r.id,
                job_id=r.job_id,
                level=r.level,
                type=r.type,
                message=r.message,
                data=_loads(r.data),
                created_at=r.created_at,
            )
            for r in rows
        ],
        has_more=more,
    )


# -- checkpoints -------------------------------------------------------------------------------


def _checkpoint(row: Row[Any]) -> JobCheckpoint:
    return JobCheckpoint(
        id=row.id,
        job_id=row.job_id,
        epoch=row.epoch,
        step=row.step,
        metrics=_loads(row.metrics),
        blob_key=row.blob_key,
        bytes=row.bytes,
        created_at=row.created_at,
    )


def add_checkpoint(
    conn: Connection,
    *,
    job_id: str,
    worker: str,
    epoch: int,
    step: int,
    metrics: dict[str, Any] | None,
    blob_key: str,
    size: int,
    event: tuple[str, dict[str, Any]] | None = None,
) -> list[str] | None:
    """Record a checkpoint whose blob is in place; the blob keys it supersedes (to delete), or
    None when the worker no longer holds the job (its blob is then an orphan to delete)."""
    held = conn.execute(
        select(jobs.c.id).where(jobs.c.id == job_id, jobs.c.worker == worker)
    ).scalar_one_or_none()
    if held is None:
        return None
    older = list(
        conn.execute(
            select(job_checkpoints.c.blob_key).where(
                job_checkpoints.c.job_id == job_id, job_checkpoints.c.blob_key.is_not(None)
            )
        ).scalars()
    )
    conn.execute(
        update(job_checkpoints).where(job_checkpoints.c.job_id == job_id).values(blob_key=None)
    )
    conn.execute(
        insert(job_checkpoints).values(
            id=new_id("ftckpt", sep="-"),
            job_id=job_id,
            epoch=epoch,
            step=step,
            metrics=json.dumps(metrics, allow_nan=False) if metrics is not None else None,
            blob_key=blob_key,
            bytes=size,
            created_at=now(),
        )
    )
    if event is not None:
        # With the checkpoint, in one transaction: a resumed job never repeats an epoch's event.
        add_event(conn, job_id=job_id, message=event[0], type="metrics", data=event[1])
    return [key for key in older if key != blob_key]


def latest_checkpoint(conn: Connection, *, job_id: str) -> JobCheckpoint | None:
    row = conn.execute(
        select(job_checkpoints)
        .where(job_checkpoints.c.job_id == job_id, job_checkpoints.c.blob_key.is_not(None))
        .order_by(job_checkpoints.c.seq.desc())
        .limit(1)
    ).first()
    return _checkpoint(row) if row else None


def list_checkpoints(
    conn: Connection, *, job_id: str, after: str | None, limit: int
) -> Page[JobCheckpoint]:
    where = [job_checkpoints.c.job_id == job_id, job_checkpoints.c.metrics.is_not(None)]
    rows, more = fetch_page(
        conn, job_checkpoints, where=where, after=after, limit=limit, newest_first=True
    )
    return Page(items=[_checkpoint(r) for r in rows], has_more=more)


def checkpoint_blob_owners(conn: Connection) -> tuple[dict[str, str], set[str]]:
    """Every recorded checkpoint blob key with its job's status, and the ids of running jobs."""
    rows = conn.execute(
        select(job_checkpoints.c.blob_key, jobs.c.status)
        .select_from(job_checkpoints.join(jobs, jobs.c.id == job_checkpoints.c.job_id))
        .where(job_checkpoints.c.blob_key.is_not(None))
    )
    recorded = {r.blob_key: r.status for r in rows}
    running = set(
        conn.execute(select(jobs.c.id).where(jobs.c.status == JobStatus.RUNNING.value)).scalars()
    )
    return recorded, running


def drop_checkpoint_blobs(conn: Connection, *, job_id: str) -> list[str]:
    """Forget every checkpoint blob of a finished job; the keys to delete."""
    keys = list(
        conn.execute(
            select(job_checkpoints.c.blob_key).where(
                job_checkpoints.c.job_id == job_id, job_checkpoints.c.blob_key.is_not(None)
            )
        ).scalars()
    )
    conn.execute(
        update(job_checkpoints).where(job_checkpoints.c.job_id == job_id).values(blob_key=None)
    )
    return keys


def count_by_state(conn: Connection) -> list[tuple[str, str, int]]:
    """(org id, state, jobs) for every pair that has jobs."""
    rows = conn.execute(
        select(jobs.c.org_id, jobs.c.status, func.count()).group_by(jobs.c.org_id, jobs.c.status)
    )
    return [(row[0], row[1], int(row[2])) for row in rows]
