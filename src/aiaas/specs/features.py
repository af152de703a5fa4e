"""How one column becomes numbers: fitting a feature step's statistics and encoding with them.

Training reads whole parquet columns while serving transforms one JSON row at a time, so the same
value can arrive as `1`, `1.0`, `np.int64(1)` or `True` depending on the path. Every rule here
therefore works value by value and never trusts a column's dtype: a row's result must not depend
on which batch it came in. The steps themselves are defined in `preprocessing`.
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from tokenizers import Tokenizer

from aiaas.errors import InvalidRequest
from aiaas.specs.types import Task

if TYPE_CHECKING:
    from aiaas.specs.preprocessing import (
        CategoricalStep,
        ImageStep,
        LabelSpec,
        NumericStep,
        TextStep,
    )

__all__ = [
    "OTHER",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "category_texts",
    "decode_image",
    "encode_categorical",
    "encode_images",
    "encode_numeric",
    "encode_text",
    "fit_categorical",
    "fit_image",
    "fit_label",
    "fit_numeric",
    "fit_text",
    "numeric_values",
]

# The one-hot slot shared by categories beyond max_categories.
OTHER = "<other>"
# Ids 0 and 1 of every word vocabulary. The word pattern splits "<" and ">" off, so no real token
# can collide with them.
PAD_TOKEN = "<pad>"  # noqa: S105 (a token, not a password)
UNK_TOKEN = "<unk>"  # noqa: S105
_WORD = re.compile(r"\w+|[^\w\s]")
# Formats a dataset image may use. Pillow would also open EPS (through Ghostscript) and other
# rarities; uploaded bytes should not reach those decoders.
_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


def fit_numeric(step: NumericStep, column: pd.Series) -> NumericStep:
    raw = numeric_values(column, step.column)
    present = raw[~np.isnan(raw)]
    if step.fill_value is not None and step.impute == "constant":
        fill = step.fill_value
    elif present.size == 0:
        fill = 0.0  # nothing to learn from; any constant works as well as another
    else:
        fill = float(np.mean(present) if step.impute == "mean" else np.median(present))
    if not step.standardize:
        return step.model_copy(update={"fill": fill, "mean": None, "std": None})
    filled = np.where(np.isnan(raw), fill, raw)
    # A constant column's std can come out as a rounding speck (1e-17) rather than 0, and dividing
    # by it would magnify rounding noise; a constant column gets std 1 and encodes as 0.
    std = float(filled.std()) if np.ptp(filled) > 0 else 1.0
    return step.model_copy(update={"fill": fill, "mean": float(filled.mean()), "std": std})


def fit_categorical(step: CategoricalStep, column: pd.Series) -> CategoricalStep:
    texts = category_texts(column)
    present = Counter(t for t in texts if t is not None)
    if step.impute == "constant":
        fill = step.fill_value
    else:  # ties go to the alphabetically first value, so refits agree
        fill = min(present.items(), key=lambda item: (-item[1], item[0]))[0] if present else None
    counts = Counter(fill if t is None else t for t in texts)
    counts.pop(None, None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = sorted(value for value, _ in ranked[: step.max_categories])
    other = len(ranked) > step.max_categories
    return step.model_copy(update={"categories": kept, "fill": fill, "other": other})


def fit_text(step: TextStep, column: pd.Series) -> TextStep:
    if step.tokenizer != "word":
        return step  # a pretrained tokenizer brings its own vocabulary
    texts = _text_values(column)
    vocabulary = _build_vocabulary(texts, lowercase=step.lowercase, size=step.vocab_size)
    return step.model_copy(update={"vocabulary": vocabulary})


def fit_image(step: ImageStep, column: pd.Series) -> ImageStep:
    if step.mean is not None and step.std is not None:
        return step  # given by the user (e.g. ImageNet statistics)
    # Running sums: holding every decoded training image at once would not fit in memory.
    total = np.zeros(step.channels)
    squares = np.zeros(step.channels)
    for value in column:
        pixels = decode_image(
            value, size=step.size, channels=step.channels, column=step.column
        ).astype(np.float64)
        total += pixels.sum(axis=(1, 2))
        squares += (pixels**2).sum(axis=(1, 2))
    count = len(column) * step.size[0] * step.size[1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return step.model_copy(
        update={
            "mean": step.mean or [float(m) for m in mean],
            "std": step.std or [float(s) for s in std],
        }
    )


def fit_label(label: LabelSpec, column: pd.Series) -> LabelSpec:
    if label.task is Task.CLASSIFICATION:
        classes = sorted({t for t in category_texts(column) if t is not None})
        if all(c.lstrip("-").isdigit() for c in classes):
            classes.sort(key=lambda c: (int(c), c))  # 2 before 10
        if len(classes) < 2:
            raise InvalidRequest(
                f"label {label.column!r} needs at least 2 classes in train, has {len(classes)}",
                param=label.column,
            )
        return label.model_copy(update={"classes": classes})
    if not label.standardize:
        return label
    targets = numeric_values(column, label.column)
    targets = targets[~np.isnan(targets)]
    if targets.size == 0:
        raise InvalidRequest(f"label {label.column!r} has no values in train", param=label.column)
    std = float(targets.std()) if np.ptp(targets) > 0 else 1.0
    return label.model_copy(update={"mean": float(targets.mean()), "std": std})


def encode_numeric(step: NumericStep, column: pd.Series) -> np.ndarray:
    raw = numeric_values(column, step.column)
    filled = np.where(np.isnan(raw), step.fill, raw)
    if step.standardize:
        filled = (filled - step.mean) / step.std
    return filled.astype(np.float32)[:, None]


def encode_categorical(step: CategoricalStep, column: pd.Series) -> tuple[np.ndarray, list[str]]:
    categories = step.categories or []
    index = {category: i for i, category in enumerate(categories)}
    unknown = len(categories) if step.other else -1
    texts = [step.fill if t is None else t for t in category_texts(column)]
    codes = np.array([index.get(t, unknown) if t is not None else -1 for t in texts], np.int64)
    if step.encoding == "ordinal":
        return codes.astype(np.float32)[:, None], [step.column]
    names = [f"{step.column}={c}" for c in categories] + ([f"{step.column}={OTHER}"] * step.other)
    onehot = np.zeros((len(codes), len(names)), dtype=np.float32)
    known = codes >= 0
    onehot[np.flatnonzero(known), codes[known]] = 1.0
    return onehot, names


def encode_text(
    step: TextStep, column: pd.Series, tokenizers: Mapping[str, Tokenizer] | None
) -> tuple[np.ndarray, np.ndarray]:
    texts = _text_values(column)
    if step.tokenizer == "word":
        return _word_ids(
            texts,
            vocabulary=step.vocabulary or [],
            lowercase=step.lowercase,
            max_length=step.max_length,
        )
    tokenizer = (tokenizers or {}).get(step.tokenizer_ref or "")
    if tokenizer is None:
        raise InvalidRequest(
            f"column {step.column!r}: tokenizer {step.tokenizer_ref!r} is not available",
            param=step.column,
        )
    return _wordpiece_ids(tokenizer, texts, max_length=step.max_length)


def encode_images(step: ImageStep, column: pd.Series) -> np.ndarray:
    height, width = step.size
    batch = np.empty((len(column), step.channels, height, width), dtype=np.float32)
    for row, value in enumerate(column):
        batch[row] = decode_image(value, size=step.size, channels=step.channels, column=step.column)
    mean = np.asarray(step.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(step.std, dtype=np.float32)[:, None, None]
    return (batch - mean) / std


def category_texts(series: pd.Series) -> list[str | None]:
    """Each value as its category text; None where missing."""
    return [None if _is_missing(v) else _category_text(v) for v in series.tolist()]


def _category_text(value: object) -> str:
    """One spelling per value, so a label 1 from JSON and 1.0 from a column with NaNs agree."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _is_missing(value: object) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


