"""`/v1/optimisations`: int8, pruned and graph-optimised variants of a trained model, each
registered as a new version and measured against its parent on the same test split."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
import onnx
import openai
import pytest
from safetensors.numpy import load as load_safetensors

from tests.api.test_fine_tuning import (
    api,
    keyword_csv,
    make_dataset,
    registered_version,
    tabular_csv,
    train,
    wait_until,
)
from tests.cli.test_train_cli import run
from tests.conftest import Org, Server, assert_error, create_org

# The documented bound: an int8 variant loses at most this much accuracy on the test split.
INT8_ACCURACY_DROP = 0.05
VARIANTS = [
    {"method": "dynamic_int8"},
    {"method": "static_int8"},
    {"method": "onnx_optimized"},
    {"method": "prune", "sparsity": 0.6, "fine_tune_epochs": 1},
    {"method": "prune", "sparsity": 0.5, "structured": True, "fine_tune_epochs": 1},
    {"method": "dynamic_int8", "engine": "torch"},
]


def wait_for_optimisation(server: Server, org: Org, job_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        with server.client(org.api_key) as http:
            body = dict(http.get(f"/v1/optimisations/{job_id}").json())
        assert body["status"] not in ("failed", "cancelled"), body
        return body if body["status"] == "succeeded" else None

    return wait_until(check, what=f"optimisation {job_id}")


@pytest.fixture(scope="module")
def optimised(sqlite_server: Server) -> dict[str, Any]:
    """An MLP (wide enough for int8 to matter) trained once, then every variant made of it."""
    org = create_org(sqlite_server)
    dataset = make_dataset(sqlite_server, org, "points.csv", tabular_csv(rows=600))
    job = train(
        api(sqlite_server, org),
        dataset["version"]["id"],
        n_epochs=4,
        architecture={"hidden_sizes": [256, 256]},
    )
    parent = registered_version(sqlite_server, org, job)
    with sqlite_server.client(org.api_key) as http:
        created = http.post(
            "/v1/optimisations", json={"model": job.fine_tuned_model, "variants": VARIANTS}
        )
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "queued"
    done = wait_for_optimisation(sqlite_server, org, created.json()["id"])
    return {
        "server": sqlite_server,
        "org": org,
        "model": job.fine_tuned_model,
        "parent": parent,
        "job": done,
    }


def _version(ctx: dict[str, Any], number: int) -> dict[str, Any]:
    with ctx["server"].client(ctx["org"].api_key) as http:
        response = http.get(f"/v1/models/{ctx['model']}/versions/{number}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _artifact(ctx: dict[str, Any], number: int, name: str) -> bytes:
    with ctx["server"].client(ctx["org"].api_key) as http:
        response = http.get(f"/v1/models/{ctx['model']}/versions/{number}/artifacts/{name}")
    assert response.status_code == 200, response.text
    return response.content


@pytest.mark.slow
def test_every_variant_is_a_measured_child_version(optimised: dict[str, Any]) -> None:
    result = optimised["job"]["result"]
    parent = result["parent"]
    assert parent["version"] == optimised["parent"]["version"] == 1
    assert result["split"] == "test" and result["rows"] > 0
    rows = result["variants"]
    assert [r["method"] for r in rows] == [v["method"] for v in VARIANTS]
    assert [r["version"] for r in rows] == [2, 3, 4, 5, 6, 7]
    for row in rows:
        for field in ("size_bytes", "latency_p50_ms", "latency_p95_ms", "throughput_rows_per_s"):
            assert row[field] > 0, (row["method"], field)
        assert row["latency_p95_ms"] >= row["latency_p50_ms"]
        assert set(row["metrics"]) >= {"accuracy", "f1_macro"}
        assert row["compared_to_parent"]["size_ratio"] == pytest.approx(
            row["size_bytes"] / parent["size_bytes"], rel=1e-3
        )
        version = _version(optimised, row["version"])
        assert version["lineage"]["parent_version"] == 1
        assert version["lineage"]["optimisation"] == row["method"]
        assert version["metrics"]["optimisation"]["method"] == row["method"]
        assert version["metrics"]["summary"]["accuracy"] == row["metrics"]["accuracy"]


@pytest.mark.slow
def test_int8_is_smaller_and_within_the_documented_accuracy_drop(
    optimised: dict[str, Any],
) -> None:
    result = optimised["job"]["result"]
    parent = result["parent"]
    assert parent["metrics"]["accuracy"] >= 0.9
    for row in result["variants"][:2]:
        assert row["size_bytes"] < 0.5 * parent["size_bytes"], row["method"]
        drop = parent["metrics"]["accuracy"] - row["metrics"]["accuracy"]
        assert drop <= INT8_ACCURACY_DROP, (row["method"], drop)
        graph = onnx.load_from_string(_artifact(optimised, row["version"], "model.onnx"))
        ops = {node.op_type for node in graph.graph.node}
        assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "QLinearMatMul"}


@pytest.mark.slow
def test_pytorch_int8_is_kept_as_int8_safetensors(optimised: dict[str, Any]) -> None:
    result = optimised["job"]["result"]
    row = result["variants"][5]
    assert (row["engine"], row["deployable"]) == ("torch", False)
    assert row["size_bytes"] < 0.5 * result["parent"]["size_bytes"]
    assert (
        result["parent"]["metrics"]["accuracy"] - row["metrics"]["accuracy"] <= INT8_ACCURACY_DROP
    )
    tensors = load_safetensors(_artifact(optimised, row["version"], "model.int8.safetensors"))
    int8 = [name for name, t in tensors.items() if t.dtype == np.int8]
    assert int8 and all(f"{n.removesuffix('.int8')}.scale" in tensors for n in int8)
    with optimised["server"].client(optimised["org"].api_key) as http:
        response = http.get(f"/v1/models/{optimised['model']}/versions/{row['version']}/bundle")
    assert_error(response, 400)  # no ONNX graph: it runs under torch only


@pytest.mark.slow
def test_pruned_versions_have_the_requested_sparsity(optimised: dict[str, Any]) -> None:
    unstructured, structured = optimised["job"]["result"]["variants"][3:5]
    assert unstructured["sparsity"] >= 0.6 - 1e-3
    assert structured["sparsity"] >= 0.45  # whole rows of each layer but the output layer
    weights = load_safetensors(_artifact(optimised, unstructured["version"], "model.safetensors"))
    hidden = _hidden_matrices(weights)
    zeros = sum(int((w == 0).sum()) for w in hidden)
    assert zeros / sum(w.size for w in hidden) == pytest.approx(unstructured["sparsity"], abs=1e-6)
    rows = load_safetensors(_artifact(optimised, structured["version"], "model.safetensors"))
    first = _hidden_matrices(rows)[0]
    assert (np.abs(first).sum(axis=1) == 0).mean() >= 0.45  # whole output units removed


def _hidden_matrices(weights: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The MLP's weight matrices in layer order (head.0, head.3, ...), without the output layer
    (pruning leaves it whole)."""
    named = [(n, w) for n, w in weights.items() if n.endswith(".weight") and w.ndim == 2]
    named.sort(key=lambda item: int(item[0].split(".")[1]))
    return [w for _, w in named[:-1]]


