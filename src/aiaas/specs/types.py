"""The vocabulary shared by dataset readers, profiling and preprocessing."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["IMAGE_COLUMN", "LABEL_COLUMN", "SPLIT_COLUMN", "ColumnType", "Split", "Task"]

# The canonical columns of an image dataset: the image's encoded bytes and its class folder.
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
# Each stored dataset version carries its train/validation/test assignment in this column.
SPLIT_COLUMN = "__split__"


class ColumnType(StrEnum):
    INTEGER = "integer"
    FLOAT = "float"
    BOOLEAN = "boolean"
    CATEGORICAL = "categorical"  # few distinct strings
    TEXT = "text"  # free text
    DATETIME = "datetime"
    IMAGE = "image"  # encoded image bytes (PNG, JPEG, ...)


class Task(StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class Split(StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"
