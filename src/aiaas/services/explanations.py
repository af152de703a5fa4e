"""Explanations: why a deployed model predicted what it did, per record, in the units a person
reads (columns, tokens, a heatmap), computed with captum by `training/explain.py`.

A request resolves its model exactly as `/v1/predictions` does (`PredictionService.serve`: the
deployment, its canary, grants and caps), and `name@version` or `name@alias` pins a version of
the model a deployment serves. Its records go through the served model's own preprocessing and
batcher, so each answer carries the very prediction `/v1/predictions` gives. The attributions come
from the version's torch network (rebuilt from its safetensors weights and checked against the
served graph once, when it is first loaded here), or, for a version without weights, from the
served graph itself by perturbation.

A request whose cost (records x the method's forward passes per record x the network's size) is
above `INLINE_COST` runs as a job (kind `explanation`, `workers/explain_job.py`) whose result is
a JSON Lines file in the Files API. CPU-bound work runs in threads; torch and captum are imported
on the first explanation, not when the server starts.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from aiaas.domain import Actor, Job, JobStatus, ModelVersion, Target
from aiaas.engines.classic.model import ClassicModel, Prediction
from aiaas.engines.embeddings.export import minilm_l6_v2_dir
from aiaas.errors import Conflict, InvalidRequest, NotFound
from aiaas.ids import new_id
from aiaas.services.audit import AuditService
from aiaas.services.jobs import JobService, queue_job
from aiaas.services.metering import MeteredCall
from aiaas.services.predictions import PredictionService, Served, records_from
from aiaas.services.registry import RegistryService
from aiaas.specs.preprocessing import PreprocessingSpec, TextStep
from aiaas.specs.shapes import MINILM, TOKENIZER_REF
from aiaas.specs.types import Task
from aiaas.storage.blobs import EncryptedBlobStore
from aiaas.storage.db import Database
from aiaas.storage.repos import jobs as jobs_repo

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from aiaas.training.explain import Attribution, Explainer, Options

log = logging.getLogger("aiaas.explanations")

EXPLANATION = "explanation"  # the job kind
METHODS = (
    "integrated_gradients",
    "shapley_sampling",
    "kernel_shap",
    "occlusion",
    "attention",
    "feature_ablation",
)
GRADIENT_METHODS = frozenset({"integrated_gradients", "attention"})
SAMPLING_METHODS = frozenset({"shapley_sampling", "kernel_shap"})
# What one record's forward pass costs relative to a small MLP's, by network: the unit of
# INLINE_COST. Measured with integrated gradients on the bench's models (bench/explain.py: a
# 16x16 CNN explains ~30x fewer records per second than a 64-64 MLP, a 16-token LSTM ~60x),
# rounded up; MiniLM (128 tokens) is an estimate.
ARCHITECTURE_COST = {
    "mlp": 1,
    "cnn": 30,
    "lstm": 60,
    "transformer-encoder": 60,
    MINILM: 2000,
}
# Above this (records x forward passes per record x ARCHITECTURE_COST) a request is a job: about
# five seconds of one core (an MLP explains ~13,000 records inline with integrated gradients,
# an LSTM ~200, a CNN ~400).
INLINE_COST = 2_000_000
# Usage: each explained record counts as this many items (a prediction counts one).
METHOD_WEIGHT = {
    "integrated_gradients": 5,
    "attention": 5,
    "shapley_sampling": 10,
    "kernel_shap": 10,
    "occlusion": 5,
    "feature_ablation": 2,
}
_CACHED = 4  # explainers kept loaded (torch networks), least recently used out first


@dataclass(frozen=True)
class Explained:
    """An answered request: which version answered, what was asked, one item per record."""

    served: Served
    method: str
    options: dict[str, Any]
    baseline: dict[str, Any]
    output: str  # "logit" | "value"
    items: list[dict[str, Any]]


class ExplanationService:
    def __init__(
        self,
        db: Database,
        blobs: EncryptedBlobStore,
        audit: AuditService,
        predictions: PredictionService,
        registry: RegistryService,
        jobs: JobService,
        *,
        inline_cost: int = INLINE_COST,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._audit = audit
        self._predictions = predictions
        self._registry = registry
        self.jobs = jobs.of_kind(EXPLANATION)
        self._inline_cost = inline_cost
        self._explainers: OrderedDict[str, Explainer] = OrderedDict()
        self._loading: dict[str, asyncio.Task[Explainer]] = {}

    async def explain(
        self,
        *,
        org_id: str,
        project_id: str | None,
        actor: Actor,
        model: str,
        records: list[dict[str, Any]] | None,
        texts: list[str] | None,
        images: list[str] | None,
        method: str,
        options: Mapping[str, Any],
        weight: float = 1.0,
        call: MeteredCall | None = None,
    ) -> Explained | Job:
        """Explain each record, or queue a job when the request is large (the Job)."""
        served = await self._serve(org_id, model, call)
        loaded = served.loaded
        classic = loaded.model
        if not isinstance(classic, ClassicModel):
            raise _imported(method)
        rows = records if records is not None else records_from(classic, texts, images)
        explainer = await self._explainer(served.routed.version, classic)
        resolved = resolve_options(explainer, method, options)
        baseline = explainer.baselines_used(resolved)  # a bad baseline is a 400 here, job or not
        inputs = await loaded.encode_records(rows)  # so are bad records
        cost = len(rows) * explainer.cost(method, resolved) * _architecture_cost(explainer)
        if call is not None:
            call.count(model=model, items=len(rows) * METHOD_WEIGHT[method])
        if cost > self._inline_cost:
            if project_id is None:
                raise InvalidRequest("A job needs a project.", param="model")
            given = {"records": records, "texts": texts, "images": images}
            return await asyncio.to_thread(
                self._queue,
                org_id=org_id,
                project_id=project_id,
                actor=actor,
                model=model,
                served=served,
                inputs={k: v for k, v in given.items() if v is not None},
                count=len(rows),
                method=method,
                options=options_used(explainer, method, resolved),
                architecture=explainer.architecture,
            )
        logits = await loaded.infer(inputs, tenant=org_id, weight=weight)
        predictions = classic.interpret(logits)
        attributions = await asyncio.to_thread(
            explainer.explain, inputs, method, resolved, predicted=logits
        )
        items = await asyncio.to_thread(render, explainer, rows, inputs, predictions, attributions)
        return Explained(
            served=served,
            method=method,
            options=options_used(explainer, method, resolved),
            baseline=baseline,
            output=output_kind(explainer),
            items=items,
        )

    # -- which version answers -------------------------------------------------------------------

    async def _serve(self, org_id: str, model: str, call: MeteredCall | None) -> Served:
        """`model` as /v1/predictions resolves it; failing that, `name@version` or `name@alias`:
        that version of the model deployment `name` serves (grants checked as for any route)."""
        try:
            return await self._predictions.serve(org_id=org_id, name=model, call=call)
        except NotFound:
            name, at, ref = model.rpartition("@")
            if not at or not name or not ref:
                raise
        if ref.isdigit():
            version = int(ref)
        else:
            routed = await self._predictions.route(org_id=org_id, name=name, split=False)
            pinned = await asyncio.to_thread(
                self._registry.resolve,
                org_id=routed.version.org_id,
                model_id=routed.deployment.model_id,
                target=Target(alias=ref),
            )
            version = pinned.version
        if not 1 <= version <= 10**9:
            raise NotFound(f"No version {ref!r} of '{name}'.", param="model")
        return await self._predictions.serve(org_id=org_id, name=name, version=version, call=call)

    async def _explainer(self, version: ModelVersion, served: ClassicModel) -> Explainer:
        """The version's explainer, loaded once (single flight) and kept while used."""
        found = self._explainers.get(version.id)
        if found is not None:
            self._explainers.move_to_end(version.id)
            return found
        task = self._loading.get(version.id)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(load_explainer, self._registry, version, served)
            )
            self._loading[version.id] = task
            task.add_done_callback(lambda _t: self._loading.pop(version.id, None))
        explainer = await asyncio.shield(task)
        self._explainers[version.id] = explainer
        while len(self._explainers) > _CACHED:
            self._explainers.popitem(last=False)
        return explainer

    # -- jobs ------------------------------------------------------------------------------------

    def _queue(
        self,
        *,
        org_id: str,
        project_id: str,
        actor: Actor,
        model: str,
        served: Served,
        inputs: dict[str, Any],
        count: int,
        method: str,
        options: dict[str, Any],
        architecture: str,
    ) -> Job:
        job_id = new_id("expljob", sep="-")
        version = served.routed.version
        key = input_key(org_id, job_id)
        self._blobs.put(org_id, key, [json.dumps(inputs).encode()])
        spec = {
            "model": model,
            "deployment": served.routed.deployment.name,
            "model_id": version.model_id,
            "version": version.version,
            "version_id": version.id,
            "owner_org_id": version.org_id,
            "canary": served.routed.canary,
            "method": method,
            "options": options,
            "records": count,
            "input_blob": key,
        }
        try:
            with self._db.write() as conn:
                job = queue_job(
                    conn,
                    job_id=job_id,
                    org_id=org_id,
                    project_id=project_id,
                    actor=actor,
                    kind=EXPLANATION,
                    model=architecture[:64],
                    dataset_version_id="",
                    task="explanation",
                    target_column="",
                    spec=spec,
                    seed=options.get("seed"),
                )
                jobs_repo.add_event(
                    conn,
                    job_id=job_id,
                    message=f"Queued {method} for {count} records of {version.model_id} "
                    f"version {version.version}.",
                )
                self._audit.record(
                    conn,
                    actor=actor,
                    action="job.created",
                    target_type="job",
                    target_id=job_id,
                    org_id=org_id,
                    project_id=project_id,
                    data={"kind": EXPLANATION, "model": version.model_id, "records": count},
                )
        except BaseException:
            self._blobs.delete(key)
            raise
        self.jobs.wake()
        return job

    def cancel(self, *, org_id: str, job_id: str, actor: Actor) -> Job:
        """Cancel a job; a cancelled job's inputs go at once (a running worker that stops later
        removes them itself)."""
        job = self.jobs.cancel(org_id=org_id, job_id=job_id, actor=actor)
        if job.status is JobStatus.CANCELLED:
            self._blobs.delete(job.spec["input_blob"])
        return job


