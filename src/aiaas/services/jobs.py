"""Training jobs: the use cases behind `/v1/fine_tuning/jobs`.

A job is planned and checked when it is created (see `training/plan.py`), so a bad request is a
4xx and never a job that fails later; it then waits in the durable queue until the runner
(`workers/runner.py`) claims it for a worker process. Cancel and pause reach a running worker
through the job row, which the worker reads with its heartbeat; this service waits briefly for
the worker to act, so a caller usually sees the final state in the response.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection

from aiaas.data.profile import DatasetProfile
from aiaas.domain import (
    Actor,
    DatasetVersion,
    FilePurpose,
    Grant,
    GrantPermission,
    Job,
    JobCheckpoint,
    JobControl,
    JobEvent,
    JobStatus,
    Page,
    SharedKind,
    StoredFile,
)
from aiaas.engines.llm.bundled import BUNDLED_GGUF
from aiaas.errors import BlobNotFound, InvalidRequest, NotFound
from aiaas.ids import new_id
from aiaas.services.audit import AuditService
from aiaas.services.grants import GrantService
from aiaas.specs.jobs import JobRequest
from aiaas.specs.lora import (
    LORA_BASES,
    LORA_KIND,
    LORA_TASK,
    LoraPlan,
    resolve_lora_hyperparameters,
)
from aiaas.specs.preprocessing import PreprocessingSpec
from aiaas.storage.blobs import EncryptedBlobStore
from aiaas.storage.db import Database
from aiaas.storage.repos import datasets as datasets_repo
from aiaas.storage.repos import files as files_repo
from aiaas.storage.repos import jobs as repo
from aiaas.storage.repos import registry as registry_repo
from aiaas.storage.repos import tenancy as tenancy_repo
from aiaas.training.chat_data import read_chats
from aiaas.training.plan import TrainingPlan, plan

log = logging.getLogger("aiaas.jobs")

TRAINING = "training"
# The kinds each service's reads and controls see: /v1/fine_tuning/jobs shows LoRA jobs too.
_SEEN = {TRAINING: (TRAINING, LORA_KIND)}
_SLUG = re.compile(r"[^a-z0-9]+")


class JobService:
    def __init__(
        self,
        db: Database,
        blobs: EncryptedBlobStore,
        audit: AuditService,
        grants: GrantService,
        *,
        wake_runner: Callable[[], None] = lambda: None,
        settle_timeout_s: float = 10.0,
        region: str = "local",
    ) -> None:
        self._region = region  # where this node's (local) workers run
        self._db = db
        self._blobs = blobs
        self._audit = audit
        self._grants = grants
        self._wake = [wake_runner]  # shared with `of_kind` copies
        self._settle_timeout_s = settle_timeout_s
        self.kind = TRAINING

    def set_runner(self, wake: Callable[[], None]) -> None:
        self._wake[0] = wake

    def wake(self) -> None:
        """Tell the runner there is queued work."""
        self._wake[0]()

    def _wake_runner(self) -> None:
        self.wake()

    @property
    def _kinds(self) -> tuple[str, ...]:
        return _SEEN.get(self.kind, (self.kind,))

    def of_kind(self, kind: str) -> JobService:
        """The same service for another kind of job (reads, control): e.g. optimisations."""
        other = copy.copy(self)
        other.kind = kind
        return other

    # -- create ----------------------------------------------------------------------------------

    def create(self, *, org_id: str, project_id: str, actor: Actor, request: JobRequest) -> Job:
        if request.model in LORA_BASES or request.model in BUNDLED_GGUF:
            return self._create_lora(
                org_id=org_id, project_id=project_id, actor=actor, request=request
            )
        lora_only = request.hyperparameters.lora_fields_set()
        if lora_only:
            raise InvalidRequest(
                f"{', '.join(lora_only)}: LoRA hyperparameters apply to fine-tuning a chat model "
                f"({', '.join(LORA_BASES)}), not to {request.model!r}.",
                param=f"hyperparameters.{lora_only[0]}",
            )
        if request.validation_file is not None:
            raise InvalidRequest(
                "validation_file is for chat models: a dataset version's own validation split "
                "is the validation set of a classic model.",
                param="validation_file",
            )
        job_id = new_id("ftjob", sep="-")
        with self._db.read() as conn:
            version, grant = self._training_version(conn, org_id, request.training_file)
            dataset = datasets_repo.get_dataset(
                conn, org_id=version.org_id, dataset_id=version.dataset_id
            )
        if dataset is not None and dataset.strict and dataset.region != self._region:
            raise self._grants.residency_refused(
                dataset,
                actor=actor,
                by_org_id=org_id,
                elsewhere=f"a job on a node of region '{self._region}'",
                what="used by",
            )
        with self._db.read() as conn:
            org = tenancy_repo.get_org(conn, org_id)
            target_model = None
            if request.register_to is not None:
                target_model = registry_repo.get_model(
                    conn, org_id=org_id, model_id=request.register_to
                )
                if target_model is None:
                    raise NotFound(
                        f"The model '{request.register_to}' does not exist.", param="register_to"
                    )
        assert org is not None
        profile = DatasetProfile.model_validate(
            {k: v for k, v in version.profile.items() if k != "splits"}
        )
        model_name = request.register_to or fine_tuned_name(
            request.model, org.name, request.suffix, job_id
        )
        resolved = plan(
            model=request.model,
            columns=[(c.name, c.type) for c in profile.columns],
            dataset_spec=PreprocessingSpec.model_validate(version.preprocessing),
            target=request.target_column,
            task=request.task,
            hyperparameters=request.hyperparameters,
            architecture=request.architecture,
            model_name=model_name,
        )
        if target_model is not None and (target_model.base, target_model.task) != (
            resolved.model,
            resolved.task.value,
        ):
            raise InvalidRequest(
                f"Model '{target_model.id}' is a {target_model.task} {target_model.base}; this "
                f"job trains a {resolved.task.value} {resolved.model}.",
                param="register_to",
            )
        train_rows = int((version.profile.get("splits") or {}).get("train", 0))
        if train_rows < 2:
            raise InvalidRequest(
                f"Dataset version {version.id} has {train_rows} training rows; at least 2 needed.",
                param="training_file",
            )
        with self._db.write() as conn:
            job = queue_job(
                conn,
                job_id=job_id,
                org_id=org_id,
                project_id=project_id,
                actor=actor,
                kind=TRAINING,
                model=request.model,
                dataset_version_id=version.id,
                task=resolved.task.value,
                target_column=resolved.target_column,
                spec=resolved.model_dump(mode="json"),
                seed=request.seed,
                suffix=request.suffix,
                metadata=request.metadata,
                register_to=request.register_to,
                grant_id=grant.id if grant else None,
            )
            self._queued(
                conn,
                actor,
                job,
                validated=(
                    f"Validated dataset version {version.id} ({train_rows} training rows): "
                    f"{resolved.task.value} of {resolved.target_column!r} with {request.model}."
                ),
                audit={
                    "model": request.model,
                    "dataset_version_id": version.id,
                    **({"grant_id": grant.id, "owner_org_id": grant.org_id} if grant else {}),
                },
            )
        self._wake_runner()
        return job

    def _queued(
        self, conn: Connection, actor: Actor, job: Job, *, validated: str, audit: dict[str, Any]
    ) -> None:
        """A new job's first events (what was checked, then queued) and its audit event, in the
        transaction that queues it."""
        repo.add_event(conn, job_id=job.id, message=validated)
        repo.add_event(conn, job_id=job.id, message="Job queued.")
        self._audit.record(
            conn,
            actor=actor,
            action="job.created",
            target_type="job",
            target_id=job.id,
            org_id=job.org_id,
            project_id=job.project_id,
            data=audit,
        )

    def _create_lora(
        self, *, org_id: str, project_id: str, actor: Actor, request: JobRequest
    ) -> Job:
        """A LoRA job on a chat model: check the chat files (a bad line is a 400 naming it) and
        the hyperparameters, then queue it (see workers/lora_job.py)."""
        if request.model not in LORA_BASES:
            raise InvalidRequest(
                f"{request.model!r} cannot be fine-tuned yet; LoRA fine-tuning supports "
                f"{', '.join(LORA_BASES)}.",
                param="model",
                code="model_not_supported",
            )
        for name, value in (("task", request.task), ("target_column", request.target_column)):
            if value is not None:
                raise InvalidRequest(
                    f"{name} is for classic models; a chat model learns its assistant messages.",
                    param=name,
                )
        job_id = new_id("ftjob", sep="-")
        training, examples = self._chat_file(org_id, request.training_file, "training_file")
        validation, valid_examples = (None, 0)
        if request.validation_file is not None:
            validation, valid_examples = self._chat_file(
                org_id, request.validation_file, "validation_file"
            )
        choices = request.hyperparameters
        hyper = resolve_lora_hyperparameters(
            n_epochs=choices.n_epochs,
            batch_size=choices.batch_size,
            learning_rate=choices.learning_rate,
            learning_rate_multiplier=choices.learning_rate_multiplier,
            weight_decay=choices.weight_decay,
            early_stopping_patience=choices.early_stopping_patience,
            lora_rank=choices.lora_rank,
            lora_alpha=choices.lora_alpha,
            lora_dropout=choices.lora_dropout,
            target_modules=choices.target_modules,
            training_examples=examples,
        )
        with self._db.read() as conn:
            org = tenancy_repo.get_org(conn, org_id)
            target_model = None
            if request.register_to is not None:
                target_model = registry_repo.get_model(
                    conn, org_id=org_id, model_id=request.register_to
                )
        assert org is not None
        if request.register_to is not None:
            if target_model is None:
                raise NotFound(
                    f"The model '{request.register_to}' does not exist.", param="register_to"
                )
            if (target_model.base, target_model.task) != (request.model, LORA_TASK):
                raise InvalidRequest(
                    f"Model '{target_model.id}' is a {target_model.task} {target_model.base}; "
                    f"this job trains a LoRA adapter of {request.model}.",
                    param="register_to",
                )
        model_name = request.register_to or fine_tuned_name(
            request.model, org.name, request.suffix, job_id
        )
        spec = LoraPlan(
            model=request.model,
            training_file=training.id,
            training_file_sha256=training.sha256,
            training_examples=examples,
            validation_file=validation.id if validation else None,
            validation_file_sha256=validation.sha256 if validation else None,
            validation_examples=valid_examples,
            hyperparameters=hyper,
            model_name=model_name,
        )
        with self._db.write() as conn:
            job = queue_job(
                conn,
                job_id=job_id,
                org_id=org_id,
                project_id=project_id,
                actor=actor,
                kind=LORA_KIND,
                model=request.model,
                dataset_version_id=training.id,
                task=LORA_TASK,
                target_column="",
                spec=spec.model_dump(mode="json"),
                seed=request.seed,
                suffix=request.suffix,
                metadata=request.metadata,
                register_to=request.register_to,
            )
            also = f" and {valid_examples} in {validation.id}" if validation else ""
            self._queued(
                conn,
                actor,
                job,
                validated=(
                    f"Validated {examples} conversations in {training.id}{also}: LoRA "
                    f"(rank {hyper.lora_rank}, alpha {hyper.lora_alpha:g}, "
                    f"{', '.join(hyper.target_modules)}) on {request.model}."
                ),
                audit={
                    "model": request.model,
                    "method": "lora",
                    "training_file": training.id,
                    **({"validation_file": validation.id} if validation else {}),
                },
            )
        self._wake_runner()
        return job

    def _chat_file(self, org_id: str, file_id: str, param: str) -> tuple[StoredFile, int]:
        """The organisation's chat file and its number of conversations, read and checked
        through the same validator as at upload; another organisation's file is a 404."""
        with self._db.read() as conn:
            stored = files_repo.get(conn, org_id=org_id, file_id=file_id)
        if stored is None:
            raise NotFound(f"No such File object: {file_id}", param=param)
        if stored.purpose is not FilePurpose.FINE_TUNE:
            raise InvalidRequest(
                f"File {file_id} has purpose {stored.purpose.value!r}; a chat model trains on "
                "files uploaded with purpose 'fine-tune'.",
                param=param,
            )
        try:
            examples = read_chats(self._blobs.open(stored.blob_key), param=param)
        except BlobNotFound:  # deleted meanwhile
            raise NotFound(f"No such File object: {file_id}", param=param) from None
        return stored, len(examples)

    def _training_version(
        self, conn: Connection, org_id: str, ref: str
    ) -> tuple[DatasetVersion, Grant | None]:
        """The version to train on: the organisation's own, or another's that it holds a
        `train-on` grant on (and that grant). Anything else is a 404, whoever owns it."""
        own = self._own_version(conn, org_id, ref)
        if own is not None:
            return own, None
        shared = self._granted_version(conn, org_id, ref)
        if shared is None:
            raise NotFound(f"No dataset version {ref!r}.", param="training_file")
        return shared

    def _granted_version(
        self, conn: Connection, org_id: str, ref: str
    ) -> tuple[DatasetVersion, Grant] | None:
        if ref.startswith("dsv_"):
            owned = datasets_repo.owner_of_version(conn, ref)
            if owned is None or owned[0] == org_id:
                return None
            owner, dataset_id = owned
            version = datasets_repo.get_version_by_id(conn, org_id=owner, version_id=ref)
        else:
            owner = datasets_repo.owner_of_dataset(conn, ref)
            if owner is None or owner == org_id:
                return None
            dataset_id = ref
            dataset = datasets_repo.get_dataset(conn, org_id=owner, dataset_id=ref)
            version = None
            if dataset is not None and dataset.latest_version is not None:
                version = datasets_repo.get_version(
                    conn, org_id=owner, dataset_id=ref, version=dataset.latest_version
                )
        if version is None:
            return None
        grant = self._grants.access(
            org_id=org_id,
            kind=SharedKind.DATASET,
            object_id=dataset_id,
            needed=GrantPermission.TRAIN_ON,
            version=version.version,
        )
        return (version, grant) if grant is not None else None

    def _own_version(self, conn: Connection, org_id: str, ref: str) -> DatasetVersion | None:
        if ref.startswith("dsv_"):
            found = datasets_repo.get_version_by_id(conn, org_id=org_id, version_id=ref)
        elif ref.startswith("ds_"):
            dataset = datasets_repo.get_dataset(conn, org_id=org_id, dataset_id=ref)
            found = None
            if dataset is not None and dataset.latest_version is not None:
                found = datasets_repo.get_version(
                    conn, org_id=org_id, dataset_id=ref, version=dataset.latest_version
                )
        else:
            raise InvalidRequest(
                "training_file names a dataset version (dsv_...) or a dataset (ds_..., its "
                "latest version). To train on an uploaded file, make a dataset from it first: "
                "POST /v1/datasets.",
                param="training_file",
            )
        return found

    # -- read ------------------------------------------------------------------------------------

    def get(self, *, org_id: str, job_id: str) -> Job:
        with self._db.read() as conn:
            job = repo.get_job(conn, org_id=org_id, job_id=job_id, kind=self._kinds)
        if job is None:
            raise _no_job(job_id)
        return job

    def list(
        self, *, org_id: str, after: str | None, limit: int, metadata: dict[str, str]
    ) -> Page[Job]:
        with self._db.read() as conn:
            return repo.list_jobs(
                conn, org_id=org_id, after=after, limit=limit, metadata=metadata, kind=self._kinds
            )

    def events(self, *, org_id: str, job_id: str, after: str | None, limit: int) -> Page[JobEvent]:
        self.get(org_id=org_id, job_id=job_id)
        with self._db.read() as conn:
            return repo.list_events(conn, job_id=job_id, after=after, limit=limit)

    def checkpoints(
        self, *, org_id: str, job_id: str, after: str | None, limit: int
    ) -> Page[JobCheckpoint]:
        self.get(org_id=org_id, job_id=job_id)
        with self._db.read() as conn:
            return repo.list_checkpoints(conn, job_id=job_id, after=after, limit=limit)

    # -- control ---------------------------------------------------------------------------------

    def cancel(self, *, org_id: str, job_id: str, actor: Actor) -> Job:
        return self._control(
            org_id,
            job_id,
            actor,
            control=JobControl.CANCEL,
            now_from=(JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.PAUSED),
            now_to=JobStatus.CANCELLED,
        )

    def pause(self, *, org_id: str, job_id: str, actor: Actor) -> Job:
        return self._control(
            org_id,
            job_id,
            actor,
            control=JobControl.PAUSE,
            now_from=(JobStatus.VALIDATING_FILES, JobStatus.QUEUED),
            now_to=JobStatus.PAUSED,
        )

    def resume(self, *, org_id: str, job_id: str, actor: Actor) -> Job:
        with self._db.write() as conn:
            job = self._get_in(conn, org_id, job_id)
            if not repo.transition(
                conn, job_id=job_id, expected=[JobStatus.PAUSED], status=JobStatus.QUEUED
            ):
                raise _bad_state(job, "resume", "only a paused job can be resumed")
            repo.add_event(conn, job_id=job_id, message="Job resumed; queued.")
            self._record(conn, actor, job, "job.resumed")
        self._wake_runner()
        return self.get(org_id=org_id, job_id=job_id)

    def _control(
        self,
        org_id: str,
        job_id: str,
        actor: Actor,
        *,
        control: JobControl,
        now_from: tuple[JobStatus, ...],
        now_to: JobStatus,
    ) -> Job:
        verb = control.value
        with self._db.write() as conn:
            job = self._get_in(conn, org_id, job_id)
            released: list[str] = []
            if repo.transition(conn, job_id=job_id, expected=now_from, status=now_to):
                repo.add_event(conn, job_id=job_id, message=f"Job {now_to.value}.")
                if now_to.finished:
                    released = repo.drop_checkpoint_blobs(conn, job_id=job_id)
            elif repo.request_control(conn, job_id=job_id, control=control):
                repo.add_event(conn, job_id=job_id, message=f"Asked the worker to {verb}.")
            elif job.status is not now_to:
                raise _bad_state(job, verb, f"the job is already {job.status.value}")
            self._record(conn, actor, job, f"job.{verb}_requested")
        for key in released:
            self._blobs.delete(key)
        return self._settle(org_id, job_id)

    def _settle(self, org_id: str, job_id: str) -> Job:
        """Wait (briefly) for a running worker to act on a request; return the job as it is."""
        deadline = time.monotonic() + self._settle_timeout_s
        while True:
            job = self.get(org_id=org_id, job_id=job_id)
            if job.status is not JobStatus.RUNNING or time.monotonic() > deadline:
                return job
            time.sleep(0.05)

    def _get_in(self, conn: Connection, org_id: str, job_id: str) -> Job:
        job = repo.get_job(conn, org_id=org_id, job_id=job_id, kind=self._kinds)
        if job is None:
            raise _no_job(job_id)
        return job

    def _record(self, conn: Connection, actor: Actor, job: Job, action: str) -> None:
        self._audit.record(
            conn,
            actor=actor,
            action=action,
            target_type="job",
            target_id=job.id,
            org_id=job.org_id,
            project_id=job.project_id,
        )

    # -- housekeeping ----------------------------------------------------------------------------

    def counts_by_state(self) -> list[tuple[str, str, int]]:
        """(org id, state, jobs): what `/metrics` shows."""
        with self._db.read() as conn:
            return repo.count_by_state(conn)

    def sweep(self) -> int:
        """Delete checkpoint blobs no job can resume from: those of finished jobs, superseded
        ones, and blobs a crash left unrecorded (a worker stores the blob, then its row).
        Returns how many went. A running job's unrecorded blob may be its newest: it stays."""
        with self._db.read() as conn:
            recorded, running = repo.checkpoint_blob_owners(conn)
        with self._db.write() as conn:
            finished = [k for k, status in recorded.items() if JobStatus(status).finished]
            for job_id in {k.split("/")[2] for k in finished if k.count("/") >= 3}:
                repo.drop_checkpoint_blobs(conn, job_id=job_id)
        doomed = set(finished)
        for key in self._blobs.keys("jobs/"):
            parts = key.split("/")
            if key not in recorded and len(parts) >= 4 and parts[2] not in running:
                doomed.add(key)
        for key in doomed:
            self._blobs.delete(key)
        if doomed:
            log.info("removed %d checkpoint blobs no job needs", len(doomed))
        return len(doomed)


