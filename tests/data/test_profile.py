"""Profiling: column types, label and task inference, and a profile that is always valid JSON."""

from __future__ import annotations

import io
import json
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aiaas.data.profile import DatasetProfile, profile_table, schema_columns
from aiaas.data.readers import DataFormat, ReadLimits, ZipLimits, read_image_zip, read_table
from aiaas.errors import InvalidRequest
from aiaas.specs.types import ColumnType, Task

REVIEWS = [
    "this product is really great and works",
    "terrible, do not buy it at all",
    "okay I guess for the price paid",
    "works well and I would buy again",
    "arrived broken and support never answered",
    "exactly what I needed for my garden",
]


def mixed_csv() -> bytes:
    """12 rows: ints with gaps, floats, booleans, categories, free text, ISO dates, a label."""
    lines = ["id,age,score,active,color,review,joined,note,Label"]
    for i in range(12):
        age = "" if i in (1, 7) else str(20 + 3 * i)
        score = "" if i == 4 else f"{i * 0.75 + 0.1:.2f}"
        active = "" if i == 5 else ("true" if i % 2 else "false")
        color = ["red", "green", "blue"][i % 3]
        review = f'"{REVIEWS[i % 6]} #{i}"'
        joined = "" if i == 9 else f"2021-{i % 12 + 1:02d}-{i + 10:02d}"
        note = "unknown" if i % 4 == 0 else str(i % 3)  # numbers mixed with a string
        label = "spam" if i % 3 == 0 else "ham"
        lines.append(f"{i},{age},{score},{active},{color},{review},{joined},{note},{label}")
    return ("\n".join(lines) + "\n").encode()


def by_name(profile: DatasetProfile) -> dict[str, object]:
    return {column.name: column for column in profile.columns}


def dumps(profile: DatasetProfile) -> str:
    return json.dumps(profile.model_dump(mode="json"), allow_nan=False)


def test_mixed_csv_types_missing_label_and_balance() -> None:
    frame = read_table(mixed_csv(), DataFormat.CSV, ReadLimits())
    profile = profile_table(frame, label=None, task=None)
    assert profile.rows == 12
    assert schema_columns(profile) == [
        ("id", ColumnType.INTEGER),
        ("age", ColumnType.INTEGER),  # stored as float because of the gaps
        ("score", ColumnType.FLOAT),
        ("active", ColumnType.BOOLEAN),
        ("color", ColumnType.CATEGORICAL),
        ("review", ColumnType.TEXT),
        ("joined", ColumnType.DATETIME),
        ("note", ColumnType.CATEGORICAL),  # numbers mixed with "unknown": as strings
        ("Label", ColumnType.CATEGORICAL),
    ]
    columns = by_name(profile)
    assert {name: c.missing for name, c in columns.items()} == {
        "id": 0,
        "age": 2,
        "score": 1,
        "active": 1,
        "color": 0,
        "review": 0,
        "joined": 1,
        "note": 0,
        "Label": 0,
    }
    assert columns["age"].dtype == "float64"
    assert columns["age"].unique == 10
    assert profile.label == "Label"  # matched case-insensitively
    assert profile.task is Task.CLASSIFICATION
    assert profile.class_balance == {"ham": 8, "spam": 4}
    dumps(profile)


def test_numeric_categorical_text_and_date_stats() -> None:
    frame = read_table(mixed_csv(), DataFormat.CSV, ReadLimits())
    columns = by_name(profile_table(frame, label=None, task=None))
    age = columns["age"].stats
    assert (age["min"], age["max"]) == (20, 53)
    assert isinstance(age["min"], int)
    assert set(age) == {"min", "max", "mean", "std", "p25", "p50", "p75"}
    assert columns["color"].stats == {"top": {"red": 4, "green": 4, "blue": 4}}
    assert columns["active"].stats == {"top": {"False": 6, "True": 5}}
    review = columns["review"].stats
    assert review["max_words"] == 8 and review["mean_words"] > 4
    assert columns["joined"].stats == {"min": "2021-01-10T00:00:00", "max": "2021-12-21T00:00:00"}
    assert columns["note"].stats["top"]["unknown"] == 3


