"""The networks a training job can pick, built from the input shapes in `specs/shapes.py`.

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
from pathlib import Path

import torch
from torch import Tensor, nn

from aiaas.specs.shapes import (
    INPUT_NAMES,
    MINILM,
    TEXT_INPUTS,
    ArchitectureOptions,
    InputShape,
    check_compatible,
)

__all__ = ["Network", "build_model"]

# A finite "minus infinity": a row that is all padding then gets uniform weights, not NaN.
_MASKED = -1e9


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
        inputs, size = TEXT_INPUTS, 2 * options.hidden_size
    elif name == "transformer-encoder":
        encoder = _TransformerEncoder(_vocab_size(shape), shape.text_length or 1, options)
        inputs, size = TEXT_INPUTS, options.embedding_dim
    else:
        minilm = _MiniLMEncoder(_pretrained(pretrained_dir), options.dropout)
        encoder, inputs, size = minilm, TEXT_INPUTS, minilm.size
    head = _mlp(size + shape.tabular_dim, options.hidden_sizes, options.dropout, shape.n_outputs)
    return Network(
        name,
        encoder=encoder,
        encoder_inputs=inputs,
        encoded_size=size,
        tabular_dim=shape.tabular_dim,
        head=head,
    )


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