def job_seed(requested: int | None, job_id: str) -> int:
    """A job's seed: the one asked for, or one drawn from the job's id; within 31 bits."""
    seed = requested if requested is not None else int.from_bytes(job_id.encode()[-4:])
    return seed % 2**31


def queue_job(
    conn: Connection,
    *,
    job_id: str,
    org_id: str,
    project_id: str,
    actor: Actor,
    kind: str,
    model: str,
    dataset_version_id: str,
    task: str,
    target_column: str,
    spec: dict[str, Any],
    seed: int | None,
    suffix: str | None = None,
    metadata: dict[str, str] | None = None,
    register_to: str | None = None,
    grant_id: str | None = None,
) -> Job:
    """Insert a job of any kind into the durable queue, with its seed (see `job_seed`); the
    caller wakes the runner once the transaction has committed."""
    return repo.insert_job(
        conn,
        job_id=job_id,
        org_id=org_id,
        project_id=project_id,
        kind=kind,
        model=model,
        dataset_version_id=dataset_version_id,
        task=task,
        target_column=target_column,
        spec=spec,
        seed=job_seed(seed, job_id),
        suffix=suffix,
        metadata=metadata,
        register_to=register_to,
        created_by=actor.id,
        grant_id=grant_id,
    )


def fine_tuned_name(base: str, org_name: str, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<org>:<suffix>:<job>`, as OpenAI names fine-tuned models."""
    return f"ft:{base}:{org_slug(org_name)}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


def org_slug(org_name: str) -> str:
    return _SLUG.sub("-", org_name.lower()).strip("-")[:40] or "org"


def _no_job(job_id: str) -> NotFound:
    return NotFound(f"No fine-tuning job with id {job_id!r}.", param="fine_tuning_job_id")


def _bad_state(job: Job, verb: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"Cannot {verb} job {job.id}: {why}.", param="fine_tuning_job_id", code="invalid_job_state"
    )


__all__ = ["LORA_KIND", "TRAINING", "JobRequest", "JobService", "TrainingPlan", "fine_tuned_name"]
