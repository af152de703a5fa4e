"""The networks a training job can pick, and what shape of data each one needs.

Every network is a `Network`: an optional encoder for one kind of column (images or text), the
tabular columns concatenated after it, and an MLP head that ends in logits (one per class, or one
value for regression). Its `input_names` say which of `INPUT_NAMES` `forward` takes, in that
order, so the ONNX graph exported from it has the same inputs at serving time.

Choices worth knowing:
- A network reads at most one text column (the spec's first) and one image column; `mlp` reads
  only the tabular columns, `cnn` ignores text, and the text networks ignore images.
- Attention is written out with plain matmuls rather than `nn.TransformerEncoder`: in eval mode
  that module takes a fused "fast path" whose output at padded positions differs from the traced
  graph, so torch and ONNX would disagree on the same inputs.
- Padding is handled by masks, never `pack_padded_sequence`, which does not trace to ONNX. The
  LSTM therefore runs over the padding too; training and serving pad to the same length, so it
  sees the same sequences in both.
- Weights come from torch's global RNG only (plus the pretrained file for MiniLM), so a caller that
  seeds torch gets the same initial network every time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from aiaas.data.types import Task
from aiaas.errors import InvalidRequest
from aiaas.training.preprocess import (
    CategoricalStep,
    Features,
    ImageStep,
    NumericStep,
    PreprocessingSpec,
    TextStep,
)

__all__ = [
    "ARCHITECTURES",
    "INPUT_NAMES",
    "ArchitectureOptions",
    "InputShape",
    "Network",
    "build_model",
    "check_compatible",
    "input_shape",
    "model_inputs",
]

ARCHITECTURES: tuple[str, ...] = ("mlp", "cnn", "lstm", "transformer-encoder", "all-minilm-l6-v2")
INPUT_NAMES = ("tabular", "tokens", "attention", "images")
MINILM = "all-minilm-l6-v2"
MINILM_MAX_LENGTH = 512  # its position embeddings
_TEXT = ("tokens", "attention")
# A finite "minus infinity": a row that is all padding then gets uniform weights, not NaN.
_MASKED = -1e9


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


class Network(nn.Module):
    """Encoder (optional) + tabular columns -> MLP head -> logits float32 [n, n_outputs]."""

    def __init__(
        self,
        architecture: str,
        *,
        encoder: nn.Module | None,
        encoder_inputs: tuple[str, ...],
        encoded_size: int,
        tabular_dim: int,
        head: nn.Module,
    ) -> None:
        super().__init__()
        self.architecture = architecture
        self.encoder = encoder
        self.head = head
        self._encoder_inputs = encoder_inputs
        used = {*encoder_inputs, *(["tabular"] if tabular_dim else [])}
        self.input_names: tuple[str, ...] = tuple(name for name in INPUT_NAMES if name in used)
        self.encoded_size = encoded_size

    def forward(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected inputs {self.input_names}, got {len(inputs)} tensors")
        named = dict(zip(self.input_names, inputs, strict=True))
        parts = []
        if self.encoder is not None:
            parts.append(self.encoder(*(named[name] for name in self._encoder_inputs)))
        if "tabular" in named:
            parts.append(named["tabular"])
        features = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        logits: Tensor = self.head(features)
        return logits


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


def build_model(
    name: str,
    shape: InputShape,
    options: ArchitectureOptions,
    *,
    pretrained_dir: Path | None = None,
) -> Network:
    """A fresh network for `shape`; `pretrained_dir` is the MiniLM folder (that model only)."""
    check_compatible(name, shape)
    encoder: nn.Module | None
    if name == "mlp":
        encoder, inputs, size = None, (), 0
    elif name == "cnn":
        assert shape.image_shape is not None  # checked above
        encoder = _ConvEncoder(shape.image_shape, options.channels)
        inputs, size = ("images",), options.channels[-1]
    elif name == "lstm":
        encoder = _RecurrentEncoder(_vocab_size(shape), options)
        inputs, size = _TEXT, 2 * options.hidden_size
    elif name == "transformer-encoder":
        encoder = _TransformerEncoder(_vocab_size(shape), shape.text_length or 1, options)
        inputs, size = _TEXT, options.embedding_dim
    else:
        minilm = _MiniLMEncoder(_pretrained(pretrained_dir), options.dropout)
        encoder, inputs, size = minilm, _TEXT, minilm.size
    head = _mlp(size + shape.tabular_dim, options.hidden_sizes, options.dropout, shape.n_outputs)
    return Network(
        name,
        encoder=encoder,
        encoder_inputs=inputs,
        encoded_size=size,
        tabular_dim=shape.tabular_dim,
        head=head,
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
        elif name in _TEXT:
            table = features.tokens if name == "tokens" else features.attention
            value, dtype = table.get(shape.text_column or ""), np.int64
        else:
            raise ValueError(f"unknown input {name!r}; inputs are {INPUT_NAMES}")
        if value is None:
            raise ValueError(f"the features have no {name!r} input for this network")
        arrays[name] = np.ascontiguousarray(value, dtype=dtype)
    return arrays


# -- building blocks -----------------------------------------------------------------------------


def _mlp(in_features: int, hidden_sizes: list[int], dropout: float, n_outputs: int) -> nn.Module:
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
        in_features = width
    layers.append(nn.Linear(in_features, n_outputs))
    return nn.Sequential(*layers)


def _vocab_size(shape: InputShape) -> int:
    if not shape.text_vocab_size:
        raise ValueError(f"text column {shape.text_column!r} has no fitted vocabulary")
    return shape.text_vocab_size


def _pretrained(directory: Path | None) -> Path:
    if directory is None or not (directory / "model.safetensors").is_file():
        raise ValueError(f"model {MINILM!r} needs its folder with model.safetensors: {directory}")
    return directory


def _masked_mean(states: Tensor, attention: Tensor) -> Tensor:
    """Mean over real tokens, as sentence-transformers pools; an all-padding row gives zeros."""
    mask = attention.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class _ConvEncoder(nn.Module):
    """Conv3x3 + ReLU + 2x2 max-pool per block, then the mean over the remaining pixels.

    A block skips its pooling once the image is down to one pixel in a direction, so tiny images
    still fit any number of blocks. No BatchNorm: its running statistics make small-batch training
    and eval disagree, and the network is shallow enough not to need it.
    """

    def __init__(self, image_shape: tuple[int, int, int], channels: list[int]) -> None:
        super().__init__()
        in_channels, height, width = image_shape
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            if min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_channels = out_channels
        self.blocks = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        pooled: Tensor = self.blocks(images).mean(dim=(2, 3))
        return pooled


class _RecurrentEncoder(nn.Module):
    """Embedding -> bidirectional LSTM -> additive attention pooling over the real tokens."""

    def __init__(self, vocab_size: int, options: ArchitectureOptions) -> None:
        super().__init__()
        width = 2 * options.hidden_size
        self.embedding = nn.Embedding(vocab_size, options.embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(
            options.embedding_dim, options.hidden_size, batch_first=True, bidirectional=True
        )
        self.score = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
        self.dropout = nn.Dropout(options.dropout)

    def forward(self, tokens: Tensor, attention: Tensor) -> Tensor:
        states, _ = self.lstm(self.dropout(self.embedding(tokens)))
        scores = self.score(states).squeeze(-1).masked_fill(attention == 0, _MASKED)
        # Zeroing padded weights after the softmax makes an all-padding row pool to zeros.
        weights = torch.softmax(scores, dim=1) * attention.to(states.dtype)
        pooled: Tensor = (weights.unsqueeze(-1) * states).sum(dim=1)
        return self.dropout(pooled)


class _EncoderLayer(nn.Module):
    """A pre-norm transformer layer: masked multi-head self-attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_attention = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """`x` [n, length, dim]; `bias` [n, 1, 1, length]: 0 for tokens, very negative for pads."""
        n, length, dim = x.shape
        qkv = self.qkv(self.norm_attention(x)).reshape(n, length, 3, self.heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [n, heads, length, head_dim]
        scores = query @ key.transpose(-2, -1) / math.sqrt(dim // self.heads) + bias
        weights = self.dropout(torch.softmax(scores, dim=-1))
        attended = (weights @ value).transpose(1, 2).reshape(n, length, dim)
        x = x + self.dropout(self.out(attended))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class _TransformerEncoder(nn.Module):
    """Token + learned position embeddings -> encoder layers -> mean over the real tokens."""

    def __init__(self, vocab_size: int, length: int, options: ArchitectureOptions) -> None:
        super().__init__()
        dim = options.embedding_dim
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.layers = nn.ModuleList(
            _EncoderLayer(dim, options.num_heads, options.dropout)
            for _ in range(options.num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(options.dropout)

    def forward(self, tokens: Tensor, attention: Tensor) -> Tensor:
        x = self.dropout(self.embedding(tokens) + self.position[: tokens.shape[1]])
        bias = (attention == 0).to(x.dtype)[:, None, None, :] * _MASKED
        for layer in self.layers:
            x = layer(x, bias)
        return self.dropout(_masked_mean(self.norm(x), attention))


class _MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2 (a BertModel) with sentence-transformers' mean pooling, then dropout."""

    def __init__(self, directory: Path, dropout: float) -> None:
        super().__init__()
        # Heavy imports, needed by this architecture only.
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        # Its loading bar and notes go to stderr as plain text, between our JSON log lines.
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.bert = BertModel.from_pretrained(
            directory,
            add_pooling_layer=False,  # the CLS pooler is unused by mean pooling
            use_safetensors=True,
            local_files_only=True,
            attn_implementation="eager",  # traces to plain ops that ONNX Runtime fuses
        )
        self.size = int(self.bert.config.hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, attention: Tensor) -> Tensor:
        hidden = self.bert(
            input_ids=tokens, attention_mask=attention, token_type_ids=torch.zeros_like(tokens)
        ).last_hidden_state
        return self.dropout(_masked_mean(hidden, attention))