def test_preview_is_json_safe_and_truncated() -> None:
    frame = pd.DataFrame(
        {
            "n": pd.Series([1.0, np.nan, 3.0]),
            "x": [np.inf, -np.inf, np.float32(0.5)],
            "big": np.array([1, 2, 3], dtype=np.int64),
            "when": pd.to_datetime(["2020-01-01", None, "2020-01-03"]),
            "long": ["y" * 500, None, "short"],
            "img": [png_bytes(), b"\x00\x01binary", None],
            "messages": pd.Series([[{"role": "user", "content": "hi"}], [], None], dtype=object),
        }
    )
    profile = profile_table(frame, label=None, task=None, preview_rows=2)
    text = dumps(profile)  # raises on NaN or inf
    assert len(profile.preview) == 2
    first, second = profile.preview
    assert first["n"] == 1 and isinstance(first["n"], int)
    assert second["n"] is None
    assert first["x"] is None and second["x"] is None
    assert first["when"] == "2020-01-01T00:00:00" and second["when"] is None
    assert first["long"] == "y" * 200 + "…"
    assert first["img"] == f"<image/png {len(png_bytes())} bytes>"
    assert second["img"] == "<binary 8 bytes>"
    assert first["messages"] == [{"role": "user", "content": "hi"}]
    assert "NaN" not in text and "Infinity" not in text
    columns = by_name(profile)
    assert columns["x"].type is ColumnType.FLOAT
    assert columns["x"].stats["max"] == 0.5 and columns["x"].stats["infinite"] == 2
    assert columns["img"].type is ColumnType.IMAGE
    assert columns["messages"].type is ColumnType.TEXT


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1, 2, 1, 3, 2, 1] * 5, Task.CLASSIFICATION),  # few integers
        (list(range(30)), Task.REGRESSION),  # many integers
        ([0.5, 1.25, 3.5, 2.0, 7.75, 0.1], Task.REGRESSION),  # floats
        ([True, False, True, True], Task.CLASSIFICATION),
        (["a", "b", "a", "c"] * 3, Task.CLASSIFICATION),
    ],
)
def test_task_is_inferred_from_the_label(values: list[object], expected: Task) -> None:
    frame = pd.DataFrame({"feature": range(len(values)), "target": values})
    profile = profile_table(frame, label=None, task=None)
    assert profile.label == "target"
    assert profile.task is expected
    assert (profile.class_balance is not None) == (expected is Task.CLASSIFICATION)


def test_class_balance_of_integers_stored_as_float() -> None:
    frame = pd.DataFrame({"y": [1.0, 0.0, 1.0, np.nan, 1.0]})
    profile = profile_table(frame, label=None, task=None)
    assert profile.task is Task.CLASSIFICATION
    assert profile.class_balance == {"1": 3, "0": 1}


def test_label_names_are_tried_in_order() -> None:
    frame = pd.DataFrame({"y": [1, 2], "CLASS": ["a", "b"], "x": [0, 1]})
    assert profile_table(frame, label=None, task=None).label == "CLASS"
    assert profile_table(frame[["x"]], label=None, task=None).label is None
    assert profile_table(frame[["x"]], label=None, task=None).task is None


def test_free_text_label_with_many_values_has_no_inferred_task() -> None:
    frame = pd.DataFrame({"label": [f"sentence number {i} is here" for i in range(1200)]})
    profile = profile_table(frame, label=None, task=None)
    assert profile.columns[0].type is ColumnType.TEXT
    assert profile.task is None


def test_unknown_label_column_is_400() -> None:
    frame = pd.DataFrame({"a": [1, 2]})
    with pytest.raises(InvalidRequest) as caught:
        profile_table(frame, label="nope", task=None)
    assert (caught.value.status, caught.value.param) == (400, "label_column")
    assert "'nope'" in caught.value.message and "'a'" in caught.value.message


def test_task_without_a_label_is_400() -> None:
    with pytest.raises(InvalidRequest) as caught:
        profile_table(pd.DataFrame({"a": [1, 2]}), label=None, task=Task.REGRESSION)
    assert caught.value.param == "label_column"


def test_classification_on_a_continuous_float_is_400() -> None:
    frame = pd.DataFrame({"price": np.linspace(0.5, 99.5, 50)})
    with pytest.raises(InvalidRequest) as caught:
        profile_table(frame, label="price", task=Task.CLASSIFICATION)
    assert (caught.value.status, caught.value.param) == (400, "task")
    assert "50 distinct values" in caught.value.message and "regression" in caught.value.message


def test_regression_on_a_categorical_label_is_400() -> None:
    frame = pd.DataFrame({"kind": ["a", "b", "a", "b"]})
    with pytest.raises(InvalidRequest) as caught:
        profile_table(frame, label="kind", task=Task.REGRESSION)
    assert (caught.value.status, caught.value.param) == (400, "task")
    assert "numeric" in caught.value.message and "categorical" in caught.value.message


