"""The hyperparameters a fine-tuning request may choose; the job planner resolves them.

`training/plan.py` turns these choices into the values a job trains with, using each
architecture's defaults for whatever is left "auto".
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from aiaas.specs.lora import LORA_FIELDS

__all__ = ["HyperparameterChoices"]

Auto = Literal["auto"]


class HyperparameterChoices(BaseModel):
    """What a request may say; "auto" (or leaving a field out) takes the architecture's default.
    OpenAI's names (`n_epochs`, `learning_rate_multiplier`) and plain ones both work."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    n_epochs: Auto | Annotated[int, Field(ge=1, le=1000)] = Field(
        "auto", validation_alias=AliasChoices("n_epochs", "epochs")
    )
    batch_size: Auto | Annotated[int, Field(ge=1, le=4096)] = "auto"
    learning_rate: Auto | Annotated[float, Field(gt=0, le=10)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=1000)] = "auto"
    weight_decay: float = Field(0.0, ge=0, le=1)
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        le=1000,
        validation_alias=AliasChoices("early_stopping_patience", "early_stopping"),
        description="Stop after this many epochs without a better validation loss.",
    )
    # LoRA fine-tuning of a chat model only (see specs/lora.py); a classic job refuses them.
    lora_rank: int | None = Field(None, ge=1, le=256, description="LoRA rank r (default 8).")
    lora_alpha: float | None = Field(
        None, gt=0, le=4096, description="LoRA alpha; the update is scaled by alpha / r (2 r)."
    )
    lora_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout on the adapter's input (default 0.05)."
    )
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        max_length=7,
        description="Layers of each block that get an adapter (default q_proj, v_proj).",
    )

    def lora_fields_set(self) -> list[str]:
        """The LoRA-only fields this request sets."""
        return [name for name in LORA_FIELDS if getattr(self, name) is not None]
