"""Embeddings use case: validate and tokenise off the loop, batch on the engine, shape the reply."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from aiaas.domain import Grant, GrantPermission, ModelVersion, SharedKind
from aiaas.engines.embeddings.encoder import InMemoryEncoder
from aiaas.engines.embeddings.export import PoolingConfig, minilm_l6_v2_dir
from aiaas.engines.pool import LoadedEmbedder, ModelPool, serve_encoder
from aiaas.errors import InvalidRequest, ModelNotFound, NotFound
from aiaas.observability.metrics import Metrics
from aiaas.protocol.openai import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from aiaas.scheduling.batcher import BatcherConfig
from aiaas.scheduling.fair import SchedulingMode
from aiaas.services.deployments import DeploymentService
from aiaas.services.grants import GrantService
from aiaas.services.metering import MeteredCall, Metering
from aiaas.services.registry import RegistryService

ENCODER = "encoder.onnx"
TOKENIZER = "tokenizer.json"  # an imported encoder's own; fine-tuned MiniLMs use the bundled one
_VERSION_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class _Latest:
    version: ModelVersion
    valid_until: float  # time.monotonic()


class DeployedEncoders:
    """Sentence encoders of an organisation's registry: fine-tuned and imported ones.

    A version that carries an `encoder.onnx` (a MiniLM fine-tuned by a training job, or an
    encoder imported with its tokenizer.json) answers `/v1/embeddings` under the name of a
    deployment serving it, or under its model id (its newest version), for its own organisation
    and those it shares the model with (`use`). The graph is decrypted into memory, tokenised
    with the version's own tokenizer.json (the bundled MiniLM's for fine-tuned ones) and pooled
    as its encoder.json says. The `capacity` most recently used stay loaded.
    """

    def __init__(
        self,
        deployments: DeploymentService,
        registry: RegistryService,
        grants: GrantService,
        *,
        threads: int,
        batch: BatcherConfig,
        capacity: int = 4,
        scheduling: SchedulingMode = "fair",
        cache_s: float = 1.0,
    ) -> None:
        self._scheduling: SchedulingMode = scheduling
        self._deployments = deployments
        self._registry = registry
        self._grants = grants
        self._threads = threads
        self._batch = batch
        self._capacity = capacity
        self._loaded: OrderedDict[str, LoadedEmbedder] = OrderedDict()
        self._load_lock = asyncio.Lock()
        # (org, model id) -> its newest version, for `cache_s`: resolving takes two queries.
        self._cache_s = cache_s
        self._latest: dict[tuple[str, str], _Latest] = {}
        registry.on_change(self._latest.clear)

    async def get(self, org_id: str, name: str) -> tuple[LoadedEmbedder, Grant | None]:
        """The encoder `name` answers with for `org_id`, and the grant it goes through (another
        organisation's deployment or model), if any."""
        version, grant = await self._version(org_id, name)
        if ENCODER not in version.artifacts:
            raise InvalidRequest(
                f"The model '{name}' does not serve embeddings: only sentence encoders "
                "(fine-tuned all-minilm-l6-v2, or imported with format sentence-embedding) do.",
                param="model",
                code="model_not_embedding",
            )
        async with self._load_lock:  # one load at a time: two requests never load one twice
            found = self._loaded.get(version.id)
            if found is None:
                found = await asyncio.to_thread(self._load, version, name)
                self._loaded[version.id] = found
                while len(self._loaded) > self._capacity:
                    _, evicted = self._loaded.popitem(last=False)
                    await asyncio.to_thread(evicted.batcher.close)
            self._loaded.move_to_end(version.id)
        return found, grant

    async def _version(self, org_id: str, name: str) -> tuple[ModelVersion, Grant | None]:
        """The version answering `name`: a deployment's (its own, or `<owner>/<name>` through a
        grant), else the newest of the org's model, else of another org's model it holds a
        `use` grant on (re-checked on every request)."""
        routed = self._deployments.cached_route(org_id=org_id, name=name)
        if routed is not None:
            return routed.version, routed.grant
        cached = self._latest.get((org_id, name))
        if cached is not None and time.monotonic() < cached.valid_until:
            return cached.version, self._granted(org_id, cached.version)
        try:
            routed = await asyncio.to_thread(self._deployments.route, org_id=org_id, name=name)
            return routed.version, routed.grant
        except NotFound as not_deployed:
            version = await asyncio.to_thread(self._newest, org_id, name)
            if version is None:
                raise not_deployed
        grant = self._granted(org_id, version)
        if self._cache_s > 0:
            if len(self._latest) >= _VERSION_CACHE_LIMIT:
                self._latest.clear()
            self._latest[(org_id, name)] = _Latest(version, time.monotonic() + self._cache_s)
        return version, grant

    def _granted(self, org_id: str, version: ModelVersion) -> Grant | None:
        """None for the org's own version; another org's needs a `use` grant (else 404)."""
        if version.org_id == org_id:
            return None
        grant = self._grants.access(
            org_id=org_id,
            kind=SharedKind.MODEL,
            object_id=version.model_id,
            needed=GrantPermission.USE,
            version=version.version,
        )
        if grant is None:
            raise ModelNotFound(f"The model '{version.model_id}' does not exist.", param="model")
        return grant

    def _newest(self, org_id: str, model_id: str) -> ModelVersion | None:
        """The newest version of `model_id` in whichever registry holds it (None: no such
        model); a grant is the caller's to check."""
        owner = self._registry.owner_of(model_id)
        model = owner and self._registry.find_model(org_id=owner, model_id=model_id)
        if not model or model.latest_version is None:
            return None
        try:
            return self._registry.get_version(
                org_id=model.org_id, model_id=model_id, version=model.latest_version
            )
        except NotFound:  # deleted in between
            return None

    def _load(self, version: ModelVersion, name: str) -> LoadedEmbedder:
        about = json.loads(self._registry.read_artifact(version, "encoder.json"))
        tokenizer = (
            self._registry.read_artifact(version, TOKENIZER)
            if TOKENIZER in version.artifacts
            else minilm_l6_v2_dir() / "tokenizer.json"
        )
        return serve_encoder(
            InMemoryEncoder(
                graph=self._registry.read_artifact(version, ENCODER),
                tokenizer=tokenizer,
                pooling=PoolingConfig(**about["pooling"]),
            ),
            id=name,
            threads=self._threads,
            batch=self._batch,
            scheduling=self._scheduling,
            batcher_name=f"embeddings-{version.id}",
            created=int(version.created_at),
        )

    def close(self) -> None:
        for loaded in self._loaded.values():
            loaded.batcher.close()
        self._loaded.clear()


class EmbeddingService:
    def __init__(
        self,
        pool: ModelPool,
        metrics: Metrics,
        metering: Metering,
        deployed: DeployedEncoders | None = None,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._metering = metering
        self._deployed = deployed

    def close(self) -> None:
        if self._deployed is not None:
            self._deployed.close()

    async def _embedder(self, call: MeteredCall, model: str) -> LoadedEmbedder:
        try:
            return self._pool.embedder(model)
        except ModelNotFound:
            org_id = call.principal.org_id
            if org_id is None or self._deployed is None:
                raise
            loaded, grant = await self._deployed.get(org_id, model)
            if grant is not None:  # another organisation's encoder: the grant's caps apply
                await self._metering.through(call, grant)
            return loaded

    async def embed(self, call: MeteredCall, request: EmbeddingRequest) -> EmbeddingList:
        principal = call.principal
        loaded = await self._embedder(call, request.model)
        dimension = loaded.encoder.dimension
        if request.dimensions is not None and request.dimensions > dimension:
            raise InvalidRequest(
                f"dimensions is {request.dimensions}; model '{loaded.id}' has {dimension}.",
                param="dimensions",
            )
        items = request.items()
        if _small(items):  # a few short texts tokenise faster than a hop to a thread
            ids = _token_ids(loaded, items)
        else:
            ids = await asyncio.to_thread(_token_ids, loaded, items)
        org = principal.org_id or "platform"
        vectors = await loaded.batcher.submit(
            ids, tenant=org, weight=principal.weight, background=call.background
        )
        matrix = np.stack(vectors).astype(np.float32, copy=False)
        if request.dimensions is not None and request.dimensions < dimension:
            matrix = _truncate(matrix, request.dimensions)
        tokens = sum(len(i) for i in ids)
        self._metrics.embedding_tokens.labels(model=loaded.id, org=org, kind="prompt").inc(tokens)
        data = [
            Embedding(index=i, embedding=_encode(row, request.encoding_format))
            for i, row in enumerate(matrix)
        ]
        return EmbeddingList(
            data=data,
            model=loaded.id,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )


INLINE_CHARS = 2048


def _small(items: list[str] | list[list[int]]) -> bool:
    size = 0
    for item in items:
        size += len(item)
        if size > INLINE_CHARS:
            return False
    return True


def _token_ids(loaded: LoadedEmbedder, items: list[str] | list[list[int]]) -> list[list[int]]:
    """Texts are tokenised (truncated at the model's length, as sentence-transformers does);
    token-id inputs are checked, since nothing truncates them silently."""
    encoder = loaded.encoder
    if all(isinstance(item, str) for item in items):
        return encoder.tokenize([str(item) for item in items])
    limit, vocab = encoder.max_seq_length, encoder.vocab_size
    for index, item in enumerate(items):
        assert isinstance(item, list)
        if any(not 0 <= token < vocab for token in item):
            raise InvalidRequest(
                f"input[{index}] holds a token id outside the vocabulary (0..{vocab - 1}).",
                param="input",
            )
        if len(item) > limit:
            raise InvalidRequest(
                f"input[{index}] has {len(item)} tokens; '{loaded.id}' takes at most {limit}.",
                param="input",
            )
    return [list(item) for item in items if isinstance(item, list)]


def _truncate(matrix: np.ndarray, dimensions: int) -> np.ndarray:
    """Keep the first `dimensions` components and renormalise (Matryoshka-style)."""
    cut = matrix[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


def _encode(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()
