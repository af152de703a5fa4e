"""Embeddings use case: validate and tokenise off the loop, batch on the engine, shape the reply."""

from __future__ import annotations

import base64

import numpy as np
from starlette.concurrency import run_in_threadpool

from aiaas.domain import Principal
from aiaas.engines.pool import LoadedEmbedder, ModelPool
from aiaas.errors import InvalidRequest
from aiaas.observability.metrics import Metrics
from aiaas.protocol.openai import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage


class EmbeddingService:
    def __init__(self, pool: ModelPool, metrics: Metrics) -> None:
        self._pool = pool
        self._metrics = metrics

    async def embed(self, principal: Principal, request: EmbeddingRequest) -> EmbeddingList:
        loaded = self._pool.embedder(request.model)
        dimension = loaded.encoder.dimension
        if request.dimensions is not None and request.dimensions > dimension:
            raise InvalidRequest(
                f"dimensions is {request.dimensions}; model '{loaded.id}' has {dimension}.",
                param="dimensions",
            )
        ids = await run_in_threadpool(_token_ids, loaded, request.items())
        org = principal.org_id or "platform"
        vectors = await loaded.batcher.submit(ids, tenant=org)
        matrix = np.stack(vectors).astype(np.float32, copy=False)
        if request.dimensions is not None and request.dimensions < dimension:
            matrix = _truncate(matrix, request.dimensions)
        tokens = sum(len(i) for i in ids)
        self._metrics.llm_tokens.labels(model=loaded.id, org=org, kind="prompt").inc(tokens)
        data = [
            Embedding(index=i, embedding=_encode(row, request.encoding_format))
            for i, row in enumerate(matrix)
        ]
        return EmbeddingList(
            data=data,
            model=loaded.id,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )


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
