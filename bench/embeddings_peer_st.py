"""The plain baseline for `bench/embeddings.py`: sentence-transformers behind a minimal FastAPI.

No batching across requests and no queue: each request's sentences go through one
`SentenceTransformer.encode` call. A lock lets one call run at a time, each on the model's
`EMBEDDINGS_PEER_THREADS` torch threads (2 by default); without it, the 32 worker threads of
FastAPI's pool would run 32 forwards at once, each with its own OpenMP team, on 2 cores.

    EMBEDDINGS_PEER_MODEL=/path/to/st-folder .venv/bin/python -m uvicorn \\
        embeddings_peer_st:app --app-dir bench --port 8000 --no-access-log
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer

torch.set_num_threads(int(os.environ.get("EMBEDDINGS_PEER_THREADS", "2")))
_model_path = os.environ["EMBEDDINGS_PEER_MODEL"]
_model = SentenceTransformer(_model_path, device="cpu")
_lock = threading.Lock()

app = FastAPI()


class EmbeddingRequest(BaseModel):
    model: str = ""
    input: str | list[str]


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/embeddings")
def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    with _lock, torch.inference_mode():
        vectors = _model.encode(texts, batch_size=32, convert_to_numpy=True)
    return {
        "object": "list",
        "model": body.model or _model_path,
        "data": [
            {"object": "embedding", "index": i, "embedding": vector.tolist()}
            for i, vector in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }
