"""Envelope encryption: per-owner data keys wrapped by a master key, and a streaming AEAD.

The master key never touches a blob. Each owner (an organisation id, or "platform") has its own
random data key, stored wrapped in `data_keys`; a blob is encrypted under a key derived from its
owner's data key. Rotating the master key therefore re-wraps a few rows instead of every file, and
one tenant's key opens only that tenant's blobs.

Wrapped data key (the `data_keys.wrapped_key` column)::

    0x01 || nonce (12 bytes) || AES-256-GCM(master key, nonce, data key, aad)
    aad = b"aiaas data key v1" 0x00 || owner (UTF-8)

The AAD binds a wrapped key to its owner, so a row copied to another owner fails to unwrap.

Blob format, version 1::

    header   = b"AIAASENC" || 0x01 || n (1 byte) || data-key id (n ASCII bytes) || salt (16 bytes)
    frame i  = len(ct_i) (4 bytes, big-endian) || ct_i
    ct_i     = AES-256-GCM(blob key, nonce_i, plaintext_i, aad=header)
    nonce_i  = i (11 bytes, big-endian) || final flag (0x01 on the last frame, else 0x00)
    blob key = HKDF-SHA256(data key, salt, info=b"aiaas blob v1", length=32)

Every plaintext_i but the last holds exactly 64 KiB; the last holds 0 to 64 KiB, so an empty blob
is a header and one empty final frame. This is the STREAM construction (Hoang, Reyhanitabar,
Rogaway and Vizár, 2015): the counter in the nonce catches reordered and dropped frames, the final
flag catches truncation at a frame boundary and data appended after the end, and the header as AAD
authenticates the key id and the salt. The random salt gives every blob its own key, so counter
nonces never repeat under one key.

Decryption yields each frame's plaintext as soon as that frame authenticates, so a reader holds
one frame, not the file. Every yielded frame is authentic and in order, but the blob as a whole is
only known to be complete when iteration ends without `BlobIntegrityError`: a consumer must
discard what it got if the stream raises.
"""

from __future__ import annotations

import os
import secrets
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aiaas.errors import BlobIntegrityError, ConfigurationError
from aiaas.settings import decode_key_material
from aiaas.storage.repos.data_keys import DataKeyRepo

__all__ = [
    "FRAME_SIZE",
    "MAGIC",
    "VERSION",
    "DataKey",
    "KeyRing",
    "load_or_create_secret",
]

MAGIC = b"AIAASENC"
VERSION = 1
FRAME_SIZE = 64 * 1024

_KEY_SIZE = 32
_NONCE_SIZE = 12
_TAG_SIZE = 16
_SALT_SIZE = 16
_MAX_FRAME_CIPHERTEXT = FRAME_SIZE + _TAG_SIZE
_MAX_OWNER_LENGTH = 64  # the width of data_keys.owner
_LENGTH = struct.Struct(">I")
_BLOB_INFO = b"aiaas blob v1"
_WRAP_VERSION = b"\x01"
_WRAP_AAD = b"aiaas data key v1\x00"
_WRAPPED_SIZE = len(_WRAP_VERSION) + _NONCE_SIZE + _KEY_SIZE + _TAG_SIZE
_AUTH_FAILED = "blob failed authentication"


def load_or_create_secret(configured: str | None, path: Path, *, name: str) -> bytes:
    """A 32-byte server secret: the configured value, else the one kept in `path`.

    The embedded mode must work with no configuration, yet a secret must survive restarts (or
    every blob and API key would be lost), so the first start generates one and keeps it as 64 hex
    characters in a 0600 file. Two processes starting together agree on one secret: the file
    appears whole or not at all, and a process that loses the race reads the winner's.
    """
    if configured is not None:
        return decode_key_material(configured, name=name)
    try:
        return _read_secret_file(path, name=name)
    except FileNotFoundError:
        return _create_secret_file(path, name=name)


