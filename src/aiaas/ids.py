"""Public identifiers and timestamps, in one place so every table agrees on their shape."""

from __future__ import annotations

import random
import secrets
import time


def new_id(prefix: str, *, sep: str = "_") -> str:
    """`<prefix>_<24 hex>`: 96 random bits, never guessable, never a counter."""
    return f"{prefix}{sep}{secrets.token_hex(12)}"


def unique_hex() -> str:
    """32 hex digits, unique rather than secret (request and completion ids). uuid4 reads
    os.urandom, which releases the GIL: on a busy event loop, getting it back can wait for a
    work thread's switch interval."""
    return f"{random.getrandbits(128):032x}"


def now() -> float:
    return time.time()
