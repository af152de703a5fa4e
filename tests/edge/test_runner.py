"""The bundle runner's preprocessing against the platform's own `transform`, value by value."""

from __future__ import annotations

import ast
import base64
import io
import json
import random
import sys
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tokenizers import Tokenizer

from aiaas.edge import runner
from aiaas.edge.bundle import RUNNER_PATH, bundle_stem
from aiaas.edge.runner import Preprocessor, WordPiece
from aiaas.engines.embeddings.export import minilm_l6_v2_dir
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
from aiaas.specs.shapes import TOKENIZER_REF
from aiaas.specs.types import Task


def platform_inputs(
    spec: PreprocessingSpec, records: list[dict[str, Any]], **kwargs: Any
) -> dict[str, np.ndarray]:
    """What the platform feeds its graph: records become a frame as `ClassicModel` builds it."""
    columns = [step.column for step in spec.features]
    frame = pd.DataFrame({c: [record[c] for record in records] for c in columns})
    features = transform(spec, frame, **kwargs)
    arrays = {"tabular": features.tabular, "images": features.images}
    if features.tokens:
        [column] = features.tokens
        arrays |= {"tokens": features.tokens[column], "attention": features.attention[column]}
    return {k: v for k, v in arrays.items() if v is not None}


def runner_inputs(
    spec: PreprocessingSpec, records: list[dict[str, Any]], tokenizer: WordPiece | None = None
) -> dict[str, np.ndarray]:
    return Preprocessor(json.loads(spec.model_dump_json()), tokenizer).encode(records)


def assert_same(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


TRAIN = pd.DataFrame(
    {
        "a": [1.0, 2.5, None, 4.0, 5.5, 3.0],
        "n": [1, 2, 3, 4, 5, 6],
        "raw": [0.5, 0.25, 1.0, None, 2.0, 3.0],
        "color": ["red", "green", "blue", "red", None, "teal"],
        "size": ["s", "m", "l", "m", "m", "xl"],
        "flag": [True, False, True, None, True, False],
        "y": ["no", "yes", "no", "yes", "no", "yes"],
    }
)


def tabular_spec() -> PreprocessingSpec:
    steps = [
        NumericStep(column="a"),
        NumericStep(column="n", impute="mean"),
        NumericStep(column="raw", standardize=False, impute="constant", fill_value=-1),
        CategoricalStep(column="color", max_categories=2),
        CategoricalStep(column="size", encoding="ordinal"),
        CategoricalStep(column="flag"),
    ]
    label = LabelSpec(column="y", task=Task.CLASSIFICATION)
    return fit(PreprocessingSpec(features=steps, label=label), TRAIN)


ODD_VALUES: list[dict[str, Any]] = [
    {"a": 1, "n": 2.0, "raw": "3.5", "color": "red", "size": "m", "flag": True},
    {"a": None, "n": None, "raw": None, "color": None, "size": None, "flag": None},
    {"a": float("nan"), "n": "", "raw": " 7 ", "color": "purple", "size": "xxl", "flag": "true"},
    {"a": True, "n": 1e6, "raw": -0.0, "color": 1.0, "size": 1, "flag": False, "extra": [1]},
    {"a": "nan", "n": 3, "raw": 2, "color": "blue", "size": "s", "flag": 1},
]


@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4], [3], [1, 1], [4, 0]])
def test_tabular_records_encode_exactly_as_the_platform_does(rows: list[int]) -> None:
    spec = tabular_spec()
    records = [ODD_VALUES[i] for i in rows]
    assert_same(runner_inputs(spec, records), platform_inputs(spec, records))


def test_bad_values_are_errors_that_name_the_column() -> None:
    spec = tabular_spec()
    good = ODD_VALUES[0]
    for column, value, words in [
        ("a", "abc", "not a number"),
        ("n", float("inf"), "infinite"),
        ("raw", {"x": 1}, "not a number"),
    ]:
        with pytest.raises(runner.BundleError, match=words) as caught:
            runner_inputs(spec, [good, {**good, column: value}])
        assert repr(column) in str(caught.value)
    with pytest.raises(runner.BundleError, match="record 1: column 'size' is missing"):
        runner_inputs(spec, [good, {k: v for k, v in good.items() if k != "size"}])


def test_word_text_encodes_exactly_as_the_platform_does() -> None:
    train = pd.DataFrame(
        {"text": ["The movie was GREAT!", "an awful, awful book", "so-so… café"], "y": [1, 0, 1]}
    )
    for lowercase in (True, False):
        step = TextStep(column="text", max_length=6, lowercase=lowercase, vocab_size=8)
        label = LabelSpec(column="y", task=Task.CLASSIFICATION)
        spec = fit(PreprocessingSpec(features=[step], label=label), train)
        records = [
            {"text": t}
            for t in ["the GREAT movie", "", None, 12, 2.0, "awful awful awful awful awful x y z"]
        ]
        assert_same(runner_inputs(spec, records), platform_inputs(spec, records))


