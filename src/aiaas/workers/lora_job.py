"""One LoRA fine-tuning job, run inside its worker process from its plan to a registered adapter.

The job holds its lease as every job does (`workers/lease.py`): events, checkpoints and the
final state name the claim token. It reads its chat files through the Files store (checked
against the SHA-256 recorded when the job was created), loads the base chat model for torch from
its GGUF file (`training/lora.py`, through a cache folder under the data dir), trains the
adapter, and registers it as a version of `ft:<base>:<org>:<suffix>:<job>` with two artifacts:

    adapter.gguf    the adapter in llama.cpp's GGUF LoRA format (float32)
    adapter.json    what a server needs beside it: the base model's id and its GGUF's SHA-256,
                    rank, alpha, target modules, the chat template the adapter learnt under

Each optimiser step is a `metrics` event (train loss, token accuracy, tokens/s); each epoch's
event (with validation loss and accuracy when there is a validation file) is written with its
checkpoint, and a resumed job does not repeat the step events it already wrote.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from aiaas import __version__
from aiaas.domain import Actor, JobControl, JobStatus, ModelVersion
from aiaas.engines.llm.bundled import BUNDLED_GGUF
from aiaas.errors import InvalidRequest
from aiaas.ids import now
from aiaas.services.audit import AuditService
from aiaas.services.registry import NewVersion, RegistryService
from aiaas.settings import Settings
from aiaas.specs.lora import LORA_TASK, LoraPlan
from aiaas.storage.process import Storage
from aiaas.storage.repos import files as files_repo
from aiaas.storage.repos import jobs as repo
from aiaas.training.chat_data import ChatExample, read_chats
from aiaas.training.checkpoints import EpochMetrics
from aiaas.training.lora import (
    EncodedChat,
    LoraResult,
    LoraTrainer,
    StepMetrics,
    encode_chats,
    export_gguf_adapter,
    load_base,
)
from aiaas.training.trainer import Stop
from aiaas.workers.lease import JobLease, run_job

ARTIFACTS = ("adapter.gguf", "adapter.json")


def run_lora_job(settings: Settings, job_id: str, token: str, *, shutdown: threading.Event) -> None:
    run_job(settings, job_id, token, _run, shutdown=shutdown)


def torch_cache(settings: Settings) -> Path:
    """Where GGUF models converted for torch are kept (see `training/lora.load_base`)."""
    return settings.data_dir / "models" / "torch"


def _run(settings: Settings, storage: Storage, lease: JobLease) -> None:
    job = lease.job
    plan = LoraPlan.model_validate(job.spec)
    hyper = plan.hyperparameters
    checkpoint = _latest_checkpoint(storage, job.id)
    lease.event(
        f"Resuming from the checkpoint at epoch {checkpoint[0]}, step {checkpoint[1]} "
        f"(attempt {job.attempts})."
        if checkpoint
        else f"Training started (attempt {job.attempts})."
    )
    train_chats = _read_file(
        storage, job.org_id, plan.training_file, plan.training_file_sha256, "training_file"
    )
    valid_chats = None
    if plan.validation_file:
        valid_chats = _read_file(
            storage,
            job.org_id,
            plan.validation_file,
            plan.validation_file_sha256,
            "validation_file",
        )
    if plan.model not in BUNDLED_GGUF:
        raise InvalidRequest(f"The base model {plan.model!r} is not available.", param="model")
    gguf_path = BUNDLED_GGUF[plan.model](settings.data_dir / "models")
    started = time.monotonic()
    base = load_base(gguf_path, torch_cache(settings))
    train = encode_chats(base.tokenizer, train_chats, hyper.max_length)
    valid = encode_chats(base.tokenizer, valid_chats, hyper.max_length) if valid_chats else None
    targets = sum(chat.targets for chat in train)
    if targets == 0:
        raise InvalidRequest(
            f"No assistant token of {plan.training_file} is left to learn from within "
            f"{hyper.max_length} tokens per conversation.",
            param="training_file",
        )
    truncated = sum(chat.truncated for chat in train)
    tokens = sum(len(chat.input_ids) for chat in train)
    if not checkpoint:
        lease.event(
            f"Loaded {plan.model} from its GGUF in {time.monotonic() - started:.1f} s; "
            f"{len(train)} conversations, {tokens} tokens ({targets} assistant tokens trained)"
            + (f", {truncated} cut at {hyper.max_length} tokens." if truncated else "."),
            data={"tokens": tokens, "target_tokens": targets, "truncated": truncated},
        )
    trainer = LoraTrainer(base, hyper, job.seed)
    n_steps = -(-len(train) // hyper.batch_size) * hyper.n_epochs
    control = _Control(
        lease,
        n_epochs=hyper.n_epochs,
        n_steps=n_steps,
        checkpoint_interval_s=settings.training_checkpoint_interval_s,
        logged_step=_last_logged_step(storage, job.id) if checkpoint else 0,
    )
    resume = _read_blob(storage, checkpoint[2]) if checkpoint else None
    result = trainer.run(train, valid, control, resume=resume)
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
    _register(storage, lease, plan, trainer, result, train, valid)


class _Control:
    """What the LoRA loop asks and tells while it runs (training/lora.LoraControl)."""

    def __init__(
        self,
        lease: JobLease,
        *,
        n_epochs: int,
        n_steps: int,
        checkpoint_interval_s: float,
        logged_step: int,
    ) -> None:
        self._lease = lease
        self._n_epochs = n_epochs
        self._n_steps = n_steps
        self._interval = checkpoint_interval_s
        self._last_checkpoint = time.monotonic()
        self._logged_step = logged_step  # step events a previous attempt already wrote
        self._step_seconds: list[float] = []

    def poll(self) -> Stop | None:
        return self._lease.stop_requested()

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self._last_checkpoint >= self._interval

    def on_step(self, metrics: StepMetrics) -> None:
        self._step_seconds.append(metrics.seconds)
        recent = self._step_seconds[-20:]
        remaining = (self._n_steps - metrics.step) * sum(recent) / len(recent)
        self._lease.progress = {
            "epoch": metrics.epoch - 1,
            "step": metrics.step,
            "estimated_finish": now() + remaining,
        }
        if metrics.step <= self._logged_step:
            return
        rate = metrics.tokens / metrics.seconds if metrics.seconds > 0 else 0.0
        self._lease.event(
            f"Step {metrics.step}/{self._n_steps}: training loss={metrics.train_loss:.4f}",
            type="metrics",
            data={
                "step": metrics.step,
                "total_steps": self._n_steps,
                "epoch": metrics.epoch,
                "train_loss": metrics.train_loss,
                "train_mean_token_accuracy": metrics.train_mean_token_accuracy,
                "tokens": metrics.tokens,
                "tokens_per_second": rate,
            },
        )

    def on_epoch(self, metrics: EpochMetrics) -> None:
        # The epoch's event is written with its checkpoint (which follows), not here.
        self._lease.progress = {**self._lease.progress, "epoch": metrics.epoch}

    def on_checkpoint(
        self, data: bytes, *, epoch: int, step: int, metrics: EpochMetrics | None
    ) -> None:
        self._last_checkpoint = time.monotonic()
        self._lease.store_checkpoint(
            data,
            epoch=epoch,
            step=step,
            metrics=_epoch_data(metrics) if metrics else None,
            event=(
                (_epoch_message(metrics, self._n_epochs), _epoch_event(metrics, self._n_epochs))
                if metrics
                else None
            ),
            progress={"epoch": epoch, "step": step},
        )


def _epoch_data(metrics: EpochMetrics) -> dict[str, Any]:
    """An epoch's numbers under LoRA's names (token accuracy, tokens per second)."""
    return {
        "epoch": metrics.epoch,
        "step": metrics.step,
        "train_loss": metrics.train_loss,
        "train_mean_token_accuracy": metrics.train_accuracy,
        "valid_loss": metrics.valid_loss,
        "valid_mean_token_accuracy": metrics.valid_accuracy,
        "tokens_per_second": metrics.samples_per_second,
        "seconds": metrics.seconds,
    }


def _epoch_event(metrics: EpochMetrics, n_epochs: int) -> dict[str, Any]:
    return {**_epoch_data(metrics), "total_epochs": n_epochs}


def _epoch_message(metrics: EpochMetrics, n_epochs: int) -> str:
    parts = [
        f"Epoch {metrics.epoch}/{n_epochs}: train loss {metrics.train_loss:.4f}",
        f"token accuracy {metrics.train_accuracy or 0.0:.4f}",
    ]
    if metrics.valid_loss is not None:
        parts.append(f"validation loss {metrics.valid_loss:.4f}")
        parts.append(f"token accuracy {metrics.valid_accuracy or 0.0:.4f}")
    return ", ".join(parts) + f" ({metrics.samples_per_second:.0f} tokens/s)."


def _read_file(
    storage: Storage, org_id: str, file_id: str, sha256: str | None, param: str
) -> list[ChatExample]:
    with storage.db.read() as conn:
        stored = files_repo.get(conn, org_id=org_id, file_id=file_id)
    if stored is None:
        raise InvalidRequest(f"The file {file_id} was deleted before the job ran.", param=param)
    if sha256 is not None and stored.sha256 is not None and stored.sha256 != sha256:
        raise InvalidRequest(f"The file {file_id} changed after the job was created.", param=param)
    return read_chats(storage.blobs.open(stored.blob_key), param=param)


def _latest_checkpoint(storage: Storage, job_id: str) -> tuple[int, int, str] | None:
    with storage.db.read() as conn:
        found = repo.latest_checkpoint(conn, job_id=job_id)
    if found is None or found.blob_key is None:
        return None
    return found.epoch, found.step, found.blob_key


def _read_blob(storage: Storage, key: str) -> bytes:
    return b"".join(storage.blobs.open(key))


def _last_logged_step(storage: Storage, job_id: str) -> int:
    """The highest step whose event an earlier attempt wrote (events are newest first)."""
    after = None
    while True:
        with storage.db.read() as conn:
            page = repo.list_events(conn, job_id=job_id, after=after, limit=100)
        for event in page.items:
            data = event.data or {}
            if event.type == "metrics" and "total_steps" in data:
                return int(data["step"])
        if not page.has_more or not page.items:
            return 0
        after = page.items[-1].id


# -- the end: export and register ----------------------------------------------------------------


def _register(
    storage: Storage,
    lease: JobLease,
    plan: LoraPlan,
    trainer: LoraTrainer,
    result: LoraResult,
    train: list[EncodedChat],
    valid: list[EncodedChat] | None,
) -> None:
    """Export the adapter and register it (unless the job was cancelled meanwhile), then end the
    job as succeeded."""
    import peft
    import torch
    import transformers

    job, hyper, base = lease.job, plan.hyperparameters, trainer.base
    adapter = export_gguf_adapter(trainer)
    about = {
        "format": 1,
        "type": "lora",
        "base_model": plan.model,
        "base_gguf": base.gguf_path.name,
        "base_gguf_sha256": base.gguf_sha256,
        "architecture": base.architecture,
        "rank": hyper.lora_rank,
        "alpha": hyper.lora_alpha,
        "scale": hyper.lora_alpha / hyper.lora_rank,
        "dropout": hyper.lora_dropout,
        "target_modules": list(hyper.target_modules),
        "dtype": "f32",
        "chat_template": base.tokenizer.chat_template,
    }
    last = result.history[-1] if result.history else None
    metrics: dict[str, Any] = {
        "history": [_epoch_data(m) for m in result.history],
        "train_loss": last.train_loss if last else None,
        "train_mean_token_accuracy": last.train_accuracy if last else None,
        "valid_loss": last.valid_loss if last else None,
        "valid_mean_token_accuracy": last.valid_accuracy if last else None,
        "steps": result.steps,
        "trained_tokens": result.trained_tokens,
        "examples": {"train": len(train), "validation": len(valid) if valid else 0},
    }
    lineage = {
        "job_id": job.id,
        "base_model": plan.model,
        "base_gguf_sha256": base.gguf_sha256,
        "training_file": plan.training_file,
        "training_file_sha256": plan.training_file_sha256,
        "validation_file": plan.validation_file,
        "validation_file_sha256": plan.validation_file_sha256,
        "method": "lora",
        "hyperparameters": hyper.model_dump(mode="json"),
        "seed": job.seed,
        "code_version": f"aiaas {__version__}",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
    }
    if lease.stop_requested() is Stop.CANCEL:
        lease.finish(JobStatus.CANCELLED, "Job cancelled before its adapter was registered.")
        return
    artifacts = [
        ("adapter.gguf", adapter),
        ("adapter.json", json.dumps(about, indent=2).encode()),
    ]
    version = _register_version(storage, lease, plan, artifacts, metrics, lineage)
    lease.event(f"Registered {plan.model_name} version {version.version}.")
    lease.finish(
        JobStatus.SUCCEEDED,
        "The job has successfully completed.",
        fine_tuned_model=plan.model_name,
        model_version_id=version.id,
        trained_samples=len(train) * len(result.history),
        epoch=len(result.history),
        step=result.steps,
        result=json.dumps({"trained_tokens": result.trained_tokens}),
    )


def _register_version(
    storage: Storage,
    lease: JobLease,
    plan: LoraPlan,
    artifacts: list[tuple[str, bytes]],
    metrics: dict[str, Any],
    lineage: dict[str, Any],
) -> ModelVersion:
    """Store the artifacts as a new version of the plan's model (audited as done by the job)."""
    job = lease.job
    registry = RegistryService(storage.db, storage.blobs, AuditService(storage.db))
    return registry.register(
        NewVersion(
            org_id=job.org_id,
            project_id=job.project_id,
            model_id=plan.model_name,
            base=plan.model,
            task=LORA_TASK,
            artifacts=artifacts,
            metrics=metrics,
            lineage=lineage,
            dataset_version_id=None,
            job_id=job.id,
        ),
        actor=Actor(type="job", id=job.id),
    )
