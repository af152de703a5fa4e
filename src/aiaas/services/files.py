"""Uploaded files (OpenAI's Files API): streamed in encrypted, listed, downloaded, deleted.

An upload is three steps, so the HTTP layer can stream a multipart body straight into the
encrypted blob store without spooling plaintext to disk:

    upload = files.begin(...)            # reserve an invisible row
    files.receive(upload, chunks, ...)   # stream the bytes in (size limit, format check)
    stored = files.commit(upload, ...)   # make it visible, with an audit event
    files.abort(upload)                  # on any failure: no row, no blob

A crash between the steps leaves an invisible row (and at most a temp file, which the blob store
sweeps); `sweep()` at start-up removes abandoned uploads and finishes interrupted deletes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from aiaas.data.chat_format import ChatJsonlValidator
from aiaas.domain import Actor, FilePurpose, Page, StoredFile
from aiaas.errors import BlobNotFound, NotFound, PayloadTooLarge
from aiaas.ids import new_id, now
from aiaas.services.audit import AuditService
from aiaas.storage.blobs import BlobInfo, EncryptedBlobStore
from aiaas.storage.db import Database
from aiaas.storage.repos import files as files_repo

log = logging.getLogger("aiaas.files")

_UNSAFE_FILENAME = re.compile(r"[\x00-\x1f\x7f]")
MAX_FILENAME_CHARS = 255


@dataclass(slots=True)
class Upload:
    """An upload in flight: its reserved row and, once received, what the blob store holds."""

    file_id: str
    blob_key: str
    org_id: str
    project_id: str
    filename: str
    blob: BlobInfo | None = None
    validated_as: FilePurpose | None = None


def clean_filename(raw: str | None) -> str:
    """The last path segment, without control characters: it is shown, never used as a path."""
    name = re.split(r"[/\\]", raw or "")[-1]
    name = _UNSAFE_FILENAME.sub("", name).strip()
    return name[-MAX_FILENAME_CHARS:] or "upload"


class FileService:
    def __init__(
        self,
        db: Database,
        blobs: EncryptedBlobStore,
        audit: AuditService,
        *,
        max_file_bytes: int,
        abandon_uploads_after_s: float = 24 * 3600.0,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._audit = audit
        self.max_file_bytes = max_file_bytes
        self._abandon_after_s = abandon_uploads_after_s

    # -- upload ----------------------------------------------------------------------------------

    def begin(self, *, org_id: str, project_id: str, filename: str, actor: Actor) -> Upload:
        file_id = new_id("file", sep="-")
        upload = Upload(
            file_id=file_id,
            blob_key=f"files/{org_id}/{file_id}",
            org_id=org_id,
            project_id=project_id,
            filename=clean_filename(filename),
        )
        with self._db.write() as conn:
            files_repo.reserve(
                conn,
                file_id=file_id,
                org_id=org_id,
                project_id=project_id,
                filename=upload.filename,
                purpose=FilePurpose.USER_DATA,  # the real one is set at commit
                blob_key=upload.blob_key,
                created_by=actor.id,
            )
        return upload

    def receive(
        self, upload: Upload, chunks: Iterable[bytes], *, purpose: FilePurpose | None
    ) -> None:
        """Stream the bytes into the blob store, checking size and, when known, the format."""
        stream: Iterable[bytes] = _limited(chunks, self.max_file_bytes)
        if purpose is FilePurpose.FINE_TUNE:
            stream = ChatJsonlValidator().wrap(stream)
            upload.validated_as = purpose
        upload.blob = self._blobs.put(upload.org_id, upload.blob_key, stream)

    def commit(self, upload: Upload, *, purpose: FilePurpose, actor: Actor) -> StoredFile:
        assert upload.blob is not None, "receive() first"
        if purpose is FilePurpose.FINE_TUNE and upload.validated_as is not purpose:
            # The purpose field came after the file in the form: check the stored bytes now.
            for _chunk in ChatJsonlValidator().wrap(self._blobs.open(upload.blob_key)):
                pass  # wrap checks each line as it passes, and the end
        with self._db.write() as conn:
            stored = files_repo.publish(
                conn,
                file_id=upload.file_id,
                purpose=purpose,
                size=upload.blob.size,
                sha256=upload.blob.sha256,
            )
            self._audit.record(
                conn,
                actor=actor,
                action="file.created",
                target_type="file",
                target_id=upload.file_id,
                org_id=upload.org_id,
                project_id=upload.project_id,
                data={"purpose": purpose.value, "bytes": stored.bytes, "sha256": stored.sha256},
            )
        return stored

    def write(
        self,
        *,
        org_id: str,
        project_id: str,
        filename: str,
        chunks: Iterable[bytes],
        purpose: FilePurpose,
        actor: Actor,
    ) -> StoredFile:
        """A file the platform writes itself (a job's result, a batch's output): the three
        steps of an upload, with nothing left behind when one fails."""
        upload = self.begin(org_id=org_id, project_id=project_id, filename=filename, actor=actor)
        try:
            self.receive(upload, chunks, purpose=None)
            return self.commit(upload, purpose=purpose, actor=actor)
        except BaseException:
            self.abort(upload)
            raise

    def abort(self, upload: Upload) -> None:
        """Forget a failed upload: its blob (if it got that far), then its row."""
        self._blobs.delete(upload.blob_key)
        with self._db.write() as conn:
            files_repo.remove(conn, file_id=upload.file_id)

    # -- read ------------------------------------------------------------------------------------

    def get(self, *, org_id: str, file_id: str) -> StoredFile:
        with self._db.read() as conn:
            stored = files_repo.get(conn, org_id=org_id, file_id=file_id)
        if stored is None:
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return stored

    def list(
        self,
        *,
        org_id: str,
        purpose: FilePurpose | None,
        after: str | None,
        limit: int,
        newest_first: bool,
    ) -> Page[StoredFile]:
        with self._db.read() as conn:
            return files_repo.list_files(
                conn,
                org_id=org_id,
                purpose=purpose,
                after=after,
                limit=limit,
                newest_first=newest_first,
            )

    def open(self, *, org_id: str, file_id: str) -> tuple[StoredFile, Iterator[bytes]]:
        """The file and its plaintext bytes, as a stream."""
        stored = self.get(org_id=org_id, file_id=file_id)
        try:
            return stored, self._blobs.open(stored.blob_key)
        except BlobNotFound:  # deleted between the two reads
            raise NotFound(f"No such File object: {file_id}", param="file_id") from None

    # -- delete ----------------------------------------------------------------------------------

    def delete(self, *, org_id: str, file_id: str, actor: Actor) -> None:
        with self._db.write() as conn:
            stored = files_repo.get(conn, org_id=org_id, file_id=file_id)
            if stored is None:
                raise NotFound(f"No such File object: {file_id}", param="file_id")
            files_repo.mark_deleting(conn, file_id=file_id)
            self._audit.record(
                conn,
                actor=actor,
                action="file.deleted",
                target_type="file",
                target_id=file_id,
                org_id=org_id,
                project_id=stored.project_id,
                data={"filename": stored.filename},
            )
        self._drop(file_id, stored.blob_key)

    def sweep(self) -> int:
        """Remove abandoned uploads and finish interrupted deletes; return how many."""
        with self._db.read() as conn:
            leftovers = files_repo.abandoned(conn, uploading_before=now() - self._abandon_after_s)
        for file_id, blob_key in leftovers:
            self._drop(file_id, blob_key)
        if leftovers:
            log.info("removed %d abandoned or half-deleted files", len(leftovers))
        return len(leftovers)

    def _drop(self, file_id: str, blob_key: str) -> None:
        # Blob first: a crash in between leaves a row the next sweep finds, never an orphan blob.
        self._blobs.delete(blob_key)
        with self._db.write() as conn:
            files_repo.remove(conn, file_id=file_id)


def _limited(chunks: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > max_bytes:
            raise PayloadTooLarge(
                f"File is larger than the limit of {max_bytes} bytes.", param="file"
            )
        yield chunk
