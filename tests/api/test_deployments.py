"""Deployments through HTTP: models trained here, served through OIP v2 and `/v1/predictions`.

A tabular classifier is trained twice (two versions of one model) once per database backend and
shared by most tests; a keyword text model and a stripe image model are trained once on SQLite.
Predictions are checked against the training job's own evaluation, OIP logits against
`/v1/predictions`, aliases and canaries by the versions that answer, and the model pool's
evictions by behaviour on a server with a tiny memory budget.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from openai.types.fine_tuning import FineTuningJob
from PIL import Image

from aiaas import __version__
from aiaas.specs.preprocessing import PreprocessingSpec, transform
from tests.api import test_fine_tuning as fine_tuning
from tests.api.test_fine_tuning import (
    api,
    make_dataset,
    registered_version,
    tabular_frame,
    wait_until,
)
from tests.conftest import Org, Server, assert_error, create_org

CLASSES = ["no", "yes"]


# -- training helpers (shared with test_fine_tuning.py) ------------------------------------------


def train(
    server: Server,
    org: Org,
    training_file: str,
    model: str = "mlp",
    *,
    n_epochs: int,
    lr_multiplier: float = 10.0,
    seed: int = 7,
    **extra_body: Any,
) -> FineTuningJob:
    """Create a job and wait for it to succeed."""
    return fine_tuning.train(
        api(server, org),
        training_file,
        model,
        n_epochs=n_epochs,
        lr_multiplier=lr_multiplier,
        seed=seed,
        **extra_body,
    )


# -- synthetic data --------------------------------------------------------------------------------


def tabular_csv(rows: int = 300, seed: int = 0, flip: float = 0.0) -> bytes:
    """`tabular_frame` as CSV, with a share `flip` of the labels swapped: noise no model can
    learn, so its test split has errors to agree on."""
    frame = tabular_frame(rows, seed)
    flipped = np.random.default_rng(seed + 1).random(rows) < flip
    frame.loc[flipped, "label"] = np.where(frame.loc[flipped, "label"] == "yes", "no", "yes")
    return frame.to_csv(index=False).encode()


# fmt: off
FILLER = [
    "the", "a", "this", "that", "it", "was", "is", "very", "quite", "today", "yesterday", "my",
    "our", "movie", "book", "meal", "place", "service", "story", "show", "trip",
]
# fmt: on


def keyword_texts(rows: int, seed: int) -> tuple[list[str], list[str]]:
    """Short texts of filler words; the one keyword in each decides its class."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(rows):
        good = i % 2 == 0
        words = list(rng.choice(FILLER, int(rng.integers(4, 9))))
        words.insert(int(rng.integers(0, len(words) + 1)), "excellent" if good else "awful")
        texts.append(" ".join(words))
        labels.append("good" if good else "bad")
    return texts, labels


def keyword_csv(rows: int = 300, seed: int = 0) -> bytes:
    texts, labels = keyword_texts(rows, seed)
    return pd.DataFrame({"text": texts, "label": labels}).to_csv(index=False).encode()


