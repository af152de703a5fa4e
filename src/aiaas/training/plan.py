"""A training job's plan: what to train on which data, checked before the job is queued.

Everything a user can get wrong (an unknown column, a regression target for a classifier, an
architecture the data cannot feed) is found here, from the dataset version's schema alone, so a
bad request is a 400 at create time and never a job that fails later. The worker then runs the
plan as it is (see `workers/training_job.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from aiaas.errors import InvalidRequest
from aiaas.specs.hyperparameters import HyperparameterChoices
from aiaas.specs.preprocessing import (
    CategoricalStep,
    FeatureStep,
    ImageStep,
    LabelSpec,
    NumericStep,
    PreprocessingSpec,
    TextStep,
    propose_spec,
)
from aiaas.specs.shapes import (
    ARCHITECTURES,
    MINILM,
    TOKENIZER_REF,
    ArchitectureOptions,
    InputShape,
    check_compatible,
)
from aiaas.specs.types import ColumnType, Task

__all__ = ["Defaults", "Hyperparameters", "TrainingPlan", "plan"]

_MINILM_MAX_LENGTH = 128  # position embeddings allow 512; 128 keeps CPU fine-tuning practical


class Defaults(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate: float


# What "auto" means per architecture: settings that learn the synthetic benchmarks and typical
# small tabular/text/image sets reliably on CPU.
DEFAULTS: dict[str, Defaults] = {
    "mlp": Defaults(n_epochs=20, batch_size=64, learning_rate=1e-3),
    "cnn": Defaults(n_epochs=10, batch_size=32, learning_rate=1e-3),
    "lstm": Defaults(n_epochs=10, batch_size=32, learning_rate=3e-3),
    "transformer-encoder": Defaults(n_epochs=10, batch_size=32, learning_rate=1e-3),
    MINILM: Defaults(n_epochs=3, batch_size=16, learning_rate=5e-5),
}


class Hyperparameters(BaseModel):
    """The resolved values a job trains with (no "auto" left)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=4096)
    learning_rate: float = Field(gt=0, le=10)
    learning_rate_multiplier: float = Field(gt=0, le=1000)
    weight_decay: float = Field(ge=0, le=1)
    early_stopping_patience: int | None = Field(ge=1, le=1000)


class TrainingPlan(BaseModel):
    """Stored as the job's `spec`; the worker needs nothing else to run the job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    model: str
    task: Task
    target_column: str
    hyperparameters: Hyperparameters
    architecture: ArchitectureOptions
    # The dataset version's own fitted spec when it fits this job, else a fresh one that the
    # worker fits on the training split.
    preprocessing: PreprocessingSpec
    model_name: str  # what the result registers as


def plan(
    *,
    model: str,
    columns: Sequence[tuple[str, ColumnType]],
    dataset_spec: PreprocessingSpec,
    target: str | None,
    task: Task | None,
    hyperparameters: HyperparameterChoices,
    architecture: ArchitectureOptions,
    model_name: str,
) -> TrainingPlan:
    """Check the request against the dataset version's schema and resolve every default."""
    if model not in ARCHITECTURES:
        raise InvalidRequest(
            f"Unknown base model {model!r}; use one of: {', '.join(ARCHITECTURES)}.",
            param="model",
            code="model_not_found",
        )
    types = dict(columns)
    target = target or (dataset_spec.label.column if dataset_spec.label else None)
    if target is None:
        raise InvalidRequest(
            "The dataset version has no label column: name one in target_column.",
            param="target_column",
        )
    if target not in types:
        raise InvalidRequest(
            f"Column {target!r} is not in the dataset (columns: {', '.join(types)}).",
            param="target_column",
        )
    task = task or _inferred_task(dataset_spec, target, types[target])
    if task is Task.CLASSIFICATION and types[target] is ColumnType.FLOAT:
        raise InvalidRequest(
            f"Column {target!r} holds continuous values (float): a classifier needs classes. "
            "Use task 'regression', or a categorical column.",
            param="task",
        )
    spec = _preprocessing(model, columns, dataset_spec, target, task)
    check_compatible(model, _shape(spec))
    return TrainingPlan(
        model=model,
        task=task,
        target_column=target,
        hyperparameters=_resolve(model, hyperparameters),
        architecture=architecture,
        preprocessing=spec,
        model_name=model_name,
    )


