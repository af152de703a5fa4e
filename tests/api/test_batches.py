"""The Batch API through the official `openai` client: a 200-line chat batch answers what the same
requests answer one by one, bad lines land in the error file, embeddings and predictions batches
match their routes, cancel keeps what was done, another organisation sees nothing, and a server
killed mid-batch resumes without running its finished lines again."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import openai
import pytest

from tests.api.test_fine_tuning import tabular_frame
from tests.conftest import Org, Server, SharedModel, assert_error, create_org

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
SYSTEM = (
    "You are a terse assistant for a museum. Answer with one word or one number, nothing else. "
    "The museum opens at nine and closes at five, and its oldest object is a bronze bell."
)
NEAR_TIE = 1.0  # most two runs' top-two gaps may add up to where greedy decoding parts


@pytest.fixture(scope="module")
def batch_server(make_server: Callable[..., Server]) -> Iterator[Server]:
    """Its own server: the resume test kills it. A short heartbeat timeout lets a restarted
    server take its batch back at once."""
    server = make_server(
        "sqlite",
        models=f"{CHAT},{EMBED}",
        llm_slots="8",
        llm_kv_cells="8192",
        llm_context_length="1024",
        batch_concurrency="8",
        job_heartbeat_timeout_s="2",
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def owner(batch_server: Server) -> Org:
    return create_org(batch_server)


def client(server: Server, org: Org) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=org.api_key, max_retries=0, timeout=60
    )


def upload(api: openai.OpenAI, lines: list[dict[str, Any]] | bytes) -> str:
    raw = lines if isinstance(lines, bytes) else "\n".join(json.dumps(x) for x in lines).encode()
    return api.files.create(file=("batch.jsonl", raw), purpose="batch").id


def line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def wait(
    api: openai.OpenAI, batch_id: str, until: Callable[[Any], bool], timeout: float = 600
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = api.batches.retrieve(batch_id)
        if until(batch):
            return batch
        time.sleep(0.25)
    raise AssertionError(f"batch {batch_id} still {batch.status}: {batch}")


def finished(batch: Any) -> bool:
    return batch.status in {"completed", "failed", "expired", "cancelled"}


def records(api: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in api.files.content(file_id).text.splitlines() if x.strip()]


def question(i: int) -> dict[str, Any]:
    topics = ["bell", "clock", "map", "coin", "vase", "sword", "harp", "lamp", "mask", "ship"]
    return {
        "model": CHAT,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"How many {topics[i % 10]}s are in room {i}?"},
        ],
        "temperature": 0,
        "max_tokens": 6,
        "logprobs": True,
        "top_logprobs": 2,
    }


def tokens(body: dict[str, Any]) -> list[tuple[str, list[tuple[str, float]]]]:
    content = body["choices"][0]["logprobs"]["content"]
    return [(t["token"], [(x["token"], x["logprob"]) for x in t["top_logprobs"]]) for t in content]


def same_greedy_answer(got: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Equal tokens, or equal up to a position where both runs were a near-tie and swapped their
    top two (continuous batching may round attention differently from a request alone)."""
    a, b = tokens(got), tokens(expected)
    for (tok_a, top_a), (tok_b, top_b) in zip(a, b, strict=False):
        if tok_a == tok_b:
            continue
        gap_a = top_a[0][1] - top_a[1][1] if len(top_a) > 1 else float("inf")
        gap_b = top_b[0][1] - top_b[1][1] if len(top_b) > 1 else float("inf")
        swapped = {top_a[0][0], top_a[1][0]} == {top_b[0][0], top_b[1][0]}
        return swapped and gap_a + gap_b <= NEAR_TIE
    return len(a) == len(b)


@pytest.mark.slow
def test_a_chat_batch_answers_as_the_same_requests_one_by_one(
    batch_server: Server, owner: Org
) -> None:
    api = client(batch_server, owner)
    lines = [line(f"q-{i:03d}", "/v1/chat/completions", question(i)) for i in range(200)]
    lines.insert(50, line("bad-model", "/v1/chat/completions", {**question(0), "model": "nope"}))
    lines.insert(120, line("bad-body", "/v1/chat/completions", {**question(1), "top_p": 7}))
    batch = api.batches.create(
        input_file_id=upload(api, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"purpose": "test"},
    )
    assert batch.status == "validating" and batch.metadata == {"purpose": "test"}
    done = wait(api, batch.id, finished)
    assert done.status == "completed", done
    assert done.request_counts.total == 202
    assert (done.request_counts.completed, done.request_counts.failed) == (200, 2)

    output = records(api, done.output_file_id)
    errors = records(api, done.error_file_id)
    assert [r["custom_id"] for r in output] == [f"q-{i:03d}" for i in range(200)]  # input order
    assert [r["custom_id"] for r in errors] == ["bad-model", "bad-body"]
    assert errors[0]["response"]["status_code"] == 404
    assert errors[0]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors[1]["response"]["status_code"] == 400
    assert errors[1]["response"]["body"]["error"]["param"] == "top_p"
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in output)
    usage = [r["response"]["body"]["usage"] for r in output]
    assert done.usage.input_tokens == sum(u["prompt_tokens"] for u in usage)
    assert done.usage.output_tokens == sum(u["completion_tokens"] for u in usage)
    # One shared system prompt: lines after the first read it from the prefix cache.
    assert done.usage.input_tokens_details.cached_tokens > 100 * 40

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        alone = list(
            pool.map(lambda i: api.chat.completions.create(**question(i)).model_dump(), range(200))
        )
    matches = [
        same_greedy_answer(r["response"]["body"], expected)
        for r, expected in zip(output, alone, strict=True)
    ]
    assert all(matches), [r["custom_id"] for r, ok in zip(output, matches, strict=True) if not ok]
    # Usage: the lines are metered with the batch flag, apart from the requests sent alone.
    with batch_server.client(owner.api_key) as http:
        summary = http.get(
            "/v1/usage",
            params={"start_time": int(done.created_at) - 3600, "group_by": ["batch", "endpoint"]},
        ).json()
    rows = [r for b in summary["data"] for r in b["results"] if r["endpoint"] == "chat.completions"]
    by_flag = {r["batch"]: r["num_model_requests"] for r in rows}
    assert by_flag[True] == 202 and by_flag[False] == 200