def input_key(org_id: str, job_id: str) -> str:
    """Where a job's request inputs wait (not under `jobs/`, whose unrecorded blobs the job
    service sweeps)."""
    return f"explanations/{org_id}/{job_id}/input.json"


def _imported(method: str) -> InvalidRequest:
    if method in GRADIENT_METHODS:
        return InvalidRequest(
            f"Method {method!r} needs gradients, and an imported ONNX model has none (no "
            "weights to rebuild its network from).",
            param="method",
            code="gradients_unavailable",
        )
    return InvalidRequest(
        "Explanations are for models trained here; imported models are not supported yet.",
        param="model",
        code="not_supported_for_imported_models",
    )


def _architecture_cost(explainer: Explainer) -> int:
    return ARCHITECTURE_COST.get(explainer.architecture, 60)


# -- loading -------------------------------------------------------------------------------------


def load_explainer(
    registry: RegistryService, version: ModelVersion, served: ClassicModel
) -> Explainer:
    """The version's torch network with its served preprocessing, checked against the served
    graph; a version without weights explains through the served graph itself."""
    from aiaas.training.explain import Explainer  # torch and captum: on first use only

    description = json.loads(registry.read_artifact(version, "model.json"))
    spec = served.preprocessing
    tokenizers = _tokenizers(spec)
    if "model.safetensors" not in version.artifacts:
        return Explainer.onnx(
            description=description, spec=spec, run=served.run, tokenizers=tokenizers
        )
    architecture = description.get("architecture")
    try:
        explainer = Explainer.load(
            description=description,
            spec=spec,
            weights=registry.read_artifact(version, "model.safetensors"),
            pretrained_dir=minilm_l6_v2_dir() if architecture == MINILM else None,
            tokenizers=tokenizers,
        )
    except (KeyError, ValueError, RuntimeError) as exc:  # weights that do not fit model.json
        log.warning("cannot rebuild %s version %s: %s", version.model_id, version.version, exc)
        raise Conflict(
            f"Version {version.version} of '{version.model_id}' cannot be rebuilt from its "
            "weights (model.safetensors) and description (model.json), so it cannot be "
            "explained.",
            param="model",
            code="explanation_inconsistent",
        ) from exc
    explainer.check_against(served.run)
    return explainer


