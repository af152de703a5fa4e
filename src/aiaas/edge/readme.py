"""The README.md of an edge bundle: what it is, its inputs and outputs, how to run it, and the
model's metrics and lineage, written from the version's spec and registry record."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiaas.specs.preprocessing import (
    CategoricalStep,
    FeatureStep,
    ImageStep,
    NumericStep,
    PreprocessingSpec,
    TextStep,
)
from aiaas.specs.types import Task

if TYPE_CHECKING:
    from aiaas.edge.bundle import BundleSource

__all__ = ["render", "requirements"]

_SHOWN_CATEGORIES = 20
_LINEAGE = (
    ("base model", "base_model"),
    ("training job", "job_id"),
    ("dataset", "dataset_id"),
    ("dataset version", "dataset_version"),
    ("dataset version id", "dataset_version_id"),
    ("dataset content hash", "dataset_content_hash"),
    ("seed", "seed"),
    ("code", "code_version"),
    ("torch", "torch_version"),
)


def requirements(spec: PreprocessingSpec) -> list[str]:
    """The pip packages the runner needs for this model."""
    needs = ["numpy", "onnxruntime"]
    if any(isinstance(step, ImageStep) for step in spec.features):
        needs.append("pillow")
    return needs


def render(source: BundleSource, stem: str) -> str:
    spec = source.spec
    label = spec.label
    assert label is not None
    lines = [
        f"# {source.model_id}, version {source.version}",
        "",
        f"An edge bundle exported from aiaas: the ONNX graph of version {source.version} "
        f"(`{source.version_id}`) of `{source.model_id}` with its preprocessing, and a small "
        "runner that predicts from JSON records without aiaas installed. Its predictions equal "
        "what the platform's `/v1/predictions` answers for the same records.",
        "",
        "## Run it",
        "",
        "```sh",
        f"pip install {' '.join(requirements(spec))}",
        f"python {stem}/run.py records.jsonl > predictions.jsonl",
        f"python {stem}/run.py --verify      # check every file against manifest.json",
        "```",
        "",
        "or from Python (with this folder on `sys.path`):",
        "",
        "```python",
        "from run import predict",
        f"predict([{json.dumps(_example(spec.features), ensure_ascii=False)}])",
        "```",
        "",
        "## Inputs",
        "",
        "One JSON object per record (one per line in the input file), mapping column names to "
        "values. Other keys are ignored, so a record may carry an id or its label.",
        "",
        "| column | kind | how it is read |",
        "|---|---|---|",
        *(_input_row(step) for step in spec.features),
        "",
        "## Outputs",
        "",
        *_outputs(spec),
        "",
        "## Metrics",
        "",
        *_metrics(source.metrics),
        "",
        "## Lineage",
        "",
        *_lineage(source),
        "",
        "## Files",
        "",
        "`model.onnx` (the graph), `preprocessing.json` (the fitted spec), `model.json` (its "
        "description), `labels.json` (task and classes), `run.py` (the runner), "
        + ("`tokenizer.json` (the wordpiece tokenizer), " if _wordpiece(spec) else "")
        + "`manifest.json` (sha256 and size of each file).",
        "",
    ]
    return "\n".join(lines)


def _wordpiece(spec: PreprocessingSpec) -> bool:
    return any(isinstance(s, TextStep) and s.tokenizer == "wordpiece" for s in spec.features)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _input_row(step: FeatureStep) -> str:
    match step:
        case NumericStep():
            how = f"a number; missing -> {step.fill:g}" if step.fill is not None else "a number"
            if step.standardize:
                how += f"; standardised (mean {step.mean:.6g}, std {step.std:.6g})"
            kind = "numeric"
        case CategoricalStep():
            categories = step.categories or []
            shown = ", ".join(f"`{c}`" for c in categories[:_SHOWN_CATEGORIES])
            more = len(categories) - _SHOWN_CATEGORIES
            how = f"one of {shown}" + (f" and {more} more" if more > 0 else "")
            how += "; others share one slot" if step.other else "; others count as none"
            kind = f"categorical ({step.encoding})"
        case TextStep():
            tokens = (
                "BERT wordpieces" if step.tokenizer == "wordpiece" else "words of its vocabulary"
            )
            how = f"text, read as {tokens}, the first {step.max_length} tokens"
            kind = "text"
        case ImageStep():
            height, width = step.size
            colour = "greyscale" if step.channels == 1 else "RGB"
            how = f"an image file's bytes as base64 text; resized to {width}x{height} {colour}"
            kind = "image"
    return f"| `{_cell(step.column)}` | {kind} | {_cell(how)} |"


def _example(steps: list[FeatureStep]) -> dict[str, Any]:
    example: dict[str, Any] = {}
    for step in steps:
        match step:
            case NumericStep():
                example[step.column] = round(step.mean if step.mean is not None else step.fill or 0)
            case CategoricalStep():
                example[step.column] = (step.categories or [None])[0]
            case TextStep():
                example[step.column] = "some text"
            case ImageStep():
                example[step.column] = "<base64 of a PNG or JPEG>"
    return example


def _outputs(spec: PreprocessingSpec) -> list[str]:
    label = spec.label
    assert label is not None
    if label.task is Task.CLASSIFICATION:
        classes = ", ".join(f"`{c}`" for c in label.classes or [])
        return [
            f"Classification of `{label.column}` into {classes}. One JSON object per record: "
            '`{"index": 0, "label": "<class>", "probabilities": {"<class>": 0.93, ...}, '
            '"value": null}` (softmax over the classes).'
        ]
    return [
        f"Regression of `{label.column}`. One JSON object per record: "
        '`{"index": 0, "label": null, "probabilities": null, "value": 12.3}` '
        "(in the label's own units)."
    ]


def _metrics(metrics: dict[str, Any]) -> list[str]:
    summary = metrics.get("summary") or {}
    shown = [f"- {name}: {value:.4f}" for name, value in summary.items() if value is not None]
    if not shown:
        return ["No metrics were recorded."]
    rows = metrics.get("rows") or {}
    split = metrics.get("evaluated_on", "test")
    counts = ", ".join(f"{n} {name}" for name, n in rows.items() if isinstance(n, int) and n)
    head = f"On the {split} split" + (f" (rows: {counts})" if counts else "") + ":"
    return [head, "", *shown]


def _lineage(source: BundleSource) -> list[str]:
    lineage = source.lineage
    shown = [
        f"- {name}: `{lineage[key]}`" for name, key in _LINEAGE if lineage.get(key) is not None
    ]
    hyper = lineage.get("hyperparameters")
    if hyper:
        text = ", ".join(f"{k} {v}" for k, v in hyper.items() if v is not None)
        shown.append(f"- hyperparameters: {text}")
    return shown or ["No lineage was recorded."]
