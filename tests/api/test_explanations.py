"""`/v1/explanations` through HTTP, on models trained and deployed here from generated data
where the truth is known: a column, a quadrant or a word decides the class, so "the explanation
found it" is a clear threshold. Each model is trained once per module (a few epochs).
"""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aiaas.protocol.explanations import ExplanationResponse
from tests.api.test_fine_tuning import api, keyword_csv, make_dataset, train, wait_until
from tests.api.test_imports import SIGNATURE, classifier_onnx, import_multipart
from tests.cli.test_train_cli import run as cli
from tests.conftest import Org, Server, assert_error, create_org


@dataclass(frozen=True)
class Deployed:
    server: Server
    org: Org
    model: str  # the deployment's name: the model id

    def post(self, body: dict[str, Any], key: str | None = None) -> Any:
        with self.server.client(key or self.org.api_key) as http:
            return http.post("/v1/explanations", json={"model": self.model, **body}, timeout=120)

    def explain(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.post(body)
        assert response.status_code == 200, response.text
        return dict(response.json())


def deploy(server: Server, org: Org, data: bytes, filename: str, model: str, **options: Any) -> str:
    dataset = make_dataset(server, org, filename, data, **options.pop("dataset", {}))
    job = train(api(server, org), dataset["version"]["id"], model, **options)
    assert job.fine_tuned_model is not None
    with server.client(org.api_key) as http:
        response = http.post("/v1/deployments", json={"model": job.fine_tuned_model})
    assert response.status_code in (200, 201), response.text
    return job.fine_tuned_model


# -- tabular: the label depends on `key` only ----------------------------------------------------


def key_frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    key = rng.normal(size=rows)
    key = key + 0.6 * np.sign(key)
    return pd.DataFrame(
        {
            "noise1": rng.normal(size=rows).round(3),
            "key": key.round(3),
            "noise2": rng.normal(size=rows).round(3),
            "color": rng.choice(["red", "green", "blue"], rows),
            "label": np.where(key > 0, "yes", "no"),
        }
    )


def records(count: int, seed: int = 1) -> list[dict[str, Any]]:
    frame = key_frame(count, seed).drop(columns=["label"])
    return [dict(row) for row in frame.to_dict(orient="records")]


@pytest.fixture(scope="module")
def tabular(sqlite_server: Server) -> Deployed:
    org = create_org(sqlite_server)
    data = key_frame(300, seed=0).to_csv(index=False).encode()
    model = deploy(sqlite_server, org, data, "key.csv", "mlp", n_epochs=12)
    return Deployed(sqlite_server, org, model)


def top_columns(body: dict[str, Any]) -> list[str]:
    return [item["columns"][0]["column"] for item in body["data"]]


@pytest.mark.parametrize("method", ["integrated_gradients", "shapley_sampling"])
def test_the_deciding_column_ranks_first_for_nearly_every_record(
    tabular: Deployed, method: str
) -> None:
    body = tabular.explain({"records": records(100), "method": method})
    assert body["object"] == "explanation" and body["method"] == method
    assert body["output"] == "logit" and body["model_version"] == 1
    tops = top_columns(body)
    assert tops.count("key") >= 95, tops
    for item in body["data"]:
        assert [c["column"] for c in item["columns"]].count("color") == 1  # folded
        magnitudes = [abs(c["attribution"]) for c in item["columns"]]
        assert magnitudes == sorted(magnitudes, reverse=True)


def test_an_answer_reports_its_method_options_and_baseline(tabular: Deployed) -> None:
    body = tabular.explain({"records": records(3)})
    ExplanationResponse.model_validate(body)  # the documented shape
    assert body["method"] == "integrated_gradients"
    assert body["options"] == {"target": None, "baseline": "mean", "n_steps": 50}
    assert set(body["baseline"]["tabular"]) == {"noise1", "key", "noise2", "color"}
    shapley = tabular.explain(
        {"records": records(2), "method": "shapley_sampling", "options": {"n_samples": 5}}
    )
    assert shapley["options"]["n_samples"] == 5 and shapley["options"]["seed"] == 0
    assert shapley["data"][0]["convergence_delta"] is None


def test_integrated_gradients_sum_to_the_output_change_within_the_delta(
    tabular: Deployed,
) -> None:
    body = tabular.explain({"records": records(20), "options": {"n_steps": 64}})
    for item in body["data"]:
        total = sum(c["attribution"] for c in item["columns"])
        change = item["output"] - item["baseline_output"]
        assert abs(total - change) <= abs(item["convergence_delta"]) + 1e-4
        assert abs(item["convergence_delta"]) < 0.05 * max(1.0, abs(change))


def test_the_prediction_is_the_one_predictions_gives(tabular: Deployed) -> None:
    rows = records(10, seed=3)
    body = tabular.explain({"records": rows, "options": {"target": "yes"}})
    with tabular.server.client(tabular.org.api_key) as http:
        predicted = http.post("/v1/predictions", json={"model": tabular.model, "records": rows})
    assert predicted.status_code == 200, predicted.text
    for item, expected in zip(body["data"], predicted.json()["data"], strict=True):
        assert item["prediction"]["label"] == expected["label"]
        assert item["prediction"]["probabilities"] == pytest.approx(
            expected["probabilities"], rel=1e-6, abs=1e-7
        )
        assert item["target"] == "yes"
        assert {c["column"]: c["value"] for c in item["columns"]} == {
            k: v for k, v in rows[item["index"]].items()
        }


def test_a_version_or_alias_of_the_deployed_model_can_be_named(tabular: Deployed) -> None:
    assert tabular.explain({"records": records(1)})["model_version"] == 1
    pinned = Deployed(tabular.server, tabular.org, f"{tabular.model}@1")
    assert pinned.explain({"records": records(1)})["model_version"] == 1
    with tabular.server.client(tabular.org.api_key) as http:
        aliased = http.put(f"/v1/models/{tabular.model}/aliases/production", json={"version": 1})
        assert aliased.status_code in (200, 201), aliased.text
    by_alias = Deployed(tabular.server, tabular.org, f"{tabular.model}@production")
    assert by_alias.explain({"records": records(1)})["model_version_id"]
    missing = Deployed(tabular.server, tabular.org, f"{tabular.model}@7")
    assert_error(missing.post({"records": records(1)}), 404)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"method": "saliency"}, "method"),
        ({"method": "attention"}, "method"),
        ({"options": {"n_steps": 0}}, "options.n_steps"),
        ({"options": {"n_samples": 10}}, "options.n_samples"),
        ({"options": {"window": 2}}, "options.window"),
        ({"options": {"baseline": "black"}}, "options.baseline"),
        ({"options": {"baseline": {"height": 3}}}, "options.baseline"),
        ({"options": {"target": "maybe"}}, "options.target"),
        ({"options": {"colour": 1}}, "options.colour"),
        ({"texts": ["a text"], "records": None}, "texts"),
        ({"records": [{"key": 1.0}]}, "noise1"),
        ({"records": [{**records(1)[0], "key": "tall"}]}, "key"),
    ],
)
def test_bad_methods_options_and_inputs_are_400s(
    tabular: Deployed, body: dict[str, Any], param: str
) -> None:
    request = {"records": records(2), **body}
    request = {k: v for k, v in request.items() if v is not None}
    error = assert_error(tabular.post(request), 400)
    assert error["param"] == param, error


