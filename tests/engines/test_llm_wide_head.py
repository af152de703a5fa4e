"""The output layer widened to BF16 (engines/llm/wide_head.py): the derived GGUF holds the model
unchanged plus a BF16 `output.weight`, `auto` widens where it pays, the cache is reused, and the
widened model computes the same distribution as the original."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from aiaas.engines.llm.bundled import smollm2_path
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.wide_head import bf16_gemm_available, weights_for
from aiaas.training.gguf import DEFAULT_EVAL_TEXT, perplexity

BF16 = gguf.GGMLQuantizationType.BF16


@pytest.fixture(scope="module")
def widened(gemma_file: Path, wide_cache: Path) -> Path:
    path = weights_for(gemma_file, wide_cache, "on")
    assert path != gemma_file
    return path


def _bf16_to_float(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def test_the_widened_file_is_the_model_plus_a_bf16_output_layer(
    gemma_file: Path, widened: Path
) -> None:
    source, wide = gguf.GGUFReader(gemma_file), gguf.GGUFReader(widened)
    keys = {name: f.contents() for name, f in source.fields.items() if not name.startswith("GGUF.")}
    assert {name: f.contents() for name, f in wide.fields.items() if name in keys} == keys
    assert set(wide.fields) - set(source.fields) <= {"GGUF.version", "GGUF.tensor_count"}

    originals = {t.name: t for t in source.tensors}
    copies = {t.name: t for t in wide.tensors}
    assert set(copies) == set(originals) | {"output.weight"}  # Gemma 3 ties its embeddings
    for name, tensor in originals.items():
        copy = copies[name]
        assert copy.tensor_type == tensor.tensor_type
        assert list(copy.shape) == list(tensor.shape)
        assert np.array_equal(copy.data, tensor.data), name

    head, embeddings = copies["output.weight"], originals["token_embd.weight"]
    assert head.tensor_type == BF16
    assert list(head.shape) == list(embeddings.shape)
    rows = np.random.default_rng(0).choice(int(embeddings.shape[1]), size=64, replace=False)
    exact = gguf.quants.dequantize(embeddings.data[rows], embeddings.tensor_type)
    rounded = _bf16_to_float(np.ascontiguousarray(head.data[rows]))
    # round to nearest: within half of bf16's 8-bit mantissa step of each value
    assert np.all(np.abs(rounded - exact) <= np.abs(exact) * 2.0**-8)
    assert np.any(rounded != exact)  # it really is a BF16 copy, not the values unrounded


def test_a_widened_copy_is_made_once_and_reused(
    gemma_file: Path, widened: Path, wide_cache: Path
) -> None:
    written = widened.stat().st_mtime_ns
    assert weights_for(gemma_file, wide_cache, "on") == widened
    assert widened.stat().st_mtime_ns == written
    assert sorted(p.name for p in wide_cache.iterdir()) == [widened.name]  # no partial left


def test_auto_widens_only_where_the_output_layer_is_a_large_share(
    gemma_file: Path, widened: Path, wide_cache: Path, tmp_path: Path
) -> None:
    smollm2 = smollm2_path(tmp_path)
    expected = widened if bf16_gemm_available() else gemma_file
    assert weights_for(gemma_file, wide_cache, "auto") == expected
    # SmolLM2's head is 21 % of its weights: not worth the BF16 bytes
    assert weights_for(smollm2, tmp_path / "smollm2", "auto") == smollm2
    assert not (tmp_path / "smollm2").exists()
    assert weights_for(gemma_file, wide_cache, "off") == gemma_file
    assert weights_for(gemma_file, None, "on") == gemma_file


def test_on_widens_any_quantized_output_layer(tmp_path: Path) -> None:
    smollm2 = smollm2_path(tmp_path)
    path = weights_for(smollm2, tmp_path / "cache", "on")
    assert path != smollm2
    head = {t.name: t for t in gguf.GGUFReader(path).tensors}["output.weight"]
    assert head.tensor_type == BF16
    model = LlamaModel(smollm2, weights=path)
    try:
        assert model.weights == path and model.info.path == smollm2
        assert model.info.chat_template  # the metadata came along
    finally:
        model.close()


def test_a_file_that_is_not_gguf_is_kept_as_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    with caplog.at_level(logging.WARNING):
        assert weights_for(broken, tmp_path / "cache", "on") == broken
    assert "kept broken.gguf's own output layer" in caplog.text


def _teacher_forced_logits(model: LlamaModel, tokens: list[int]) -> np.ndarray:
    """Logits at every position of `tokens`, decoded as one batch of one sequence."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(model.handle, params)
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, True
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        size = len(tokens) * model.n_vocab
        pointer = llama_cpp.llama_get_logits(ctx)
        buffer = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float * size)).contents
        return np.frombuffer(buffer, dtype=np.float32).reshape(len(tokens), -1).copy()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


@pytest.fixture(scope="module")
def original(gemma_file: Path) -> Iterator[LlamaModel]:
    model = LlamaModel(gemma_file)
    yield model
    model.close()


def test_the_widened_model_predicts_what_the_original_does(
    original: LlamaModel, widened: Path
) -> None:
    tokens = original.tokenize(DEFAULT_EVAL_TEXT, add_special=True)[:256]
    a = _teacher_forced_logits(original, tokens)
    wide = LlamaModel(original.info.path, weights=widened)
    try:
        b = _teacher_forced_logits(wide, tokens)
    finally:
        wide.close()
    # The hidden states are the same computation; only the head's rounding differs: llama.cpp's
    # Q8_0 kernel rounds the hidden state to 8-bit blocks (measured: <= 0.31 from the exact
    # product), BF16 rounds both sides to 8-bit mantissas (<= 0.11).
    assert np.abs(a - b).max() < 0.75
    top = np.sort(a, axis=1)
    clear = top[:, -1] - top[:, -2] > 0.75  # positions that are not near a tie
    assert clear.sum() >= len(tokens) // 4  # most of them, in prose
    assert np.array_equal(a.argmax(axis=1)[clear], b.argmax(axis=1)[clear])


def test_the_widened_model_has_the_same_perplexity(gemma_file: Path, widened: Path) -> None:
    text = DEFAULT_EVAL_TEXT[:2000]
    before = perplexity(gemma_file, text, n_ctx=256, threads=2)
    after = perplexity(widened, text, n_ctx=256, threads=2)
    assert after.perplexity == pytest.approx(before.perplexity, rel=0.01)
