"""The final evaluation of a trained model on the test split.

The report is stored with the registered model version and shown through the API, so every value
is JSON-safe: the models refuse NaN and infinity, and a metric that is undefined is None.
Bad inputs are bugs in the caller (the trainer), so they raise a plain ValueError.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
    roc_auc_score,
)

__all__ = [
    "ClassMetrics",
    "ClassificationReport",
    "EvaluationReport",
    "RegressionReport",
    "evaluate_classification",
    "evaluate_regression",
    "summary",
]

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class ClassMetrics(BaseModel):
    model_config = _STRICT

    precision: float = Field(ge=0, le=1)
    recall: float = Field(ge=0, le=1)
    f1: float = Field(ge=0, le=1)
    support: int = Field(ge=0)


class ClassificationReport(BaseModel):
    """Macro averages count every class of the model, including those absent from the test split."""

    model_config = _STRICT

    task: Literal["classification"] = "classification"
    n: int = Field(gt=0)
    loss: float | None  # mean cross-entropy of the logits (natural log)
    accuracy: float = Field(ge=0, le=1)
    precision_macro: float = Field(ge=0, le=1)
    recall_macro: float = Field(ge=0, le=1)
    f1_macro: float = Field(ge=0, le=1)
    precision_weighted: float = Field(ge=0, le=1)
    recall_weighted: float = Field(ge=0, le=1)
    f1_weighted: float = Field(ge=0, le=1)
    per_class: dict[str, ClassMetrics]
    labels: list[str]  # row and column order of the confusion matrix: the model's classes
    confusion_matrix: list[list[int]]  # rows are true classes, columns predicted ones
    roc_auc: float | None  # binary tasks only, with both classes present in the test split

    @model_validator(mode="after")
    def _consistent(self) -> ClassificationReport:
        k = len(self.labels)
        if sorted(self.per_class) != sorted(self.labels):
            raise ValueError("per_class must have exactly one entry per label")
        if len(self.confusion_matrix) != k or any(len(row) != k for row in self.confusion_matrix):
            raise ValueError(f"confusion_matrix must be {k}x{k} for {k} labels")
        return self


class RegressionReport(BaseModel):
    """Errors are in the label's own units."""

    model_config = _STRICT

    task: Literal["regression"] = "regression"
    n: int = Field(gt=0)
    mae: float = Field(ge=0)
    rmse: float = Field(ge=0)
    r2: float | None  # None when undefined: fewer than two rows or a constant target


EvaluationReport = Annotated[ClassificationReport | RegressionReport, Field(discriminator="task")]


def evaluate_classification(
    y_true: np.ndarray, logits: np.ndarray, classes: list[str]
) -> ClassificationReport:
    """Score argmax predictions of `logits` [n, k] against class indices `y_true` [n]."""
    y_true, logits = _check_classification(y_true, logits, classes)
    k = len(classes)
    labels = list(range(k))
    y_pred = logits.argmax(axis=1)

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    averages = {
        average: precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )[:3]
        for average in ("macro", "weighted")
    }
    per_class = {
        name: ClassMetrics(
            precision=float(precision[i]),
            recall=float(recall[i]),
            f1=float(f1[i]),
            support=int(support[i]),
        )
        for i, name in enumerate(classes)
    }
    log_probs = _log_softmax(logits)
    loss = -float(log_probs[np.arange(len(y_true)), y_true].mean())

    return ClassificationReport(
        n=len(y_true),
        # Only logits spanning more than the float64 range overflow; report no loss then.
        loss=loss if math.isfinite(loss) else None,
        accuracy=float(accuracy_score(y_true, y_pred)),
        precision_macro=float(averages["macro"][0]),
        recall_macro=float(averages["macro"][1]),
        f1_macro=float(averages["macro"][2]),
        precision_weighted=float(averages["weighted"][0]),
        recall_weighted=float(averages["weighted"][1]),
        f1_weighted=float(averages["weighted"][2]),
        per_class=per_class,
        labels=list(classes),
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        roc_auc=_binary_roc_auc(y_true, logits),
    )


def evaluate_regression(y_true: np.ndarray, y_pred: np.ndarray) -> RegressionReport:
    """Score predictions against targets, both 1-D (or [n, 1]) in the label's own units."""
    y_true = _regression_column(y_true, "y_true")
    y_pred = _regression_column(y_pred, "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} rows but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no test rows")

    mae = float(mean_absolute_error(y_true, y_pred))
    rmse = math.sqrt(float(mean_squared_error(y_true, y_pred)))
    if not (math.isfinite(mae) and math.isfinite(rmse)):
        raise ValueError(f"errors overflow float64 (mae {mae}, rmse {rmse})")
    r2: float | None = None
    if len(y_true) >= 2 and np.ptp(y_true) > 0:
        # force_finite=False: a tiny target spread can still underflow; that is None, not 0.
        r2 = float(r2_score(y_true, y_pred, force_finite=False))
        if not math.isfinite(r2):
            r2 = None
    return RegressionReport(n=len(y_true), mae=mae, rmse=rmse, r2=r2)


def summary(report: EvaluationReport) -> dict[str, float | None]:
    """The headline numbers for a job's final event."""
    if isinstance(report, ClassificationReport):
        return {"accuracy": report.accuracy, "f1_macro": report.f1_macro, "roc_auc": report.roc_auc}
    return {"mae": report.mae, "rmse": report.rmse, "r2": report.r2}


def _check_classification(
    y_true: np.ndarray, logits: np.ndarray, classes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    logits = np.asarray(logits)
    k = len(classes)
    if k == 0:
        raise ValueError("a classifier needs at least one class")
    if len(set(classes)) != k:
        raise ValueError(f"class names must be unique, got {classes}")
    if y_true.ndim != 1:
        raise ValueError(f"y_true must be 1-D class indices, got shape {y_true.shape}")
    if y_true.size and not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be [n, k], got shape {logits.shape}")
    if logits.shape[0] != len(y_true):
        raise ValueError(f"y_true has {len(y_true)} rows but logits have {logits.shape[0]}")
    if logits.shape[1] != k:
        raise ValueError(f"logits have {logits.shape[1]} columns for {k} classes")
    if len(y_true) == 0:
        raise ValueError("no test rows")
    if not np.issubdtype(logits.dtype, np.number) or np.issubdtype(
        logits.dtype, np.complexfloating
    ):
        raise ValueError(f"logits must be real numbers, got dtype {logits.dtype}")
    logits = logits.astype(np.float64)
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinity")
    if y_true.min() < 0 or y_true.max() >= k:
        raise ValueError(
            f"y_true holds class indices {y_true.min()}..{y_true.max()}, outside 0..{k - 1}"
        )
    return y_true.astype(np.int64), logits


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _binary_roc_auc(y_true: np.ndarray, logits: np.ndarray) -> float | None:
    if logits.shape[1] != 2 or len(np.unique(y_true)) != 2:
        return None
    # The margin ranks rows exactly as P(class 1) does, without ties from a saturated softmax.
    margin = logits[:, 1] - logits[:, 0]
    return float(roc_auc_score(y_true, margin))


def _regression_column(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D or [n, 1], got shape {values.shape}")
    if values.size and (
        not np.issubdtype(values.dtype, np.number)
        or np.issubdtype(values.dtype, np.complexfloating)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {values.dtype}")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return values
