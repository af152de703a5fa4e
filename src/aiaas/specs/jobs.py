"""A fine-tuning job's create request, parsed: what `/v1/fine_tuning/jobs` hands the job service.

Built by `protocol/fine_tuning.py` from the wire request; planned and checked by
`services/jobs.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiaas.specs.hyperparameters import HyperparameterChoices
from aiaas.specs.shapes import ArchitectureOptions
from aiaas.specs.types import Task

__all__ = ["JobRequest"]


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A create request, parsed (see protocol/fine_tuning.py)."""

    model: str
    # A dataset version id, or a dataset id (its latest version); for a LoRA job on a chat model,
    # a file id (an uploaded chat JSONL file, purpose fine-tune).
    training_file: str
    hyperparameters: HyperparameterChoices
    architecture: ArchitectureOptions
    task: Task | None
    target_column: str | None
    seed: int | None
    suffix: str | None
    metadata: dict[str, str] | None
    register_to: str | None
    validation_file: str | None = None  # LoRA jobs only: a chat JSONL file id
