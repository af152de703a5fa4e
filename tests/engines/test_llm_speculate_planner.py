"""The speculation planner's parts without a model: n-gram guesses, their odds, the measured
step costs and the choice of how many guesses a step sends."""

from __future__ import annotations

import pytest

from aiaas.engines.llm.speculate import DraftOdds, Guess, NgramDrafter, StepCosts, plan_drafts


def test_the_drafter_proposes_what_followed_the_longest_earlier_match() -> None:
    drafter = NgramDrafter([5, 1, 2, 3, 9, 1, 2, 4, 1, 2], n_min=1, n_max=3)
    # "1 2" last occurred before "4": the 3-gram "4 1 2" never did, the 2-gram did.
    assert drafter.propose(3) == (2, [4, 1, 2])
    drafter.append(4)
    # "2 4" occurred once, followed by "1 2 4" (the guesses may run into the sequence's end).
    assert drafter.propose(4) == (3, [1, 2, 4])
    assert NgramDrafter([7, 8, 9], n_min=1, n_max=3).propose(4) == (0, [])
    assert NgramDrafter([7, 7], n_min=1, n_max=3).propose(2) == (1, [7])


def test_the_odds_follow_what_was_accepted() -> None:
    odds = DraftOdds(3, prior_weight=4.0)
    before = odds.chance(3, 0, 0)
    for _ in range(50):
        odds.record(3, accepted=4, tried=4)
        odds.record(1, accepted=0, tried=4)
    assert odds.chance(3, 0, 0) > 0.9 > before > odds.chance(1, 0, 0)
    # A sequence's own record counts on top of its n-gram length's.
    assert odds.chance(3, accepted=0, tried=20) < 0.3


def _costs(table: dict[int, float]) -> StepCosts:
    costs = StepCosts(smoothing=1.0)
    for rows, seconds in table.items():
        costs.observe(rows, 0, seconds)
    return costs


def _guesses(owners: int, per_owner: int, chance: float) -> list[Guess]:
    return [
        Guess(chance**depth, owner, depth - 1)
        for owner in range(owners)
        for depth in range(1, per_owner + 1)
    ]


def test_guesses_are_sent_where_rows_are_cheap_and_not_where_they_are_not() -> None:
    # 8 rows 40 ms, 16 rows 56 ms: eight likely guesses cost 16 ms for ~7 tokens.
    costs = _costs({8: 0.040, 12: 0.052, 16: 0.056, 20: 0.069, 24: 0.085})
    plan = plan_drafts(_guesses(8, 2, 0.9), costs, logit_rows=8, prompt_rows=0, room=100, tile=4)
    assert sum(plan.values()) == 8
    assert set(plan.values()) == {1}  # every sequence's first guess before anyone's second
    # At 16 rows the machine is saturated: twice the rows cost nearly twice the time.
    costs = _costs({rows: 0.056 + 0.003 * (rows - 16) for rows in range(16, 52, 4)})
    plan = plan_drafts(_guesses(16, 2, 0.9), costs, logit_rows=16, prompt_rows=0, room=100, tile=4)
    assert plan == {}


def test_rows_are_padded_to_the_tile_even_by_unlikely_guesses() -> None:
    # 15 rows cost more than 16 (the kernels' tile is 4 columns): one more row is free.
    costs = _costs({15: 0.077, 16: 0.055, 17: 0.070})
    plan = plan_drafts(_guesses(15, 1, 0.2), costs, logit_rows=15, prompt_rows=0, room=9, tile=4)
    assert sum(plan.values()) == 1


def test_a_step_with_a_prompt_only_pads_and_never_exceeds_the_room() -> None:
    costs = _costs({8: 0.040, 9: 0.050, 12: 0.045, 16: 0.047})
    costs.observe(8, 64, 0.110)  # teaches the cost of a prompt row
    plan = plan_drafts(_guesses(8, 4, 0.95), costs, logit_rows=9, prompt_rows=63, room=100, tile=4)
    assert sum(plan.values()) == 3  # 9 -> 12 rows, not more
    assert plan_drafts(_guesses(8, 4, 0.95), costs, logit_rows=9, prompt_rows=63, room=2) == {}


def test_a_row_count_never_measured_is_estimated_hopefully_then_learnt() -> None:
    costs = _costs({8: 0.040})
    estimate = costs.predict(12)
    assert estimate is not None and 0.040 < estimate < 0.040 * 12 / 8
    costs.observe(12, 0, 0.080)
    assert costs.predict(12) == pytest.approx(0.080)
    assert StepCosts().predict(4) is None
    # Prompt rows: only measured row counts, plus what a prompt row costs.
    assert costs.predict(10, prompt_rows=5) is None
