"""Speculative decoding from the sequence itself: drafts, their odds, and what a step costs.

A sequence's recent words often came before: a prompt's names and phrases come back in the
answer, lists and code repeat their shape, and a small model at low temperature loops. The
tokens that followed the last earlier occurrence of the sequence's latest n-gram are a free guess
at what comes next ("prompt lookup" drafting, vLLM's `ngram` method). The engine sends a slot's
guesses in the same `llama_decode` as its next token, each with logits; sampling then runs
position by position exactly as without them and goes on while the sampled token equals the
guess. The output is the very same tokens (the same sampler calls in the same order, the same
random draws); only the KV positions after the first miss are dropped.

Whether a guess pays depends on the model and the machine: each is one more row through the
model (on a CPU with a 262k-token vocabulary, mostly through the output layer), and is worth a
token only if accepted; and because llama.cpp's kernels work in tiles, one more row can even make
a step cheaper. So the engine measures its own steps by row count as it runs (`StepCosts`),
tracks how often guesses are accepted (`DraftOdds`), and sends the guesses that maximise the
step's expected tokens per second (`plan_drafts`). `GuessPlanner` is what the engine calls: each
step, the guesses its decoding sequences send (`plan`); after sampling, how many were kept
(`settle`) and every token that came (`see`), which also scores the guesses found but not sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DRAFT_NGRAM = (1, 3)  # lengths of the n-grams looked up for guesses, shortest first


class NgramDrafter:
    """One sequence's tokens, and where each of its recent n-grams last occurred."""

    __slots__ = ("_index", "_n_max", "_n_min", "tokens")

    def __init__(self, tokens: list[int], *, n_min: int = 2, n_max: int = 3) -> None:
        self._n_min, self._n_max = n_min, n_max
        # n -> {n-gram: index of the token that followed its latest occurrence}
        self._index: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(n_min, n_max + 1)
        }
        self.tokens: list[int] = []
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        tokens = self.tokens
        tokens.append(token)
        end = len(tokens) - 1  # the n-grams ending just before `token` are followed by it
        for n, index in self._index.items():
            if end >= n:
                index[tuple(tokens[end - n : end])] = end

    def propose(self, limit: int) -> tuple[int, list[int]]:
        """(n, up to `limit` tokens): what followed the latest earlier occurrence of the longest
        n-gram that ends the sequence; (0, []) when none occurred before."""
        tokens = self.tokens
        length = len(tokens)
        for n in range(self._n_max, self._n_min - 1, -1):
            if length <= n:
                continue
            at = self._index[n].get(tuple(tokens[length - n :]))
            if at is not None:
                return n, tokens[at : at + limit]
        return 0, []


class DraftOdds:
    """How likely a guess is to be accepted, given the length of the n-gram that found it and
    the sequence's own record: decayed counts per n-gram length, the sequence's counts on top
    (a Beta prior worth `prior_weight` guesses)."""

    def __init__(self, n_max: int, *, decay: float = 0.995, prior_weight: float = 4.0) -> None:
        self._decay = decay
        self._prior_weight = prior_weight
        # Before any evidence, worth two guesses: better than even, so that a step whose rows
        # look cheap tries some and the evidence can start.
        self._accepted = [1.2] * (n_max + 1)
        self._tried = [2.0] * (n_max + 1)

    def chance(self, n: int, accepted: int, tried: int) -> float:
        prior = self._accepted[n] / self._tried[n]
        return (accepted + self._prior_weight * prior) / (tried + self._prior_weight)

    def record(self, n: int, accepted: int, tried: int) -> None:
        self._accepted[n] = self._accepted[n] * self._decay + accepted
        self._tried[n] = self._tried[n] * self._decay + tried


