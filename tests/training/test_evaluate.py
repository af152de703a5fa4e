from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError
from sklearn.metrics import roc_auc_score

from aiaas.training.evaluate import (
    ClassificationReport,
    ClassMetrics,
    EvaluationReport,
    RegressionReport,
    evaluate_classification,
    evaluate_regression,
    summary,
)

ABC = ["a", "b", "c"]


def one_hot_logits(predicted: list[int], k: int, scale: float = 3.0) -> np.ndarray:
    return np.eye(k)[predicted] * scale


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def strict_json(report: ClassificationReport | RegressionReport) -> str:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in report JSON")

    text = report.model_dump_json()
    json.loads(text, parse_constant=refuse)
    json.dumps(report.model_dump(mode="json"), allow_nan=False)
    return text


def test_perfect_predictions_score_one_everywhere() -> None:
    y = np.array([0, 1, 2, 1])
    report = evaluate_classification(y, one_hot_logits([0, 1, 2, 1], 3), ABC)

    assert report.n == 4
    assert report.accuracy == 1.0
    assert report.f1_macro == report.f1_weighted == 1.0
    assert report.per_class["b"] == ClassMetrics(precision=1, recall=1, f1=1, support=2)
    assert report.confusion_matrix == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]
    assert report.labels == ABC


def test_all_wrong_binary_predictions_score_zero() -> None:
    y = np.array([0, 0, 1, 1])
    report = evaluate_classification(y, one_hot_logits([1, 1, 0, 0], 2), ["no", "yes"])

    assert report.accuracy == 0.0
    assert report.precision_macro == report.recall_macro == report.f1_macro == 0.0
    assert report.confusion_matrix == [[0, 2], [2, 0]]
    assert report.roc_auc == 0.0


def test_known_confusion_matrix_and_per_class_values() -> None:
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    report = evaluate_classification(np.array(y_true), one_hot_logits(y_pred, 3), ABC)

    assert report.confusion_matrix == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # a: 2 of 2 predicted right, 2 of 3 found; b: 1 of 2, 1 of 2; c: 1 of 2, 1 of 1.
    expected = {"a": (1.0, 2 / 3, 0.8, 3), "b": (0.5, 0.5, 0.5, 2), "c": (0.5, 1.0, 2 / 3, 1)}
    for name, (precision, recall, f1, support) in expected.items():
        metrics = report.per_class[name]
        assert metrics.precision == pytest.approx(precision)
        assert metrics.recall == pytest.approx(recall)
        assert metrics.f1 == pytest.approx(f1)
        assert metrics.support == support
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.precision_macro == pytest.approx(2 / 3)
    assert report.recall_macro == pytest.approx(13 / 18)
    assert report.f1_macro == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert report.precision_weighted == pytest.approx((3 * 1 + 2 * 0.5 + 0.5) / 6)
    assert report.recall_weighted == pytest.approx(4 / 6)
    assert report.f1_weighted == pytest.approx((3 * 0.8 + 2 * 0.5 + 2 / 3) / 6)
    assert report.roc_auc is None


def test_loss_is_mean_cross_entropy_in_nats() -> None:
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    report = evaluate_classification(np.array(y_true), one_hot_logits(y_pred, 3), ABC)

    # With one-hot logits of 3 the predicted class gets e^3 / (e^3 + 2), the others 1 / (e^3 + 2).
    log_norm = math.log(math.exp(3) + 2)
    per_row = [log_norm - (3.0 if t == p else 0.0) for t, p in zip(y_true, y_pred, strict=True)]
    assert report.loss == pytest.approx(sum(per_row) / len(per_row))

    uniform = evaluate_classification(np.array([0, 2]), np.zeros((2, 3)), ABC)
    assert uniform.loss == pytest.approx(math.log(3))


