"""One optimisation job, run inside its worker process: variants of a registered version, each
measured against its parent on the same test split and registered as a new version.

The job's `result` holds the comparison table and grows as each variant is registered, so a job
whose worker died resumes after the last variant it registered instead of registering it twice.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from aiaas import __version__
from aiaas.domain import Actor, JobControl, JobStatus, ModelVersion
from aiaas.errors import InvalidRequest
from aiaas.services.audit import AuditService
from aiaas.services.registry import NewVersion, RegistryService
from aiaas.settings import Settings
from aiaas.specs.preprocessing import PreprocessingSpec
from aiaas.specs.shapes import MINILM, ArchitectureOptions, InputShape
from aiaas.specs.types import Task
from aiaas.storage.process import Storage
from aiaas.storage.repos import jobs as repo
from aiaas.storage.repos import registry as registry_repo
from aiaas.training import optimise
from aiaas.training.architectures import Network, build_model
from aiaas.training.evaluate import summary
from aiaas.training.export import export_onnx
from aiaas.training.trainer import Hyperparameters, Stop, Trainer
from aiaas.workers.lease import JobLease, run_job
from aiaas.workers.training_job import Encoded, evaluate_outputs, load_frame, prepare_frame

CALIBRATION_ROWS = 512
KEEP = ("preprocessing.json", "model.json")  # copied from the parent into every variant


def run_optimisation_job(
    settings: Settings, job_id: str, token: str, *, shutdown: threading.Event
) -> None:
    run_job(settings, job_id, token, _run_any, shutdown=shutdown)


def _run_any(settings: Settings, storage: Storage, lease: JobLease) -> None:
    if lease.job.spec.get("source") == "gguf":
        _run_gguf(settings, storage, lease)
    else:
        _run(settings, storage, lease)


class _Parent:
    """The registered version being optimised, with its data encoded for its network."""

    def __init__(self, storage: Storage, lease: JobLease, registry: RegistryService) -> None:
        job = lease.job
        spec = job.spec
        with storage.db.read() as conn:
            found = registry_repo.get_version(
                conn, org_id=job.org_id, model_id=spec["model_id"], version=spec["version"]
            )
        if found is None:
            raise InvalidRequest(
                f"Model '{spec['model_id']}' no longer has version {spec['version']}.",
                param="model",
            )
        self.version: ModelVersion = found
        self.files = {name: registry.read_artifact(found, name) for name in found.artifacts}
        self.description = json.loads(self.files["model.json"])
        self.spec = PreprocessingSpec.model_validate_json(self.files["preprocessing.json"])
        self.task = Task(self.description["task"])
        self.shape = InputShape(
            **{
                k: tuple(v) if k == "image_shape" and v is not None else v
                for k, v in self.description["input_shape"].items()
            }
        )
        prepared = prepare_frame(
            self.spec, self.description["target_column"], load_frame(storage, job)
        )
        self.data: Encoded = prepared.bind(tuple(self.description["input_names"]))
        evaluated = self.data.test or self.data.valid or self.data.train
        self.split_name = "test" if self.data.test else "validation" if self.data.valid else "train"
        self.inputs = evaluated.inputs
        self.targets = evaluated.targets

    def evaluate(self, logits: np.ndarray) -> dict[str, Any]:
        report = evaluate_outputs(self.task, self.spec, self.targets, logits)
        return {"summary": summary(report), "evaluation": report.model_dump(mode="json")}

    def network(self) -> Network:
        """The parent's network in torch, weights loaded (for pruning)."""
        if "model.safetensors" not in self.files:
            raise InvalidRequest(
                f"Version {self.version.version} has no weights to prune (model.safetensors).",
                param="variants",
            )
        options = ArchitectureOptions.model_validate(self.description["options"])
        architecture = self.description["architecture"]
        pretrained = None
        if architecture == MINILM:
            from aiaas.engines.embeddings.export import minilm_l6_v2_dir

            pretrained = minilm_l6_v2_dir()
        model = build_model(architecture, self.shape, options, pretrained_dir=pretrained)
        model.load_state_dict(safetensors.torch.load(self.files["model.safetensors"]))
        return model


