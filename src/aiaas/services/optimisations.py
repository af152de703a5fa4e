"""Optimisation jobs: variants of a registered version (int8, pruned, graph-optimised), each
measured against its parent and registered as a new version of the same model.

Creation checks everything it can (the version, its ONNX graph and dataset, the variants); the
work runs in a worker process (`workers/optimisation_job.py`). Reads and control (cancel) go
through the job service, scoped to this kind of job.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiaas.domain import Actor, Job, OptimisationRequest
from aiaas.errors import InvalidRequest, ModelNotFound, NotFound
from aiaas.ids import new_id
from aiaas.services.audit import AuditService
from aiaas.services.jobs import JobService, org_slug, queue_job
from aiaas.services.registry import RegistryService
from aiaas.storage.db import Database
from aiaas.storage.repos import jobs as repo
from aiaas.storage.repos import tenancy as tenancy_repo

OPTIMISATION = "optimisation"
GGUF = "gguf"


class OptimisationService:
    def __init__(
        self,
        db: Database,
        registry: RegistryService,
        jobs: JobService,
        audit: AuditService,
        *,
        llm_file: Callable[[str], Path | None] = lambda _model: None,
    ) -> None:
        self._db = db
        self._registry = registry
        self.jobs = jobs.of_kind(OPTIMISATION)
        self._audit = audit
        self._llm_file = llm_file  # a served LLM's GGUF file, or None

    def create(
        self, *, org_id: str, project_id: str, actor: Actor, request: OptimisationRequest
    ) -> Job:
        gguf = [v for v in request.variants if v["method"] == GGUF]
        if gguf:
            if len(gguf) != len(request.variants):
                raise InvalidRequest(
                    "gguf variants re-quantise a GGUF LLM; the other methods are for trained "
                    "models: ask for them in separate jobs.",
                    param="variants",
                )
            return self._create_gguf(org_id, project_id, actor, request)
        if request.eval_text is not None:
            raise InvalidRequest(
                "eval_text is for GGUF LLMs; a trained model is measured on its test split.",
                param="eval_text",
            )
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
        spec = {
            "model_id": model.id,
            "version": number,
            "version_id": version.id,
            "variants": list(request.variants),
        }
        return self._insert(
            job_id,
            org_id=org_id,
            project_id=project_id,
            actor=actor,
            request=request,
            spec=spec,
            base=model.base,
            task=model.task,
            dataset_version_id=version.dataset_version_id,
            register_to=model.id,
            what=f"{model.id} version {number}",
        )

    def _create_gguf(
        self, org_id: str, project_id: str, actor: Actor, request: OptimisationRequest
    ) -> Job:
        registered = self._registry.find_model(org_id=org_id, model_id=request.model)
        if registered is not None and registered.task == "text-generation":
            raise InvalidRequest(
                f"'{request.model}' is a registered GGUF model (imported or re-quantised): "
                "re-quantising is supported for the served GGUF LLMs only, not for imported "
                "models.",
                param="model",
                code="not_supported_for_imported_models",
            )
        path = self._llm_file(request.model)
        if path is None:
            if self._registry.find_model(org_id=org_id, model_id=request.model) is not None:
                raise InvalidRequest(
                    f"'{request.model}' is a trained model, not a GGUF LLM: use the int8, "
                    "pruning or onnx_optimized methods.",
                    param="variants",
                )
            raise ModelNotFound(
                f"The model '{request.model}' is not a served GGUF LLM.", param="model"
            )
        if request.version is not None:
            raise InvalidRequest("A GGUF LLM has no versions to choose from.", param="version")
        with self._db.read() as conn:
            org = tenancy_repo.get_org(conn, org_id)
        if org is None:
            raise NotFound(f"No organization with id {org_id!r}.")
        job_id = new_id("optjob", sep="-")
        spec = {
            "source": GGUF,
            "model_id": request.model,
            "path": str(path),
            "variants": list(request.variants),
            "eval_text": request.eval_text,
        }
        return self._insert(
            job_id,
            org_id=org_id,
            project_id=project_id,
            actor=actor,
            request=request,
            spec=spec,
            base=request.model[:64],
            task="text-generation",
            dataset_version_id="",
            register_to=f"gguf:{request.model}:{org_slug(org.name)}",
            what=request.model,
        )

    def _insert(
        self,
        job_id: str,
        *,
        org_id: str,
        project_id: str,
        actor: Actor,
        request: OptimisationRequest,
        spec: dict[str, Any],
        base: str,
        task: str,
        dataset_version_id: str,
        register_to: str,
        what: str,
    ) -> Job:
        with self._db.write() as conn:
            job = queue_job(
                conn,
                job_id=job_id,
                org_id=org_id,
                project_id=project_id,
                actor=actor,
                kind=OPTIMISATION,
                model=base,
                dataset_version_id=dataset_version_id,
                task=task,
                target_column="",
                spec=spec,
                seed=request.seed,
                register_to=register_to,
            )
            repo.add_event(
                conn, job_id=job_id, message=f"Queued {len(request.variants)} variants of {what}."
            )
            self._audit.record(
                conn,
                actor=actor,
                action="job.created",
                target_type="job",
                target_id=job_id,
                org_id=org_id,
                project_id=project_id,
                data={"kind": OPTIMISATION, "model": request.model, "version": spec.get("version")},
            )
        self.jobs.wake()
        return job
