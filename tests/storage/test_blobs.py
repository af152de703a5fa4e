"""LocalBlobStore and EncryptedBlobStore on a real directory, keys in a real SQLite database."""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiaas.errors import (
    BlobIntegrityError,
    BlobNotFound,
    ConfigurationError,
    Conflict,
    InvalidRequest,
)
from aiaas.settings import Settings
from aiaas.storage.blobs import (
    BlobInfo,
    BlobStore,
    EncryptedBlobStore,
    LocalBlobStore,
    open_blob_store,
)
from aiaas.storage.crypto import KeyRing
from aiaas.storage.db import Database
from aiaas.storage.repos.data_keys import DataKeyRepo

MASTER = bytes(range(32))
PATTERN = b"The quick brown fox jumps over the lazy dog. "


class Boom(Exception):
    """The upload stream broke (a client hung up mid-body)."""


@pytest.fixture
def keyring(tmp_path: Path) -> Iterator[KeyRing]:
    db = Database(f"sqlite:///{tmp_path / 't.db'}")
    db.migrate()
    yield KeyRing(MASTER, DataKeyRepo(db))
    db.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
def store(root: Path) -> Iterator[LocalBlobStore]:
    with LocalBlobStore(root) as local:
        yield local


@pytest.fixture
def encrypted(store: LocalBlobStore, keyring: KeyRing) -> EncryptedBlobStore:
    return EncryptedBlobStore(store, keyring)


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def breaks_after(data: bytes) -> Iterator[bytes]:
    yield data
    raise Boom("client went away")


def temp_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / ".tmp"))


def make_leftover(root: Path, name: str, age_s: float) -> Path:
    leftover = root / ".tmp" / name
    leftover.write_bytes(b"half an upload")
    stamp = leftover.stat().st_mtime - age_s
    os.utime(leftover, (stamp, stamp))
    return leftover


# --- LocalBlobStore -------------------------------------------------------------------------


def test_put_then_open_round_trips_and_reports_size_and_sha256(store: LocalBlobStore) -> None:
    data = random.Random(0).randbytes(200_000)
    info = store.put("org_a/files/f1", chunks_of(data, 7_777))
    assert info == BlobInfo("org_a/files/f1", len(data), hashlib.sha256(data).hexdigest())
    assert b"".join(store.open("org_a/files/f1")) == data


def test_reads_stream_in_64_kib_chunks(store: LocalBlobStore) -> None:
    store.put("k", [bytes(200_000)])
    assert [len(chunk) for chunk in store.open("k")] == [65536, 65536, 65536, 3392]


def test_an_empty_blob_is_stored(store: LocalBlobStore) -> None:
    info = store.put("empty", [])
    assert info.size == 0
    assert info.sha256 == hashlib.sha256(b"").hexdigest()
    assert store.exists("empty")
    assert list(store.open("empty")) == []


def test_put_replaces_an_existing_blob(store: LocalBlobStore) -> None:
    store.put("k", [b"old"])
    store.put("k", [b"new"])
    assert b"".join(store.open("k")) == b"new"


def test_open_of_a_missing_key_raises_at_the_call(store: LocalBlobStore) -> None:
    with pytest.raises(BlobNotFound, match="nope"):
        store.open("nope")  # never iterated


def test_a_directory_is_not_a_blob(store: LocalBlobStore) -> None:
    store.put("dir/file", [b"x"])
    assert not store.exists("dir")
    assert not store.delete("dir")
    with pytest.raises(BlobNotFound):
        store.open("dir")


def test_delete_removes_once(store: LocalBlobStore) -> None:
    store.put("a/b", [b"x"])
    assert store.exists("a/b")
    assert store.delete("a/b")
    assert not store.exists("a/b")
    assert not store.delete("a/b")
    with pytest.raises(BlobNotFound):
        store.open("a/b")


def test_keys_lists_by_prefix_and_hides_temp_files(store: LocalBlobStore, root: Path) -> None:
    for key in ["org1/a", "org1/b/c", "org10/x", "org2/a", "top"]:
        store.put(key, [b"x"])
    make_leftover(root, "put-stray", age_s=0)
    assert sorted(store.keys()) == ["org1/a", "org1/b/c", "org10/x", "org2/a", "top"]
    assert sorted(store.keys("org1/")) == ["org1/a", "org1/b/c"]
    assert sorted(store.keys("org1")) == ["org1/a", "org1/b/c", "org10/x"]
    assert sorted(store.keys("org1/b/")) == ["org1/b/c"]
    assert list(store.keys("missing/")) == []


