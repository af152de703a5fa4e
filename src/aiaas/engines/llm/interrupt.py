"""Cutting a running `llama_decode` short, so that an urgent request need not wait for it.

llama.cpp polls an abort callback after every graph node (on the CPU backend, from its first
compute thread). A Python callback would take the GIL some hundreds of times per step and stall
the compute threads behind the event loop, so the callback is C code: libc's `strlen`, pointed
at a two-byte buffer holding the flag and a terminator. It returns 0 or 1, which the
`bool (*)(void *)` signature reads from the low byte of the return register (x86-64, arm64).
Raising the flag is one byte written from any thread; nothing is called back into Python.

When the flag is up, `llama_decode` stops at the next node and returns 2. llama.cpp then removes
that ubatch's positions from the KV cache, so the step can be sent again unchanged (the engine
keeps `n_batch == n_ubatch`, so a step is one ubatch).

The callback is written against the ABI, not C's type rules; where libc cannot be found the
interrupt is simply unavailable and steps run to the end.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time

import llama_cpp

ABORTED = 2  # llama_decode's status for a step cut short


def _strlen() -> int | None:
    try:
        libc = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
        return ctypes.cast(libc.strlen, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


class StepInterrupt:
    """A flag a running decode step polls; `arm` before a step that may be cut, `disarm` after.

    `request` raises the flag only while armed, so a request that comes between steps never
    cuts the next one. Cuts are paid for from a budget of wasted compute: the time a cut step
    had already run is spent from a bucket that refills at `budget` seconds per second (at most
    `burst` seconds), so cutting steps can cost the other sequences at most that share of the
    engine's time, however many requests ask."""

    def __init__(self, *, budget: float, burst: float = 0.25) -> None:
        self._flag = ctypes.create_string_buffer(2)
        address = _strlen() if budget > 0 else None
        self._callback = llama_cpp.ggml_abort_callback(address) if address else None
        self._lock = threading.Lock()
        self._armed = False
        self._budget = budget
        self._burst = burst
        self._credit = burst
        self._refilled = time.monotonic()
        self._started = 0.0

    def install(self, ctx: llama_cpp.llama_context_p) -> None:
        if self._callback is not None:
            data = ctypes.cast(self._flag, ctypes.c_void_p)
            llama_cpp.llama_set_abort_callback(ctx, self._callback, data)

    def arm(self) -> None:
        """A step that may be cut starts now (engine thread)."""
        if self._callback is None:
            return
        now = time.monotonic()
        with self._lock:
            self._credit = min(self._burst, self._credit + (now - self._refilled) * self._budget)
            self._refilled = now
            self._flag[0] = b"\x00"
            self._armed = self._credit > 0
            self._started = now

    def disarm(self, *, cut: bool) -> None:
        """The step ended; `cut`: it was cut short, and the time it ran is spent (engine thread)."""
        if self._callback is None:
            return
        with self._lock:
            self._armed = False
            self._flag[0] = b"\x00"
            if cut:
                self._credit -= time.monotonic() - self._started

    def request(self) -> bool:
        """Cut the running step short, if one may be cut now (any thread)."""
        with self._lock:
            if not self._armed:
                return False
            self._armed = False
            self._flag[0] = b"\x01"
            return True
