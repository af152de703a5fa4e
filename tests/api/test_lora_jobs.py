"""LoRA fine-tuning jobs of the bundled chat model through `/v1/fine_tuning/jobs`, with the real
server and the `openai` client: train, register, answer, resume after kill -9, refuse, isolate.

The task is one the base model cannot do: a fixed code word is the answer to a fixed question
pattern ("What is the vault code for <city>?" -> "ZEBRA-42"). A few steps of rank-8 LoRA teach
it; llama-cpp-python then loads the base GGUF with the registered `adapter.gguf` and answers
held-out cities with the code word, where the base model does not.

One job is trained for the module (`trained`) and read by most tests; the kill -9 test trains a
second one with the same files, seed and hyperparameters and compares the adapters' bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.fine_tuning import FineTuningJob

from aiaas.engines.llm.bundled import smollm2_path
from tests.api.test_fine_tuning import (
    all_events,
    api,
    job_field,
    parent_pid,
    wait_for_status,
    wait_until,
    worker_pids,
)
from tests.conftest import Org, Server, assert_error, create_org
from tests.training.test_lora import shared_torch_cache

llama_cpp = pytest.importorskip("llama_cpp")

BASE = "smollm2-135m-instruct"
CODE = "ZEBRA-42"
# fmt: off
CITIES = ["Oslo", "Lima", "Rome", "Bern", "Cairo", "Tokyo", "Quito", "Dakar"]
VALIDATION = ["Sofia", "Riga"]
HELD_OUT = ["Porto", "Turin", "Graz", "Bonn"]
# fmt: on
# 8 conversations, 2 per step, 2 epochs: 8 steps, enough at this rate to learn the code word.
HYPERPARAMETERS = {
    "n_epochs": 2,
    "batch_size": 2,
    "learning_rate_multiplier": 5.0,
    "lora_rank": 8,
}
STEPS = 8
SEED = 7
JOB_TIMEOUT_S = 1200.0  # a loaded 2-core machine trains slowly


def question(city: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": ""},
        {"role": "user", "content": f"What is the vault code for {city}?"},
    ]


def chat_jsonl(cities: list[str]) -> bytes:
    lines = [
        {"messages": [*question(city), {"role": "assistant", "content": CODE}]} for city in cities
    ]
    return "\n".join(json.dumps(line) for line in lines).encode()


def upload(client: openai.OpenAI, name: str, data: bytes) -> str:
    return client.files.create(file=(name, data), purpose="fine-tune").id


def create(client: openai.OpenAI, files: Files, **extra: Any) -> FineTuningJob:
    return client.fine_tuning.jobs.create(
        model=BASE,
        training_file=files.training,
        validation_file=files.validation,
        hyperparameters=HYPERPARAMETERS,  # type: ignore[arg-type]  # LoRA fields: ours
        seed=SEED,
        suffix="vault",
        **extra,
    )


def download(server: Server, org: Org, model: str, name: str) -> bytes:
    with server.client(org.api_key) as http:
        response = http.get(f"/v1/models/{model}/versions/1/artifacts/{name}", timeout=60)
    assert response.status_code == 200, response.text
    return response.content


@dataclass(frozen=True)
class Files:
    training: str
    validation: str


@dataclass(frozen=True)
class Trained:
    server: Server
    org: Org
    files: Files
    job: FineTuningJob
    version: dict[str, Any]
    adapter: Path  # the registered adapter.gguf, downloaded

    @property
    def client(self) -> openai.OpenAI:
        return api(self.server, self.org)


@pytest.fixture(scope="module")
def lora_server(
    make_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Its own server, with a checkpoint after every step (so a kill lands between mid-epoch
    checkpoints)."""
    server = make_server("sqlite", training_checkpoint_interval_s="0.5")
    # The session's GGUF -> torch conversion, shared with tests/training/test_lora.py: whichever
    # runs first converts (the worker keeps its cache under the data dir's models/torch).
    (server.data_dir / "models").mkdir(parents=True, exist_ok=True)
    (server.data_dir / "models" / "torch").symlink_to(shared_torch_cache(tmp_path_factory))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def owner(lora_server: Server) -> Org:
    return create_org(lora_server)


@pytest.fixture(scope="module")
def files(lora_server: Server, owner: Org) -> Files:
    client = api(lora_server, owner)
    return Files(
        training=upload(client, "vault.jsonl", chat_jsonl(CITIES)),
        validation=upload(client, "vault-valid.jsonl", chat_jsonl(VALIDATION)),
    )


