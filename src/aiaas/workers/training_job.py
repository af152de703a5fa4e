"""One training job, run inside its worker process from its plan to a registered model version.

The worker holds the job through its lease (`workers/lease.py`); every write (events,
checkpoints, the final state) names the claim token and is dropped once the job was taken back.
Checkpoints go to the blob store first and are recorded after, so the row always names a complete
blob; only the newest is kept.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch
from tokenizers import Tokenizer

from aiaas import __version__
from aiaas.data.build import read_version
from aiaas.domain import Actor, Job, JobControl, JobStatus, ModelVersion
from aiaas.engines.embeddings.export import minilm_l6_v2_dir, read_pooling
from aiaas.errors import InvalidRequest
from aiaas.ids import now
from aiaas.services.audit import AuditService
from aiaas.services.registry import NewVersion, RegistryService
from aiaas.settings import Settings
from aiaas.specs.preprocessing import (
    Features,
    PreprocessingSpec,
    encode_labels,
    fit,
    transform,
    unscale_targets,
)
from aiaas.specs.shapes import MINILM, TOKENIZER_REF, InputShape, input_shape, model_inputs
from aiaas.specs.types import SPLIT_COLUMN, Split, Task
from aiaas.storage.process import Storage
from aiaas.storage.repos import datasets as datasets_repo
from aiaas.storage.repos import jobs as repo
from aiaas.training.architectures import Network, build_model
from aiaas.training.evaluate import (
    EvaluationReport,
    evaluate_classification,
    evaluate_regression,
    summary,
)
from aiaas.training.explain import permutation_importance
from aiaas.training.export import export_onnx, export_text_encoder, verify_onnx
from aiaas.training.plan import TrainingPlan
from aiaas.training.trainer import EpochMetrics, Stop, Trainer, TrainResult, predict
from aiaas.training.trainer import Hyperparameters as LoopHyperparameters
from aiaas.training.trainer import Split as TensorSplit
from aiaas.workers.data_access import data_org
from aiaas.workers.lease import JobLease, run_job

ARTIFACTS = ("model.safetensors", "model.onnx", "preprocessing.json", "model.json")
GRANT_CHECK_S = 1.0  # how often a job on another organisation's data checks its grant


class _Control:
    """What the trainer asks and tells while it runs (trainer.TrainingControl)."""

    def __init__(self, lease: JobLease, *, n_epochs: int, checkpoint_interval_s: float) -> None:
        self._lease = lease
        self._n_epochs = n_epochs
        self._interval = checkpoint_interval_s
        self._last_checkpoint = time.monotonic()
        self._epoch_seconds: list[float] = []
        self._next_grant_check = 0.0

    def poll(self) -> Stop | None:
        # Training on another organisation's data: a revoked or expired grant ends the job
        # (checked once a second, not every step).
        if self._lease.job.grant_id is not None and time.monotonic() >= self._next_grant_check:
            self._next_grant_check = time.monotonic() + GRANT_CHECK_S
            data_org(self._lease.storage, self._lease.job)
        return self._lease.stop_requested()

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self._last_checkpoint >= self._interval

    def on_checkpoint(
        self, data: bytes, *, epoch: int, step: int, metrics: EpochMetrics | None
    ) -> None:
        self._last_checkpoint = time.monotonic()
        self._lease.store_checkpoint(
            data,
            epoch=epoch,
            step=step,
            metrics=metrics.as_dict() if metrics else None,
            event=(
                (_epoch_message(metrics, self._n_epochs), _metrics_data(metrics, self._n_epochs))
                if metrics
                else None
            ),
            progress=self._lease.progress,
        )
        # Training on another organisation's data: stop here if its grant has ended.
        data_org(self._lease.storage, self._lease.job)

    def on_epoch(self, metrics: EpochMetrics) -> None:
        # The epoch's event is written with its checkpoint (which follows), not here.
        self._epoch_seconds.append(metrics.seconds)
        remaining = (self._n_epochs - metrics.epoch) * float(np.mean(self._epoch_seconds))
        self._lease.progress = {
            "epoch": metrics.epoch,
            "step": metrics.step,
            "estimated_finish": now() + remaining,
        }


def run_training_job(
    settings: Settings, job_id: str, token: str, *, shutdown: threading.Event
) -> None:
    run_job(settings, job_id, token, _run, shutdown=shutdown)


def _run(settings: Settings, storage: Storage, lease: JobLease) -> None:
    job = lease.job
    plan = TrainingPlan.model_validate(job.spec)
    checkpoint = _latest_checkpoint(storage, job.id)
    lease.event(
        f"Resuming from the checkpoint at epoch {checkpoint[0]}, step {checkpoint[1]} "
        f"(attempt {job.attempts})."
        if checkpoint
        else f"Training started (attempt {job.attempts})."
    )
    prepared = prepare(plan, load_frame(storage, job))
    hyper = plan.hyperparameters
    torch.manual_seed(job.seed)
    model = build_model(
        plan.model, prepared.shape, plan.architecture, pretrained_dir=pretrained_dir(plan)
    )
    data = prepared.bind(model.input_names)
    trainer = Trainer(
        model,
        plan.task,
        LoopHyperparameters(
            n_epochs=hyper.n_epochs,
            batch_size=hyper.batch_size,
            learning_rate=hyper.learning_rate,
            seed=job.seed,
            weight_decay=hyper.weight_decay,
            early_stopping_patience=hyper.early_stopping_patience,
        ),
    )
    control = _Control(
        lease,
        n_epochs=hyper.n_epochs,
        checkpoint_interval_s=settings.training_checkpoint_interval_s,
    )
    resume = _read_checkpoint(storage, checkpoint[2]) if checkpoint else None
    result = trainer.run(data.train, data.valid, control, resume=resume)
    if result.outcome == "cancelled":
        if not lease.lost:
            lease.finish(JobStatus.CANCELLED, "Job cancelled.")
        return
    if result.outcome == "paused":
        if lease.control is JobControl.PAUSE:
            lease.finish(JobStatus.PAUSED, f"Job paused after step {result.steps}.")
        else:
            lease.requeue(
                f"The server is stopping: checkpointed at step {result.steps}; queued again."
            )
        return
    _register(storage, lease, plan, data, model, result)


@dataclass(frozen=True)
class Encoded:
    """A job's splits as model inputs, with the fitted spec and input shape they came from."""

    spec: PreprocessingSpec
    shape: InputShape
    train: TensorSplit
    valid: TensorSplit | None
    test: TensorSplit | None
    dropped: int  # rows without a label