def test_loss_is_stable_for_huge_logits() -> None:
    logits = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    report = evaluate_classification(np.array([0, 1]), logits, ["x", "y"])
    assert report.loss == pytest.approx(0.0)

    shifted = evaluate_classification(
        np.array([0, 1]), np.array([[1e4 + 1, 1e4], [1e4, 1e4]]), ["x", "y"]
    )
    plain = evaluate_classification(
        np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 0.0]]), ["x", "y"]
    )
    assert shifted.loss == pytest.approx(plain.loss)


def test_class_absent_from_test_split_still_reported() -> None:
    report = evaluate_classification(np.array([0, 1, 1]), one_hot_logits([0, 1, 1], 3), ABC)

    assert report.per_class["c"] == ClassMetrics(precision=0, recall=0, f1=0, support=0)
    assert report.confusion_matrix[2] == [0, 0, 0]
    assert [row[2] for row in report.confusion_matrix] == [0, 0, 0]
    # Macro averages count every class of the model.
    assert report.f1_macro == pytest.approx(2 / 3)
    assert report.f1_weighted == 1.0


def test_binary_roc_auc_matches_sklearn_on_probabilities() -> None:
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    logits = np.array(
        [
            [0.2, -0.1],
            [1.0, 0.5],
            [0.1, 0.9],
            [-0.3, 0.4],
            [0.0, 0.3],
            [0.5, 0.1],
            [-1.0, 2.0],
            [2.0, -2.0],
        ]
    )
    report = evaluate_classification(y, logits, ["neg", "pos"])

    assert report.roc_auc == pytest.approx(roc_auc_score(y, softmax(logits)[:, 1]))
    assert 0.0 < report.roc_auc < 1.0


def test_roc_auc_separates_rows_whose_probabilities_saturate() -> None:
    # Margins of 40 and 50 both give P(pos) == 1.0 in float64; their ranking still counts.
    logits = np.array([[0.0, -5.0], [0.0, 40.0], [0.0, 50.0]])
    report = evaluate_classification(np.array([0, 0, 1]), logits, ["neg", "pos"])

    assert softmax(logits)[1, 1] == softmax(logits)[2, 1]
    assert report.roc_auc == 1.0


def test_roc_auc_is_none_for_three_classes_and_single_class_truth() -> None:
    three = evaluate_classification(np.array([0, 1, 2]), np.eye(3), ABC)
    single = evaluate_classification(
        np.array([1, 1]), np.array([[0.0, 1.0], [1.0, 0.0]]), ["n", "p"]
    )

    assert three.roc_auc is None
    assert single.roc_auc is None
    assert "NaN" not in strict_json(single)


def test_regression_values_on_tiny_example() -> None:
    y_true = np.array([1.0, 2.0, 3.0, 4.0])
    y_pred = np.array([1.5, 2.0, 2.0, 5.0])
    report = evaluate_regression(y_true, y_pred)

    errors = y_true - y_pred
    assert report.n == 4
    assert report.mae == pytest.approx(np.abs(errors).mean()) == pytest.approx(0.625)
    assert report.rmse == pytest.approx(np.sqrt((errors**2).mean())) == pytest.approx(0.75)
    ss_tot = ((y_true - y_true.mean()) ** 2).sum()
    assert report.r2 == pytest.approx(1 - (errors**2).sum() / ss_tot) == pytest.approx(0.55)


def test_regression_accepts_column_vectors() -> None:
    flat = evaluate_regression(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 3.0]))
    column = evaluate_regression(np.array([[1.0], [2.0], [4.0]]), np.array([[1.0], [3.0], [3.0]]))
    assert column == flat


@pytest.mark.parametrize(
    ("y_true", "y_pred"),
    [([5.0, 5.0, 5.0], [5.0, 5.0, 5.0]), ([5.0, 5.0, 5.0], [4.0, 6.0, 5.0]), ([2.0], [3.0])],
)
def test_r2_is_none_when_undefined(y_true: list[float], y_pred: list[float]) -> None:
    report = evaluate_regression(np.array(y_true), np.array(y_pred))
    assert report.r2 is None
    assert "NaN" not in strict_json(report)