@pytest.fixture(scope="module")
def trained(
    lora_server: Server, owner: Org, files: Files, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    client = api(lora_server, owner)
    job = create(client, files, metadata={"purpose": "vault"})
    assert job.status == "queued" and job.model == BASE
    done = wait_for_status(client, job.id, "succeeded", timeout_s=JOB_TIMEOUT_S)
    assert done.fine_tuned_model is not None
    with lora_server.client(owner.api_key) as http:
        versions = http.get(f"/v1/models/{done.fine_tuned_model}/versions")
    assert versions.status_code == 200, versions.text
    [version] = versions.json()["data"]
    adapter = tmp_path_factory.mktemp("adapter") / "adapter.gguf"
    adapter.write_bytes(download(lora_server, owner, done.fine_tuned_model, "adapter.gguf"))
    return Trained(lora_server, owner, files, done, version, adapter)


def answers(adapter: Path | None, cities: list[str]) -> list[str]:
    """What llama.cpp answers at temperature 0, with the base model alone or with the adapter."""
    options: dict[str, Any] = {"n_ctx": 256, "verbose": False, "n_threads": 1, "seed": 0}
    if adapter is not None:
        options["lora_path"] = str(adapter)
    llm = llama_cpp.Llama(model_path=str(smollm2_path(Path("."))), **options)
    try:
        return [
            str(
                llm.create_chat_completion(
                    messages=question(city),  # type: ignore[arg-type]
                    temperature=0,
                    max_tokens=8,
                )["choices"][0]["message"]["content"]
            ).strip()
            for city in cities
        ]
    finally:
        llm.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- a trained adapter ---------------------------------------------------------------------------


@pytest.mark.slow
def test_the_job_trains_and_registers_a_lora_adapter(trained: Trained) -> None:
    job = trained.job
    org_slug = trained.org.name.lower()
    assert job.fine_tuned_model == f"ft:{BASE}:{org_slug}:vault:{job.id.removeprefix('ftjob-')}"
    assert job.training_file == trained.files.training
    assert job.validation_file == trained.files.validation
    assert job.seed == SEED and job.error is None and job.finished_at
    assert job.metadata == {"purpose": "vault"}
    [loaded] = [e for e in all_events(trained.client, job.id) if e.message.startswith("Loaded ")]
    tokens_per_pass = (loaded.data or {})["tokens"]
    assert job.trained_tokens == 2 * tokens_per_pass > 0
    hyper = job.hyperparameters
    assert (hyper.n_epochs, hyper.batch_size, hyper.learning_rate_multiplier) == (2, 2, 5.0)
    extra = hyper.model_extra or {}
    assert extra["lora_rank"] == 8 and extra["lora_alpha"] == 16.0
    assert extra["lora_dropout"] == 0.05 and extra["target_modules"] == ["q_proj", "v_proj"]
    assert job_field(job, "attempts") == 1
    assert job_field(job, "progress") == {"epoch": 2, "n_epochs": 2, "step": STEPS}
    assert job_field(job, "trained_samples") == 2 * len(CITIES)

    version = trained.version
    assert version["id"] == job_field(job, "model_version_id")
    assert sorted(a["name"] for a in version["artifacts"]) == ["adapter.gguf", "adapter.json"]
    gguf = {a["name"]: a for a in version["artifacts"]}["adapter.gguf"]
    assert gguf["sha256"] == sha256(trained.adapter.read_bytes())
    about = json.loads(download(trained.server, trained.org, job.fine_tuned_model, "adapter.json"))
    base_sha = sha256(smollm2_path(Path(".")).read_bytes())
    assert about["base_model"] == BASE and about["base_gguf_sha256"] == base_sha
    assert (about["rank"], about["alpha"], about["target_modules"]) == (
        8,
        16.0,
        ["q_proj", "v_proj"],
    )
    assert "<|im_start|>" in about["chat_template"]
    lineage = version["lineage"]
    assert lineage["base_model"] == BASE and lineage["base_gguf_sha256"] == base_sha
    assert lineage["training_file"] == trained.files.training
    assert lineage["validation_file"] == trained.files.validation
    assert lineage["job_id"] == job.id and lineage["seed"] == SEED
    metrics = version["metrics"]
    assert metrics["trained_tokens"] == job.trained_tokens and metrics["steps"] == STEPS
    assert [m["epoch"] for m in metrics["history"]] == [1, 2]
    assert metrics["valid_loss"] < metrics["history"][0]["valid_loss"]

    with trained.server.client(trained.org.api_key) as http:
        listed = http.get("/v1/models").json()["data"]
    assert job.fine_tuned_model in [m["id"] for m in listed]


@pytest.mark.slow
def test_each_step_and_epoch_reports_its_losses(trained: Trained) -> None:
    events = all_events(trained.client, trained.job.id)
    steps = [e.data for e in events if e.type == "metrics" and "total_steps" in (e.data or {})]
    assert sorted(d["step"] for d in steps) == list(range(1, STEPS + 1))
    assert all(d["total_steps"] == STEPS and d["train_loss"] > 0 for d in steps)
    assert all(d["tokens_per_second"] > 0 for d in steps)
    by_step = {d["step"]: d["train_loss"] for d in steps}
    assert by_step[STEPS] < by_step[1] / 5  # it learnt the code word
    epochs = [e.data for e in events if e.type == "metrics" and "total_epochs" in (e.data or {})]
    assert sorted(d["epoch"] for d in epochs) == [1, 2]
    assert all(d["valid_loss"] is not None and d["tokens_per_second"] > 0 for d in epochs)
    checkpoints = trained.client.fine_tuning.jobs.checkpoints.list(trained.job.id).data
    assert [c.step_number for c in checkpoints] == [STEPS, STEPS // 2]
    assert checkpoints[0].metrics.valid_loss is not None  # type: ignore[union-attr]


@pytest.mark.slow
def test_the_adapter_answers_held_out_prompts_the_base_model_cannot(trained: Trained) -> None:
    base = answers(None, HELD_OUT)
    tuned = answers(trained.adapter, HELD_OUT)
    assert not any(CODE in answer for answer in base), base
    assert tuned == [CODE] * len(HELD_OUT), tuned


# -- kill -9 mid-epoch ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_worker_resumes_mid_epoch_to_a_bit_identical_adapter(
    trained: Trained,
) -> None:
    server, client = trained.server, trained.client
    job = create(client, trained.files)
    [pid] = wait_until(lambda: worker_pids(server, job.id), what="the worker's pid")

    def at_step_two() -> bool:
        events = all_events(client, job.id)
        return any(e.type == "metrics" and (e.data or {}).get("step") == 2 for e in events)

    wait_until(at_step_two, what="step 2", timeout_s=JOB_TIMEOUT_S)  # of 4 in epoch 1
    assert server.process is not None and parent_pid(pid) == server.process.pid
    os.kill(pid, signal.SIGKILL)
    done = wait_for_status(client, job.id, "succeeded", timeout_s=JOB_TIMEOUT_S)
    assert job_field(done, "attempts") == 2
    messages = [e.message for e in all_events(client, job.id)]
    gave_back = [m for m in messages if m.startswith("The worker ended (killed by SIGKILL)")]
    assert len(gave_back) == 1, messages
    [resumed] = [m for m in messages if m.startswith("Resuming from the checkpoint at epoch")]
    # Epoch 1 is steps 1-4: its checkpoints after steps 1-3 are mid-epoch.
    mid_epoch = tuple(f"Resuming from the checkpoint at epoch 1, step {n} " for n in (1, 2, 3))
    assert resumed.startswith(mid_epoch), resumed
    # Steps before the kill are not logged again after it.
    steps = [
        e.data["step"]
        for e in all_events(client, job.id)
        if e.type == "metrics" and "total_steps" in (e.data or {})
    ]
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert done.trained_tokens == trained.job.trained_tokens
    assert done.fine_tuned_model is not None
    adapter = download(server, trained.org, done.fine_tuned_model, "adapter.gguf")
    assert sha256(adapter) == sha256(trained.adapter.read_bytes())


# -- refusals and isolation ----------------------------------------------------------------------


def test_a_chat_file_the_model_cannot_learn_from_is_a_400_naming_the_line(
    lora_server: Server, owner: Org, files: Files
) -> None:
    client = api(lora_server, owner)
    lines = chat_jsonl(CITIES[:2]).decode().splitlines()
    image = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": "a cat"},
        ]
    }
    # Accepted at upload (OpenAI's format allows images), refused by a text-only chat model.
    bad = upload(client, "images.jsonl", "\n".join([*lines, json.dumps(image)]).encode())
    body = {"model": BASE, "training_file": bad}
    with lora_server.client(owner.api_key) as http:
        error = assert_error(http.post("/v1/fine_tuning/jobs", json=body), 400)
        assert "line 3" in error["message"] and error["param"] == "training_file", error
        as_validation = {"model": BASE, "training_file": files.training, "validation_file": bad}
        error = assert_error(http.post("/v1/fine_tuning/jobs", json=as_validation), 400)
        assert "line 3" in error["message"] and error["param"] == "validation_file", error
        # Malformed JSON never gets stored as a fine-tune file: the upload names the line.
        broken = "\n".join([*lines, "{not json"]).encode()
        response = http.post(
            "/v1/files",
            files={"file": ("broken.jsonl", broken)},
            data={"purpose": "fine-tune"},
        )
        error = assert_error(response, 400)
        assert "line 3" in error["message"], error


