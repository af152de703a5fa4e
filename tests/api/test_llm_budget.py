"""LLMs on demand under a memory budget: loads, unloads, pinning and the admin routes.

One server with both bundled LLMs and a budget that holds either but not both (the two measure
about 0.4 and 0.7 GiB here), so every switch between them unloads the other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, assert_error, create_org

SMOL, GEMMA = "smollm2-135m-instruct", "gemma-3-270m"
BUDGET_MB = 1000


@pytest.fixture(scope="module")
def budget_server(make_server: Callable[..., Server]) -> Iterator[Server]:
    server = make_server(
        "sqlite",
        models=f"{SMOL},{GEMMA}",
        llm_slots="4",
        llm_kv_cells="4096",
        llm_context_length="1024",
        llm_memory_budget_mb=str(BUDGET_MB),
    )
    server.start()
    yield server
    server.stop()


def metrics(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with server.client(server.admin_key) as http:
        text = http.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def resident(found: dict[Any, float]) -> dict[str, float]:
    return {
        dict(labels)["model"]: v
        for (name, labels), v in found.items()
        if name == "aiaas_llm_resident_bytes"
    }


def complete(server: Server, key: str, model: str, **extra: Any) -> openai.types.Completion:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)
    return client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0, **extra
    )


def test_alternating_models_load_and_unload_within_the_budget(budget_server: Server) -> None:
    org = create_org(budget_server)
    before = metrics(budget_server)
    for model in (SMOL, GEMMA, SMOL, GEMMA):
        reply = complete(budget_server, org.api_key, model)
        assert reply.model == model and reply.choices[0].text
        now = metrics(budget_server)
        held = resident(now)
        assert list(held) == [model]  # the other was unloaded to make room
        assert sum(held.values()) <= BUDGET_MB << 20
    after = metrics(budget_server)
    for model in (SMOL, GEMMA):
        assert (
            value(after, "aiaas_llm_loads_total", model=model)
            - value(before, "aiaas_llm_loads_total", model=model)
            >= 1
        )
        assert (
            value(after, "aiaas_llm_unloads_total", model=model, reason="budget")
            - value(before, "aiaas_llm_unloads_total", model=model, reason="budget")
            >= 1
        )
        assert value(after, "aiaas_llm_load_seconds_count", model=model) >= 1
    assert value(after, "aiaas_llm_memory_budget_bytes") == BUDGET_MB << 20


def test_a_stream_is_never_cut_by_the_unload_its_neighbour_needs(budget_server: Server) -> None:
    org = create_org(budget_server)
    complete(budget_server, org.api_key, SMOL)  # SMOL is the one loaded
    client = openai.OpenAI(
        base_url=f"{budget_server.base_url}/v1", api_key=org.api_key, max_retries=0
    )
    stream = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Count from one to fifty in words."}],
        max_tokens=64,
        stream=True,
    )
    first = next(iter(stream))  # the stream runs: SMOL is busy
    other: dict[str, Any] = {}

    def call_gemma() -> None:
        try:
            other["reply"] = complete(budget_server, org.api_key, GEMMA)
        except Exception as exc:  # reported below, on the test's thread
            other["error"] = exc

    thread = threading.Thread(target=call_gemma)
    thread.start()
    chunks = [first, *stream]
    thread.join(timeout=120)
    assert "error" not in other, other.get("error")
    assert other["reply"].choices[0].text
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish in (["stop"], ["length"])  # it ended by itself, not cut
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert list(resident(metrics(budget_server))) == [GEMMA]


def test_admins_load_and_unload(budget_server: Server) -> None:
    org = create_org(budget_server)
    with budget_server.client(budget_server.admin_key) as admin:
        loaded = admin.post(f"/v1/models/{SMOL}/load")
        assert loaded.status_code == 200, loaded.text
        body = loaded.json()
        assert body["loaded"] is True and body["id"] == SMOL
        assert body["resident_bytes"] > 80 << 20  # at least its GGUF's weights
        unloaded = admin.post(f"/v1/models/{SMOL}/unload")
        assert unloaded.status_code == 200 and unloaded.json()["loaded"] is False
        assert SMOL not in resident(metrics(budget_server))
        assert_error(admin.post("/v1/models/no-such-llm/load"), 404, "model_not_found")
    with budget_server.client(org.api_key) as http:
        # An organisation admin may warm a model up, not unload one every org uses.
        assert http.post(f"/v1/models/{SMOL}/load").json()["loaded"] is True
        assert_error(http.post(f"/v1/models/{SMOL}/unload"), 403)
    # The listing still offers a model that is not loaded: it loads on demand.
    with budget_server.client(org.api_key) as http:
        ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert {SMOL, GEMMA} <= ids


def test_an_unload_is_refused_while_the_model_serves(budget_server: Server) -> None:
    org = create_org(budget_server)
    client = openai.OpenAI(
        base_url=f"{budget_server.base_url}/v1", api_key=org.api_key, max_retries=0
    )
    stream = client.completions.create(
        model=SMOL, prompt="Once upon a time", max_tokens=48, stream=True
    )
    chunks = [next(iter(stream))]
    with budget_server.client(budget_server.admin_key) as admin:
        assert_error(admin.post(f"/v1/models/{SMOL}/unload"), 409, "model_busy")
    chunks += list(stream)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
