"""Rate limits, quotas and usage metering, through the real server and the openai client.

Limits are tested with the `limits` library's memory backend (the shared LLM server) and with
Redis (a server of its own, `AIAAS_REDIS_URL`); every test uses fresh organisations, so their
counters never meet.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.cli.test_train_cli import run
from tests.conftest import Org, Server, assert_error, create_org, require_service

CHAT_MODEL = "smollm2-135m-instruct"
BASE_MODEL = "gemma-3-270m"
EMBEDDING_MODEL = "all-minilm-l6-v2"
HI = [{"role": "user", "content": "Say hi."}]
SMOLLM_NO_END = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>


@pytest.fixture(scope="module")
def redis_url() -> str:
    return require_service("AIAAS_TEST_REDIS_URL", "Redis")


@pytest.fixture(scope="module")
def redis_server(make_server: Callable[..., Server], redis_url: str) -> Iterator[Server]:
    srv = make_server("sqlite", models=CHAT_MODEL, redis_url=redis_url)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(params=["memory", "redis"])
def limited_server(request: pytest.FixtureRequest) -> Server:
    """A server whose rate limits count in memory, or in Redis."""
    name = "llm_server" if request.param == "memory" else "redis_server"
    server: Server = request.getfixturevalue(name)
    return server


def _openai(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def _operator_sets(server: Server, org: Org, **changes: Any) -> dict[str, Any]:
    with server.client(server.admin_key) as admin:
        response = admin.post(f"/v1/organizations/{org.id}", json=changes)
    assert response.status_code == 200, response.text
    return response.json()


def _new_key(server: Server, org: Org, **body: Any) -> str:
    with server.client(org.api_key) as client:
        response = client.post("/v1/api_keys", json={"name": "limited", **body})
    assert response.status_code == 201, response.text
    return str(response.json()["value"])


def _chat(server: Server, key: str) -> httpx.Response:
    with server.client(key) as client:
        return client.post(
            "/v1/chat/completions", json={"model": CHAT_MODEL, "messages": HI, "max_tokens": 2}
        )


def test_requests_per_minute_hold_per_key_and_apart_between_orgs(limited_server: Server) -> None:
    org, other = create_org(limited_server), create_org(limited_server)
    limited = _new_key(limited_server, org, rate_limits={"requests_per_minute": 2})
    sibling = _new_key(limited_server, org)  # same org and project, no cap of its own

    first = _chat(limited_server, limited)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert re.fullmatch(
        r"[0-9.]+(ms|s)|[0-9]+m[0-9]+s", first.headers["x-ratelimit-reset-requests"]
    )
    assert _chat(limited_server, limited).status_code == 200

    refused = _chat(limited_server, limited)
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "requests"
    assert "API key" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    # The openai client sees a RateLimitError (with retries off).
    with pytest.raises(openai.RateLimitError):
        _openai(limited_server, limited).chat.completions.create(
            model=CHAT_MODEL, messages=HI, max_tokens=2
        )

    # The cap is the key's own: its sibling, and another organisation, are untouched.
    assert _chat(limited_server, sibling).status_code == 200
    assert _chat(limited_server, other.api_key).status_code == 200
    assert "x-ratelimit-limit-requests" not in _chat(limited_server, other.api_key).headers


def test_redis_holds_the_counters(redis_server: Server, redis_url: str) -> None:
    import redis

    org = create_org(redis_server)
    key = _new_key(redis_server, org, rate_limits={"requests_per_minute": 5})
    key_id = "key_" + key.removeprefix("sk-aiaas-").split("-")[0]
    assert _chat(redis_server, key).status_code == 200
    stored = redis.Redis.from_url(redis_url).keys(f"*{key_id}*")
    assert stored, "the key's request counter is not in Redis"


def test_org_and_project_limits_cover_all_their_keys(limited_server: Server) -> None:
    org = create_org(limited_server)
    body = _operator_sets(limited_server, org, rate_limits={"requests_per_minute": 3})
    assert body["rate_limits"]["requests_per_minute"] == 3
    keys = [_new_key(limited_server, org) for _ in range(2)]
    assert [_chat(limited_server, keys[i % 2]).status_code for i in range(3)] == [200] * 3
    error = assert_error(_chat(limited_server, keys[1]), 429, "rate_limit_exceeded")
    assert "organization" in error["message"]

    # A project's cap counts its keys together, within the same organisation.
    org = create_org(limited_server)
    with limited_server.client(org.api_key) as client:
        project = client.post("/v1/projects", json={"name": "capped"}).json()
        updated = client.post(
            f"/v1/projects/{project['id']}",
            json={"rate_limits": {"requests_per_minute": 1}},
        )
    assert updated.status_code == 200, updated.text
    assert updated.json()["rate_limits"]["requests_per_minute"] == 1
    in_project = [_new_key(limited_server, org, project_id=project["id"]) for _ in range(2)]
    assert _chat(limited_server, in_project[0]).status_code == 200
    assert_error(_chat(limited_server, in_project[1]), 429, "rate_limit_exceeded")
    assert _chat(limited_server, org.api_key).status_code == 200  # the default project


def test_tokens_per_minute(limited_server: Server) -> None:
    org = create_org(limited_server)
    _operator_sets(limited_server, org, rate_limits={"tokens_per_minute": 40})
    first = _chat(limited_server, org.api_key)
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    assert first.headers["x-ratelimit-limit-tokens"] == "40"
    second = _chat(limited_server, org.api_key)  # tokens are charged when a request ends
    assert second.status_code == 200
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == max(0, 40 - used)
    # Two requests spent more than 40 tokens: the minute is used up.
    error = assert_error(_chat(limited_server, org.api_key), 429, "rate_limit_exceeded")
    assert error["type"] == "tokens"


def test_concurrent_requests_cap(limited_server: Server) -> None:
    org = create_org(limited_server)
    key = _new_key(limited_server, org, rate_limits={"max_concurrent_requests": 1})
    body = {
        "model": CHAT_MODEL,
        "messages": HI,
        "max_tokens": 1000,
        "stream": True,
        "logit_bias": SMOLLM_NO_END,  # it streams until the client leaves
    }
    with (
        limited_server.client(key) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()  # held: a finished iterator would close the stream
        assert next(line for line in lines if line.startswith("data:"))
        error = assert_error(_chat(limited_server, key), 429, "rate_limit_exceeded")
        assert "concurrent" in error["message"]
    # The stream ended (the client left): its place is free again.
    deadline = time.monotonic() + 30
    while (response := _chat(limited_server, key)).status_code == 429:
        assert time.monotonic() < deadline, "the concurrency count was never released"
        time.sleep(0.1)
    assert response.status_code == 200


def test_monthly_quotas_hold_and_survive_a_restart(redis_server: Server) -> None:
    org = create_org(redis_server)
    _operator_sets(redis_server, org, quotas={"monthly_requests": 2})
    assert [_chat(redis_server, org.api_key).status_code for _ in range(2)] == [200, 200]
    error = assert_error(_chat(redis_server, org.api_key), 429, "insufficient_quota")
    assert error["type"] == "insufficient_quota"
    with pytest.raises(openai.RateLimitError) as info:
        _openai(redis_server, org.api_key).chat.completions.create(
            model=CHAT_MODEL, messages=HI, max_tokens=2
        )
    assert info.value.code == "insufficient_quota"

    redis_server.stop()
    redis_server.start()
    assert_error(_chat(redis_server, org.api_key), 429, "insufficient_quota")
    # Raising the quota lets the organisation in again.
    _operator_sets(redis_server, org, quotas={"monthly_requests": 3})
    assert _chat(redis_server, org.api_key).status_code == 200

    org = create_org(redis_server)
    _operator_sets(redis_server, org, quotas={"monthly_tokens": 10})
    assert _chat(redis_server, org.api_key).status_code == 200  # more than 10 tokens
    assert_error(_chat(redis_server, org.api_key), 429, "insufficient_quota")


def test_only_the_operator_sets_weight_limits_and_quotas(llm_server: Server) -> None:
    org = create_org(llm_server)
    with llm_server.client(org.api_key) as own_admin:
        for change in (
            {"weight": 5},
            {"rate_limits": {"requests_per_minute": 1000}},
            {"quotas": {"monthly_tokens": 10**9}},
        ):
            assert_error(
                own_admin.post(f"/v1/organizations/{org.id}", json=change),
                403,
                "insufficient_permissions",
            )
        assert own_admin.post(f"/v1/organizations/{org.id}", json={"redact_pii": True}).is_success
    body = _operator_sets(llm_server, org, weight=2.5, quotas={"monthly_requests": 10})
    assert body["weight"] == 2.5 and body["quotas"]["monthly_requests"] == 10
    assert body["redact_pii"] is True  # untouched by an update that leaves it out
    body = _operator_sets(llm_server, org, quotas={})
    assert body["quotas"] == {"monthly_tokens": None, "monthly_requests": None}
    with llm_server.client(llm_server.admin_key) as admin:
        for change in (
            {"weight": 0},
            {"rate_limits": {"requests_per_minute": 0}},
            {"rate_limits": {"rpm": 5}},
            {"quotas": {"monthly_tokens": -1}},
        ):
            assert_error(admin.post(f"/v1/organizations/{org.id}", json=change), 400)


def _usage(server: Server, key: str, **params: Any) -> dict[str, Any]:
    with server.client(key) as client:
        response = client.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_metered_totals_equal_the_usage_returned_to_clients(llm_server: Server) -> None:
    org = create_org(llm_server)
    client = _openai(llm_server, org.api_key)
    expected: dict[str, list[int]] = {}  # model -> [requests, input, output, items]

    def add(model: str, prompt: int, completion: int, items: int = 0) -> None:
        totals = expected.setdefault(model, [0, 0, 0, 0])
        for i, value in enumerate((1, prompt, completion, items)):
            totals[i] += value

    chat = client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=8)
    assert chat.usage is not None
    add(CHAT_MODEL, chat.usage.prompt_tokens, chat.usage.completion_tokens)
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=HI,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    last = [chunk for chunk in stream][-1]
    assert last.usage is not None
    add(CHAT_MODEL, last.usage.prompt_tokens, last.usage.completion_tokens)
    completion = client.completions.create(
        model=BASE_MODEL, prompt=["The sky is", "Water is"], max_tokens=5, n=2
    )
    assert completion.usage is not None
    add(BASE_MODEL, completion.usage.prompt_tokens, completion.usage.completion_tokens)
    embedded = client.embeddings.create(model=EMBEDDING_MODEL, input=["one", "two words", "3"])
    add(EMBEDDING_MODEL, embedded.usage.prompt_tokens, 0, items=3)
    with pytest.raises(openai.NotFoundError):  # a failed request is metered as an error
        client.chat.completions.create(model="no-such-model", messages=HI)

    page = _usage(llm_server, org.api_key, group_by=["model"])
    latest = page["data"][-1]
    assert page["object"] == "page" and len(page["data"]) == 7 and not page["has_more"]
    assert all(not bucket["results"] for bucket in page["data"][:-1])
    found = {r["model"]: r for r in latest["results"]}
    for model, (requests, prompt, output, items) in expected.items():
        assert model in found, found
        result = found[model]
        assert (
            result["num_model_requests"],
            result["input_tokens"],
            result["output_tokens"],
            result["input_items"],
            result["num_errors"],
        ) == (requests, prompt, output, items, 0), model
    assert found["no-such-model"]["num_errors"] == 1

    # Grouped by endpoint and key; another organisation sees none of it.
    today = int(time.time()) // 86400 * 86400
    page = _usage(
        llm_server, org.api_key, group_by=["endpoint", "api_key_id"], start_time=today, limit=1
    )
    (bucket,) = page["data"]
    endpoints = {r["endpoint"]: r["num_model_requests"] for r in bucket["results"]}
    assert endpoints == {"chat.completions": 3, "completions": 1, "embeddings": 1}
    assert {r["api_key_id"] for r in bucket["results"]} == {_key_id(llm_server, org)}
    other = create_org(llm_server)
    assert not _usage(llm_server, other.api_key, start_time=today)["data"][0]["results"]

    # The CLI reads the same numbers.
    shown = run(llm_server, org.api_key, "usage", "--days", "1", "--group-by", "model", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)["data"][-1]["results"]
    assert {r["model"]: r["input_tokens"] for r in rows if r["model"]} == {
        m: t[1] for m, t in expected.items()
    } | {"no-such-model": 0}


def _key_id(server: Server, org: Org) -> str:
    with server.client(org.api_key) as client:
        keys = client.get("/v1/api_keys").json()["data"]
    return str(keys[0]["id"])


def test_usage_rejects_bad_queries(llm_server: Server) -> None:
    org = create_org(llm_server)
    with llm_server.client(org.api_key) as client:
        for params in (
            {"bucket_width": "1w"},
            {"group_by": "colour"},
            {"start_time": 2000, "end_time": 1000},
            {"limit": 0},
            {"bucket_width": "1d", "limit": 100},
            {"page": "x"},
        ):
            assert_error(client.get("/v1/usage", params=params), 400)
    reader = _new_key(llm_server, org, role="reader")
    with llm_server.client(reader) as client:
        assert_error(client.get("/v1/usage"), 403)


def test_metrics_carry_org_and_model(llm_server: Server) -> None:
    org = create_org(llm_server)
    _operator_sets(llm_server, org, rate_limits={"requests_per_minute": 1})
    client = _openai(llm_server, org.api_key)
    client.embeddings.create(model=EMBEDDING_MODEL, input=["metrics"])
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model=EMBEDDING_MODEL, input=["metrics"])
    with llm_server.client(llm_server.admin_key) as admin:
        text = admin.get("/metrics").text
    labels = f'endpoint="embeddings",model="{EMBEDDING_MODEL}",org="{org.id}"'
    assert f'aiaas_inference_requests_total{{{labels},status="200"}} 1.0' in text
    assert f"aiaas_inference_request_duration_seconds_count{{{labels}}} 1.0" in text
    assert f'aiaas_rate_limited_total{{org="{org.id}",reason="requests"}} 1.0' in text
    assert re.search(rf'aiaas_batch_size_bucket\{{le="\+Inf",model="{EMBEDDING_MODEL}"\}}', text)
    assert f'aiaas_batcher_queue_depth{{model="{EMBEDDING_MODEL}"}}' in text