def test_another_organisations_model_is_a_404(tabular: Deployed) -> None:
    stranger = create_org(tabular.server)
    error = assert_error(tabular.post({"records": records(1)}, key=stranger.api_key), 404)
    assert error["code"] == "model_not_found"
    pinned = Deployed(tabular.server, tabular.org, f"{tabular.model}@1")
    assert_error(pinned.post({"records": records(1)}, key=stranger.api_key), 404)


def test_permutation_importance_is_stored_with_the_version(tabular: Deployed) -> None:
    with tabular.server.client(tabular.org.api_key) as http:
        version = http.get(f"/v1/models/{tabular.model}/versions/1").json()
    importance = version["metrics"]["permutation_importance"]
    assert importance["metric"] == "accuracy" and importance["split"] == "test"
    ranked = [c["column"] for c in importance["columns"]]
    assert ranked[0] == "key", importance
    assert importance["columns"][0]["importance"] > 0.2
    assert all(abs(c["importance"]) < 0.1 for c in importance["columns"][1:]), importance


def test_explanations_are_metered_with_a_weight_per_method(tabular: Deployed) -> None:
    org = tabular.org
    time.sleep(2)  # earlier requests' usage is written within a second
    with tabular.server.client(org.api_key) as http:
        before = _items(http)
        tabular.explain({"records": records(4), "method": "feature_ablation"})

        def grown() -> int | None:
            now = _items(http)
            return now if now > before else None

        assert wait_until(grown, what="usage", timeout_s=20) - before == 4 * 2


def _items(http: Any) -> int:
    response = http.get("/v1/usage", params={"group_by": "endpoint", "limit": 31})
    assert response.status_code == 200, response.text
    return sum(
        r["input_items"]
        for bucket in response.json()["data"]
        for r in bucket["results"]
        if r.get("endpoint") == "explanations"
    )


