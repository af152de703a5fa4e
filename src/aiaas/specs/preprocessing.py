"""The preprocessing spec: how a dataset's columns become model inputs, fitted once on train.

The spec is saved as JSON next to the model and applied again at serving time, so everything a
transform needs (fill values, scales, categories, vocabulary) lives in the spec itself. Fitted
fields are None until `fit` fills them from the training rows only.

Choices worth knowing:
- Booleans are categorical ("true"/"false"): JSON, parquet and CSV spell them differently, and a
  missing flag imputed as the most frequent value beats a fractional mean.
- Datetime columns get no proposed step: absolute timestamps at serving time lie outside the
  training range, so a useful date feature (weekday, age) must be derived by the user.
- Categories beyond `max_categories` share one "<other>" slot; unseen values then land there too,
  since a rare training value and a new one look alike without the full list. Without overflow
  an unseen value encodes as all zeros (one-hot) or -1 (ordinal).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from tokenizers import Tokenizer

from aiaas.errors import InvalidRequest
from aiaas.specs.features import (
    PAD_TOKEN,
    UNK_TOKEN,
    category_texts,
    encode_categorical,
    encode_images,
    encode_numeric,
    encode_text,
    fit_categorical,
    fit_image,
    fit_label,
    fit_numeric,
    fit_text,
    numeric_values,
)
from aiaas.specs.splits import SplitSpec, assign_splits
from aiaas.specs.types import SPLIT_COLUMN, ColumnType, Task

__all__ = [
    "CategoricalStep",
    "FeatureStep",
    "Features",
    "ImageStep",
    "LabelSpec",
    "NumericStep",
    "PreprocessingSpec",
    "SplitSpec",
    "TextStep",
    "assign_splits",
    "decode_labels",
    "encode_labels",
    "fit",
    "propose_spec",
    "transform",
    "unscale_targets",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NumericStep(_Model):
    kind: Literal["numeric"] = "numeric"
    column: str
    impute: Literal["mean", "median", "constant"] = "median"
    fill_value: float | None = None
    standardize: bool = True
    fill: float | None = None  # fitted
    mean: float | None = None  # fitted when standardize
    std: float | None = Field(None, gt=0)  # fitted when standardize

    @model_validator(mode="after")
    def _constant_needs_value(self) -> NumericStep:
        if self.impute == "constant" and self.fill_value is None:
            raise ValueError(f"{self.column}: impute 'constant' needs a fill_value")
        return self

    def is_fitted(self) -> bool:
        scaled = self.mean is not None and self.std is not None
        return self.fill is not None and (scaled or not self.standardize)


class CategoricalStep(_Model):
    kind: Literal["categorical"] = "categorical"
    column: str
    impute: Literal["most_frequent", "constant"] = "most_frequent"
    fill_value: str | None = None
    encoding: Literal["onehot", "ordinal"] = "onehot"
    max_categories: PositiveInt = 50
    categories: list[str] | None = None  # fitted, sorted; the most frequent max_categories
    fill: str | None = None  # fitted; None only when the training column was all missing
    other: bool = False  # fitted: training had more categories than max_categories

    @model_validator(mode="after")
    def _constant_needs_value(self) -> CategoricalStep:
        if self.impute == "constant" and self.fill_value is None:
            raise ValueError(f"{self.column}: impute 'constant' needs a fill_value")
        return self

    def is_fitted(self) -> bool:
        return self.categories is not None


class TextStep(_Model):
    kind: Literal["text"] = "text"
    column: str
    tokenizer: Literal["word", "wordpiece"] = "word"
    lowercase: bool = True  # word only: a pretrained tokenizer's own normaliser decides case
    max_length: PositiveInt = 128
    vocab_size: int = Field(20000, ge=3)  # counts pad and unk
    vocabulary: list[str] | None = None  # fitted for "word": pad, unk, most frequent first
    tokenizer_ref: str | None = None  # for "wordpiece": the name `transform` looks up

    @model_validator(mode="after")
    def _check(self) -> TextStep:
        if self.tokenizer == "wordpiece" and not self.tokenizer_ref:
            raise ValueError(f"{self.column}: tokenizer 'wordpiece' needs a tokenizer_ref")
        if self.vocabulary is not None and self.vocabulary[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise ValueError(f"{self.column}: a vocabulary starts with pad and unk")
        return self

    def is_fitted(self) -> bool:
        return self.tokenizer == "wordpiece" or self.vocabulary is not None


class ImageStep(_Model):
    kind: Literal["image"] = "image"
    column: str
    size: tuple[PositiveInt, PositiveInt] = (32, 32)  # height, width
    channels: Literal[1, 3] = 3
    mean: list[float] | None = None  # per channel; given, or fitted on train
    std: list[float] | None = None

    @model_validator(mode="after")
    def _per_channel(self) -> ImageStep:
        for name, stats in (("mean", self.mean), ("std", self.std)):
            if stats is not None and len(stats) != self.channels:
                raise ValueError(f"{self.column}: {name} needs {self.channels} values")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"{self.column}: std must be positive")
        return self

    def is_fitted(self) -> bool:
        return self.mean is not None and self.std is not None


FeatureStep = Annotated[
    NumericStep | CategoricalStep | TextStep | ImageStep, Field(discriminator="kind")
]


class LabelSpec(_Model):
    column: str
    task: Task
    classes: list[str] | None = None  # fitted for classification, sorted
    standardize: bool = False  # regression only
    mean: float | None = None  # fitted when standardize
    std: float | None = Field(None, gt=0)

    def is_fitted(self) -> bool:
        if self.task is Task.CLASSIFICATION:
            return self.classes is not None
        return not self.standardize or (self.mean is not None and self.std is not None)


class PreprocessingSpec(_Model):
    version: Literal[1] = 1
    features: list[FeatureStep]
    label: LabelSpec | None = None
    split: SplitSpec = Field(default_factory=SplitSpec)
    fitted: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessingSpec:
        columns = [step.column for step in self.features]
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ValueError(f"columns with more than one step: {repeated}")
        if self.label is not None and self.label.column in columns:
            raise ValueError(f"label column {self.label.column!r} cannot also be a feature")
        if sum(isinstance(step, ImageStep) for step in self.features) > 1:
            raise ValueError("at most one image column")
        if self.fitted:
            unfitted = [s.column for s in self.features if not s.is_fitted()]
            if self.label is not None and not self.label.is_fitted():
                unfitted.append(self.label.column)
            if unfitted:
                raise ValueError(f"marked fitted, but these columns are not: {unfitted}")
        return self


@dataclass(frozen=True)
class Features:
    """Model inputs for n rows; tabular is numeric and categorical columns in spec order."""

    tabular: np.ndarray | None  # float32 [n, d]
    tabular_names: list[str]
    tokens: dict[str, np.ndarray] = field(default_factory=dict)  # int64 [n, max_length]
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    images: np.ndarray | None = None  # float32 [n, channels, height, width]


def propose_spec(
    columns: Sequence[tuple[str, ColumnType]],
    *,
    label: str | None,
    task: Task | None,
    split: SplitSpec | None = None,
) -> PreprocessingSpec:
    """Defaults per column type. Without a task, a float label means regression."""
    types = dict(columns)
    label_spec = None
    if label is not None:
        if label not in types:
            raise InvalidRequest(f"label column {label!r} is not in the dataset", param="label")
        task = task or (
            Task.REGRESSION if types[label] is ColumnType.FLOAT else Task.CLASSIFICATION
        )
        numeric = (ColumnType.INTEGER, ColumnType.FLOAT, ColumnType.BOOLEAN)
        if types[label] is ColumnType.IMAGE or (
            task is Task.REGRESSION and types[label] not in numeric
        ):
            raise InvalidRequest(f"a {types[label]} column cannot be a {task} label", param="label")
        label_spec = LabelSpec(column=label, task=task)
    steps = [
        step
        for name, kind in columns
        if name not in (label, SPLIT_COLUMN) and (step := _default_step(name, kind)) is not None
    ]
    if sum(isinstance(step, ImageStep) for step in steps) > 1:
        raise InvalidRequest("a dataset can have one image column", param="columns")
    if split is None:
        split = SplitSpec(stratify=label_spec is not None and task is Task.CLASSIFICATION)
    return PreprocessingSpec(features=steps, label=label_spec, split=split)


def _default_step(name: str, kind: ColumnType) -> FeatureStep | None:
    match kind:
        case ColumnType.INTEGER | ColumnType.FLOAT:
            return NumericStep(column=name)
        case ColumnType.BOOLEAN | ColumnType.CATEGORICAL:
            return CategoricalStep(column=name)
        case ColumnType.TEXT:
            return TextStep(column=name)
        case ColumnType.IMAGE:
            return ImageStep(column=name)
        case _:
            return None  # datetime: see the module docstring


def fit(spec: PreprocessingSpec, train: pd.DataFrame) -> PreprocessingSpec:
    """A copy of `spec` with every fitted field computed from `train` (the training rows only)."""
    _require_columns(spec, train, with_label=True)
    if len(train) == 0:
        raise InvalidRequest("cannot fit preprocessing on an empty training split", param="split")
    steps = [_fit_step(step, train[step.column]) for step in spec.features]
    label = fit_label(spec.label, train[spec.label.column]) if spec.label else None
    return PreprocessingSpec(
        version=spec.version, features=steps, label=label, split=spec.split, fitted=True
    )


def _fit_step(step: FeatureStep, column: pd.Series) -> FeatureStep:
    match step:
        case NumericStep():
            return fit_numeric(step, column)
        case CategoricalStep():
            return fit_categorical(step, column)
        case TextStep():
            return fit_text(step, column)
        case ImageStep():
            return fit_image(step, column)


def transform(
    spec: PreprocessingSpec,
    frame: pd.DataFrame,
    *,
    tokenizers: Mapping[str, Tokenizer] | None = None,
) -> Features:
    """Model inputs for every row of `frame`; a row's result never depends on the other rows."""
    if not spec.fitted:
        raise InvalidRequest("the preprocessing spec has not been fitted", param="spec")
    _require_columns(spec, frame, with_label=False)
    blocks: list[np.ndarray] = []
    names: list[str] = []
    tokens: dict[str, np.ndarray] = {}
    attention: dict[str, np.ndarray] = {}
    images = None
    for step in spec.features:
        column = frame[step.column]
        match step:
            case NumericStep():
                blocks.append(encode_numeric(step, column))
                names.append(step.column)
            case CategoricalStep():
                block, block_names = encode_categorical(step, column)
                blocks.append(block)
                names.extend(block_names)
            case TextStep():
                tokens[step.column], attention[step.column] = encode_text(step, column, tokenizers)
            case ImageStep():
                images = encode_images(step, column)
    tabular = np.concatenate(blocks, axis=1) if blocks else None
    return Features(tabular, names, tokens=tokens, attention=attention, images=images)


