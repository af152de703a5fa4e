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
from aiaas.domain import (
    Actor,
    Dataset,
    DatasetVersion,
    Grant,
    GrantPermission,
    Page,
    SharedKind,
)
from aiaas.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from aiaas.ids import new_id, now
from aiaas.privacy.pii import PiiDetector
from aiaas.services.audit import AuditService
from aiaas.services.files import FileService
from aiaas.services.grants import GrantService, covers_every_version, granted_versions
from aiaas.storage.blobs import EncryptedBlobStore
from aiaas.storage.db import Database
from aiaas.storage.repos import datasets as repo
from aiaas.storage.repos import jobs as jobs_repo
from aiaas.storage.repos import registry as registry_repo
from aiaas.storage.repos import tenancy as tenancy_repo
from aiaas.storage.repos.paging import after_cursor, page_in_memory

log = logging.getLogger("aiaas.datasets")


@dataclass(frozen=True, slots=True)
class Workspace:
    """Where a new object goes and who makes it."""

    org_id: str
    project_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class Shown:
    """A dataset as one organisation sees it: its own (`owned_by` None), or another's shared
    with it by a `read` grant (`owned_by`: the owner organisation's name; `latest_version`: the
    newest version the grants reach)."""

    dataset: Dataset
    owned_by: str | None = None


