"""Speculative decoding in the LLM engine, on the real bundled models: guesses taken from the
sequence's own text are checked position by position, so the engine gives the very tokens it
gives without them (greedy and seeded sampling alike), never more than max_tokens, stops where
a stop string says, and leaves the KV cache as if it had decoded one token per step. Asserted on
the engine's own counts and outputs (never on time)."""

from __future__ import annotations

from typing import Literal

import pytest

from aiaas.engines.llm.engine import LlmEngine
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.params import EngineStats, SamplingParams

from .conftest import Run, common_greedy_prefix, started_engine, unstarted_engine

TIMEOUT_S = 120

# Text that repeats itself, so the model's continuation is predictable from the prompt (the
# guesses hit). LOOP's is far from any near-tie (which requests share a step moves the logits,
# conftest.NEAR_TIE); SmolLM2's continuation of COUNTING is not ("one two four three, ...": " four"
# and " three" within 0.03 at its 11th token), so concurrent runs compare it up to a near-tie.
LOOP = "red green blue, " * 6 + "red green"
COUNTING = "Counting: one two three four, one two three four, one two three four, one two"


def _engine(
    model: LlamaModel,
    *,
    drafts: int,
    policy: Literal["auto", "always"] = "always",
    slots: int = 4,
    cache_entries: int = 0,
) -> LlmEngine:
    return started_engine(
        model,
        n_slots=slots,
        prefix_cache_entries=cache_entries,
        draft_tokens=drafts,
        draft_policy=policy,
    )


def _submit(engine: LlmEngine, prompt: list[int], params: SamplingParams) -> Run:
    run = Run()
    engine.submit(
        engine.request(prompt, params, max_new_tokens=params.max_tokens or 32, sink=run.sink)
    )
    return run


def _finished(run: Run) -> Run:
    assert run.done.wait(TIMEOUT_S), "the request never finished"
    assert run.failed is None, run.failed
    assert run.final is not None
    return run


def _generate(engine: LlmEngine, prompt: list[int], params: SamplingParams) -> Run:
    return _finished(_submit(engine, prompt, params))


def _with_and_without_guesses(
    model: LlamaModel, prompt: list[int], params: SamplingParams
) -> tuple[Run, Run, EngineStats]:
    """The same request on an engine without guesses and on one that sends every guess it
    finds: (plain run, speculating run, the speculating engine's stats)."""
    plain, speculating = _engine(model, drafts=0), _engine(model, drafts=4)
    try:
        expected = _generate(plain, prompt, params)
        got = _generate(speculating, prompt, params)
        assert plain.stats().draft_tokens == 0
        return expected, got, speculating.stats()
    finally:
        plain.close()
        speculating.close()


def _greedy(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize("model_name", ["smollm2", "gemma"])
def test_greedy_tokens_are_the_same_with_and_without_guesses(
    model_name: str, request: pytest.FixtureRequest
) -> None:
    model: LlamaModel = request.getfixturevalue(model_name)  # gemma: sliding-window layers
    prompt = model.tokenize(LOOP, add_special=True)
    expected, got, stats = _with_and_without_guesses(model, prompt, _greedy(40))
    assert got.text == expected.text
    assert got.final is not None and expected.final is not None
    assert got.final.completion_tokens == expected.final.completion_tokens == 40
    assert got.final.finish_reason == expected.final.finish_reason
    # The loop is guessed right: most tokens came without a step of their own.
    assert stats.accepted_draft_tokens > 0
    assert stats.accepted_draft_tokens <= stats.draft_tokens
    assert stats.generated_tokens == 40
    assert stats.steps < 40 - stats.accepted_draft_tokens // 2


def test_seeded_sampling_draws_the_same_tokens(smollm2: LlamaModel) -> None:
    """Sampling runs position by position with the same random draws, guesses or not."""
    prompt = smollm2.tokenize(COUNTING, add_special=True)
    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=1234)
    expected, got, stats = _with_and_without_guesses(smollm2, prompt, params)
    assert stats.draft_tokens > 0
    assert got.text == expected.text


