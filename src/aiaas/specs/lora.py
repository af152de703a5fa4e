"""A LoRA fine-tuning job's plan: the chat model it adapts, the files and the resolved
hyperparameters, checked when the job is created and stored as the job's `spec`.

OpenAI's hyperparameters (`n_epochs`, `batch_size`, `learning_rate_multiplier`; "auto" allowed)
plus LoRA's own: `lora_rank`, `lora_alpha`, `lora_dropout` and `target_modules` (the linear
layers of each transformer block that get an adapter, by their Hugging Face names).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aiaas.errors import InvalidRequest

__all__ = [
    "LORA_BASES",
    "LORA_BASE_LEARNING_RATE",
    "LORA_FIELDS",
    "LORA_KIND",
    "LORA_TARGET_MODULES",
    "LORA_TASK",
    "LoraHyperparameters",
    "LoraPlan",
    "resolve_lora_hyperparameters",
]

LORA_KIND = "lora"  # the job kind
LORA_TASK = "text-generation"  # the task its adapter registers as (as an imported GGUF's)

# Chat models a LoRA job can adapt: bundled llama-architecture GGUFs (the export maps their
# tensor names to llama.cpp's).
LORA_BASES = ("smollm2-135m-instruct",)

# The linear layers of a llama block, by their Hugging Face names.
LORA_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")

# learning_rate = LORA_BASE_LEARNING_RATE * learning_rate_multiplier ("auto": 1).
LORA_BASE_LEARNING_RATE = 1e-3
DEFAULT_N_EPOCHS = 3
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_LENGTH = 1024  # tokens per example; longer conversations are cut there

# Hyperparameters only a LoRA job takes (a classic job refuses them).
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules")


class LoraHyperparameters(BaseModel):
    """The resolved values a LoRA job trains with (no "auto" left)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=4096)
    learning_rate: float = Field(gt=0, le=1)
    learning_rate_multiplier: float = Field(gt=0, le=1000)
    weight_decay: float = Field(ge=0, le=1)
    lora_rank: int = Field(ge=1, le=256)
    lora_alpha: float = Field(gt=0, le=4096)
    lora_dropout: float = Field(ge=0, lt=1)
    target_modules: tuple[str, ...]
    max_length: int = Field(ge=16, le=8192)


class LoraPlan(BaseModel):
    """Stored as a LoRA job's `spec`; the worker needs nothing else to run the job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    method: Literal["lora"] = "lora"
    model: str  # the base chat model's id
    training_file: str
    training_file_sha256: str | None
    training_examples: int
    validation_file: str | None
    validation_file_sha256: str | None
    validation_examples: int
    hyperparameters: LoraHyperparameters
    model_name: str  # what the adapter registers as


def resolve_lora_hyperparameters(
    *,
    n_epochs: int | str,
    batch_size: int | str,
    learning_rate: float | str,
    learning_rate_multiplier: float | str,
    weight_decay: float,
    early_stopping_patience: int | None,
    lora_rank: int | None,
    lora_alpha: float | None,
    lora_dropout: float | None,
    target_modules: list[str] | None,
    training_examples: int,
) -> LoraHyperparameters:
    """Resolve "auto" and check what a LoRA job can do; InvalidRequest names the field."""
    if early_stopping_patience is not None:
        raise InvalidRequest(
            "early_stopping_patience is not supported for LoRA fine-tuning.",
            param="hyperparameters.early_stopping_patience",
        )
    modules = tuple(target_modules) if target_modules else DEFAULT_TARGET_MODULES
    unknown = [m for m in modules if m not in LORA_TARGET_MODULES]
    if unknown or len(set(modules)) != len(modules):
        raise InvalidRequest(
            f"target_modules {list(modules)}: each must be one of "
            f"{', '.join(LORA_TARGET_MODULES)}, once.",
            param="hyperparameters.target_modules",
        )
    given = None if learning_rate_multiplier == "auto" else float(learning_rate_multiplier)
    if learning_rate != "auto":  # as for classic jobs, an explicit rate wins
        rate = float(learning_rate)
        multiplier = given if given is not None else rate / LORA_BASE_LEARNING_RATE
    else:
        multiplier = given if given is not None else 1.0
        rate = LORA_BASE_LEARNING_RATE * multiplier
    if not 0 < rate <= 1:
        raise InvalidRequest(
            f"The learning rate {rate:g} (multiplier {multiplier:g} x {LORA_BASE_LEARNING_RATE:g})"
            " must be in (0, 1].",
            param="hyperparameters.learning_rate_multiplier",
        )
    size = DEFAULT_BATCH_SIZE if batch_size == "auto" else int(batch_size)
    rank = lora_rank if lora_rank is not None else 8
    try:
        return LoraHyperparameters(
            n_epochs=DEFAULT_N_EPOCHS if n_epochs == "auto" else int(n_epochs),
            batch_size=max(1, min(size, training_examples)),
            learning_rate=rate,
            learning_rate_multiplier=multiplier,
            weight_decay=weight_decay,
            lora_rank=rank,
            lora_alpha=lora_alpha if lora_alpha is not None else 2.0 * rank,
            lora_dropout=lora_dropout if lora_dropout is not None else 0.05,
            target_modules=modules,
            max_length=DEFAULT_MAX_LENGTH,
        )
    except ValidationError as exc:  # a combination the request's own limits let through
        problem = exc.errors()[0]
        field = ".".join(str(part) for part in problem["loc"])
        raise InvalidRequest(
            f"hyperparameters.{field}: {problem['msg']}", param=f"hyperparameters.{field}"
        ) from None