@dataclass(frozen=True)
class Prepared:
    """A job's data, encoded as features; `bind` picks the inputs a network takes."""

    spec: PreprocessingSpec
    shape: InputShape
    parts: dict[Split, tuple[Features, np.ndarray] | None]
    dropped: int

    def bind(self, input_names: tuple[str, ...]) -> Encoded:
        def split(name: Split) -> TensorSplit | None:
            part = self.parts[name]
            if part is None:
                return None
            inputs = model_inputs(part[0], self.shape, input_names)
            return TensorSplit(inputs=inputs, targets=part[1])

        train = split(Split.TRAIN)
        assert train is not None  # prepare() refuses an empty training split
        return Encoded(
            self.spec,
            self.shape,
            train,
            split(Split.VALIDATION),
            split(Split.TEST),
            self.dropped,
        )


def prepare(plan: TrainingPlan, frame: pd.DataFrame) -> Prepared:
    """Fit (when the plan's spec is not fitted yet) on the training rows and encode every split.
    Deterministic: a resumed job prepares exactly the same arrays."""
    return prepare_frame(plan.preprocessing, plan.target_column, frame)


def prepare_frame(spec: PreprocessingSpec, target: str, frame: pd.DataFrame) -> Prepared:
    """`prepare` for a spec and target column (a registered version's fitted spec, say)."""
    labelled = frame[frame[target].notna()]
    dropped = len(frame) - len(labelled)
    parts = {s: labelled[labelled[SPLIT_COLUMN] == s.value] for s in Split}
    if not spec.fitted:
        spec = fit(spec, parts[Split.TRAIN])
    shape = input_shape(spec)
    tokenizers = tokenizers_for(spec)

    if len(parts[Split.TRAIN]) == 0:
        raise InvalidRequest("The training split has no labelled rows.", param="training_file")
    encoded = {
        name: (
            transform(spec, part, tokenizers=tokenizers),
            encode_labels(spec, part[target]),
        )
        if len(part)
        else None
        for name, part in parts.items()
    }
    return Prepared(spec, shape, encoded, dropped)


def tokenizers_for(spec: PreprocessingSpec) -> dict[str, Tokenizer]:
    needs = any(getattr(step, "tokenizer", None) == "wordpiece" for step in spec.features)
    if not needs:
        return {}
    return {TOKENIZER_REF: Tokenizer.from_file(str(minilm_l6_v2_dir() / "tokenizer.json"))}


def pretrained_dir(plan: TrainingPlan) -> Path | None:
    return minilm_l6_v2_dir() if plan.model == MINILM else None


def load_frame(storage: Storage, job: Job) -> pd.DataFrame:
    owner = data_org(storage, job)
    with storage.db.read() as conn:
        version = datasets_repo.get_version_by_id(
            conn, org_id=owner, version_id=job.dataset_version_id
        )
    if version is None:
        raise InvalidRequest(
            f"Dataset version {job.dataset_version_id} no longer exists.", param="training_file"
        )
    return read_version(b"".join(storage.blobs.open(version.blob_key)))


