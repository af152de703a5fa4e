from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from PIL import Image
from pydantic import ValidationError
from tokenizers import Tokenizer

from aiaas.engines.embeddings.export import minilm_l6_v2_dir
from aiaas.errors import InvalidRequest
from aiaas.specs.preprocessing import (
    CategoricalStep,
    ImageStep,
    LabelSpec,
    NumericStep,
    PreprocessingSpec,
    TextStep,
    fit,
    transform,
)
from aiaas.specs.shapes import (
    ARCHITECTURES,
    INPUT_NAMES,
    ArchitectureOptions,
    InputShape,
    check_compatible,
    input_shape,
    model_inputs,
)
from aiaas.specs.types import Task
from aiaas.training.architectures import Network, build_model
from aiaas.training.export import ExportError, example_inputs, export_onnx, verify_onnx

MINILM = "all-minilm-l6-v2"
SMALL = ArchitectureOptions(
    hidden_sizes=[16], embedding_dim=16, hidden_size=8, num_layers=1, num_heads=2, channels=[4, 8]
)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def mixed_frame(n: int = 10) -> pd.DataFrame:
    colors = ["red", "green", "blue", "cyan", None]
    return pd.DataFrame(
        {
            "age": [float(i * 7 % 40) if i % 4 else None for i in range(n)],
            "color": [colors[i % 5] for i in range(n)],
            "size": [["s", "m", "l"][i % 3] for i in range(n)],
            "review": [f"good product number {i}" if i % 3 else "bad" for i in range(n)],
            "note": ["second text column" for _ in range(n)],
            "photo": [png((i * 20, 100, 200 - i * 10), (6 + i, 5)) for i in range(n)],
            "y": [["a", "b", "c"][i % 3] for i in range(n)],
            "price": [float(i) / 3 for i in range(n)],
        }
    )


def mixed_spec(task: Task = Task.CLASSIFICATION) -> PreprocessingSpec:
    return PreprocessingSpec(
        features=[
            NumericStep(column="age"),
            CategoricalStep(column="color", max_categories=2),  # two kept + "<other>"
            CategoricalStep(column="size", encoding="ordinal"),
            TextStep(column="review", max_length=6),
            TextStep(column="note", max_length=3),
            ImageStep(column="photo", size=(8, 6)),
        ],
        label=LabelSpec(column="y" if task is Task.CLASSIFICATION else "price", task=task),
    )


def word_shape(tabular_dim: int = 3, n_outputs: int = 2) -> InputShape:
    return InputShape(tabular_dim, "review", 30, 7, "word", None, n_outputs)


def shape_for(name: str, n_outputs: int = 3) -> InputShape:
    """A small input shape each architecture accepts; all but mlp get tabular columns too."""
    if name == "mlp":
        return InputShape(5, None, None, None, None, None, n_outputs)
    if name == "cnn":
        return InputShape(2, None, None, None, None, (3, 8, 6), n_outputs)
    if name == MINILM:
        return InputShape(2, "review", None, 9, "wordpiece", None, n_outputs)
    return word_shape(tabular_dim=2, n_outputs=n_outputs)


def build(name: str, shape: InputShape, seed: int = 0) -> Network:
    torch.manual_seed(seed)
    pretrained = minilm_l6_v2_dir() if name == MINILM else None
    options = ArchitectureOptions(hidden_sizes=[16]) if name == MINILM else SMALL
    return build_model(name, shape, options, pretrained_dir=pretrained)


def run(model: Network, arrays: dict[str, np.ndarray]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*(torch.from_numpy(arrays[name]) for name in model.input_names))


ALL = [
    pytest.param(name, marks=pytest.mark.slow) if name == MINILM else name for name in ARCHITECTURES
]


# input_shape


def test_input_shape_matches_what_transform_produces() -> None:
    frame = mixed_frame()
    spec = fit(mixed_spec(), frame)
    features = transform(spec, frame)
    shape = input_shape(spec)
    assert features.tabular is not None and features.images is not None
    assert shape.tabular_dim == features.tabular.shape[1] == 1 + 3 + 1
    assert shape.text_column == "review"  # the first text column
    assert shape.text_vocab_size == len(spec.features[3].vocabulary or [])
    assert shape.text_length == features.tokens["review"].shape[1] == 6
    assert shape.text_tokenizer == "word"
    assert shape.image_shape == features.images.shape[1:] == (3, 8, 6)
    assert shape.n_outputs == 3
    assert features.tokens["review"].max() < shape.text_vocab_size


