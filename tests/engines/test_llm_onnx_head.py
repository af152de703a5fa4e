"""The output layer computed by ONNX Runtime (engines/llm/head.py), on the real bundled models:
it is the Q8_0 product of the GGUF's own blocks, the engine hands it the steps with several rows
with logits and gives the same tokens and logprobs as with llama.cpp's head, and a model whose
output layer is not Q8_0 keeps llama.cpp's. Asserted on outputs and counters, never on time."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from aiaas.engines.llm.engine import LlmEngine
from aiaas.engines.llm.gguf_index import Q8_0, output_matrix, read_tensor_table
from aiaas.engines.llm.head import OutputHead, agrees, dequantized, q8_0_output_blocks
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.params import SamplingParams
from aiaas.engines.llm.quantize import requantize

from .conftest import Run, common_greedy_prefix, started_engine, unstarted_engine

TIMEOUT_S = 120
# Texts that repeat themselves. Their greedy continuations are mostly far from near-ties, where
# the last bits of the logits pick the token, but not all: SmolLM2's of the second ("one two four
# three, ...") has " four" 0.023 above " three" at its 11th token.
PROMPTS = [
    "red green blue, " * 6 + "red green",
    "Counting: one two three four, one two three four, one two three four, one two",
    "Monday Tuesday Wednesday, Monday Tuesday Wednesday, Monday Tuesday",
    "a b c d e f g, a b c d e f g, a b c d",
]


# Most the gap between a position's top two may differ between the two heads given the same
# hidden states, summed over both (common_greedy_prefix): teacher-forced over 256 greedy
# positions of each bundled model, ONNX Runtime's and llama.cpp's gaps were within 0.005.
HEAD_NEAR_TIE = 0.1


def _exact(path: Path, model: LlamaModel, hidden: np.ndarray) -> np.ndarray:
    """hidden @ the dequantized Q8_0 output matrix, in float64."""
    n_embd = llama_cpp.llama_model_n_embd(model.handle)
    blocks = q8_0_output_blocks(path, n_embd=n_embd, n_vocab=model.n_vocab)
    assert blocks is not None
    return hidden.astype(np.float64) @ dequantized(blocks).T


@pytest.mark.parametrize("name", ["smollm2", "gemma"])
def test_the_onnx_head_is_the_product_of_the_files_own_blocks(
    name: str, request: pytest.FixtureRequest
) -> None:
    model: LlamaModel = request.getfixturevalue(name)
    n_embd = llama_cpp.llama_model_n_embd(model.handle)
    head = OutputHead.load(model.info.path, n_embd=n_embd, n_vocab=model.n_vocab, threads=2)
    assert head is not None
    hidden = np.random.default_rng(3).standard_normal((5, n_embd)).astype(np.float32)
    ours = np.empty((5, model.n_vocab), dtype=np.float32)
    head.compute(hidden, ours)
    exact = _exact(model.info.path, model, hidden)
    # int8 activations in blocks of 32, as llama.cpp's kernel: within a few per mille
    tolerance = 0.01 * np.abs(exact).max()
    assert np.abs(ours - exact).max() < tolerance
    # its pick is the exact best or within the tolerance of it (random rows have near-ties)
    picked = exact[np.arange(5), ours.argmax(axis=1)]
    assert np.all(picked >= exact.max(axis=1) - 2 * tolerance)
    assert agrees(ours, exact.astype(np.float32))
    assert not agrees(ours + 2.0, exact.astype(np.float32))  # a head off by whole units is not


def _engine(model: LlamaModel, *, onnx_head: bool, drafts: int = 0) -> LlmEngine:
    return started_engine(model, onnx_head=onnx_head, draft_tokens=drafts, draft_policy="always")


def _run_all(
    engine: LlmEngine, model: LlamaModel, params: SamplingParams, *, start: bool = False
) -> list[Run]:
    """Every prompt at once, then their runs; `start`: start the engine once all are queued."""
    runs = []
    for prompt in PROMPTS:
        run = Run()
        tokens = model.tokenize(prompt, add_special=True)
        engine.submit(engine.request(tokens, params, max_new_tokens=24, sink=run.sink))
        runs.append(run)
    if start:
        engine.start()
    for run in runs:
        assert run.done.wait(TIMEOUT_S)
        assert run.failed is None, run.failed
    return runs


@pytest.mark.parametrize("name", ["smollm2", "gemma"])
def test_concurrent_streams_get_the_same_tokens_and_logprobs_from_either_head(
    name: str, request: pytest.FixtureRequest
) -> None:
    """The four requests wait until the engine starts, so with either head it runs the very same
    steps (the same rows together, the same KV cells): what differs is the head alone. (How
    many rows share a step moves the logits much more than the head does, conftest.NEAR_TIE.)"""
    model: LlamaModel = request.getfixturevalue(name)
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=3)
    results = {}
    for onnx_head in (True, False):
        engine = unstarted_engine(model, onnx_head=onnx_head)
        try:
            results[onnx_head] = _run_all(engine, model, params, start=True)
            stats = engine.stats()
        finally:
            engine.close()
        if onnx_head:
            assert stats.onnx_head_steps > 0  # four streams decode together
        else:
            assert stats.onnx_head_steps == 0
    for ours, llamas in zip(results[True], results[False], strict=True):
        shared = common_greedy_prefix(ours, llamas, near_tie=HEAD_NEAR_TIE)
        for a, b in zip(ours.logprobs[:shared], llamas.logprobs[:shared], strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=0.35)


def test_guesses_checked_by_the_onnx_head_keep_the_plain_greedy_tokens(gemma: LlamaModel) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24)
    plain = _engine(gemma, onnx_head=False)
    try:
        expected = [run.text for run in _run_all(plain, gemma, params)]
    finally:
        plain.close()
    guessing = _engine(gemma, onnx_head=True, drafts=4)
    try:
        texts = [run.text for run in _run_all(guessing, gemma, params)]
        stats = guessing.stats()
    finally:
        guessing.close()
    assert texts == expected
    assert stats.accepted_draft_tokens > 0 and stats.onnx_head_steps > 0


def test_a_model_whose_output_layer_is_not_q8_0_keeps_llamas_head(
    smollm2: LlamaModel, tmp_path: Path
) -> None:
    other = tmp_path / "smollm2-f16.gguf"
    requantize(smollm2.info.path, other, "F16", threads=2)
    entry = output_matrix(read_tensor_table(other))
    assert entry is not None and entry.kind != Q8_0
    model = LlamaModel(other)
    try:
        n_embd = llama_cpp.llama_model_n_embd(model.handle)
        assert OutputHead.load(other, n_embd=n_embd, n_vocab=model.n_vocab, threads=2) is None
        engine = _engine(model, onnx_head=True)
        try:
            runs = _run_all(engine, model, SamplingParams(temperature=0.0, max_tokens=8))
            assert all(run.final is not None for run in runs)
            assert engine.stats().onnx_head_steps == 0
        finally:
            engine.close()
    finally:
        model.close()


def test_a_file_that_is_not_gguf_has_no_tensor_table(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_tensor_table(broken)


def test_a_seeded_request_draws_the_same_tokens_with_and_without_guesses(
    smollm2: LlamaModel,
) -> None:
    """Guesses make its steps several rows wide, which would send them to ONNX Runtime; a seeded
    request's steps keep llama.cpp's head, so its draws do not depend on them. (SmolLM2: there
    llama.cpp's own kernels for one row and for several agree closely enough for the draws at
    temperature 0.8; on Gemma they do not, guesses or not.)"""
    seeded = SamplingParams(temperature=0.8, max_tokens=32, seed=99)
    texts, steps = [], []
    for drafts in (0, 4):
        engine = _engine(smollm2, onnx_head=True, drafts=drafts)
        try:
            runs = [Run() for _ in PROMPTS]
            for prompt, run in zip(PROMPTS, runs, strict=True):
                tokens = smollm2.tokenize(prompt, add_special=True)
                engine.submit(engine.request(tokens, seeded, max_new_tokens=32, sink=run.sink))
                assert run.done.wait(TIMEOUT_S)  # one at a time: one row, or one and guesses
                assert run.failed is None, run.failed
            stats = engine.stats()
        finally:
            engine.close()
        texts.append([run.text for run in runs])
        steps.append((stats.accepted_draft_tokens, stats.onnx_head_steps))
    assert texts[0] == texts[1]
    assert steps[1][0] > 0  # guesses were sent and taken
    assert steps[0][1] == steps[1][1] == 0
