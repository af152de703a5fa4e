"""Fine-tuning jobs through HTTP: train, register, control and isolate, with the real server.

Every job here is small (a few hundred rows, a few epochs) and learns a synthetic problem that a
keyword, a stripe direction or a linear boundary decides, so "learned" is a clear threshold.
The server runs one job at a time, so tests that start a second job wait for the first.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import secrets
import signal
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import openai
import pandas as pd
import pytest
from openai.types.fine_tuning import FineTuningJob
from PIL import Image
from tokenizers import Tokenizer

from aiaas.engines.embeddings.export import minilm_l6_v2_dir
from aiaas.specs.preprocessing import PreprocessingSpec, transform
from aiaas.specs.shapes import input_shape, model_inputs
from tests.conftest import Org, Server, SharedModel, assert_error, create_org

POLL_S = 0.2
JOB_TIMEOUT_S = 120.0
FINISHED = {"succeeded", "failed", "cancelled"}
TIMING = {"samples_per_second", "seconds"}
ARTIFACTS = ["model.json", "model.onnx", "model.safetensors", "preprocessing.json"]

T = TypeVar("T")


# -- helpers -------------------------------------------------------------------------------------


def api(server: Server, org: Org) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=org.api_key, max_retries=0)


def make_dataset(
    server: Server, org: Org, filename: str, data: bytes, **options: Any
) -> dict[str, Any]:
    """Upload `data` and make a dataset of it; the dataset, with its first `version`."""
    file_id = api(server, org).files.create(file=(filename, data), purpose="dataset").id
    body = {"name": f"{filename}-{secrets.token_hex(3)}", "file_ids": [file_id], **options}
    with server.client(org.api_key) as http:
        response = http.post("/v1/datasets", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def wait_until(check: Callable[[], T | None], *, what: str, timeout_s: float = JOB_TIMEOUT_S) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s:.0f} s")
        time.sleep(POLL_S)


def wait_for_status(
    client: openai.OpenAI, job_id: str, *wanted: str, timeout_s: float = JOB_TIMEOUT_S
) -> FineTuningJob:
    """Poll the job until its status is one of `wanted`; a different final status fails fast."""

    def check() -> FineTuningJob | None:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in wanted:
            return job
        assert job.status not in FINISHED, f"job ended {job.status}, not {wanted}: {job.error}"
        return None

    return wait_until(check, what=f"job {job_id} {'/'.join(wanted)}", timeout_s=timeout_s)


def train(
    client: openai.OpenAI,
    training_file: str,
    model: str = "mlp",
    *,
    n_epochs: int,
    batch_size: int = 16,
    lr_multiplier: float = 10.0,
    seed: int = 7,
    timeout_s: float = JOB_TIMEOUT_S,
    **extra_body: Any,
) -> FineTuningJob:
    """Create a job and wait for it to succeed."""
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        hyperparameters={
            "n_epochs": n_epochs,
            "batch_size": batch_size,
            "learning_rate_multiplier": lr_multiplier,
        },
        seed=seed,
        extra_body=extra_body or None,
    )
    return wait_for_status(client, job.id, "succeeded", timeout_s=timeout_s)


def registered_version(server: Server, org: Org, job: FineTuningJob) -> dict[str, Any]:
    """The model version the job registered (found by the id the job names)."""
    assert job.fine_tuned_model is not None
    with server.client(org.api_key) as http:
        response = http.get(f"/v1/models/{job.fine_tuned_model}/versions")
    assert response.status_code == 200, response.text
    [version] = [
        v for v in response.json()["data"] if v["id"] == job.model_extra["model_version_id"]
    ]
    return version


def all_events(client: openai.OpenAI, job_id: str) -> list[Any]:
    return client.fine_tuning.jobs.list_events(job_id, limit=100).data


def without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in epoch.items() if k not in TIMING} for epoch in history]


def assert_same_result(left: dict[str, Any], right: dict[str, Any]) -> None:
    """Two registered versions came from bit-identical training runs."""
    assert left["metrics"]["evaluation"] == right["metrics"]["evaluation"]
    assert without_timing(left["metrics"]["history"]) == without_timing(right["metrics"]["history"])
    weights = {a["name"]: a["sha256"] for a in left["artifacts"]}["model.safetensors"]
    assert weights == {a["name"]: a["sha256"] for a in right["artifacts"]}["model.safetensors"]


def job_field(job: FineTuningJob, name: str) -> Any:
    """A platform field of the job object (the openai client keeps unknown fields as extras)."""
    assert job.model_extra is not None
    return job.model_extra[name]


# -- synthetic data ------------------------------------------------------------------------------


def tabular_frame(rows: int, seed: int) -> pd.DataFrame:
    """Two classes split by a + b = 0 with a margin; `noise` and `color` carry no signal; `y` is
    a linear function of a and b for regression."""
    rng = np.random.default_rng(seed)
    a, b, noise = rng.normal(size=(3, rows))
    side = np.sign(a + b)
    a, b = a + 0.5 * side, b + 0.5 * side
    return pd.DataFrame(
        {
            "a": a.round(4),
            "b": b.round(4),
            "noise": noise.round(4),
            "color": rng.choice(["red", "green", "blue"], rows),
            "y": (3 * a - 2 * b + rng.normal(0, 0.1, rows)).round(4),
            "label": np.where(side > 0, "yes", "no"),
        }
    )


def tabular_csv(rows: int = 300, seed: int = 0) -> bytes:
    return tabular_frame(rows, seed).to_csv(index=False).encode()


# fmt: off
FILLER = [
    "the", "a", "this", "that", "it", "was", "is", "very", "quite", "today", "yesterday", "my",
    "our", "movie", "book", "meal", "place", "service", "story", "show", "trip",
]
# fmt: on


def keyword_csv(rows: int = 300, seed: int = 0) -> bytes:
    """Short texts of filler words; the one keyword in each decides its class."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(rows):
        good = i % 2 == 0
        words = list(rng.choice(FILLER, int(rng.integers(4, 9))))
        words.insert(int(rng.integers(0, len(words) + 1)), "excellent" if good else "awful")
        texts.append(" ".join(words))
        labels.append("good" if good else "bad")
    return pd.DataFrame({"text": texts, "label": labels}).to_csv(index=False).encode()