def test_regression_has_one_output_and_data_without_text_or_images_has_none() -> None:
    frame = mixed_frame()
    spec = fit(
        PreprocessingSpec(
            features=[NumericStep(column="age")],
            label=LabelSpec(column="price", task=Task.REGRESSION),
        ),
        frame,
    )
    assert input_shape(spec) == InputShape(1, None, None, None, None, None, 1)


def test_input_shape_needs_a_fitted_spec_with_a_label() -> None:
    with pytest.raises(InvalidRequest, match="fitted"):
        input_shape(mixed_spec())
    frame = mixed_frame()
    unlabelled = fit(PreprocessingSpec(features=[NumericStep(column="age")]), frame)
    with pytest.raises(InvalidRequest) as caught:
        input_shape(unlabelled)
    assert caught.value.param == "label"


# check_compatible and options


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("resnet", word_shape(), "choose one of: mlp, cnn"),
        ("cnn", word_shape(), "needs an image column"),
        ("mlp", word_shape(tabular_dim=0), "numeric or categorical"),
        ("lstm", InputShape(3, None, None, None, None, (3, 8, 8), 2), "needs a text column"),
        ("lstm", InputShape(0, "t", None, 8, "wordpiece", None, 2), "needs tokenizer 'word'"),
        ("transformer-encoder", shape_for(MINILM), "needs tokenizer 'word'"),
        (MINILM, word_shape(), "needs tokenizer 'wordpiece'"),
        (MINILM, InputShape(0, "t", None, 600, "wordpiece", None, 2), "at most 512 tokens"),
    ],
)
def test_incompatible_data_is_an_invalid_model_request(
    name: str, shape: InputShape, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        check_compatible(name, shape)
    assert caught.value.param == "model"
    with pytest.raises(InvalidRequest):
        build_model(name, shape, SMALL)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_architecture_accepts_its_data(name: str) -> None:
    check_compatible(name, shape_for(name))


def test_options_are_bounded_and_strict() -> None:
    assert ArchitectureOptions().hidden_sizes == [64, 64]
    for bad in (
        {"embedding_dim": 30, "num_heads": 4},
        {"hidden_sizes": []},
        {"hidden_sizes": [8] * 9},
        {"hidden_sizes": [5000]},
        {"channels": [0]},
        {"dropout": 0.9},
        {"layers": 3},
    ):
        with pytest.raises(ValidationError):
            ArchitectureOptions.model_validate(bad)


def test_minilm_needs_its_pretrained_folder(tmp_path: Path) -> None:
    for folder in (None, tmp_path):
        with pytest.raises(ValueError, match=r"model\.safetensors"):
            build_model(MINILM, shape_for(MINILM), SMALL, pretrained_dir=folder)


# Building and running


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("task", [Task.CLASSIFICATION, Task.REGRESSION])
def test_each_architecture_returns_one_logit_row_per_input(name: str, task: Task) -> None:
    n_outputs = 3 if task is Task.CLASSIFICATION else 1
    shape = shape_for(name, n_outputs)
    model = build(name, shape)
    expected = ("tabular",) if name == "mlp" else ("tabular", "images") if name == "cnn" else None
    assert model.input_names == (expected or ("tabular", "tokens", "attention"))
    model.train()
    logits = model(
        *(torch.from_numpy(a) for a in example_inputs(shape, model.input_names, 4).values())
    )
    assert logits.shape == (4, n_outputs)
    assert logits.dtype == torch.float32
    logits.sum().backward()  # trainable end to end


def test_text_networks_skip_tabular_input_when_there_is_none() -> None:
    shape = word_shape(tabular_dim=0)
    for name in ("lstm", "transformer-encoder"):
        assert build(name, shape).input_names == ("tokens", "attention")
    image_only = InputShape(0, None, None, None, None, (1, 3, 3), 2)
    model = build("cnn", image_only)  # a 3x3 image is pooled once, then kept at 1x1
    assert model.input_names == ("images",)
    assert run(model, example_inputs(image_only, ("images",))).shape == (2, 2)


@pytest.mark.parametrize("name", ALL)
def test_the_same_seed_gives_the_same_initial_weights(name: str) -> None:
    shape = shape_for(name)
    first, again = build(name, shape, seed=5).state_dict(), build(name, shape, seed=5).state_dict()
    assert first.keys() == again.keys()
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
    other = build(name, shape, seed=6).state_dict()
    assert any(not torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize(
    "name", ["transformer-encoder", pytest.param(MINILM, marks=pytest.mark.slow)]
)
def test_padded_token_ids_do_not_change_the_output(name: str) -> None:
    shape = shape_for(name)
    model = build(name, shape)
    arrays = example_inputs(shape, model.input_names, batch=3)
    noisy = dict(arrays, tokens=np.where(arrays["attention"] == 1, arrays["tokens"], 7))
    torch.testing.assert_close(run(model, noisy), run(model, arrays))


@pytest.mark.parametrize("name", ["lstm", "transformer-encoder"])
def test_a_row_of_padding_only_gives_finite_logits(name: str) -> None:
    shape = word_shape()
    model = build(name, shape)
    arrays = example_inputs(shape, model.input_names)
    arrays["attention"][0] = 0
    arrays["tokens"][0] = 0
    assert torch.isfinite(run(model, arrays)).all()


def test_transformed_features_feed_the_network() -> None:
    frame = mixed_frame()
    spec = fit(mixed_spec(), frame)
    shape = input_shape(spec)
    features = transform(spec, frame)
    for name in ("mlp", "cnn", "lstm", "transformer-encoder"):
        model = build(name, shape)
        arrays = model_inputs(features, shape, model.input_names)
        assert tuple(arrays) == model.input_names
        assert run(model, arrays).shape == (len(frame), 3)
    everything = model_inputs(features, shape, INPUT_NAMES)
    np.testing.assert_array_equal(everything["tokens"], features.tokens["review"])
    assert everything["tabular"].dtype == everything["images"].dtype == np.float32
    assert everything["tokens"].dtype == everything["attention"].dtype == np.int64
    no_images = transform(
        fit(PreprocessingSpec(features=[NumericStep(column="age")]), frame), frame
    )
    with pytest.raises(ValueError, match="images"):
        model_inputs(no_images, shape, ("images",))


# Stored weights and ONNX


@pytest.mark.parametrize("name", ALL)
def test_weights_round_trip_through_safetensors(name: str) -> None:
    shape = shape_for(name)
    trained = build(name, shape, seed=1)
    stored = safetensors.torch.load(safetensors.torch.save(trained.state_dict()))
    restored = build(name, shape, seed=2)
    restored.load_state_dict(stored, strict=True)
    arrays = example_inputs(shape, trained.input_names, 3)
    torch.testing.assert_close(run(restored, arrays), run(trained, arrays), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_onnx_export_matches_torch_at_any_batch_size(name: str) -> None:
    shape = shape_for(name)
    model = build(name, shape)
    model.train()
    graph = export_onnx(model, shape)
    assert model.training  # export leaves the caller's mode alone
    for batch in (1, 5):
        inputs = example_inputs(shape, model.input_names, batch)
        assert verify_onnx(graph, model, inputs, atol=1e-4) <= 1e-4
    assert model.training


@pytest.mark.slow
def test_minilm_reads_what_its_own_tokenizer_produces() -> None:
    tokenizer = Tokenizer.from_file(str(minilm_l6_v2_dir() / "tokenizer.json"))
    frame = mixed_frame(4)
    spec = fit(
        PreprocessingSpec(
            features=[TextStep(column="review", tokenizer="wordpiece", tokenizer_ref=MINILM)],
            label=LabelSpec(column="y", task=Task.CLASSIFICATION),
        ),
        frame,
    )
    shape = input_shape(spec)
    assert (shape.text_tokenizer, shape.text_vocab_size, shape.tabular_dim) == (
        "wordpiece",
        None,
        0,
    )
    model = build(MINILM, shape)
    arrays = model_inputs(
        transform(spec, frame, tokenizers={MINILM: tokenizer}), shape, model.input_names
    )
    assert run(model, arrays).shape == (4, 3)


def test_a_disagreeing_graph_is_an_export_error() -> None:
    shape = shape_for("mlp")
    model = build("mlp", shape)
    graph = export_onnx(model, shape)
    with torch.no_grad():
        model.head[-1].bias.add_(1.0)  # the torch model moves on; the graph does not
    with pytest.raises(ExportError, match="differ"):
        verify_onnx(graph, model, example_inputs(shape, model.input_names))