def test_guesses_never_run_past_max_tokens_or_a_stop_string(smollm2: LlamaModel) -> None:
    prompt = smollm2.tokenize(LOOP, add_special=True)
    engine, plain = _engine(smollm2, drafts=4), _engine(smollm2, drafts=0)
    try:
        for max_tokens in (1, 2, 3, 5, 9):
            run = _generate(engine, prompt, _greedy(max_tokens))
            assert run.final is not None
            assert run.final.completion_tokens == max_tokens
            assert run.final.finish_reason == "length"
        stopped = _generate(engine, prompt, _greedy(40, stop=("green",)))
        reference = _generate(plain, prompt, _greedy(40, stop=("green",)))
        assert engine.stats().draft_tokens > 0
        assert engine.stats().reserved_cells == 0
    finally:
        engine.close()
        plain.close()
    assert stopped.final is not None and reference.final is not None
    assert stopped.final.finish_reason == "stop"
    assert stopped.text == reference.text
    assert "green" not in stopped.text
    assert stopped.final.completion_tokens == reference.final.completion_tokens


def test_each_accepted_guess_has_its_own_logprobs(smollm2: LlamaModel) -> None:
    prompt = smollm2.tokenize(LOOP, add_special=True)
    expected, got, stats = _with_and_without_guesses(smollm2, prompt, _greedy(24, logprobs=2))
    assert stats.accepted_draft_tokens > 0
    assert got.final is not None
    assert len(got.logprobs) == got.final.completion_tokens == len(expected.logprobs)
    for ours, theirs in zip(got.logprobs, expected.logprobs, strict=True):
        assert ours.token == theirs.token
        assert ours.logprob == pytest.approx(theirs.logprob, abs=2e-2)
        assert [t[0] for t in ours.top] == [t[0] for t in theirs.top]


def test_concurrent_streams_with_guesses_complete_and_keep_the_cache_whole(
    smollm2: LlamaModel,
) -> None:
    """Several sequences guessing in the same steps; the KV positions of wrong guesses are
    dropped, so the prefix cache, which keeps what a finished sequence decoded, serves a
    repeat of a prompt with the same tokens afterwards.

    The four prompts wait until the engine starts, so it prefills them in one step of 64+ rows,
    where each reference prefills alone in fewer: llama.cpp's attention then rounds differently,
    so the tokens are the same up to a near-tie where the two part (COUNTING's 11th token: " four"
    0.023 above " three" alone, " three" 0.15 above " four" here; conftest.NEAR_TIE)."""
    engine = unstarted_engine(
        smollm2, draft_tokens=4, draft_policy="always", prefix_cache_entries=8
    )
    plain = _engine(smollm2, drafts=0)
    prompts = [
        smollm2.tokenize(text, add_special=True)
        for text in (LOOP, COUNTING, "A, B, C, A, B, C, A, B, C, A, B", LOOP + ", red")
    ]
    params = _greedy(32, logprobs=2)
    try:
        runs = [_submit(engine, prompt, params) for prompt in prompts]
        engine.start()
        for run in runs:
            _finished(run)
        expected = [_generate(plain, prompt, params) for prompt in prompts]
        again = _generate(engine, prompts[0], params)
        stats = engine.stats()
    finally:
        engine.close()
        plain.close()
    shared = [common_greedy_prefix(run, want) for run, want in zip(runs, expected, strict=True)]
    # LOOP and the letters are far from any near-tie: every token, as without guesses
    assert shared[0] == shared[2] == shared[3] == 32
    assert again.final is not None and again.final.cached_tokens == len(prompts[0]) - 1
    assert common_greedy_prefix(again, expected[0]) == 32
    assert stats.accepted_draft_tokens > 0
    assert stats.busy_slots == 0 and stats.reserved_cells == 0


def test_the_auto_policy_gives_the_same_tokens(gemma: LlamaModel) -> None:
    """Whatever the planner decides from its measured step costs, the tokens do not change."""
    prompt = gemma.tokenize(COUNTING, add_special=True)
    plain, auto = _engine(gemma, drafts=0), _engine(gemma, drafts=4, policy="auto")
    try:
        expected = [_generate(plain, prompt, _greedy(24)).text for _ in range(3)]
        got = [_generate(auto, prompt, _greedy(24)).text for _ in range(3)]
    finally:
        plain.close()
        auto.close()
    assert got == expected
