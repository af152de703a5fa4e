"""The Platform: the wiring of every part, built once per process and closed once.

`Platform.open(settings)` is the composition root shared by the server's lifespan and the CLI:
it applies migrations, loads the secrets and builds the services. It holds no business logic.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiaas.domain import IssuedKey
from aiaas.engines.classic.pool import ClassicPool
from aiaas.engines.embeddings.export import minilm_l6_v2_dir
from aiaas.engines.llm.bundled import BUNDLED_GGUF
from aiaas.engines.llm.engine import EngineConfig
from aiaas.engines.llm.residency import LlmResidency
from aiaas.engines.pool import EmbedderSpec, LlmSpec, ModelPool
from aiaas.errors import ConfigurationError
from aiaas.observability.metrics import Metrics
from aiaas.scheduling.batcher import BatcherConfig
from aiaas.scheduling.fair import make_policy
from aiaas.services.audit import AuditService
from aiaas.services.batch_lines import BatchLines
from aiaas.services.batches import BatchRunner, BatchRunnerConfig, BatchService
from aiaas.services.bundles import BundleService
from aiaas.services.datasets import DatasetService
from aiaas.services.deployments import DeploymentService
from aiaas.services.embeddings import DeployedEncoders, EmbeddingService
from aiaas.services.explanations import ExplanationService
from aiaas.services.files import FileService
from aiaas.services.grants import GrantService
from aiaas.services.imports import ImportService
from aiaas.services.inference import InferenceService
from aiaas.services.jobs import JobService
from aiaas.services.keys import KeyService
from aiaas.services.limits import RateLimiter
from aiaas.services.llm_models import LlmModels
from aiaas.services.metering import Metering
from aiaas.services.optimisations import OptimisationService
from aiaas.services.predictions import PredictionService
from aiaas.services.privacy import PrivacyService
from aiaas.services.registry import RegistryService
from aiaas.services.tenancy import TenancyService
from aiaas.services.usage import UsageMeter
from aiaas.settings import BUNDLED_MODELS, Settings
from aiaas.storage.blobs import EncryptedBlobStore
from aiaas.storage.crypto import KeyRing
from aiaas.storage.db import Database
from aiaas.storage.process import Storage
from aiaas.workers.local import LocalExecutor
from aiaas.workers.runner import JobRunner, RunnerConfig

log = logging.getLogger("aiaas.platform")

MINILM_ID = "all-minilm-l6-v2"


@dataclass
class Readiness:
    """What still loads; `/health` is 503 until nothing does."""

    loading: set[str] = field(default_factory=set)

    @property
    def ready(self) -> bool:
        return not self.loading


@dataclass
class Platform:
    settings: Settings
    db: Database
    keyring: KeyRing
    blobs: EncryptedBlobStore
    audit: AuditService
    keys: KeyService
    tenancy: TenancyService
    files: FileService
    datasets: DatasetService
    metrics: Metrics
    readiness: Readiness
    pool: ModelPool
    inference: InferenceService
    embeddings: EmbeddingService
    jobs: JobService
    registry: RegistryService
    deployments: DeploymentService
    predictions: PredictionService
    metering: Metering
    bundles: BundleService
    optimisations: OptimisationService
    grants: GrantService
    imports: ImportService
    explanations: ExplanationService
    privacy: PrivacyService
    batches: BatchService
    runner: JobRunner | None = None
    batch_runner: BatchRunner | None = None

    @classmethod
    def open(cls, settings: Settings) -> Platform:
        storage = Storage.open(settings, migrate=True)
        db, keyring, blobs, pepper = storage.db, storage.keyring, storage.blobs, storage.pepper
        audit = AuditService(db)
        grants = GrantService(db, audit, cache_s=settings.auth_cache_s)
        grants.sweep_expired()
        keys = KeyService(
            db,
            pepper=pepper,
            audit=audit,
            max_lifetime_s=settings.max_key_lifetime_days * 86400.0,
            cache_s=settings.auth_cache_s,
        )
        files = FileService(db, blobs, audit, max_file_bytes=settings.max_file_bytes)
        files.sweep()
        datasets = DatasetService(
            db,
            blobs,
            files,
            audit,
            max_source_bytes=settings.max_dataset_bytes,
            grants=grants,
            region=settings.region,
        )
        datasets.sweep()
        registry = RegistryService(db, blobs, audit, grants=grants)
        registry.sweep()
        jobs = JobService(db, blobs, audit, grants, region=settings.region)
        jobs.sweep()
        metrics = Metrics()
        metering = Metering(
            RateLimiter.from_url(settings.redis_url),
            UsageMeter(
                db,
                flush_interval_s=settings.usage_flush_interval_s,
                audit=audit,
                audit_window_s=settings.audit_usage_window_s,
                batch_discount=settings.batch_discount,
            ),
            metrics,
        )
        deployments = DeploymentService(db, registry, audit, grants, cache_s=settings.route_cache_s)
        predictions = PredictionService(
            deployments,
            registry,
            ClassicPool(
                memory_budget_bytes=settings.classic_memory_budget_mb * 1024 * 1024,
                batch=BatcherConfig(
                    max_batch_items=settings.classic_max_batch,
                    max_wait_ms=settings.classic_max_wait_ms,
                    # Rows, not requests: one /v1/predictions call may carry 10 000 records.
                    max_queued_items=65536,
                ),
                threads=settings.classic_threads,
                policy=functools.partial(make_policy, settings.scheduling),
            ),
            metrics,
            metering,
            threads=settings.classic_threads,
        )
        metrics.watch_classic_pool(predictions.pool_stats)
        pool = ModelPool(
            LlmResidency(
                EngineConfig(
                    n_slots=settings.llm_slots,
                    n_ctx=settings.llm_kv_cells,
                    context_length=settings.llm_context_length,
                    n_batch=settings.llm_batch,
                    n_threads=settings.llm_threads,
                    max_waiting=settings.llm_max_waiting,
                    headroom_slots=settings.llm_headroom_slots,
                    preempt_budget=settings.llm_preempt_budget,
                    prefix_cache_entries=settings.llm_prefix_cache_entries,
                    draft_tokens=settings.llm_draft_tokens,
                    onnx_head=settings.llm_onnx_head,
                ),
                budget_bytes=settings.llm_memory_budget_bytes,
                scheduling=settings.scheduling,
                observer=metrics.llm_residency,
            ),
            scheduling=settings.scheduling,
        )
        metrics.watch_llm_residency(pool.residency.resident, pool.residency.budget_bytes)
        metrics.watch_engines(lambda: [(m.id, m.engine.stats()) for m in pool.llms()])
        metrics.watch_batchers(
            lambda: [
                *((m.id, m.batcher.stats()) for m in pool.embedders()),
                *predictions.batcher_stats(),
            ]
        )
        metrics.watch_jobs(jobs.counts_by_state)
        inference = InferenceService(
            pool,
            LlmModels(pool, registry, grants, cache_s=settings.route_cache_s),
            metering,
            metrics,
        )
        grants.on_revoke(inference.withdraw_grant)
        batches = BatchService(
            db,
            blobs,
            files,
            audit,
            max_lines=settings.batch_max_lines,
            max_line_bytes=settings.max_request_bytes,
        )
        return cls(
            settings=settings,
            db=db,
            keyring=keyring,
            blobs=blobs,
            audit=audit,
            keys=keys,
            tenancy=TenancyService(db, keys=keys, audit=audit, region=settings.region),
            files=files,
            datasets=datasets,
            metrics=metrics,
            readiness=Readiness(),
            pool=pool,
            inference=inference,
            embeddings=EmbeddingService(
                pool,
                metrics,
                metering,
                DeployedEncoders(
                    deployments,
                    registry,
                    grants,
                    threads=settings.embeddings_threads,
                    batch=BatcherConfig(
                        max_batch_items=settings.embeddings_max_batch,
                        max_wait_ms=settings.embeddings_max_wait_ms,
                        workers=settings.embeddings_workers,
                    ),
                    scheduling=settings.scheduling,
                ),
            ),
            jobs=jobs,
            registry=registry,
            deployments=deployments,
            predictions=predictions,
            metering=metering,
            bundles=BundleService(registry),
            optimisations=OptimisationService(db, registry, jobs, audit, llm_file=pool.llm_file),
            grants=grants,
            imports=ImportService(
                db,
                registry,
                files,
                audit,
                max_bytes=settings.max_import_bytes,
                threads=settings.classic_threads,
            ),
            explanations=ExplanationService(db, blobs, audit, predictions, registry, jobs),
            privacy=PrivacyService(db, audit, cache_s=settings.auth_cache_s),
            batches=batches,
        )

    def start_models(self) -> None:
        """Load the configured models in the background; `/health` is 503 until they are in."""
        specs = model_specs(self.settings)
        self.readiness.loading.update(spec.id for spec in specs)
        self.pool.load_in_background(specs, on_done=self.readiness.loading.discard)

    def start_metering(self) -> None:
        """Write usage records in the background (the server only)."""
        self.metering.meter.start()

    def start_jobs(self) -> None:
        """Run queued training jobs in worker processes (the server only, not the CLI)."""
        if self.settings.training_workers == 0:
            return
        runner = JobRunner(
            self.db,
            LocalExecutor(self.settings),
            RunnerConfig(
                housekeeping=self.jobs.sweep,
                slots=self.settings.training_workers,
                heartbeat_timeout_s=self.settings.job_heartbeat_timeout_s,
                max_attempts=self.settings.job_max_attempts,
            ),
        )
        self.jobs.set_runner(runner.wake)
        runner.start()
        self.runner = runner

    def start_batches(self) -> None:
        """Work batches on the running event loop (the server only): their lines go through
        this process's engines, behind interactive requests."""
        runner = BatchRunner(
            self.batches,
            BatchLines(
                inference=self.inference,
                embeddings=self.embeddings,
                predictions=self.predictions,
                privacy=self.privacy,
                metering=self.metering,
            ),
            self.keys,
            BatchRunnerConfig(
                concurrency=self.settings.batch_concurrency,
                heartbeat_timeout_s=self.settings.job_heartbeat_timeout_s,
            ),
        )
        runner.start()
        self.batch_runner = runner

    async def stop_batches(self) -> None:
        """Stop working batches, keeping every finished line (before the engines close)."""
        if self.batch_runner is not None:
            await self.batch_runner.close()
            self.batch_runner = None

    def bootstrap_admin_key(self) -> IssuedKey | None:
        """On the first start, create the operator's key and save it (mode 0600)."""
        issued = self.keys.ensure_platform_admin_key()
        if issued is not None:
            write_private_file(self.settings.admin_key_path, issued.secret + "\n")
        return issued

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.metering.meter.close()
        self.predictions.close()
        self.embeddings.close()
        self.pool.close()
        self.blobs.close()
        self.db.close()


