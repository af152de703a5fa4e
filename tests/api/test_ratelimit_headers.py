"""OpenAI's `x-ratelimit-*` headers, on answers and on the 429 that refuses a request (issue 29),
read the way clients read them: the official `openai` client's raw responses.

OpenAI sends `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on a 429 as well as on a
success; clients back off by them. A level without a cap of a kind sends none of that kind.
"""

from __future__ import annotations

import re

import openai
import pytest

from tests.conftest import Org, Server, create_org

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
HI = [{"role": "user", "content": "Say hi."}]
RESET = re.compile(r"(?:(\d+)m)?(?:([0-9.]+)s)?(?:(\d+)ms)?")


def _seconds(value: str) -> float:
    """`120ms`, `7.5s`, `1m30s` as seconds."""
    match = RESET.fullmatch(value)
    assert match and value, value
    minutes, seconds, millis = match.groups()
    return int(minutes or 0) * 60 + float(seconds or 0) + int(millis or 0) / 1000


def _client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def _key(server: Server, org: Org, **rate_limits: int) -> str:
    with server.client(org.api_key) as client:
        made = client.post("/v1/api_keys", json={"name": "capped", "rate_limits": rate_limits})
    assert made.status_code == 201, made.text
    return str(made.json()["value"])


def _chat(client: openai.OpenAI) -> dict[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=HI, max_tokens=2
    )
    assert raw.parse().choices  # a real answer came with the headers
    return dict(raw.headers)


def _refusal(client: openai.OpenAI) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=HI, max_tokens=2
        )
    assert info.value.code == "rate_limit_exceeded"
    return info.value


def test_a_429_for_requests_carries_the_request_headers(llm_server: Server) -> None:
    client = _client(llm_server, _key(llm_server, create_org(llm_server), requests_per_minute=2))
    first, second = _chat(client), _chat(client)
    assert (first["x-ratelimit-limit-requests"], first["x-ratelimit-remaining-requests"]) == (
        "2",
        "1",
    )
    assert second["x-ratelimit-remaining-requests"] == "0"
    assert 0 < _seconds(first["x-ratelimit-reset-requests"]) <= 60
    assert not any(name.endswith("-tokens") for name in first)  # no token cap: none of those

    refused = _refusal(client)
    headers = refused.response.headers
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    reset = _seconds(headers["x-ratelimit-reset-requests"])
    assert 0 < reset <= 60
    # Retry-After is the same wait, rounded up to whole seconds.
    assert int(headers["retry-after"]) - 1 <= reset <= int(headers["retry-after"])
    assert "x-ratelimit-limit-tokens" not in headers


def test_a_429_for_tokens_carries_both_kinds(llm_server: Server) -> None:
    org = create_org(llm_server)
    key = _key(llm_server, org, tokens_per_minute=30, requests_per_minute=100)
    client = _client(llm_server, key)
    first = _chat(client)
    assert first["x-ratelimit-limit-tokens"] == "30"
    assert first["x-ratelimit-remaining-tokens"] == "30"  # tokens are charged when a call ends
    assert first["x-ratelimit-remaining-requests"] == "99"
    refusal: openai.RateLimitError | None = None
    answered = 1
    for _ in range(30):  # spend the minute's tokens (each call uses more than two)
        try:
            _chat(client)
            answered += 1
        except openai.RateLimitError as refused:
            refusal = refused
            break
    assert refusal is not None and refusal.type == "tokens"
    headers = refusal.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "30"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert 0 < _seconds(headers["x-ratelimit-reset-tokens"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "100"
    # The refusal is not counted against the requests.
    assert headers["x-ratelimit-remaining-requests"] == str(100 - answered)
    assert int(headers["retry-after"]) >= 1


def test_embeddings_answers_carry_them_too(llm_server: Server) -> None:
    client = _client(llm_server, _key(llm_server, create_org(llm_server), requests_per_minute=5))
    raw = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=["one"])
    assert raw.parse().data
    assert raw.headers["x-ratelimit-limit-requests"] == "5"
    assert raw.headers["x-ratelimit-remaining-requests"] == "4"


def test_an_uncapped_key_gets_none(llm_server: Server) -> None:
    headers = _chat(_client(llm_server, create_org(llm_server).api_key))
    assert not any(name.startswith("x-ratelimit-") for name in headers)