def _tokenizers(spec: PreprocessingSpec) -> dict[str, Tokenizer]:
    wordpiece = any(
        isinstance(step, TextStep) and step.tokenizer == "wordpiece" for step in spec.features
    )
    if not wordpiece:
        return {}
    from tokenizers import Tokenizer

    return {TOKENIZER_REF: Tokenizer.from_file(str(minilm_l6_v2_dir() / "tokenizer.json"))}


# -- options -------------------------------------------------------------------------------------

_APPLIES: dict[str, frozenset[str]] = {
    "n_steps": GRADIENT_METHODS,
    "n_samples": SAMPLING_METHODS,
    "seed": SAMPLING_METHODS,
    "stride": frozenset({"occlusion"}),
    "window": frozenset({"occlusion", "feature_ablation", "shapley_sampling", "kernel_shap"}),
}


def resolve_options(explainer: Explainer, method: str, given: Mapping[str, Any]) -> Options:
    """The method's settings with their defaults; a 400 for an option the method or the
    model does not take."""
    from aiaas.training.explain import DEFAULT_N_STEPS, Options

    if method not in METHODS:
        raise InvalidRequest(
            f"Unknown method {method!r}; use one of: {', '.join(METHODS)}.", param="method"
        )
    for name, methods in _APPLIES.items():
        if given.get(name) is not None and method not in methods:
            raise InvalidRequest(
                f"options.{name} is for {', '.join(sorted(methods))}, not {method}.",
                param=f"options.{name}",
            )
    if given.get("window") is not None and "images" not in explainer.input_names:
        raise InvalidRequest("options.window is for image models.", param="options.window")
    options = Options(
        n_steps=given.get("n_steps") or DEFAULT_N_STEPS,
        baseline=given.get("baseline"),
        target=given.get("target"),
        n_samples=given.get("n_samples"),
        window=given.get("window"),
        stride=given.get("stride"),
        seed=given.get("seed") or 0,
    )
    explainer.check(method, options)
    return options