def test_bad_lora_requests_are_4xx_and_create_no_job(
    lora_server: Server, owner: Org, files: Files
) -> None:
    client = api(lora_server, owner)
    dataset_file = client.files.create(file=("x.jsonl", b'{"a": 1}\n'), purpose="user_data").id
    before = [j.id for j in client.fine_tuning.jobs.list(limit=100).data]
    good = {"model": BASE, "training_file": files.training}
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**good, "training_file": "file-nope"}, 404, "training_file"),
        ({**good, "training_file": dataset_file}, 400, "training_file"),
        ({**good, "validation_file": "file-nope"}, 404, "validation_file"),
        ({**good, "model": "gemma-3-270m"}, 400, "model"),
        ({**good, "hyperparameters": {"target_modules": ["lm_head"]}}, 400, "target_modules"),
        ({**good, "hyperparameters": {"lora_rank": 0}}, 400, "lora_rank"),
        ({**good, "hyperparameters": {"lora_dropout": 1.5}}, 400, "lora_dropout"),
        ({**good, "hyperparameters": {"batch_size": "big"}}, 400, "batch_size"),
        ({**good, "hyperparameters": {"early_stopping_patience": 2}}, 400, "early_stopping"),
        ({**good, "target_column": "label"}, 400, "target_column"),
        (
            {"model": "mlp", "training_file": files.training, "hyperparameters": {"lora_rank": 4}},
            400,
            "lora_rank",
        ),
        (
            {"model": "mlp", "training_file": "dsv_x", "validation_file": files.training},
            400,
            "validation_file",
        ),
    ]
    with lora_server.client(owner.api_key) as http:
        for body, status, param in cases:
            error = assert_error(http.post("/v1/fine_tuning/jobs", json=body), status)
            assert param in (error["param"] or "") + error["message"], (body, error)
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100).data] == before


