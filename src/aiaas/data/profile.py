"""Describe a table: each column's type and statistics, the label, the task, and a preview.

Column types, decided on the non-missing values:
- bool dtype, or objects that are all booleans: boolean.
- Numbers: integer when every value is a whole number (so 1.0, NaN, 3.0, an int column with gaps
  that pandas stored as float, is integer); otherwise float.
- datetime dtype, or strings at least 8 characters long of which >= 95% parse with one of
  `DATETIME_FORMATS` (ISO 8601 first): datetime. The length floor keeps "May" or "2020" out.
- bytes: image.
- Other strings, and columns mixing numbers with strings (their string forms are judged):
  categorical when there are few distinct values (<= 50, and <= 50% of the values); else text
  when the mean is >= 4 words; else categorical when values repeat (<= 50% distinct, e.g. city
  names); else text (mostly distinct short strings: names, identifiers).
- pandas category dtype: categorical.
- A column with no values at all is typed by its dtype (float for pandas' empty columns).

The task, when not given: integer label with <= 20 distinct values, boolean or categorical:
classification; other integer and any float: regression; text: classification up to 1000
distinct values, otherwise unknown (None).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, JsonValue

from aiaas.errors import InvalidRequest
from aiaas.specs.types import ColumnType, Task

__all__ = ["ColumnProfile", "DatasetProfile", "profile_table", "schema_columns"]

LABEL_NAMES: Final = ("label", "target", "class", "y")
CATEGORICAL_MAX_UNIQUE: Final = 50
CATEGORICAL_MAX_RATIO: Final = 0.5
TEXT_MIN_WORDS: Final = 4
DATETIME_FORMATS: Final = ("ISO8601", "%m/%d/%Y", "%d/%m/%Y", "%Y/%m/%d", "%d.%m.%Y")
DATETIME_MIN_SHARE: Final = 0.95
DATETIME_MIN_CHARS: Final = 8
DATETIME_SAMPLE: Final = 1_000
CLASSIFICATION_MAX_NUMERIC_CLASSES: Final = 20
CLASSIFICATION_MAX_TEXT_CLASSES: Final = 1_000
CLASS_BALANCE_MAX: Final = 1_000  # the most frequent classes; a huge dict helps no one
TOP_VALUES: Final = 10
PREVIEW_MAX_CHARS: Final = 200
PREVIEW_MAX_ITEMS: Final = 20
IMAGE_SIZE_SAMPLE: Final = 200
# Whole numbers beyond 2**53 are not exact in a float, so they cannot prove a column integral.
_EXACT_FLOAT: Final = float(2**53)
_IMAGE_FORMATS: Final = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
_IMAGE_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_PIL_ERRORS: Final = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
_DATE_ERRORS: Final = (ValueError, TypeError, OverflowError)


class ColumnProfile(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    type: ColumnType
    dtype: str  # the pandas dtype, as read
    missing: int
    unique: int  # distinct non-missing values
    stats: dict[str, JsonValue]


class DatasetProfile(BaseModel):
    model_config = ConfigDict(frozen=True)

    rows: int
    columns: list[ColumnProfile]
    label: str | None
    task: Task | None
    class_balance: dict[str, int] | None  # label value -> rows, for classification
    preview: list[dict[str, JsonValue]]


@dataclass(frozen=True)
class _Typed:
    """A column's type and its non-missing values in that type's canonical form."""

    type: ColumnType
    values: pd.Series


def schema_columns(profile: DatasetProfile) -> list[tuple[str, ColumnType]]:
    return [(column.name, column.type) for column in profile.columns]


def profile_table(
    frame: pd.DataFrame, *, label: str | None, task: Task | None, preview_rows: int = 20
) -> DatasetProfile:
    label = _pick_label(frame, label)
    columns: list[ColumnProfile] = []
    typed_label: _Typed | None = None
    for name in frame.columns:
        column = frame[name]
        typed = _classify(column)
        if name == label:
            typed_label = typed
        columns.append(
            ColumnProfile(
                name=str(name),
                type=typed.type,
                dtype=str(column.dtype),
                missing=int(column.isna().sum()),
                unique=int(typed.values.nunique()),
                stats=_stats(typed),
            )
        )
    class_balance = None
    if label is None or typed_label is None:
        if task is not None:
            raise InvalidRequest(
                f"task {task.value!r} needs a label column; none was given and none is named "
                + "/".join(LABEL_NAMES),
                param="label_column",
                code="label_not_found",
            )
    else:
        task = _resolve_task(label, typed_label, task)
        if task is Task.CLASSIFICATION:
            counts = typed_label.values.value_counts().head(CLASS_BALANCE_MAX)
            class_balance = {str(key): int(count) for key, count in counts.items()}
    return DatasetProfile(
        rows=len(frame),
        columns=columns,
        label=label,
        task=task,
        class_balance=class_balance,
        preview=_preview(frame, preview_rows, _whole_floats(frame, columns)),
    )


def _pick_label(frame: pd.DataFrame, label: str | None) -> str | None:
    if label is not None:
        if label not in frame.columns:
            shown = ", ".join(repr(str(name)) for name in frame.columns[:20])
            raise InvalidRequest(
                f"label column {label!r} is not in the dataset; its columns are {shown}",
                param="label_column",
                code="label_not_found",
            )
        return label
    by_lower: dict[str, str] = {}
    for name in frame.columns:
        by_lower.setdefault(str(name).lower(), name)
    return next((by_lower[n] for n in LABEL_NAMES if n in by_lower), None)


def _resolve_task(name: str, typed: _Typed, task: Task | None) -> Task | None:
    kind, distinct = typed.type, int(typed.values.nunique())
    if kind is ColumnType.IMAGE or distinct == 0:
        why = "holds images" if kind is ColumnType.IMAGE else "has no values"
        raise InvalidRequest(
            f"label column {name!r} {why}", param="label_column", code="invalid_label"
        )
    numeric = kind in (ColumnType.INTEGER, ColumnType.FLOAT)
    if task is Task.REGRESSION and not numeric:
        raise InvalidRequest(
            f"regression needs a numeric label; {name!r} is {kind.value}", param="task"
        )
    if (
        task is Task.CLASSIFICATION
        and kind is ColumnType.FLOAT
        and distinct > CLASSIFICATION_MAX_NUMERIC_CLASSES
    ):
        raise InvalidRequest(
            f"classification needs a label with few distinct values; {name!r} is a continuous "
            f"float with {distinct} distinct values (more than "
            f"{CLASSIFICATION_MAX_NUMERIC_CLASSES}): use regression",
            param="task",
        )
    if task is not None:
        return task
    if kind is ColumnType.INTEGER:
        few = distinct <= CLASSIFICATION_MAX_NUMERIC_CLASSES
        return Task.CLASSIFICATION if few else Task.REGRESSION
    if kind is ColumnType.FLOAT:
        return Task.REGRESSION
    if kind is ColumnType.DATETIME:
        return None
    if kind is ColumnType.TEXT and distinct > CLASSIFICATION_MAX_TEXT_CLASSES:
        return None
    return Task.CLASSIFICATION


# --- Column types ------------------------------------------------------------------------------


def _classify(column: pd.Series) -> _Typed:
    present = column.dropna()
    dtype = present.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        # Whoever made the frame said so; the categories' own type is beside the point.
        return _Typed(ColumnType.CATEGORICAL, present.astype(object))
    if pd.api.types.is_bool_dtype(dtype):
        return _Typed(ColumnType.BOOLEAN, present.astype(bool))
    if pd.api.types.is_numeric_dtype(dtype):
        return _numbers(present)
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return _Typed(ColumnType.DATETIME, present)
    if isinstance(dtype, pd.StringDtype):
        return _strings(present)
    kind = pd.api.types.infer_dtype(present, skipna=True)
    if kind == "bytes":
        return _Typed(ColumnType.IMAGE, present)
    if kind == "boolean":
        return _Typed(ColumnType.BOOLEAN, present.astype(bool))
    if kind in ("integer", "floating", "mixed-integer-float", "decimal"):
        return _numbers(pd.Series(pd.to_numeric(present).to_numpy(dtype="float64")))
    if kind in ("datetime", "datetime64", "date"):
        dates = _to_datetime(present, fmt=None)
        if dates is not None:
            return _Typed(ColumnType.DATETIME, dates.dropna())
    if kind == "empty":
        return _Typed(ColumnType.CATEGORICAL, present.astype("str"))
    # Mixed numbers and strings, lists, dicts: judge their string forms.
    return _strings(pd.Series([_as_text(value) for value in present], dtype="str"))


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _numbers(values: pd.Series) -> _Typed:
    if values.dtype.kind in "iu":
        return _Typed(ColumnType.INTEGER, values)
    floats = values.to_numpy(dtype="float64")
    whole = (
        len(floats) > 0
        and bool(np.isfinite(floats).all())
        and bool((np.abs(floats) <= _EXACT_FLOAT).all())
        and bool((floats == np.round(floats)).all())
    )
    if whole:
        return _Typed(ColumnType.INTEGER, pd.Series(floats.astype("int64"), dtype="int64"))
    return _Typed(ColumnType.FLOAT, pd.Series(floats, dtype="float64"))


def _strings(values: pd.Series) -> _Typed:
    dates = _parse_dates(values)
    if dates is not None:
        return _Typed(ColumnType.DATETIME, dates)
    count = len(values)
    distinct = values.nunique()
    ratio = distinct / count if count else 0.0
    if distinct <= CATEGORICAL_MAX_UNIQUE and ratio <= CATEGORICAL_MAX_RATIO:
        return _Typed(ColumnType.CATEGORICAL, values)
    if count and values.str.count(r"\S+").mean() >= TEXT_MIN_WORDS:
        return _Typed(ColumnType.TEXT, values)
    return _Typed(
        ColumnType.CATEGORICAL if ratio <= CATEGORICAL_MAX_RATIO else ColumnType.TEXT, values
    )


def _parse_dates(values: pd.Series) -> pd.Series | None:
    """The parsed dates when >= 95% of the values parse with one format; else None."""
    if values.empty:
        return None
    # Judge a sample of distinct values first: parsing a whole column of free text is waste.
    sample = pd.Series(values.head(DATETIME_SAMPLE * 10).unique()[:DATETIME_SAMPLE], dtype="str")
    long_enough = sample.str.len() >= DATETIME_MIN_CHARS
    if long_enough.mean() < DATETIME_MIN_SHARE:
        return None
    for fmt in DATETIME_FORMATS:
        parsed = _to_datetime(sample, fmt=fmt)
        if parsed is None or (parsed.notna() & long_enough).mean() < DATETIME_MIN_SHARE:
            continue
        full = _to_datetime(values, fmt=fmt)
        if full is not None and full.notna().mean() >= DATETIME_MIN_SHARE:
            return full.dropna()
    return None


def _to_datetime(values: pd.Series, *, fmt: str | None) -> pd.Series | None:
    try:
        return pd.to_datetime(values, format=fmt, errors="coerce")
    except _DATE_ERRORS:
        pass
    try:  # mixed UTC offsets are only comparable in one zone
        return pd.to_datetime(values, format=fmt, errors="coerce", utc=True)
    except _DATE_ERRORS:
        return None


# --- Statistics --------------------------------------------------------------------------------


def _stats(typed: _Typed) -> dict[str, JsonValue]:
    values = typed.values
    if typed.type in (ColumnType.INTEGER, ColumnType.FLOAT):
        return _numeric_stats(typed)
    if typed.type in (ColumnType.CATEGORICAL, ColumnType.BOOLEAN):
        counts = values.value_counts().head(TOP_VALUES)
        return {"top": {str(key): int(count) for key, count in counts.items()}}
    if typed.type is ColumnType.TEXT:
        if values.empty:
            return {}
        chars = values.str.len()
        words = values.str.count(r"\S+")
        return {
            "mean_chars": _finite(float(chars.mean())),
            "max_chars": int(chars.max()),
            "mean_words": _finite(float(words.mean())),
            "max_words": int(words.max()),
        }
    if typed.type is ColumnType.DATETIME:
        if values.empty:
            return {}
        return {"min": values.min().isoformat(), "max": values.max().isoformat()}
    return _image_stats(values)


def _numeric_stats(typed: _Typed) -> dict[str, JsonValue]:
    values = typed.values
    if typed.type is ColumnType.FLOAT:
        infinite = int(np.isinf(values.to_numpy()).sum())
        # inf would make every moment inf or NaN; summarise the finite values and count the rest.
        values = values[np.isfinite(values.to_numpy())]
    else:
        infinite = 0
    if values.empty:
        return {"infinite": infinite} if infinite else {}
    quartiles = values.quantile([0.25, 0.5, 0.75]).to_numpy()
    cast = int if typed.type is ColumnType.INTEGER else float
    stats: dict[str, JsonValue] = {
        "min": cast(values.min()),
        "max": cast(values.max()),
        "mean": _finite(float(values.mean())),
        "std": _finite(float(values.std())),
        "p25": _finite(float(quartiles[0])),
        "p50": _finite(float(quartiles[1])),
        "p75": _finite(float(quartiles[2])),
    }
    if infinite:
        stats["infinite"] = infinite
    return stats


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _image_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((name for magic, name in _IMAGE_MAGIC if data.startswith(magic)), None)


def _image_stats(values: pd.Series) -> dict[str, JsonValue]:
    formats = pd.Series([_image_format(value) or "unknown" for value in values], dtype="str")
    sizes = pd.Series([len(value) for value in values], dtype="int64")
    stats: dict[str, JsonValue] = {
        "count": len(values),
        "formats": {str(k): int(v) for k, v in formats.value_counts().items()},
        "mean_bytes": _finite(float(sizes.mean())) if len(sizes) else None,
    }
    # Only headers are read, and of a sample: dimensions are a hint, not a census.
    dims = [_dimensions(value) for value in values.head(IMAGE_SIZE_SAMPLE)]
    known = [dim for dim in dims if dim is not None]
    if known:
        widths, heights = zip(*known, strict=True)
        stats |= {
            "sampled": len(dims),
            "min_width": min(widths),
            "max_width": max(widths),
            "min_height": min(heights),
            "max_height": max(heights),
        }
    return stats


def _dimensions(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS) as image:
            return image.size
    except _PIL_ERRORS:
        return None


# --- Preview -----------------------------------------------------------------------------------


def _whole_floats(frame: pd.DataFrame, columns: list[ColumnProfile]) -> set[str]:
    """Integer columns that pandas stored as float (because of gaps): previewed as 3, not 3.0."""
    return {
        profile.name
        for name, profile in zip(frame.columns, columns, strict=True)
        if profile.type is ColumnType.INTEGER and frame[name].dtype.kind == "f"
    }


def _preview(frame: pd.DataFrame, rows: int, whole: set[str]) -> list[dict[str, JsonValue]]:
    names = [str(name) for name in frame.columns]
    preview = []
    for row in frame.head(rows).itertuples(index=False, name=None):
        cells = {name: _json_value(value) for name, value in zip(names, row, strict=True)}
        for name in whole:
            if isinstance(cells[name], float):
                cells[name] = int(cells[name])
        preview.append(cells)
    return preview


def _json_value(value: Any) -> JsonValue:
    """A JSON-safe stand-in for a cell: no NaN or inf, no numpy types, no raw bytes."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, bytes | bytearray):
        kind = _image_format(bytes(value))
        return f"<image/{kind} {len(value)} bytes>" if kind else f"<binary {len(value)} bytes>"
    if isinstance(value, str):
        if len(value) <= PREVIEW_MAX_CHARS:
            return value
        return value[:PREVIEW_MAX_CHARS] + "…"
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return _finite(float(value))
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_value(item) for item in list(value)[:PREVIEW_MAX_ITEMS]]
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, dt.date | dt.time | pd.Timestamp):
        return value.isoformat()
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return None
    return _json_value(str(value))
