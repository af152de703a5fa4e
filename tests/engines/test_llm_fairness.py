"""Fair admission in the real LLM engine: a tenant flooding it with 32 streams cannot starve
another. Asserted on the engine's admission order (never on time), with the bundled SmolLM2."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiaas.engines.llm.bundled import smollm2_path
from aiaas.engines.llm.engine import EngineConfig, LlmEngine
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.params import Event, Failed, Final, SamplingParams
from aiaas.scheduling.fair import make_policy

SLOTS = 4
FLOOD = 32
QUIET = 4
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaModel]:
    loaded = LlamaModel(smollm2_path(Path(tmp_path_factory.mktemp("models"))))
    yield loaded
    loaded.close()


def _engine(model: LlamaModel, mode: str, *, headroom: int = 0) -> LlmEngine:
    return LlmEngine(
        model,
        EngineConfig(
            n_slots=SLOTS,
            n_ctx=4096,
            context_length=512,
            n_batch=256,
            n_threads=2,
            headroom_slots=headroom,
        ),
        name="smollm2",
        policy=make_policy(mode),  # type: ignore[arg-type]
    )


def _flood(model: LlamaModel, mode: str, *, quiet_weight: float = 1.0) -> tuple[list[str], int]:
    """32 requests from `noisy`, then 4 from `quiet` once the engine is busy; the admission
    order, and how many admissions came before the quiet tenant's requests arrived."""
    engine = _engine(model, mode)
    engine.start()
    done = threading.Semaphore(0)

    def sink(event: Event) -> None:
        if isinstance(event, Final):
            done.release()

    prompt = model.tokenize("Once upon a time, in a quiet village,", add_special=True)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)

    def request(tenant: str, weight: float = 1.0):  # type: ignore[no-untyped-def]
        return engine.request(
            prompt, params, max_new_tokens=NEW_TOKENS, sink=sink, tenant=tenant, weight=weight
        )

    try:
        for _ in range(FLOOD):
            engine.submit(request("noisy"))
        # Wait until the flood fills every slot and most of it still waits.
        while len(engine.admission_order()) < SLOTS:
            threading.Event().wait(0.005)
        before = len(engine.admission_order())
        for _ in range(QUIET):
            engine.submit(request("quiet", quiet_weight))
        for _ in range(FLOOD + QUIET):
            assert done.acquire(timeout=120), "a request never finished"
        return engine.admission_order(), before
    finally:
        engine.close()


def _quiet_positions(order: list[str], before: int) -> list[int]:
    """For each quiet request, how many admissions happened from its arrival to its own."""
    return [i - before + 1 for i, tenant in enumerate(order) if tenant == "quiet"]


@pytest.mark.slow
def test_flooding_tenant_cannot_starve_a_quiet_one(model: LlamaModel) -> None:
    order, before = _flood(model, "fair")
    assert order.count("noisy") == FLOOD and order.count("quiet") == QUIET
    assert before < FLOOD - QUIET, "the flood must still be waiting when the quiet tenant comes"
    # Start-time fair queueing: the quiet tenant's k-th request goes out within about 2k
    # admissions of its arrival (alternating with the flood), never behind the whole flood.
    positions = _quiet_positions(order, before)
    assert positions == sorted(positions)
    for k, position in enumerate(positions, start=1):
        assert position <= 2 * k + 1, (k, position, order)


@pytest.mark.slow
def test_weight_buys_a_larger_share_and_fifo_starves(model: LlamaModel) -> None:
    # Weight 4: the quiet tenant's four requests go out (almost) back to back.
    order, before = _flood(model, "fair", quiet_weight=4.0)
    positions = _quiet_positions(order, before)
    assert positions[-1] <= QUIET + 2, (positions, order)
    # The same load first come, first served: the quiet tenant waits behind the whole flood.
    order, before = _flood(model, "fifo")
    assert _quiet_positions(order, before)[0] == FLOOD - before + 1, order


@pytest.mark.slow
def test_headroom_lets_a_quiet_tenant_start_at_once(model: LlamaModel) -> None:
    """With one slot of headroom, once two tenants are active the flood holds at most
    SLOTS - 1 slots, and each later request of the quiet tenant starts in the free one."""
    engine = _engine(model, "fair", headroom=1)
    engine.start()
    finished: dict[str, threading.Semaphore] = {"noisy": threading.Semaphore(0)}
    prompt = model.tokenize("Once upon a time, in a quiet village,", add_special=True)
    long = SamplingParams(max_tokens=48, temperature=0.0)

    def submit(tenant: str, params: SamplingParams, done: threading.Semaphore) -> None:
        def sink(event: Event) -> None:
            if isinstance(event, Final):
                done.release()

        engine.submit(
            engine.request(
                prompt, params, max_new_tokens=params.max_tokens or 1, sink=sink, tenant=tenant
            )
        )

    try:
        for _ in range(FLOOD):
            submit("noisy", long, finished["noisy"])
        quiet_done = threading.Semaphore(0)
        short = SamplingParams(max_tokens=4, temperature=0.0)
        for _ in range(QUIET):
            submit("quiet", short, quiet_done)
            assert quiet_done.acquire(timeout=120)
            # Between the quiet tenant's requests the flood leaves the headroom free.
            assert engine.stats().busy_slots <= SLOTS - 1
        assert engine.stats().headroom_admissions >= QUIET - 1
        for _ in range(FLOOD):
            assert finished["noisy"].acquire(timeout=300)
    finally:
        engine.close()