# -- a large request becomes a job ---------------------------------------------------------------


def test_a_large_request_becomes_a_job_whose_result_is_a_file(tabular: Deployed) -> None:
    # 700 records x 1000 steps x 3 (a backward) is above the 2,000,000 an MLP explains inline.
    rows = records(700, seed=5)
    large = {"records": rows, "options": {"n_steps": 1000}}
    response = tabular.post(large)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["object"] == "explanation.job" and job["records"] == 700
    with tabular.server.client(tabular.org.api_key) as http:

        def finished() -> dict[str, Any] | None:
            found = http.get(f"/v1/explanations/jobs/{job['id']}").json()
            assert found["status"] not in ("failed", "cancelled"), found
            return found if found["status"] == "succeeded" else None

        done = wait_until(finished, what="explanation job", timeout_s=240)
        content = http.get(f"/v1/files/{done['result_file_id']}/content")
        assert content.status_code == 200
        events = http.get(f"/v1/explanations/jobs/{job['id']}/events").json()["data"]
        listed = http.get("/v1/explanations/jobs").json()["data"]
    items = [json.loads(line) for line in content.text.splitlines()]
    assert [item["index"] for item in items] == list(range(700))
    assert [item["columns"][0]["column"] for item in items].count("key") >= 665
    assert all(abs(item["convergence_delta"]) < 0.01 for item in items)
    assert any("Explaining 700 records" in e["message"] for e in events)
    assert job["id"] in [j["id"] for j in listed]


