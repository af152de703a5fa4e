"""Explanations on tiny networks trained in-process, on generated data where the truth is known.

Each task is decided by one thing (a column, a quadrant, a word), so "the explanation found it"
is a clear threshold. Networks are trained once per module, for a few epochs.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from PIL import Image

from aiaas.errors import Conflict, InvalidRequest
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
from aiaas.specs.shapes import ArchitectureOptions, input_shape, model_inputs
from aiaas.specs.types import Task
from aiaas.training.architectures import Network, build_model
from aiaas.training.explain import (
    Explainer,
    Options,
    column_groups,
    image_heatmap_png,
    permutation_importance,
)
from aiaas.training.export import export_onnx
from aiaas.training.trainer import Hyperparameters, Split, Stop, Trainer

SMALL = ArchitectureOptions(
    hidden_sizes=[32], embedding_dim=16, hidden_size=16, num_layers=1, num_heads=2, channels=[8]
)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


class _Run:
    """A trainer control that never stops and keeps nothing."""

    def poll(self) -> Stop | None:
        return None

    def checkpoint_due(self) -> bool:
        return False

    def on_checkpoint(self, data: bytes, *, epoch: int, step: int, metrics: Any) -> None:
        pass

    def on_epoch(self, metrics: Any) -> None:
        pass


@dataclass(frozen=True)
class Trained:
    network: Network
    spec: PreprocessingSpec
    frame: pd.DataFrame
    inputs: dict[str, np.ndarray]
    description: dict[str, Any]
    weights: bytes

    def explainer(self) -> Explainer:
        return Explainer.load(description=self.description, spec=self.spec, weights=self.weights)

    def rows(self, count: int) -> dict[str, np.ndarray]:
        return {name: array[:count] for name, array in self.inputs.items()}


def train(
    architecture: str,
    spec: PreprocessingSpec,
    frame: pd.DataFrame,
    *,
    epochs: int,
    learning_rate: float = 3e-3,
) -> Trained:
    fitted = fit(spec, frame)
    shape = input_shape(fitted)
    torch.manual_seed(0)
    network = build_model(architecture, shape, SMALL)
    features = transform(fitted, frame)
    inputs = model_inputs(features, shape, network.input_names)
    labels = fitted.label
    assert labels is not None and labels.classes is not None
    targets = np.array([labels.classes.index(str(v)) for v in frame[labels.column]])
    Trainer(
        network,
        Task.CLASSIFICATION,
        Hyperparameters(n_epochs=epochs, batch_size=32, learning_rate=learning_rate, seed=0),
    ).run(Split(inputs=inputs, targets=targets), None, _Run())
    network.eval()
    description = {
        "format": 1,
        "architecture": architecture,
        "options": SMALL.model_dump(mode="json"),
        "task": "classification",
        "input_names": list(network.input_names),
        "output_name": "logits",
        "classes": labels.classes,
        "input_shape": dataclasses.asdict(shape),
    }
    weights = safetensors.torch.save({k: v.contiguous() for k, v in network.state_dict().items()})
    return Trained(network, fitted, frame, inputs, description, weights)


# -- tabular: the label depends on column "key" only ---------------------------------------------


def key_frame(rows: int, seed: int) -> pd.DataFrame:
    """`key` decides the class (with a margin); the other columns are noise."""
    rng = np.random.default_rng(seed)
    key = rng.normal(size=rows)
    key = key + 0.6 * np.sign(key)
    return pd.DataFrame(
        {
            "noise1": rng.normal(size=rows).round(3),
            "key": key.round(3),
            "noise2": rng.normal(size=rows).round(3),
            "color": rng.choice(["red", "green", "blue"], rows),
            "label": np.where(key > 0, "yes", "no"),
        }
    )


TABULAR_SPEC = PreprocessingSpec(
    features=[
        NumericStep(column="noise1"),
        NumericStep(column="key"),
        NumericStep(column="noise2"),
        CategoricalStep(column="color"),
    ],
    label=LabelSpec(column="label", task=Task.CLASSIFICATION),
)


@pytest.fixture(scope="module")
def tabular() -> Trained:
    return train("mlp", TABULAR_SPEC, key_frame(400, seed=0), epochs=30)


def top_column(explainer: Explainer, attributions: list[Any]) -> list[str]:
    return [explainer.columns[int(np.argmax(np.abs(a.columns)))] for a in attributions]


@pytest.mark.parametrize("method", ["integrated_gradients", "shapley_sampling"])
def test_the_deciding_column_ranks_first_for_nearly_every_record(
    tabular: Trained, method: str
) -> None:
    explainer = tabular.explainer()
    assert explainer.columns == ["noise1", "key", "noise2", "color"]
    attributions = explainer.explain(tabular.rows(100), method, Options())
    tops = top_column(explainer, attributions)
    assert tops.count("key") >= 95, tops


def test_integrated_gradients_sum_to_the_output_change_within_the_delta(tabular: Trained) -> None:
    explainer = tabular.explainer()
    for attribution in explainer.explain(tabular.rows(40), "integrated_gradients", Options()):
        assert attribution.columns is not None and attribution.delta is not None
        change = attribution.output - attribution.baseline_output
        assert abs(attribution.columns.sum() - change) <= abs(attribution.delta) + 1e-4
        assert abs(attribution.delta) < 0.05 * max(1.0, abs(change))


def test_one_hot_blocks_fold_onto_their_column(tabular: Trained) -> None:
    groups = column_groups(tabular.spec)
    assert [g[0] for g in groups] == ["noise1", "key", "noise2", "color"]
    assert groups[3][2] - groups[3][1] == 3  # blue, green, red


@pytest.mark.parametrize("method", ["feature_ablation", "kernel_shap", "occlusion"])
def test_the_other_tabular_methods_find_the_column_too(tabular: Trained, method: str) -> None:
    explainer = tabular.explainer()
    attributions = explainer.explain(tabular.rows(10), method, Options(n_samples=100))
    assert top_column(explainer, attributions).count("key") >= 9


def test_baselines_are_named_or_given_as_a_record(tabular: Trained) -> None:
    explainer = tabular.explainer()
    vector, record = explainer.tabular_baseline(None)
    step = tabular.spec.features[1]
    assert isinstance(step, NumericStep)
    assert record["key"] == step.mean and record["color"] is not None
    assert not vector[:3].any()  # standardised columns at their mean
    _, typical = explainer.tabular_baseline("typical")
    assert typical["key"] == step.fill
    zeros, zero_record = explainer.tabular_baseline("zeros")
    assert not zeros.any() and zero_record["color"] is None
    given, given_record = explainer.tabular_baseline({"key": 2.0})
    assert given_record["key"] == 2.0 and given[1] == pytest.approx((2.0 - step.mean) / step.std)
    assert vector.shape == zeros.shape == given.shape == (6,)
    one = tabular.rows(3)
    explained = explainer.explain(one, "integrated_gradients", Options(baseline={"key": 2.0}))
    assert all(a.delta is not None for a in explained)


@pytest.mark.parametrize(
    ("method", "options", "param"),
    [
        ("saliency", Options(), "method"),
        ("attention", Options(), "method"),
        ("integrated_gradients", Options(baseline="black"), "options.baseline"),
        ("integrated_gradients", Options(baseline={"nope": 1}), "options.baseline"),
        ("integrated_gradients", Options(baseline={"key": "abc"}), "options.baseline"),
        ("integrated_gradients", Options(target="maybe"), "options.target"),
        ("occlusion", Options(window=3), "options.window"),
    ],
)
def test_bad_methods_and_options_are_400s(
    tabular: Trained, method: str, options: Options, param: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        tabular.explainer().explain(tabular.rows(2), method, options)
    assert raised.value.param == param


def test_a_named_target_is_explained_instead_of_the_predicted_class(tabular: Trained) -> None:
    explainer = tabular.explainer()
    rows = tabular.rows(4)
    yes = explainer.explain(rows, "integrated_gradients", Options(target="yes"))
    assert {a.target for a in yes} == {1}


def test_the_rebuilt_network_agrees_with_its_onnx_graph(tabular: Trained) -> None:
    import onnxruntime as ort

    graph = export_onnx(tabular.network, input_shape(tabular.spec))
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])

    def served(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(session.run(["logits"], inputs)[0])

    explainer = tabular.explainer()
    assert explainer.check_against(served) < 1e-4
    with pytest.raises(Conflict) as raised:
        explainer.check_against(lambda inputs: served(inputs) + 1.0)
    assert raised.value.code == "explanation_inconsistent"

    # Without weights, the served graph itself is explained, by perturbation only.
    onnx_only = Explainer.onnx(description=tabular.description, spec=tabular.spec, run=served)
    with pytest.raises(InvalidRequest) as refused:
        onnx_only.explain(tabular.rows(2), "integrated_gradients", Options())
    assert refused.value.code == "gradients_unavailable"
    by_graph = onnx_only.explain(tabular.rows(5), "feature_ablation", Options())
    by_torch = explainer.explain(tabular.rows(5), "feature_ablation", Options())
    for left, right in zip(by_graph, by_torch, strict=True):
        assert left.columns is not None and right.columns is not None
        np.testing.assert_allclose(left.columns, right.columns, atol=1e-4)


# -- images: the class is set by the top-left quadrant -------------------------------------------


SIZE = 12


def quadrant_png(bright: bool, rng: np.random.Generator) -> bytes:
    """Mid-grey noise everywhere; the top-left quadrant is bright or dark."""
    pixels = rng.uniform(90, 165, (SIZE, SIZE))
    half = SIZE // 2
    pixels[:half, :half] = rng.uniform(215, 255) if bright else rng.uniform(0, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> Trained:
    rng = np.random.default_rng(0)
    bright = [i % 2 == 0 for i in range(240)]
    frame = pd.DataFrame(
        {
            "image": [quadrant_png(b, rng) for b in bright],
            "label": ["bright" if b else "dark" for b in bright],
        }
    )
    spec = PreprocessingSpec(
        features=[ImageStep(column="image", size=(SIZE, SIZE), channels=1)],
        label=LabelSpec(column="label", task=Task.CLASSIFICATION),
    )
    return train("cnn", spec, frame, epochs=12, learning_rate=1e-2)


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion", "feature_ablation"])
def test_the_deciding_quadrant_holds_most_of_the_attribution(images: Trained, method: str) -> None:
    explainer = images.explainer()
    attributions = explainer.explain(images.rows(20), method, Options(window=3))
    half = SIZE // 2
    shares = []
    for attribution in attributions:
        assert attribution.pixels is not None and attribution.pixels.shape == (SIZE, SIZE)
        mass = np.abs(attribution.pixels)
        shares.append(mass[:half, :half].sum() / mass.sum())
    assert np.median(shares) > 0.5, shares


def test_a_heatmap_png_is_rgba_at_the_size_asked(images: Trained) -> None:
    [attribution] = images.explainer().explain(images.rows(1), "integrated_gradients", Options())
    assert attribution.pixels is not None
    png = image_heatmap_png(attribution.pixels, (40, 30))
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.mode == "RGBA" and opened.size == (40, 30)


# -- text: the keyword decides ------------------------------------------------------------------

FILLER = ["the", "a", "movie", "was", "it", "my", "book", "today", "quite", "very", "our", "show"]


@pytest.fixture(scope="module")
def text() -> Trained:
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for i in range(300):
        good = i % 2 == 0
        words = list(rng.choice(FILLER, int(rng.integers(3, 7))))
        words.insert(int(rng.integers(0, len(words) + 1)), "excellent" if good else "awful")
        texts.append(" ".join(words).capitalize() + ".")
        labels.append("good" if good else "bad")
    spec = PreprocessingSpec(
        features=[TextStep(column="text", max_length=12)],
        label=LabelSpec(column="label", task=Task.CLASSIFICATION),
    )
    return train("lstm", spec, pd.DataFrame({"text": texts, "label": labels}), epochs=8)


def keyword_ranks_first(trained: Trained, explainer: Explainer, method: str) -> int:
    rows = trained.rows(30)
    hits = 0
    for index, attribution in enumerate(explainer.explain(rows, method, Options())):
        text = str(trained.frame["text"].iloc[index])
        tokens = explainer.tokens(text, rows["tokens"][index], rows["attention"][index])
        assert attribution.tokens is not None and len(tokens) == len(attribution.tokens)
        for token in tokens:
            assert token.start is not None and token.end is not None
            assert text[token.start : token.end] == token.text
        top = tokens[int(np.argmax(np.abs(attribution.tokens)))].text.lower()
        hits += top in ("excellent", "awful")
    return hits


@pytest.mark.parametrize("method", ["integrated_gradients", "feature_ablation", "occlusion"])
def test_the_keyword_ranks_first(text: Trained, method: str) -> None:
    assert keyword_ranks_first(text, text.explainer(), method) >= 28


def test_attention_comes_beside_integrated_gradients(text: Trained) -> None:
    explainer = text.explainer()
    rows = text.rows(5)
    attributions = explainer.explain(rows, "attention", Options())
    plain = explainer.explain(rows, "integrated_gradients", Options())
    for with_attention, alone in zip(attributions, plain, strict=True):
        assert with_attention.attention is not None and with_attention.tokens is not None
        assert with_attention.attention.shape == with_attention.tokens.shape
        assert with_attention.attention.sum() == pytest.approx(1.0, abs=1e-4)
        np.testing.assert_allclose(with_attention.tokens, alone.tokens, atol=1e-5)


def test_a_transformer_reports_its_attention_too() -> None:
    frame = pd.DataFrame(
        {"text": ["good movie", "bad movie", "a good day", "a bad day"] * 10, "label": [1, 0] * 20}
    )
    spec = PreprocessingSpec(
        features=[TextStep(column="text", max_length=5)],
        label=LabelSpec(column="label", task=Task.CLASSIFICATION),
    )
    trained = train("transformer-encoder", spec, frame, epochs=2)
    [attribution] = trained.explainer().explain(trained.rows(1), "attention", Options())
    assert attribution.attention is not None and attribution.attention.shape == (2,)
    assert attribution.attention.sum() == pytest.approx(1.0, abs=1e-4)


def test_permutation_importance_ranks_the_deciding_column_first(tabular: Trained) -> None:
    held_out = key_frame(200, seed=3)
    features = transform(tabular.spec, held_out)
    inputs = model_inputs(features, input_shape(tabular.spec), ("tabular",))
    targets = (held_out["label"] == "yes").to_numpy().astype(np.int64)
    found = permutation_importance(tabular.network, inputs, targets, tabular.spec, repeats=3)
    assert found is not None and found["metric"] == "accuracy" and found["score"] > 0.95
    assert found["columns"][0]["column"] == "key"
    assert found["columns"][0]["importance"] > 0.3
    assert all(abs(c["importance"]) < 0.05 for c in found["columns"][1:]), found


def test_integrated_gradients_are_captums_own(tabular: Trained) -> None:
    """One backward seed for all rows (ours) gives captum's per-row gradients exactly."""
    from captum.attr import IntegratedGradients

    explainer = tabular.explainer()
    rows = tabular.rows(8)
    ours = explainer.explain(rows, "integrated_gradients", Options(n_steps=20))
    vector, _ = explainer.tabular_baseline(None)
    targets = torch.tensor([a.target for a in ours])
    assert explainer.network is not None
    theirs, delta = IntegratedGradients(explainer.network).attribute(
        torch.from_numpy(rows["tabular"]),
        baselines=torch.from_numpy(vector)[None],
        target=targets,
        n_steps=20,
        return_convergence_delta=True,
    )
    for row, attribution in enumerate(ours):
        assert attribution.columns is not None and attribution.delta is not None
        folded = [theirs[row, start:stop].sum().item() for _, start, stop in explainer.groups]
        np.testing.assert_allclose(attribution.columns, folded, rtol=1e-4, atol=1e-6)
        assert attribution.delta == pytest.approx(delta[row].item(), abs=1e-4)


