"""What a network takes: the input shape a fitted spec gives, the architecture options, and
which architectures can read which data. No torch here: serving (ONNX Runtime) and the job
planner use these without loading the training stack; `training/architectures.py` builds the
networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from aiaas.errors import InvalidRequest
from aiaas.specs.preprocessing import (
    CategoricalStep,
    Features,
    ImageStep,
    NumericStep,
    PreprocessingSpec,
    TextStep,
)
from aiaas.specs.types import Task

__all__ = [
    "ARCHITECTURES",
    "INPUT_NAMES",
    "MINILM",
    "MINILM_MAX_LENGTH",
    "TEXT_INPUTS",
    "TOKENIZER_REF",
    "ArchitectureOptions",
    "InputShape",
    "check_compatible",
    "input_shape",
    "model_inputs",
]

ARCHITECTURES: tuple[str, ...] = ("mlp", "cnn", "lstm", "transformer-encoder", "all-minilm-l6-v2")
INPUT_NAMES = ("tabular", "tokens", "attention", "images")
MINILM = "all-minilm-l6-v2"
MINILM_MAX_LENGTH = 512  # its position embeddings
TOKENIZER_REF = MINILM  # the wordpiece tokenizer a MiniLM text step looks up
TEXT_INPUTS = ("tokens", "attention")


@dataclass(frozen=True)
class InputShape:
    """What a fitted spec feeds a network: the sizes every architecture is built from."""

    tabular_dim: int  # columns of Features.tabular; 0 when none
    text_column: str | None  # the first TextStep's column, or None
    text_vocab_size: int | None  # len(vocabulary) for a "word" step; None for wordpiece or none
    text_length: int | None  # the text step's max_length
    text_tokenizer: str | None  # "word" | "wordpiece" | None
    image_shape: tuple[int, int, int] | None  # (channels, height, width)
    n_outputs: int  # classes for classification, 1 for regression


def input_shape(spec: PreprocessingSpec) -> InputShape:
    """The input sizes `transform(spec, ...)` produces; the spec must be fitted and have a label."""
    if not spec.fitted:
        raise InvalidRequest("the preprocessing spec has not been fitted", param="spec")
    if spec.label is None:
        raise InvalidRequest("training needs a label column", param="label")
    tabular_dim = 0
    text: TextStep | None = None
    image: ImageStep | None = None
    for step in spec.features:
        match step:
            case NumericStep():
                tabular_dim += 1
            case CategoricalStep(encoding="ordinal"):
                tabular_dim += 1
            case CategoricalStep():
                tabular_dim += len(step.categories or []) + int(step.other)
            case TextStep():
                text = text or step
            case ImageStep():
                image = step
    classification = spec.label.task is Task.CLASSIFICATION
    return InputShape(
        tabular_dim=tabular_dim,
        text_column=text.column if text else None,
        text_vocab_size=len(text.vocabulary) if text and text.vocabulary is not None else None,
        text_length=text.max_length if text else None,
        text_tokenizer=text.tokenizer if text else None,
        image_shape=(image.channels, *image.size) if image else None,
        n_outputs=len(spec.label.classes or []) if classification else 1,
    )


_Width = Annotated[int, Field(gt=0, le=4096)]
_Channels = Annotated[int, Field(gt=0, le=512)]


class ArchitectureOptions(BaseModel):
    """Sizes of a network. The defaults are small, so a CPU trains them in minutes."""

    model_config = ConfigDict(extra="forbid")

    hidden_sizes: list[_Width] = Field(default_factory=lambda: [64, 64], min_length=1, max_length=8)
    dropout: float = Field(0.1, ge=0.0, lt=0.9)
    embedding_dim: int = Field(64, ge=4, le=1024)  # lstm and transformer token embeddings
    hidden_size: int = Field(64, ge=4, le=1024)  # lstm, per direction
    num_layers: int = Field(2, ge=1, le=12)  # transformer-encoder layers
    num_heads: int = Field(4, ge=1, le=16)  # transformer-encoder
    channels: list[_Channels] = Field(default_factory=lambda: [16, 32], min_length=1, max_length=6)

    @model_validator(mode="after")
    def _heads_divide_embedding(self) -> ArchitectureOptions:
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"embedding_dim {self.embedding_dim} must be divisible by "
                f"num_heads {self.num_heads}"
            )
        return self


def check_compatible(name: str, shape: InputShape) -> None:
    """Raise InvalidRequest (param "model") when this data cannot feed architecture `name`.

    `mlp` needs tabular columns and ignores text and images; `cnn` needs an image column; `lstm`
    and `transformer-encoder` need a text column with its own "word" vocabulary; MiniLM needs a
    text column tokenised with its "wordpiece" tokenizer.
    """
    if name not in ARCHITECTURES:
        raise InvalidRequest(
            f"unknown model {name!r}; choose one of: {', '.join(ARCHITECTURES)}", param="model"
        )
    if name == "mlp" and shape.tabular_dim == 0:
        raise InvalidRequest(
            "model 'mlp' needs numeric or categorical columns and this data has none; "
            "for text use 'lstm', 'transformer-encoder' or 'all-minilm-l6-v2', for images 'cnn'",
            param="model",
        )
    if name == "cnn" and shape.image_shape is None:
        raise InvalidRequest("model 'cnn' needs an image column", param="model")
    if name in ("lstm", "transformer-encoder", MINILM):
        wanted = "wordpiece" if name == MINILM else "word"
        if shape.text_column is None:
            raise InvalidRequest(f"model {name!r} needs a text column", param="model")
        if shape.text_tokenizer != wanted:
            advice = (
                "its own wordpiece tokenizer" if name == MINILM else "a vocabulary learned from it"
            )
            raise InvalidRequest(
                f"model {name!r} reads text with {advice}, so text column "
                f"{shape.text_column!r} needs tokenizer {wanted!r}, not {shape.text_tokenizer!r}",
                param="model",
            )
        if name == MINILM and (shape.text_length or 0) > MINILM_MAX_LENGTH:
            raise InvalidRequest(
                f"model {name!r} reads at most {MINILM_MAX_LENGTH} tokens; text column "
                f"{shape.text_column!r} has max_length {shape.text_length}",
                param="model",
            )


def model_inputs(
    features: Features, shape: InputShape, input_names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """The arrays a network (or its ONNX graph) takes, keyed by input name, in the right dtypes."""
    arrays: dict[str, np.ndarray] = {}
    for name in input_names:
        if name == "tabular":
            value, dtype = features.tabular, np.float32
        elif name == "images":
            value, dtype = features.images, np.float32
        elif name in TEXT_INPUTS:
            table = features.tokens if name == "tokens" else features.attention
            value, dtype = table.get(shape.text_column or ""), np.int64
        else:
            raise ValueError(f"unknown input {name!r}; inputs are {INPUT_NAMES}")
        if value is None:
            raise ValueError(f"the features have no {name!r} input for this network")
        arrays[name] = np.ascontiguousarray(value, dtype=dtype)
    return arrays
