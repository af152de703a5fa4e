"""The LLM engine's prefix cache, on the real bundled models: a prompt that starts like an
earlier sequence reads those KV cells instead of decoding them, gives the same tokens, and the
cache gives its cells back whenever running requests need them. Asserted on the engine's own
counts (never on time)."""

from __future__ import annotations

import pytest

from aiaas.engines.llm.engine import EngineConfig, LlmEngine
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.params import SamplingParams

from .conftest import Run

TIMEOUT_S = 120

PREAMBLE = (
    "You are a careful assistant for a library. Answer in one short sentence, in plain "
    "English, and never invent book titles. The library opens at nine and closes at five. "
)


def _engine(model: LlamaModel, *, entries: int = 8, n_ctx: int = 4096, slots: int = 4) -> LlmEngine:
    engine = LlmEngine(
        model,
        EngineConfig(
            n_slots=slots,
            n_ctx=n_ctx,
            context_length=1024,
            n_batch=256,
            n_threads=2,
            headroom_slots=0,
            prefix_cache_entries=entries,
        ),
        name="test",
    )
    engine.start()
    return engine


def _generate(engine: LlmEngine, prompt: list[int], new_tokens: int = 8) -> Run:
    run = Run()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    engine.submit(engine.request(prompt, params, max_new_tokens=new_tokens, sink=run.sink))
    assert run.done.wait(TIMEOUT_S), "the request never finished"
    assert run.failed is None, run.failed
    assert run.final is not None
    return run


@pytest.mark.parametrize("model_name", ["smollm2", "gemma"])
def test_a_repeated_prompt_is_read_from_the_cache_and_gives_the_same_tokens(
    model_name: str, request: pytest.FixtureRequest
) -> None:
    model: LlamaModel = request.getfixturevalue(model_name)  # gemma: sliding-window layers
    prompt = model.tokenize(PREAMBLE + "Question: when does the library open?", add_special=True)
    engine = _engine(model)
    try:
        first = _generate(engine, prompt)
        assert first.final is not None and first.final.cached_tokens == 0
        assert engine.stats().prefix_cache_entries == 1

        second = _generate(engine, prompt)
        assert second.final is not None
        # Every prompt token but the last, whose logits give the first new token.
        assert second.final.cached_tokens == len(prompt) - 1
        assert second.text == first.text
        assert engine.stats().cached_prompt_tokens == len(prompt) - 1
    finally:
        engine.close()


def test_a_prompt_that_shares_a_preamble_decodes_only_what_differs(smollm2: LlamaModel) -> None:
    engine = _engine(smollm2)
    reference = _engine(smollm2, entries=0)
    try:
        earlier = smollm2.tokenize(PREAMBLE + "Question: is it open now?", add_special=True)
        other = smollm2.tokenize(PREAMBLE + "Question: may I bring a dog?", add_special=True)
        common = next(i for i, (a, b) in enumerate(zip(earlier, other, strict=False)) if a != b)
        assert common > 16  # the preamble
        _generate(engine, earlier)

        run = _generate(engine, other)
        assert run.final is not None and run.final.cached_tokens == common
        uncached = _generate(reference, other)
        assert uncached.final is not None and uncached.final.cached_tokens == 0
        assert run.text == uncached.text
    finally:
        engine.close()
        reference.close()


def test_a_follow_up_turn_reuses_the_previous_answer(smollm2: LlamaModel) -> None:
    """The tokens a request generated stay cached too: a chat's next turn, which repeats the
    whole conversation, decodes only the new message."""
    engine = _engine(smollm2)
    try:
        prompt = smollm2.tokenize(PREAMBLE + "Question: when does it close?", add_special=True)
        first = _generate(engine, prompt, new_tokens=12)
        assert first.final is not None and first.final.completion_tokens > 1
        answer = smollm2.tokenize(first.text, add_special=False)
        follow_up = (
            prompt + answer + smollm2.tokenize(" Thanks. And on Sundays?", add_special=False)
        )
        run = _generate(engine, follow_up)
        assert run.final is not None
        # The first prompt and the answer's tokens, as far as the answer re-tokenises alike.
        assert run.final.cached_tokens > len(prompt)
    finally:
        engine.close()


def test_cached_prefixes_give_their_cells_to_running_requests(smollm2: LlamaModel) -> None:
    """A small KV cache: every new request needs cells that cache entries hold, so entries go
    (least recently used first) and every request still completes."""
    n_ctx = 1024
    engine = _engine(smollm2, entries=16, n_ctx=n_ctx, slots=2)
    try:
        runs = []
        for index in range(12):
            prompt = smollm2.tokenize(
                f"{PREAMBLE}Question {index}: what is {index} plus {index}?", add_special=True
            )
            runs.append(_generate(engine, prompt, new_tokens=200 + index))
            stats = engine.stats()
            assert stats.prefix_cache_cells + stats.reserved_cells <= n_ctx
        stats = engine.stats()
        assert 0 < stats.prefix_cache_entries < 12  # some were evicted to make room
        assert all(run.final is not None for run in runs)
    finally:
        engine.close()


def test_without_entries_nothing_is_cached(smollm2: LlamaModel) -> None:
    engine = _engine(smollm2, entries=0)
    try:
        prompt = smollm2.tokenize(
            PREAMBLE + "Question: when does the library open?", add_special=True
        )
        _generate(engine, prompt)
        run = _generate(engine, prompt)
        assert run.final is not None and run.final.cached_tokens == 0
        assert engine.stats().prefix_cache_entries == 0
    finally:
        engine.close()


def test_a_cache_that_never_hits_shrinks_and_a_hit_restores_it(smollm2: LlamaModel) -> None:
    """Idle entries are not free (their cells widen what every step's attention covers): after
    as many lookups in a row as it has entries without a hit, the cache halves, down to two."""
    words = ["apple", "birch", "cedar", "dune", "ember", "fjord", "grove", "heron", "iris"]
    words += ["juniper", "kelp", "lotus", "moss", "nettle", "oak", "pine", "quince"]
    prompts = [smollm2.tokenize(f"{w.title()}. " + PREAMBLE, add_special=True) for w in words]
    engine = _engine(smollm2, entries=8)
    try:
        for prompt in prompts[:13]:  # 1 stored, then 12 misses: 8 -> 4 -> 2 entries
            run = _generate(engine, prompt, new_tokens=2)
            assert run.final is not None and run.final.cached_tokens == 0
        assert engine.stats().prefix_cache_entries == 2
        again = _generate(engine, prompts[12], new_tokens=2)
        assert again.final is not None and again.final.cached_tokens == len(prompts[12]) - 1
        for prompt in prompts[13:]:  # the hit restored 8 entries: four misses keep them all
            _generate(engine, prompt, new_tokens=2)
        assert engine.stats().prefix_cache_entries == 6
    finally:
        engine.close()
