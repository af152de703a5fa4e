"""Typed engine input and output: what a request asks of the engine and what it gets back,
and the engine's counts (`EngineStats`).

Plain dataclasses with no llama.cpp import, so the protocol and observability layers can use
them cheaply.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k: the chosen token plus the top k
    grammar: str | None = None  # GBNF

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_sampler_chain(self) -> bool:
        """False when plain argmax over the logits gives the same token (the fast path)."""
        return not (
            self.greedy
            and not self.logit_bias
            and self.grammar is None
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.repetition_penalty == 1.0
        )


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...]


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of generated text (possibly empty while bytes or a stop prefix are held back)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Final:
    """The end of a generation, with its token counts."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of decoded
    text: str = ""  # text released at the end (held-back bytes), if any
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Failed:
    message: str


Event = Delta | Final | Failed


# Bucket bounds of the decode-step sizes: sequences (slots) and tokens in one llama_decode.
STEP_SEQUENCE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True, slots=True)
class SizeCounts:
    """How many steps had each size: `counts[i]` those of at most `bounds[i]` (the last entry:
    larger than every bound), and `total`, the sum of the sizes."""

    bounds: tuple[int, ...]
    counts: tuple[int, ...] = ()
    total: int = 0

    @property
    def observed(self) -> int:
        return sum(self.counts)


@dataclass(slots=True)
class SizeTally:
    """The engine thread's running tally behind a `SizeCounts` (plain numbers only)."""

    bounds: tuple[int, ...]
    counts: list[int] = field(default_factory=list)
    total: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, size: int) -> None:
        self.counts[bisect.bisect_left(self.bounds, size)] += 1
        self.total += size

    def snapshot(self) -> SizeCounts:
        return SizeCounts(self.bounds, tuple(self.counts), self.total)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """An engine's counts at one moment: its slots and line, and what it has done so far."""

    slots: int
    busy_slots: int
    waiting: int
    reserved_cells: int
    prompt_tokens: int
    generated_tokens: int
    steps: int
    headroom_admissions: int = 0
    preemptions: int = 0
    cached_prompt_tokens: int = 0
    prefix_cache_entries: int = 0
    prefix_cache_cells: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    onnx_head_steps: int = 0
    # Per llama_decode: the sequences (slots) with tokens in it, and its tokens (issue 29).
    step_sequences: SizeCounts = SizeCounts(STEP_SEQUENCE_BUCKETS)
    step_tokens: SizeCounts = SizeCounts(STEP_TOKEN_BUCKETS)
