"""The engine's prefix cache: finished sequences' KV cells, kept for prompts that start the same.

When a request ends, the tokens in its KV cells (prompt and decoded completion) stay there under
a sequence id of the cache's own, sharing the cells (the engine's KV cache is unified, so
`llama_memory_seq_cp` only marks them). A new request whose prompt starts with cached tokens
copies that prefix the same way and decodes only the rest: a repeated system prompt, few-shot
preamble or earlier chat turn costs no prefill. Entries go least recently used first, whenever
running requests need their cells.

Only the engine thread uses it (`remember` with the engine's lock held, so that `stats` reads
`entries` and `cells` consistently).
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp
import numpy as np

LLAMA_MAX_SEQ = 256  # sequence ids one llama.cpp context accepts (slots and cache entries)


@dataclass(eq=False)
class _Cached:
    """A finished sequence's tokens, still in the KV cache under `seq_id`."""

    seq_id: int
    tokens: np.ndarray  # int32
    used: int  # when last used or stored (a tick)


class PrefixCache:
    """Up to `entries` finished sequences, under the sequence ids after the engine's slots'
    (`first_seq_id` on); `capacity` of them, since llama.cpp has `LLAMA_MAX_SEQ` in all.

    `n_ctx`: the KV cells the context has; entries give way to the cells running requests
    reserve. `min_tokens`: shorter prefixes are not worth an entry. `max_tokens`: the most
    tokens an entry holds (less than a sliding window, where the model has such layers)."""

    def __init__(
        self, *, first_seq_id: int, entries: int, min_tokens: int, max_tokens: int, n_ctx: int
    ) -> None:
        entries = max(0, min(entries, LLAMA_MAX_SEQ - first_seq_id))
        self.capacity = entries
        self._min_tokens = min_tokens
        self._max_tokens = max_tokens
        self._n_ctx = n_ctx
        self._memory: llama_cpp.llama_memory_t | None = None
        self._free = list(range(first_seq_id + entries - 1, first_seq_id - 1, -1))  # a stack
        self._cache: list[_Cached] = []
        self._cells = 0
        # Entries cost even when nothing reads them: their cells widen the span of the KV cache
        # that every step's attention and mask cover (at 16 streams on Gemma 3 with no hits,
        # 32 idle entries cost ~12 % of throughput). So the cache keeps as many entries as it
        # earns: after as many lookups in a row as it has entries with no hit, it halves (down to
        # 2); a hit restores the configured size.
        self._limit = entries
        self._misses = 0
        self._tick = 0

    def attach(self, memory: llama_cpp.llama_memory_t) -> None:
        """The KV memory of the engine's context (again whenever the context is opened)."""
        self._memory = memory

    @property
    def entries(self) -> int:
        return len(self._cache)

    @property
    def cells(self) -> int:
        return self._cells

    def reuse(self, seq_id: int, prompt: list[int]) -> int:
        """Share the longest cached prefix of `prompt` with `seq_id`; how many tokens it covers.

        The prompt's last token is always decoded again: its logits give the first token."""
        if not self._cache or len(prompt) <= self._min_tokens:
            return 0
        reuse = self._lookup(seq_id, prompt)
        self._size(hit=reuse > 0)
        return reuse

    def remember(self, seq_id: int, tokens: list[int], *, reserved: int) -> None:
        """Keep a finished sequence's KV cells (up to `max_tokens` of them) as an entry, unless
        a longer entry holds them already; entries that are its prefixes go. `reserved`: the
        cells running requests hold, which the entries must leave them."""
        if not self.capacity:
            return  # the cache is off
        tokens = tokens[: self._max_tokens]
        if len(tokens) < self._min_tokens:
            return
        if llama_cpp.llama_memory_seq_pos_min(self._memory, seq_id) != 0:
            return  # sliding-window layers dropped its start: the prefix is no longer whole
        held = np.asarray(tokens, dtype=np.int32)
        for entry in list(self._cache):
            common = _common_prefix(entry.tokens, held)
            if common == len(held):
                entry.used = self._next_tick()
                return
            if common == len(entry.tokens):
                self._drop(entry)
        if len(self._cache) >= self._limit:  # also when no sequence id is free
            self._drop_oldest()
        self.evict_until(self._n_ctx - reserved - len(held))
        if reserved + self._cells + len(held) > self._n_ctx:
            return
        entry = _Cached(seq_id=self._free.pop(), tokens=held, used=self._next_tick())
        llama_cpp.llama_memory_seq_cp(self._memory, seq_id, entry.seq_id, 0, len(held))
        self._cache.append(entry)
        self._cells += len(held)

    def evict_until(self, room: int) -> None:
        """Drop the least recently used entries until the cache holds at most `room` cells."""
        while self._cache and self._cells > max(room, 0):
            self._drop_oldest()

    def _size(self, *, hit: bool) -> None:
        if hit:
            self._limit, self._misses = self.capacity, 0
            return
        self._misses += 1
        if self._misses >= self._limit and self._limit > 2:
            self._limit = max(2, self._limit // 2)
            self._misses = 0
            while len(self._cache) > self._limit:
                self._drop_oldest()

    def _lookup(self, seq_id: int, prompt: list[int]) -> int:
        wanted = np.asarray(prompt, dtype=np.int32)
        best, best_len = None, 0
        for entry in self._cache:
            if (n := _common_prefix(entry.tokens, wanted)) > best_len:
                best, best_len = entry, n
        reuse = min(best_len, len(prompt) - 1)
        if best is None or reuse < self._min_tokens:
            return 0
        llama_cpp.llama_memory_seq_cp(self._memory, best.seq_id, seq_id, 0, reuse)
        best.used = self._next_tick()
        return reuse

    def _drop_oldest(self) -> None:
        self._drop(min(self._cache, key=lambda e: e.used))

    def _drop(self, entry: _Cached) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, entry.seq_id, -1, -1)
        self._cache.remove(entry)
        self._cells -= len(entry.tokens)
        self._free.append(entry.seq_id)

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