@pytest.mark.slow
def test_a_variant_deploys_and_predicts_like_its_parent(optimised: dict[str, Any]) -> None:
    server, org = optimised["server"], optimised["org"]
    optimized = optimised["job"]["result"]["variants"][2]
    records = [
        {"a": 1.2, "b": 0.7, "noise": 0.1, "color": "red", "y": 2.0},
        {"a": -1.0, "b": -0.9, "noise": 0.3, "color": "blue", "y": -1.0},
    ]
    labels = {}
    with server.client(org.api_key) as http:
        for number in (1, optimized["version"]):
            name = f"v{number}-{org.name}"
            deployed = http.post(
                "/v1/deployments",
                json={"model": optimised["model"], "version": number, "name": name},
            )
            assert deployed.status_code in (200, 201), deployed.text
            answer = http.post("/v1/predictions", json={"model": name, "records": records})
            assert answer.status_code == 200, answer.text
            labels[number] = [item["label"] for item in answer.json()["data"]]
        bundle = http.get(f"/v1/models/{optimised['model']}/versions/{optimized['version']}/bundle")
    assert labels[1] == labels[optimized["version"]] == ["yes", "no"]
    assert bundle.status_code == 200
    assert any(
        n.endswith("model.onnx") for n in zipfile.ZipFile(io.BytesIO(bundle.content)).namelist()
    )


@pytest.mark.slow
def test_metrics_count_jobs_by_org_and_state(optimised: dict[str, Any]) -> None:
    server, org = optimised["server"], optimised["org"]
    with server.client(server.admin_key) as admin:
        text = admin.get("/metrics").text
    # The training job and the optimisation job.
    assert f'aiaas_jobs{{org="{org.id}",state="succeeded"}} 2.0' in text


@pytest.mark.slow
def test_the_cli_prints_the_comparison_table(optimised: dict[str, Any]) -> None:
    shown = run(
        optimised["server"], optimised["org"].api_key, "optimise", "show", optimised["job"]["id"]
    )
    assert shown.returncode == 0, shown.stderr
    for word in ("dynamic_int8", "static_int8", "prune", "parent", "size", "accuracy"):
        assert word in shown.stdout


