"""Turn an upload's bytes into a DataFrame: CSV, JSON Lines, Parquet, or a zip of class folders.

Everything a user can get wrong becomes `InvalidRequest` (400) or `PayloadTooLarge` (413) with
`param="file"` and a message that names the line, entry or column; no pandas, pyarrow, zipfile or
Pillow exception escapes. Everything stays in memory: an upload's plaintext never touches disk.

Error codes: `unsupported_format`, `invalid_encoding`, `invalid_csv`, `invalid_jsonl`,
`invalid_parquet`, `invalid_columns`, `no_rows` (400); `file_too_large`, `too_many_rows`,
`too_many_columns`, `cell_too_large` (413). Zips: `invalid_zip`, `unsafe_zip_entry`, `zip_bomb`,
`invalid_image` (400) and `zip_too_large` (413).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any, Final

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from aiaas.data.archives import ZipLimits, read_image_zip
from aiaas.errors import InvalidRequest, PayloadTooLarge

__all__ = ["DataFormat", "ReadLimits", "ZipLimits", "read_image_zip", "read_table", "sniff_format"]


class DataFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"
    IMAGE_ZIP = "image_zip"


@dataclass(frozen=True)
class ReadLimits:
    max_rows: int = 5_000_000
    max_columns: int = 2_000
    max_bytes: int = 256 << 20
    max_cell_chars: int = 1_000_000


_EXTENSIONS: Final = MappingProxyType(
    {
        ".csv": DataFormat.CSV,
        ".tsv": DataFormat.CSV,
        ".jsonl": DataFormat.JSONL,
        ".ndjson": DataFormat.JSONL,
        ".parquet": DataFormat.PARQUET,
        ".zip": DataFormat.IMAGE_ZIP,
    }
)
_MAGIC: Final = ((b"PAR1", DataFormat.PARQUET), (b"PK\x03\x04", DataFormat.IMAGE_ZIP))
_SUPPORTED: Final = (
    "CSV (.csv, .tsv), JSON Lines (.jsonl, .ndjson), Parquet (.parquet), zip of images"
)
# Tried in this order; the first that splits the opening lines consistently wins.
_DELIMITERS: Final = (",", "\t", ";", "|")
_SNIFF_RECORDS: Final = 20
# The chat format: a JSONL `messages` column stays a list of dicts; other nested values become JSON.
_MESSAGES_COLUMN: Final = "messages"
_PANDAS_INDEX: Final = re.compile(r"__index_level_\d+__")
_RAGGED: Final = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def _bad(message: str, code: str) -> InvalidRequest:
    return InvalidRequest(message, param="file", code=code)


def _too_large(message: str, code: str) -> PayloadTooLarge:
    return PayloadTooLarge(message, param="file", code=code)


def sniff_format(filename: str, head: bytes) -> DataFormat:
    """The format named by the extension, cross-checked against the file's first bytes."""
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    by_magic = next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)
    by_name = _EXTENSIONS.get(suffix)
    if by_name is None:
        # No extension at all: binary formats announce themselves; text ones cannot be told apart.
        if not suffix and by_magic is not None:
            return by_magic
        raise _bad(
            f"unsupported file type {filename!r}; supported: {_SUPPORTED}", "unsupported_format"
        )
    binary = by_name in (DataFormat.PARQUET, DataFormat.IMAGE_ZIP)
    if (binary and by_magic is not by_name) or (not binary and by_magic is not None):
        seen = by_magic.value if by_magic is not None else "not a Parquet or zip file"
        raise _bad(
            f"{filename!r} is named as {by_name.value} but its content is {seen}; "
            f"supported: {_SUPPORTED}",
            "unsupported_format",
        )
    return by_name


def read_table(data: bytes, fmt: DataFormat, limits: ReadLimits = ReadLimits()) -> pd.DataFrame:
    """A DataFrame with pandas-inferred dtypes and missing values as NA; see each reader's rules."""
    if len(data) > limits.max_bytes:
        raise _too_large(
            f"file is {len(data)} bytes; the limit is {limits.max_bytes}", "file_too_large"
        )
    if fmt is DataFormat.CSV:
        frame = _read_csv(data, limits)
    elif fmt is DataFormat.JSONL:
        frame = _read_jsonl(data, limits)
    elif fmt is DataFormat.PARQUET:
        frame = _read_parquet(data, limits)
    else:
        raise _bad(
            "a zip of images is not a table; read it with read_image_zip", "unsupported_format"
        )
    _check_frame(frame, limits)
    return frame


