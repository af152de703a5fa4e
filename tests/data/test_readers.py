"""Readers: every malformed or hostile upload becomes a 400 or 413 that names what is wrong."""

from __future__ import annotations

import io
import json
import stat
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aiaas.data.readers import (
    DataFormat,
    ReadLimits,
    ZipLimits,
    read_image_zip,
    read_table,
    sniff_format,
)
from aiaas.errors import ApiError, InvalidRequest, PayloadTooLarge
from aiaas.specs.types import IMAGE_COLUMN, LABEL_COLUMN

MIXED_CSV = b"""id,age,score,active,color,joined
1,34,1.5,true,red,2021-01-05
2,,2.25,false,blue,2021-02-11
3,51,,true,red,
"""


def csv_error(data: bytes, **limits: int) -> ApiError:
    with pytest.raises(ApiError) as caught:
        read_table(data, DataFormat.CSV, ReadLimits(**limits))
    return caught.value


def jsonl_error(data: bytes, **limits: int) -> ApiError:
    with pytest.raises(ApiError) as caught:
        read_table(data, DataFormat.JSONL, ReadLimits(**limits))
    return caught.value


# --- Sniffing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "head", "expected"),
    [
        ("data.csv", b"a,b\n1,2\n", DataFormat.CSV),
        ("DATA.TSV", b"a\tb\n", DataFormat.CSV),
        ("chat.jsonl", b'{"messages": []}\n', DataFormat.JSONL),
        ("chat.ndjson", b'{"a": 1}\n', DataFormat.JSONL),
        ("table.parquet", b"PAR1\x15\x04", DataFormat.PARQUET),
        ("images.zip", b"PK\x03\x04\x14\x00", DataFormat.IMAGE_ZIP),
        ("no-extension", b"PAR1\x15\x04", DataFormat.PARQUET),
        ("no-extension", b"PK\x03\x04", DataFormat.IMAGE_ZIP),
    ],
)
def test_sniff_format_reads_extension_and_magic(
    filename: str, head: bytes, expected: DataFormat
) -> None:
    assert sniff_format(filename, head) is expected


