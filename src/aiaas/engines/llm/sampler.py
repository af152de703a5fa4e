"""Per-slot token selection: vectorised argmax for plain greedy, llama.cpp samplers otherwise.

Plain greedy decoding (temperature 0, no bias, penalty or grammar) needs no sampler at all: one
numpy argmax over every greedy slot's logits row picks all their tokens at once. Everything else
runs llama.cpp's own sampler chain for that slot, which keeps penalties and grammar state across
steps exactly as llama.cpp defines them.
"""

from __future__ import annotations

import ctypes
import secrets

import llama_cpp
import numpy as np

from aiaas.engines.llm.params import SamplingParams
from aiaas.errors import InvalidRequest

# How many recent tokens the repetition/presence/frequency penalties look at.
PENALTY_WINDOW = 256


class SamplerChain:
    """A llama.cpp sampler chain owned by one slot for one request; free it when done."""

    def __init__(
        self, vocab: llama_cpp.llama_vocab_p, n_vocab: int, params: SamplingParams
    ) -> None:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(chain_params)
        try:
            self._build(vocab, n_vocab, params)
        except BaseException:
            self.close()
            raise

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        if not sampler:
            raise InvalidRequest("A sampling parameter was rejected by the engine.")
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def _build(self, vocab: llama_cpp.llama_vocab_p, n_vocab: int, params: SamplingParams) -> None:
        if params.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
            for i, (token, bias) in enumerate(params.logit_bias.items()):
                biases[i].token = token
                biases[i].bias = bias
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
        if (
            params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
        ):
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    PENALTY_WINDOW,
                    params.repetition_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
            if not grammar:
                raise InvalidRequest(
                    "The output format could not be compiled into a grammar.",
                    param="response_format",
                )
            llama_cpp.llama_sampler_chain_add(self._chain, grammar)
        if params.greedy:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        self._add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx: llama_cpp.llama_context_p, batch_index: int) -> int:
        """Pick the token for the output at `batch_index` and advance the chain's state."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def logits_view(ctx: llama_cpp.llama_context_p, n_outputs: int, n_vocab: int) -> np.ndarray:
    """The decode's output logits as a zero-copy [n_outputs, n_vocab] array (valid until the
    next decode)."""
    pointer = llama_cpp.llama_get_logits(ctx)
    buffer = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float * (n_outputs * n_vocab))).contents
    return np.frombuffer(buffer, dtype=np.float32).reshape(n_outputs, n_vocab)


def log_softmax(row: np.ndarray) -> np.ndarray:
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())