def test_given_task_is_kept_when_valid() -> None:
    frame = pd.DataFrame({"stars": [1, 2, 3, 4, 5] * 4})
    assert profile_table(frame, label="stars", task=Task.REGRESSION).task is Task.REGRESSION
    classified = profile_table(frame, label="stars", task=Task.CLASSIFICATION)
    assert classified.class_balance == {str(n): 4 for n in range(1, 6)}


def test_categorical_and_text_boundaries() -> None:
    rng = np.random.default_rng(1)
    cities = [f"city{i}" for i in range(200)]
    frame = pd.DataFrame(
        {
            "city": rng.choice(cities, 2000),  # many values, but they repeat
            "user": [f"user{i}" for i in range(2000)],  # short and all distinct
            "code": rng.choice(["A", "B"], 2000),
        }
    )
    types = dict(schema_columns(profile_table(frame, label=None, task=None)))
    assert types == {
        "city": ColumnType.CATEGORICAL,
        "user": ColumnType.TEXT,
        "code": ColumnType.CATEGORICAL,
    }


def test_short_strings_are_not_mistaken_for_dates() -> None:
    frame = pd.DataFrame({"month": ["May", "June", "May", "July"] * 3, "year": ["2020"] * 12})
    types = dict(schema_columns(profile_table(frame, label=None, task=None)))
    assert types == {"month": ColumnType.CATEGORICAL, "year": ColumnType.CATEGORICAL}


def png_bytes(size: tuple[int, int] = (6, 4), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_zip_profile() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat/1.png", png_bytes((6, 4)))
        archive.writestr("cat/2.png", png_bytes((8, 8), "blue"))
        archive.writestr("dog/1.png", png_bytes((3, 5), "green"))
    frame = read_image_zip(buffer.getvalue(), ZipLimits())
    profile = profile_table(frame, label=None, task=None)
    assert profile.label == "label"
    assert profile.task is Task.CLASSIFICATION
    assert profile.class_balance == {"cat": 2, "dog": 1}
    image = by_name(profile)["image"]
    assert image.type is ColumnType.IMAGE
    assert image.stats["formats"] == {"png": 3}
    assert (image.stats["min_width"], image.stats["max_width"]) == (3, 8)
    assert (image.stats["min_height"], image.stats["max_height"]) == (4, 8)
    assert profile.preview[0]["image"].startswith("<image/png ")
    dumps(profile)


def test_image_label_is_400() -> None:
    frame = pd.DataFrame({"image": [png_bytes(), png_bytes()], "x": [1, 2]})
    with pytest.raises(InvalidRequest) as caught:
        profile_table(frame, label="image", task=None)
    assert caught.value.param == "label_column"


def test_profiles_100k_rows_by_20_columns_quickly() -> None:
    rng = np.random.default_rng(0)
    rows = 100_000
    words = np.array(["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"])
    columns: dict[str, object] = {}
    for i in range(5):
        columns[f"int{i}"] = rng.integers(0, 1000, rows)
        columns[f"float{i}"] = rng.normal(size=rows)
    for i in range(3):
        columns[f"cat{i}"] = rng.choice(["north", "south", "east", "west"], rows)
    columns["flag"] = rng.random(rows) > 0.5
    columns["city"] = rng.choice([f"city {i}" for i in range(300)], rows)
    columns["price"] = np.round(rng.gamma(2.0, 10.0, rows), 2)
    columns["gappy"] = np.where(rng.random(rows) < 0.1, np.nan, rng.integers(0, 9, rows))
    columns["text"] = [" ".join(rng.choice(words, 8)) for _ in range(rows)]
    columns["when"] = pd.date_range("2020-01-01", periods=rows, freq="min").strftime("%Y-%m-%d")
    columns["label"] = rng.choice(["yes", "no"], rows)
    frame = read_table(pd.DataFrame(columns).to_csv(index=False).encode(), DataFormat.CSV)
    assert frame.shape == (rows, 20)
    started = time.perf_counter()
    profile = profile_table(frame, label=None, task=None)
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"profiling took {elapsed:.2f}s"
    types = dict(schema_columns(profile))
    assert types["gappy"] is ColumnType.INTEGER
    assert types["text"] is ColumnType.TEXT
    assert types["when"] is ColumnType.DATETIME
    assert profile.task is Task.CLASSIFICATION
    dumps(profile)