def options_used(explainer: Explainer, method: str, options: Options) -> dict[str, Any]:
    """The settings a method ran with, defaults filled in, as the answer reports them."""
    from aiaas.training.explain import DEFAULT_N_SAMPLES

    used: dict[str, Any] = {"target": options.target}
    used["baseline"] = (
        options.baseline if options.baseline is not None else _default_baseline(explainer)
    )
    if method in GRADIENT_METHODS:
        used["n_steps"] = options.n_steps
    if method in SAMPLING_METHODS:
        used["n_samples"] = options.n_samples or DEFAULT_N_SAMPLES[method]
        used["seed"] = options.seed
    if "images" in explainer.input_names and method != "integrated_gradients":
        if method != "attention":
            used["window"] = explainer.window(options)
        if method == "occlusion":
            used["stride"] = explainer.stride(options)
    return used


def _default_baseline(explainer: Explainer) -> str:
    if "tabular" in explainer.input_names:
        return "mean"
    if "images" in explainer.input_names:
        return "mean"
    return "pad"


def output_kind(explainer: Explainer) -> str:
    return "value" if explainer.task is Task.REGRESSION else "logit"


# -- rendering -----------------------------------------------------------------------------------


def render(
    explainer: Explainer,
    rows: Sequence[Mapping[str, Any]],
    inputs: Mapping[str, np.ndarray],
    predictions: Sequence[Prediction],
    attributions: Sequence[Attribution],
    *,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """One JSON-ready item per record (`ExplanationItem` in protocol/explanations.py)."""
    from aiaas.training.explain import image_heatmap_png

    classes = explainer.classes or []
    items = []
    for index, (row, prediction, attribution) in enumerate(
        zip(rows, predictions, attributions, strict=True)
    ):
        item: dict[str, Any] = {
            "index": offset + index,
            "prediction": {
                "label": prediction.label,
                "probabilities": prediction.probabilities,
                "value": prediction.value,
            },
            "target": classes[attribution.target]
            if explainer.task is Task.CLASSIFICATION
            else None,
            "output": _finite(attribution.output),
            "baseline_output": _finite(attribution.baseline_output),
            "convergence_delta": _finite(attribution.delta),
        }
        if attribution.columns is not None:
            columns = [
                {"column": column, "value": row.get(column), "attribution": _finite(value)}
                for column, value in zip(explainer.columns, attribution.columns, strict=True)
            ]
            columns.sort(key=lambda c: -abs(c["attribution"] or 0.0))
            item["columns"] = columns
        if attribution.tokens is not None and explainer.text_step is not None:
            column = explainer.text_step.column
            text = row.get(column)
            tokens = explainer.tokens(
                text if isinstance(text, str) else "" if text is None else str(text),
                inputs["tokens"][index],
                inputs["attention"][index],
            )
            weights = attribution.attention
            item["text_column"] = column
            item["tokens"] = [
                {
                    "token": token.text,
                    "start": token.start,
                    "end": token.end,
                    "attribution": _finite(value),
                    "attention": None if weights is None else _finite(weights[position]),
                }
                for position, (token, value) in enumerate(
                    zip(tokens, attribution.tokens, strict=False)
                )
            ]
        if attribution.pixels is not None and explainer.image_step is not None:
            column = explainer.image_step.column
            width, height = _image_size(row.get(column), explainer)
            png = image_heatmap_png(attribution.pixels, (width, height))
            item["image"] = {
                "column": column,
                "width": width,
                "height": height,
                "heatmap_png": _b64(png),
                "heatmap": [[_finite(v) for v in line] for line in attribution.pixels.tolist()],
            }
        items.append(item)
    return items


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _image_size(value: Any, explainer: Explainer) -> tuple[int, int]:
    """The record's image size (width, height), upright as the model saw it."""
    try:
        with Image.open(io.BytesIO(bytes(value))) as opened:
            upright = ImageOps.exif_transpose(opened)
            return upright.size
    except (OSError, ValueError, TypeError):
        _, height, width = explainer.shape.image_shape or (1, 1, 1)
        return width, height