def _read_secret_file(path: Path, *, name: str) -> bytes:
    raw = path.read_bytes()
    try:
        secret = bytes.fromhex(raw.decode("ascii").strip())
    except ValueError:  # also UnicodeDecodeError
        secret = b""
    if len(secret) != _KEY_SIZE:
        raise ConfigurationError(
            f"{name} file {path} is malformed: expected {2 * _KEY_SIZE} hex characters"
        )
    return secret


def _create_secret_file(path: Path, *, name: str) -> bytes:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = secrets.token_bytes(_KEY_SIZE)
    # mkstemp creates the file 0600 in the same directory, so the link below cannot cross devices.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secret.hex() + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            # Unlike os.replace, os.link refuses to overwrite: the first process to link wins.
            os.link(temp, path)
        except FileExistsError:
            return _read_secret_file(path, name=name)
        _fsync_dir(path.parent)
        return secret
    finally:
        os.unlink(temp)


def _fsync_dir(directory: Path) -> None:
    """Make a new or renamed directory entry survive a power cut, not just the file's bytes."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class DataKey:
    """An owner's unwrapped data key. `repr` leaves the key out, so logs and tracebacks cannot."""

    id: str
    owner: str
    key: bytes = field(repr=False)


class KeyRing:
    """Hands out owners' data keys and encrypts and decrypts blob streams with them.

    One instance lives as long as the app. It caches unwrapped keys, so after the first blob of an
    owner no read or write needs the database; the cache belongs to the instance, never the
    module, so two apps (or tests) in one process do not share keys.
    """

    def __init__(self, master_key: bytes, repo: DataKeyRepo) -> None:
        if len(master_key) != _KEY_SIZE:
            raise ValueError(f"master key must be {_KEY_SIZE} bytes, got {len(master_key)}")
        self._master = AESGCM(master_key)
        self._repo = repo
        self._lock = threading.Lock()
        self._by_id: dict[str, DataKey] = {}
        self._id_by_owner: dict[str, str] = {}

    def data_key(self, owner: str) -> DataKey:
        """The owner's data key, created on first use.

        Two replicas creating an owner's first key together both end up with the stored one,
        because `create_if_absent` returns the winner's row and we unwrap that, not our own.
        """
        _check_owner(owner)
        with self._lock:
            key_id = self._id_by_owner.get(owner)
            if key_id is not None:
                return self._by_id[key_id]
        stored = self._repo.get(owner)
        if stored is None:
            fresh = self._wrap(owner, secrets.token_bytes(_KEY_SIZE))
            stored = self._repo.create_if_absent(owner, fresh)
        key_id, wrapped = stored
        return self._remember(DataKey(key_id, owner, self._unwrap(key_id, owner, wrapped)))

    def key_by_id(self, key_id: str) -> DataKey:
        """The data key a blob header names; `BlobIntegrityError` if unknown or it won't unwrap."""
        with self._lock:
            cached = self._by_id.get(key_id)
        if cached is not None:
            return cached
        stored = self._repo.get_by_id(key_id)
        if stored is None:
            raise BlobIntegrityError(
                f"{_AUTH_FAILED}: its header names data key {key_id!r}, which does not exist "
                "(a tampered header, or a blob from another database)"
            )
        owner, wrapped = stored
        return self._remember(DataKey(key_id, owner, self._unwrap(key_id, owner, wrapped)))

    def encrypt_stream(self, owner: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The blob (header, then frames) of a plaintext given as chunks of any size.

        The owner's key is looked up now, so a bad owner or master key fails at the call; the
        chunks are read lazily, and at most one frame plus one input chunk is held at a time.
        """
        data_key = self.data_key(owner)
        salt = secrets.token_bytes(_SALT_SIZE)
        header = _header(data_key.id, salt)
        return _encrypt_frames(_blob_cipher(data_key.key, salt), header, chunks)

    def decrypt_stream(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The plaintext of a blob given as chunks of any size, one frame at a time.

        Raises `BlobIntegrityError` while iterating if the blob is not authentic and complete.
        """
        return self._decrypt_frames(_ChunkReader(chunks))

    def _decrypt_frames(self, reader: _ChunkReader) -> Iterator[bytes]:
        header, key_id, salt = _read_header(reader)
        cipher = _blob_cipher(self.key_by_id(key_id).key, salt)
        counter = 0
        while True:
            ciphertext = _read_frame(reader)
            # Only the last frame may be final; if the writer disagrees, the tag says so.
            final = reader.at_eof()
            yield _open_frame(cipher, counter, final, ciphertext, header)
            if final:
                return
            counter += 1

    def _remember(self, data_key: DataKey) -> DataKey:
        with self._lock:
            kept = self._by_id.setdefault(data_key.id, data_key)
            self._id_by_owner[kept.owner] = kept.id
        return kept

    def _wrap(self, owner: str, key: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_SIZE)
        return _WRAP_VERSION + nonce + self._master.encrypt(nonce, key, _wrap_aad(owner))

    def _unwrap(self, key_id: str, owner: str, wrapped: bytes) -> bytes:
        failure = BlobIntegrityError(
            f"data key {key_id!r} of owner {owner!r} failed to unwrap: the master key is not the "
            "one that wrapped it, or the stored key was altered"
        )
        if len(wrapped) != _WRAPPED_SIZE or not wrapped.startswith(_WRAP_VERSION):
            raise failure
        nonce = wrapped[1 : 1 + _NONCE_SIZE]
        try:
            return self._master.decrypt(nonce, wrapped[1 + _NONCE_SIZE :], _wrap_aad(owner))
        except InvalidTag:
            raise failure from None


def _check_owner(owner: str) -> None:
    if not owner or len(owner) > _MAX_OWNER_LENGTH:
        raise ValueError(f"data-key owner must be 1..{_MAX_OWNER_LENGTH} characters: {owner!r}")


def _wrap_aad(owner: str) -> bytes:
    return _WRAP_AAD + owner.encode("utf-8")


def _blob_cipher(data_key: bytes, salt: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=_KEY_SIZE, salt=salt, info=_BLOB_INFO)
    return AESGCM(hkdf.derive(data_key))


def _nonce(counter: int, final: bool) -> bytes:
    return counter.to_bytes(_NONCE_SIZE - 1, "big") + (b"\x01" if final else b"\x00")


def _header(key_id: str, salt: bytes) -> bytes:
    raw_id = key_id.encode("ascii")
    if not 0 < len(raw_id) < 256:
        raise ValueError(f"data-key id must be 1..255 ASCII characters: {key_id!r}")
    return MAGIC + bytes([VERSION, len(raw_id)]) + raw_id + salt


def _encrypt_frames(cipher: AESGCM, header: bytes, chunks: Iterable[bytes]) -> Iterator[bytes]:
    yield header
    for counter, (plaintext, final) in enumerate(_frames(chunks)):
        ciphertext = cipher.encrypt(_nonce(counter, final), plaintext, header)
        yield _LENGTH.pack(len(ciphertext)) + ciphertext


def _frames(chunks: Iterable[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Re-cut chunks into FRAME_SIZE plaintexts, each paired with whether it is the last.

    A frame is released only once a byte beyond it has arrived, since until then it may be the
    final one. Input is sliced through a memoryview rather than copied whole, so this holds one
    frame besides the caller's current chunk, however large that chunk is.
    """
    pending = bytearray()
    for chunk in chunks:
        view = memoryview(chunk)
        while len(pending) + len(view) > FRAME_SIZE:
            take = FRAME_SIZE - len(pending)
            pending += view[:take]
            view = view[take:]
            yield bytes(pending), False
            pending.clear()
        pending += view
    yield bytes(pending), True


class _ChunkReader:
    """Exact-size reads over chunks of any size, from one byte to the whole blob.

    It keeps a view of the current input chunk rather than a copy, so it holds the caller's
    chunk plus the one read being assembled.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._view = memoryview(b"")

    def read(self, size: int) -> bytes:
        """`size` bytes, or fewer only when the stream ends first."""
        data = bytearray()
        while len(data) < size and not self.at_eof():
            take = size - len(data)
            data += self._view[:take]
            self._view = self._view[take:]
        return bytes(data)

    def at_eof(self) -> bool:
        while not self._view:
            chunk = next(self._chunks, None)
            if chunk is None:
                return True
            self._view = memoryview(chunk)
        return False


def _read_header(reader: _ChunkReader) -> tuple[bytes, str, bytes]:
    """`(header bytes, data-key id, salt)`; the header bytes are every frame's AAD."""
    fixed = reader.read(len(MAGIC) + 2)
    if len(fixed) < len(MAGIC) + 2:
        raise BlobIntegrityError(f"{_AUTH_FAILED}: truncated inside the header")
    if not fixed.startswith(MAGIC):
        raise BlobIntegrityError(f"{_AUTH_FAILED}: not an aiaas encrypted blob (bad magic)")
    version, id_length = fixed[len(MAGIC)], fixed[len(MAGIC) + 1]
    if version != VERSION:
        raise BlobIntegrityError(
            f"{_AUTH_FAILED}: format version {version} is unknown; this build reads {VERSION}"
        )
    rest = reader.read(id_length + _SALT_SIZE)
    if id_length == 0 or len(rest) < id_length + _SALT_SIZE:
        raise BlobIntegrityError(f"{_AUTH_FAILED}: truncated or malformed header")
    try:
        key_id = rest[:id_length].decode("ascii")
    except UnicodeDecodeError:
        raise BlobIntegrityError(f"{_AUTH_FAILED}: the data-key id is not ASCII") from None
    return fixed + rest, key_id, rest[id_length:]


def _read_frame(reader: _ChunkReader) -> bytes:
    prefix = reader.read(_LENGTH.size)
    if len(prefix) < _LENGTH.size:
        raise BlobIntegrityError(
            f"{_AUTH_FAILED}: truncated, the stream ends before its last frame"
        )
    (length,) = _LENGTH.unpack(prefix)
    if not _TAG_SIZE <= length <= _MAX_FRAME_CIPHERTEXT:
        raise BlobIntegrityError(
            f"{_AUTH_FAILED}: a frame claims {length} bytes; frames hold "
            f"{_TAG_SIZE}..{_MAX_FRAME_CIPHERTEXT}"
        )
    ciphertext = reader.read(length)
    if len(ciphertext) < length:
        raise BlobIntegrityError(
            f"{_AUTH_FAILED}: truncated, a frame of {length} bytes has only {len(ciphertext)}"
        )
    return ciphertext


def _open_frame(
    cipher: AESGCM, counter: int, final: bool, ciphertext: bytes, header: bytes
) -> bytes:
    try:
        return cipher.decrypt(_nonce(counter, final), ciphertext, header)
    except InvalidTag:
        raise BlobIntegrityError(
            _why_frame_failed(cipher, counter, final, ciphertext, header)
        ) from None


def _why_frame_failed(
    cipher: AESGCM, counter: int, final: bool, ciphertext: bytes, header: bytes
) -> str:
    """Name the failure: a frame that opens with the other final flag means a cut or extra data."""
    try:
        cipher.decrypt(_nonce(counter, not final), ciphertext, header)
    except InvalidTag:
        return (
            f"{_AUTH_FAILED}: frame {counter} is tampered, out of order, or encrypted under "
            "another key"
        )
    if final:
        return (
            f"{_AUTH_FAILED}: truncated, the stream ends after frame {counter}, not a final frame"
        )
    return f"{_AUTH_FAILED}: unexpected data after the final frame {counter}"