class StepCosts:
    """What a step costs, by its number of rows with logits, from the engine's own steps.

    Measured rather than modelled because it is far from linear: llama.cpp's CPU matrix kernels
    work on tiles of four columns, so on a 2-core machine with Gemma 3 (whose output layer is most
    of the work) a step with 8 rows takes 38 ms, with 7 rows 53 ms and with 15 rows 74 ms against
    55 ms for 16. A row count not seen yet is estimated hopefully from the known ones, so that the
    planner tries it once and learns it."""

    def __init__(self, *, smoothing: float = 0.2) -> None:
        self._smoothing = smoothing
        self._seconds: dict[int, float] = {}  # rows with logits -> seconds (steps without prompt)
        self._per_prompt_row = 0.0  # seconds a step's prompt token adds

    def observe(self, logit_rows: int, prompt_rows: int, seconds: float) -> None:
        if logit_rows <= 0:
            return
        known = self._seconds.get(logit_rows)
        if prompt_rows == 0:
            self._seconds[logit_rows] = (
                seconds if known is None else known + self._smoothing * (seconds - known)
            )
        elif known is not None:
            per_row = max(seconds - known, 0.0) / prompt_rows
            self._per_prompt_row += self._smoothing * (per_row - self._per_prompt_row)

    def predict(self, logit_rows: int, prompt_rows: int = 0) -> float | None:
        """Seconds for a step with these rows; None when unknown. Only steps without prompt
        rows measure a row count, so a count not measured yet is estimated only for them."""
        seconds = self._seconds.get(logit_rows)
        if seconds is None:
            seconds = None if prompt_rows else self._estimate(logit_rows)
            if seconds is None:
                return None
        return seconds + self._per_prompt_row * prompt_rows

    def _estimate(self, rows: int) -> float | None:
        """Hopeful, so that it gets tried: the largest smaller step known, plus a quarter of its
        average row per extra row; else the smallest larger step known."""
        below = max((known for known in self._seconds if known < rows), default=None)
        if below is not None:
            return self._seconds[below] * (1 + 0.25 * (rows - below) / below)
        above = min((known for known in self._seconds if known > rows), default=None)
        return None if above is None else self._seconds[above]


@dataclass(frozen=True, slots=True)
class Guess:
    chance: float  # that this guess and the ones before it in its sequence are all accepted
    owner: int  # index of the sequence among the candidates
    depth: int  # 0 for a sequence's first guess


def plan_drafts(
    guesses: list[Guess],
    costs: StepCosts,
    *,
    logit_rows: int,
    prompt_rows: int,
    room: int,
    tile: int = 1,
    margin: float = 0.2,
) -> dict[int, int]:
    """How many guesses each sequence sends: the prefix of the most likely guesses that
    maximises the step's expected tokens per second; owner -> count. At most `room` guesses,
    and only counts that bring the step's rows with logits to a multiple of `tile` (the row
    tiling of the matrix kernels: other counts cost more and only spread the measurements).
    Guesses must promise `margin` more tokens per second than none: what the step costs do not
    show (Python per token, KV churn, streams falling out of step) takes the rest. A step with
    prompt rows only pads its rows to the tile: its cost is dominated by the prompt and rows
    added to it look cheaper than they are."""
    base = costs.predict(logit_rows, prompt_rows)
    if prompt_rows:
        room = min(room, -logit_rows % tile)
    if not guesses or room <= 0 or base is None:
        return {}
    # A sequence's guesses are only worth as much as the ones before them: sorting by chance,
    # then depth, keeps every sequence's choice a prefix.
    ranked = sorted(guesses, key=lambda g: (-g.chance, g.depth))[:room]
    best_k, best_rate = 0, (1 + margin) * logit_rows / base
    expected = float(logit_rows)
    for k, guess in enumerate(ranked, start=1):
        expected += guess.chance
        if (logit_rows + k) % tile:
            continue
        seconds = costs.predict(logit_rows + k, prompt_rows)
        if seconds is not None and expected / seconds > best_rate:
            best_k, best_rate = k, expected / seconds
    plan: dict[int, int] = {}
    for guess in ranked[:best_k]:
        plan[guess.owner] = plan.get(guess.owner, 0) + 1
    return plan


class SequenceGuesses:
    """One sequence's drafter and its record: guesses sent and kept (`tried`, `accepted`), and
    the guesses found but not sent (`shadow`), checked against the tokens as they come all the
    same, so the odds keep learning while the planner sends none: (n-gram length, guesses, how
    many hit)."""

    __slots__ = ("accepted", "drafter", "shadow", "tried")

    def __init__(self, prompt: list[int]) -> None:
        self.drafter = NgramDrafter(prompt, n_min=DRAFT_NGRAM[0], n_max=DRAFT_NGRAM[-1])
        self.tried = 0
        self.accepted = 0
        self.shadow: tuple[int, tuple[int, ...], int] | None = None


