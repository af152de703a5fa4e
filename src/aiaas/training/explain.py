"""Attributions for a trained network, with captum: which columns, pixels or tokens moved it.

The served artifact is an ONNX graph, which has no gradients, so an `Explainer` rebuilds the
version's torch network from its registered architecture and safetensors weights (never a
pickle) and checks it against the served graph on a probe batch (`check_against`) before it
explains anything: explanations describe the very function that predicts. A version without
weights (an int8 variant) is explained through the served graph itself (`Explainer.onnx`), with
the perturbation methods only.

Attributions are made where a person reads them:
- tabular columns per model column, then folded back onto their source column through the
  preprocessing spec (a one-hot block sums to its column; the perturbation methods remove a
  column's whole block at once, so its value is the column's);
- images per pixel at the model's input resolution, summed over channels;
- text per token. Token ids have no gradient, so the gradient methods attribute to the token
  embeddings: a forward hook swaps the embedding layer's output for the tensor under attribution,
  as captum's LayerIntegratedGradients does, so one forward function serves every input. The
  perturbation methods replace token ids with the padding id instead (the same baseline: the
  padding embedding).

Outputs are the explained class's logit (classification) or the predicted value in the label's
own units (regression). Everything here is synchronous and CPU-bound: callers own the threads,
and one explainer runs one explanation at a time (its lock), since the hook holds state.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from aiaas.errors import Conflict, InvalidRequest
from aiaas.specs.features import encode_categorical, encode_numeric
from aiaas.specs.preprocessing import (
    CategoricalStep,
    ImageStep,
    NumericStep,
    PreprocessingSpec,
    TextStep,
)
from aiaas.specs.shapes import MINILM, ArchitectureOptions, InputShape
from aiaas.specs.types import Task
from aiaas.training.architectures import Network, build_model
from aiaas.training.export import example_inputs

__all__ = [
    "DEFAULT_N_SAMPLES",
    "DEFAULT_N_STEPS",
    "GRADIENT_METHODS",
    "METHODS",
    "Attribution",
    "ExplainError",
    "Explainer",
    "Options",
    "Token",
    "column_groups",
    "image_heatmap_png",
    "input_shape_of",
    "permutation_importance",
]

METHODS = (
    "integrated_gradients",
    "shapley_sampling",
    "kernel_shap",
    "occlusion",
    "attention",
    "feature_ablation",
)
GRADIENT_METHODS = frozenset({"integrated_gradients", "attention"})
DEFAULT_N_STEPS = 50
DEFAULT_N_SAMPLES = {"shapley_sampling": 25, "kernel_shap": 200}
TABULAR_BASELINES = ("mean", "typical", "zeros")
IMAGE_BASELINES = ("mean", "black", "white")
TEXT_BASELINES = ("pad",)
# Rows one forward pass may carry while integrating (captum's internal_batch_size), by network.
_IG_BATCH = {"mlp": 8192, MINILM: 64}
_IG_BATCH_DEFAULT = 512
# Perturbations evaluated together in one forward pass (captum's perturbations_per_eval).
_PER_EVAL = {"mlp": 64, MINILM: 4}
_PER_EVAL_DEFAULT = 16
# What one record costs each method, in forward passes of that record (a backward pass counts as
# two): the unit of `Explainer.cost`.
_BACKWARD = 3
# Words as `specs/features.py` splits them; token spans are checked against the encoded ids, and
# a text whose words do not line up reports its tokens without spans.
_WORD = re.compile(r"\w+|[^\w\s]")


class ExplainError(InvalidRequest):
    """The version cannot be explained as asked (no weights, weights that disagree with the
    served graph, a method its network cannot take)."""


@dataclass(frozen=True)
class Options:
    """A method's settings, resolved: None means the method's documented default."""

    n_steps: int = DEFAULT_N_STEPS  # integrated_gradients, attention
    baseline: str | Mapping[str, Any] | None = None
    target: str | None = None  # a class name; default: the predicted class
    n_samples: int | None = None  # shapley_sampling (25), kernel_shap (200)
    window: int | None = None  # occlusion window / perturbation patch side, in model pixels
    stride: int | None = None  # occlusion stride (default: half the window)
    seed: int = 0  # the sampling methods' draws


@dataclass(frozen=True)
class Token:
    text: str
    start: int | None  # character span in the record's text; None where it cannot be told
    end: int | None


@dataclass(frozen=True)
class Attribution:
    """One record's explanation, in the units a person reads."""

    target: int  # the output explained (a class index; 0 for regression)
    output: float  # f(x) at that output: a logit, or a value in the label's units
    baseline_output: float  # f(baseline)
    delta: float | None  # integrated gradients: sum(attributions) - (output - baseline_output)
    columns: np.ndarray | None = None  # per source column (`Explainer.columns`)
    pixels: np.ndarray | None = None  # [height, width] at the model's input resolution
    tokens: np.ndarray | None = None  # per real token of the text column, in order
    attention: np.ndarray | None = None  # per real token: the attention weight it received


def input_shape_of(description: Mapping[str, Any]) -> InputShape:
    """The `InputShape` a version's model.json records (JSON lists back to tuples)."""
    return InputShape(
        **{
            k: tuple(v) if k == "image_shape" and v is not None else v
            for k, v in description["input_shape"].items()
        }
    )


def column_groups(spec: PreprocessingSpec) -> list[tuple[str, int, int]]:
    """(source column, first, stop) of each tabular column's block of model columns."""
    groups: list[tuple[str, int, int]] = []
    start = 0
    for step in spec.features:
        if isinstance(step, NumericStep):
            width = 1
        elif isinstance(step, CategoricalStep):
            width = (
                1 if step.encoding == "ordinal" else len(step.categories or []) + int(step.other)
            )
        else:
            continue
        groups.append((step.column, start, start + width))
        start += width
    return groups


