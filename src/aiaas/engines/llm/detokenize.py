"""Incremental detokenisation that never emits half a character or half a stop string.

Tokens arrive as byte pieces; a UTF-8 character may span several tokens, so bytes go through an
incremental decoder that holds back an incomplete sequence. Text that could still grow into a
stop string is held back too, and released as soon as it cannot.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Released:
    text: str
    stopped: bool


class TextStream:
    def __init__(self, stop: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._pending = ""  # decoded text not yet released
        self._max_stop = max((len(s) for s in stop), default=0)

    def push(self, piece: bytes) -> Released:
        """Add a token's bytes; return the text that is now safe to release."""
        self._pending += self._decoder.decode(piece)
        if not self._stop:
            text, self._pending = self._pending, ""
            return Released(text, stopped=False)
        # Find the earliest complete stop string; everything before it is the final text.
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            text = self._pending[: min(hits)]
            self._pending = ""
            return Released(text, stopped=True)
        keep = self._held_suffix()
        cut = len(self._pending) - keep
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return Released(text, stopped=False)

    def flush(self) -> str:
        """At the end: whatever is held back (a prefix of a stop string that never completed)."""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return text

    def _held_suffix(self) -> int:
        """Length of the longest suffix of pending text that begins some stop string."""
        tail = self._pending[-self._max_stop :]
        for size in range(min(len(tail), self._max_stop - 1), 0, -1):
            suffix = tail[-size:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return size
        return 0