def encode_labels(spec: PreprocessingSpec, series: pd.Series) -> np.ndarray:
    """Class indices (int64) for classification, targets (float32) for regression."""
    label = _fitted_label(spec)
    if label.task is Task.REGRESSION:
        targets = numeric_values(series, label.column)
        if np.isnan(targets).any():
            raise InvalidRequest(f"label {label.column!r} has missing values", param=label.column)
        if label.standardize:
            targets = (targets - label.mean) / label.std
        return targets.astype(np.float32)
    index = {c: i for i, c in enumerate(label.classes or [])}
    codes = np.empty(len(series), dtype=np.int64)
    for row, text in enumerate(category_texts(series)):
        if text not in index:
            what = "a missing label" if text is None else f"label {text!r}, unseen in training"
            raise InvalidRequest(f"row {row}: {what}", param=label.column)
        codes[row] = index[text]
    return codes


def decode_labels(spec: PreprocessingSpec, indices: Sequence[int] | np.ndarray) -> list[str]:
    """Class names for class indices (classification; see `unscale_targets` for regression)."""
    label = _fitted_label(spec)
    if label.task is not Task.CLASSIFICATION:
        raise InvalidRequest("regression targets have no classes", param=label.column)
    classes = label.classes or []
    names = []
    for index in indices:
        if not 0 <= int(index) < len(classes):
            raise InvalidRequest(
                f"class index {index} is outside 0..{len(classes) - 1}", param=label.column
            )
        names.append(classes[int(index)])
    return names


def unscale_targets(spec: PreprocessingSpec, predicted: np.ndarray) -> np.ndarray:
    """Regression predictions back in the label's own units."""
    label = _fitted_label(spec)
    predicted = np.asarray(predicted, dtype=np.float64)
    return predicted * label.std + label.mean if label.standardize else predicted


def _fitted_label(spec: PreprocessingSpec) -> LabelSpec:
    if spec.label is None or not spec.label.is_fitted():
        raise InvalidRequest("the preprocessing spec has no fitted label", param="label")
    return spec.label


def _require_columns(spec: PreprocessingSpec, frame: pd.DataFrame, *, with_label: bool) -> None:
    needed = [step.column for step in spec.features]
    if with_label and spec.label is not None:
        needed.append(spec.label.column)
    for column in needed:
        if column not in frame.columns:
            raise InvalidRequest(f"column {column!r} is missing", param=column)