class _Poll:
    """A trainer control for the pruning fine-tune: cancel or pause stop it, no checkpoints."""

    def __init__(self, lease: JobLease) -> None:
        self._lease = lease

    def poll(self) -> Stop | None:
        return self._lease.stop_requested()

    def checkpoint_due(self) -> bool:
        return False

    def on_checkpoint(self, data: bytes, *, epoch: int, step: int, metrics: Any) -> None:
        pass

    def on_epoch(self, metrics: Any) -> None:
        pass


def _run(settings: Settings, storage: Storage, lease: JobLease) -> None:
    job = lease.job
    registry = RegistryService(storage.db, storage.blobs, AuditService(storage.db))
    parent = _Parent(storage, lease, registry)
    threads = settings.training_threads
    result: dict[str, Any] = dict(job.result or {})
    if "parent" not in result:
        lease.event(
            f"Measuring version {parent.version.version} on {len(parent.targets)} "
            f"{parent.split_name} rows."
        )
        measured = optimise.measure(
            parent.files["model.onnx"], parent.inputs, parent.evaluate, threads=threads
        )
        result = {
            "parent": {"version": parent.version.version, **_row(measured)},
            "split": parent.split_name,
            "rows": len(parent.targets),
            "variants": [],
        }
        _save(storage, lease, result)
    done = len(result["variants"])
    for variant in job.spec["variants"][done:]:
        if (stop := lease.stop_requested()) is not None:
            _stop(lease, stop)
            return
        lease.event(f"Building {_describe(variant)}.")
        built = _build(parent, variant, lease, threads=threads)
        if built is None:
            _stop(lease, lease.stop_requested() or Stop.CANCEL)
            return
        measured = optimise.measure_runner(built.run, built.size, parent.inputs, parent.evaluate)
        row = {**_row(measured), **built.extra, "method": variant["method"], "params": variant}
        row["compared_to_parent"] = _compare(result["parent"], row)
        version = _register(registry, parent, lease, built.artifacts, row, result["parent"])
        row["version"] = version.version
        row["version_id"] = version.id
        result["variants"].append(row)
        _save(storage, lease, result)
        lease.event(
            f"Registered {_describe(variant)} as version {version.version}: "
            f"{row['size_bytes']} bytes, p50 {row['latency_p50_ms']:.3f} ms, "
            + ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items() if v is not None)
        )
    lease.finish(
        JobStatus.SUCCEEDED,
        "The job has successfully completed.",
        result=json.dumps(result),
        fine_tuned_model=job.spec["model_id"],
    )


def _stop(lease: JobLease, stop: Stop) -> None:
    if lease.lost:
        return
    if stop is Stop.CANCEL:
        lease.finish(JobStatus.CANCELLED, "Job cancelled.")
    elif lease.control is JobControl.PAUSE:
        lease.finish(JobStatus.PAUSED, "Job paused between variants.")
    else:
        lease.requeue("The server is stopping; queued again.")


def _save(storage: Storage, lease: JobLease, result: dict[str, Any]) -> None:
    with storage.db.write() as conn:
        repo.set_progress(conn, job_id=lease.job.id, worker=lease.token, result=json.dumps(result))


def _row(measured: optimise.Measurement) -> dict[str, Any]:
    data = measured.as_dict()
    data["evaluation"] = data["metrics"].pop("evaluation")
    data["metrics"] = data["metrics"].pop("summary")
    return data