def _decode_utf8(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _bad(
            f"file is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line})",
            "invalid_encoding",
        ) from None
    return text.removeprefix("\ufeff")


def _read_csv(data: bytes, limits: ReadLimits) -> pd.DataFrame:
    """Header row required; delimiter sniffed among , TAB ; | (comma when the header has none).

    A row with more fields than the header is an error naming its line; a row with fewer is
    padded with missing values (pandas' rule). Blank lines are skipped.
    """
    text = _decode_utf8(data)
    if not text.strip():
        raise _bad("file is empty: no header and no rows", "no_rows")
    delimiter = _sniff_delimiter(text)
    records = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next(records)
        # pandas silently makes the first column the index when the first row has one field too
        # many, so that row is checked here; the parser catches the rest.
        first = next((record for record in records if record), None)
    except csv.Error as exc:
        raise _bad(f"line {records.line_num}: malformed CSV: {exc}", "invalid_csv") from None
    if first is not None and len(first) > len(header):
        raise _bad(
            f"line {records.line_num}: expected {len(header)} fields, saw {len(first)}",
            "invalid_csv",
        )
    if len(header) > limits.max_columns:
        raise _too_many_columns(len(header), limits)
    _check_names(header)
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=delimiter,
            on_bad_lines="error",
            low_memory=False,  # infer each column's dtype from all of it, not per chunk
            nrows=limits.max_rows + 1,
        )
    except pd.errors.EmptyDataError:
        raise _bad("file has no header row", "no_rows") from None
    except (pd.errors.ParserError, ValueError, OverflowError) as exc:
        raise _bad(_describe_csv_error(exc), "invalid_csv") from None
    return frame


def _sniff_delimiter(text: str) -> str:
    end = text.find("\n")
    first_line = re.sub(r'"[^"]*"', "", text if end < 0 else text[:end])
    for delimiter in sorted(_DELIMITERS, key=first_line.count, reverse=True):
        if first_line.count(delimiter) == 0:
            break
        try:
            records = csv.reader(io.StringIO(text), delimiter=delimiter)
            widths = {len(record) for record in itertools.islice(records, _SNIFF_RECORDS) if record}
        except csv.Error:
            continue
        if len(widths) == 1:
            return delimiter
    return max(_DELIMITERS, key=first_line.count)  # ragged anyway: let the parser name the line


def _describe_csv_error(exc: Exception) -> str:
    message = str(exc).strip()
    ragged = _RAGGED.search(message)
    if ragged:
        expected, line, saw = ragged.groups()
        return f"line {line}: expected {expected} fields, saw {saw}"
    return "malformed CSV: " + message.removeprefix("Error tokenizing data. C error: ")


