"""KeyRing, the encrypted blob format and server secrets, against a real SQLite database."""

from __future__ import annotations

import base64
import hashlib
import random
import stat
import struct
import threading
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from aiaas.errors import BlobIntegrityError, ConfigurationError
from aiaas.storage.crypto import FRAME_SIZE, MAGIC, KeyRing, load_or_create_secret
from aiaas.storage.db import Database
from aiaas.storage.repos.data_keys import DataKeyRepo
from aiaas.storage.tables import data_keys

MASTER = bytes(range(32))
OTHER_MASTER = bytes(range(1, 33))
MIB = 1024 * 1024
PATTERN = b"The quick brown fox jumps over the lazy dog. "


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 't.db'}")
    database.migrate()
    yield database
    database.close()


@pytest.fixture
def repo(db: Database) -> DataKeyRepo:
    return DataKeyRepo(db)


@pytest.fixture
def keyring(repo: DataKeyRepo) -> KeyRing:
    return KeyRing(MASTER, repo)


def random_bytes(size: int, seed: int = 0) -> bytes:
    """Incompressible, non-periodic data: a misplaced frame cannot go unnoticed."""
    return random.Random(seed).randbytes(size)


def rechunk(data: bytes, size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])


def encrypt(keyring: KeyRing, data: bytes, owner: str = "org_a") -> bytes:
    return b"".join(keyring.encrypt_stream(owner, [data]))


def decrypt(keyring: KeyRing, blob: bytes, chunk_size: int = 4096) -> bytes:
    return b"".join(keyring.decrypt_stream(rechunk(blob, chunk_size)))


def split_blob(blob: bytes) -> tuple[bytes, list[bytes]]:
    """The header and each frame (length prefix included), parsed independently of the code."""
    header_size = len(MAGIC) + 2 + blob[len(MAGIC) + 1] + 16
    frames = []
    offset = header_size
    while offset < len(blob):
        (length,) = struct.unpack(">I", blob[offset : offset + 4])
        frames.append(blob[offset : offset + 4 + length])
        offset += 4 + length
    return blob[:header_size], frames


def flip(blob: bytes, position: int, mask: int = 0x01) -> bytes:
    changed = bytearray(blob)
    changed[position] ^= mask
    return bytes(changed)


# --- round trips and format ---------------------------------------------------------------


@pytest.mark.parametrize("input_chunk", [1, 7, 100_000])
@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * MIB + 7])
def test_round_trip_with_odd_input_chunks_and_one_byte_reads(
    keyring: KeyRing, size: int, input_chunk: int
) -> None:
    data = random_bytes(size)
    blob = b"".join(keyring.encrypt_stream("org_a", rechunk(data, input_chunk)))
    assert b"".join(keyring.decrypt_stream(rechunk(blob, 1))) == data


@pytest.mark.parametrize(
    ("size", "plaintext_sizes"),
    [
        (0, [0]),
        (1, [1]),
        (FRAME_SIZE, [FRAME_SIZE]),
        (FRAME_SIZE + 1, [FRAME_SIZE, 1]),
        (3 * FRAME_SIZE, [FRAME_SIZE] * 3),
    ],
)
def test_frames_hold_64_kib_and_only_the_last_is_short(
    keyring: KeyRing, size: int, plaintext_sizes: list[int]
) -> None:
    blob = b"".join(keyring.encrypt_stream("org_a", rechunk(random_bytes(size), 1000)))
    header, frames = split_blob(blob)
    assert header.startswith(MAGIC + b"\x01")
    assert [len(frame) - 4 - 16 for frame in frames] == plaintext_sizes


def test_ciphertext_contains_no_plaintext(keyring: KeyRing) -> None:
    blob = encrypt(keyring, PATTERN * 10_000)
    assert PATTERN not in blob
    assert b"quick brown" not in blob


def test_same_plaintext_encrypts_differently_each_time(keyring: KeyRing) -> None:
    data = PATTERN * 100
    assert encrypt(keyring, data) != encrypt(keyring, data)


def test_decryption_yields_frames_before_the_stream_ends(keyring: KeyRing) -> None:
    blob = encrypt(keyring, random_bytes(3 * FRAME_SIZE))
    plaintext = keyring.decrypt_stream(rechunk(blob, 1000))
    assert len(next(plaintext)) == FRAME_SIZE


# --- tampering ------------------------------------------------------------------------------


def test_every_single_byte_flip_is_detected(keyring: KeyRing) -> None:
    blob = encrypt(keyring, PATTERN * 3)
    for position in range(len(blob)):
        for mask in (0x01, 0x80):
            with pytest.raises(BlobIntegrityError):
                decrypt(keyring, flip(blob, position, mask))