def _latest_checkpoint(storage: Storage, job_id: str) -> tuple[int, int, str] | None:
    with storage.db.read() as conn:
        found = repo.latest_checkpoint(conn, job_id=job_id)
    if found is None or found.blob_key is None:
        return None
    return found.epoch, found.step, found.blob_key


def _read_checkpoint(storage: Storage, key: str) -> bytes:
    return b"".join(storage.blobs.open(key))


# -- the end: evaluate, export, register ---------------------------------------------------------


def _register(
    storage: Storage,
    lease: JobLease,
    plan: TrainingPlan,
    data: Encoded,
    model: Network,
    result: TrainResult,
) -> None:
    """Evaluate the trained model, export it and register it as a version of the plan's model
    (unless the job was cancelled meanwhile), then end the job as succeeded."""
    evaluation = _evaluate(lease, plan, data, model)
    exported = _export(plan, data, model, evaluation.split)
    metrics = _version_metrics(data, result, evaluation, exported.onnx_max_abs_diff)
    importance = permutation_importance(
        model, evaluation.split.inputs, evaluation.split.targets, data.spec, seed=lease.job.seed
    )
    if importance is not None:  # global explanation of a model with tabular columns
        metrics["permutation_importance"] = {"split": evaluation.split_name, **importance}
    lineage = _lineage(storage, lease.job, plan)
    if lease.stop_requested() is Stop.CANCEL:
        lease.finish(JobStatus.CANCELLED, "Job cancelled before its model was registered.")
        return
    version = _register_version(storage, lease.job, plan, exported.artifacts, metrics, lineage)
    lease.event(f"Registered {plan.model_name} version {version.version}.")
    _succeed(lease, plan, data, result, version)


@dataclass(frozen=True)
class _Evaluation:
    """The trained model's scores on the split held out furthest from training."""

    split_name: str  # "test", "validation" or "train"
    split: TensorSplit
    report: EvaluationReport
    headline: dict[str, float | None]


def _evaluate(lease: JobLease, plan: TrainingPlan, data: Encoded, model: Network) -> _Evaluation:
    """Score the model on the test split (else validation, else train) and say so in an event."""
    split = data.test or data.valid or data.train
    split_name = "test" if data.test else "validation" if data.valid else "train"
    outputs = predict(model, split.inputs)
    report = evaluate_outputs(plan.task, data.spec, split.targets, outputs)
    headline = summary(report)
    lease.event(
        f"Evaluated on {len(split.targets)} {split_name} rows: "
        + ", ".join(f"{k} {v:.4f}" for k, v in headline.items() if v is not None),
        data={"split": split_name, **headline},
        type="message",
    )
    return _Evaluation(split_name, split, report, headline)


@dataclass(frozen=True)
class _Exported:
    """The version's artifacts (name, bytes), and how far its ONNX graph strays from torch."""

    artifacts: list[tuple[str, bytes]]
    onnx_max_abs_diff: float


def _export(plan: TrainingPlan, data: Encoded, model: Network, sample: TensorSplit) -> _Exported:
    """Weights, the ONNX graph (checked against torch on a few of `sample`'s rows), the fitted
    preprocessing, the model's description and, for a sentence encoder, its encoder."""
    onnx_bytes = export_onnx(model, data.shape)
    rows = {name: array[:64] for name, array in sample.inputs.items()}
    onnx_diff = verify_onnx(onnx_bytes, model, rows)
    weights = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    artifacts = [
        ("model.safetensors", weights),
        ("model.onnx", onnx_bytes),
        ("preprocessing.json", data.spec.model_dump_json().encode()),
        ("model.json", json.dumps(_description(plan, data, model), indent=2).encode()),
        *_encoder_artifacts(plan, model),
    ]
    return _Exported(artifacts, onnx_diff)


def _description(plan: TrainingPlan, data: Encoded, model: Network) -> dict[str, Any]:
    """model.json: what a server needs to rebuild and feed the network."""
    return {
        "format": 1,
        "architecture": plan.model,
        "options": plan.architecture.model_dump(mode="json"),
        "task": plan.task.value,
        "target_column": plan.target_column,
        "input_names": list(model.input_names),
        "output_name": "logits",
        "classes": data.spec.label.classes if data.spec.label else None,
        "input_shape": dataclasses.asdict(data.shape),
    }


def _version_metrics(
    data: Encoded, result: TrainResult, evaluation: _Evaluation, onnx_diff: float
) -> dict[str, Any]:
    """The version's metrics: its evaluation, the training history and the rows it saw."""
    return {
        "evaluation": evaluation.report.model_dump(mode="json"),
        "evaluated_on": evaluation.split_name,
        "summary": evaluation.headline,
        "history": [m.as_dict() for m in result.history],
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "onnx_max_abs_diff": onnx_diff,
        "rows": {
            "train": len(data.train.targets),
            "validation": len(data.valid.targets) if data.valid else 0,
            "test": len(data.test.targets) if data.test else 0,
            "dropped_unlabelled": data.dropped,
        },
    }


