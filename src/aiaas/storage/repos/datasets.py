"""Datasets and their versions. Only this module writes `datasets` and `dataset_versions`.

Life cycle, as for files: a dataset is `creating` until its first version is `ready`; a version
is `creating` while its data is processed and stored, `ready` (immutable) once its blob is in
place, and `deleting` while its blob goes. Reads see `ready` rows only.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Row, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from aiaas.domain import Dataset, DatasetVersion, Page
from aiaas.errors import Conflict
from aiaas.ids import now
from aiaas.storage.repos.paging import fetch_page
from aiaas.storage.tables import dataset_versions, datasets


class State(StrEnum):
    CREATING = "creating"
    READY = "ready"
    DELETING = "deleting"


def _latest(conn: Connection, dataset_id: str) -> int | None:
    return conn.execute(
        select(func.max(dataset_versions.c.version)).where(
            dataset_versions.c.dataset_id == dataset_id,
            dataset_versions.c.status == State.READY.value,
        )
    ).scalar_one_or_none()


def _dataset(conn: Connection, row: Row[Any]) -> Dataset:
    return Dataset(
        id=row.id,
        org_id=row.org_id,
        project_id=row.project_id,
        name=row.name,
        description=row.description,
        created_at=row.created_at,
        latest_version=_latest(conn, row.id),
        region=row.region,
        residency=row.residency,
    )


def _version(row: Row[Any]) -> DatasetVersion:
    return DatasetVersion(
        id=row.id,
        dataset_id=row.dataset_id,
        org_id=row.org_id,
        version=row.version,
        format=row.format,
        source_file_ids=json.loads(row.source_file_ids),
        rows=row.rows,
        bytes=row.bytes,
        content_hash=row.content_hash,
        blob_key=row.blob_key,
        label_column=row.label_column,
        task=row.task,
        profile=json.loads(row.profile),
        preprocessing=json.loads(row.preprocessing),
        pii=json.loads(row.pii) if row.pii is not None else None,
        created_at=row.created_at,
    )


# -- datasets ----------------------------------------------------------------------------------


def reserve_dataset(
    conn: Connection,
    *,
    dataset_id: str,
    org_id: str,
    project_id: str,
    name: str,
    description: str,
    created_by: str | None,
    region: str = "local",
    residency: str = "none",
) -> None:
    try:
        with conn.begin_nested():
            conn.execute(
                insert(datasets).values(
                    region=region,
                    residency=residency,
                    id=dataset_id,
                    org_id=org_id,
                    project_id=project_id,
                    name=name,
                    description=description,
                    status=State.CREATING.value,
                    created_by=created_by,
                    created_at=now(),
                )
            )
    except IntegrityError as exc:
        raise Conflict(f"A dataset named {name!r} already exists.", param="name") from exc


def get_dataset(conn: Connection, *, org_id: str, dataset_id: str) -> Dataset | None:
    row = conn.execute(
        select(datasets).where(
            datasets.c.id == dataset_id,
            datasets.c.org_id == org_id,
            datasets.c.status == State.READY.value,
        )
    ).first()
    return _dataset(conn, row) if row else None


def list_datasets(conn: Connection, *, org_id: str, after: str | None, limit: int) -> Page[Dataset]:
    where = [datasets.c.org_id == org_id, datasets.c.status == State.READY.value]
    rows, more = fetch_page(conn, datasets, where=where, after=after, limit=limit)
    return Page(items=[_dataset(conn, r) for r in rows], has_more=more)


def mark_dataset(conn: Connection, *, dataset_id: str, state: State) -> None:
    conn.execute(update(datasets).where(datasets.c.id == dataset_id).values(status=state.value))


def remove_dataset(conn: Connection, *, dataset_id: str) -> None:
    conn.execute(delete(datasets).where(datasets.c.id == dataset_id))


# -- versions ----------------------------------------------------------------------------------


def reserve_version(
    conn: Connection,
    *,
    version_id: str,
    dataset_id: str,
    org_id: str,
    blob_key: str,
    created_by: str | None,
) -> int:
    """Take the next version number (under the write lock) for a version being made."""
    highest = conn.execute(
        select(func.max(dataset_versions.c.version)).where(
            dataset_versions.c.dataset_id == dataset_id
        )
    ).scalar_one_or_none()
    number = (highest or 0) + 1
    conn.execute(
        insert(dataset_versions).values(
            id=version_id,
            dataset_id=dataset_id,
            org_id=org_id,
            version=number,
            status=State.CREATING.value,
            format="",
            source_file_ids="[]",
            rows=0,
            bytes=0,
            content_hash="",
            blob_key=blob_key,
            profile="{}",
            preprocessing="{}",
            created_by=created_by,
            created_at=now(),
        )
    )
    return number


def publish_version(
    conn: Connection,
    *,
    version_id: str,
    format: str,
    source_file_ids: list[str],
    rows: int,
    size: int,
    content_hash: str,
    label_column: str | None,
    task: str | None,
    profile: dict[str, Any],
    preprocessing: dict[str, Any],
    pii: dict[str, Any] | None,
) -> DatasetVersion:
    conn.execute(
        update(dataset_versions)
        .where(dataset_versions.c.id == version_id)
        .values(
            status=State.READY.value,
            format=format,
            source_file_ids=json.dumps(source_file_ids),
            rows=rows,
            bytes=size,
            content_hash=content_hash,
            label_column=label_column,
            task=task,
            profile=json.dumps(profile, allow_nan=False),
            preprocessing=json.dumps(preprocessing, allow_nan=False),
            pii=json.dumps(pii) if pii is not None else None,
        )
    )
    row = conn.execute(select(dataset_versions).where(dataset_versions.c.id == version_id)).one()
    return _version(row)


def get_version(
    conn: Connection, *, org_id: str, dataset_id: str, version: int
) -> DatasetVersion | None:
    row = conn.execute(
        select(dataset_versions).where(
            dataset_versions.c.dataset_id == dataset_id,
            dataset_versions.c.org_id == org_id,
            dataset_versions.c.version == version,
            dataset_versions.c.status == State.READY.value,
        )
    ).first()
    return _version(row) if row else None


def get_version_by_id(conn: Connection, *, org_id: str, version_id: str) -> DatasetVersion | None:
    row = conn.execute(
        select(dataset_versions).where(
            dataset_versions.c.id == version_id,
            dataset_versions.c.org_id == org_id,
            dataset_versions.c.status == State.READY.value,
        )
    ).first()
    return _version(row) if row else None


def owner_of_version(conn: Connection, version_id: str) -> tuple[str, str] | None:
    """(org id, dataset id) of a ready version, whoever owns it: for a grant check, which then
    reads the version under its owner's id."""
    row = conn.execute(
        select(dataset_versions.c.org_id, dataset_versions.c.dataset_id).where(
            dataset_versions.c.id == version_id,
            dataset_versions.c.status == State.READY.value,
        )
    ).first()
    return (row.org_id, row.dataset_id) if row else None


