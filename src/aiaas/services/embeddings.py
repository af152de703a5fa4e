"""Embeddings use case: validate and tokenise off the loop, batch on the engine, shape the reply."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import OrderedDict

import numpy as np

from aiaas.domain import ModelVersion, Principal
from aiaas.engines.embeddings.encoder import InMemoryEncoder
from aiaas.engines.embeddings.export import PoolingConfig, minilm_l6_v2_dir
from aiaas.engines.pool import LoadedEmbedder, ModelPool, serve_encoder
from aiaas.errors import InvalidRequest, ModelNotFound
from aiaas.observability.metrics import Metrics
from aiaas.protocol.openai import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from aiaas.scheduling.batcher import BatcherConfig
from aiaas.scheduling.fair import SchedulingMode
from aiaas.services.deployments import DeploymentService
from aiaas.services.registry import RegistryService

ENCODER = "encoder.onnx"


class DeployedEncoders:
    """Fine-tuned sentence encoders served from their organisation's deployments.

    A deployment whose version carries an `encoder.onnx` (a MiniLM fine-tuned by a training job)
    answers `/v1/embeddings` under its name: the graph is decrypted into memory, tokenised and
    pooled exactly like the bundled encoder. The `capacity` most recently used stay loaded.
    """

    def __init__(
        self,
        deployments: DeploymentService,
        registry: RegistryService,
        *,
        threads: int,
        batch: BatcherConfig,
        capacity: int = 4,
        scheduling: SchedulingMode = "fair",
    ) -> None:
        self._scheduling: SchedulingMode = scheduling
        self._deployments = deployments
        self._registry = registry
        self._threads = threads
        self._batch = batch
        self._capacity = capacity
        self._loaded: OrderedDict[str, LoadedEmbedder] = OrderedDict()
        self._load_lock = asyncio.Lock()

    async def get(self, org_id: str, name: str) -> LoadedEmbedder:
        routed = self._deployments.cached_route(
            org_id=org_id, name=name
        ) or await asyncio.to_thread(self._deployments.route, org_id=org_id, name=name)
        version = routed.version
        if ENCODER not in version.artifacts:
            raise InvalidRequest(
                f"The model '{name}' does not serve embeddings: only fine-tuned sentence "
                "encoders (all-minilm-l6-v2) do.",
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
        return found

    def _load(self, version: ModelVersion, name: str) -> LoadedEmbedder:
        about = json.loads(self._registry.read_artifact(version, "encoder.json"))
        return serve_encoder(
            InMemoryEncoder(
                graph=self._registry.read_artifact(version, ENCODER),
                tokenizer=minilm_l6_v2_dir() / "tokenizer.json",
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
        self, pool: ModelPool, metrics: Metrics, deployed: DeployedEncoders | None = None
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._deployed = deployed

    def close(self) -> None:
        if self._deployed is not None:
            self._deployed.close()

    async def _embedder(self, principal: Principal, model: str) -> LoadedEmbedder:
        try:
            return self._pool.embedder(model)
        except ModelNotFound:
            if principal.org_id is None or self._deployed is None:
                raise
            return await self._deployed.get(principal.org_id, model)

    async def embed(self, principal: Principal, request: EmbeddingRequest) -> EmbeddingList:
        loaded = await self._embedder(principal, request.model)
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
        vectors = await loaded.batcher.submit(ids, tenant=org, weight=principal.weight)
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
