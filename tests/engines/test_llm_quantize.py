from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from aiaas.engines.llm.bundled import smollm2_path
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.quantize import (
    DEFAULT_EVAL_TEXT,
    QUANT_TYPES,
    PerplexityResult,
    generation_speed,
    perplexity,
    requantize,
)
from aiaas.errors import InvalidRequest, ServerError

THREADS = 1  # two threads on a busy two-core box spin against each other: 4x slower
N_CTX = 128  # small windows keep each perplexity to a few hundred tokens on two cores
EVAL_TEXT = "\n\n".join(DEFAULT_EVAL_TEXT.split("\n\n")[:3])  # about 450 tokens: 3 windows


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2_path(tmp_path_factory.mktemp("cache"))  # SmolLM2-135M-Instruct, Q4_1


@pytest.fixture(scope="module")
def source_perplexity(source: Path) -> PerplexityResult:
    return perplexity(source, EVAL_TEXT, n_ctx=N_CTX, threads=THREADS)


@pytest.fixture(scope="module")
def q8(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("q8") / "model.Q8_0.gguf"
    requantize(source, target, "Q8_0", threads=THREADS)
    return target


def test_quant_types_cover_the_common_llama_cpp_types() -> None:
    expected = {"Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "F16"}
    assert expected <= set(QUANT_TYPES)
    assert QUANT_TYPES[:2] == ("F16", "Q8_0")  # largest first


def test_default_eval_text_is_plain_prose_of_three_512_token_windows(source: Path) -> None:
    assert "  " not in DEFAULT_EVAL_TEXT
    assert DEFAULT_EVAL_TEXT.count("\n\n") >= 5
    model = LlamaModel(source)
    try:
        n_tokens = len(model.tokenize(DEFAULT_EVAL_TEXT, add_special=True, parse_special=False))
    finally:
        model.close()
    assert 3 * 512 <= n_tokens <= 2000


@pytest.mark.slow
def test_requantize_to_q8_gives_a_larger_valid_gguf_of_similar_perplexity(
    source: Path, q8: Path, source_perplexity: PerplexityResult
) -> None:
    assert q8.stat().st_size > source.stat().st_size  # 8 bits a weight against 4 (+ scales)
    assert [p.name for p in q8.parent.iterdir()] == [q8.name]  # no temp file left behind
    model = LlamaModel(q8)
    try:
        assert "Q8_0" in model.info.description
    finally:
        model.close()

    result = perplexity(q8, EVAL_TEXT, n_ctx=N_CTX, threads=THREADS)
    assert math.isfinite(result.perplexity)
    assert result.tokens_scored == source_perplexity.tokens_scored
    assert abs(result.perplexity / source_perplexity.perplexity - 1) < 0.25


@pytest.mark.slow
def test_requantize_to_q4_0_gives_a_smaller_file(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.Q4_0.gguf"
    requantize(source, target, "q4_0", threads=THREADS)  # names are case-insensitive
    assert 0 < target.stat().st_size < source.stat().st_size


def test_requantize_refuses_an_unknown_type(source: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as caught:
        requantize(source, tmp_path / "out.gguf", "Q9_X", threads=THREADS)
    assert caught.value.param == "quant_type"
    assert "Q4_K_M" in caught.value.message
    assert list(tmp_path.iterdir()) == []


def test_requantize_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a model" * 64)
    with pytest.raises(InvalidRequest) as caught:
        requantize(garbage, tmp_path / "out.gguf", "Q8_0", threads=THREADS)
    assert caught.value.param == "model"
    assert list(tmp_path.iterdir()) == [garbage]


def test_a_failing_quantise_raises_and_leaves_no_partial_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(256))  # the magic, then a header llama.cpp rejects
    with pytest.raises(ServerError) as caught:
        requantize(broken, tmp_path / "out.gguf", "Q8_0", threads=THREADS)
    assert "Q8_0" in caught.value.message
    assert "failed to load model from broken.gguf" in caught.value.message  # no full paths
    assert str(tmp_path) not in caught.value.message
    assert list(tmp_path.iterdir()) == [broken]


@pytest.mark.slow
def test_perplexity_is_deterministic(source: Path, source_perplexity: PerplexityResult) -> None:
    again = perplexity(source, EVAL_TEXT, n_ctx=N_CTX, threads=THREADS)
    assert again == source_perplexity
    assert source_perplexity.n_ctx == N_CTX
    # three windows of 128 tokens, each scored on its second half (64 positions, 63 targets)
    assert source_perplexity.tokens_scored == 3 * (N_CTX - 1 - N_CTX // 2)
    assert 1 < source_perplexity.perplexity < 100


@pytest.mark.slow
def test_perplexity_is_lower_on_english_than_on_word_soup(
    source: Path, source_perplexity: PerplexityResult
) -> None:
    words = EVAL_TEXT.split()
    random.Random(0).shuffle(words)
    soup = perplexity(source, " ".join(words), n_ctx=N_CTX, threads=THREADS)
    assert math.isfinite(soup.perplexity)
    assert soup.perplexity > 2 * source_perplexity.perplexity


def test_perplexity_needs_one_full_window(source: Path) -> None:
    with pytest.raises(InvalidRequest) as caught:
        perplexity(source, "Too short.", n_ctx=N_CTX, threads=THREADS)
    assert caught.value.param == "text"
    with pytest.raises(InvalidRequest) as caught:
        perplexity(source, EVAL_TEXT, n_ctx=4, threads=THREADS)
    assert caught.value.param == "n_ctx"


@pytest.mark.slow
def test_generation_speed_measures_positive_rates(source: Path) -> None:
    speed = generation_speed(source, prompt_tokens=16, new_tokens=4, threads=THREADS)
    for value in (speed.prompt_tokens_per_s, speed.generated_tokens_per_s, speed.first_token_ms):
        assert math.isfinite(value)
        assert value > 0


def test_the_api_offers_exactly_the_supported_types() -> None:
    from typing import get_args

    from aiaas.protocol.optimisations import Gguf

    assert get_args(Gguf.model_fields["quant_type"].annotation) == QUANT_TYPES