@pytest.mark.parametrize("prefix", ["../", "../../etc/", "/etc/", "a//"])
def test_keys_refuses_a_prefix_that_leaves_the_root(store: LocalBlobStore, prefix: str) -> None:
    with pytest.raises(InvalidRequest):
        store.keys(prefix)


BAD_KEYS = [
    "../x",
    "/etc/passwd",
    "a//b",
    "a/./b",
    "a/../../b",
    "",
    ".",
    "..",
    "a/",
    ".tmp/put-x",
    ".hidden",
    "a\\b",
    "a b",
    "caf\u00e9",
    "a\x00b",
    "line\n",
    "x" * 1025,
    "a/" + "b" * 256,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_rejected_everywhere(store: LocalBlobStore, key: str) -> None:
    with pytest.raises(InvalidRequest, match="key"):
        store.put(key, [b"x"])
    with pytest.raises(InvalidRequest):
        store.open(key)
    with pytest.raises(InvalidRequest):
        store.exists(key)
    with pytest.raises(InvalidRequest):
        store.delete(key)
    assert temp_files(store.root) == []


def test_traversal_writes_nothing_outside_the_root(store: LocalBlobStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        store.put("../escaped", [b"x"])
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("key", ["a", "org_1/file-2.tar.gz", "A.b_c-d/e.", "x" * 255])
def test_ordinary_keys_are_accepted(store: LocalBlobStore, key: str) -> None:
    store.put(key, [b"x"])
    assert store.exists(key)


def test_a_broken_upload_leaves_no_blob_and_no_temp_file(store: LocalBlobStore) -> None:
    with pytest.raises(Boom):
        store.put("k", breaks_after(b"x" * 100_000))
    assert not store.exists("k")
    assert temp_files(store.root) == []
    assert list(store.keys()) == []


def test_a_broken_upload_leaves_the_existing_blob_intact(store: LocalBlobStore) -> None:
    store.put("k", [b"precious"])
    with pytest.raises(Boom):
        store.put("k", breaks_after(b"x" * 100_000))
    assert b"".join(store.open("k")) == b"precious"
    assert temp_files(store.root) == []


def test_a_key_nested_under_a_blob_conflicts(store: LocalBlobStore) -> None:
    store.put("a", [b"file"])
    with pytest.raises(Conflict):
        store.put("a/b", [b"x"])
    store.put("x/y", [b"file"])
    with pytest.raises(Conflict):
        store.put("x", [b"x"])
    assert b"".join(store.open("a")) == b"file"
    assert temp_files(store.root) == []


def test_start_sweeps_unlocked_temp_files(root: Path) -> None:
    LocalBlobStore(root).close()
    stale = make_leftover(root, "put-crashed", age_s=3600)
    fresh = make_leftover(root, "put-crashed-just-now", age_s=0)
    LocalBlobStore(root).close()
    assert not stale.exists()
    assert not fresh.exists()


def test_a_put_whose_temp_file_is_swept_before_its_lock_still_lands(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(root)
    real_mkstemp = tempfile.mkstemp
    calls = 0

    def mkstemp_then_sweep(**kwargs: Any) -> tuple[int, str]:
        nonlocal calls
        calls += 1
        fd, path = real_mkstemp(**kwargs)
        if calls == 1:
            store.sweep_temp()  # another process sweeps before this writer locks its file
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_sweep)
    store.put("k", [b"data"])
    assert calls == 2
    assert b"".join(store.open("k")) == b"data"


def test_sweep_spares_a_temp_file_a_live_writer_holds(store: LocalBlobStore, root: Path) -> None:
    held = make_leftover(root, "put-slow-upload", age_s=3600)
    with held.open("rb") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        assert store.sweep_temp() == 0
        assert held.exists()
    assert store.sweep_temp() == 1
    assert not held.exists()


def test_blob_files_are_private(store: LocalBlobStore, root: Path) -> None:
    store.put("org/k", [b"x"])
    assert (root / "org" / "k").stat().st_mode & 0o077 == 0


def test_local_store_satisfies_the_protocol(root: Path) -> None:
    store: BlobStore = LocalBlobStore(root)  # checked by the type checker
    store.close()


# --- EncryptedBlobStore ---------------------------------------------------------------------


def test_encrypted_round_trip_reports_the_plaintext(encrypted: EncryptedBlobStore) -> None:
    data = random.Random(1).randbytes(3 * 65536 + 11)
    info = encrypted.put("org_a", "org_a/files/f1", chunks_of(data, 100_000))
    assert info == BlobInfo("org_a/files/f1", len(data), hashlib.sha256(data).hexdigest())
    assert b"".join(encrypted.open("org_a/files/f1")) == data


def test_only_ciphertext_reaches_the_disk(encrypted: EncryptedBlobStore, root: Path) -> None:
    encrypted.put("org_a", "org_a/doc", chunks_of(PATTERN * 20_000, 7))
    raw = (root / "org_a" / "doc").read_bytes()
    assert len(raw) > len(PATTERN) * 20_000
    assert PATTERN not in raw
    assert b"quick brown" not in raw


def test_encrypted_open_of_a_missing_key_raises_at_the_call(
    encrypted: EncryptedBlobStore,
) -> None:
    with pytest.raises(BlobNotFound):
        encrypted.open("org_a/nope")


def test_a_tampered_blob_on_disk_fails_authentication(
    encrypted: EncryptedBlobStore, root: Path
) -> None:
    encrypted.put("org_a", "k", [PATTERN * 5000])
    path = root / "k"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(raw)
    with pytest.raises(BlobIntegrityError, match="authentication"):
        b"".join(encrypted.open("k"))


def test_a_plaintext_file_under_a_key_is_not_served(encrypted: EncryptedBlobStore) -> None:
    encrypted.inner.put("planted", [b"plain text someone dropped in"])
    with pytest.raises(BlobIntegrityError):
        b"".join(encrypted.open("planted"))


def test_a_broken_encrypted_upload_leaves_the_existing_blob_intact(
    encrypted: EncryptedBlobStore, store: LocalBlobStore
) -> None:
    encrypted.put("org_a", "k", [b"precious"])
    with pytest.raises(Boom):
        encrypted.put("org_a", "k", breaks_after(b"x" * 200_000))
    assert b"".join(encrypted.open("k")) == b"precious"
    assert temp_files(store.root) == []
    with pytest.raises(Boom):
        encrypted.put("org_a", "new", breaks_after(b"x" * 200_000))
    assert not encrypted.exists("new")


def test_encrypted_store_passes_listing_and_deletion_through(
    encrypted: EncryptedBlobStore,
) -> None:
    encrypted.put("org_a", "org_a/1", [b"one"])
    encrypted.put("org_b", "org_b/1", [b"two"])
    assert sorted(encrypted.keys()) == ["org_a/1", "org_b/1"]
    assert list(encrypted.keys("org_b/")) == ["org_b/1"]
    assert encrypted.exists("org_a/1")
    assert encrypted.delete("org_a/1")
    assert not encrypted.exists("org_a/1")
    assert not encrypted.delete("org_a/1")


def test_owners_blobs_are_under_different_keys(
    encrypted: EncryptedBlobStore, root: Path, keyring: KeyRing
) -> None:
    encrypted.put("org_a", "a", [b"same"])
    encrypted.put("org_b", "b", [b"same"])
    id_a, id_b = keyring.data_key("org_a").id, keyring.data_key("org_b").id
    assert id_a.encode() in (root / "a").read_bytes()
    assert id_b.encode() in (root / "b").read_bytes()
    assert id_a != id_b


# --- open_blob_store ------------------------------------------------------------------------


def test_a_file_url_opens_an_encrypted_local_store(tmp_path: Path, keyring: KeyRing) -> None:
    root = tmp_path / "some dir" / "blobs"
    with open_blob_store(root.as_uri(), keyring) as blobs:
        blobs.put("org_a", "k", [b"hello"])
        assert b"".join(blobs.open("k")) == b"hello"
    assert (root / "k").is_file()


def test_the_default_blob_url_from_settings_opens(tmp_path: Path, keyring: KeyRing) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    with open_blob_store(settings.resolved_blob_url, keyring) as blobs:
        blobs.put("platform", "k", [b"x"])
    assert (tmp_path / "data" / "blobs" / "k").is_file()


def test_s3_is_not_supported_yet(keyring: KeyRing) -> None:
    with pytest.raises(ConfigurationError, match="'s3' is not supported yet") as caught:
        open_blob_store("s3://AKIA:secret@bucket/prefix", keyring)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["file://relative/path", "file:relative", "file:///abs?x=1", "file://host/abs"]
)
def test_a_malformed_file_url_is_refused(keyring: KeyRing, url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_blob_store(url, keyring)


@pytest.mark.parametrize("url", ["", "/abs/path", "http://example.com/blobs"])
def test_other_schemes_are_refused(keyring: KeyRing, url: str) -> None:
    with pytest.raises(ConfigurationError, match="not supported"):
        open_blob_store(url, keyring)