@pytest.mark.parametrize(
    ("filename", "head"),
    [
        ("data.csv", b"PK\x03\x04"),  # a zip dressed as CSV
        ("table.parquet", b"a,b\n"),
        ("images.zip", b"PAR1"),
        ("notes.txt", b"hello"),
        ("no-extension", b"a,b\n"),
    ],
)
def test_sniff_format_rejects_mismatch_and_unknown(filename: str, head: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        sniff_format(filename, head)
    assert caught.value.status == 400
    assert caught.value.param == "file"
    assert caught.value.code == "unsupported_format"
    assert "Parquet" in caught.value.message and "JSON Lines" in caught.value.message


# --- CSV -----------------------------------------------------------------------------------------


def test_csv_infers_dtypes_and_keeps_missing_values() -> None:
    frame = read_table(MIXED_CSV, DataFormat.CSV, ReadLimits())
    assert list(frame.columns) == ["id", "age", "score", "active", "color", "joined"]
    assert frame["id"].dtype == "int64"
    assert frame["age"].dtype == "float64"  # an int column with a gap
    assert frame["age"].isna().tolist() == [False, True, False]
    assert frame["score"].isna().sum() == 1
    assert frame["active"].tolist() == [True, False, True]
    assert frame["joined"].isna().tolist() == [False, False, True]


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_csv_sniffs_the_delimiter(delimiter: str) -> None:
    data = delimiter.join(["a", "b", "c"]) + "\n" + delimiter.join(["1", "x, y", "3"]) + "\n"
    frame = read_table(data.encode(), DataFormat.CSV, ReadLimits())
    assert list(frame.columns) == ["a", "b", "c"]
    assert frame.loc[0, "b"] == "x, y"


def test_csv_accepts_a_utf8_bom() -> None:
    frame = read_table(b"\xef\xbb\xbfname,n\nzo\xc3\xab,1\n", DataFormat.CSV, ReadLimits())
    assert list(frame.columns) == ["name", "n"]
    assert frame.loc[0, "name"] == "zoë"


def test_ragged_csv_names_the_line() -> None:
    rows = ["a,b,c"] + [f"{i},{i},{i}" for i in range(5)] + ["7,8,9,10", "1,2,3"]
    error = csv_error("\n".join(rows).encode())
    assert (error.status, error.code, error.param) == (400, "invalid_csv", "file")
    assert error.message == "line 7: expected 3 fields, saw 4"


def test_extra_field_on_first_row_is_not_taken_as_an_index() -> None:
    # pandas alone would quietly make column "a" the index here.
    error = csv_error(b"a,b\n1,2,3\n4,5,6\n")
    assert (error.status, error.message) == (400, "line 2: expected 2 fields, saw 3")


def test_unterminated_quote_is_400() -> None:
    error = csv_error(b'a,b\n1,"never closed\n')
    assert (error.status, error.code) == (400, "invalid_csv")


def test_non_utf8_csv_names_the_offset_and_line() -> None:
    error = csv_error(b"name,n\nok,1\ncaf\xe9,2\n")  # Latin-1 é
    assert (error.status, error.code) == (400, "invalid_encoding")
    assert "0xe9" in error.message
    assert "offset 15" in error.message and "line 3" in error.message


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_empty_csv_is_400(data: bytes) -> None:
    error = csv_error(data)
    assert (error.status, error.code) == (400, "no_rows")


def test_header_only_csv_has_no_rows() -> None:
    error = csv_error(b"a,b,c\n")
    assert (error.status, error.code) == (400, "no_rows")
    assert "no rows" in error.message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"a,b,a\n1,2,3\n", "duplicate column name 'a' (columns 1 and 3)"),
        (b"a,,c\n1,2,3\n", "column 2 has an empty name"),
        (b"a, ,c\n1,2,3\n", "column 2 has an empty name"),
    ],
)
def test_bad_column_names_are_400(data: bytes, fragment: str) -> None:
    error = csv_error(data)
    assert (error.status, error.code) == (400, "invalid_columns")
    assert fragment in error.message


def test_csv_limits_are_413_with_numbers() -> None:
    data = b"a,b\n" + b"".join(f"{i},{i}\n".encode() for i in range(11))
    rows = csv_error(data, max_rows=10)
    assert (rows.status, rows.code) == (413, "too_many_rows")
    assert "10" in rows.message
    columns = csv_error(data, max_columns=1)
    assert (columns.status, columns.code) == (413, "too_many_columns")
    assert "2 columns" in columns.message and "limit is 1" in columns.message
    size = csv_error(data, max_bytes=10)
    assert (size.status, size.code) == (413, "file_too_large")
    cell = csv_error(b"a,b\n1,short\n2," + b"x" * 50 + b"\n", max_cell_chars=20)
    assert (cell.status, cell.code) == (413, "cell_too_large")
    assert "row 2, column 'b'" in cell.message and "50 characters" in cell.message


# --- JSON Lines ----------------------------------------------------------------------------------


def test_jsonl_unions_keys_and_encodes_nested_values() -> None:
    lines = [
        {"text": "hi", "n": 1, "meta": {"a": [1, 2]}},
        {"text": "yo", "extra": True},
        {"n": 3, "messages": [{"role": "user", "content": "hey"}]},
    ]
    data = "\n".join(json.dumps(line) for line in lines) + "\n\n\n"
    frame = read_table(data.encode(), DataFormat.JSONL, ReadLimits())
    assert list(frame.columns) == ["text", "n", "meta", "extra", "messages"]
    assert len(frame) == 3
    assert frame["n"].isna().tolist() == [False, True, False]
    assert json.loads(frame.loc[0, "meta"]) == {"a": [1, 2]}
    assert frame.loc[2, "messages"] == [{"role": "user", "content": "hey"}]
    assert pd.isna(frame.loc[0, "messages"])