def test_a_queued_job_can_be_cancelled_and_others_cannot_see_it(tabular: Deployed) -> None:
    large = {"records": records(700, seed=6), "options": {"n_steps": 1000}}
    response = tabular.post(large)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    stranger = create_org(tabular.server)
    with tabular.server.client(stranger.api_key) as http:
        assert_error(http.get(f"/v1/explanations/jobs/{job_id}"), 404)
        assert_error(http.post(f"/v1/explanations/jobs/{job_id}/cancel"), 404)
    with tabular.server.client(tabular.org.api_key) as http:
        cancelled = http.post(f"/v1/explanations/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text

        def stopped() -> dict[str, Any] | None:
            found = http.get(f"/v1/explanations/jobs/{job_id}").json()
            return found if found["status"] == "cancelled" else None

        wait_until(stopped, what="a cancelled job", timeout_s=60)


# -- images: the top-left quadrant decides -------------------------------------------------------

PIXELS = 24  # uploaded size; the model reads 12 x 12


def quadrant_png(bright: bool, rng: np.random.Generator) -> bytes:
    pixels = rng.uniform(90, 165, (PIXELS, PIXELS))
    half = PIXELS // 2
    pixels[:half, :half] = rng.uniform(215, 255) if bright else rng.uniform(0, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def quadrant_zip(per_class: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(per_class):
            archive.writestr(f"bright/{i}.png", quadrant_png(True, rng))
            archive.writestr(f"dark/{i}.png", quadrant_png(False, rng))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(sqlite_server: Server) -> Deployed:
    org = create_org(sqlite_server)
    image = {"kind": "image", "column": "image", "size": [12, 12], "channels": 1}
    model = deploy(
        sqlite_server,
        org,
        quadrant_zip(100, seed=0),
        "quadrants.zip",
        "cnn",
        n_epochs=8,
        lr_multiplier=5,
        dataset={"features": [image]},
        architecture={"channels": [8]},
    )
    return Deployed(sqlite_server, org, model)


def encoded_images(count: int) -> list[str]:
    rng = np.random.default_rng(9)
    return [base64.b64encode(quadrant_png(i % 2 == 0, rng)).decode() for i in range(count)]


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion"])
def test_the_deciding_quadrant_holds_most_of_the_attribution(images: Deployed, method: str) -> None:
    body = images.explain({"images": encoded_images(10), "method": method})
    ExplanationResponse.model_validate(body)
    shares = []
    for item in body["data"]:
        image = item["image"]
        assert (image["width"], image["height"]) == (PIXELS, PIXELS)
        heatmap = np.abs(np.asarray(image["heatmap"], dtype=float))
        assert heatmap.shape == (12, 12)
        shares.append(heatmap[:6, :6].sum() / heatmap.sum())
        with Image.open(io.BytesIO(base64.b64decode(image["heatmap_png"]))) as png:
            assert png.mode == "RGBA" and png.size == (PIXELS, PIXELS)
    assert np.median(shares) > 0.5, shares
    if method == "occlusion":
        assert body["options"]["window"] == 3 and body["options"]["stride"] == 1


def test_an_image_model_refuses_records_of_the_wrong_shape(images: Deployed) -> None:
    assert_error(images.post({"images": ["bm90IGFuIGltYWdl"]}), 400)
    assert_error(images.post({"texts": ["a"]}), 400)


# -- text: the keyword decides -------------------------------------------------------------------


@pytest.fixture(scope="module")
def text(sqlite_server: Server) -> Deployed:
    org = create_org(sqlite_server)
    feature = {"kind": "text", "column": "text", "max_length": 16}
    model = deploy(
        sqlite_server,
        org,
        keyword_csv(),
        "reviews.csv",
        "lstm",
        n_epochs=6,
        lr_multiplier=1,
        dataset={"features": [feature]},
    )
    return Deployed(sqlite_server, org, model)


def test_the_keyword_ranks_first(text: Deployed) -> None:
    texts = ["the movie was excellent today", "It was an Awful book, my friend"]
    body = text.explain({"texts": texts, "method": "attention"})
    ExplanationResponse.model_validate(body)
    for given, item in zip(texts, body["data"], strict=True):
        assert item["text_column"] == "text"
        tokens = item["tokens"]
        for token in tokens:
            assert given[token["start"] : token["end"]] == token["token"]
            assert token["attention"] is not None
        top = max(tokens, key=lambda t: abs(t["attribution"]))
        assert top["token"].lower() in ("excellent", "awful"), tokens
        assert sum(t["attention"] for t in tokens) == pytest.approx(1.0, abs=1e-3)


# -- imported models -----------------------------------------------------------------------------


def test_an_imported_onnx_model_has_no_gradients(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    response = import_multipart(
        sqlite_server,
        org.api_key,
        {"file": ("iris.onnx", classifier_onnx())},
        name="iris",
        signature=SIGNATURE,
    )
    assert response.status_code == 201, response.text
    with sqlite_server.client(org.api_key) as http:
        deployed = http.post("/v1/deployments", json={"model": response.json()["model"]})
        assert deployed.status_code in (200, 201), deployed.text
        body = {"model": deployed.json()["name"], "records": [{"x": [0.1, 0.2, 0.3, 0.4]}]}
        error = assert_error(http.post("/v1/explanations", json=body), 400)
    assert error["code"] == "gradients_unavailable"


# -- the CLI -------------------------------------------------------------------------------------


def test_the_cli_prints_a_table_for_records_and_texts(
    tabular: Deployed, text: Deployed, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.csv"
    key_frame(3, seed=4).drop(columns=["label"]).to_csv(rows, index=False)
    shown = cli(tabular.server, tabular.org.api_key, "explain", tabular.model, "--input", str(rows))
    assert shown.returncode == 0, shown.stderr
    header = next(line for line in shown.stdout.splitlines() if "prediction" in line)
    assert header.index("key") < header.index("noise1")  # strongest first
    as_json = cli(
        tabular.server,
        tabular.org.api_key,
        "explain",
        tabular.model,
        "-i",
        str(rows),
        "-m",
        "feature_ablation",
        "--json",
    )
    assert as_json.returncode == 0, as_json.stderr
    assert len(json.loads(as_json.stdout)["data"]) == 3

    texts = tmp_path / "texts.txt"
    texts.write_text("the book was awful\nan excellent show today\n")
    shown = cli(text.server, text.org.api_key, "explain", text.model, "-i", str(texts))
    assert shown.returncode == 0, shown.stderr
    assert "awful" in shown.stdout and "excellent" in shown.stdout

    bad = cli(tabular.server, tabular.org.api_key, "explain", tabular.model, "-i", str(texts))
    assert bad.returncode == 1 and "error (400)" in bad.stderr


def test_the_cli_writes_heatmaps_for_images(images: Deployed, tmp_path: Path) -> None:
    paths = []
    for index, encoded in enumerate(encoded_images(2)):
        path = tmp_path / f"photo{index}.png"
        path.write_bytes(base64.b64decode(encoded))
        paths += ["-i", str(path)]
    out = tmp_path / "maps"
    shown = cli(
        images.server, images.org.api_key, "explain", images.model, *paths, "--out", str(out)
    )
    assert shown.returncode == 0, shown.stderr
    for index in range(2):
        with Image.open(out / f"photo{index}.heatmap.png") as png:
            assert png.size == (PIXELS, PIXELS) and png.mode == "RGBA"
