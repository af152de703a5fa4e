"""Read a zip of images, one folder per class, without trusting anything the archive says.

Sizes are counted on the inflated bytes, names are checked for traversal, and images are
verified by Pillow with only the common decoders allowed. Everything stays in memory.

Error codes: `invalid_zip`, `unsafe_zip_entry`, `zip_bomb`, `invalid_image` (400) and
`zip_too_large` (413), all with `param="file"`.
"""

from __future__ import annotations

import io
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final

import pandas as pd
from PIL import Image, UnidentifiedImageError

from aiaas.errors import InvalidRequest, PayloadTooLarge
from aiaas.specs.types import IMAGE_COLUMN, LABEL_COLUMN

__all__ = ["ZipLimits", "read_image_zip"]


def _bad(message: str, code: str) -> InvalidRequest:
    return InvalidRequest(message, param="file", code=code)


def _too_large(message: str, code: str) -> PayloadTooLarge:
    return PayloadTooLarge(message, param="file", code=code)


@dataclass(frozen=True)
class ZipLimits:
    max_entries: int = 100_000
    max_total_uncompressed: int = 1 << 30
    max_entry_uncompressed: int = 64 << 20
    # Uncompressed/compressed; judged only past _RATIO_FLOOR bytes, where a ratio means something.
    max_ratio: float = 200
    # Below Pillow's own DecompressionBombWarning threshold (~89 MP), so ours decides first.
    max_image_pixels: int = 40_000_000


_IMAGE_SUFFIXES: Final = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
)
# Pillow may only try these decoders: no EPS (Ghostscript) or other exotic plugins on user data.
_PILLOW_FORMATS: Final = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
_ARCHIVE_SUFFIXES: Final = frozenset({".zip", ".jar", ".gz", ".tgz", ".tar", ".bz2", ".xz", ".7z"})
_JUNK_FILES: Final = frozenset({".DS_Store", "Thumbs.db"})
_JUNK_FOLDER: Final = "__MACOSX"
# bzip2 and LZMA inflate a whole compressed chunk in one call, unbounded: only these are read.
_COMPRESSIONS: Final = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_CENTRAL_RECORD: Final = b"PK\x01\x02"
_CHUNK: Final = 1 << 16
_RATIO_FLOOR: Final = 1 << 20
_DRIVE: Final = re.compile(r"[A-Za-z]:")
_PIL_ERRORS: Final = (
    OSError,  # includes UnidentifiedImageError and truncated data
    SyntaxError,  # what verify() raises for a broken PNG
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # raised, not warned, when warnings are errors
)


def read_image_zip(data: bytes, limits: ZipLimits = ZipLimits()) -> pd.DataFrame:
    """Columns `image` (bytes), `label` (class folder) and `path`, one row per image, by path.

    Layout: `<class>/<image>`, optionally all under one top folder (`train/<class>/<image>`).
    `__MACOSX/`, `.DS_Store`, `Thumbs.db` and folders are skipped; anything else that is not an
    image is an error. Sizes are counted on the inflated bytes, never taken from the headers: a
    ratio above `max_ratio` is a zip bomb (400 `zip_bomb`); past a size limit it is 413.
    """
    # zipfile builds an object per central directory record up front. Each record starts with
    # this signature, so counting it bounds the entries before any of them is parsed.
    if (records := data.count(_CENTRAL_RECORD)) > limits.max_entries:
        raise _too_many_entries(f"up to {records}", limits)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _bad(f"not a valid zip file: {exc}", "invalid_zip") from None
    with archive:
        entries = archive.infolist()
        if len(entries) > limits.max_entries:
            raise _too_many_entries(len(entries), limits)
        seen: set[str] = set()
        for entry in entries:
            _check_entry(entry)  # every entry, even ones skipped below: no traversal anywhere
            if entry.orig_filename in seen:
                # Tools disagree on which copy wins; a name must mean one thing.
                raise _unsafe(entry.orig_filename, "appears more than once")
            seen.add(entry.orig_filename)
        images = [entry for entry in entries if not _is_skipped(entry)]
        labels = _class_labels(images, [e.filename for e in entries if e.is_dir()])
        rows: list[tuple[bytes, str, str]] = []
        inflated = 0
        for entry, label in zip(images, labels, strict=True):
            raw = _inflate(archive, entry, limits, inflated)
            inflated += len(raw)
            _check_image(entry.filename, raw, limits)
            rows.append((raw, label, entry.filename))
    rows.sort(key=lambda row: row[2])
    return pd.DataFrame(
        {
            IMAGE_COLUMN: pd.Series([row[0] for row in rows], dtype=object),
            LABEL_COLUMN: pd.Series([row[1] for row in rows], dtype="str"),
            "path": pd.Series([row[2] for row in rows], dtype="str"),
        }
    )


def _too_many_entries(count: int | str, limits: ZipLimits) -> PayloadTooLarge:
    return _too_large(
        f"zip has {count} entries; the limit is {limits.max_entries}", "zip_too_large"
    )


def _unsafe(name: str, why: str) -> InvalidRequest:
    return _bad(f"zip entry {name!r} {why}", "unsafe_zip_entry")