def test_jsonl_ignores_blank_lines_anywhere() -> None:
    frame = read_table(b'\n{"a": 1}\n\n{"a": 2}\r\n', DataFormat.JSONL, ReadLimits())
    assert frame["a"].tolist() == [1, 2]


def test_jsonl_line_that_is_not_an_object_is_named() -> None:
    error = jsonl_error(b'{"a": 1}\n{"a": 2}\n[1, 2]\n')
    assert (error.status, error.code, error.param) == (400, "invalid_jsonl", "file")
    assert error.message == "line 3: expected a JSON object, got array"


def test_jsonl_invalid_json_is_named() -> None:
    error = jsonl_error(b'{"a": 1}\n\n{"a": }\n')
    assert (error.status, error.code) == (400, "invalid_jsonl")
    assert error.message.startswith("line 3 is not valid JSON: ")


def test_jsonl_empty_and_limits() -> None:
    assert jsonl_error(b"\n\n").code == "no_rows"
    rows = jsonl_error(b'{"a": 1}\n{"a": 2}\n{"a": 3}\n', max_rows=2)
    assert (rows.status, rows.code) == (413, "too_many_rows")
    columns = jsonl_error(b'{"a": 1, "b": 2, "c": 3}\n', max_columns=2)
    assert (columns.status, columns.code) == (413, "too_many_columns")
    cell = jsonl_error(b'{"a": "x"}\n{"a": "' + b"y" * 30 + b'"}\n', max_cell_chars=10)
    assert (cell.status, cell.code) == (413, "cell_too_large")
    assert "line 2, column 'a'" in cell.message


def test_jsonl_non_utf8_is_400() -> None:
    error = jsonl_error(b'{"a": "\xff"}\n')
    assert (error.status, error.code) == (400, "invalid_encoding")


# --- Parquet -------------------------------------------------------------------------------------


def parquet_bytes(frame: pd.DataFrame, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, **kwargs)
    return buffer.getvalue()


def test_parquet_round_trip() -> None:
    original = pd.DataFrame(
        {
            "n": [1, None, 3],
            "x": [0.5, 1.5, np.nan],
            "s": ["a", None, "c"],
            "flag": [True, False, True],
            "when": pd.to_datetime(["2020-01-01", "2020-01-02", None]),
            "cat": pd.Categorical(["u", "v", "u"]),
            "tags": [[1, 2], [], [3]],
        },
        index=[10, 11, 12],  # written as __index_level_0__, which is not data
    )
    data = parquet_bytes(original)
    assert sniff_format("t.parquet", data[:8]) is DataFormat.PARQUET
    frame = read_table(data, DataFormat.PARQUET, ReadLimits())
    assert list(frame.columns) == ["n", "x", "s", "flag", "when", "cat", "tags"]
    assert frame["n"].isna().tolist() == [False, True, False]
    assert frame["s"].tolist()[0] == "a" and pd.isna(frame.loc[1, "s"])
    assert frame["flag"].tolist() == [True, False, True]
    assert frame["cat"].tolist() == ["u", "v", "u"]
    assert [json.loads(v) for v in frame["tags"]] == [[1, 2], [], [3]]
    assert frame["when"].iloc[0] == pd.Timestamp("2020-01-01")