def test_embeddings_batch_gives_the_route_s_vectors(batch_server: Server, owner: Org) -> None:
    api = client(batch_server, owner)
    texts = ["a bronze bell", "the museum closes at five", "a ship in a bottle"]
    lines = [
        line(f"e-{i}", "/v1/embeddings", {"model": EMBED, "input": t}) for i, t in enumerate(texts)
    ]
    lines.append(line("e-many", "/v1/embeddings", {"model": EMBED, "input": texts}))
    batch = api.batches.create(
        input_file_id=upload(api, lines), endpoint="/v1/embeddings", completion_window="24h"
    )
    done = wait(api, batch.id, finished)
    assert done.status == "completed" and done.error_file_id is None
    output = {r["custom_id"]: r["response"]["body"] for r in records(api, done.output_file_id)}
    direct = api.embeddings.create(model=EMBED, input=texts)
    for i, item in enumerate(direct.data):
        np.testing.assert_allclose(
            output[f"e-{i}"]["data"][0]["embedding"], item.embedding, atol=1e-5
        )
        np.testing.assert_allclose(
            output["e-many"]["data"][i]["embedding"], item.embedding, atol=1e-5
        )
    assert done.usage.input_tokens == 2 * direct.usage.prompt_tokens
    with batch_server.client(owner.api_key) as http:  # over: it cannot be cancelled
        assert_error(http.post(f"/v1/batches/{batch.id}/cancel"), 400, "batch_not_cancellable")


def test_predictions_batch_matches_the_route(server: Server, shared_model: SharedModel) -> None:
    """On both database backends: the batch tables and parts on SQLite and PostgreSQL."""
    owner = shared_model.owner
    api = client(server, owner)
    frame = tabular_frame(12, seed=5).drop(columns=["label"])
    rows = frame.to_dict(orient="records")
    name = shared_model.deployment["name"]
    lines = [
        line(f"p-{i}", "/v1/predictions", {"model": name, "records": [r]})
        for i, r in enumerate(rows)
    ]
    lines.append(
        line("p-none", "/v1/predictions", {"model": "no-such-deployment", "records": rows[:1]})
    )
    batch = api.batches.create(
        input_file_id=upload(api, lines), endpoint="/v1/predictions", completion_window="24h"
    )
    done = wait(api, batch.id, finished, timeout=300)
    assert done.status == "completed"
    counts = (done.request_counts.completed, done.request_counts.failed)
    assert counts == (12, 1), records(api, done.error_file_id)[:2]
    with server.client(owner.api_key) as http:
        direct = http.post("/v1/predictions", json={"model": name, "records": rows}).json()
    output = records(api, done.output_file_id)
    for i, record in enumerate(output):
        [item] = record["response"]["body"]["data"]
        assert item["label"] == direct["data"][i]["label"]
        assert item["probabilities"] == pytest.approx(direct["data"][i]["probabilities"], abs=1e-5)
    [error] = records(api, done.error_file_id)
    assert error["custom_id"] == "p-none" and error["response"]["status_code"] == 404


