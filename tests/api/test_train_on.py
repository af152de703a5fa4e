"""`train-on` without download: org B trains on org A's dataset, never reads it.

A grants B `train-on` on one dataset version. B's job trains and registers a model that is B's
(A gets a 404 for it), whose lineage names A's dataset version and the grant; every route that
would show B the rows stays a 404; the server's and the workers' logs hold none of A's values.
Revoking the grant fails B's next job at its start and a running job at its next checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

from tests.api.test_fine_tuning import (
    api,
    make_dataset,
    registered_version,
    tabular_frame,
    train,
    wait_for_status,
)
from tests.conftest import Org, Server, assert_error, create_org

FRAME = tabular_frame(240, seed=21)


def grant_train_on(server: Server, a: Org, b: Org, dataset: dict[str, Any]) -> dict[str, Any]:
    with server.client(a.api_key) as http:
        response = http.post(
            "/v1/grants",
            json={
                "grantee": b.name,
                "object_type": "dataset",
                "object_id": dataset["id"],
                "version": 1,
                "permission": "train-on",
            },
        )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def orgs(server: Server) -> tuple[Org, Org, dict[str, Any]]:
    a, b = create_org(server), create_org(server)
    dataset = make_dataset(server, a, "private.csv", FRAME.to_csv(index=False).encode())
    return a, b, dataset


def test_a_grantee_trains_on_data_it_cannot_read_and_owns_the_model(
    server: Server, orgs: tuple[Org, Org, dict[str, Any]]
) -> None:
    a, b, dataset = orgs
    version_id = dataset["version"]["id"]
    with pytest.raises(openai.NotFoundError):  # no grant yet: like any other org's object
        api(server, b).fine_tuning.jobs.create(model="mlp", training_file=version_id)
    made = grant_train_on(server, a, b, dataset)
    job = train(api(server, b), version_id, n_epochs=2)
    assert job.fine_tuned_model is not None
    version = registered_version(server, b, job)
    assert version["lineage"]["dataset_version_id"] == version_id
    assert version["lineage"]["grant_id"] == made["id"]
    assert version["lineage"]["dataset_owner_org_id"] == a.id
    # The model is B's: A cannot see it.
    with server.client(a.api_key) as http:
        assert_error(http.get(f"/v1/models/{job.fine_tuned_model}"), 404)
    # Nothing shows B the rows, the profile or the source file.
    file_id = dataset["version"]["source_file_ids"][0]
    with server.client(b.api_key) as http:
        for url in (
            f"/v1/datasets/{dataset['id']}",
            f"/v1/datasets/{dataset['id']}/versions",
            f"/v1/datasets/{dataset['id']}/versions/1",
            f"/v1/datasets/{dataset['id']}/versions/1/rows",
            f"/v1/datasets/{dataset['id']}/versions/1/content",
            f"/v1/files/{file_id}",
            f"/v1/files/{file_id}/content",
        ):
            assert_error(http.get(url), 404)
        assert dataset["id"] not in [d["id"] for d in http.get("/v1/datasets").json()["data"]]
    # Neither the server nor its workers logged a value of A's rows.
    logs = server.stdout_path.read_text(errors="replace") + server.stderr_path.read_text(
        errors="replace"
    )
    values = [str(v) for v in FRAME["a"].tolist() + FRAME["b"].tolist() if len(str(v)) >= 6]
    assert len(values) > 100
    assert [v for v in values if v in logs] == []
    with server.client(a.api_key) as http:
        assert http.delete(f"/v1/grants/{made['id']}").status_code == 200


def test_a_revoked_grant_fails_the_next_job_and_stops_a_running_one(
    server: Server, orgs: tuple[Org, Org, dict[str, Any]]
) -> None:
    a, b, dataset = orgs
    client = api(server, b)
    made = grant_train_on(server, a, b, dataset)
    long_job = client.fine_tuning.jobs.create(
        model="mlp",
        training_file=dataset["version"]["id"],
        hyperparameters={"n_epochs": 1000, "batch_size": 16},
    )
    deadline = time.monotonic() + 300
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long_job.id)):
        assert time.monotonic() < deadline, "the long job never finished an epoch"
        time.sleep(0.5)
    with server.client(a.api_key) as http:
        assert http.delete(f"/v1/grants/{made['id']}").status_code == 200
    failed = wait_for_status(client, long_job.id, "failed")
    assert failed.error is not None and failed.error.code == "grant_revoked"
    assert made["id"] in failed.error.message
    # A new job on the same data is a 404 at once: the grant is gone.
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="mlp", training_file=dataset["version"]["id"])