def _read_jsonl(data: bytes, limits: ReadLimits) -> pd.DataFrame:
    """One JSON object per line; blank lines anywhere are ignored; keys' union becomes columns.

    Nested values (lists, objects) become JSON strings, except in `messages` (the chat format),
    which keeps the parsed list so a chat dataset can be used as is.
    """
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}  # insertion-ordered set: columns appear in first-seen order
    for number, line in enumerate(io.StringIO(_decode_utf8(data)), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(
                f"line {number} is not valid JSON: {exc.msg} (column {exc.colno})", "invalid_jsonl"
            ) from None
        except RecursionError:
            raise _bad(f"line {number} is nested too deeply", "invalid_jsonl") from None
        if not isinstance(record, dict):
            kind = "array" if isinstance(record, list) else type(record).__name__
            raise _bad(f"line {number}: expected a JSON object, got {kind}", "invalid_jsonl")
        if len(rows) == limits.max_rows:
            raise _too_many_rows(f"more than {limits.max_rows}", limits)
        for key, value in record.items():
            if key not in columns:
                if not key.strip():
                    raise _bad(f"line {number}: empty key", "invalid_columns")
                if len(columns) == limits.max_columns:
                    raise _too_many_columns(f"more than {limits.max_columns}", limits)
                columns[key] = None
            if isinstance(value, list | dict) and key != _MESSAGES_COLUMN:
                record[key] = value = json.dumps(value, ensure_ascii=False)
            if isinstance(value, str) and len(value) > limits.max_cell_chars:
                raise _cell_too_large(f"line {number}, column {key!r}", len(value), limits)
        rows.append(record)
    series = {
        key: pd.Series(
            [row.get(key) for row in rows], dtype=object if key == _MESSAGES_COLUMN else None
        )
        for key in columns
    }
    return pd.DataFrame(series, index=pd.RangeIndex(len(rows)))


def _read_parquet(data: bytes, limits: ReadLimits) -> pd.DataFrame:
    """Flat columns as pyarrow converts them; nested ones as JSON strings (but see `messages`)."""
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        names = parquet.schema_arrow.names
        # Check the footer's counts before reading a byte of data.
        if parquet.metadata.num_rows > limits.max_rows:
            raise _too_many_rows(parquet.metadata.num_rows, limits)
        if len(names) > limits.max_columns:
            raise _too_many_columns(len(names), limits)
        table = parquet.read(use_pandas_metadata=False)
        series: dict[str, pd.Series] = {}
        for name, column in zip(table.column_names, table.columns, strict=True):
            if _PANDAS_INDEX.fullmatch(name):
                continue  # a pandas index written alongside the data, not a column
            if name in series:
                raise _bad(f"duplicate column name {name!r}", "invalid_columns")
            if pa.types.is_dictionary(column.type):
                column = column.cast(column.type.value_type)
            series[name] = (
                _nested_series(name, column.to_pylist())
                if pa.types.is_nested(column.type)
                else column.to_pandas()
            )
    except (pa.ArrowException, OSError) as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise _bad(f"not a valid Parquet file: {detail}", "invalid_parquet") from None
    _check_names(list(series))
    return pd.DataFrame(series, index=pd.RangeIndex(table.num_rows))


def _nested_series(name: str, values: list[Any]) -> pd.Series:
    if name == _MESSAGES_COLUMN:
        return pd.Series(values, dtype=object)
    encoded = [
        None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values
    ]
    return pd.Series(encoded, dtype="str")


def _check_names(names: list[str]) -> None:
    seen: dict[str, int] = {}
    for position, name in enumerate(names, start=1):
        if not name.strip():
            raise _bad(f"column {position} has an empty name", "invalid_columns")
        if name in seen:
            raise _bad(
                f"duplicate column name {name!r} (columns {seen[name]} and {position})",
                "invalid_columns",
            )
        seen[name] = position


def _check_frame(frame: pd.DataFrame, limits: ReadLimits) -> None:
    if len(frame.columns) == 0:
        raise _bad("file has no columns", "no_rows")
    if len(frame) == 0:
        raise _bad("file has a header but no rows", "no_rows")
    if len(frame) > limits.max_rows:
        raise _too_many_rows(f"more than {limits.max_rows}", limits)
    for name in frame.columns:
        column = frame[name]
        if not isinstance(column.dtype, pd.StringDtype):
            continue  # JSONL checks its strings as it parses; other dtypes hold no long text
        lengths = column.str.len()
        longest = lengths.max()
        if pd.notna(longest) and longest > limits.max_cell_chars:
            row = int(lengths.to_numpy().argmax())
            raise _cell_too_large(f"row {row + 1}, column {name!r}", int(longest), limits)


def _too_many_rows(count: int | str, limits: ReadLimits) -> PayloadTooLarge:
    return _too_large(f"file has {count} rows; the limit is {limits.max_rows}", "too_many_rows")


def _too_many_columns(count: int | str, limits: ReadLimits) -> PayloadTooLarge:
    return _too_large(
        f"file has {count} columns; the limit is {limits.max_columns}", "too_many_columns"
    )


def _cell_too_large(where: str, chars: int, limits: ReadLimits) -> PayloadTooLarge:
    return _too_large(
        f"{where}: value is {chars} characters; the limit is {limits.max_cell_chars}",
        "cell_too_large",
    )
