"""Make a dataset version from source files: read, redact, profile, split, fit, store as Parquet.

Pure data work, no tenants or storage: the datasets service hands in the bytes of the source
files and stores what comes out. The order matters: PII is redacted before anything else sees
the data (so the profile, the preview and the stored rows are all clean), the split is assigned
before the preprocessing spec is fitted (so the spec learns from training rows only), and the
split travels inside the stored table, so every later reader sees the same assignment.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from aiaas.data.profile import DatasetProfile, profile_table, schema_columns
from aiaas.data.readers import (
    DataFormat,
    ReadLimits,
    ZipLimits,
    read_image_zip,
    read_table,
    sniff_format,
)
from aiaas.errors import InvalidRequest
from aiaas.privacy.pii import ColumnPiiReport, PiiDetector, redact_frame
from aiaas.specs.preprocessing import (
    FeatureStep,
    PreprocessingSpec,
    SplitSpec,
    assign_splits,
    fit,
    propose_spec,
)
from aiaas.specs.types import SPLIT_COLUMN, Task

__all__ = [
    "BuildOptions",
    "BuiltVersion",
    "Source",
    "build_version",
    "page_rows",
    "read_version",
]

# Columns of an image zip that are bookkeeping, not features (the path names the class folder).
_IMAGE_ZIP_METADATA = ("path",)


@dataclass(frozen=True, slots=True)
class Source:
    file_id: str
    filename: str
    data: bytes


@dataclass(frozen=True, slots=True)
class BuildOptions:
    format: DataFormat | None = None
    label: str | None = None
    task: Task | None = None
    redact_pii: bool = False
    split: SplitSpec | None = None
    features: Sequence[FeatureStep] | None = None
    read_limits: ReadLimits = field(default_factory=ReadLimits)
    zip_limits: ZipLimits = field(default_factory=ZipLimits)


@dataclass(frozen=True, slots=True)
class BuiltVersion:
    format: DataFormat
    parquet: bytes
    content_hash: str  # "sha256:<hex>" of the stored Parquet bytes
    profile: DatasetProfile
    spec: PreprocessingSpec  # fitted on the training split
    splits: dict[str, int]
    pii: list[ColumnPiiReport] | None  # None when redaction was not asked for

    @property
    def rows(self) -> int:
        return self.profile.rows


def build_version(
    sources: Sequence[Source],
    options: BuildOptions,
    *,
    pii_detector: Callable[[], PiiDetector],
) -> BuiltVersion:
    fmt = _format(sources, options.format)
    frame = _read(sources, fmt, options)
    reports = None
    if options.redact_pii:
        frame, reports = redact_frame(frame, pii_detector())
    profile = profile_table(frame, label=options.label, task=options.task)
    spec = _spec(profile, fmt, options)
    labels = None
    if spec.label is not None and spec.label.task is Task.CLASSIFICATION and spec.split.stratify:
        labels = frame[spec.label.column]
    frame[SPLIT_COLUMN] = assign_splits(labels, len(frame), spec.split)
    train = frame[frame[SPLIT_COLUMN] == "train"]
    fitted = fit(spec, train)
    parquet = _to_parquet(frame)
    counts = frame[SPLIT_COLUMN].value_counts()
    return BuiltVersion(
        format=fmt,
        parquet=parquet,
        content_hash="sha256:" + hashlib.sha256(parquet).hexdigest(),
        profile=profile,
        spec=fitted,
        splits={name: int(counts.get(name, 0)) for name in ("train", "validation", "test")},
        pii=reports,
    )


def read_version(parquet: bytes) -> pd.DataFrame:
    """The stored table of a version, split column included."""
    return pd.read_parquet(io.BytesIO(parquet))


def page_rows(
    frame: pd.DataFrame, *, split: str | None, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """JSON-ready rows `offset..offset+limit` (of one split, if given) and the total count.

    Bytes (images) become base64 strings; missing values and non-finite floats become None.
    """
    if split is not None:
        frame = frame[frame[SPLIT_COLUMN] == split]
    page = frame.iloc[offset : offset + limit]
    rows = [{k: _json_value(v) for k, v in record.items()} for record in page.to_dict("records")]
    return rows, len(frame)


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, (str, list, dict, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float)):
        return value
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (pd.Timestamp, datetime.date)):
        return value.isoformat()
    return str(value)


def _format(sources: Sequence[Source], given: DataFormat | None) -> DataFormat:
    formats = {given or sniff_format(s.filename, s.data[:8]) for s in sources}
    if len(formats) > 1:
        raise InvalidRequest(
            f"All files of a dataset version must have one format; got {sorted(formats)}.",
            param="file_ids",
        )
    return formats.pop()


def _read(sources: Sequence[Source], fmt: DataFormat, options: BuildOptions) -> pd.DataFrame:
    frames = [
        read_image_zip(s.data, options.zip_limits)
        if fmt is DataFormat.IMAGE_ZIP
        else read_table(s.data, fmt, options.read_limits)
        for s in sources
    ]
    if len(frames) > 1:
        columns = [list(f.columns) for f in frames]
        if any(c != columns[0] for c in columns[1:]):
            raise InvalidRequest(
                f"The files of a dataset version must have the same columns; got {columns}.",
                param="file_ids",
            )
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if SPLIT_COLUMN in frame.columns:
        raise InvalidRequest(f"The column name {SPLIT_COLUMN!r} is reserved.", param="file_ids")
    return frame


def _spec(profile: DatasetProfile, fmt: DataFormat, options: BuildOptions) -> PreprocessingSpec:
    task = profile.task
    try:
        if options.features is not None:
            proposed = propose_spec(
                schema_columns(profile), label=profile.label, task=task, split=options.split
            )
            spec = PreprocessingSpec(
                features=list(options.features), label=proposed.label, split=proposed.split
            )
        else:
            columns = schema_columns(profile)
            if fmt is DataFormat.IMAGE_ZIP:
                columns = [(n, t) for n, t in columns if n not in _IMAGE_ZIP_METADATA]
            spec = propose_spec(columns, label=profile.label, task=task, split=options.split)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(f"Invalid preprocessing: {first['msg']}", param="features") from None
    names = {c.name for c in profile.columns}
    unknown = [s.column for s in spec.features if s.column not in names]
    if unknown:
        raise InvalidRequest(
            f"features name columns that are not in the data: {unknown}", param="features"
        )
    return spec


def _to_parquet(frame: pd.DataFrame) -> bytes:
    stored = frame.copy()
    for column in stored.columns:
        if stored[column].dtype != object:  # only object columns can hold nested values
            continue
        if stored[column].map(lambda v: isinstance(v, (dict, list))).any():
            stored[column] = stored[column].map(
                lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v
            )
    buffer = io.BytesIO()
    stored.to_parquet(buffer, index=False, compression="zstd")
    return buffer.getvalue()