def _inferred_task(spec: PreprocessingSpec, target: str, kind: ColumnType) -> Task:
    if spec.label is not None and spec.label.column == target:
        return spec.label.task
    return Task.REGRESSION if kind is ColumnType.FLOAT else Task.CLASSIFICATION


def _preprocessing(
    model: str,
    columns: Sequence[tuple[str, ColumnType]],
    dataset_spec: PreprocessingSpec,
    target: str,
    task: Task,
) -> PreprocessingSpec:
    label = dataset_spec.label
    reusable = label is not None and label.column == target and label.task is task
    if reusable and model != MINILM:
        return dataset_spec
    if reusable:
        base = dataset_spec.features
    else:
        # A new target: the old label may become a feature, so every column gets its step again
        # (the dataset's own choices are kept for columns it already had steps for).
        proposed = propose_spec(columns, label=target, task=task, split=dataset_spec.split)
        chosen = {step.column: step for step in dataset_spec.features}
        base = [chosen.get(step.column, step) for step in proposed.features]
    features = [_unfitted(step, model) for step in base]
    return PreprocessingSpec(
        features=features,
        label=_unfitted_label(dataset_spec, target, task),
        split=dataset_spec.split,
    )


def _unfitted(step: FeatureStep, model: str) -> FeatureStep:
    if isinstance(step, NumericStep):
        return step.model_copy(update={"fill": None, "mean": None, "std": None})
    if isinstance(step, CategoricalStep):
        return step.model_copy(update={"categories": None, "fill": None, "other": False})
    if isinstance(step, TextStep):
        if model == MINILM:
            return TextStep(
                column=step.column,
                tokenizer="wordpiece",
                tokenizer_ref=TOKENIZER_REF,
                max_length=min(step.max_length, _MINILM_MAX_LENGTH),
            )
        return step.model_copy(update={"vocabulary": None})
    return step


def _unfitted_label(spec: PreprocessingSpec, target: str, task: Task) -> LabelSpec:
    standardize = spec.label.standardize if spec.label and spec.label.column == target else False
    return LabelSpec(column=target, task=task, standardize=standardize)


def _shape(spec: PreprocessingSpec) -> InputShape:
    """The inputs the data will give, as far as the unfitted spec tells (enough to check)."""
    tabular = sum(isinstance(s, NumericStep | CategoricalStep) for s in spec.features)
    text = next((s for s in spec.features if isinstance(s, TextStep)), None)
    image = next((s for s in spec.features if isinstance(s, ImageStep)), None)
    classes = spec.label.classes if spec.label and spec.label.classes else None
    return InputShape(
        tabular_dim=tabular,
        text_column=text.column if text else None,
        text_vocab_size=(len(text.vocabulary) if text.vocabulary else 2) if text else None,
        text_length=text.max_length if text else None,
        text_tokenizer=text.tokenizer if text else None,
        image_shape=(image.channels, *image.size) if image else None,
        n_outputs=len(classes) if classes else 2,
    )


def _resolve(model: str, given: HyperparameterChoices) -> Hyperparameters:
    defaults = DEFAULTS[model]
    multiplier = 1.0 if given.learning_rate_multiplier == "auto" else given.learning_rate_multiplier
    learning_rate = (
        defaults.learning_rate * multiplier
        if given.learning_rate == "auto"
        else given.learning_rate
    )
    return Hyperparameters(
        n_epochs=defaults.n_epochs if given.n_epochs == "auto" else given.n_epochs,
        batch_size=defaults.batch_size if given.batch_size == "auto" else given.batch_size,
        learning_rate=learning_rate,
        learning_rate_multiplier=multiplier,
        weight_decay=given.weight_decay,
        early_stopping_patience=given.early_stopping_patience,
    )