def model_specs(settings: Settings) -> list[LlmSpec | EmbedderSpec]:
    """The models to load: the bundled ones named in AIAAS_MODELS, then AIAAS_GGUF_MODELS."""
    cache = settings.data_dir / "models"
    specs: list[LlmSpec | EmbedderSpec] = []
    gguf: dict[str, Callable[[], Path]] = {}
    for model_id in settings.model_ids:
        if model_id in BUNDLED_GGUF:
            gguf[model_id] = functools.partial(BUNDLED_GGUF[model_id], cache)
        elif model_id == MINILM_ID:
            specs.append(
                EmbedderSpec(
                    id=model_id,
                    locate=minilm_l6_v2_dir,
                    cache_dir=cache / "embeddings",
                    variant=settings.embeddings_variant,
                    threads=settings.embeddings_threads,
                    batch=BatcherConfig(
                        max_batch_items=settings.embeddings_max_batch,
                        max_wait_ms=settings.embeddings_max_wait_ms,
                        workers=settings.embeddings_workers,
                    ),
                )
            )
        else:
            raise ConfigurationError(
                f"AIAAS_MODELS names {model_id!r}; bundled models are {', '.join(BUNDLED_MODELS)}"
            )
    for model_id, path in settings.extra_gguf.items():
        gguf[model_id] = functools.partial(Path, path)
    templates = settings.chat_template_files
    checks = {"AIAAS_CHAT_TEMPLATES": set(templates), "AIAAS_LLM_PINNED": settings.pinned_llms}
    for what, named in checks.items():
        unknown = named - set(gguf)
        if unknown:
            raise ConfigurationError(f"{what} names models not served: {sorted(unknown)}")
    specs += [
        LlmSpec.from_path(
            model_id,
            path,
            chat_template=_read_template(templates[model_id]) if model_id in templates else None,
            pinned=model_id in settings.pinned_llms,
        )
        for model_id, path in gguf.items()
    ]
    order = [*settings.model_ids, *settings.extra_gguf]  # load in the order they are named
    return sorted(specs, key=lambda spec: order.index(spec.id))


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read chat template {path}: {exc}") from exc


def write_private_file(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