def _check_entry(entry: zipfile.ZipInfo) -> None:
    name = entry.orig_filename  # zipfile cuts `filename` at a NUL; the original keeps it
    if any(ord(char) < 32 for char in name):
        raise _unsafe(name, "has a NUL or control character in its name")
    if "\\" in name:
        raise _unsafe(name, "has a backslash in its name")
    if name.startswith("/") or _DRIVE.match(name):
        raise _unsafe(name, "is an absolute path")
    segments = name.rstrip("/").split("/")
    if ".." in segments:
        raise _unsafe(name, "has a '..' segment")
    if any(segment in ("", ".") for segment in segments):
        raise _unsafe(name, "has an empty or '.' path segment")
    mode = entry.external_attr >> 16  # the Unix mode, when a Unix tool made the zip
    if stat.S_ISLNK(mode):
        raise _unsafe(name, "is a symbolic link")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _unsafe(name, "is not a regular file")
    if entry.flag_bits & 0x1:
        raise _unsafe(name, "is encrypted")
    if entry.compress_type not in _COMPRESSIONS:
        raise _bad(
            f"zip entry {name!r} uses compression method {entry.compress_type}; "
            "only stored and deflate are supported",
            "invalid_zip",
        )
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in _ARCHIVE_SUFFIXES:
        raise _unsafe(name, "is an archive; nested archives are not supported")
    if not entry.is_dir() and not _is_junk(name) and suffix not in _IMAGE_SUFFIXES:
        raise _bad(
            f"zip entry {name!r} is not an image; expected {', '.join(sorted(_IMAGE_SUFFIXES))}",
            "invalid_zip",
        )


def _is_junk(name: str) -> bool:
    return name.split("/", 1)[0] == _JUNK_FOLDER or PurePosixPath(name).name in _JUNK_FILES


def _is_skipped(entry: zipfile.ZipInfo) -> bool:
    return entry.is_dir() or _is_junk(entry.filename)


def _class_labels(images: list[zipfile.ZipInfo], folders: list[str]) -> list[str]:
    """Each image's class folder, after dropping a top folder shared by every image."""
    if not images:
        raise _bad("zip holds no images", "invalid_zip")
    paths = [entry.filename.split("/") for entry in images]
    shared_top = len({path[0] for path in paths}) == 1 and all(len(p) >= 3 for p in paths)
    if shared_top:
        paths = [path[1:] for path in paths]
    for entry, path in zip(images, paths, strict=True):
        if len(path) != 2:
            raise _bad(
                f"zip entry {entry.filename!r} is not in a class folder: expected "
                "<class>/<image>, optionally all under one top folder",
                "invalid_zip",
            )
    labels = [path[0] for path in paths]
    classes = set(labels)
    for folder in folders:
        parts = folder.rstrip("/").split("/")[1 if shared_top else 0 :]
        if len(parts) == 1 and parts[0] not in classes and not _is_junk(folder):
            raise _bad(f"class folder {folder!r} holds no images", "invalid_zip")
    if len(classes) < 2:
        found = ", ".join(repr(label) for label in sorted(classes))
        raise _bad(
            f"zip needs at least 2 class folders with images; found {len(classes)}: {found}",
            "invalid_zip",
        )
    return labels


def _inflate(
    archive: zipfile.ZipFile, entry: zipfile.ZipInfo, limits: ZipLimits, used: int
) -> bytes:
    """The entry's bytes, read in chunks and abandoned the moment a limit is crossed."""
    name = entry.filename
    # The headers' sizes can reject early, never accept: the loop counts the real bytes.
    _check_inflated(name, entry.file_size, entry.compress_size, limits, used)
    chunks: list[bytes] = []
    size = 0
    try:
        with archive.open(entry) as stream:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                _check_inflated(name, size, entry.compress_size, limits, used)
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        raise _bad(f"zip entry {name!r} is corrupt: {exc}", "invalid_zip") from None
    return b"".join(chunks)


def _check_inflated(name: str, size: int, compressed: int, limits: ZipLimits, used: int) -> None:
    if size > _RATIO_FLOOR and size > limits.max_ratio * max(compressed, 1):
        raise _bad(
            f"zip entry {name!r} inflates more than {limits.max_ratio:g}x "
            f"({compressed} compressed bytes to at least {size}): refusing a zip bomb",
            "zip_bomb",
        )
    if size > limits.max_entry_uncompressed:
        raise _too_large(
            f"zip entry {name!r} is at least {size} bytes uncompressed; "
            f"the limit is {limits.max_entry_uncompressed}",
            "zip_too_large",
        )
    if used + size > limits.max_total_uncompressed:
        raise _too_large(
            f"zip is at least {used + size} bytes uncompressed at entry {name!r}; "
            f"the limit is {limits.max_total_uncompressed}",
            "zip_too_large",
        )


def _check_image(name: str, raw: bytes, limits: ZipLimits) -> None:
    if raw.startswith(b"PK\x03\x04"):
        raise _unsafe(name, "is a zip archive; nested archives are not supported")
    try:
        with Image.open(io.BytesIO(raw), formats=_PILLOW_FORMATS) as image:
            # The header gives the size: judge it before anything is decoded.
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise _bad(
                    f"zip entry {name!r} is {width}x{height} pixels; "
                    f"the limit is {limits.max_image_pixels} pixels",
                    "invalid_image",
                )
            # Checks structure (PNG chunk CRCs, ...) without decoding pixels; the image is
            # unusable afterwards, and nothing more is needed from it here.
            image.verify()
    except UnidentifiedImageError:
        raise _bad(
            f"zip entry {name!r} is not a {', '.join(_PILLOW_FORMATS)} image", "invalid_image"
        ) from None
    except Image.DecompressionBombError as exc:
        raise _bad(f"zip entry {name!r} is too large an image: {exc}", "invalid_image") from None
    except _PIL_ERRORS as exc:
        raise _bad(f"zip entry {name!r} is not a readable image: {exc}", "invalid_image") from None