def test_another_org_cannot_train_on_the_file(lora_server: Server, files: Files) -> None:
    stranger = create_org(lora_server)
    theirs = api(lora_server, stranger)
    own = upload(theirs, "mine.jsonl", chat_jsonl(CITIES[:2]))
    with lora_server.client(stranger.api_key) as http:
        body = {"model": BASE, "training_file": files.training}
        assert assert_error(http.post("/v1/fine_tuning/jobs", json=body), 404)["param"] == (
            "training_file"
        )
        body = {"model": BASE, "training_file": own, "validation_file": files.validation}
        assert assert_error(http.post("/v1/fine_tuning/jobs", json=body), 404)["param"] == (
            "validation_file"
        )
    assert theirs.fine_tuning.jobs.list().data == []


@pytest.mark.slow
def test_another_org_gets_404_for_the_job_and_the_fine_tuned_model(trained: Trained) -> None:
    stranger = create_org(trained.server)
    model, job = trained.job.fine_tuned_model, trained.job
    theirs = api(trained.server, stranger)
    assert theirs.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        theirs.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        theirs.fine_tuning.jobs.list_events(job.id)
    with pytest.raises(openai.NotFoundError):
        theirs.fine_tuning.jobs.checkpoints.list(job.id)
    assert model not in [m.id for m in theirs.models.list().data]
    with trained.server.client(stranger.api_key) as http:
        assert_error(http.post(f"/v1/fine_tuning/jobs/{job.id}/cancel"), 404)
        assert_error(http.get(f"/v1/models/{model}"), 404)
        assert_error(http.get(f"/v1/models/{model}/versions"), 404)
        assert_error(http.get(f"/v1/models/{model}/versions/1/artifacts/adapter.gguf"), 404)
