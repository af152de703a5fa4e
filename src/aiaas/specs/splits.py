"""The train/validation/test split of a dataset version: seeded, and stratified by class."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from aiaas.specs.features import category_texts
from aiaas.specs.types import Split

__all__ = ["SplitSpec", "assign_splits"]

_SPLITS = (Split.TRAIN, Split.VALIDATION, Split.TEST)


class SplitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0)
    train: float = Field(0.8, gt=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    stratify: bool = True

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSpec:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions sum to {total:g}, not 1")
        return self


def assign_splits(labels: pd.Series | None, n_rows: int, spec: SplitSpec) -> np.ndarray:
    """Each row's Split value, reproducible from the seed.

    With `stratify` and labels (pass them for classification only: regression targets are mostly
    unique, which would put every row in train), each class is split on its own with an RNG
    seeded by (seed, class), so a class's assignment ignores the other classes entirely.
    """
    if labels is not None and len(labels) != n_rows:
        raise ValueError(f"{len(labels)} labels for {n_rows} rows")
    codes = np.zeros(n_rows, dtype=np.int64)
    if spec.stratify and labels is not None:
        groups: dict[str, list[int]] = {}
        for position, text in enumerate(category_texts(labels)):
            # Prefixes keep a missing label apart from a label spelled "".
            groups.setdefault("-" if text is None else f"+{text}", []).append(position)
        for key, positions in groups.items():
            digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
            rng = np.random.default_rng([spec.seed, digest])
            _assign_group(codes, np.asarray(positions, dtype=np.int64), rng, spec)
    else:
        _assign_group(codes, np.arange(n_rows), np.random.default_rng(spec.seed), spec)
    return np.array([s.value for s in _SPLITS])[codes]


def _assign_group(
    codes: np.ndarray, positions: np.ndarray, rng: np.random.Generator, spec: SplitSpec
) -> None:
    n_train, n_validation, _ = _split_counts(len(positions), spec)
    shuffled = positions[rng.permutation(len(positions))]
    codes[shuffled[n_train : n_train + n_validation]] = 1
    codes[shuffled[n_train + n_validation :]] = 2


def _split_counts(n: int, spec: SplitSpec) -> list[int]:
    """Largest-remainder rounding: 10 rows at 0.8/0.1/0.1 give 8/1/1, a class of 3 gives 3/0/0."""
    fractions = (spec.train, spec.validation, spec.test)
    exact = [f * n / sum(fractions) for f in fractions]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(3), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: max(0, n - sum(counts))]:
        counts[i] += 1
    if n and counts[0] == 0:
        # A class absent from train cannot be learnt, whatever the fractions say.
        donor = 1 if counts[1] >= counts[2] else 2
        counts[donor] -= 1
        counts[0] = 1
    return counts