@pytest.mark.slow
def test_minilm_tokens_carry_their_spans_without_cls_and_sep() -> None:
    """The wordpiece path on the pretrained encoder (an untrained head: only the plumbing)."""
    from tokenizers import Tokenizer

    from aiaas.engines.embeddings.export import minilm_l6_v2_dir
    from aiaas.specs.shapes import MINILM, TOKENIZER_REF

    tokenizer = Tokenizer.from_file(str(minilm_l6_v2_dir() / "tokenizer.json"))
    spec = PreprocessingSpec(
        features=[
            TextStep(
                column="text", tokenizer="wordpiece", tokenizer_ref=TOKENIZER_REF, max_length=12
            )
        ],
        label=LabelSpec(column="label", task=Task.CLASSIFICATION),
    )
    texts = ["Unbelievably good service!", "a dreadful, slow day"]
    fitted = fit(spec, pd.DataFrame({"text": texts, "label": ["good", "bad"]}))
    shape = input_shape(fitted)
    torch.manual_seed(0)
    options = ArchitectureOptions(hidden_sizes=[8])
    network = build_model(MINILM, shape, options, pretrained_dir=minilm_l6_v2_dir())
    description = {
        "architecture": MINILM,
        "options": options.model_dump(mode="json"),
        "input_names": list(network.input_names),
        "input_shape": dataclasses.asdict(shape),
    }
    weights = safetensors.torch.save({k: v.contiguous() for k, v in network.state_dict().items()})
    explainer = Explainer.load(
        description=description,
        spec=fitted,
        weights=weights,
        pretrained_dir=minilm_l6_v2_dir(),
        tokenizers={TOKENIZER_REF: tokenizer},
    )
    features = transform(
        fitted, pd.DataFrame({"text": texts}), tokenizers={TOKENIZER_REF: tokenizer}
    )
    inputs = model_inputs(features, shape, network.input_names)
    attributions = explainer.explain(inputs, "attention", Options(n_steps=8))
    for index, (text, attribution) in enumerate(zip(texts, attributions, strict=True)):
        tokens = explainer.tokens(text, inputs["tokens"][index], inputs["attention"][index])
        assert attribution.tokens is not None and attribution.attention is not None
        assert len(tokens) == len(attribution.tokens) == len(attribution.attention)
        assert tokens and all(t.start is not None for t in tokens)
        for token in tokens:
            assert token.start is not None and token.end is not None
            assert text[token.start : token.end].lower() == token.text.removeprefix("##")
        assert attribution.delta is not None
        change = attribution.output - attribution.baseline_output
        assert abs(attribution.delta) < 0.2 * max(1.0, abs(change))
