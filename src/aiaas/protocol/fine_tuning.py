"""Schemas of `/v1/fine_tuning/jobs`: OpenAI's shapes, plus the platform's training fields.

The official `openai` client drives these routes: `client.fine_tuning.jobs.create(model="mlp",
training_file="dsv_...", extra_body={"target_column": "label"})`. Platform fields the client has
no argument for travel in `extra_body`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from aiaas.domain import Job, JobCheckpoint, JobEvent
from aiaas.protocol.platform import IdStr, ModelRef, Request
from aiaas.specs.hyperparameters import HyperparameterChoices
from aiaas.specs.jobs import JobRequest
from aiaas.specs.lora import LORA_BASES
from aiaas.specs.shapes import ARCHITECTURES, ArchitectureOptions
from aiaas.specs.types import Task

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
ModelId = ModelRef


class SupervisedMethod(Request):
    hyperparameters: HyperparameterChoices | None = None


class Method(Request):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None


class JobCreate(Request):
    model: str = Field(
        min_length=1,
        max_length=64,
        description=f"The base to train: one of {', '.join(ARCHITECTURES)}; or a chat model "
        f"({', '.join(LORA_BASES)}) to fine-tune with LoRA.",
    )
    training_file: IdStr = Field(
        description="A dataset version id (dsv_...), or a dataset id (ds_...: its latest version). "
        "For a chat model: a chat JSONL file uploaded with purpose fine-tune (file-...)."
    )
    validation_file: IdStr | None = Field(
        default=None,
        description="A chat model's validation set: a chat JSONL file (purpose fine-tune). "
        "Classic models use the dataset version's own validation split.",
    )
    hyperparameters: HyperparameterChoices | None = None
    method: Method | None = None
    suffix: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,40}$",
        description="Part of the fine-tuned model's name: ft:<base>:<org>:<suffix>:<job>.",
    )
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)
    integrations: list[Any] | None = Field(default=None, max_length=0)
    # -- platform fields
    task: Literal["classification", "regression"] | None = Field(
        default=None, description="Default: the dataset version's task for its label column."
    )
    target_column: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="The column to predict. Default: the dataset version's label column.",
    )
    architecture: ArchitectureOptions | None = Field(
        default=None, description="Network sizes (hidden layers, dropout, embedding size, ...)."
    )
    register_to: ModelId | None = Field(
        default=None,
        description="Register the result as a new version of this existing model.",
    )

    @property
    def _method_hyperparameters(self) -> HyperparameterChoices | None:
        """OpenAI's newer spelling: `method.supervised.hyperparameters`."""
        supervised = self.method.supervised if self.method else None
        return supervised.hyperparameters if supervised else None

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self) -> JobCreate:
        if self._method_hyperparameters is not None and self.hyperparameters is not None:
            raise ValueError("give hyperparameters either at the top level or in method, not both")
        return self

    def request(self) -> JobRequest:
        return JobRequest(
            model=self.model,
            training_file=self.training_file,
            hyperparameters=self.hyperparameters
            or self._method_hyperparameters
            or HyperparameterChoices(),
            architecture=self.architecture or ArchitectureOptions(),
            task=Task(self.task) if self.task else None,
            target_column=self.target_column,
            seed=self.seed,
            suffix=self.suffix,
            metadata=self.metadata,
            register_to=self.register_to,
            validation_file=self.validation_file,
        )


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    n_epochs: int | Literal["auto"]
    batch_size: int | Literal["auto"]
    learning_rate_multiplier: float | Literal["auto"]
    learning_rate: float | None = None
    weight_decay: float | None = None
    early_stopping_patience: int | None = None
    # LoRA jobs (a chat model) only
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    target_modules: list[str] | None = None


class JobProgress(BaseModel):
    epoch: int
    n_epochs: int
    step: int


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: str
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None
    method: dict[str, Any]
    # -- platform fields
    task: str
    target_column: str
    model_version_id: str | None
    trained_samples: int
    attempts: int
    progress: JobProgress

    @classmethod
    def from_domain(cls, job: Job) -> FineTuningJob:
        spec_hyper = job.spec.get("hyperparameters", {})
        hyper = JobHyperparameters(
            n_epochs=spec_hyper.get("n_epochs", "auto"),
            batch_size=spec_hyper.get("batch_size", "auto"),
            learning_rate_multiplier=spec_hyper.get("learning_rate_multiplier", "auto"),
            learning_rate=spec_hyper.get("learning_rate"),
            weight_decay=spec_hyper.get("weight_decay"),
            early_stopping_patience=spec_hyper.get("early_stopping_patience"),
            lora_rank=spec_hyper.get("lora_rank"),
            lora_alpha=spec_hyper.get("lora_alpha"),
            lora_dropout=spec_hyper.get("lora_dropout"),
            target_modules=spec_hyper.get("target_modules"),
        )
        trained_tokens = (job.result or {}).get("trained_tokens")
        return cls(
            id=job.id,
            created_at=int(job.created_at),
            error=JobError.model_validate(job.error) if job.error else None,
            fine_tuned_model=job.fine_tuned_model,
            finished_at=int(job.finished_at) if job.finished_at else None,
            hyperparameters=hyper,
            model=job.model,
            organization_id=job.org_id,
            seed=job.seed,
            status=job.status.value,
            training_file=job.dataset_version_id,
            validation_file=job.spec.get("validation_file"),
            trained_tokens=trained_tokens if isinstance(trained_tokens, int) else None,
            estimated_finish=int(job.estimated_finish) if job.estimated_finish else None,
            metadata=job.metadata,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": hyper.model_dump()},
            },
            task=job.task,
            target_column=job.target_column,
            model_version_id=job.model_version_id,
            trained_samples=job.trained_samples,
            attempts=job.attempts,
            progress=JobProgress(
                epoch=job.epoch, n_epochs=int(spec_hyper.get("n_epochs", 0)), step=job.step
            ),
        )


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None
    type: str

    @classmethod
    def from_domain(cls, event: JobEvent) -> FineTuningJobEvent:
        return cls(
            id=event.id,
            created_at=int(event.created_at),
            level=event.level,
            message=event.message,
            data=event.data,
            type=event.type,
        )


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int
    epoch: int

    @classmethod
    def from_domain(cls, checkpoint: JobCheckpoint, job: Job) -> FineTuningJobCheckpoint:
        name = job.spec.get("model_name", job.id)
        return cls(
            id=checkpoint.id,
            created_at=int(checkpoint.created_at),
            fine_tuned_model_checkpoint=f"{name}:ckpt-step-{checkpoint.step}",
            fine_tuning_job_id=job.id,
            metrics=_checkpoint_metrics(checkpoint),
            step_number=checkpoint.step,
            epoch=checkpoint.epoch,
        )


def _checkpoint_metrics(checkpoint: JobCheckpoint) -> dict[str, Any]:
    """Ours, plus OpenAI's names for the same numbers (its clients and dashboards read those)."""
    ours = checkpoint.metrics or {}
    return {
        "step": checkpoint.step,
        "train_loss": ours.get("train_loss"),
        "train_mean_token_accuracy": ours.get("train_accuracy"),
        "valid_loss": ours.get("valid_loss"),
        "valid_mean_token_accuracy": ours.get("valid_accuracy"),
        "full_valid_loss": ours.get("valid_loss"),
        "full_valid_mean_token_accuracy": ours.get("valid_accuracy"),
        **ours,
    }


__all__ = [
    "FineTuningJob",
    "FineTuningJobCheckpoint",
    "FineTuningJobEvent",
    "JobCreate",
]
