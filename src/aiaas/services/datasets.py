"""Datasets: named, versioned, immutable tables made from uploaded files.

A version is made in three steps, like an upload: reserve (an invisible row, so a name clash is
a 409 before any work), build (read, redact, profile, split, fit; see `aiaas.data.build`) and
store (the Parquet blob, then the row becomes `ready` with its audit event). Any failure removes
what was reserved; a crash leaves rows that `sweep()` removes at the next start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
from sqlalchemy import Connection

from aiaas.data.build import (
    BuildOptions,
    BuiltVersion,
    Source,
    build_version,
    page_rows,
    read_version,
)
from aiaas.domain import Actor, Dataset, DatasetVersion, Page
from aiaas.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from aiaas.ids import new_id, now
from aiaas.privacy.pii import PiiDetector
from aiaas.services.audit import AuditService
from aiaas.services.files import FileService
from aiaas.storage.blobs import EncryptedBlobStore
from aiaas.storage.db import Database
from aiaas.storage.repos import datasets as repo
from aiaas.storage.repos import jobs as jobs_repo
from aiaas.storage.repos import registry as registry_repo
from aiaas.storage.repos import tenancy as tenancy_repo

log = logging.getLogger("aiaas.datasets")


@dataclass(frozen=True, slots=True)
class Workspace:
    """Where a new object goes and who makes it."""

    org_id: str
    project_id: str
    actor: Actor


class DatasetService:
    def __init__(
        self,
        db: Database,
        blobs: EncryptedBlobStore,
        files: FileService,
        audit: AuditService,
        *,
        max_source_bytes: int,
        abandon_after_s: float = 3600.0,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._files = files
        self._audit = audit
        self._max_source_bytes = max_source_bytes
        self._abandon_after_s = abandon_after_s
        self._detector: PiiDetector | None = None
        self._detector_lock = threading.Lock()

    # -- create ----------------------------------------------------------------------------------

    def create(
        self,
        ws: Workspace,
        *,
        name: str,
        description: str,
        file_ids: list[str],
        options: BuildOptions,
        redact_pii: bool | None,
    ) -> tuple[Dataset, DatasetVersion]:
        dataset_id = new_id("ds")
        version = self._new_version(
            ws, dataset_id, file_ids, options, redact_pii, new_dataset=(name, description)
        )
        return self.get(org_id=ws.org_id, dataset_id=dataset_id), version

    def add_version(
        self,
        ws: Workspace,
        *,
        dataset_id: str,
        file_ids: list[str],
        options: BuildOptions,
        redact_pii: bool | None,
    ) -> DatasetVersion:
        return self._new_version(ws, dataset_id, file_ids, options, redact_pii, new_dataset=None)

    def _new_version(
        self,
        ws: Workspace,
        dataset_id: str,
        file_ids: list[str],
        options: BuildOptions,
        redact_pii: bool | None,
        *,
        new_dataset: tuple[str, str] | None,
    ) -> DatasetVersion:
        """Reserve (with the dataset itself when `new_dataset` gives its name and description),
        make, and on any failure discard what was reserved."""
        version_id = new_id("dsv")
        blob_key = f"datasets/{ws.org_id}/{version_id}"
        with self._db.write() as conn:
            if new_dataset is not None:
                name, description = new_dataset
                repo.reserve_dataset(
                    conn,
                    dataset_id=dataset_id,
                    org_id=ws.org_id,
                    project_id=ws.project_id,
                    name=name,
                    description=description,
                    created_by=ws.actor.id,
                )
            elif repo.get_dataset(conn, org_id=ws.org_id, dataset_id=dataset_id) is None:
                raise _no_dataset(dataset_id)
            repo.reserve_version(
                conn,
                version_id=version_id,
                dataset_id=dataset_id,
                org_id=ws.org_id,
                blob_key=blob_key,
                created_by=ws.actor.id,
            )
        first = new_dataset is not None
        try:
            return self._make(
                ws, dataset_id, version_id, blob_key, file_ids, options, redact_pii, first=first
            )
        except BaseException:
            self._discard(version_id, blob_key, dataset_id=dataset_id if first else None)
            raise

    def _make(
        self,
        ws: Workspace,
        dataset_id: str,
        version_id: str,
        blob_key: str,
        file_ids: list[str],
        options: BuildOptions,
        redact_pii: bool | None,
        *,
        first: bool,
    ) -> DatasetVersion:
        with self._db.read() as conn:
            org = tenancy_repo.get_org(conn, ws.org_id)
        # The organisation's policy wins: a request cannot opt out of it.
        redact = bool(org and org.redact_pii) or bool(redact_pii)
        sources = self._sources(ws.org_id, file_ids)
        built = build_version(
            sources, replace(options, redact_pii=redact), pii_detector=self._pii_detector
        )
        self._blobs.put(ws.org_id, blob_key, [built.parquet])
        with self._db.write() as conn:
            version = repo.publish_version(
                conn,
                version_id=version_id,
                format=built.format.value,
                source_file_ids=file_ids,
                rows=built.rows,
                size=len(built.parquet),
                content_hash=built.content_hash,
                label_column=built.spec.label.column if built.spec.label else None,
                task=built.spec.label.task.value if built.spec.label else None,
                profile=_profile_document(built),
                preprocessing=built.spec.model_dump(mode="json"),
                pii=_pii_document(built),
            )
            if first:
                repo.mark_dataset(conn, dataset_id=dataset_id, state=repo.State.READY)
            self._audit.record(
                conn,
                actor=ws.actor,
                action="dataset.version.created",
                target_type="dataset_version",
                target_id=version_id,
                org_id=ws.org_id,
                project_id=ws.project_id,
                data={
                    "dataset_id": dataset_id,
                    "version": version.version,
                    "content_hash": version.content_hash,
                    "source_file_ids": file_ids,
                    "pii_redacted": redact,
                },
            )
        return version

    def _sources(self, org_id: str, file_ids: list[str]) -> list[Source]:
        if len(set(file_ids)) != len(file_ids):
            raise InvalidRequest("file_ids lists a file twice.", param="file_ids")
        sources = []
        total = 0
        for file_id in file_ids:
            stored, chunks = self._files.open(org_id=org_id, file_id=file_id)
            total += stored.bytes
            if total > self._max_source_bytes:
                raise PayloadTooLarge(
                    f"The files of one dataset version may hold {self._max_source_bytes} bytes "
                    "in all.",
                    param="file_ids",
                )
            sources.append(Source(file_id=file_id, filename=stored.filename, data=b"".join(chunks)))
        return sources

    def _pii_detector(self) -> PiiDetector:
        # Built on first use (its name lists take a moment) and shared: it is read-only.
        with self._detector_lock:
            if self._detector is None:
                self._detector = PiiDetector()
            return self._detector

    # -- read ------------------------------------------------------------------------------------

    def get(self, *, org_id: str, dataset_id: str) -> Dataset:
        with self._db.read() as conn:
            dataset = repo.get_dataset(conn, org_id=org_id, dataset_id=dataset_id)
        if dataset is None:
            raise _no_dataset(dataset_id)
        return dataset

    def list(self, *, org_id: str, after: str | None, limit: int) -> Page[Dataset]:
        with self._db.read() as conn:
            return repo.list_datasets(conn, org_id=org_id, after=after, limit=limit)

    def get_version(self, *, org_id: str, dataset_id: str, version: int) -> DatasetVersion:
        with self._db.read() as conn:
            found = repo.get_version(conn, org_id=org_id, dataset_id=dataset_id, version=version)
        if found is None:
            raise _no_version(dataset_id, version)
        return found

    def list_versions(
        self, *, org_id: str, dataset_id: str, after: str | None, limit: int
    ) -> Page[DatasetVersion]:
        self.get(org_id=org_id, dataset_id=dataset_id)
        with self._db.read() as conn:
            return repo.list_versions(
                conn, org_id=org_id, dataset_id=dataset_id, after=after, limit=limit
            )

    def content(self, version: DatasetVersion) -> Iterator[bytes]:
        """The version's stored Parquet bytes (split column included), as a stream."""
        return self._blobs.open(version.blob_key)

    def load(self, version: DatasetVersion) -> pd.DataFrame:
        return read_version(b"".join(self.content(version)))

    def rows(
        self, version: DatasetVersion, *, split: str | None, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        return page_rows(self.load(version), split=split, offset=offset, limit=limit)

    # -- delete ----------------------------------------------------------------------------------

    def delete_version(
        self, *, org_id: str, dataset_id: str, version: int, actor: Actor
    ) -> DatasetVersion:
        """Delete a version (its blob too) and return what it was."""
        with self._db.write() as conn:
            found = repo.get_version(conn, org_id=org_id, dataset_id=dataset_id, version=version)
            if found is None:
                raise _no_version(dataset_id, version)
            _refuse_if_used(conn, [found.id], what=f"version {version} of dataset {dataset_id}")
            repo.mark_version(conn, version_id=found.id, state=repo.State.DELETING)
            self._audit.record(
                conn,
                actor=actor,
                action="dataset.version.deleted",
                target_type="dataset_version",
                target_id=found.id,
                org_id=org_id,
                data={"dataset_id": dataset_id, "version": version},
            )
        self._drop_version(found.id, found.blob_key)
        return found

    def delete(self, *, org_id: str, dataset_id: str, actor: Actor) -> None:
        with self._db.write() as conn:
            dataset = repo.get_dataset(conn, org_id=org_id, dataset_id=dataset_id)
            if dataset is None:
                raise _no_dataset(dataset_id)
            versions = repo.versions_of(conn, dataset_id=dataset_id)
            _refuse_if_used(conn, [v for v, _ in versions], what=f"dataset {dataset_id}")
            repo.mark_dataset(conn, dataset_id=dataset_id, state=repo.State.DELETING)
            for version_id, _ in versions:
                repo.mark_version(conn, version_id=version_id, state=repo.State.DELETING)
            self._audit.record(
                conn,
                actor=actor,
                action="dataset.deleted",
                target_type="dataset",
                target_id=dataset_id,
                org_id=org_id,
                project_id=dataset.project_id,
                data={"name": dataset.name},
            )
        for version_id, blob_key in versions:
            self._drop_version(version_id, blob_key)
        with self._db.write() as conn:
            repo.remove_dataset(conn, dataset_id=dataset_id)

    def sweep(self) -> int:
        """Remove versions whose making or deleting a crash cut short; return how many."""
        with self._db.read() as conn:
            versions, _ = repo.abandoned(conn, creating_before=now() - self._abandon_after_s)
        for row in versions:
            self._drop_version(row.id, row.blob_key)
        with self._db.write() as conn:
            _, empty = repo.abandoned(conn, creating_before=now() - self._abandon_after_s)
            for dataset_id in empty:
                repo.remove_dataset(conn, dataset_id=dataset_id)
        if versions or empty:
            log.info("removed %d unfinished dataset versions", len(versions))
        return len(versions)

    def _discard(self, version_id: str, blob_key: str, *, dataset_id: str | None) -> None:
        self._drop_version(version_id, blob_key)
        if dataset_id is not None:
            with self._db.write() as conn:
                repo.remove_dataset(conn, dataset_id=dataset_id)

    def _drop_version(self, version_id: str, blob_key: str) -> None:
        # Blob first: a crash in between leaves a row the next sweep finds, never an orphan blob.
        self._blobs.delete(blob_key)
        with self._db.write() as conn:
            repo.remove_version(conn, version_id=version_id)


def _refuse_if_used(conn: Connection, version_ids: list[str], *, what: str) -> None:
    """A version that trained a registered model, or feeds an unfinished job, is lineage."""
    models = registry_repo.count_using_dataset_versions(conn, version_ids=version_ids)
    jobs = jobs_repo.count_using_dataset_versions(conn, version_ids=version_ids)
    if models or jobs:
        raise Conflict(
            f"Cannot delete {what}: {models} model version(s) and {jobs} unfinished job(s) "
            "were trained on it. Delete those models (or cancel the jobs) first.",
            code="dataset_in_use",
        )


def _no_dataset(dataset_id: str) -> NotFound:
    return NotFound(f"No dataset with id {dataset_id!r}.", param="dataset_id")


def _no_version(dataset_id: str, version: int) -> NotFound:
    return NotFound(f"Dataset {dataset_id!r} has no version {version}.", param="version")


def _profile_document(built: BuiltVersion) -> dict[str, object]:
    return {**built.profile.model_dump(mode="json"), "splits": built.splits}


def _pii_document(built: BuiltVersion) -> dict[str, object] | None:
    if built.pii is None:
        return None
    return {
        "redacted": True,
        "columns": [
            {"column": r.column, "counts": dict(r.counts), "rows_affected": r.rows_affected}
            for r in built.pii
        ],
    }
