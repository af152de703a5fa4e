"""Blob stores: where uploaded files, datasets and checkpoints live, behind one small interface.

`BlobStore` is the interface (like HTTPX's `BaseTransport`); `LocalBlobStore` keeps blobs as files
under a directory, and an S3 store will follow. `EncryptedBlobStore` wraps any store so that only
ciphertext reaches it (the format is in `aiaas.storage.crypto`). `open_blob_store(url, keyring)`
picks the store by the URL's scheme, the way MLflow picks a registry store.

Blobs are streamed both ways, so a multi-gigabyte checkpoint never sits in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol, Self
from urllib.parse import unquote, urlsplit

from aiaas.errors import BlobNotFound, ConfigurationError, Conflict, InvalidRequest
from aiaas.storage.crypto import KeyRing

__all__ = [
    "MAX_KEY_LENGTH",
    "BlobInfo",
    "BlobStore",
    "EncryptedBlobStore",
    "LocalBlobStore",
    "open_blob_store",
    "validate_key",
]

MAX_KEY_LENGTH = 1024  # S3's limit, so a key valid here stays valid there
READ_CHUNK = 64 * 1024

_MAX_SEGMENT_LENGTH = 255  # NAME_MAX on common filesystems
# No segment may start with ".": that rules out "." and "..", hidden files and our ".tmp".
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_TEMP_DIR = ".tmp"
_TEMP_GRACE_S = 0.0


@dataclass(frozen=True)
class BlobInfo:
    """What was stored: the size and SHA-256 (hex) of the bytes the caller handed in."""

    key: str
    size: int
    sha256: str


class BlobStore(Protocol):
    """Bytes under string keys. Keys are `/`-joined segments; see `validate_key`."""

    def put(self, key: str, chunks: Iterable[bytes]) -> BlobInfo:
        """Store the chunks under `key` atomically, replacing any blob there.

        If `chunks` raises midway, nothing changes under `key` and the exception propagates.
        """
        ...

    def open(self, key: str) -> Iterator[bytes]:
        """The blob's bytes as chunks; raises `BlobNotFound` at the call, not on first read."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> bool:
        """Remove the blob; False when there was none."""
        ...

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with `prefix`, in a stable order."""
        ...

    def close(self) -> None: ...


def validate_key(key: str) -> str:
    """The key, if it is safe as a relative path on every store; else `InvalidRequest`.

    Keys become file paths in `LocalBlobStore`, so this is what keeps `../../etc/passwd` out.
    """
    if not 0 < len(key) <= MAX_KEY_LENGTH:
        raise InvalidRequest(
            f"blob key must be 1..{MAX_KEY_LENGTH} characters, got {len(key)}", param="key"
        )
    for segment in key.split("/"):
        if len(segment) > _MAX_SEGMENT_LENGTH or not _SEGMENT.fullmatch(segment):
            raise InvalidRequest(
                f"invalid blob key {key!r}: segments are 1..{_MAX_SEGMENT_LENGTH} characters of "
                "A-Z a-z 0-9 . _ -, do not start with '.', and are joined by single '/'",
                param="key",
            )
    return key


class LocalBlobStore:
    """Blobs as files under `root`: the key `a/b/c` is the file `root/a/b/c`.

    A put streams into a temp file under `root/.tmp/`, fsyncs it and renames it into place, so a
    reader sees the old blob or the new one, never half of one, and a crash leaves only a temp
    file, which the next start sweeps away. Needs POSIX (`fcntl`, directory fsync).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._temp = root / _TEMP_DIR
        self._temp.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sweep_temp()

    def put(self, key: str, chunks: Iterable[bytes]) -> BlobInfo:
        target = self._path(key)
        fd, temp = self._locked_temp()
        try:
            with os.fdopen(fd, "wb") as file:
                info = _write_chunks(file, key, chunks)
                self._publish(Path(temp), target, key)
            return info
        finally:
            with suppress(FileNotFoundError):
                os.unlink(temp)

    def _locked_temp(self) -> tuple[int, str]:
        """A new temp file, locked until the rename so another process's sweep spares it.

        A sweep may unlink the file in the instant between its creation and our lock; the link
        count tells, and we simply take another.
        """
        while True:
            fd, temp = tempfile.mkstemp(dir=self._temp, prefix="put-")
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                return fd, temp
            os.close(fd)

    def open(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(f"blob {key!r} does not exist", param="key")
        return _read_file(path, key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        _fsync_dir(path.parent)
        return True

    def keys(self, prefix: str = "") -> Iterator[str]:
        directory, _, _ = prefix.rpartition("/")
        # Walk only the deepest directory the prefix names; validating it keeps the walk in root.
        base = self._path(directory) if directory else self.root
        return self._walk(base, prefix)

    def sweep_temp(self, older_than_s: float = _TEMP_GRACE_S) -> int:
        """Remove temp files a crashed put left behind; return how many.

        Another process may share the root, so a file is spared while a writer holds its lock
        (and a writer whose file went before it took the lock takes another one).
        """
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in os.scandir(self._temp):
            stale = entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff
            if stale and _remove_unlocked(Path(entry.path)):
                removed += 1
        return removed

    def close(self) -> None:
        """Nothing to release; here so every store is closed the same way."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _publish(self, temp: Path, target: Path, key: str) -> None:
        try:
            _make_parents(self.root, target)
            os.replace(temp, target)
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
            raise Conflict(
                f"blob key {key!r} collides with another key: one would be a directory of the other"
            ) from exc
        _fsync_dir(target.parent)

    def _walk(self, base: Path, prefix: str) -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
            for name in sorted(filenames):
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix) and not name.startswith("."):
                    yield key


class EncryptedBlobStore:
    """Encrypts on the way in and decrypts on the way out, under each owner's data key.

    `put` reports the plaintext's size and SHA-256, because that is what callers and clients
    know and check; the ciphertext's are an implementation detail of the inner store.
    """

    def __init__(self, inner: BlobStore, keyring: KeyRing) -> None:
        self.inner = inner
        self._keyring = keyring

    def put(self, owner: str, key: str, chunks: Iterable[bytes]) -> BlobInfo:
        measured = _Measured(chunks)
        self.inner.put(key, self._keyring.encrypt_stream(owner, measured))
        return BlobInfo(key=key, size=measured.size, sha256=measured.sha256)

    def open(self, key: str) -> Iterator[bytes]:
        """Plaintext chunks; `BlobNotFound` at the call, `BlobIntegrityError` while reading."""
        return self._keyring.decrypt_stream(self.inner.open(key))

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def keys(self, prefix: str = "") -> Iterator[str]:
        return self.inner.keys(prefix)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def open_blob_store(url: str, keyring: KeyRing) -> EncryptedBlobStore:
    """The encrypted store a blob URL names: `file:///absolute/path` for now."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        # Only the scheme is echoed: other URLs (s3://key:secret@...) can carry credentials.
        raise ConfigurationError(
            f"blob store scheme {parts.scheme!r} is not supported yet; "
            "use file:///absolute/path (an S3 store is planned)"
        )
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise ConfigurationError(f"blob store URL {url!r} must look like file:///absolute/path")
    root = Path(unquote(parts.path))
    if not root.is_absolute():
        raise ConfigurationError(f"blob store URL {url!r} must name an absolute path")
    return EncryptedBlobStore(LocalBlobStore(root), keyring)


class _Measured:
    """Passes chunks through while counting and hashing them, so the input is read only once."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self._digest = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self._digest.update(chunk)
            self.size += len(chunk)
            yield chunk

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def _write_chunks(file: BinaryIO, key: str, chunks: Iterable[bytes]) -> BlobInfo:
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        file.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    file.flush()
    os.fsync(file.fileno())
    return BlobInfo(key=key, size=size, sha256=digest.hexdigest())


def _read_file(path: Path, key: str) -> Iterator[bytes]:
    try:
        file = path.open("rb")
    except FileNotFoundError:  # deleted between open() and the first read
        raise BlobNotFound(f"blob {key!r} does not exist", param="key") from None
    with file:
        while chunk := file.read(READ_CHUNK):
            yield chunk


def _make_parents(root: Path, target: Path) -> None:
    """Create the target's missing directories, fsyncing each new entry into its parent."""
    current = root
    for part in target.relative_to(root).parts[:-1]:
        child = current / part
        try:
            child.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            _fsync_dir(current)
        current = child


def _remove_unlocked(path: Path) -> bool:
    """Delete a temp file unless a live writer holds its lock; True if it was deleted."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
    except (BlockingIOError, FileNotFoundError):
        return False
    finally:
        os.close(fd)
    return True


def _fsync_dir(directory: Path) -> None:
    """Make a new, renamed or removed directory entry survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
