"""Optimisation jobs: variants of a registered version (int8, pruned, graph-optimised), each
measured against its parent and registered as a new version of the same model.

Creation checks everything it can (the version, its ONNX graph and dataset, the variants); the
work runs in a worker process (`workers/optimisation_job.py`). Reads and control (cancel) go
through the job service, scoped to this kind of job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiaas.domain import Actor, Job
from aiaas.errors import InvalidRequest
from aiaas.ids import new_id
from aiaas.services.audit import AuditService
from aiaas.services.jobs import JobService
from aiaas.services.registry import RegistryService
from aiaas.storage.db import Database
from aiaas.storage.repos import jobs as repo

OPTIMISATION = "optimisation"


@dataclass(frozen=True, slots=True)
class OptimisationRequest:
    model: str
    version: int | None
    variants: Sequence[dict[str, Any]]  # {"method": ..., method parameters}
    seed: int | None = None


class OptimisationService:
    def __init__(
        self, db: Database, registry: RegistryService, jobs: JobService, audit: AuditService
    ) -> None:
        self._db = db
        self._registry = registry
        self.jobs = jobs.of_kind(OPTIMISATION)
        self._audit = audit

    def create(
        self, *, org_id: str, project_id: str, actor: Actor, request: OptimisationRequest
    ) -> Job:
        model = self._registry.get_model(org_id=org_id, model_id=request.model)  # 404
        number = request.version if request.version is not None else model.latest_version
        if number is None:
            raise InvalidRequest(f"Model '{model.id}' has no versions yet.", param="model")
        version = self._registry.get_version(org_id=org_id, model_id=model.id, version=number)
        missing = [
            n
            for n in ("model.onnx", "model.json", "preprocessing.json")
            if n not in version.artifacts
        ]
        if missing:
            raise InvalidRequest(
                f"Version {number} of '{model.id}' lacks {', '.join(missing)}: only versions "
                "registered by training jobs can be optimised.",
                param="version",
            )
        if version.dataset_version_id is None:
            raise InvalidRequest(
                f"Version {number} of '{model.id}' names no dataset to measure variants on.",
                param="version",
            )
        if any(v["method"] == "prune" for v in request.variants) and (
            "model.safetensors" not in version.artifacts
        ):
            raise InvalidRequest(
                f"Version {number} of '{model.id}' has no weights (model.safetensors) to prune; "
                "prune the version it was made from.",
                param="variants",
            )
        job_id = new_id("optjob", sep="-")
        seed = request.seed if request.seed is not None else int.from_bytes(job_id.encode()[-4:])
        spec = {
            "model_id": model.id,
            "version": number,
            "version_id": version.id,
            "variants": list(request.variants),
        }
        with self._db.write() as conn:
            job = repo.insert_job(
                conn,
                job_id=job_id,
                org_id=org_id,
                project_id=project_id,
                kind=OPTIMISATION,
                model=model.base,
                dataset_version_id=version.dataset_version_id,
                task=model.task,
                target_column="",
                spec=spec,
                seed=seed % 2**31,
                suffix=None,
                metadata=None,
                register_to=model.id,
                created_by=actor.id,
            )
            repo.add_event(
                conn,
                job_id=job_id,
                message=f"Queued {len(request.variants)} variants of {model.id} version {number}.",
            )
            self._audit.record(
                conn,
                actor=actor,
                action="job.created",
                target_type="job",
                target_id=job_id,
                org_id=org_id,
                project_id=project_id,
                data={"kind": OPTIMISATION, "model": model.id, "version": number},
            )
        self.jobs.wake()
        return job