class GuessPlanner:
    """The engine's speculation: which guesses a step sends, and what the engine learns from
    its steps and their tokens (the step costs and the guesses' odds).

    `draft_tokens`: most guesses one sequence sends with its next token. `policy`: "auto" sends
    the guesses the measured step costs say pay, "always" every guess found. `tile`: guesses
    bring a step's rows with logits to a multiple of it (see `plan_drafts`)."""

    def __init__(
        self,
        *,
        enabled: bool,
        draft_tokens: int,
        policy: Literal["auto", "always"],
        tile: int,
    ) -> None:
        self.enabled = enabled and draft_tokens > 0
        self.tile = tile
        self._draft_tokens = draft_tokens
        self._policy = policy
        self._odds = DraftOdds(DRAFT_NGRAM[-1])
        self._costs = StepCosts()

    def sequence(self, prompt: list[int]) -> SequenceGuesses | None:
        """A new sequence's drafter and record; None while speculation is off."""
        return SequenceGuesses(prompt) if self.enabled else None

    def plan(
        self,
        decoding: Sequence[tuple[SequenceGuesses, int]],
        prompts_left: Sequence[int],
        *,
        n_batch: int,
    ) -> dict[int, tuple[int, tuple[int, ...]]]:
        """Index in `decoding` -> (n-gram length, guesses) for the sequences that send some
        this step. `decoding`: each decoding sequence's record and how many tokens it may still
        generate (its next one included); `prompts_left`: the prompt tokens each prefilling
        sequence has left, in the order the step takes them (while the batch has room)."""
        found: list[tuple[int, list[int]]] = []
        candidates: list[Guess] = []
        for seq, left in decoding:
            limit = min(self._draft_tokens, left - 1)
            ngram, tokens = seq.drafter.propose(limit) if limit > 0 else (0, [])
            found.append((ngram, tokens))
            if not tokens:
                continue
            chance = self._odds.chance(ngram, seq.accepted, seq.tried)
            chain = 1.0
            for depth in range(len(tokens)):
                chain *= chance
                candidates.append(Guess(chain, len(found) - 1, depth))
        if not candidates:
            return {}
        # The rows the step has without guesses (decoding sequences, then prompt chunks while
        # the batch has room); guesses take only the room left.
        room = n_batch - len(decoding)
        logit_rows, prompt_rows = len(decoding), 0
        for remaining in prompts_left:
            taken = min(remaining, room)
            room -= taken
            logit_rows += taken == remaining
            prompt_rows += taken - (taken == remaining)
        if self._policy == "always":
            plan: dict[int, int] = {}
            for owner, (_, tokens) in enumerate(found):
                plan[owner] = min(len(tokens), room)
                room -= plan[owner]
        else:
            plan = plan_drafts(
                candidates,
                self._costs,
                logit_rows=logit_rows,
                prompt_rows=prompt_rows,
                room=room,
                tile=self.tile,
            )
        for owner, (ngram, tokens) in enumerate(found):
            seq = decoding[owner][0]
            if plan.get(owner):
                seq.shadow = None  # sent: checked for real
            elif tokens and seq.shadow is None:
                seq.shadow = (ngram, tuple(tokens), 0)
        return {
            owner: (found[owner][0], tuple(found[owner][1][:count]))
            for owner, count in plan.items()
            if count
        }

    def observe(self, logit_rows: int, prompt_rows: int, seconds: float) -> None:
        """A step's rows and how long it took."""
        self._costs.observe(logit_rows, prompt_rows, seconds)

    def settle(self, seq: SequenceGuesses, ngram: int, accepted: int, tried: int) -> None:
        """Of the guesses a sequence sent (found by an n-gram of length `ngram`), sampling
        checked `tried` and kept `accepted`."""
        seq.tried += tried
        seq.accepted += accepted
        self._odds.record(ngram, accepted, tried)

    def see(self, seq: SequenceGuesses, token: int) -> None:
        """A token the sequence sampled: the drafter learns it, and the guesses found but not
        sent are scored against it."""
        seq.drafter.append(token)
        if seq.shadow is None:
            return
        ngram, guesses, hits = seq.shadow
        if token == guesses[hits]:
            hits += 1
            if hits < len(guesses):
                seq.shadow = (ngram, guesses, hits)
                return
            self.settle(seq, ngram, hits, hits)
        else:
            self.settle(seq, ngram, hits, hits + 1)
        seq.shadow = None