def owner_of_dataset(conn: Connection, dataset_id: str) -> str | None:
    row = conn.execute(select(datasets.c.org_id).where(datasets.c.id == dataset_id)).first()
    return row.org_id if row else None


def list_versions(
    conn: Connection, *, org_id: str, dataset_id: str, after: str | None, limit: int
) -> Page[DatasetVersion]:
    where = [
        dataset_versions.c.dataset_id == dataset_id,
        dataset_versions.c.org_id == org_id,
        dataset_versions.c.status == State.READY.value,
    ]
    rows, more = fetch_page(conn, dataset_versions, where=where, after=after, limit=limit)
    return Page(items=[_version(r) for r in rows], has_more=more)


def versions_of(conn: Connection, *, dataset_id: str) -> list[tuple[str, str]]:
    """`(id, blob_key)` of every version of a dataset, whatever its state."""
    rows = conn.execute(
        select(dataset_versions.c.id, dataset_versions.c.blob_key).where(
            dataset_versions.c.dataset_id == dataset_id
        )
    )
    return [(r.id, r.blob_key) for r in rows]


def mark_version(conn: Connection, *, version_id: str, state: State) -> None:
    conn.execute(
        update(dataset_versions)
        .where(dataset_versions.c.id == version_id)
        .values(status=state.value)
    )


def remove_version(conn: Connection, *, version_id: str) -> None:
    conn.execute(delete(dataset_versions).where(dataset_versions.c.id == version_id))


def abandoned(conn: Connection, *, creating_before: float) -> tuple[list[Row[Any]], list[str]]:
    """Versions to clean up (`deleting`, or `creating` for too long) as (id, blob_key, dataset_id)
    rows, and datasets left without versions that are `creating` or `deleting`."""
    stale = (dataset_versions.c.status == State.CREATING.value) & (
        dataset_versions.c.created_at < creating_before
    )
    versions = list(
        conn.execute(
            select(
                dataset_versions.c.id, dataset_versions.c.blob_key, dataset_versions.c.dataset_id
            ).where((dataset_versions.c.status == State.DELETING.value) | stale)
        )
    )
    has_versions = select(dataset_versions.c.id).where(
        dataset_versions.c.dataset_id == datasets.c.id,
        dataset_versions.c.status != State.DELETING.value,
        ~stale,
    )
    empty = conn.execute(
        select(datasets.c.id).where(datasets.c.status != State.READY.value, ~has_versions.exists())
    ).scalars()
    return versions, list(empty)