@pytest.mark.slow
def test_a_step_cut_short_for_a_quiet_tenant_is_sent_again(model: LlamaModel) -> None:
    """A request taking the headroom cuts the running step short; llama.cpp drops that step's
    KV positions and the engine sends it again, so every request ends normally with all its
    tokens. A lost or doubled position would make the next llama_decode fail (llama.cpp
    requires consecutive positions per sequence), failing the requests."""
    engine = _engine(model, "fair", headroom=1)
    engine.start()
    # Long prompts make most of the engine's time prefill steps of n_batch tokens.
    story = "The old lighthouse keeper climbed the stairs again and counted every step. " * 30
    long_prompt = model.tokenize(story, add_special=True)
    short_prompt = model.tokenize("Once upon a time,", add_special=True)
    events: dict[str, list[Event]] = {"noisy": [], "quiet": []}
    done: dict[str, threading.Semaphore] = {t: threading.Semaphore(0) for t in events}

    def submit(tenant: str, prompt: list[int], new_tokens: int) -> None:
        def sink(event: Event) -> None:
            if isinstance(event, Final | Failed):
                events[tenant].append(event)
                done[tenant].release()

        params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
        engine.submit(
            engine.request(prompt, params, max_new_tokens=new_tokens, sink=sink, tenant=tenant)
        )

    try:
        flood, quiet = 12, 0
        for _ in range(flood):
            submit("noisy", long_prompt, 24)
        # The quiet tenant asks again as soon as it has its answer, while the flood runs.
        while engine.stats().preemptions < 2 and quiet < 40:
            submit("quiet", short_prompt, 2)
            quiet += 1
            assert done["quiet"].acquire(timeout=120)
        for _ in range(flood):
            assert done["noisy"].acquire(timeout=300)
        stats = engine.stats()
    finally:
        engine.close()
    assert stats.preemptions >= 1, "no step was ever cut short"
    assert stats.reserved_cells == 0 and stats.busy_slots == 0
    for tenant, new_tokens in (("noisy", 24), ("quiet", 2)):
        for event in events[tenant]:
            assert isinstance(event, Final), event
            assert event.completion_tokens == new_tokens or event.finish_reason == "stop"


def test_batch_lines_wait_behind_interactive_requests_and_leave_the_headroom(
    model: LlamaModel,
) -> None:
    """Background requests (batch lines) are admitted only when no interactive request waits,
    and never into the headroom: with only batch lines waiting, one slot stays free, so an
    interactive request arriving then starts at once."""
    engine = LlmEngine(
        model,
        EngineConfig(
            n_slots=SLOTS,
            n_ctx=4096,
            context_length=512,
            n_batch=256,
            n_threads=2,
            headroom_slots=1,
        ),
        name="smollm2",
        policy=make_policy("fair"),
    )
    done = threading.Semaphore(0)
    busy: list[int] = []

    def sink(event: Event) -> None:
        if isinstance(event, Final | Failed):
            busy.append(engine.stats().busy_slots)
            done.release()

    prompt = model.tokenize("Once upon a time, in a quiet village,", add_special=True)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)

    def request(tenant: str, background: bool):  # type: ignore[no-untyped-def]
        return engine.request(
            prompt,
            params,
            max_new_tokens=NEW_TOKENS,
            sink=sink,
            tenant=tenant,
            background=background,
        )

    try:
        # Submitted before the engine starts, batch lines first: the interactive ones still go
        # first, in the policy's order.
        for _ in range(8):
            engine.submit(request("org#batch", True))
        for _ in range(2):
            engine.submit(request("web", False))
        engine.start()
        for _ in range(10):
            assert done.acquire(timeout=120), "a request never finished"
        order = engine.admission_order()
        assert order[:2] == ["web", "web"], order
        # With only batch lines left, at most SLOTS - 1 ran at once (sampled as each ended).
        assert max(busy[2:]) <= SLOTS - 1, busy
    finally:
        engine.close()