def _compare(parent: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Ratios and differences against the parent, for the comparison table."""
    out: dict[str, Any] = {
        "size_ratio": round(row["size_bytes"] / parent["size_bytes"], 4),
        "latency_p50_ratio": _ratio(row["latency_p50_ms"], parent["latency_p50_ms"]),
        "throughput_ratio": _ratio(_throughput(row), _throughput(parent)),
    }
    for name, value in row["metrics"].items():
        before = parent["metrics"].get(name)
        if value is not None and before is not None:
            out[f"{name}_change"] = round(value - before, 6)
    return out


def _throughput(row: dict[str, Any]) -> float:
    return float(row.get("throughput_rows_per_s") or row.get("throughput_tokens_per_s") or 0)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def _describe(variant: dict[str, Any]) -> str:
    method = variant["method"]
    if method == "prune":
        kind = "structured" if variant.get("structured") else "unstructured"
        return f"prune ({kind}, sparsity {variant['sparsity']:g})"
    return method.replace("_", " ")


@dataclass
class _Built:
    """A variant: what to register, how to run it for measuring, and its own table fields."""

    artifacts: list[tuple[str, bytes]]
    run: Callable[[dict[str, np.ndarray]], np.ndarray]
    size: int  # what it takes on disk: its graph or its weights
    extra: dict[str, Any] = field(default_factory=dict)


def _onnx(graph: bytes, threads: int, **extra: Any) -> _Built:
    runner = optimise.session(graph, threads=threads)
    return _Built(
        artifacts=[("model.onnx", graph)],
        run=lambda feed: np.asarray(runner.run(None, feed)[0]),
        size=len(graph),
        extra=extra,
    )


def _build(
    parent: _Parent, variant: dict[str, Any], lease: JobLease, *, threads: int
) -> _Built | None:
    """The variant, or None when a cancel or pause stopped its fine-tune."""
    method = variant["method"]
    graph = parent.files["model.onnx"]
    if method == "dynamic_int8" and variant.get("engine") == "torch":
        quantized = optimise.quantize_dynamic_torch(parent.network())
        weights = optimise.int8_state(quantized)
        return _Built(
            artifacts=[("model.int8.safetensors", weights)],
            run=optimise.torch_runner(quantized),
            size=len(weights),
            extra={"engine": "torch", "deployable": False},
        )
    if method == "dynamic_int8":
        return _onnx(optimise.quantize_dynamic(graph), threads, engine="onnxruntime")
    if method == "static_int8":
        train = parent.data.train.inputs
        calibration = {k: v[:CALIBRATION_ROWS] for k, v in train.items()}
        rows = len(next(iter(calibration.values())))
        return _onnx(optimise.quantize_static(graph, calibration), threads, calibration_rows=rows)
    if method == "onnx_optimized":
        return _onnx(optimise.optimise_graph(graph), threads)
    assert method == "prune"
    model = parent.network()
    optimise.apply_pruning(model, variant["sparsity"], structured=variant.get("structured", False))
    epochs = variant.get("fine_tune_epochs", 1)
    if epochs:
        hyper = (parent.version.lineage or {}).get("hyperparameters") or {}
        trainer = Trainer(
            model,
            parent.task,
            Hyperparameters(
                n_epochs=epochs,
                batch_size=int(hyper.get("batch_size") or 64),
                # A gentle fine-tune: a tenth of the rate the parent was trained with.
                learning_rate=float(hyper.get("learning_rate") or 1e-3) / 10,
                seed=lease.job.seed,
            ),
        )
        outcome = trainer.run(parent.data.train, parent.data.valid, _Poll(lease)).outcome
        if outcome != "completed":
            return None
    optimise.bake_pruning(model)
    weights = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    built = _onnx(
        export_onnx(model, parent.shape),
        threads,
        sparsity=round(optimise.sparsity_of(model), 6),
        fine_tune_epochs=epochs,
    )
    built.artifacts.append(("model.safetensors", weights))
    return built


def _register(
    registry: RegistryService,
    parent: _Parent,
    lease: JobLease,
    built: list[tuple[str, bytes]],
    row: dict[str, Any],
    parent_row: dict[str, Any],
) -> ModelVersion:
    job = lease.job
    source = parent.version
    artifacts = [*built, *((name, parent.files[name]) for name in KEEP)]
    metrics = {
        "evaluation": row["evaluation"],
        "evaluated_on": parent.split_name,
        "summary": row["metrics"],
        "optimisation": {
            "method": row["method"],
            "params": row["params"],
            "measurement": {k: v for k, v in row.items() if k not in ("evaluation", "params")},
            "parent": {k: v for k, v in parent_row.items() if k != "evaluation"},
        },
    }
    lineage = {
        **{k: v for k, v in (source.lineage or {}).items() if k != "job_id"},
        "job_id": job.id,
        "parent_version": source.version,
        "parent_version_id": source.id,
        "optimisation": row["method"],
        "code_version": f"aiaas {__version__}",
        "torch_version": torch.__version__,
    }
    model = registry.get_model(org_id=job.org_id, model_id=source.model_id)
    return registry.register(
        NewVersion(
            org_id=job.org_id,
            project_id=job.project_id,
            model_id=source.model_id,
            base=model.base,
            task=model.task,
            artifacts=artifacts,
            metrics=metrics,
            lineage=lineage,
            dataset_version_id=source.dataset_version_id,
            job_id=job.id,
        ),
        actor=Actor(type="job", id=job.id),
    )


# -- GGUF LLMs ----------------------------------------------------------------------------------

SPEED_RUNS = 5


def _run_gguf(settings: Settings, storage: Storage, lease: JobLease) -> None:
    """Re-quantise a served LLM's GGUF file to each requested type; measure size, perplexity on
    held-out text and generation speed against the source; register each file as a version of
    the organisation's `gguf:<model>:<org>` model."""
    from aiaas.engines.llm import quantize as gguf

    job = lease.job
    spec = job.spec
    source = Path(spec["path"])
    text = spec.get("eval_text") or gguf.DEFAULT_EVAL_TEXT
    threads = settings.training_threads
    registry = RegistryService(storage.db, storage.blobs, AuditService(storage.db))
    result: dict[str, Any] = dict(job.result or {})
    if "parent" not in result:
        lease.event(f"Measuring {spec['model_id']} ({source.name}).")
        result = {
            "parent": {"model": spec["model_id"], **_measure_gguf(source, text, threads)},
            "split": "held-out text",
            "rows": None,
            "variants": [],
        }
        _save(storage, lease, result)
    done = len(result["variants"])
    scratch = settings.data_dir / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    for variant in spec["variants"][done:]:
        if (stop := lease.stop_requested()) is not None:
            _stop(lease, stop)
            return
        quant = variant["quant_type"]
        lease.event(f"Re-quantising to {quant}.")
        with tempfile.TemporaryDirectory(dir=scratch, prefix=f"{job.id}-") as tmp:
            target = Path(tmp) / f"{source.stem}.{quant}.gguf"
            gguf.requantize(source, target, quant, threads=threads)
            row = {**_measure_gguf(target, text, threads), "method": "gguf", "params": variant}
            row["compared_to_parent"] = _compare(result["parent"], row)
            version = registry.register(
                NewVersion(
                    org_id=job.org_id,
                    project_id=job.project_id,
                    model_id=job.register_to or f"gguf:{spec['model_id']}",
                    base=job.model,
                    task="text-generation",
                    artifacts=[("model.gguf", target.read_bytes())],
                    metrics={
                        "summary": row["metrics"],
                        "optimisation": {
                            "method": "gguf",
                            "params": variant,
                            "measurement": row,
                            "parent": result["parent"],
                        },
                    },
                    lineage={
                        "job_id": job.id,
                        "parent_model": spec["model_id"],
                        "parent_file": source.name,
                        "quant_type": quant,
                        "code_version": f"aiaas {__version__}",
                    },
                    dataset_version_id=None,
                    job_id=job.id,
                ),
                actor=Actor(type="job", id=job.id),
            )
        row["version"], row["version_id"] = version.version, version.id
        result["variants"].append(row)
        _save(storage, lease, result)
        lease.event(
            f"Registered {quant} as version {version.version}: {row['size_bytes']} bytes, "
            f"perplexity {row['metrics']['perplexity']:.3f}."
        )
    lease.finish(
        JobStatus.SUCCEEDED,
        "The job has successfully completed.",
        result=json.dumps(result),
        fine_tuned_model=job.register_to,
    )


def _measure_gguf(path: Path, text: str, threads: int) -> dict[str, Any]:
    from aiaas.engines.llm import quantize as gguf

    try:
        scored = gguf.perplexity(path, text, n_ctx=512, threads=threads)
    except InvalidRequest:  # a short text: smaller windows, else the job says it is too short
        scored = gguf.perplexity(path, text, n_ctx=128, threads=threads)
    speeds = [gguf.generation_speed(path, threads=threads) for _ in range(SPEED_RUNS)]
    first = [s.first_token_ms for s in speeds]
    generated = float(np.median([s.generated_tokens_per_s for s in speeds]))
    prompt = float(np.median([s.prompt_tokens_per_s for s in speeds]))
    return {
        "size_bytes": path.stat().st_size,
        "latency_p50_ms": round(float(np.percentile(first, 50)), 3),
        "latency_p95_ms": round(float(np.percentile(first, 95)), 3),
        "throughput_tokens_per_s": round(generated, 2),
        "prompt_tokens_per_s": round(prompt, 2),
        "metrics": {"perplexity": round(scored.perplexity, 4)},
        "tokens_scored": scored.tokens_scored,
        "n_ctx": scored.n_ctx,
    }