def test_an_unusable_input_file_fails_the_batch_naming_its_lines(
    batch_server: Server, owner: Org
) -> None:
    api = client(batch_server, owner)
    good = line("a", "/v1/embeddings", {"model": EMBED, "input": "x"})
    raw = b"\n".join(
        [
            json.dumps(good).encode(),
            b"{not json",
            json.dumps(line("b", "/v1/chat/completions", {"model": CHAT})).encode(),
            json.dumps(good).encode(),  # custom_id "a" again
            json.dumps({**good, "custom_id": "c", "method": "GET"}).encode(),
        ]
    )
    batch = api.batches.create(
        input_file_id=upload(api, raw), endpoint="/v1/embeddings", completion_window="24h"
    )
    done = wait(api, batch.id, finished)
    assert done.status == "failed" and done.output_file_id is None
    found = {(e.line, e.code) for e in done.errors.data}
    assert found == {
        (2, "invalid_request"),
        (3, "mismatched_endpoint"),
        (4, "duplicate_custom_id"),
        (5, "invalid_request"),
    }
    empty = api.batches.create(
        input_file_id=upload(api, b"\n\n"), endpoint="/v1/embeddings", completion_window="24h"
    )
    assert [e.code for e in wait(api, empty.id, finished).errors.data] == ["empty_file"]

    with batch_server.client(owner.api_key) as http:
        not_batch = http.post(
            "/v1/files",
            files={"file": ("x.jsonl", b'{"a": 1}\n')},
            data={"purpose": "user_data"},
        ).json()["id"]
        body = {
            "input_file_id": not_batch,
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
        }
        assert_error(http.post("/v1/batches", json=body), 400)
        assert_error(http.post("/v1/batches", json={**body, "input_file_id": "file-nope"}), 404)
        assert_error(http.post("/v1/batches", json={**body, "endpoint": "/v1/files"}), 400)
        assert_error(http.post("/v1/batches", json={**body, "completion_window": "0h"}), 400)
        refused = http.post(
            "/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch_output"}
        )
        assert_error(refused, 400)


def test_another_organisation_sees_no_batch(batch_server: Server, owner: Org) -> None:
    api = client(batch_server, owner)
    lines = [line("a", "/v1/embeddings", {"model": EMBED, "input": "private text"})]
    batch = api.batches.create(
        input_file_id=upload(api, lines), endpoint="/v1/embeddings", completion_window="24h"
    )
    done = wait(api, batch.id, finished)
    other = create_org(batch_server)
    with batch_server.client(other.api_key) as http:
        assert_error(http.get(f"/v1/batches/{batch.id}"), 404)
        assert_error(http.post(f"/v1/batches/{batch.id}/cancel"), 404)
        assert_error(http.get(f"/v1/files/{done.output_file_id}/content"), 404)
        assert all(b["id"] != batch.id for b in http.get("/v1/batches").json()["data"])
        # Nor may it run a batch on the owner's file.
        body = {"input_file_id": batch.input_file_id, "endpoint": "/v1/embeddings"}
        assert_error(http.post("/v1/batches", json=body), 404)
    assert [b.id for b in api.batches.list(limit=100).data].count(batch.id) == 1


def long_lines(n: int, prefix: str) -> list[dict[str, Any]]:
    return [
        line(
            f"{prefix}-{i:03d}",
            "/v1/completions",
            {
                "model": CHAT,
                "prompt": f"Story {i}: Once upon a time",
                "max_tokens": 32,
                "temperature": 0,
            },
        )
        for i in range(n)
    ]


@pytest.mark.slow
def test_cancel_keeps_what_was_done_and_names_the_rest(batch_server: Server, owner: Org) -> None:
    api = client(batch_server, owner)
    lines = long_lines(150, "c")
    batch = api.batches.create(
        input_file_id=upload(api, lines), endpoint="/v1/completions", completion_window="24h"
    )
    wait(api, batch.id, lambda b: b.request_counts.completed >= 8)
    cancelling = api.batches.cancel(batch.id)
    assert cancelling.status in {"cancelling", "cancelled"}
    done = wait(api, batch.id, finished)
    assert done.status == "cancelled" and done.cancelled_at is not None
    output, errors = records(api, done.output_file_id), records(api, done.error_file_id)
    assert len(output) >= 8
    assert sorted(r["custom_id"] for r in output + errors) == [x["custom_id"] for x in lines]
    assert errors and all(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert done.request_counts.failed == len(errors)
    assert api.batches.cancel(batch.id).status == "cancelled"  # again: nothing changes


@pytest.mark.slow
def test_a_killed_server_resumes_its_batch_without_rerunning_finished_lines(
    batch_server: Server, owner: Org
) -> None:
    """Last in the module: it kills the module's server."""
    api = client(batch_server, owner)
    lines = long_lines(80, "k")
    batch = api.batches.create(
        input_file_id=upload(api, lines), endpoint="/v1/completions", completion_window="24h"
    )
    before = wait(api, batch.id, lambda b: b.request_counts.completed >= 16).request_counts
    assert batch_server.process is not None
    os.kill(batch_server.process.pid, signal.SIGKILL)
    batch_server.process.wait()
    batch_server.process = None
    restarted = time.time()
    batch_server.start()
    api = client(batch_server, owner)
    done = wait(api, batch.id, finished)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (80, 0)
    output = records(api, done.output_file_id)
    assert [r["custom_id"] for r in output] == [x["custom_id"] for x in lines]
    # Lines recorded before the kill did not run again: the restarted server ran at most the
    # rest (usage records of batch lines started after the restart).
    with batch_server.client(owner.api_key) as http:
        summary = http.get(
            "/v1/usage",
            params={
                "start_time": int(restarted),
                "bucket_width": "1h",
                "group_by": ["batch", "endpoint"],
            },
        ).json()
    rerun = sum(
        r["num_model_requests"]
        for b in summary["data"]
        for r in b["results"]
        if r["batch"] and r["endpoint"] == "completions"
    )
    assert 0 < rerun <= 80 - before.completed