def test_byte_flips_in_every_part_of_a_multi_frame_blob_are_detected(keyring: KeyRing) -> None:
    blob = encrypt(keyring, random_bytes(2 * FRAME_SIZE + 100))
    header, frames = split_blob(blob)
    positions = set(range(len(header)))
    offset = len(header)
    for frame in frames:
        end = offset + len(frame)
        # length prefix, first ciphertext bytes, the middle, and the tag
        positions |= set(range(offset, offset + 8))
        positions |= {offset + len(frame) // 2}
        positions |= set(range(end - 16, end))
        offset = end
    for position in sorted(positions):
        with pytest.raises(BlobIntegrityError):
            decrypt(keyring, flip(blob, position))


@pytest.mark.parametrize("cut", [1, 16, 17])
def test_truncating_the_last_frame_is_detected(keyring: KeyRing, cut: int) -> None:
    blob = encrypt(keyring, random_bytes(2 * FRAME_SIZE + 100))
    with pytest.raises(BlobIntegrityError, match=r"truncated|authentication"):
        decrypt(keyring, blob[:-cut])


def test_dropping_the_final_frame_is_detected_as_truncation(keyring: KeyRing) -> None:
    header, frames = split_blob(encrypt(keyring, random_bytes(3 * FRAME_SIZE + 5)))
    with pytest.raises(BlobIntegrityError, match="truncated"):
        decrypt(keyring, header + b"".join(frames[:-1]))


@pytest.mark.parametrize("cut", [0, 5, len(MAGIC) + 2, 30, None])
def test_a_stream_cut_inside_or_right_after_the_header_is_detected(
    keyring: KeyRing, cut: int | None
) -> None:
    header, _ = split_blob(encrypt(keyring, b"hello"))
    with pytest.raises(BlobIntegrityError, match="truncated"):
        decrypt(keyring, header[:cut])


def test_dropping_a_middle_frame_is_detected(keyring: KeyRing) -> None:
    header, frames = split_blob(encrypt(keyring, random_bytes(3 * FRAME_SIZE + 5)))
    with pytest.raises(BlobIntegrityError):
        decrypt(keyring, header + frames[0] + frames[2] + frames[3])


def test_swapping_two_frames_is_detected(keyring: KeyRing) -> None:
    header, frames = split_blob(encrypt(keyring, random_bytes(3 * FRAME_SIZE + 5)))
    with pytest.raises(BlobIntegrityError, match="out of order"):
        decrypt(keyring, header + frames[1] + frames[0] + frames[2] + frames[3])


@pytest.mark.parametrize("junk", [b"x", b"\x00" * 4, b"\x00\x00\x00\x10" + bytes(16)])
def test_appending_junk_is_detected(keyring: KeyRing, junk: bytes) -> None:
    blob = encrypt(keyring, random_bytes(FRAME_SIZE + 5))
    with pytest.raises(BlobIntegrityError):
        decrypt(keyring, blob + junk)


def test_appending_a_copy_of_the_final_frame_is_detected_as_extra_data(keyring: KeyRing) -> None:
    header, frames = split_blob(encrypt(keyring, b"short"))
    with pytest.raises(BlobIntegrityError, match="after the final frame"):
        decrypt(keyring, header + frames[0] + frames[0])


def test_frames_spliced_from_another_blob_under_the_same_key_are_detected(
    keyring: KeyRing,
) -> None:
    header_a, frames_a = split_blob(encrypt(keyring, random_bytes(FRAME_SIZE + 5, seed=1)))
    _, frames_b = split_blob(encrypt(keyring, random_bytes(FRAME_SIZE + 5, seed=2)))
    with pytest.raises(BlobIntegrityError):
        decrypt(keyring, header_a + frames_a[0] + frames_b[1])


def test_an_oversized_frame_length_is_rejected_before_reading_it(keyring: KeyRing) -> None:
    header, _ = split_blob(encrypt(keyring, b"x"))
    claim = struct.pack(">I", FRAME_SIZE + 17)
    with pytest.raises(BlobIntegrityError, match="claims"):
        decrypt(keyring, header + claim + bytes(100))


@pytest.mark.parametrize("garbage", [b"", b"not an aiaas blob at all", b"AIAASENC\x02\x05hello"])
def test_other_data_is_not_mistaken_for_a_blob(keyring: KeyRing, garbage: bytes) -> None:
    with pytest.raises(BlobIntegrityError):
        decrypt(keyring, garbage)


def test_unknown_format_version_is_named(keyring: KeyRing) -> None:
    blob = encrypt(keyring, b"x")
    with pytest.raises(BlobIntegrityError, match="version 7"):
        decrypt(keyring, blob[: len(MAGIC)] + b"\x07" + blob[len(MAGIC) + 1 :])


def test_a_blob_naming_an_unknown_data_key_fails(repo: DataKeyRepo, tmp_path: Path) -> None:
    other_db = Database(f"sqlite:///{tmp_path / 'other.db'}")
    other_db.migrate()
    blob = encrypt(KeyRing(MASTER, DataKeyRepo(other_db)), b"from elsewhere")
    other_db.close()
    with pytest.raises(BlobIntegrityError, match="does not exist"):
        decrypt(KeyRing(MASTER, repo), blob)


# --- data keys --------------------------------------------------------------------------------


def test_a_different_master_key_cannot_decrypt(keyring: KeyRing, repo: DataKeyRepo) -> None:
    blob = encrypt(keyring, PATTERN)
    stranger = KeyRing(OTHER_MASTER, repo)
    with pytest.raises(BlobIntegrityError, match="master key"):
        decrypt(stranger, blob)
    with pytest.raises(BlobIntegrityError, match="master key"):
        stranger.data_key("org_a")


def test_two_owners_get_different_data_keys(keyring: KeyRing) -> None:
    first, second = keyring.data_key("org_a"), keyring.data_key("org_b")
    assert first.id != second.id
    assert first.key != second.key
    assert len(first.key) == len(second.key) == 32


def test_an_owner_keeps_one_data_key(keyring: KeyRing, repo: DataKeyRepo) -> None:
    first = keyring.data_key("org_a")
    assert keyring.data_key("org_a") == first
    assert keyring.key_by_id(first.id) == first
    assert KeyRing(MASTER, repo).data_key("org_a") == first


def test_data_keys_are_stored_only_wrapped(keyring: KeyRing, db: Database) -> None:
    data_key = keyring.data_key("org_a")
    with db.read() as conn:
        wrapped = conn.execute(select(data_keys.c.wrapped_key)).scalar_one()
    assert data_key.key not in bytes(wrapped)


def test_a_restarted_keyring_decrypts_earlier_blobs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    first_db = Database(url)
    first_db.migrate()
    blob = encrypt(KeyRing(MASTER, DataKeyRepo(first_db)), PATTERN * 50)
    first_db.close()

    second_db = Database(url)
    try:
        assert decrypt(KeyRing(MASTER, DataKeyRepo(second_db)), blob) == PATTERN * 50
    finally:
        second_db.close()


def test_a_tampered_wrapped_key_is_detected(
    keyring: KeyRing, repo: DataKeyRepo, db: Database
) -> None:
    blob = encrypt(keyring, PATTERN)
    data_key = keyring.data_key("org_a")
    with db.write() as conn:
        wrapped = conn.execute(select(data_keys.c.wrapped_key)).scalar_one()
        tampered = flip(bytes(wrapped), len(wrapped) - 1)
        conn.execute(
            update(data_keys).where(data_keys.c.id == data_key.id).values(wrapped_key=tampered)
        )
    with pytest.raises(BlobIntegrityError, match="failed to unwrap"):
        decrypt(KeyRing(MASTER, repo), blob)


def test_a_wrapped_key_moved_to_another_owner_does_not_unwrap(
    keyring: KeyRing, repo: DataKeyRepo, db: Database
) -> None:
    key_a, key_b = keyring.data_key("org_a"), keyring.data_key("org_b")
    with db.write() as conn:
        wrapped_a = conn.execute(
            select(data_keys.c.wrapped_key).where(data_keys.c.id == key_a.id)
        ).scalar_one()
        conn.execute(
            update(data_keys).where(data_keys.c.id == key_b.id).values(wrapped_key=wrapped_a)
        )
    with pytest.raises(BlobIntegrityError, match="org_b"):
        KeyRing(MASTER, repo).data_key("org_b")


def test_data_key_repr_hides_the_key(keyring: KeyRing) -> None:
    data_key = keyring.data_key("org_a")
    assert data_key.id in repr(data_key)
    assert data_key.key.hex() not in repr(data_key)
    assert repr(data_key.key) not in repr(data_key)


def test_threads_racing_for_a_new_owner_agree_on_one_key(
    keyring: KeyRing, repo: DataKeyRepo
) -> None:
    rings = [KeyRing(MASTER, repo) for _ in range(8)]
    barrier = threading.Barrier(len(rings))
    results: list[bytes] = []

    def fetch(ring: KeyRing) -> None:
        barrier.wait()
        results.append(ring.data_key("org_new").key)

    threads = [threading.Thread(target=fetch, args=(ring,)) for ring in rings]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == len(rings)
    assert len(set(results)) == 1


@pytest.mark.parametrize("master", [b"", bytes(16), bytes(33)])
def test_a_master_key_of_the_wrong_size_is_refused(repo: DataKeyRepo, master: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        KeyRing(master, repo)


@pytest.mark.parametrize("owner", ["", "x" * 65])
def test_an_invalid_owner_is_refused(keyring: KeyRing, owner: str) -> None:
    with pytest.raises(ValueError, match="owner"):
        keyring.data_key(owner)


# --- memory ---------------------------------------------------------------------------------


def generated(total: int, chunk_size: int) -> Iterator[bytes]:
    """`total` bytes made on the fly, so the input itself is never resident."""
    block = PATTERN * (chunk_size // len(PATTERN) + 1)
    sent = 0
    while sent < total:
        size = min(chunk_size, total - sent)
        yield block[:size]
        sent += size


def traced_peak(stream: Iterable[bytes]) -> tuple[int, int]:
    """(bytes seen, tracemalloc peak) while draining the stream."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        seen = sum(len(chunk) for chunk in stream)
        return seen, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_encrypting_64_mib_holds_only_a_few_frames(keyring: KeyRing) -> None:
    keyring.data_key("org_a")  # the first lookup touches the database; measure the stream alone
    total = 64 * MIB
    seen, peak = traced_peak(keyring.encrypt_stream("org_a", generated(total, 100_000)))
    assert seen > total
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB"


def test_decrypting_64_mib_holds_only_a_few_frames(keyring: KeyRing) -> None:
    keyring.data_key("org_a")  # caches the key for the decrypting side too
    total = 64 * MIB
    blob = keyring.encrypt_stream("org_a", generated(total, 100_000))
    seen, peak = traced_peak(keyring.decrypt_stream(blob))
    assert seen == total
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB"


def test_one_huge_input_chunk_is_sliced_not_copied(keyring: KeyRing) -> None:
    keyring.data_key("org_a")
    data = bytes(64 * MIB)
    seen, peak = traced_peak(keyring.encrypt_stream("org_a", [data]))
    assert seen > len(data)
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB"
    blob = b"".join(keyring.encrypt_stream("org_a", [data]))
    del data
    seen, peak = traced_peak(keyring.decrypt_stream([blob]))
    assert seen == 64 * MIB
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB"


def test_decryption_output_matches_input_hash_for_a_long_stream(keyring: KeyRing) -> None:
    total = 5 * MIB + 3
    expected = hashlib.sha256(b"".join(generated(total, 77_777))).hexdigest()
    digest = hashlib.sha256()
    for chunk in keyring.decrypt_stream(keyring.encrypt_stream("org_a", generated(total, 77_777))):
        digest.update(chunk)
    assert digest.hexdigest() == expected


# --- server secrets ---------------------------------------------------------------------------


def test_secret_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "master-key"
    first = load_or_create_secret(None, path, name="AIAAS_MASTER_KEY")
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first.hex()
    assert load_or_create_secret(None, path, name="AIAAS_MASTER_KEY") == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["master-key"]


def test_separate_secret_files_hold_separate_secrets(tmp_path: Path) -> None:
    master = load_or_create_secret(None, tmp_path / "master-key", name="AIAAS_MASTER_KEY")
    pepper = load_or_create_secret(None, tmp_path / "key-pepper", name="AIAAS_KEY_PEPPER")
    assert master != pepper


def test_a_configured_hex_secret_wins_and_writes_no_file(tmp_path: Path) -> None:
    path = tmp_path / "master-key"
    secret = load_or_create_secret(MASTER.hex(), path, name="AIAAS_MASTER_KEY")
    assert secret == MASTER
    assert not path.exists()


def test_a_configured_base64_secret_is_honoured(tmp_path: Path) -> None:
    configured = base64.urlsafe_b64encode(MASTER).decode()
    assert load_or_create_secret(configured, tmp_path / "k", name="AIAAS_MASTER_KEY") == MASTER


@pytest.mark.parametrize("configured", ["", "not a key", "abcd", MASTER.hex()[:-2]])
def test_a_malformed_configured_secret_is_refused(tmp_path: Path, configured: str) -> None:
    with pytest.raises(ValueError, match="AIAAS_MASTER_KEY"):
        load_or_create_secret(configured, tmp_path / "k", name="AIAAS_MASTER_KEY")


@pytest.mark.parametrize("content", [b"", b"zz" * 32, b"ab" * 16, b"\xff" * 64])
def test_a_malformed_secret_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "master-key"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match="malformed"):
        load_or_create_secret(None, path, name="AIAAS_MASTER_KEY")


def test_racing_creators_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "master-key"
    barrier = threading.Barrier(16)
    results: list[bytes] = []

    def create() -> None:
        barrier.wait()
        results.append(load_or_create_secret(None, path, name="AIAAS_MASTER_KEY"))

    threads = [threading.Thread(target=create) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 16
    assert set(results) == {bytes.fromhex(path.read_text())}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master-key"]
