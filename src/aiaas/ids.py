"""Public identifiers and timestamps, in one place so every table agrees on their shape."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str, *, sep: str = "_") -> str:
    """`<prefix>_<24 hex>`: 96 random bits, never guessable, never a counter."""
    return f"{prefix}{sep}{secrets.token_hex(12)}"


def now() -> float:
    return time.time()
