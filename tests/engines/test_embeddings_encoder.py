"""The ONNX sentence encoder agrees with sentence-transformers itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aiaas.engines.embeddings.encoder import SentenceEncoder
from aiaas.errors import ContextLengthExceeded, InvalidRequest

from .conftest import EDGE_CASES, generated_sentences

SENTENCES = generated_sentences(50)
INPUTS = SENTENCES + EDGE_CASES


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> tuple[np.ndarray, list[int]]:
    """sentence-transformers' own vectors and token counts for INPUTS (torch, safetensors)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu", local_files_only=True)
    vectors = model.encode(INPUTS, normalize_embeddings=True, batch_size=16)
    counts = model.tokenize(INPUTS)["attention_mask"].sum(dim=1).tolist()
    return np.asarray(vectors, dtype=np.float32), counts


def cosines(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    return (ours * theirs).sum(axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
    )


@pytest.mark.slow
def test_fp32_vectors_match_sentence_transformers(
    fp32_encoder: SentenceEncoder, reference: tuple[np.ndarray, list[int]]
) -> None:
    vectors = fp32_encoder.encode(INPUTS)

    assert vectors.shape == (len(INPUTS), 384) and vectors.dtype == np.float32
    assert cosines(vectors, reference[0]).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_int8_vectors_stay_close_to_sentence_transformers(
    int8_encoder: SentenceEncoder, reference: tuple[np.ndarray, list[int]]
) -> None:
    similarity = cosines(int8_encoder.encode(INPUTS), reference[0])

    assert similarity[: len(SENTENCES)].min() >= 0.98
    assert similarity[len(SENTENCES) :].min() >= 0.95  # measured 0.965: see EDGE_CASES


@pytest.mark.slow
def test_token_counts_match_sentence_transformers_truncation(
    fp32_encoder: SentenceEncoder, reference: tuple[np.ndarray, list[int]]
) -> None:
    counts = fp32_encoder.count_tokens(INPUTS)

    assert counts == reference[1]
    assert max(counts) == 256  # the long ones are cut at max_seq_length, not tokenizer.json's 128


def test_pre_tokenised_input_gives_the_same_vectors(fp32_encoder: SentenceEncoder) -> None:
    texts = SENTENCES[:8]
    np.testing.assert_allclose(
        fp32_encoder.encode_ids(fp32_encoder.tokenize(texts)), fp32_encoder.encode(texts), atol=1e-6
    )


def test_padding_does_not_change_a_vector(fp32_encoder: SentenceEncoder) -> None:
    short, long = "a short one", SENTENCES[17]
    alone = fp32_encoder.encode([short])
    padded = fp32_encoder.encode([short, long])[:1]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_no_input_gives_an_empty_matrix(fp32_encoder: SentenceEncoder) -> None:
    assert fp32_encoder.encode([]).shape == (0, 384)
    assert fp32_encoder.count_tokens([]) == []


def test_over_long_or_foreign_token_ids_are_refused(fp32_encoder: SentenceEncoder) -> None:
    with pytest.raises(ContextLengthExceeded, match="257 tokens"):
        fp32_encoder.encode_ids([[101] * 10, [101] * 257])
    with pytest.raises(InvalidRequest, match="token ids"):
        fp32_encoder.encode_ids([[101, 10**6, 102]])
    with pytest.raises(InvalidRequest, match="no tokens"):
        fp32_encoder.encode_ids([[101, 102], []])