def test_reports_round_trip_through_json() -> None:
    adapter = TypeAdapter(EvaluationReport)
    reports = [
        evaluate_classification(
            np.array([0, 1, 1, 0]), np.array([[1, 0], [0, 2], [1, 0], [0, 1]]), ["n", "p"]
        ),
        evaluate_classification(np.array([0, 1]), one_hot_logits([0, 1], 3), ABC),
        evaluate_regression(np.array([1.0, 2.0]), np.array([1.0, 1.0])),
        evaluate_regression(np.array([3.0, 3.0]), np.array([1.0, 1.0])),
    ]
    for report in reports:
        text = strict_json(report)
        assert adapter.validate_python(report.model_dump(mode="json")) == report
        assert adapter.validate_json(text) == report


def test_reports_refuse_nan_and_inconsistent_shapes() -> None:
    with pytest.raises(ValidationError):
        ClassMetrics(precision=float("nan"), recall=0, f1=0, support=1)
    with pytest.raises(ValidationError):
        RegressionReport(n=1, mae=float("inf"), rmse=0, r2=None)
    good = evaluate_classification(np.array([0, 1]), np.eye(2), ["n", "p"]).model_dump()
    with pytest.raises(ValidationError, match="2x2"):
        ClassificationReport.model_validate({**good, "confusion_matrix": [[1, 0]]})


def test_summary_picks_headline_numbers() -> None:
    classification = evaluate_classification(np.array([0, 1]), np.eye(2), ["n", "p"])
    regression = evaluate_regression(np.array([1.0, 1.0]), np.array([2.0, 0.0]))

    assert summary(classification) == {"accuracy": 1.0, "f1_macro": 1.0, "roc_auc": 1.0}
    assert summary(regression) == {"mae": 1.0, "rmse": 1.0, "r2": None}


@pytest.mark.parametrize(
    ("y_true", "logits", "classes", "message"),
    [
        (np.array([0, 1]), np.zeros((3, 2)), ["n", "p"], "2 rows but logits have 3"),
        (np.array([0, 1]), np.zeros((2, 3)), ["n", "p"], "3 columns for 2 classes"),
        (np.array([0, 1]), np.zeros(2), ["n", "p"], r"logits must be \[n, k\]"),
        (np.array([[0, 1]]), np.zeros((1, 2)), ["n", "p"], "1-D class indices"),
        (np.array([], dtype=int), np.zeros((0, 2)), ["n", "p"], "no test rows"),
        (np.array([0, 2]), np.zeros((2, 2)), ["n", "p"], r"outside 0\.\.1"),
        (np.array([0, -1]), np.zeros((2, 2)), ["n", "p"], r"outside 0\.\.1"),
        (np.array([0.0, 1.0]), np.zeros((2, 2)), ["n", "p"], "integer class indices"),
        (np.array([0, 1]), np.array([[0.0, np.nan], [0.0, 0.0]]), ["n", "p"], "NaN or infinity"),
        (np.array([0, 1]), np.zeros((2, 2)), ["n", "n"], "unique"),
        (np.array([], dtype=int), np.zeros((0, 0)), [], "at least one class"),
    ],
)
def test_classification_input_errors(
    y_true: np.ndarray, logits: np.ndarray, classes: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_classification(y_true, logits, classes)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        (np.array([1.0, 2.0]), np.array([1.0]), "2 rows but y_pred has 1"),
        (np.array([]), np.array([]), "no test rows"),
        (np.zeros((2, 2)), np.zeros(2), r"y_true must be 1-D or \[n, 1\]"),
        (np.array([1.0, np.inf]), np.array([1.0, 2.0]), "y_true contains NaN or infinity"),
        (np.array([1.0, 2.0]), np.array([np.nan, 2.0]), "y_pred contains NaN or infinity"),
        (np.array(["1", "2"]), np.array([1.0, 2.0]), "real numbers"),
    ],
)
def test_regression_input_errors(y_true: np.ndarray, y_pred: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_regression(y_true, y_pred)