@pytest.fixture(scope="module")
def minilm() -> tuple[Tokenizer, WordPiece]:
    path = minilm_l6_v2_dir() / "tokenizer.json"
    return Tokenizer.from_file(str(path)), WordPiece(json.loads(path.read_text()))


ORDINARY = [
    "I loved this, it was wonderful",
    "Hello, WORLD!!! How's it going?",
    "Café naïve résumé Ünïcödé ñ ç",
    "don't stop-believing... $100.50 #tag @user http://example.com/a?b=c&d=e",
    "東京は日本の首都です mixed中文english",
    "こんにちは世界 한국어 텍스트 Ελληνικά ΟΔΟΣ русский текст",
    "tabs\tand\nnewlines\r\x00 nul \ufffd \u200b zero width",
    "[CLS] special [SEP] tokens [MASK]x in text",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a" * 150,
    "😀 emoji ok? 👍🏽 ① ½ ² Ω ≈ ∑ →",
    "",
    "   ",
    " ".join(["word"] * 300),
]


def random_texts(count: int, seed: int) -> list[str]:
    """Text drawn from the scripts people write in, with punctuation and spacing."""
    rng = random.Random(seed)
    blocks = [
        (0x20, 0x7E),
        (0xA0, 0x24F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x900, 0x97F),
        (0x2000, 0x206F),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1F600, 0x1F64F),
    ]
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(0, 40)):
            low, high = rng.choice(blocks)
            chars.append(chr(rng.randint(low, high)) if rng.random() < 0.5 else rng.choice("ab e "))
        texts.append("".join(chars))
    return texts


def test_wordpiece_ids_equal_the_tokenizers_library(minilm: tuple[Tokenizer, WordPiece]) -> None:
    tokenizer, ours = minilm
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.no_padding()
    for text in ORDINARY + random_texts(2000, seed=1):
        assert ours.encode(text) == tokenizer.encode(text).ids, repr(text)


@pytest.mark.parametrize("max_length", [4, 16, 128])
def test_wordpiece_text_encodes_exactly_as_the_platform_does(
    minilm: tuple[Tokenizer, WordPiece], max_length: int
) -> None:
    tokenizer, ours = minilm
    step = TextStep(
        column="text", tokenizer="wordpiece", tokenizer_ref=TOKENIZER_REF, max_length=max_length
    )
    label = LabelSpec(column="y", task=Task.CLASSIFICATION, classes=["a", "b"])
    spec = PreprocessingSpec(features=[step], label=label, fitted=True)
    records = [{"text": text} for text in [*ORDINARY, None, 3.0, True]]
    expected = platform_inputs(spec, records, tokenizers={TOKENIZER_REF: tokenizer})
    assert_same(runner_inputs(spec, records, ours), expected)


def png(rng: np.random.Generator, mode: str, size: tuple[int, int]) -> bytes:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("channels", [1, 3])
def test_images_encode_exactly_as_the_platform_does(channels: int) -> None:
    rng = np.random.default_rng(0)
    images = [png(rng, mode, size) for mode, size in [("RGB", (20, 12)), ("L", (7, 9))]]
    images.append(png(rng, "RGBA", (16, 16)))
    step = ImageStep(column="image", size=(8, 10), channels=channels)
    label = LabelSpec(column="y", task=Task.CLASSIFICATION)
    train = pd.DataFrame({"image": images, "y": ["a", "b", "a"]})
    spec = fit(PreprocessingSpec(features=[step], label=label), train)
    expected = platform_inputs(spec, [{"image": image} for image in images])
    records = [{"image": base64.b64encode(image).decode()} for image in images]
    assert_same(runner_inputs(spec, records), expected)


def test_the_runner_imports_only_numpy_onnxruntime_and_the_standard_library() -> None:
    tree = ast.parse(RUNNER_PATH.read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    outside = {name for name in top_level if name not in sys.stdlib_module_names}
    assert outside == {"numpy", "onnxruntime"}


def test_bundle_names_are_safe_file_names() -> None:
    assert bundle_stem("ft:mlp:acme:churn:abc123", 3) == "ft-mlp-acme-churn-abc123-v3"
    assert bundle_stem("../../etc/passwd", 1) == "etc-passwd-v1"
    assert bundle_stem(":::", 2) == "model-v2"