def numeric_values(series: pd.Series, column: str) -> np.ndarray:
    """float64 with NaN where missing. A value that is not a number is an error, not a gap."""
    if pd.api.types.is_numeric_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        values = np.array([_number(v, column) for v in series.tolist()], dtype=np.float64)
    if np.isinf(values).any():
        raise InvalidRequest(f"column {column!r} holds an infinite value", param=column)
    return values


def _number(value: object, column: str) -> float:
    if _is_missing(value):
        return math.nan
    if isinstance(value, str):
        if not value.strip():
            return math.nan  # an empty CSV cell
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, bool | int | float | np.number | np.bool_):
        return float(value)
    raise InvalidRequest(f"column {column!r}: {value!r} is not a number", param=column)


def _text_values(series: pd.Series) -> list[str]:
    return [
        "" if _is_missing(v) else v if isinstance(v, str) else _category_text(v)
        for v in series.tolist()
    ]


def _words(text: str, lowercase: bool) -> list[str]:
    return _WORD.findall(text.lower() if lowercase else text)


def _build_vocabulary(texts: Iterable[str], *, lowercase: bool, size: int) -> list[str]:
    """Pad and unk, then the most frequent words (ties alphabetical, so fits are reproducible)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_words(text, lowercase))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [PAD_TOKEN, UNK_TOKEN, *(word for word, _ in ranked[: size - 2])]


def _word_ids(
    texts: Sequence[str], *, vocabulary: Sequence[str], lowercase: bool, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    index = {word: i for i, word in enumerate(vocabulary)}
    unk = index[UNK_TOKEN]
    rows = [[index.get(word, unk) for word in _words(text, lowercase)] for text in texts]
    return _pad(rows, max_length, pad_id=index[PAD_TOKEN])


def _wordpiece_ids(
    tokenizer: Tokenizer, texts: Sequence[str], *, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ids from a pretrained tokenizer, cut and padded to `max_length` here.

    The tokenizer is shared and may be configured to pad (MiniLM's pads to 128), so its padding is
    stripped via the attention mask rather than reconfiguring a shared object. A cut keeps the
    closing special token ([SEP], </s>) the model was trained to see last.
    """
    pad_id = int((tokenizer.padding or {}).get("pad_id", 0))
    rows = []
    for encoding in tokenizer.encode_batch(list(texts)):
        kept = [
            (i, s)
            for i, m, s in zip(
                encoding.ids, encoding.attention_mask, encoding.special_tokens_mask, strict=True
            )
            if m
        ]
        ids = [i for i, _ in kept]
        if len(ids) > max_length >= 2 and kept[-1][1]:
            ids = [*ids[: max_length - 1], ids[-1]]
        rows.append(ids)
    return _pad(rows, max_length, pad_id=pad_id)


def _pad(
    rows: Sequence[Sequence[int]], max_length: int, *, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), max_length), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), max_length), dtype=np.int64)
    for row, tokens in enumerate(rows):
        tokens = tokens[:max_length]
        ids[row, : len(tokens)] = tokens
        attention[row, : len(tokens)] = 1
    return ids, attention


def decode_image(value: object, *, size: tuple[int, int], channels: int, column: str) -> np.ndarray:
    """Encoded image bytes to float32 [channels, height, width] in [0, 1]."""
    if _is_missing(value):
        raise InvalidRequest(f"column {column!r}: an image is missing", param=column)
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if not isinstance(value, bytes):
        kind = type(value).__name__
        raise InvalidRequest(f"column {column!r}: expected image bytes, got {kind}", param=column)
    height, width = size
    try:
        with Image.open(io.BytesIO(value), formats=_IMAGE_FORMATS) as opened:
            # Phone photos store their rotation in EXIF; the pixels alone would be sideways.
            image = ImageOps.exif_transpose(opened)
            if "transparency" in image.info:
                image = image.convert("RGBA")  # Pillow warns on palette transparency otherwise
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((width, height), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(
            f"column {column!r}: cannot decode image: {exc}", param=column
        ) from exc
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels)