def _lineage(storage: Storage, job: Job, plan: TrainingPlan) -> dict[str, Any]:
    """The version's lineage: the job, dataset version and settings that made it."""
    owner = data_org(storage, job)
    with storage.db.read() as conn:
        dataset_version = datasets_repo.get_version_by_id(
            conn, org_id=owner, version_id=job.dataset_version_id
        )
    shared = {"grant_id": job.grant_id, "dataset_owner_org_id": owner} if job.grant_id else {}
    return {
        "job_id": job.id,
        **shared,
        "base_model": plan.model,
        "dataset_id": dataset_version.dataset_id if dataset_version else None,
        "dataset_version_id": job.dataset_version_id,
        "dataset_version": dataset_version.version if dataset_version else None,
        "dataset_content_hash": dataset_version.content_hash if dataset_version else None,
        "hyperparameters": plan.hyperparameters.model_dump(mode="json"),
        "architecture": plan.architecture.model_dump(mode="json"),
        "seed": job.seed,
        "code_version": f"aiaas {__version__}",
        "torch_version": torch.__version__,
    }


def _register_version(
    storage: Storage,
    job: Job,
    plan: TrainingPlan,
    artifacts: list[tuple[str, bytes]],
    metrics: dict[str, Any],
    lineage: dict[str, Any],
) -> ModelVersion:
    """Store the artifacts as a new version of the plan's model (audited as done by the job)."""
    registry = RegistryService(storage.db, storage.blobs, AuditService(storage.db))
    return registry.register(
        NewVersion(
            org_id=job.org_id,
            project_id=job.project_id,
            model_id=plan.model_name,
            base=plan.model,
            task=plan.task.value,
            artifacts=artifacts,
            metrics=metrics,
            lineage=lineage,
            dataset_version_id=job.dataset_version_id,
            job_id=job.id,
        ),
        actor=Actor(type="job", id=job.id),
    )


def _succeed(
    lease: JobLease, plan: TrainingPlan, data: Encoded, result: TrainResult, version: ModelVersion
) -> None:
    """End the job as succeeded, naming the version it registered and the samples it trained."""
    lease.finish(
        JobStatus.SUCCEEDED,
        "The job has successfully completed.",
        fine_tuned_model=plan.model_name,
        model_version_id=version.id,
        trained_samples=len(data.train.targets) * len(result.history),
        epoch=len(result.history),
        step=result.steps,
    )


def _encoder_artifacts(plan: TrainingPlan, model: Network) -> list[tuple[str, bytes]]:
    """A fine-tuned sentence encoder also serves /v1/embeddings once deployed: its transformer as
    ONNX, and how to pool it (the bundled model's sentence-transformers settings)."""
    if plan.model != MINILM:
        return []
    pooling = read_pooling(minilm_l6_v2_dir())
    return [
        ("encoder.onnx", export_text_encoder(model)),
        ("encoder.json", json.dumps({"pooling": dataclasses.asdict(pooling)}).encode()),
    ]


def evaluate_outputs(
    task: Task, spec: PreprocessingSpec, targets: np.ndarray, outputs: np.ndarray
) -> EvaluationReport:
    if task is Task.CLASSIFICATION:
        classes = spec.label.classes if spec.label and spec.label.classes else []
        return evaluate_classification(targets, outputs, classes)
    truth = unscale_targets(spec, targets)
    predicted = unscale_targets(spec, outputs[:, 0])
    return evaluate_regression(truth, predicted)


def _epoch_message(metrics: EpochMetrics, n_epochs: int) -> str:
    parts = [f"Epoch {metrics.epoch}/{n_epochs}: train loss {metrics.train_loss:.4f}"]
    if metrics.train_accuracy is not None:
        parts.append(f"accuracy {metrics.train_accuracy:.4f}")
    if metrics.valid_loss is not None:
        parts.append(f"validation loss {metrics.valid_loss:.4f}")
    if metrics.valid_accuracy is not None:
        parts.append(f"accuracy {metrics.valid_accuracy:.4f}")
    return ", ".join(parts) + f" ({metrics.samples_per_second:.0f} samples/s)."


def _metrics_data(metrics: EpochMetrics, n_epochs: int) -> dict[str, Any]:
    return {
        **metrics.as_dict(),
        "total_epochs": n_epochs,
        # OpenAI's names for the same numbers, so their dashboards and clients read them.
        "train_mean_token_accuracy": metrics.train_accuracy,
        "valid_mean_token_accuracy": metrics.valid_accuracy,
    }
