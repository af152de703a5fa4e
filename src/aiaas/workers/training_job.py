"""One training job, run inside its worker process from its plan to a registered model version.

The worker holds the job through its claim token: a heartbeat thread refreshes the claim twice a
second and reads any cancel or pause request; every write (events, checkpoints, the final state)
names the token and is dropped once the job was taken back. Checkpoints go to the blob store
first and are recorded after, so the row always names a complete blob; only the newest is kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
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
from aiaas.data.types import SPLIT_COLUMN, Split, Task
from aiaas.domain import Actor, Job, JobControl, JobStatus
from aiaas.engines.embeddings.export import minilm_l6_v2_dir, read_pooling
from aiaas.errors import ApiError, InvalidRequest
from aiaas.ids import new_id, now
from aiaas.services.audit import AuditService
from aiaas.services.registry import NewVersion, RegistryService
from aiaas.settings import Settings
from aiaas.storage.opened import Storage
from aiaas.storage.repos import datasets as datasets_repo
from aiaas.storage.repos import jobs as repo
from aiaas.training.architectures import InputShape, Network, build_model, input_shape, model_inputs
from aiaas.training.evaluate import (
    EvaluationReport,
    evaluate_classification,
    evaluate_regression,
    summary,
)
from aiaas.training.export import export_onnx, export_text_encoder, verify_onnx
from aiaas.training.plan import MINILM, TOKENIZER_REF, TrainingPlan
from aiaas.training.preprocess import (
    Features,
    PreprocessingSpec,
    encode_labels,
    fit,
    transform,
    unscale_targets,
)
from aiaas.training.trainer import EpochMetrics, Stop, Trainer, TrainResult, predict
from aiaas.training.trainer import Hyperparameters as LoopHyperparameters
from aiaas.training.trainer import Split as TensorSplit

log = logging.getLogger("aiaas.worker")

HEARTBEAT_S = 0.5
ARTIFACTS = ("model.safetensors", "model.onnx", "preprocessing.json", "model.json")


class JobLease:
    """The worker's hold on its job: heartbeats, the pending request, fenced writes."""

    def __init__(self, storage: Storage, job: Job, token: str, shutdown: threading.Event) -> None:
        self.storage = storage
        self.job = job
        self.token = token
        self.shutdown = shutdown
        self.control: JobControl | None = None
        self.lost = False
        self.progress: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def __enter__(self) -> JobLease:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self.storage.db.write() as conn:
                    held, control = repo.heartbeat(
                        conn, job_id=self.job.id, worker=self.token, **self.progress
                    )
            except Exception:  # a busy database must not end the job: retry
                log.warning("heartbeat of job %s failed; retrying", self.job.id, exc_info=True)
                continue
            self.lost = self.lost or not held
            self.control = control

    def stop_requested(self) -> Stop | None:
        if self.lost or self.control is JobControl.CANCEL:
            return Stop.CANCEL
        if self.control is JobControl.PAUSE or self.shutdown.is_set():
            return Stop.PAUSE
        return None

    def event(
        self,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        type: str = "message",
    ) -> None:
        with self.storage.db.write() as conn:
            if _holds(conn, self.job.id, self.token):
                repo.add_event(
                    conn,
                    job_id=self.job.id,
                    message=message,
                    level=level,
                    type=type,
                    data=data,
                )

    def requeue(self, message: str) -> None:
        with self.storage.db.write() as conn:
            if repo.requeue(conn, job_id=self.job.id, worker=self.token):
                repo.add_event(conn, job_id=self.job.id, message=message)

    def finish(self, status: JobStatus, message: str, **values: Any) -> bool:
        with self.storage.db.write() as conn:
            done = repo.transition(
                conn,
                job_id=self.job.id,
                expected=[JobStatus.RUNNING],
                status=status,
                held_by=self.token,
                **values,
            )
            if done:
                level = "error" if status is JobStatus.FAILED else "info"
                repo.add_event(conn, job_id=self.job.id, message=message, level=level)
                keys = (
                    repo.drop_checkpoint_blobs(conn, job_id=self.job.id) if status.finished else []
                )
        if done:
            for key in keys:
                self.storage.blobs.delete(key)
        return done


def _holds(conn: Any, job_id: str, token: str) -> bool:
    job = repo.get_job_any(conn, job_id=job_id)
    return job is not None and job.worker == token and job.status is JobStatus.RUNNING