class DatasetService:
    def __init__(
        self,
        db: Database,
        blobs: EncryptedBlobStore,
        files: FileService,
        audit: AuditService,
        *,
        max_source_bytes: int,
        grants: GrantService | None = None,
        abandon_after_s: float = 3600.0,
        region: str = "local",
    ) -> None:
        self._region = region  # this node's: new datasets' rows live here
        self._db = db
        self._blobs = blobs
        self._files = files
        self._audit = audit
        self._grants = grants  # None: no dataset is ever shared for reading
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
        residency: str = "none",
    ) -> tuple[Dataset, DatasetVersion]:
        dataset_id = new_id("ds")
        version = self._new_version(
            ws,
            dataset_id,
            file_ids,
            options,
            redact_pii,
            new_dataset=(name, description, residency),
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
        new_dataset: tuple[str, str, str] | None,
    ) -> DatasetVersion:
        """Reserve (with the dataset itself when `new_dataset` gives its name, description and
        residency; its region is this node's), make, and on any failure discard what was
        reserved."""
        version_id = new_id("dsv")
        blob_key = f"datasets/{ws.org_id}/{version_id}"
        with self._db.write() as conn:
            if new_dataset is not None:
                name, description, residency = new_dataset
                repo.reserve_dataset(
                    conn,
                    dataset_id=dataset_id,
                    org_id=ws.org_id,
                    project_id=ws.project_id,
                    name=name,
                    description=description,
                    created_by=ws.actor.id,
                    region=self._region,
                    residency=residency,
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

    # Reads answer the owner, and an organisation that an active `read` grant reaches (on the
    # dataset, or on the version asked for); `use` and `train-on` show nothing. Anyone else gets
    # the same 404 as for a dataset that does not exist. Writes stay the owner's.

    def get(self, *, org_id: str, dataset_id: str) -> Dataset:
        """One of `org_id`'s own datasets."""
        with self._db.read() as conn:
            dataset = repo.get_dataset(conn, org_id=org_id, dataset_id=dataset_id)
        if dataset is None:
            raise _no_dataset(dataset_id)
        return dataset

    def show(self, *, org_id: str, dataset_id: str) -> Shown:
        """A dataset `org_id` owns or may read (a grant on any one version is enough)."""
        reach = self._readable(org_id, dataset_id)
        if reach is None:
            raise _no_dataset(dataset_id)
        owner, grants = reach
        with self._db.read() as conn:
            dataset = repo.get_dataset(conn, org_id=owner, dataset_id=dataset_id)
            if dataset is None:
                raise _no_dataset(dataset_id)
            return self._shown(conn, dataset, grants)

    def list(self, *, org_id: str, after: str | None, limit: int) -> Page[Shown]:
        """`org_id`'s own datasets, then those shared with it for reading (in grant order)."""
        with self._db.read() as conn:
            own_cursor = (
                after is None or repo.get_dataset(conn, org_id=org_id, dataset_id=after) is not None
            )
            items: list[Shown] = []
            if own_cursor:
                page = repo.list_datasets(conn, org_id=org_id, after=after, limit=limit)
                if page.has_more:
                    return Page(items=[Shown(d) for d in page.items], has_more=True)
                items = [Shown(d) for d in page.items]
            shared = self._shared(conn, org_id)
        if not own_cursor:
            shared = after_cursor(shared, after, id_of=lambda s: s.dataset.id)
        room = limit - len(items)
        return Page(items=items + shared[:room], has_more=len(shared) > room)

    def get_version(self, *, org_id: str, dataset_id: str, version: int) -> DatasetVersion:
        """A version `org_id` owns or may read."""
        reach = self._readable(org_id, dataset_id, version)
        if reach is None:
            raise _no_version(dataset_id, version)
        owner, _ = reach
        with self._db.read() as conn:
            found = repo.get_version(conn, org_id=owner, dataset_id=dataset_id, version=version)
        if found is None:
            raise _no_version(dataset_id, version)
        return found

    def list_versions(
        self, *, org_id: str, dataset_id: str, after: str | None, limit: int
    ) -> Page[DatasetVersion]:
        """The versions `org_id` may read: all of its own, those a grant reaches of another's."""
        reach = self._readable(org_id, dataset_id)
        if reach is None:
            raise _no_dataset(dataset_id)
        owner, grants = reach
        with self._db.read() as conn:
            if repo.get_dataset(conn, org_id=owner, dataset_id=dataset_id) is None:
                raise _no_dataset(dataset_id)
            if covers_every_version(grants):
                return repo.list_versions(
                    conn, org_id=owner, dataset_id=dataset_id, after=after, limit=limit
                )
            versions = _granted_versions(conn, owner, dataset_id, grants)
        return page_in_memory(versions, after=after, limit=limit, id_of=lambda v: v.id)

    def _readable(
        self, org_id: str, dataset_id: str, version: int | None = None
    ) -> tuple[str, list[Grant]] | None:
        """Whose dataset `org_id` reads and through which grants: `(org_id, [])` for its own;
        `(owner, grants)` where active `read` grants reach it (the version, or any version when
        `version` is None); None for anyone else."""
        with self._db.read() as conn:
            if repo.get_dataset(conn, org_id=org_id, dataset_id=dataset_id) is not None:
                return org_id, []
        if self._grants is None:
            return None
        return self._grants.reading(
            org_id=org_id, kind=SharedKind.DATASET, object_id=dataset_id, version=version
        )

    def _shared(self, conn: Connection, org_id: str) -> list[Shown]:
        """Other organisations' datasets that `read` grants reach `org_id` with."""
        if self._grants is None:
            return []
        by_dataset: dict[str, list[Grant]] = {}
        for grant in self._grants.reaching(
            org_id=org_id, kind=SharedKind.DATASET, needed=GrantPermission.READ
        ):
            if grant.org_id != org_id:
                by_dataset.setdefault(grant.object_id, []).append(grant)
        shown = []
        for dataset_id, grants in by_dataset.items():
            dataset = repo.get_dataset(conn, org_id=grants[0].org_id, dataset_id=dataset_id)
            if dataset is not None:
                shown.append(self._shown(conn, dataset, grants))
        return shown

    def _shown(self, conn: Connection, dataset: Dataset, grants: list[Grant]) -> Shown:
        if not grants:
            return Shown(dataset)
        owner = tenancy_repo.get_org(conn, dataset.org_id)
        if not covers_every_version(grants):
            versions = _granted_versions(conn, dataset.org_id, dataset.id, grants)
            latest = versions[-1].version if versions else None
            dataset = replace(dataset, latest_version=latest)
        return Shown(dataset, owned_by=owner.name if owner else dataset.org_id)

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
            if self._grants is not None:  # its grants end with it
                self._grants.revoke_all_on(
                    conn, org_id=org_id, kind=SharedKind.DATASET, object_id=dataset_id, actor=actor
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


def _granted_versions(
    conn: Connection, owner: str, dataset_id: str, grants: list[Grant]
) -> list[DatasetVersion]:
    """The ready versions that version grants name, oldest first."""
    found = [
        repo.get_version(conn, org_id=owner, dataset_id=dataset_id, version=n)
        for n in granted_versions(grants)
    ]
    return [v for v in found if v is not None]


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