def stripes_png(horizontal: bool, rng: np.random.Generator, size: int = 16) -> bytes:
    period = int(rng.integers(2, 5))
    phase = int(rng.integers(0, period))
    lines = ((np.arange(size) + phase) % period) < period / 2
    pattern = np.repeat(lines[:, None], size, axis=1) if horizontal else np.tile(lines, (size, 1))
    pixels = np.where(pattern, rng.uniform(150, 255), rng.uniform(0, 100))
    pixels = np.clip(pixels + rng.normal(0, 15, (size, size)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def stripes_zip(per_class: int = 80, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(per_class):
            archive.writestr(f"horizontal/{i}.png", stripes_png(True, rng))
            archive.writestr(f"vertical/{i}.png", stripes_png(False, rng))
    return buffer.getvalue()


# -- serving helpers -----------------------------------------------------------------------------


def deploy(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/deployments", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def predict(http: httpx.Client, name: str, **inputs: Any) -> dict[str, Any]:
    response = http.post("/v1/predictions", json={"model": name, **inputs})
    assert response.status_code == 200, response.text
    return response.json()


def tensor(name: str, array: np.ndarray, datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype,
        "data": array.reshape(-1).tolist(),
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def is_ready(http: httpx.Client, name: str) -> bool:
    response = http.get(f"/v2/models/{name}/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["name"] == name, body
    return body["ready"]


# -- a tabular model with two versions, deployed, once per backend -------------------------------


@dataclass(frozen=True)
class Points:
    server: Server
    org: Org
    dataset: dict[str, Any]
    model: str  # the registered model id
    versions: list[dict[str, Any]]  # version 1, version 2
    deployment: dict[str, Any]  # pinned to version 1

    @property
    def name(self) -> str:
        return self.deployment["name"]

    def http(self, key: str | None = None) -> httpx.Client:
        return self.server.client(key or self.org.api_key)

    def spec(self, version: int = 1) -> PreprocessingSpec:
        url = f"/v1/models/{self.model}/versions/{version}/artifacts/preprocessing.json"
        with self.http() as http:
            response = http.get(url)
        assert response.status_code == 200, response.text
        return PreprocessingSpec.model_validate_json(response.content)

    def test_rows(self) -> list[dict[str, Any]]:
        with self.http() as http:
            response = http.get(
                f"/v1/datasets/{self.dataset['id']}/versions/1/rows",
                params={"split": "test", "limit": 1000},
            )
        assert response.status_code == 200, response.text
        return response.json()["data"]


@pytest.fixture(scope="module")
def points(server: Server) -> Points:
    org = create_org(server)
    dataset = make_dataset(server, org, "points.csv", tabular_csv(rows=400, flip=0.15))
    first = train(server, org, dataset["version"]["id"], n_epochs=4, suffix="points")
    assert first.fine_tuned_model is not None
    second = train(
        server,
        org,
        dataset["version"]["id"],
        n_epochs=2,
        seed=8,
        register_to=first.fine_tuned_model,
    )
    versions = [registered_version(server, org, job) for job in (first, second)]
    assert [v["version"] for v in versions] == [1, 2]
    with server.client(org.api_key) as http:
        deployment = deploy(http, model=first.fine_tuned_model, version=1, name="points")
    return Points(server, org, dataset, first.fine_tuned_model, versions, deployment)


def test_a_deployment_is_created_listed_and_retrieved(points: Points) -> None:
    deployment = points.deployment
    assert deployment["id"].startswith("dep")
    assert deployment["object"] == "deployment" and deployment["name"] == "points"
    assert deployment["model"] == points.model
    assert deployment["target"] == {"version": 1, "alias": None}
    assert deployment["canary"] is None
    with points.http() as http:
        assert http.get(f"/v1/deployments/{deployment['id']}").json() == deployment
        listed = http.get("/v1/deployments", params={"limit": 100}).json()["data"]
        assert deployment in listed


def test_predictions_agree_with_oip_and_with_the_jobs_own_evaluation(points: Points) -> None:
    rows = points.test_rows()
    evaluation = points.versions[0]["metrics"]["evaluation"]
    assert evaluation["labels"] == CLASSES and len(rows) == evaluation["n"] > 0
    assert 0.6 < evaluation["accuracy"] < 1.0, evaluation  # the flipped labels are errors
    with points.http() as http:
        body = predict(http, points.name, records=rows)
        assert (body["model"], body["model_version"], body["canary"]) == (points.name, 1, False)
        assert body["registered_model"] == points.model
        assert body["model_version_id"] == points.versions[0]["id"]
        assert [item["index"] for item in body["data"]] == list(range(len(rows)))
        labels = [item["label"] for item in body["data"]]
        truth = [row["label"] for row in rows]
        pairs = list(zip(truth, labels, strict=True))
        assert sum(t == p for t, p in pairs) / len(rows) == evaluation["accuracy"]
        matrix = [[pairs.count((actual, said)) for said in CLASSES] for actual in CLASSES]
        assert matrix == evaluation["confusion_matrix"]

        features = transform(points.spec(), pd.DataFrame(rows)).tabular
        assert features is not None
        request = {"id": "agree-1", "inputs": [tensor("tabular", features)]}
        response = http.post(f"/v2/models/{points.name}/infer", json=request)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (
        points.name,
        "1",
        "agree-1",
    )
    [output] = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "logits",
        "FP32",
        [len(rows), 2],
    )
    logits = np.asarray(output["data"], dtype=np.float64).reshape(output["shape"])
    assert [CLASSES[i] for i in logits.argmax(axis=1)] == labels
    probabilities = [[item["probabilities"][c] for c in CLASSES] for item in body["data"]]
    np.testing.assert_allclose(softmax(logits), probabilities, rtol=0, atol=1e-5)
    assert all(item["value"] is None for item in body["data"])


def test_oip_on_a_pinned_version_reproduces_that_versions_evaluation(points: Points) -> None:
    rows = points.test_rows()
    truth = [row["label"] for row in rows]
    features = transform(points.spec(2), pd.DataFrame(rows)).tabular
    assert features is not None
    with points.http() as http:
        response = http.post(
            f"/v2/models/{points.name}/versions/2/infer",
            json={"inputs": [tensor("tabular", features)]},
        )
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "2"
    [output] = response.json()["outputs"]
    said = [CLASSES[i] for i in np.reshape(output["data"], output["shape"]).argmax(axis=1)]
    pairs = list(zip(truth, said, strict=True))
    evaluation = points.versions[1]["metrics"]["evaluation"]
    assert sum(t == p for t, p in pairs) / len(rows) == evaluation["accuracy"]
    matrix = [[pairs.count((actual, label)) for label in CLASSES] for actual in CLASSES]
    assert matrix == evaluation["confusion_matrix"]


def predictions_counted(points: Points, version: int, route: str) -> float:
    """The `aiaas_predictions` counter for this org's deployment `points` (0 before any)."""
    with points.server.client(points.server.admin_key) as admin:
        response = admin.get("/metrics")
    assert response.status_code == 200, response.text
    labels = f'model="{points.name}",org="{points.org.id}",route="{route}",version="{version}"'
    pattern = r"^aiaas_predictions_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+-]+)$"
    for match in re.finditer(pattern, response.text, re.M):
        if ",".join(sorted(match["labels"].split(","))) == labels:
            return float(match["value"])
    return 0.0


def test_oip_inference_is_counted_in_the_predictions_metric(points: Points) -> None:
    first = transform(points.spec(), tabular_frame(3, seed=11)).tabular
    second = transform(points.spec(2), tabular_frame(5, seed=12)).tabular
    assert first is not None and second is not None
    before = {v: predictions_counted(points, v, "oip") for v in (1, 2)}
    with points.http() as http:
        response = http.post(
            f"/v2/models/{points.name}/infer", json={"inputs": [tensor("tabular", first)]}
        )
        assert response.status_code == 200, response.text
        response = http.post(
            f"/v2/models/{points.name}/versions/2/infer",
            json={"inputs": [tensor("tabular", second)]},
        )
        assert response.status_code == 200, response.text
        # A refused request predicts nothing and counts nothing.
        bad = {"inputs": [{**tensor("tabular", first), "datatype": "INT64", "data": [1]}]}
        assert_error(http.post(f"/v2/models/{points.name}/infer", json=bad), 400)
    assert predictions_counted(points, 1, "oip") == before[1] + 3
    assert predictions_counted(points, 2, "oip") == before[2] + 5


def test_oip_server_metadata_health_and_model_metadata(points: Points) -> None:
    features = transform(points.spec(), tabular_frame(1, seed=5)).tabular
    assert features is not None
    dim = features.shape[1]
    with points.http() as http:
        assert http.get("/v2").json() == {
            "name": "aiaas",
            "version": __version__,
            "extensions": [],
        }
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").json() == {"ready": True}
        metadata = http.get(f"/v2/models/{points.name}").json()
        pinned = http.get(f"/v2/models/{points.name}/versions/2").json()
    assert metadata == {
        "name": points.name,
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "tabular", "datatype": "FP32", "shape": [-1, dim]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
        "parameters": {
            "task": "classification",
            "classes": CLASSES,
            "model": points.model,
            "version": 1,
        },
    }
    assert pinned == {**metadata, "parameters": {**metadata["parameters"], "version": 2}}


def test_oip_versions_answer_ready_and_infer_and_an_unknown_version_is_404(
    points: Points,
) -> None:
    features = transform(points.spec(), tabular_frame(4, seed=6)).tabular
    assert features is not None
    request = {"inputs": [tensor("tabular", features)]}
    url = f"/v2/models/{points.name}"
    with points.http() as http:
        for version in ("1", "2"):
            wait_until(
                lambda v=version: http.get(f"{url}/versions/{v}/ready").json()["ready"],
                what=f"version {version} ready",
                timeout_s=30,
            )
            assert http.get(f"{url}/versions/{version}/ready").json() == {
                "name": points.name,
                "ready": True,
            }
            response = http.post(f"{url}/versions/{version}/infer", json=request)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["model_version"] == version and answer["id"] is None
            assert answer["outputs"][0]["shape"] == [4, 2]
        assert wait_until(lambda: is_ready(http, points.name), what="ready", timeout_s=30)
        for response in (
            http.get(f"{url}/versions/9"),
            http.get(f"{url}/versions/9/ready"),
            http.post(f"{url}/versions/9/infer", json=request),
            http.get("/v2/models/no-such-deployment"),
            http.get("/v2/models/no-such-deployment/ready"),
            http.post("/v2/models/no-such-deployment/infer", json=request),
            http.post("/v1/predictions", json={"model": "no-such-deployment", "records": [{}]}),
        ):
            assert_error(response, 404)


def test_a_deployment_without_a_target_serves_the_latest_version(points: Points) -> None:
    row = points.test_rows()[0]
    with points.http() as http:
        deployment = deploy(http, model=points.model, name="points-latest")
        assert deployment["target"] == {"version": None, "alias": "latest"}
        answer = predict(http, "points-latest", records=[row])
        assert (answer["model_version"], answer["canary"]) == (2, False)
        assert answer["model_version_id"] == points.versions[1]["id"]
        assert http.delete(f"/v1/deployments/{deployment['id']}").status_code == 200

        unnamed = deploy(http, model=points.model)
        assert unnamed["name"] == points.model  # the default name: the model's own id
        assert predict(http, points.model, records=[row])["model_version"] == 2
        metadata = http.get(f"/v2/models/{points.model}").json()
        assert (metadata["name"], metadata["parameters"]["version"]) == (points.model, 2)
        assert http.delete(f"/v1/deployments/{unnamed['id']}").status_code == 200
        assert_error(http.get(f"/v2/models/{points.model}"), 404)


def test_moving_an_alias_moves_traffic_and_a_canary_answers_its_share(points: Points) -> None:
    row = points.test_rows()[0]
    aliases = f"/v1/models/{points.model}/aliases"
    name = "points-production"
    with points.http() as http:
        response = http.put(f"{aliases}/production", json={"version": 1})
        assert response.status_code == 200, response.text
        assert response.json()["version"] == 1 and response.json()["object"] == "model.alias"
        deployment = deploy(http, model=points.model, alias="production", name=name)
        assert deployment["target"] == {"version": None, "alias": "production"}
        assert predict(http, name, records=[row])["model_version"] == 1

        assert http.put(f"{aliases}/production", json={"version": 2}).status_code == 200
        answer = predict(http, name, records=[row])
        assert (answer["model_version"], answer["canary"]) == (2, False)
        assert http.get(f"/v1/deployments/{deployment['id']}").json() == deployment
        [listed] = http.get(aliases).json()["data"]
        assert (listed["model"], listed["alias"], listed["version"]) == (
            points.model,
            "production",
            2,
        )

        # Back to version 1 for the stable traffic, so the canary's answers can be told apart.
        assert http.put(f"{aliases}/production", json={"version": 1}).status_code == 200
        canary = {"version": 2, "percent": 30}
        response = http.post(
            f"/v1/deployments/{deployment['id']}", json={"alias": "production", "canary": canary}
        )
        assert response.status_code == 200, response.text
        assert response.json()["canary"] == {"version": 2, "alias": None, "percent": 30.0}
        n = 400
        answers = [predict(http, name, records=[row]) for _ in range(n)]
        by_canary = {(a["canary"], a["model_version"]) for a in answers}
        assert by_canary == {(True, 2), (False, 1)}, by_canary
        share = sum(a["canary"] for a in answers) / n
        assert abs(share - 0.30) <= 4 * math.sqrt(0.30 * 0.70 / n), share

        response = http.post(f"/v1/deployments/{deployment['id']}", json={"alias": "production"})
        assert response.status_code == 200, response.text
        assert response.json()["canary"] is None
        after = [predict(http, name, records=[row]) for _ in range(50)]
        assert {(a["canary"], a["model_version"]) for a in after} == {(False, 1)}


# -- bad input -----------------------------------------------------------------------------------


def post_raw(http: httpx.Client, url: str, body: Any) -> httpx.Response:
    """POST a body as JSON with NaN and Infinity allowed (httpx's `json=` refuses them)."""
    return http.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"})


def test_bad_oip_tensors_are_400(points: Points) -> None:
    features = transform(points.spec(), tabular_frame(2, seed=7)).tabular
    assert features is not None
    rows, dim = features.shape
    good = tensor("tabular", features)
    flat = good["data"]
    cases: dict[str, list[dict[str, Any]]] = {
        "one column too many": [
            {**good, "shape": [rows, dim + 1], "data": [0.0] * (rows * (dim + 1))}
        ],
        "no batch axis": [{**good, "shape": [rows * dim]}],
        "three axes": [{**good, "shape": [rows, dim, 1]}],
        "INT64 for FP32": [{**good, "datatype": "INT64", "data": [1] * (rows * dim)}],
        "BYTES for FP32": [{**good, "datatype": "BYTES", "data": ["x"] * (rows * dim)}],
        "no input": [],
        "an unknown input": [{**good, "name": "pixels"}],
        "another network's input": [
            {"name": "tokens", "shape": [rows, 4], "datatype": "INT64", "data": [1] * (rows * 4)}
        ],
        "an input twice": [good, good],
        "a value too few": [{**good, "data": flat[:-1]}],
        "a value too many": [{**good, "data": [*flat, 0.0]}],
        "NaN": [{**good, "data": [math.nan, *flat[1:]]}],
        "Infinity": [{**good, "data": [*flat[:-1], math.inf]}],
        "beyond FP32": [{**good, "data": [1e39, *flat[1:]]}],
        "null": [{**good, "data": [None, *flat[1:]]}],
        "words": [{**good, "data": ["abc", *flat[1:]]}],
        "an object": [{**good, "data": [{"x": 1}, *flat[1:]]}],
        "ragged rows": [{**good, "data": [flat[:dim], flat[dim : 2 * dim - 1]]}],
        "zero rows": [{**good, "shape": [0, dim], "data": []}],
        "a negative axis": [{**good, "shape": [-1, dim]}],
        "too many elements": [{**good, "shape": [2**20, 2**20]}],
    }
    url = f"/v2/models/{points.name}/infer"
    with points.http() as http:
        for case, inputs in cases.items():
            response = post_raw(http, url, {"inputs": inputs})
            assert response.status_code == 400, (case, response.text)
            assert_error(response, 400)
        for body in (
            {"inputs": [good], "outputs": [{"name": "probabilities"}]},
            {"inputs": [good], "extra": 1},
            {"inputs": good},
            [good],
        ):
            assert_error(http.post(url, json=body), 400)
        assert_error(
            http.post(url, content=b"{not json", headers={"Content-Type": "application/json"}), 400
        )
        # The model still answers after all that.
        response = http.post(url, json={"inputs": [good], "outputs": [{"name": "logits"}]})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("kind", ["numeric strings", "booleans"])
def test_fp32_data_must_be_numbers(points: Points, kind: str) -> None:
    features = transform(points.spec(), tabular_frame(1, seed=8)).tabular
    assert features is not None
    good = tensor("tabular", features)
    data = [str(v) for v in good["data"]] if kind == "numeric strings" else [True] * features.size
    with points.http() as http:
        response = http.post(
            f"/v2/models/{points.name}/infer", json={"inputs": [{**good, "data": data}]}
        )
    assert_error(response, 400)


def test_bad_prediction_requests_are_400(points: Points) -> None:
    [row] = tabular_frame(1, seed=9).to_dict(orient="records")
    image = base64.b64encode(stripes_png(True, np.random.default_rng(0))).decode()
    features = [step.column for step in points.spec().features]
    with points.http() as http:
        for body, param in (
            ({"records": [{k: v for k, v in row.items() if k != "noise"}]}, "noise"),
            ({"records": [row, {"a": 1.0}]}, None),
            ({}, None),
            ({"records": [row], "texts": ["x"]}, None),
            ({"texts": ["x"], "images": [image]}, None),
            ({"records": []}, None),
            ({"records": [1]}, None),
            ({"records": [{**row, "a": "abc"}]}, "a"),
            ({"records": [{**row, "b": [1, 2]}]}, "b"),
            ({"records": [{**row, "y": "inf"}]}, "y"),
            ({"texts": ["a text"]}, "texts"),
            ({"images": [image]}, "images"),
            ({"images": ["not base64!"]}, None),
            ({"records": [row], "extra": True}, None),
        ):
            response = http.post("/v1/predictions", json={"model": points.name, **body})
            error = assert_error(response, 400)
            if param is not None:
                assert error["param"] == param, (body, error)
            if error["param"] in features:
                assert error["param"] in error["message"], error
        assert predict(http, points.name, records=[row])["data"][0]["label"] in CLASSES


# -- isolation and guards ------------------------------------------------------------------------


def test_another_org_gets_404_for_the_deployment(points: Points) -> None:
    other = create_org(points.server)
    deployment_url = f"/v1/deployments/{points.deployment['id']}"
    oip = f"/v2/models/{points.name}"
    [row] = tabular_frame(1, seed=10).to_dict(orient="records")
    features = transform(points.spec(), tabular_frame(1, seed=10)).tabular
    assert features is not None
    infer = {"inputs": [tensor("tabular", features)]}
    with points.server.client(other.api_key) as http:
        for response in (
            http.get(deployment_url),
            http.post(deployment_url, json={"version": 1}),
            http.delete(deployment_url),
            http.get(oip),
            http.get(f"{oip}/ready"),
            http.get(f"{oip}/versions/1"),
            http.get(f"{oip}/versions/1/ready"),
            http.post(f"{oip}/infer", json=infer),
            http.post(f"{oip}/versions/1/infer", json=infer),
            http.post("/v1/predictions", json={"model": points.name, "records": [row]}),
            http.get(f"/v1/models/{points.name}"),
            http.post("/v1/deployments", json={"model": points.model, "name": "stolen"}),
            http.get(f"/v1/models/{points.model}/aliases"),
            http.put(f"/v1/models/{points.model}/aliases/mine", json={"version": 1}),
        ):
            assert_error(response, 404)
        assert http.get("/v1/deployments").json()["data"] == []
        listed = [model["id"] for model in http.get("/v1/models").json()["data"]]
        assert points.name not in listed and points.model not in listed
    with points.http() as http:
        assert http.get(deployment_url).status_code == 200
        listed = [model["id"] for model in http.get("/v1/models").json()["data"]]
        assert points.name in listed and points.model in listed
        assert http.get(f"/v1/models/{points.name}").json()["id"] == points.name
        assert predict(http, points.name, records=[row])["model_version"] == 1


def key_with(points: Points, *scopes: str) -> str:
    with points.http() as http:
        response = http.post("/v1/api_keys", json={"name": "limited", "scopes": list(scopes)})
    assert response.status_code == 201, response.text
    return response.json()["value"]


def test_changing_deployments_needs_deploy_and_predicting_needs_inference(
    points: Points,
) -> None:
    [row] = tabular_frame(1, seed=11).to_dict(orient="records")
    deployment_url = f"/v1/deployments/{points.deployment['id']}"
    aliases = f"/v1/models/{points.model}/aliases"
    with points.http(key_with(points, "models:read", "inference")) as http:
        for response in (
            http.post("/v1/deployments", json={"model": points.model, "name": "no-scope"}),
            http.post(deployment_url, json={"version": 2}),
            http.delete(deployment_url),
            http.put(f"{aliases}/staging", json={"version": 1}),
            http.delete(f"{aliases}/staging"),
        ):
            assert_error(response, 403)
        assert http.get(deployment_url).json() == points.deployment
        assert predict(http, points.name, records=[row])["model_version"] == 1
    with points.http(key_with(points, "models:read")) as http:
        assert http.get(f"/v2/models/{points.name}").status_code == 200
        assert_error(
            http.post("/v1/predictions", json={"model": points.name, "records": [row]}), 403
        )
        features = transform(points.spec(), pd.DataFrame([row])).tabular
        assert features is not None
        infer = {"inputs": [tensor("tabular", features)]}
        assert_error(http.post(f"/v2/models/{points.name}/infer", json=infer), 403)


def test_deployments_guard_their_model_and_aliases(server: Server, points: Points) -> None:
    org = create_org(server)
    dataset = make_dataset(server, org, "guards.csv", tabular_csv(rows=200, seed=2))
    job = train(server, org, dataset["version"]["id"], n_epochs=1)
    model = job.fine_tuned_model
    assert model is not None
    aliases = f"/v1/models/{model}/aliases"
    with server.client(org.api_key) as http:
        assert http.put(f"{aliases}/stable", json={"version": 1}).status_code == 200
        assert_error(http.put(f"{aliases}/stable", json={"version": 9}), 404)
        assert_error(http.put(f"{aliases}/1bad", json={"version": 1}), 400)
        served = deploy(http, model=model, alias="stable", name="guarded")
        pinned = deploy(
            http,
            model=model,
            version=1,
            name="guarded-canary",
            canary={"alias": "stable", "percent": 10},
        )
        assert pinned["canary"] == {"version": None, "alias": "stable", "percent": 10.0}
        # Names are per organisation: this one's "points" is its own model, not the other's.
        same_name = deploy(http, model=model, version=1, name=points.name)
        [row] = tabular_frame(1, seed=13).to_dict(orient="records")
        assert predict(http, points.name, records=[row])["registered_model"] == model
        with points.http() as owner:
            assert predict(owner, points.name, records=[row])["registered_model"] == points.model
        assert http.delete(f"/v1/deployments/{same_name['id']}").status_code == 200

        for body, status, param in (
            ({"model": model, "name": "guarded"}, 409, "name"),
            ({"model": model, "version": 9, "name": "v9"}, 404, "version"),
            ({"model": model, "alias": "nope", "name": "nope"}, 404, "alias"),
            ({"model": "ft:mlp:nobody::x", "name": "nobody"}, 404, "model"),
            ({"model": model, "version": 1, "alias": "stable", "name": "both"}, 400, None),
            ({"model": model, "name": "bad name!"}, 400, None),
            ({"model": model, "canary": {"version": 1, "percent": 0}}, 400, None),
            ({"model": model, "canary": {"version": 1, "percent": 101}}, 400, None),
            ({"model": model, "canary": {"version": 9, "percent": 10}, "name": "c9"}, 404, None),
        ):
            error = assert_error(http.post("/v1/deployments", json=body), status)
            if param is not None:
                assert error["param"] == param, (body, error)
        assert_error(http.post(f"/v1/deployments/{served['id']}", json={"version": 9}), 404)
        assert_error(http.post(f"/v1/deployments/{served['id']}", json={}), 400)

        assert_error(http.delete(f"{aliases}/stable"), 409, "alias_in_use")
        assert_error(http.delete(f"/v1/models/{model}"), 409, "model_in_use")
        deleted = http.delete(f"/v1/deployments/{served['id']}")
        assert deleted.json() == {
            "id": served["id"],
            "object": "deployment.deleted",
            "deleted": True,
        }
        assert_error(http.get(f"/v1/deployments/{served['id']}"), 404)
        assert_error(http.delete(f"/v1/deployments/{served['id']}"), 404)
        assert_error(http.delete(f"{aliases}/stable"), 409, "alias_in_use")  # the canary's
        assert_error(http.delete(f"/v1/models/{model}"), 409, "model_in_use")
        assert http.delete(f"/v1/deployments/{pinned['id']}").status_code == 200

        assert http.delete(f"{aliases}/stable").status_code == 204
        assert_error(http.delete(f"{aliases}/stable"), 404)
        response = http.delete(f"/v1/models/{model}")
        assert response.status_code == 200, response.text
        assert_error(http.get(f"/v1/models/{model}"), 404)
        assert http.get("/v1/deployments").json()["data"] == []


# -- the pool under a tiny memory budget ---------------------------------------------------------


def test_a_tiny_memory_budget_evicts_and_reloads_on_demand(
    make_server: Callable[..., Server],
) -> None:
    server = make_server("sqlite", classic_memory_budget_mb="1")
    server.start()
    try:
        evict_and_reload(server)
    finally:
        server.stop()


def evict_and_reload(server: Server) -> None:
    org = create_org(server)
    names = ["first", "second"]
    with server.client(org.api_key) as http:
        for seed, name in enumerate(names):
            dataset = make_dataset(server, org, f"{name}.csv", tabular_csv(rows=200, seed=seed))
            job = train(server, org, dataset["version"]["id"], n_epochs=1, seed=seed)
            deploy(http, model=job.fine_tuned_model, name=name)
        records = tabular_frame(8, seed=12).drop(columns=["label"]).to_dict(orient="records")
        first = predict(http, "first", records=records)["data"]
        assert is_ready(http, "first")
        second = predict(http, "second", records=records)["data"]
        # Loading the second model pushed the first out; asking about it starts its reload.
        assert not is_ready(http, "first")
        wait_until(lambda: is_ready(http, "first"), what="first reloaded", timeout_s=30)
        assert not is_ready(http, "second")
        wait_until(lambda: is_ready(http, "second"), what="second reloaded", timeout_s=30)
        assert not is_ready(http, "first")
        for _ in range(5):
            assert predict(http, "first", records=records)["data"] == first
            assert predict(http, "second", records=records)["data"] == second
    # The log is corroboration, not the test: one line per model pushed out.
    log = server.stderr_path.read_text().splitlines()
    assert sum("evicted classic model" in line for line in log) >= 13


# -- text and image models -----------------------------------------------------------------------


def train_and_deploy(
    server: Server, org: Org, name: str, filename: str, data: bytes, model: str, **job: Any
) -> str:
    feature = job.pop("feature")
    dataset = make_dataset(server, org, filename, data, features=[feature])
    trained = train(server, org, dataset["version"]["id"], model, **job)
    with server.client(org.api_key) as http:
        deploy(http, model=trained.fine_tuned_model, name=name)
    return name


def test_a_text_model_predicts_from_texts(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    text = {"kind": "text", "column": "text", "max_length": 16}
    name = train_and_deploy(
        sqlite_server,
        org,
        "keywords",
        "reviews.csv",
        keyword_csv(),
        "lstm",
        feature=text,
        n_epochs=6,
        lr_multiplier=1,
    )
    texts, labels = keyword_texts(100, seed=99)
    with sqlite_server.client(org.api_key) as http:
        answer = predict(http, name, texts=texts)
        said = [item["label"] for item in answer["data"]]
        assert np.mean(np.asarray(said) == np.asarray(labels)) >= 0.8, said
        [alone] = predict(http, name, records=[{"text": texts[0]}])["data"]
        assert alone["label"] == answer["data"][0]["label"]
        assert alone["probabilities"] == pytest.approx(answer["data"][0]["probabilities"], abs=1e-5)

        metadata = http.get(f"/v2/models/{name}").json()
        assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
            ("tokens", "INT64", [-1, 16]),
            ("attention", "INT64", [-1, 16]),
        ]
        tokens = {"name": "tokens", "shape": [1, 16], "datatype": "INT64", "data": [1] * 16}
        attention = {**tokens, "name": "attention"}
        url = f"/v2/models/{name}/infer"
        assert http.post(url, json={"inputs": [tokens, attention]}).status_code == 200
        for inputs in (
            [tokens],
            [attention],
            [{**tokens, "data": [10**9] * 16}, attention],
            [{**tokens, "data": [-1] * 16}, attention],
            [{**tokens, "data": [1.5] * 16}, attention],
            [{**tokens, "data": [2**70] * 16}, attention],
            [tokens, {**attention, "data": [2] * 16}],
            [tokens, {**attention, "shape": [2, 16], "data": [1] * 32}],
            [tokens, {**attention, "datatype": "FP32"}],
        ):
            assert_error(http.post(url, json={"inputs": inputs}), 400)
        assert_error(http.post("/v1/predictions", json={"model": name, "images": ["aGk="]}), 400)


def test_an_image_model_predicts_from_base64_pngs(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    image = {"kind": "image", "column": "image", "size": [16, 16], "channels": 1}
    name = train_and_deploy(
        sqlite_server,
        org,
        "stripes",
        "stripes.zip",
        stripes_zip(),
        "cnn",
        feature=image,
        n_epochs=8,
        lr_multiplier=3,
    )
    rng = np.random.default_rng(99)
    horizontal = [bool(h) for h in rng.integers(0, 2, 40)]
    images = [base64.b64encode(stripes_png(h, rng)).decode() for h in horizontal]
    with sqlite_server.client(org.api_key) as http:
        answer = predict(http, name, images=images)
        said = [item["label"] == "horizontal" for item in answer["data"]]
        assert np.mean(np.asarray(said) == np.asarray(horizontal)) >= 0.8, answer["data"]
        for images_in in (
            ["not base64!"],
            [base64.b64encode(b"not an image").decode()],
        ):
            response = http.post("/v1/predictions", json={"model": name, "images": images_in})
            assert_error(response, 400)
        assert_error(http.post("/v1/predictions", json={"model": name, "texts": ["x"]}), 400)


def test_model_names_with_control_characters_are_400_on_every_route(
    server: Server, org: Org
) -> None:
    """PostgreSQL refuses NUL in text: such a name must be a 400 before any query runs."""
    bad = "ft:mlp:x\x00y"
    with server.client(org.api_key) as http:
        assert_error(http.post("/v1/deployments", json={"model": bad}), 400)
        assert_error(http.post("/v1/predictions", json={"model": bad, "texts": ["hi"]}), 400)
        assert_error(
            http.post(
                "/v1/fine_tuning/jobs",
                json={"model": "mlp", "training_file": "dsv_x", "register_to": bad},
            ),
            400,
        )
        for path in (
            "/v1/models/ft%3Amlp%00x",
            "/v1/models/ft%3Amlp%00x/versions",
            "/v1/models/ft%3Amlp%00x/aliases",
            "/v2/models/ft%3Amlp%00x",
        ):
            assert_error(http.get(path), 400)


def test_a_deployment_that_is_not_an_encoder_does_not_serve_embeddings(points: Points) -> None:
    with points.http() as http:
        response = http.post("/v1/embeddings", json={"model": points.name, "input": "hello"})
    assert_error(response, 400, "model_not_embedding")
