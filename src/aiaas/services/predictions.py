"""Predictions from deployed models: routing, loading on first use, batching, interpreting.

A request names a deployment; the deployment service picks the version that answers (its target,
or its canary); the classic pool gives that version's ONNX model, loading it on first use and
evicting the least recently used under the memory budget; the model's batcher merges concurrent
requests. Blocking work (database reads, artifact decryption, ONNX loading) runs in threads.
A version is a model trained here (model.json + preprocessing.json) or an organisation's own
ONNX graph imported with a declared signature (signature.json), served alike.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from dataclasses import dataclass

import numpy as np

from aiaas.domain import Deployment, ModelVersion
from aiaas.engines.classic.imported import ImportedModel
from aiaas.engines.classic.model import ClassicModel, Prediction
from aiaas.engines.classic.pool import ClassicPool, LoadedClassic, ServedModel
from aiaas.errors import InvalidRequest
from aiaas.observability.metrics import Metrics
from aiaas.protocol.oip import InferenceRequest
from aiaas.protocol.predictions import PredictionItem, PredictionResponse
from aiaas.scheduling.batcher import BatcherStats
from aiaas.services.deployments import DeploymentService, Routed
from aiaas.services.metering import MeteredCall, Metering
from aiaas.services.registry import RegistryService
from aiaas.specs.preprocessing import ImageStep, PreprocessingSpec, TextStep
from aiaas.specs.signature import ModelSignature

log = logging.getLogger("aiaas.predictions")

SIGNATURE = "signature.json"  # an imported ONNX model's declared inputs and output


@dataclass(frozen=True, slots=True)
class Served:
    routed: Routed
    loaded: LoadedClassic


class PredictionService:
    def __init__(
        self,
        deployments: DeploymentService,
        registry: RegistryService,
        pool: ClassicPool,
        metrics: Metrics,
        metering: Metering,
        *,
        threads: int,
    ) -> None:
        self._deployments = deployments
        self._metering = metering
        self._registry = registry
        self._pool = pool
        self._metrics = metrics
        self._threads = threads
        self._warming: dict[str, asyncio.Task[LoadedClassic]] = {}

    async def serve(
        self,
        *,
        org_id: str,
        name: str,
        version: int | None = None,
        split: bool = True,
        call: MeteredCall | None = None,
    ) -> Served:
        """The model that answers a request to deployment `name`, loaded (without `split`, the
        deployment's own target, never its canary). A metered `call` to another organisation's
        deployment goes through its grant's caps first, and is attributed to it."""
        routed = await self.route(org_id=org_id, name=name, version=version, split=split)
        if call is not None:
            await self._metering.through(call, routed.grant)
        chosen = routed.version
        loaded = await self._pool.get(chosen.id, lambda: self._load(chosen))
        return Served(routed, loaded)

    async def infer(
        self,
        *,
        org_id: str,
        name: str,
        version: int | None,
        request: InferenceRequest,
        weight: float = 1.0,
        call: MeteredCall | None = None,
    ) -> tuple[Served, np.ndarray]:
        """An Open Inference Protocol request: its tensors, checked against the model that
        answers, in; that model's logits out."""
        served = await self.serve(org_id=org_id, name=name, version=version, call=call)
        model = served.loaded.model
        inputs = request.tensors(
            {t.name: t.datatype for t in model.inputs}, {t.name for t in model.outputs}
        )
        logits = await served.loaded.infer(inputs, tenant=org_id, weight=weight)
        self._count(served, org_id, "oip", len(logits))
        return served, logits

    async def predict(
        self,
        *,
        org_id: str,
        name: str,
        records: list[dict[str, object]] | None,
        texts: list[str] | None,
        images: list[str] | None,
        weight: float = 1.0,
        call: MeteredCall | None = None,
    ) -> tuple[Served, list[Prediction]]:
        served = await self.serve(org_id=org_id, name=name, call=call)
        model = served.loaded.model
        rows = records if records is not None else records_from(model, texts, images)
        inputs = await served.loaded.encode_records(rows)
        logits = await served.loaded.infer(
            inputs,
            tenant=org_id,
            weight=weight,
            background=call is not None and call.background,
        )
        self._count(served, org_id, "predictions", len(logits))
        return served, model.interpret(logits)

    async def respond(
        self,
        *,
        org_id: str,
        model: str,
        records: list[dict[str, object]] | None,
        texts: list[str] | None,
        images: list[str] | None,
        weight: float,
        call: MeteredCall,
    ) -> PredictionResponse:
        """`/v1/predictions`' answer (the route's and a batch line's): predictions of the
        version that answered, counted on the call."""
        served, results = await self.predict(
            org_id=org_id,
            name=model,
            records=records,
            texts=texts,
            images=images,
            weight=weight,
            call=call,
        )
        call.count(model=model, items=len(results))
        version = served.routed.version
        return PredictionResponse(
            model=model,
            model_version=version.version,
            model_version_id=version.id,
            registered_model=version.model_id,
            canary=served.routed.canary,
            data=[
                PredictionItem(index=i, label=p.label, probabilities=p.probabilities, value=p.value)
                for i, p in enumerate(results)
            ],
        )

    def _count(self, served: Served, org_id: str, route: str, rows: int) -> None:
        self._metrics.predictions.labels(
            model=served.routed.deployment.name,
            version=str(served.routed.version.version),
            org=org_id,
            route=route,
        ).inc(rows)

    def batcher_stats(self) -> list[tuple[str, BatcherStats]]:
        """Each loaded model's batcher, by registry key (model id and version)."""
        return self._pool.batcher_stats()

    def pool_stats(self) -> tuple[int, int, int]:
        entries = [e for e in self._pool.entries() if e.state == "ready"]
        return len(entries), sum(e.memory_bytes for e in entries), self._pool.evictions()

    async def route(
        self, *, org_id: str, name: str, version: int | None = None, split: bool = True
    ) -> Routed:
        if version is None and split:
            cached = self._deployments.cached_route(org_id=org_id, name=name)
            if cached is not None:
                return cached
        return await asyncio.to_thread(
            self._deployments.route, org_id=org_id, name=name, version=version, split=split
        )

    async def ready_all(self, *, org_id: str, name: str, version: int | None) -> bool:
        """Whether every version that may answer (target and canary) is loaded; asking starts
        loading the ones that are not."""
        versions = await asyncio.to_thread(
            self._deployments.serving, org_id=org_id, name=name, version=version
        )
        missing = [v for v in versions if not self.ready(v)]
        for found in missing:
            self.warm(found)
        return not missing

    async def versions(self, *, org_id: str, deployment: Deployment) -> list[int]:
        return await asyncio.to_thread(self._deployments.versions, deployment=deployment)

    def ready(self, version: ModelVersion) -> bool:
        return self._pool.loaded(version.id)

    def warm(self, version: ModelVersion) -> None:
        """Start loading a version in the background (readiness probes ask for this)."""
        if self._pool.loaded(version.id) or version.id in self._warming:
            return
        task = asyncio.get_running_loop().create_task(
            self._pool.get(version.id, lambda: self._load(version))
        )
        self._warming[version.id] = task
        task.add_done_callback(self._warmed)

    def _warmed(self, task: asyncio.Task[LoadedClassic]) -> None:
        for key, known in list(self._warming.items()):
            if known is task:
                del self._warming[key]
        if not task.cancelled() and task.exception() is not None:
            log.warning("loading a model for a readiness probe failed: %s", task.exception())

    def close(self) -> None:
        self._pool.close()

    def _load(self, version: ModelVersion) -> ServedModel:
        if SIGNATURE in version.artifacts:  # an imported ONNX model, served by its signature
            return ImportedModel.load(
                onnx=self._registry.read_artifact(version, "model.onnx"),
                signature=ModelSignature.model_validate_json(
                    self._registry.read_artifact(version, SIGNATURE)
                ),
                threads=self._threads,
            )
        if "model.json" not in version.artifacts:
            raise _not_predictive(version)
        description = json.loads(self._registry.read_artifact(version, "model.json"))
        spec = PreprocessingSpec.model_validate_json(
            self._registry.read_artifact(version, "preprocessing.json")
        )
        return ClassicModel.load(
            onnx=self._registry.read_artifact(version, "model.onnx"),
            description=description,
            preprocessing=spec,
            threads=self._threads,
        )


def _not_predictive(version: ModelVersion) -> InvalidRequest:
    """A deployed version that predictions cannot serve: an imported LLM or sentence encoder."""
    if "model.gguf" in version.artifacts:
        where = "a language model: call it by its id on /v1/chat/completions or /v1/completions"
    elif "encoder.onnx" in version.artifacts:
        where = "a sentence encoder: call it on /v1/embeddings"
    else:
        where = (
            f"not a model /v1/predictions serves (it has {', '.join(sorted(version.artifacts))})"
        )
    return InvalidRequest(
        f"Version {version.version} of '{version.model_id}' is {where}.",
        param="model",
        code="model_not_predictive",
    )


def records_from(
    model: ServedModel, texts: list[str] | None, images: list[str] | None
) -> list[dict[str, object]]:
    """Texts or images as records of the model's one text or image column."""
    spec = model.preprocessing
    if spec is None:  # an imported model: its inputs are tensors
        names = ", ".join(repr(name) for name in model.input_names)
        raise InvalidRequest(
            f"This model takes tensors: send records mapping {names} to numbers (or nested "
            "lists of numbers), not texts or images.",
            param="texts" if texts is not None else "images",
        )
    if texts is not None:
        column = _only_column(spec, TextStep, "texts")
        return [{column: text} for text in texts]
    assert images is not None
    column = _only_column(spec, ImageStep, "images")
    decoded = []
    for index, text in enumerate(images):
        try:
            decoded.append({column: base64.b64decode(text, validate=True)})
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"images[{index}] is not base64", param="images") from exc
    return decoded


def _only_column(spec: PreprocessingSpec, kind: type, what: str) -> str:
    columns = [step.column for step in spec.features if isinstance(step, kind)]
    others = [step.column for step in spec.features if not isinstance(step, kind)]
    if len(columns) != 1 or others:
        raise InvalidRequest(
            f"This model takes the columns {[s.column for s in spec.features]}: send records "
            f"instead of {what}.",
            param=what,
        )
    return columns[0]