@dataclass
class _Plan:
    """What one method perturbs or integrates: input names in order, and per input its
    baseline, feature mask and occlusion window."""

    names: tuple[str, ...]
    fixed: tuple[str, ...]  # passed through unchanged (captum's additional_forward_args)
    baselines: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    windows: list[tuple[int, ...]] = field(default_factory=list)
    strides: list[tuple[int, ...]] = field(default_factory=list)
    features: int = 0  # distinct features across the masks


class _Injection:
    """Swaps an embedding layer's output for a given tensor while a forward pass runs."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
        return output if self.value is None else self.value


class Explainer:
    """One version's network (torch, or its ONNX graph through `run`) with its spec."""

    def __init__(
        self,
        *,
        architecture: str,
        spec: PreprocessingSpec,
        shape: InputShape,
        input_names: tuple[str, ...],
        network: Network | None,
        run: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
        tokenizers: Mapping[str, Tokenizer] | None = None,
    ) -> None:
        """Use `load` (torch) or `onnx` (the served graph, perturbation methods only)."""
        assert spec.label is not None, "a trained version's spec has a label"
        self.architecture = architecture
        self.spec = spec
        self.shape = shape
        self.input_names = input_names
        self.network = network
        self._run = run
        self._tokenizers = dict(tokenizers or {})
        self.task = spec.label.task
        self.classes = spec.label.classes
        self.groups = column_groups(spec) if "tabular" in input_names else []
        self.columns = [column for column, _, _ in self.groups]
        self.text_step = next(
            (s for s in spec.features if isinstance(s, TextStep) and s.column == shape.text_column),
            None,
        )
        self.image_step = next((s for s in spec.features if isinstance(s, ImageStep)), None)
        self._lock = threading.Lock()
        self._injection: _Injection | None = None
        if network is not None and "tokens" in input_names:
            self._injection = _Injection(_embedding(network))

    @classmethod
    def load(
        cls,
        *,
        description: Mapping[str, Any],
        spec: PreprocessingSpec,
        weights: bytes,
        pretrained_dir: Path | None = None,
        tokenizers: Mapping[str, Tokenizer] | None = None,
    ) -> Explainer:
        """The version's torch network, rebuilt from model.json and its safetensors weights."""
        architecture = str(description["architecture"])
        shape = input_shape_of(description)
        options = ArchitectureOptions.model_validate(description.get("options") or {})
        network = build_model(architecture, shape, options, pretrained_dir=pretrained_dir)
        network.load_state_dict(safetensors.torch.load(weights))
        network.eval()
        for parameter in network.parameters():
            parameter.requires_grad_(False)  # gradients flow to the inputs only
        names = tuple(description["input_names"])
        if names != network.input_names:
            raise ValueError(
                f"model.json names inputs {names}; the network takes {network.input_names}"
            )
        return cls(
            architecture=architecture,
            spec=spec,
            shape=shape,
            input_names=names,
            network=network,
            tokenizers=tokenizers,
        )

    @classmethod
    def onnx(
        cls,
        *,
        description: Mapping[str, Any],
        spec: PreprocessingSpec,
        run: Callable[[dict[str, np.ndarray]], np.ndarray],
        tokenizers: Mapping[str, Tokenizer] | None = None,
    ) -> Explainer:
        """A version without weights, explained through its served graph (`run`: inputs ->
        logits); the gradient methods refuse."""
        return cls(
            architecture=str(description.get("architecture", "onnx")),
            spec=spec,
            shape=input_shape_of(description),
            input_names=tuple(description["input_names"]),
            network=None,
            run=run,
            tokenizers=tokenizers,
        )

    # -- consistency -------------------------------------------------------------------------------

    def check_against(
        self, served: Callable[[dict[str, np.ndarray]], np.ndarray], *, atol: float = 1e-3
    ) -> float:
        """The largest logit difference between this network and the served graph on a probe
        batch; Conflict (409) when they disagree, so no explanation describes other weights than
        the ones that predict."""
        if self.network is None:
            return 0.0
        probe = example_inputs(self.shape, self.input_names, batch=2)
        ours = self.logits(probe)
        theirs = np.asarray(served(probe), dtype=np.float32)
        difference = (
            float(np.max(np.abs(ours - theirs))) if ours.shape == theirs.shape else math.inf
        )
        scale = max(1.0, float(np.max(np.abs(theirs), initial=0.0)))
        same_class = ours.shape == theirs.shape and (
            self.task is Task.REGRESSION or (ours.argmax(1) == theirs.argmax(1)).all()
        )
        if not (difference <= atol * scale and same_class):
            raise Conflict(
                f"The version's weights (model.safetensors) and its served graph (model.onnx) "
                f"disagree on a probe record (logits differ by up to {difference:.3g}), so an "
                "explanation would not describe the model that predicts.",
                param="model",
                code="explanation_inconsistent",
            )
        return difference

    def logits(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """float32 [n, n_outputs] from this explainer's network (or graph)."""
        if self.network is None:
            assert self._run is not None
            return np.asarray(self._run(dict(inputs)), dtype=np.float32)
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names]
        with torch.no_grad():
            return self.network(*tensors).float().numpy()

    # -- what a method costs ---------------------------------------------------------------------

    def check(self, method: str, options: Options) -> None:
        """InvalidRequest unless this network can take `method` with `options`."""
        if method not in METHODS:
            raise InvalidRequest(
                f"Unknown method {method!r}; use one of: {', '.join(METHODS)}.", param="method"
            )
        if method in GRADIENT_METHODS and self.network is None:
            raise ExplainError(
                f"Method {method!r} needs gradients, and this version has no weights "
                "(model.safetensors) to take them from: use feature_ablation, occlusion, "
                "shapley_sampling or kernel_shap.",
                param="method",
                code="gradients_unavailable",
            )
        if method == "attention" and self.architecture not in (
            "lstm",
            "transformer-encoder",
            MINILM,
        ):
            raise InvalidRequest(
                f"Method 'attention' reads the attention weights of the lstm, "
                f"transformer-encoder and {MINILM} networks; this is a {self.architecture}.",
                param="method",
            )
        if method == "occlusion" and "images" not in self.input_names and options.window:
            raise InvalidRequest("options.window is for image models.", param="options.window")
        self._baseline_choices(options.baseline)  # raises on a baseline no input takes
        if options.target is not None:
            self._target_index(options.target)

    def features(self, method: str, options: Options) -> int:
        """How many features a perturbation method perturbs per record."""
        count = len(self.groups)
        if "images" in self.input_names:
            _, height, width = self.shape.image_shape or (1, 1, 1)
            window = self.window(options)
            if method == "occlusion":
                stride = self.stride(options)
                count += (_slides(height, window, stride)) * (_slides(width, window, stride))
            else:
                count += math.ceil(height / window) * math.ceil(width / window)
        if "tokens" in self.input_names:
            count += self.shape.text_length or 1
        return max(count, 1)

    def cost(self, method: str, options: Options) -> int:
        """Forward passes of one record a method takes (a backward counts as two more)."""
        if method in GRADIENT_METHODS:
            return options.n_steps * _BACKWARD + 2 + (method == "attention")
        features = self.features(method, options)
        if method == "shapley_sampling":
            return self._samples(method, options) * (features + 1) + 1
        if method == "kernel_shap":
            return self._samples(method, options) + 2
        return features + 2  # feature_ablation, occlusion

    # -- explaining ------------------------------------------------------------------------------

    def explain(
        self,
        inputs: Mapping[str, np.ndarray],
        method: str,
        options: Options,
        *,
        predicted: np.ndarray | None = None,
    ) -> list[Attribution]:
        """One attribution per record of `inputs` (model inputs, as `model_inputs` makes them).

        `predicted` are the served graph's logits for the records: the class explained by
        default is the predicted one, as `/v1/predictions` reported it."""
        self.check(method, options)
        n = len(next(iter(inputs.values())))
        with self._lock, torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            tensors = {
                name: torch.from_numpy(np.ascontiguousarray(inputs[name]))
                for name in self.input_names
            }
            outputs = self._forward_tensors(tensors)
            logits = predicted if predicted is not None else outputs.detach().numpy()
            targets = self._targets(options, np.asarray(logits), n)
            plan = self._plan(method, options, tensors)
            baseline_outputs = self._baseline_outputs(plan, tensors)
            raw = self._attribute(method, options, plan, tensors, targets)
            attention = self._attention(tensors) if method == "attention" else None
        rows = np.arange(n)
        scale = self._scale()
        out = outputs.detach().numpy()[rows, targets]
        base = baseline_outputs[rows, targets]
        deltas = None
        if method in GRADIENT_METHODS:
            # Completeness: what the path integral misses of the output's change (captum's
            # convergence delta, from the outputs already at hand rather than two more passes).
            total = sum(r.detach().double().reshape(n, -1).sum(dim=1) for r in raw)
            deltas = np.asarray(total) - (out.astype(np.float64) - base.astype(np.float64))
        folded = self._fold(method, plan, raw, tensors)
        results = []
        for row in range(n):
            real = (
                tensors["attention"][row].numpy().astype(bool) if "attention" in tensors else None
            )
            keep = self._kept_positions(real) if real is not None else None
            results.append(
                Attribution(
                    target=int(targets[row]),
                    output=self._unscale(float(out[row])),
                    baseline_output=self._unscale(float(base[row])),
                    delta=None if deltas is None else float(deltas[row]) * scale,
                    columns=None if "columns" not in folded else folded["columns"][row] * scale,
                    pixels=None if "pixels" not in folded else folded["pixels"][row] * scale,
                    tokens=None
                    if "tokens" not in folded or keep is None
                    else folded["tokens"][row][keep] * scale,
                    attention=None if attention is None or keep is None else attention[row][keep],
                )
            )
        return results

    def _targets(self, options: Options, logits: np.ndarray, n: int) -> np.ndarray:
        if self.task is Task.REGRESSION:
            return np.zeros(n, dtype=np.int64)
        if options.target is not None:
            return np.full(n, self._target_index(options.target), dtype=np.int64)
        return np.asarray(logits).argmax(axis=1).astype(np.int64)

    def _target_index(self, target: str) -> int:
        if self.task is Task.REGRESSION:
            raise InvalidRequest(
                "options.target names a class; a regression model has one output.",
                param="options.target",
            )
        classes = self.classes or []
        if target not in classes:
            raise InvalidRequest(
                f"options.target {target!r} is not a class of this model ({', '.join(classes)}).",
                param="options.target",
            )
        return classes.index(target)

    def _scale(self) -> float:
        label = self.spec.label
        if self.task is Task.REGRESSION and label is not None and label.standardize:
            return float(label.std or 1.0)
        return 1.0

    def _unscale(self, value: float) -> float:
        label = self.spec.label
        if self.task is Task.REGRESSION and label is not None and label.standardize:
            return value * float(label.std or 1.0) + float(label.mean or 0.0)
        return value

    # -- the forward function captum calls --------------------------------------------------------

    def _forward_tensors(self, tensors: Mapping[str, Tensor]) -> Tensor:
        if self.network is None:
            assert self._run is not None
            feed = {name: tensors[name].detach().numpy() for name in self.input_names}
            for name in ("tokens", "attention"):
                if name in feed:
                    feed[name] = feed[name].astype(np.int64)
            for name in ("tabular", "images"):
                if name in feed:
                    feed[name] = feed[name].astype(np.float32)
            return torch.from_numpy(np.asarray(self._run(feed), dtype=np.float32))
        args = []
        for name in self.input_names:
            value = tensors[name]
            args.append(value.long() if name in ("tokens", "attention") else value)
        result: Tensor = self.network(*args)
        return result

    def _forward(self, plan: _Plan) -> Callable[..., Tensor]:
        count = len(plan.names)

        def forward(*args: Tensor) -> Tensor:
            named = dict(zip(plan.names, args[:count], strict=True))
            named.update(zip(plan.fixed, args[count:], strict=True))
            embeddings = named.pop("embeddings", None)
            if embeddings is None:
                return self._forward_tensors(named)
            assert self._injection is not None
            self._injection.value = embeddings
            try:
                return self._forward_tensors(named)
            finally:
                self._injection.value = None

        return forward

    # -- plans: inputs, baselines, masks ---------------------------------------------------------

    def _plan(self, method: str, options: Options, tensors: Mapping[str, Tensor]) -> _Plan:
        gradient = method in GRADIENT_METHODS
        choices = self._baseline_choices(options.baseline)
        names: list[str] = []
        fixed: list[str] = []
        plan = _Plan(names=(), fixed=())
        next_feature = 0
        for name in self.input_names:
            if name == "attention":
                fixed.append(name)
                continue
            if name == "tokens":
                baseline_ids = self._baseline_tokens(tensors["tokens"], tensors["attention"])
                if gradient:
                    names.append("embeddings")
                    fixed.append("tokens")
                    embedding = _embedding(self.network) if self.network is not None else None
                    assert embedding is not None
                    with torch.no_grad():
                        plan.baselines.append(embedding(baseline_ids).detach())
                    continue
                names.append("tokens")
                plan.baselines.append(baseline_ids)
                length = tensors["tokens"].shape[1]
                longest = int(tensors["attention"].sum(dim=1).max().item())
                # Positions past the longest text are padding in every record: one feature.
                ids = torch.arange(length).clamp(max=min(longest, length - 1))
                plan.masks.append((ids + next_feature)[None])
                next_feature += int(ids.max().item()) + 1
                plan.windows.append((1,))
                plan.strides.append((1,))
                continue
            names.append(name)
            if name == "tabular":
                vector, _ = self.tabular_baseline(choices.get("tabular"))
                plan.baselines.append(torch.from_numpy(vector)[None])
                mask = torch.zeros(self.shape.tabular_dim, dtype=torch.int64)
                for index, (_, start, stop) in enumerate(self.groups):
                    mask[start:stop] = index
                plan.masks.append((mask + next_feature)[None])
                next_feature += len(self.groups)
                plan.windows.append((1,))
                plan.strides.append((1,))
            elif name == "images":
                channels, height, width = self.shape.image_shape or (1, 1, 1)
                plan.baselines.append(self._image_baseline(choices.get("images")))
                window = self.window(options)
                rows = torch.arange(height) // window
                cols = torch.arange(width) // window
                patches = rows[:, None] * math.ceil(width / window) + cols[None, :]
                plan.masks.append((patches + next_feature)[None, None])
                next_feature += int(patches.max().item()) + 1
                stride = self.stride(options)
                plan.windows.append((channels, window, window))
                plan.strides.append((channels, stride, stride))
        plan.names = tuple(names)
        plan.fixed = tuple(fixed)
        plan.features = next_feature
        return plan

    def _baseline_choices(self, baseline: str | Mapping[str, Any] | None) -> dict[str, Any]:
        """Which baseline each input gets: a named one applies to the inputs it names, a record
        (column -> value) to the tabular columns."""
        if baseline is None:
            return {}
        takes = {
            "tabular": "tabular" in self.input_names,
            "images": "images" in self.input_names,
            "tokens": "tokens" in self.input_names,
        }
        if isinstance(baseline, Mapping):
            if not takes["tabular"]:
                raise InvalidRequest(
                    "A baseline record sets tabular columns; this model has none.",
                    param="options.baseline",
                )
            unknown = sorted(set(baseline) - set(self.columns))
            if unknown:
                raise InvalidRequest(
                    f"options.baseline names columns {unknown} the model does not read as "
                    f"tabular columns ({', '.join(self.columns)}).",
                    param="options.baseline",
                )
            return {"tabular": baseline}
        choices = {
            name: baseline
            for name, allowed in (
                ("tabular", TABULAR_BASELINES),
                ("images", IMAGE_BASELINES),
                ("tokens", TEXT_BASELINES),
            )
            if baseline in allowed and takes[name]
        }
        if choices:
            return choices
        accepted = sorted(
            {
                *(TABULAR_BASELINES if takes["tabular"] else ()),
                *(IMAGE_BASELINES if takes["images"] else ()),
                *(TEXT_BASELINES if takes["tokens"] else ()),
            }
        )
        raise InvalidRequest(
            f"options.baseline {baseline!r} does not apply to this model; use one of "
            f"{', '.join(accepted)}"
            + (" or a record of column values." if takes["tabular"] else "."),
            param="options.baseline",
        )

    def baselines_used(self, options: Options) -> dict[str, Any]:
        """The baseline of each input kind, as the answer reports it."""
        choices = self._baseline_choices(options.baseline)
        used: dict[str, Any] = {}
        if "tabular" in self.input_names:
            _, record = self.tabular_baseline(choices.get("tabular"))
            used["tabular"] = record
        if "images" in self.input_names:
            used["images"] = choices.get("images", "mean")
        if "tokens" in self.input_names:
            used["text"] = "pad"
        return used

    def tabular_baseline(
        self, choice: str | Mapping[str, Any] | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The baseline's model columns (float32 [tabular_dim]) and the record it stands for.

        `mean` (the default): every numeric column at its training mean (a column that is not
        standardised, at its fill value), every categorical column at its most frequent value;
        `typical`: every column at the value training filled its gaps with (its median or
        mean, its most frequent category); `zeros`: every model column 0 (a standardised column
        at its training mean, no category at all); a record: those columns at the given
        values, the others at their mean."""
        steps = [s for s in self.spec.features if isinstance(s, NumericStep | CategoricalStep)]
        typical = {s.column: s.fill for s in steps}
        if choice != "typical":
            for step in steps:
                if isinstance(step, NumericStep) and step.standardize and step.mean is not None:
                    typical[step.column] = step.mean
        if choice == "zeros":
            record: dict[str, Any] = {}
            for step in steps:
                if isinstance(step, NumericStep):
                    record[step.column] = (step.mean if step.standardize else 0.0) or 0.0
                elif step.encoding == "ordinal":
                    record[step.column] = (step.categories or [None])[0]
                else:
                    record[step.column] = None
            return np.zeros(self.shape.tabular_dim, dtype=np.float32), record
        record = dict(typical)
        if isinstance(choice, Mapping):
            record.update(choice)
        blocks = []
        for step in steps:
            column = pd.Series([record[step.column]], dtype=object)
            try:
                if isinstance(step, NumericStep):
                    blocks.append(encode_numeric(step, column))
                else:
                    blocks.append(encode_categorical(step, column)[0])
            except InvalidRequest as exc:
                raise InvalidRequest(
                    f"options.baseline: {exc.message}", param="options.baseline"
                ) from exc
        vector = np.concatenate(blocks, axis=1)[0] if blocks else np.zeros(0, np.float32)
        return vector.astype(np.float32), record

    def _image_baseline(self, choice: str | None) -> Tensor:
        channels, height, width = self.shape.image_shape or (1, 1, 1)
        if choice in (None, "mean") or self.image_step is None:
            return torch.zeros(1, channels, height, width)
        pixel = 0.0 if choice == "black" else 1.0
        mean = np.asarray(self.image_step.mean or [0.0] * channels, dtype=np.float32)
        std = np.asarray(self.image_step.std or [1.0] * channels, dtype=np.float32)
        values = torch.from_numpy((pixel - mean) / std)
        return values[None, :, None, None].expand(1, channels, height, width).contiguous()

    def _baseline_tokens(self, tokens: Tensor, attention: Tensor) -> Tensor:
        """Every real token replaced by padding; a wordpiece text keeps its first and last
        token ([CLS], [SEP]), which the model always sees."""
        pad = self._pad_id()
        baseline = torch.full_like(tokens, pad)
        if self.text_step is not None and self.text_step.tokenizer == "wordpiece":
            lengths = attention.sum(dim=1)
            rows = torch.arange(tokens.shape[0])
            baseline[:, 0] = tokens[:, 0]
            last = (lengths - 1).clamp(min=0)
            baseline[rows, last] = tokens[rows, last]
        return baseline

    def _pad_id(self) -> int:
        if self.text_step is not None and self.text_step.tokenizer == "wordpiece":
            tokenizer = self._tokenizers.get(self.text_step.tokenizer_ref or "")
            if tokenizer is not None:
                return int((tokenizer.padding or {}).get("pad_id", 0))
        return 0

    def _baseline_outputs(self, plan: _Plan, tensors: Mapping[str, Tensor]) -> np.ndarray:
        n = tensors[self.input_names[0]].shape[0]
        named: dict[str, Tensor] = {}
        for name, baseline in zip(plan.names, plan.baselines, strict=True):
            named[name] = baseline.expand(n, *baseline.shape[1:])
        for name in plan.fixed:
            named[name] = tensors[name]
        args = [named[name] for name in plan.names] + [named[name] for name in plan.fixed]
        with torch.no_grad():
            return self._forward(plan)(*args).float().numpy()

    # -- captum ----------------------------------------------------------------------------------

    def _attribute(
        self,
        method: str,
        options: Options,
        plan: _Plan,
        tensors: Mapping[str, Tensor],
        targets: np.ndarray,
    ) -> tuple[Tensor, ...]:
        from captum.attr import (  # imported here: captum is heavy, and needed by this only
            FeatureAblation,
            KernelShap,
            Occlusion,
            ShapleyValueSampling,
        )

        forward = self._forward(plan)
        inputs = tuple(self._attributed(name, tensors, plan) for name in plan.names)
        fixed = tuple(tensors[name] for name in plan.fixed)
        baselines = tuple(plan.baselines)
        target = torch.from_numpy(targets)
        extra = fixed or None
        per_eval = _PER_EVAL.get(self.architecture, _PER_EVAL_DEFAULT)
        if method in GRADIENT_METHODS:
            return self._integrate(forward, inputs, baselines, fixed, targets, options.n_steps)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if method == "occlusion":
                result = Occlusion(forward).attribute(
                    inputs,
                    sliding_window_shapes=tuple(plan.windows),
                    strides=tuple(plan.strides),
                    baselines=baselines,
                    target=target,
                    additional_forward_args=extra,
                    perturbations_per_eval=per_eval,
                )
            elif method == "feature_ablation":
                result = FeatureAblation(forward).attribute(
                    inputs,
                    baselines=baselines,
                    target=target,
                    additional_forward_args=extra,
                    feature_mask=tuple(plan.masks),
                    perturbations_per_eval=per_eval,
                )
            elif method == "shapley_sampling":
                result = ShapleyValueSampling(forward).attribute(
                    inputs,
                    baselines=baselines,
                    target=target,
                    additional_forward_args=extra,
                    feature_mask=tuple(plan.masks),
                    n_samples=self._samples(method, options),
                    perturbations_per_eval=per_eval,
                )
            else:  # kernel_shap: one interpretable model per record, so one record at a time
                result = self._kernel_shap(
                    KernelShap(forward), options, plan, inputs, fixed, baselines, targets
                )
        return _as_tuple(result)

    def _integrate(
        self,
        forward: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        baselines: tuple[Tensor, ...],
        fixed: tuple[Tensor, ...],
        targets: np.ndarray,
        n_steps: int,
    ) -> tuple[Tensor, ...]:
        """Integrated gradients, as many records per captum call as fit `_IG_BATCH` rows (each
        record takes `n_steps` rows); a record whose steps alone exceed it is split by captum."""
        integrated = _integrated_gradients(forward)
        budget = _IG_BATCH.get(self.architecture, _IG_BATCH_DEFAULT)
        n = len(targets)
        per_call = budget // n_steps
        if per_call < 1:
            return _as_tuple(
                integrated.attribute(
                    inputs,
                    baselines=baselines,
                    target=torch.from_numpy(targets),
                    additional_forward_args=fixed or None,
                    n_steps=n_steps,
                    internal_batch_size=max(budget, n),
                )
            )
        parts: list[tuple[Tensor, ...]] = []
        for start in range(0, n, per_call):
            rows = slice(start, start + per_call)
            parts.append(
                _as_tuple(
                    integrated.attribute(
                        tuple(x[rows] for x in inputs),
                        baselines=tuple(b[rows] if b.shape[0] > 1 else b for b in baselines),
                        target=torch.from_numpy(targets[rows]),
                        additional_forward_args=tuple(x[rows] for x in fixed) or None,
                        n_steps=n_steps,
                    )
                )
            )
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    def _kernel_shap(
        self,
        explainer: Any,
        options: Options,
        plan: _Plan,
        inputs: tuple[Tensor, ...],
        fixed: tuple[Tensor, ...],
        baselines: tuple[Tensor, ...],
        targets: np.ndarray,
    ) -> tuple[Tensor, ...]:
        parts: list[tuple[Tensor, ...]] = []
        for row in range(len(targets)):
            one = tuple(x[row : row + 1] for x in inputs)
            base = tuple(b[row : row + 1] if b.shape[0] > 1 else b for b in baselines)
            masks = tuple(m[row : row + 1] if m.shape[0] > 1 else m for m in plan.masks)
            extra = tuple(x[row : row + 1] for x in fixed) or None
            parts.append(
                _as_tuple(
                    explainer.attribute(
                        one,
                        baselines=base,
                        target=int(targets[row]),
                        additional_forward_args=extra,
                        feature_mask=masks,
                        n_samples=self._samples("kernel_shap", options),
                        perturbations_per_eval=_PER_EVAL.get(self.architecture, _PER_EVAL_DEFAULT),
                    )
                )
            )
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    def _attributed(self, name: str, tensors: Mapping[str, Tensor], plan: _Plan) -> Tensor:
        if name != "embeddings":
            return tensors[name].float() if name in ("tabular", "images") else tensors[name]
        assert self.network is not None
        with torch.no_grad():
            return _embedding(self.network)(tensors["tokens"]).detach()

    def _samples(self, method: str, options: Options) -> int:
        return options.n_samples or DEFAULT_N_SAMPLES.get(method, 25)

    def window(self, options: Options) -> int:
        """The occlusion window and perturbation patch side, in model pixels."""
        _, height, width = self.shape.image_shape or (1, 1, 1)
        window = options.window or max(1, min(height, width) // 4)
        return max(1, min(window, height, width))

    def stride(self, options: Options) -> int:
        """Occlusion's stride, in model pixels."""
        window = self.window(options)
        return max(1, min(options.stride or max(1, window // 2), window))

    # -- folding attributions back to what a person reads ---------------------------------------

    def _fold(
        self,
        method: str,
        plan: _Plan,
        raw: tuple[Tensor, ...],
        tensors: Mapping[str, Tensor],
    ) -> dict[str, np.ndarray]:
        grouped = method in ("shapley_sampling", "kernel_shap", "feature_ablation")
        folded: dict[str, np.ndarray] = {}
        for name, values in zip(plan.names, raw, strict=True):
            array = values.detach().double().numpy()
            if name == "tabular":
                columns = np.zeros((array.shape[0], len(self.groups)))
                for index, (_, start, stop) in enumerate(self.groups):
                    # A grouped method gives each element its group's value; the others give
                    # each model column its share, which sums to the column's.
                    block = array[:, start:stop]
                    columns[:, index] = block[:, 0] if grouped else block.sum(axis=1)
                folded["columns"] = columns
            elif name == "images":
                if grouped:
                    # Each pixel of a patch holds the patch's value: spread it over the patch
                    # so the heatmap sums to the patch's attribution.
                    mask = plan.masks[plan.names.index("images")][0, 0].numpy()
                    sizes = np.bincount(mask.ravel() - mask.min())[mask - mask.min()]
                    folded["pixels"] = array[:, 0] / sizes
                else:
                    folded["pixels"] = array.sum(axis=1)
            elif name == "embeddings":
                folded["tokens"] = array.sum(axis=2)
            elif name == "tokens":
                folded["tokens"] = array
        return folded

    def _kept_positions(self, real: np.ndarray) -> np.ndarray:
        """The positions reported as tokens: the real ones, without a wordpiece text's
        [CLS] and [SEP]."""
        positions = np.flatnonzero(real)
        if self.text_step is not None and self.text_step.tokenizer == "wordpiece":
            positions = positions[1:-1]
        return positions

    # -- attention weights -----------------------------------------------------------------------

    def _attention(self, tensors: Mapping[str, Tensor]) -> np.ndarray:
        """[n, length]: the attention each position received (lstm: its pooling weight;
        transformers: the last layer's weights averaged over heads and real query tokens)."""
        assert self.network is not None
        encoder = self.network.encoder
        tokens, attention = tensors["tokens"].long(), tensors["attention"].long()
        captured: dict[str, Tensor] = {}
        with torch.no_grad():
            if self.architecture == "lstm":
                assert encoder is not None
                hook = encoder.score.register_forward_hook(
                    lambda _m, _i, out: captured.__setitem__("scores", out)
                )
                try:
                    self._forward_tensors(tensors)
                finally:
                    hook.remove()
                scores = captured["scores"].squeeze(-1).masked_fill(attention == 0, -1e9)
                weights = torch.softmax(scores, dim=1) * attention
                return weights.numpy()
            if self.architecture == MINILM:
                assert encoder is not None
                output = encoder.bert(
                    input_ids=tokens,
                    attention_mask=attention,
                    token_type_ids=torch.zeros_like(tokens),
                    output_attentions=True,
                )
                last = output.attentions[-1]
            else:
                assert encoder is not None
                layer = encoder.layers[-1]
                hook = layer.qkv.register_forward_hook(
                    lambda _m, _i, out: captured.__setitem__("qkv", out)
                )
                try:
                    self._forward_tensors(tensors)
                finally:
                    hook.remove()
                n, length, _ = captured["qkv"].shape
                qkv = captured["qkv"].reshape(n, length, 3, layer.heads, -1)
                query, key, _ = qkv.permute(2, 0, 3, 1, 4)
                bias = (attention == 0).float()[:, None, None, :] * -1e9
                scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1]) + bias
                last = torch.softmax(scores, dim=-1)
            per_head = last.mean(dim=1)  # [n, queries, keys]
            queries = attention.float()[:, :, None]
            received = (per_head * queries).sum(dim=1) / queries.sum(dim=1).clamp(min=1)
            return (received * attention).numpy()

    # -- tokens ----------------------------------------------------------------------------------

    def tokens(self, text: str, ids: np.ndarray, attention: np.ndarray) -> list[Token]:
        """The reported tokens of one record's text (as `_kept_positions` keeps them), with
        their character spans."""
        real = np.flatnonzero(attention)
        step = self.text_step
        if step is None:
            return []
        if step.tokenizer == "word":
            found = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
            found = found[: step.max_length]
            vocabulary = step.vocabulary or []
            index = {word: i for i, word in enumerate(vocabulary)}
            unk = index.get("<unk>", 1)
            words = [w.lower() if step.lowercase else w for w, _, _ in found]
            if len(found) == len(real) and all(
                index.get(w, unk) == int(ids[p]) for w, p in zip(words, real, strict=True)
            ):
                return [Token(w, s, e) for w, s, e in found]
            return [Token(_vocab(vocabulary, int(ids[p])), None, None) for p in real]
        tokenizer = self._tokenizers.get(step.tokenizer_ref or "")
        if tokenizer is None:
            return [Token(str(int(ids[p])), None, None) for p in real[1:-1]]
        encoding = tokenizer.encode(text)
        kept = [
            (token, offset, bool(special), token_id)
            for token, offset, mask, special, token_id in zip(
                encoding.tokens,
                encoding.offsets,
                encoding.attention_mask,
                encoding.special_tokens_mask,
                encoding.ids,
                strict=True,
            )
            if mask
        ]
        if len(kept) > step.max_length >= 2 and kept[-1][2]:
            kept = [*kept[: step.max_length - 1], kept[-1]]
        kept = kept[: step.max_length]
        if len(kept) != len(real) or any(
            t[3] != int(ids[p]) for t, p in zip(kept, real, strict=True)
        ):
            return [Token(str(int(ids[p])), None, None) for p in real[1:-1]]
        return [Token(token, start, end) for token, (start, end), _, _ in kept[1:-1]]


@functools.cache
def _legendre(n_steps: int) -> tuple[list[float], list[float]]:
    """Gauss-Legendre step sizes and points on [0, 1], as captum computes them: once per step
    count and process (numpy's `leggauss` solves an n x n eigenproblem, a second for 1000
    steps on a busy machine, which captum would redo on every call)."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    sizes, alphas = approximation_parameters("gausslegendre")
    return list(sizes(n_steps)), list(alphas(n_steps))


@functools.cache
def _integrated_gradients_class() -> type:
    from captum.attr import IntegratedGradients

    class CachedIntegratedGradients(IntegratedGradients):  # type: ignore[misc]
        """captum's integrated gradients with cached Gauss-Legendre points (`_legendre`) and
        one backward seed per batch (`_summed_gradients`)."""

        def __init__(self, forward_func: Callable[..., Tensor]) -> None:
            super().__init__(forward_func)
            self.gradient_func = _summed_gradients

        def _attribute(
            self,
            inputs: tuple[Tensor, ...],
            baselines: tuple[Tensor | int | float, ...],
            target: Any = None,
            additional_forward_args: Any = None,
            n_steps: int = DEFAULT_N_STEPS,
            method: str = "gausslegendre",
            step_sizes_and_alphas: tuple[list[float], list[float]] | None = None,
        ) -> tuple[Tensor, ...]:
            if step_sizes_and_alphas is None and method == "gausslegendre":
                step_sizes_and_alphas = _legendre(n_steps)
            result: tuple[Tensor, ...] = super()._attribute(
                inputs,
                baselines,
                target,
                additional_forward_args,
                n_steps,
                method,
                step_sizes_and_alphas,
            )
            return result

    return CachedIntegratedGradients


def _integrated_gradients(forward: Callable[..., Tensor]) -> Any:
    return _integrated_gradients_class()(forward)


def _summed_gradients(
    forward_fn: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target_ind: Any = None,
    additional_forward_args: Any = None,
) -> tuple[Tensor, ...]:
    """captum's `compute_gradients` with one backward seed instead of one per row.

    captum differentiates `torch.unbind(outputs)`, a scalar per row and step, whose Python
    overhead outweighs a small network's own work (64 records x 50 steps: 3,200 seeds). Every
    network here computes each row from that row alone (no batch statistics in eval mode), so
    the gradient of the rows' sum is each row's own gradient: the same numbers, one seed."""
    from captum._utils.common import _run_forward

    with torch.autograd.set_grad_enabled(True):
        outputs = _run_forward(forward_fn, inputs, target_ind, additional_forward_args)
        assert isinstance(outputs, Tensor) and outputs[0].numel() == 1
        grads = torch.autograd.grad(outputs.sum(), inputs)
    return tuple(grads)


def _vocab(vocabulary: Sequence[str], token_id: int) -> str:
    return vocabulary[token_id] if 0 <= token_id < len(vocabulary) else str(token_id)


def _slides(size: int, window: int, stride: int) -> int:
    return max(1, (size - window) // stride + 1 + int((size - window) % stride > 0))


def _as_tuple(value: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (value,) if isinstance(value, Tensor) else tuple(value)


def _embedding(network: Network | None) -> nn.Module:
    """The token embedding layer of a text network."""
    encoder = network.encoder if network is not None else None
    if encoder is None:
        raise ValueError("this network reads no text")
    bert = getattr(encoder, "bert", None)
    if bert is not None:
        module: nn.Module = bert.embeddings.word_embeddings
        return module
    module = encoder.embedding
    return module


def image_heatmap_png(heatmap: np.ndarray, size: tuple[int, int]) -> bytes:
    """An overlay-ready RGBA PNG of `heatmap` ([h, w]) resized to `size` (width, height): red
    where a pixel raised the explained output, blue where it lowered it, opacity by strength
    (the strongest pixel opaque), transparent where it did nothing."""
    import io

    from PIL import Image

    values = np.asarray(heatmap, dtype=np.float64)
    peak = float(np.max(np.abs(values), initial=0.0))
    scaled = values / peak if peak > 0 else np.zeros_like(values)
    rgba = np.zeros((*values.shape, 4), dtype=np.uint8)
    rgba[..., 0] = np.where(scaled > 0, 255, 0)
    rgba[..., 2] = np.where(scaled < 0, 255, 0)
    rgba[..., 3] = np.round(np.abs(scaled) * 255).astype(np.uint8)
    image = Image.fromarray(rgba, mode="RGBA").resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def permutation_importance(
    network: nn.Module,
    inputs: Mapping[str, np.ndarray],
    targets: np.ndarray,
    spec: PreprocessingSpec,
    *,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any] | None:
    """How much the score on a held-out split drops when one source column's values are
    shuffled between rows (its whole one-hot block together), `repeats` times per column:
    accuracy for a classifier, R² for a regression. None when the network reads no tabular
    columns or the split has fewer than two rows."""
    from aiaas.training.trainer import predict

    if "tabular" not in inputs or len(targets) < 2 or spec.label is None:
        return None
    classify = spec.label.task is Task.CLASSIFICATION

    def score(feed: Mapping[str, np.ndarray]) -> float:
        outputs = predict(network, dict(feed))
        if classify:
            return float((outputs.argmax(axis=1) == targets).mean())
        truth = np.asarray(targets, dtype=np.float64)
        residual = float(((outputs[:, 0] - truth) ** 2).sum())
        total = float(((truth - truth.mean()) ** 2).sum())
        return 1.0 - residual / total if total > 0 else 0.0

    rng = np.random.default_rng(seed)
    reference = score(inputs)
    tabular = np.asarray(inputs["tabular"])
    columns = []
    for column, start, stop in column_groups(spec):
        drops = []
        for _ in range(repeats):
            shuffled = tabular.copy()
            shuffled[:, start:stop] = tabular[rng.permutation(len(tabular)), start:stop]
            drops.append(reference - score({**inputs, "tabular": shuffled}))
        columns.append(
            {
                "column": column,
                "importance": float(np.mean(drops)),
                "std": float(np.std(drops)),
            }
        )
    columns.sort(key=lambda c: -c["importance"])
    return {
        "metric": "accuracy" if classify else "r2",
        "score": reference,
        "repeats": repeats,
        "rows": len(targets),
        "columns": columns,
    }