class _Control:
    """What the trainer asks and tells while it runs (trainer.TrainingControl)."""

    def __init__(self, lease: JobLease, *, n_epochs: int, checkpoint_interval_s: float) -> None:
        self._lease = lease
        self._n_epochs = n_epochs
        self._interval = checkpoint_interval_s
        self._last_checkpoint = time.monotonic()
        self._epoch_seconds: list[float] = []

    def poll(self) -> Stop | None:
        return self._lease.stop_requested()

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self._last_checkpoint >= self._interval

    def on_checkpoint(
        self, data: bytes, *, epoch: int, step: int, metrics: EpochMetrics | None
    ) -> None:
        self._last_checkpoint = time.monotonic()
        job, blobs = self._lease.job, self._lease.storage.blobs
        key = f"jobs/{job.org_id}/{job.id}/{new_id('checkpoint')}.safetensors"
        info = blobs.put(job.org_id, key, [data])
        with self._lease.storage.db.write() as conn:
            superseded = repo.add_checkpoint(
                conn,
                job_id=job.id,
                worker=self._lease.token,
                epoch=epoch,
                step=step,
                metrics=metrics.as_dict() if metrics else None,
                blob_key=key,
                size=info.size,
                event=(
                    (
                        _epoch_message(metrics, self._n_epochs),
                        _metrics_data(metrics, self._n_epochs),
                    )
                    if metrics
                    else None
                ),
            )
            if superseded is not None and metrics is not None:
                repo.set_progress(
                    conn, job_id=job.id, worker=self._lease.token, **self._lease.progress
                )
        for old in superseded if superseded is not None else [key]:
            blobs.delete(old)
        if superseded is None:
            self._lease.lost = True

    def on_epoch(self, metrics: EpochMetrics) -> None:
        # The epoch's event is written with its checkpoint (which follows), not here.
        self._epoch_seconds.append(metrics.seconds)
        remaining = (self._n_epochs - metrics.epoch) * float(np.mean(self._epoch_seconds))
        self._lease.progress = {
            "epoch": metrics.epoch,
            "step": metrics.step,
            "estimated_finish": now() + remaining,
        }


JobBody = Callable[[Settings, Storage, JobLease], None]


def run_job(
    settings: Settings, job_id: str, token: str, body: JobBody, *, shutdown: threading.Event
) -> None:
    """Hold the job through its lease and run `body`; any failure ends the job as failed, with
    an API error's message as is and anything else as an internal error (logged)."""
    storage = Storage.open(settings, migrate=False)
    try:
        with storage.db.read() as conn:
            job = repo.get_job_any(conn, job_id=job_id)
        if job is None or job.worker != token or job.status is not JobStatus.RUNNING:
            return  # taken back before this process started
        torch.set_num_threads(settings.training_threads)
        with JobLease(storage, job, token, shutdown) as lease:
            try:
                body(settings, storage, lease)
            except ApiError as exc:
                lease.finish(
                    JobStatus.FAILED,
                    f"The job failed: {exc.message}",
                    error=json.dumps(
                        {
                            "code": exc.code or "invalid_request",
                            "message": exc.message,
                            "param": exc.param,
                        }
                    ),
                )
            except Exception:
                log.exception("job %s failed", job_id)
                message = "The job failed with an internal error; the operator's logs have details."
                lease.finish(
                    JobStatus.FAILED,
                    message,
                    error=json.dumps({"code": "internal_error", "message": message, "param": None}),
                )
    finally:
        storage.close()


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
    with storage.db.read() as conn:
        version = datasets_repo.get_version_by_id(
            conn, org_id=job.org_id, version_id=job.dataset_version_id
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
    job = lease.job
    evaluated_on = data.test or data.valid or data.train
    split_name = "test" if data.test else "validation" if data.valid else "train"
    outputs = predict(model, evaluated_on.inputs)
    report = evaluate_outputs(plan.task, data.spec, evaluated_on.targets, outputs)
    headline = summary(report)
    lease.event(
        f"Evaluated on {len(evaluated_on.targets)} {split_name} rows: "
        + ", ".join(f"{k} {v:.4f}" for k, v in headline.items() if v is not None),
        data={"split": split_name, **headline},
        type="message",
    )
    onnx_bytes = export_onnx(model, data.shape)
    sample = {name: array[:64] for name, array in evaluated_on.inputs.items()}
    onnx_diff = verify_onnx(onnx_bytes, model, sample)
    weights = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    description = {
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
    with storage.db.read() as conn:
        dataset_version = datasets_repo.get_version_by_id(
            conn, org_id=job.org_id, version_id=job.dataset_version_id
        )
    history = [m.as_dict() for m in result.history]
    metrics = {
        "evaluation": report.model_dump(mode="json"),
        "evaluated_on": split_name,
        "summary": headline,
        "history": history,
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
    lineage = {
        "job_id": job.id,
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
    artifacts = [
        ("model.safetensors", weights),
        ("model.onnx", onnx_bytes),
        ("preprocessing.json", data.spec.model_dump_json().encode()),
        ("model.json", json.dumps(description, indent=2).encode()),
        *_encoder_artifacts(plan, model),
    ]
    if lease.stop_requested() is Stop.CANCEL:
        lease.finish(JobStatus.CANCELLED, "Job cancelled before its model was registered.")
        return
    registry = RegistryService(storage.db, storage.blobs, AuditService(storage.db))
    version = registry.register(
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
    lease.event(f"Registered {plan.model_name} version {version.version}.")
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