@pytest.mark.parametrize(
    "data",
    [b"", b"PAR1", b"PAR1 this is not parquet at all PAR1", b"PAR1" + b"\x00" * 64 + b"PAR1"],
)
def test_corrupt_parquet_is_400(data: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        read_table(data, DataFormat.PARQUET, ReadLimits())
    assert (caught.value.status, caught.value.code) == (400, "invalid_parquet")


def test_truncated_parquet_is_400() -> None:
    data = parquet_bytes(pd.DataFrame({"a": range(1000)}))
    with pytest.raises(InvalidRequest) as caught:
        read_table(data[: len(data) // 2] + data[-8:], DataFormat.PARQUET, ReadLimits())
    assert caught.value.code == "invalid_parquet"


def test_parquet_limits_come_from_the_footer() -> None:
    data = parquet_bytes(pd.DataFrame({"a": range(100), "b": range(100)}))
    with pytest.raises(PayloadTooLarge) as rows:
        read_table(data, DataFormat.PARQUET, ReadLimits(max_rows=99))
    assert rows.value.status == 413 and "100 rows" in rows.value.message
    with pytest.raises(PayloadTooLarge) as columns:
        read_table(data, DataFormat.PARQUET, ReadLimits(max_columns=1))
    assert columns.value.code == "too_many_columns"


def test_empty_parquet_has_no_rows() -> None:
    data = parquet_bytes(pd.DataFrame({"a": pd.Series([], dtype="int64")}))
    with pytest.raises(InvalidRequest) as caught:
        read_table(data, DataFormat.PARQUET, ReadLimits())
    assert caught.value.code == "no_rows"


# --- Image zips ----------------------------------------------------------------------------------


def png(color: str = "red", size: tuple[int, int] = (4, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def zip_error(data: bytes, limits: ZipLimits | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        read_image_zip(data, limits or ZipLimits())
    assert caught.value.param == "file"
    return caught.value


GOOD = {"cat/1.png": png("red"), "cat/2.png": png("orange"), "dog/1.png": png("blue")}


def test_image_zip_labels_come_from_class_folders() -> None:
    frame = read_image_zip(make_zip(GOOD), ZipLimits())
    assert list(frame.columns) == [IMAGE_COLUMN, LABEL_COLUMN, "path"]
    assert frame["path"].tolist() == ["cat/1.png", "cat/2.png", "dog/1.png"]
    assert frame[LABEL_COLUMN].tolist() == ["cat", "cat", "dog"]
    assert frame.loc[2, IMAGE_COLUMN] == GOOD["dog/1.png"]


def test_image_zip_under_one_top_folder_with_junk() -> None:
    entries = {f"train/{name}": payload for name, payload in GOOD.items()}
    entries |= {
        "train/bird/a.jpg": png("green"),  # the suffix lies; Pillow decides
        "train/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "__MACOSX/train/cat/._1.png": b"\x00\x05\x16\x07 not an image",
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train/", b"")
        archive.writestr("train/cat/", b"")
        for name, payload in entries.items():
            archive.writestr(name, payload)
    frame = read_image_zip(buffer.getvalue(), ZipLimits())
    assert sorted(set(frame[LABEL_COLUMN])) == ["bird", "cat", "dog"]
    assert len(frame) == 4


@pytest.mark.parametrize(
    "name",
    [
        "../evil.png",
        "cat/../../evil.png",
        "/abs.png",
        "a\\..\\b.png",
        "C:/windows/evil.png",
        "__MACOSX/../evil.png",
        "cat/./1.png",
        "cat//1.png",
    ],
)
def test_unsafe_entry_names_are_rejected(name: str) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for good, payload in GOOD.items():
            archive.writestr(good, payload)
        archive.writestr(zipfile.ZipInfo(name), png())  # ZipInfo keeps the name as given
    error = zip_error(buffer.getvalue())
    assert (error.status, error.code) == (400, "unsafe_zip_entry")
    assert repr(name) in error.message


def test_nul_in_entry_name_is_rejected() -> None:
    data = make_zip(GOOD | {"cat/evilXpng.png": png()})
    data = data.replace(b"cat/evilXpng.png", b"cat/evil\x00png.png")  # zipfile cannot write it
    error = zip_error(data)
    assert (error.status, error.code) == (400, "unsafe_zip_entry")
    assert "NUL" in error.message


def test_symlink_entry_is_rejected() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in GOOD.items():
            archive.writestr(name, payload)
        link = zipfile.ZipInfo("cat/link.png")
        link.create_system = 3  # Unix: external_attr's high half is the mode
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "../../../etc/passwd")
    error = zip_error(buffer.getvalue())
    assert (error.status, error.code) == (400, "unsafe_zip_entry")
    assert "'cat/link.png' is a symbolic link" in error.message


def central_directory(data: bytes) -> list[tuple[int, str]]:
    """(offset, name) of each central directory record."""
    records = []
    offset = data.find(b"PK\x01\x02")
    while offset >= 0:
        name_length = struct.unpack_from("<H", data, offset + 28)[0]
        records.append((offset, data[offset + 46 : offset + 46 + name_length].decode()))
        offset = data.find(b"PK\x01\x02", offset + 46)
    return records


def patch_entry(data: bytes, name: str, field_offset: int, fmt: str, value: int) -> bytes:
    patched = bytearray(data)
    for offset, record_name in central_directory(data):
        if record_name == name:
            struct.pack_into(fmt, patched, offset + field_offset, value)
    return bytes(patched)


def test_encrypted_entry_is_rejected() -> None:
    data = patch_entry(make_zip(GOOD), "dog/1.png", 8, "<H", 0x1)  # general purpose flag: bit 0
    error = zip_error(data)
    assert (error.status, error.code) == (400, "unsafe_zip_entry")
    assert "'dog/1.png' is encrypted" in error.message


BOMB_BYTES = 200 << 20


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """200 MiB of zeros deflated to ~200 KB, written in 1 MiB chunks to keep the test light."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, payload in GOOD.items():
            archive.writestr(name, payload)
        with archive.open("cat/bomb.png", "w") as stream:
            zeros = bytes(1 << 20)
            for _ in range(BOMB_BYTES >> 20):
                stream.write(zeros)
    return buffer.getvalue()


def read_with_peak(data: bytes, limits: ZipLimits) -> tuple[ApiError, int]:
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as caught:
            read_image_zip(data, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return caught.value, peak


def test_zip_bomb_is_refused_without_inflating_it(zip_bomb: bytes) -> None:
    assert len(zip_bomb) < 1 << 20
    error, peak = read_with_peak(zip_bomb, ZipLimits())
    assert (error.status, error.code) == (400, "zip_bomb")
    assert "'cat/bomb.png'" in error.message
    assert peak < 16 << 20


def test_zip_bomb_past_a_generous_ratio_hits_the_size_limit(zip_bomb: bytes) -> None:
    error, peak = read_with_peak(zip_bomb, ZipLimits(max_ratio=1e9))
    assert (error.status, error.code) == (413, "zip_too_large")
    assert "64" in error.message or str(64 << 20) in error.message
    assert peak < 16 << 20


def test_header_lying_about_file_size_is_refused(zip_bomb: bytes) -> None:
    # The central directory claims 1000 bytes: small and innocent, so only the bytes read count.
    lying = patch_entry(zip_bomb, "cat/bomb.png", 24, "<I", 1000)
    error, peak = read_with_peak(lying, ZipLimits())
    assert error.status == 400
    assert "'cat/bomb.png'" in error.message
    assert peak < 16 << 20


def test_header_lying_about_file_size_with_matching_crc_is_refused(zip_bomb: bytes) -> None:
    lying = patch_entry(zip_bomb, "cat/bomb.png", 24, "<I", 1000)
    lying = patch_entry(lying, "cat/bomb.png", 16, "<I", zlib.crc32(bytes(1000)))
    error, peak = read_with_peak(lying, ZipLimits())
    assert (error.status, error.code) == (400, "invalid_image")  # 1000 zeros are not a PNG
    assert peak < 16 << 20


def test_total_uncompressed_limit_is_413() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    entries = {f"{label}/{i}.png": buffer.getvalue() for label in ("a", "b") for i in range(4)}
    limit = len(buffer.getvalue()) * 5
    error = zip_error(make_zip(entries), ZipLimits(max_total_uncompressed=limit))
    assert (error.status, error.code) == (413, "zip_too_large")
    assert str(limit) in error.message
    entry = zip_error(make_zip(entries), ZipLimits(max_entry_uncompressed=1000))
    assert (entry.status, entry.code) == (413, "zip_too_large")


def test_too_many_entries_is_413() -> None:
    error = zip_error(make_zip(GOOD), ZipLimits(max_entries=2))
    assert (error.status, error.code) == (413, "zip_too_large")
    assert "3 entries" in error.message


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
def test_duplicate_entry_names_are_rejected() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in GOOD.items():
            archive.writestr(name, payload)
        archive.writestr("cat/1.png", png("black"))  # zipfile warns, but writes it
    error = zip_error(buffer.getvalue())
    assert (error.status, error.code) == (400, "unsafe_zip_entry")
    assert "'cat/1.png' appears more than once" in error.message


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming huge dimensions, in a few dozen bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [30_000, 8_000])
def test_decompression_bomb_image_is_400(side: int) -> None:
    data = make_zip(GOOD | {"dog/huge.png": png_header_only(side, side)})
    error = zip_error(data)
    assert (error.status, error.code) == (400, "invalid_image")
    assert "'dog/huge.png'" in error.message


def test_non_image_file_is_named() -> None:
    error = zip_error(make_zip(GOOD | {"cat/notes.txt": b"hello"}))
    assert (error.status, error.code) == (400, "invalid_zip")
    assert "'cat/notes.txt' is not an image" in error.message


def test_file_named_like_an_image_that_is_not_one() -> None:
    error = zip_error(make_zip(GOOD | {"cat/fake.png": b"<html>hello</html>"}))
    assert (error.status, error.code) == (400, "invalid_image")
    assert "'cat/fake.png'" in error.message


def test_broken_png_fails_verification() -> None:
    broken = bytearray(png())
    broken[broken.index(b"IDAT") + 5] ^= 0xFF  # pixel data no longer matches the chunk's CRC
    error = zip_error(make_zip(GOOD | {"cat/broken.png": bytes(broken)}))
    assert (error.status, error.code) == (400, "invalid_image")


@pytest.mark.parametrize("name", ["cat/inner.zip", "cat/inner.png"])
def test_nested_zip_is_rejected(name: str) -> None:
    error = zip_error(make_zip(GOOD | {name: make_zip(GOOD)}))
    assert (error.status, error.code) == (400, "unsafe_zip_entry")
    assert "nested" in error.message


def test_single_class_is_400() -> None:
    error = zip_error(make_zip({"cat/1.png": png(), "cat/2.png": png()}))
    assert (error.status, error.code) == (400, "invalid_zip")
    assert "at least 2 class folders" in error.message


def test_empty_class_folder_is_400() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in GOOD.items():
            archive.writestr(name, payload)
        archive.writestr("bird/", b"")
    error = zip_error(buffer.getvalue())
    assert (error.status, error.code) == (400, "invalid_zip")
    assert "'bird/' holds no images" in error.message


@pytest.mark.parametrize(
    "entries",
    [
        GOOD | {"loose.png": png()},  # not in a class folder
        GOOD | {"cat/sub/deep.png": png()},  # too deep
    ],
)
def test_wrong_layout_is_400(entries: dict[str, bytes]) -> None:
    error = zip_error(make_zip(entries))
    assert (error.status, error.code) == (400, "invalid_zip")
    assert "<class>/<image>" in error.message


def test_no_images_is_400() -> None:
    error = zip_error(make_zip({"__MACOSX/._x": b"x"}))
    assert (error.status, error.code) == (400, "invalid_zip")


@pytest.mark.parametrize(
    "data", [b"", b"PK\x03\x04 definitely not a zip", make_zip(GOOD)[:-30]], ids=str
)
def test_bad_zip_is_400(data: bytes) -> None:
    error = zip_error(data)
    assert (error.status, error.code) == (400, "invalid_zip")


def test_bzip2_entries_are_refused() -> None:
    # bzip2 inflates a whole compressed chunk in one call, with no bound on the output.
    error = zip_error(make_zip(GOOD, method=zipfile.ZIP_BZIP2))
    assert (error.status, error.code) == (400, "invalid_zip")
    assert "compression method 12" in error.message
