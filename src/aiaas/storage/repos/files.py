"""Uploaded files. Only this module writes the `files` table.

A row's life: `uploading` (reserved before the blob is written) → `processed` (blob in place,
visible) → `deleting` (blob on its way out). Reads see `processed` rows only.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select, update

from aiaas.domain import FilePurpose, Page, StoredFile
from aiaas.ids import now
from aiaas.storage.repos.paging import fetch_page
from aiaas.storage.tables import files


class FileState(StrEnum):
    UPLOADING = "uploading"
    PROCESSED = "processed"
    DELETING = "deleting"


def _file(row: Row[Any]) -> StoredFile:
    return StoredFile(
        id=row.id,
        org_id=row.org_id,
        project_id=row.project_id,
        filename=row.filename,
        purpose=FilePurpose(row.purpose),
        bytes=row.bytes,
        sha256=row.sha256,
        blob_key=row.blob_key,
        created_at=row.created_at,
    )


def reserve(
    conn: Connection,
    *,
    file_id: str,
    org_id: str,
    project_id: str,
    filename: str,
    purpose: FilePurpose,
    blob_key: str,
    created_by: str | None,
) -> None:
    conn.execute(
        insert(files).values(
            id=file_id,
            org_id=org_id,
            project_id=project_id,
            filename=filename,
            purpose=purpose.value,
            bytes=0,
            blob_key=blob_key,
            status=FileState.UPLOADING.value,
            created_by=created_by,
            created_at=now(),
        )
    )


def publish(
    conn: Connection, *, file_id: str, purpose: FilePurpose, size: int, sha256: str
) -> StoredFile:
    conn.execute(
        update(files)
        .where(files.c.id == file_id, files.c.status == FileState.UPLOADING.value)
        .values(status=FileState.PROCESSED.value, purpose=purpose.value, bytes=size, sha256=sha256)
    )
    row = conn.execute(select(files).where(files.c.id == file_id)).one()
    return _file(row)


def get(conn: Connection, *, org_id: str, file_id: str) -> StoredFile | None:
    row = conn.execute(
        select(files).where(
            files.c.id == file_id,
            files.c.org_id == org_id,
            files.c.status == FileState.PROCESSED.value,
        )
    ).first()
    return _file(row) if row else None


def list_files(
    conn: Connection,
    *,
    org_id: str,
    purpose: FilePurpose | None,
    after: str | None,
    limit: int,
    newest_first: bool,
) -> Page[StoredFile]:
    where = [files.c.org_id == org_id, files.c.status == FileState.PROCESSED.value]
    if purpose is not None:
        where.append(files.c.purpose == purpose.value)
    rows, more = fetch_page(
        conn, files, where=where, after=after, limit=limit, newest_first=newest_first
    )
    return Page(items=[_file(r) for r in rows], has_more=more)


def mark_deleting(conn: Connection, *, file_id: str) -> None:
    conn.execute(update(files).where(files.c.id == file_id).values(status=FileState.DELETING.value))


def remove(conn: Connection, *, file_id: str) -> None:
    conn.execute(delete(files).where(files.c.id == file_id))


def abandoned(conn: Connection, *, uploading_before: float) -> list[tuple[str, str]]:
    """`(id, blob_key)` of rows to clean up: every `deleting` row, and uploads that never ended."""
    stale_upload = (files.c.status == FileState.UPLOADING.value) & (
        files.c.created_at < uploading_before
    )
    rows = conn.execute(
        select(files.c.id, files.c.blob_key).where(
            (files.c.status == FileState.DELETING.value) | stale_upload
        )
    )
    return [(row.id, row.blob_key) for row in rows]