POSITIVE = [
    "I loved this, it was wonderful",
    "what a great and happy day",
    "the food was delicious and the staff were kind",
    "an excellent film, I enjoyed every minute",
    "this is fantastic news, I am delighted",
    "a beautiful, charming and pleasant place",
    "the best purchase I have made, highly recommended",
    "such a lovely surprise, thank you so much",
]
NEGATIVE = [
    "I hated this, it was terrible",
    "what an awful and miserable day",
    "the food was disgusting and the staff were rude",
    "a horrible film, I regretted every minute",
    "this is dreadful news, I am upset",
    "a dirty, ugly and unpleasant place",
    "the worst purchase I have made, avoid it",
    "such a nasty shock, I am so angry",
]
SUBJECTS = ["honestly", "overall", "in short", "to be fair", "frankly", "today", "again", "well"]


def sentiment_csv(rows: int = 120, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(rows):
        positive = i % 2 == 0
        sentence = str(rng.choice(POSITIVE if positive else NEGATIVE))
        texts.append(f"{rng.choice(SUBJECTS)}, {sentence}")
        labels.append("positive" if positive else "negative")
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


# -- a trained classifier, shared by the tests that inspect one ----------------------------------


@dataclass(frozen=True)
class Trained:
    server: Server
    org: Org
    dataset: dict[str, Any]
    job: FineTuningJob
    version: dict[str, Any]

    @property
    def client(self) -> openai.OpenAI:
        return api(self.server, self.org)


CLASSIFIER_EPOCHS = 4


@pytest.fixture(scope="module")
def trained_classifier(sqlite_server: Server) -> Trained:
    """An mlp trained once on the tabular classification set; several tests read its results."""
    org = create_org(sqlite_server)
    dataset = make_dataset(sqlite_server, org, "points.csv", tabular_csv(rows=300))
    client = api(sqlite_server, org)
    job = train(
        client,
        dataset["version"]["id"],
        n_epochs=CLASSIFIER_EPOCHS,
        suffix="points",
        metadata={"purpose": "shared"},
    )
    return Trained(sqlite_server, org, dataset, job, registered_version(sqlite_server, org, job))


# -- each task family learns -----------------------------------------------------------------


def test_mlp_learns_a_separable_classification(trained_classifier: Trained) -> None:
    job, metrics = trained_classifier.job, trained_classifier.version["metrics"]
    rows, epochs = metrics["rows"], CLASSIFIER_EPOCHS
    assert job_field(job, "task") == "classification"
    assert job_field(job, "target_column") == "label"
    assert job_field(job, "attempts") == 1 and job.error is None and job.finished_at
    assert job_field(job, "trained_samples") == rows["train"] * epochs
    assert job_field(job, "progress") == {
        "epoch": epochs,
        "n_epochs": epochs,
        "step": epochs * math.ceil(rows["train"] / 16),
    }
    assert metrics["evaluated_on"] == "test" and rows["test"] == 30
    evaluation = metrics["evaluation"]
    assert evaluation["labels"] == ["no", "yes"]
    assert evaluation["accuracy"] >= 0.9, evaluation
    assert sum(map(sum, evaluation["confusion_matrix"])) == rows["test"]
    assert [epoch["epoch"] for epoch in metrics["history"]] == list(range(1, epochs + 1))


def test_mlp_regression_fits_a_linear_target(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    frame = tabular_frame(300, seed=1).drop(columns=["label"])
    data = frame.to_csv(index=False).encode()
    dataset = make_dataset(sqlite_server, org, "linear.csv", data, label_column="y")
    assert dataset["version"]["task"] == "regression"
    job = train(api(sqlite_server, org), dataset["version"]["id"], n_epochs=10)
    assert job_field(job, "task") == "regression"
    evaluation = registered_version(sqlite_server, org, job)["metrics"]["evaluation"]
    assert evaluation["r2"] >= 0.8, evaluation
    assert evaluation["mae"] < evaluation["rmse"] * 1.01


def test_cnn_learns_stripe_direction_from_an_image_zip(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    image = {"kind": "image", "column": "image", "size": [16, 16], "channels": 1}
    dataset = make_dataset(sqlite_server, org, "stripes.zip", stripes_zip(), features=[image])
    assert dataset["version"]["format"] == "image_zip"
    job = train(
        api(sqlite_server, org), dataset["version"]["id"], "cnn", n_epochs=8, lr_multiplier=3
    )
    evaluation = registered_version(sqlite_server, org, job)["metrics"]["evaluation"]
    assert evaluation["labels"] == ["horizontal", "vertical"]
    assert evaluation["accuracy"] >= 0.9, evaluation


@pytest.mark.parametrize("model", ["lstm", "transformer-encoder"])
def test_text_networks_learn_the_keyword_that_decides_the_class(
    sqlite_server: Server, model: str
) -> None:
    org = create_org(sqlite_server)
    text = {"kind": "text", "column": "text", "max_length": 16}
    dataset = make_dataset(sqlite_server, org, "reviews.csv", keyword_csv(), features=[text])
    job = train(
        api(sqlite_server, org), dataset["version"]["id"], model, n_epochs=6, lr_multiplier=1
    )
    evaluation = registered_version(sqlite_server, org, job)["metrics"]["evaluation"]
    assert evaluation["labels"] == ["bad", "good"]
    assert evaluation["accuracy"] >= 0.9, evaluation


@pytest.mark.slow
def test_minilm_fine_tunes_to_tell_positive_from_negative(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    text = {"kind": "text", "column": "text", "max_length": 32}
    dataset = make_dataset(sqlite_server, org, "sentiment.csv", sentiment_csv(), features=[text])
    job = train(
        api(sqlite_server, org),
        dataset["version"]["id"],
        "all-minilm-l6-v2",
        n_epochs=2,
        batch_size=8,
        lr_multiplier=4,
        timeout_s=300,
    )
    version = registered_version(sqlite_server, org, job)
    assert version["lineage"]["base_model"] == "all-minilm-l6-v2"
    assert version["metrics"]["evaluation"]["accuracy"] >= 0.8, version["metrics"]
    assert_deployed_encoder_serves_embeddings(sqlite_server, org, job)


def assert_deployed_encoder_serves_embeddings(server: Server, org: Org, job: FineTuningJob) -> None:
    """Deployed, the fine-tuned encoder answers /v1/embeddings exactly as its own encoder.onnx
    pooled the sentence-transformers way does, and only for its own organisation."""
    model = job.fine_tuned_model
    assert model is not None
    with server.client(org.api_key) as http:
        assert http.post("/v1/deployments", json={"model": model}).status_code == 201
        graph = http.get(f"/v1/models/{model}/versions/1/artifacts/encoder.onnx").content
    texts = ["what a wonderful film", "a dull and dreadful story", "wonderful"]
    client = api(server, org)
    floats = client.embeddings.create(model=model, input=texts)
    vectors = np.array([item.embedding for item in floats.data])
    packed = client.embeddings.create(model=model, input=texts, encoding_format="base64")
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    tokenizer = Tokenizer.from_file(str(minilm_l6_v2_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    for text, vector, item in zip(texts, vectors, packed.data, strict=True):
        ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
        (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        expected = hidden[0].mean(axis=0)
        expected /= np.linalg.norm(expected)
        assert np.allclose(vector, expected, atol=1e-5)
        decoded = np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
        assert np.array_equal(decoded, vector.astype(np.float32))
    stranger = api(server, create_org(server))
    with pytest.raises(openai.NotFoundError):
        stranger.embeddings.create(model=model, input="hello")


# -- the registered version ----------------------------------------------------------------------


def download(trained: Trained, name: str) -> bytes:
    model, number = trained.job.fine_tuned_model, trained.version["version"]
    with trained.server.client(trained.org.api_key) as http:
        response = http.get(f"/v1/models/{model}/versions/{number}/artifacts/{name}")
    assert response.status_code == 200, response.text
    return response.content


def test_artifacts_match_their_listed_sizes_and_hashes(trained_classifier: Trained) -> None:
    version = trained_classifier.version
    assert version["object"] == "model.version" and version["version"] == 1
    assert [a["name"] for a in version["artifacts"]] == ARTIFACTS
    for artifact in version["artifacts"]:
        content = download(trained_classifier, artifact["name"])
        assert len(content) == artifact["bytes"] > 0
        assert hashlib.sha256(content).hexdigest() == artifact["sha256"]
    description = json.loads(download(trained_classifier, "model.json"))
    assert description["architecture"] == "mlp" and description["task"] == "classification"
    assert description["classes"] == ["no", "yes"] and description["input_names"] == ["tabular"]
    model = trained_classifier.job.fine_tuned_model
    with trained_classifier.server.client(trained_classifier.org.api_key) as http:
        assert_error(http.get(f"/v1/models/{model}/versions/1/artifacts/weights.pt"), 404)
        assert_error(http.get(f"/v1/models/{model}/versions/9"), 404)


def onnx_predictions(trained: Trained, frame: pd.DataFrame) -> np.ndarray:
    """Class names the ONNX artifact predicts for `frame`, preprocessed as its spec says."""
    spec = PreprocessingSpec.model_validate_json(download(trained, "preprocessing.json"))
    description = json.loads(download(trained, "model.json"))
    inputs = model_inputs(
        transform(spec, frame), input_shape(spec), tuple(description["input_names"])
    )
    session = ort.InferenceSession(
        download(trained, "model.onnx"), providers=["CPUExecutionProvider"]
    )
    [logits] = session.run([description["output_name"]], inputs)
    assert spec.label is not None and spec.label.classes is not None
    return np.asarray(spec.label.classes)[logits.argmax(axis=1)]


def test_the_onnx_artifact_reproduces_the_reported_accuracy(trained_classifier: Trained) -> None:
    dataset = trained_classifier.dataset
    with trained_classifier.server.client(trained_classifier.org.api_key) as http:
        rows = http.get(
            f"/v1/datasets/{dataset['id']}/versions/1/rows", params={"limit": 1000}
        ).json()["data"]
    test_rows = pd.DataFrame([r for r in rows if r["__split__"] == "test"])
    evaluation = trained_classifier.version["metrics"]["evaluation"]
    assert len(test_rows) == evaluation["n"]
    accuracy = float(np.mean(onnx_predictions(trained_classifier, test_rows) == test_rows["label"]))
    assert accuracy == pytest.approx(evaluation["accuracy"], abs=1 / len(test_rows))
    fresh = tabular_frame(200, seed=99)
    assert np.mean(onnx_predictions(trained_classifier, fresh) == fresh["label"]) >= 0.9


def test_lineage_names_the_dataset_version_job_seed_and_hyperparameters(
    trained_classifier: Trained,
) -> None:
    job, version = trained_classifier.job, trained_classifier.version
    dataset = trained_classifier.dataset
    lineage = version["lineage"]
    assert lineage["job_id"] == version["job_id"] == job.id
    assert lineage["dataset_id"] == dataset["id"]
    assert lineage["dataset_version_id"] == version["dataset_version_id"] == job.training_file
    assert lineage["dataset_version_id"] == dataset["version"]["id"]
    assert lineage["dataset_version"] == 1
    assert lineage["dataset_content_hash"] == dataset["version"]["content_hash"]
    assert lineage["base_model"] == "mlp" and lineage["seed"] == job.seed == 7
    assert lineage["hyperparameters"] == {
        "n_epochs": CLASSIFIER_EPOCHS,
        "batch_size": 16,
        "learning_rate": pytest.approx(1e-2),
        "learning_rate_multiplier": 10.0,
        "weight_decay": 0.0,
        "early_stopping_patience": None,
    }
    assert job.hyperparameters.n_epochs == CLASSIFIER_EPOCHS
    assert job.hyperparameters.batch_size == 16
    assert lineage["architecture"]["hidden_sizes"] == [64, 64]
    assert lineage["code_version"].startswith("aiaas ") and lineage["torch_version"]


def test_the_fine_tuned_model_is_listed_and_retrievable(trained_classifier: Trained) -> None:
    job, org = trained_classifier.job, trained_classifier.org
    name = f"ft:mlp:{org.name}:points:{job.id.removeprefix('ftjob-')}"
    assert job.fine_tuned_model == name
    assert job_field(job, "model_version_id") == trained_classifier.version["id"]
    client = trained_classifier.client
    assert name in [model.id for model in client.models.list().data]
    model = client.models.retrieve(name)
    assert model.id == name and model.owned_by == org.id


def test_a_trained_model_in_v1_models_says_its_base_task_and_latest_version(
    trained_classifier: Trained,
) -> None:
    client, name = trained_classifier.client, trained_classifier.job.fine_tuned_model
    [listed] = [model for model in client.models.list().data if model.id == name]
    retrieved = client.models.retrieve(name)
    for model in (listed, retrieved):
        extra = model.model_extra or {}
        assert (extra.get("base"), extra.get("task")) == ("mlp", "classification"), extra
        assert extra.get("latest_version", 0) >= 1, extra


def test_each_epoch_logs_one_metrics_event_newest_first(trained_classifier: Trained) -> None:
    client, job = trained_classifier.client, trained_classifier.job
    events = all_events(client, job.id)
    messages = [event.message for event in events]
    assert messages[0] == "The job has successfully completed."
    assert messages[-2:] == ["Job queued.", messages[-1]]
    assert messages[-1].startswith(f"Validated dataset version {job.training_file}")
    assert "Training started (attempt 1)." in messages
    [evaluated] = [event for event in events if event.message.startswith("Evaluated on 30 test")]
    assert evaluated.type == "message"
    created = [event.created_at for event in events]
    assert created == sorted(created, reverse=True)
    per_epoch = [event for event in events if event.type == "metrics"]
    assert [e.data["epoch"] for e in per_epoch] == list(range(CLASSIFIER_EPOCHS, 0, -1))
    history = {h["epoch"]: h for h in trained_classifier.version["metrics"]["history"]}
    for event in per_epoch:
        data = event.data
        assert {"epoch", "train_loss", "valid_loss", "train_accuracy", "valid_accuracy"} <= set(
            data
        )
        assert data["train_loss"] == history[data["epoch"]]["train_loss"]
        assert data["valid_accuracy"] == history[data["epoch"]]["valid_accuracy"]
    first = client.fine_tuning.jobs.list_events(job.id, limit=3)
    rest = client.fine_tuning.jobs.list_events(job.id, after=first.data[-1].id, limit=100)
    assert first.has_more and not rest.has_more
    assert [e.id for e in first.data + rest.data] == [e.id for e in events]


def test_each_epoch_leaves_one_checkpoint(trained_classifier: Trained) -> None:
    client, job = trained_classifier.client, trained_classifier.job
    listed = client.fine_tuning.jobs.checkpoints.list(job.id, limit=100)
    checkpoints = list(reversed(listed.data))  # listed newest first
    assert [c.model_extra["epoch"] for c in checkpoints] == list(range(1, CLASSIFIER_EPOCHS + 1))
    per_epoch = math.ceil(trained_classifier.version["metrics"]["rows"]["train"] / 16)
    steps = [c.step_number for c in checkpoints]
    assert steps == [epoch * per_epoch for epoch in range(1, CLASSIFIER_EPOCHS + 1)]
    assert steps[-1] == job_field(job, "progress")["step"]
    history = trained_classifier.version["metrics"]["history"]
    for checkpoint, epoch in zip(checkpoints, history, strict=True):
        assert checkpoint.fine_tuning_job_id == job.id
        assert checkpoint.fine_tuned_model_checkpoint == (
            f"{job.fine_tuned_model}:ckpt-step-{checkpoint.step_number}"
        )
        assert checkpoint.step_number == epoch["step"]
        assert checkpoint.metrics.train_loss == epoch["train_loss"]
        assert checkpoint.metrics.valid_loss == epoch["valid_loss"]


def test_jobs_are_listed_newest_first_and_filtered_by_metadata(
    trained_classifier: Trained,
) -> None:
    client = trained_classifier.client
    second = train(
        client,
        trained_classifier.dataset["id"],  # a dataset id trains on its latest version
        n_epochs=1,
        metadata={"purpose": "listing"},
    )
    assert second.training_file == trained_classifier.dataset["version"]["id"]
    listed = [job.id for job in client.fine_tuning.jobs.list(limit=100).data]
    assert listed[:2] == [second.id, trained_classifier.job.id]
    filtered = client.fine_tuning.jobs.list(metadata={"purpose": "listing"}).data
    assert [job.id for job in filtered] == [second.id]
    assert filtered[0].metadata == {"purpose": "listing"}
    assert client.fine_tuning.jobs.list(metadata={"purpose": "nothing"}).data == []


def test_register_to_makes_the_next_version_of_an_existing_model(
    trained_classifier: Trained,
) -> None:
    server, org, client = (
        trained_classifier.server,
        trained_classifier.org,
        trained_classifier.client,
    )
    name = trained_classifier.job.fine_tuned_model
    job = train(
        client, trained_classifier.dataset["version"]["id"], n_epochs=1, seed=8, register_to=name
    )
    assert job.fine_tuned_model == name
    version = registered_version(server, org, job)
    assert version["version"] == 2 and version["lineage"]["job_id"] == job.id
    assert version["lineage"]["seed"] == 8
    with server.client(org.api_key) as http:
        listed = http.get(f"/v1/models/{name}/versions").json()["data"]
        assert sorted(v["version"] for v in listed) == [1, 2]
        assert http.get(f"/v1/models/{name}/versions/1").json() == trained_classifier.version
        body = {"model": "mlp", "training_file": job.training_file, "register_to": "ft:nope"}
        assert_error(http.post("/v1/fine_tuning/jobs", json=body), 404)
        regression = {**body, "register_to": name, "target_column": "y", "task": "regression"}
        assert (
            assert_error(http.post("/v1/fine_tuning/jobs", json=regression), 400)["param"]
            == "register_to"
        )


# -- control: cancel, pause and resume, a killed worker -------------------------------------------

# Long enough to be stopped mid-way (many short epochs of small batches), short enough to run
# twice in a test: once interrupted, once straight through to compare with.
LONG_ROWS = 1500
LONG_HYPERPARAMETERS = {"n_epochs": 40, "batch_size": 16, "learning_rate_multiplier": 1.0}


def start_long_job(client: openai.OpenAI, training_file: str, seed: int) -> FineTuningJob:
    return client.fine_tuning.jobs.create(
        model="mlp", training_file=training_file, hyperparameters=LONG_HYPERPARAMETERS, seed=seed
    )


def uninterrupted_run(client: openai.OpenAI, training_file: str, seed: int) -> FineTuningJob:
    job = start_long_job(client, training_file, seed)
    return wait_for_status(client, job.id, "succeeded")


def wait_for_a_checkpoint(client: openai.OpenAI, job_id: str) -> FineTuningJob:
    """The job runs and has finished at least one epoch (with several still to go)."""

    def check() -> FineTuningJob | None:
        job = client.fine_tuning.jobs.retrieve(job_id)
        assert job.status in {"queued", "running"}, f"job is {job.status} already"
        if job.status == "running" and client.fine_tuning.jobs.checkpoints.list(job_id).data:
            return job
        return None

    return wait_until(check, what=f"a checkpoint of job {job_id}")


def checkpoint_blobs(server: Server, org: Org, job_id: str) -> list[str]:
    folder = server.data_dir / "blobs" / "jobs" / org.id / job_id
    return [p.name for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def trained_models(client: openai.OpenAI) -> list[str]:
    return [model.id for model in client.models.list().data if model.id.startswith("ft:")]


def test_cancelling_a_running_job_stops_it_and_registers_nothing(server: Server, org: Org) -> None:
    dataset = make_dataset(server, org, "long.csv", tabular_csv(rows=600))
    client = api(server, org)
    job = client.fine_tuning.jobs.create(
        model="mlp",
        training_file=dataset["version"]["id"],
        hyperparameters={"n_epochs": 200, "batch_size": 8},
    )
    wait_for_a_checkpoint(client, job.id)
    with server.client(org.api_key) as http:
        assert_error(http.delete(f"/v1/datasets/{dataset['id']}"), 409, "dataset_in_use")
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"  # the call waits for the worker to stop
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.finished_at is not None
    assert job.fine_tuned_model is None and job_field(job, "model_version_id") is None
    assert job_field(job, "progress")["epoch"] < 200
    assert "Job cancelled." in [event.message for event in all_events(client, job.id)]
    assert trained_models(client) == []
    wait_until(lambda: not checkpoint_blobs(server, org, job.id), what="checkpoint blobs gone")


@pytest.fixture(scope="module")
def finished_job(shared_model: SharedModel) -> Trained:
    """A small job that succeeded, once per backend: the one that trained the session's
    `shared_model` (the tests here only read it, and try what a finished job refuses)."""
    server, org = shared_model.server, shared_model.owner
    job = api(server, org).fine_tuning.jobs.retrieve(shared_model.job_id)
    assert job.status == "succeeded", job
    return Trained(server, org, shared_model.dataset, job, registered_version(server, org, job))


def test_a_finished_job_cannot_be_cancelled_paused_or_resumed(finished_job: Trained) -> None:
    url = f"/v1/fine_tuning/jobs/{finished_job.job.id}"
    with finished_job.server.client(finished_job.org.api_key) as http:
        for verb in ("cancel", "pause", "resume"):
            error = assert_error(http.post(f"{url}/{verb}"), 400, "invalid_job_state")
            assert error["param"] == "fine_tuning_job_id", error
        assert http.get(url).json()["status"] == "succeeded"


@pytest.mark.slow
def test_a_paused_job_resumes_to_the_result_of_an_uninterrupted_run(
    sqlite_server: Server,
) -> None:
    org = create_org(sqlite_server)
    dataset = make_dataset(sqlite_server, org, "long.csv", tabular_csv(rows=LONG_ROWS, seed=5))
    training_file, client = dataset["version"]["id"], api(sqlite_server, org)
    job = start_long_job(client, training_file, seed=11)
    wait_for_a_checkpoint(client, job.id)
    client.fine_tuning.jobs.pause(job.id)
    paused = wait_for_status(client, job.id, "paused")
    assert paused.finished_at is None
    assert job_field(paused, "progress")["epoch"] < LONG_HYPERPARAMETERS["n_epochs"]
    assert any(e.message.startswith("Job paused after step") for e in all_events(client, job.id))
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status in {"queued", "running"}
    done = wait_for_status(client, job.id, "succeeded")
    assert job_field(done, "attempts") == 2
    messages = [event.message for event in all_events(client, job.id)]
    assert any(m.startswith("Resuming from the checkpoint at epoch") for m in messages), messages
    baseline = uninterrupted_run(client, training_file, seed=11)
    assert_same_result(
        registered_version(sqlite_server, org, done),
        registered_version(sqlite_server, org, baseline),
    )


def test_cancelling_a_paused_job_removes_its_checkpoints(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    dataset = make_dataset(sqlite_server, org, "long.csv", tabular_csv(rows=LONG_ROWS, seed=7))
    client = api(sqlite_server, org)
    job = start_long_job(client, dataset["version"]["id"], seed=3)
    wait_for_a_checkpoint(client, job.id)
    client.fine_tuning.jobs.pause(job.id)
    wait_for_status(client, job.id, "paused")
    assert checkpoint_blobs(sqlite_server, org, job.id)  # what a resume would start from
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    wait_until(
        lambda: not checkpoint_blobs(sqlite_server, org, job.id),
        what="checkpoint blobs gone",
        timeout_s=2,
    )


def worker_pids(server: Server, job_id: str) -> list[int]:
    """Pids of the workers that ran this job, in order, from the server's log."""
    pids = []
    for line in server.stderr_path.read_text().splitlines():
        try:
            message = json.loads(line).get("message", "")
        except json.JSONDecodeError:
            continue
        words = message.split()
        if words[:1] == ["worker"] and words[2:] == ["runs", "job", job_id]:
            pids.append(int(words[1]))
    return pids


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_a_killed_worker_gives_its_job_back_and_the_job_resumes_to_the_same_result(
    server: Server, org: Org
) -> None:
    dataset = make_dataset(server, org, "long.csv", tabular_csv(rows=LONG_ROWS, seed=6))
    training_file, client = dataset["version"]["id"], api(server, org)
    job = start_long_job(client, training_file, seed=13)
    [pid] = wait_until(lambda: worker_pids(server, job.id), what="the worker's pid")
    running = wait_for_a_checkpoint(client, job.id)
    assert job_field(running, "attempts") == 1
    assert server.process is not None and parent_pid(pid) == server.process.pid
    os.kill(pid, signal.SIGKILL)

    def retried() -> FineTuningJob | None:
        found = client.fine_tuning.jobs.retrieve(job.id)
        return found if job_field(found, "attempts") == 2 else None

    assert wait_until(retried, what="a second attempt").status in {"queued", "running"}
    done = wait_for_status(client, job.id, "succeeded")
    assert job_field(done, "attempts") == 2
    assert worker_pids(server, job.id)[0] == pid and len(worker_pids(server, job.id)) == 2
    events = all_events(client, job.id)
    messages = [event.message for event in events]
    gave_back = [m for m in messages if m.startswith("The worker ended (killed by SIGKILL)")]
    assert len(gave_back) == 1 and "resumes from its checkpoint at epoch" in gave_back[0]
    assert any(m.startswith("Resuming from the checkpoint at epoch") for m in messages), messages
    # An epoch finished before the kill is not logged again when the job resumes.
    epochs = [event.data["epoch"] for event in events if event.type == "metrics"]
    assert sorted(epochs) == list(range(1, LONG_HYPERPARAMETERS["n_epochs"] + 1))
    baseline = uninterrupted_run(client, training_file, seed=13)
    assert_same_result(
        registered_version(server, org, done), registered_version(server, org, baseline)
    )


# -- bad specs, tenancy, lineage guards ----------------------------------------------------------


def test_bad_specs_are_4xx_at_create_time_and_create_no_job(
    server: Server, org: Org, other_org: Org
) -> None:
    dataset = make_dataset(server, org, "points.csv", tabular_csv(rows=100))
    theirs = make_dataset(server, other_org, "points.csv", tabular_csv(rows=100))
    file_id = api(server, org).files.create(file=("x.csv", tabular_csv(50)), purpose="dataset").id
    version = dataset["version"]["id"]
    base = {"model": "mlp", "training_file": version}
    cases: list[tuple[dict[str, Any], int, str | None, str | None]] = [
        ({**base, "target_column": "nope"}, 400, "target_column", None),
        ({**base, "target_column": "a", "task": "classification"}, 400, "task", None),
        ({**base, "model": "cnn"}, 400, "model", None),
        ({**base, "model": "lstm"}, 400, "model", None),
        ({**base, "model": "gpt-9000"}, 400, "model", "model_not_found"),
        ({**base, "training_file": theirs["version"]["id"]}, 404, "training_file", None),
        ({**base, "training_file": theirs["id"]}, 404, "training_file", None),
        ({**base, "training_file": file_id}, 400, "training_file", None),
        ({**base, "training_file": "dsv_nope"}, 404, "training_file", None),
        ({**base, "hyperparameters": {"n_epochs": 0}}, 400, None, None),
        ({**base, "hyperparameters": {"batch_size": 0}}, 400, None, None),
        ({**base, "hyperparameters": {"learning_rate_multiplier": -1}}, 400, None, None),
        ({**base, "hyperparameters": {"momentum": 0.9}}, 400, None, None),
        ({**base, "architecture": {"embedding_dim": 64, "num_heads": 3}}, 400, None, None),
        ({**base, "suffix": "not a suffix!"}, 400, None, None),
        ({**base, "register_to": "ft:mlp:nobody::x"}, 404, "register_to", None),
    ]
    with server.client(org.api_key) as http:
        for body, status, param, code in cases:
            error = assert_error(http.post("/v1/fine_tuning/jobs", json=body), status, code)
            if param is not None:
                assert error["param"] == param, (body, error)
        assert http.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_another_org_gets_404_for_the_job_and_its_model(finished_job: Trained) -> None:
    server, job = finished_job.server, finished_job.job
    other = create_org(server)
    name, url = job.fine_tuned_model, f"/v1/fine_tuning/jobs/{job.id}"
    with server.client(other.api_key) as http:
        for response in (
            http.get(url),
            http.get(f"{url}/events"),
            http.get(f"{url}/checkpoints"),
            http.post(f"{url}/cancel"),
            http.post(f"{url}/pause"),
            http.post(f"{url}/resume"),
            http.get(f"/v1/models/{name}"),
            http.get(f"/v1/models/{name}/versions"),
            http.get(f"/v1/models/{name}/versions/1"),
            http.get(f"/v1/models/{name}/versions/1/artifacts/model.onnx"),
            http.delete(f"/v1/models/{name}"),
            http.post(
                "/v1/fine_tuning/jobs",
                json={"model": "mlp", "training_file": job.training_file},
            ),
        ):
            assert_error(response, 404)
        assert name not in [model["id"] for model in http.get("/v1/models").json()["data"]]
        assert http.get("/v1/fine_tuning/jobs").json()["data"] == []
    with server.client(finished_job.org.api_key) as http:
        assert http.get(url).json()["status"] == "succeeded"
        assert http.get(f"/v1/models/{name}/versions/1").status_code == 200


def test_a_dataset_that_trained_a_model_is_in_use(trained_classifier: Trained) -> None:
    url = f"/v1/datasets/{trained_classifier.dataset['id']}"
    with trained_classifier.server.client(trained_classifier.org.api_key) as http:
        assert_error(http.delete(url), 409, "dataset_in_use")
        assert_error(http.delete(f"{url}/versions/1"), 409, "dataset_in_use")
        assert http.get(f"{url}/versions/1").status_code == 200


def test_a_dataset_can_be_deleted_once_the_model_it_trained_is_deleted(
    make_server: Callable[..., Server],
) -> None:
    server = make_server("sqlite")  # its own: the failure leaves a server that cannot restart
    server.start()
    try:
        delete_a_dataset_after_its_model(server)
    finally:
        server.stop()


def delete_a_dataset_after_its_model(server: Server) -> None:
    org = create_org(server)
    dataset = make_dataset(server, org, "points.csv", tabular_csv(rows=200, seed=4))
    client = api(server, org)
    job = train(client, dataset["version"]["id"], n_epochs=1)
    url = f"/v1/datasets/{dataset['id']}"
    with server.client(org.api_key) as http:
        assert_error(http.delete(url), 409, "dataset_in_use")
        deleted = http.delete(f"/v1/models/{job.fine_tuned_model}")
        assert deleted.json() == {"id": job.fine_tuned_model, "object": "model", "deleted": True}
        assert_error(http.get(f"/v1/models/{job.fine_tuned_model}/versions"), 404)
        assert trained_models(client) == []
        models = server.data_dir / "blobs" / "models" / org.id
        assert not [p for p in models.rglob("*") if p.is_file()]
        response = http.delete(url)
        assert response.status_code == 200, response.text
        assert response.json()["deleted"] is True
        assert_error(http.get(url), 404)