def test_bad_optimisation_requests_are_4xx(sqlite_server: Server) -> None:
    org, other = create_org(sqlite_server), create_org(sqlite_server)
    with sqlite_server.client(org.api_key) as http:
        for body, status in (
            ({"model": "ft:none", "variants": [{"method": "dynamic_int8"}]}, 404),
            ({"model": "x", "variants": []}, 400),
            ({"model": "x", "variants": [{"method": "fp4"}]}, 400),
            ({"model": "x", "variants": [{"method": "prune"}]}, 400),
            ({"model": "x", "variants": [{"method": "prune", "sparsity": 1.5}]}, 400),
            ({"model": "x", "variants": [{"method": "dynamic_int8", "bits": 4}]}, 400),
            ({"model": "x", "version": 0, "variants": [{"method": "dynamic_int8"}]}, 400),
        ):
            assert_error(http.post("/v1/optimisations", json=body), status)
        assert_error(http.get("/v1/optimisations/optjob-nope"), 404)
        assert http.get("/v1/optimisations").json()["data"] == []
    # Another organisation's model is not there at all; nor is its job.
    dataset = make_dataset(sqlite_server, other, "words.csv", keyword_csv(rows=120))
    job = train(api(sqlite_server, other), dataset["version"]["id"], "lstm", n_epochs=1)
    with sqlite_server.client(org.api_key) as http:
        response = http.post(
            "/v1/optimisations",
            json={"model": job.fine_tuned_model, "variants": [{"method": "dynamic_int8"}]},
        )
        assert_error(response, 404)
    with sqlite_server.client(other.api_key) as http:
        missing = http.post(
            "/v1/optimisations",
            json={
                "model": job.fine_tuned_model,
                "version": 7,
                "variants": [{"method": "dynamic_int8"}],
            },
        )
        assert_error(missing, 404)
        # A training job is not an optimisation, and the other way round.
        assert_error(http.get(f"/v1/optimisations/{job.id}"), 404)


@pytest.mark.slow
def test_a_gguf_llm_is_requantised_and_measured(llm_server: Server) -> None:
    org = create_org(llm_server)
    variants = [{"method": "gguf", "quant_type": "Q8_0"}, {"method": "gguf", "quant_type": "Q4_0"}]
    with llm_server.client(org.api_key) as http:
        created = http.post(
            "/v1/optimisations", json={"model": "smollm2-135m-instruct", "variants": variants}
        )
        assert created.status_code == 200, created.text
        assert created.json()["version"] is None
    done = wait_for_optimisation(llm_server, org, created.json()["id"])
    result = done["result"]
    parent, q8, q4 = result["parent"], *result["variants"]
    assert parent["model"] == "smollm2-135m-instruct"
    # The source is Q4_1: Q8_0 is larger and about as good, Q4_0 smaller and a little worse.
    assert q8["size_bytes"] > parent["size_bytes"] > q4["size_bytes"]
    assert q8["metrics"]["perplexity"] == pytest.approx(parent["metrics"]["perplexity"], rel=0.1)
    assert q4["metrics"]["perplexity"] > q8["metrics"]["perplexity"]
    for row in (parent, q8, q4):
        assert row["throughput_tokens_per_s"] > 0 and row["latency_p50_ms"] > 0
        assert row["tokens_scored"] > 0
    name = f"gguf:smollm2-135m-instruct:{org.name}"
    with llm_server.client(org.api_key) as http:
        versions = http.get(f"/v1/models/{name}/versions").json()["data"]
    by_number = {v["version"]: v for v in versions}
    assert by_number[q8["version"]]["lineage"]["quant_type"] == "Q8_0"
    assert by_number[q4["version"]]["artifacts"][0]["name"] == "model.gguf"
    # The newest re-quantised version is served by its model id, decrypted into memory.
    client = openai.OpenAI(base_url=f"{llm_server.base_url}/v1", api_key=org.api_key, max_retries=0)
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert reply.model == name and reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    # Another organisation cannot call it: 404, as if it did not exist.
    other = create_org(llm_server)
    with llm_server.client(other.api_key) as http:
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
        assert_error(http.post("/v1/chat/completions", json=body), 404, "model_not_found")
    shown = run(llm_server, org.api_key, "optimise", "show", done["id"])
    assert shown.returncode == 0 and "Q8_0" in shown.stdout and "perplexity" in shown.stdout


def test_gguf_variants_only_fit_gguf_llms(llm_server: Server) -> None:
    org = create_org(llm_server)
    q8 = {"method": "gguf", "quant_type": "Q8_0"}
    with llm_server.client(org.api_key) as http:
        for body, status in (
            ({"model": "no-such-llm", "variants": [q8]}, 404),
            ({"model": "all-minilm-l6-v2", "variants": [q8]}, 404),
            ({"model": "smollm2-135m-instruct", "variants": [q8, {"method": "static_int8"}]}, 400),
            ({"model": "smollm2-135m-instruct", "version": 2, "variants": [q8]}, 400),
            ({"model": "smollm2-135m-instruct", "variants": [{**q8, "quant_type": "Q9"}]}, 400),
            ({"model": "smollm2-135m-instruct", "variants": [q8], "eval_text": ""}, 400),
        ):
            assert_error(http.post("/v1/optimisations", json=body), status)
