"""Sharing a deployment across organisations: listed, called, billed to the grantee, capped,
revoked. Org A trains and deploys a classifier and grants B `use`; C holds no grant.

B calls it as `<A's name>/<deployment>`, with the official `openai` client for the listing and
plain HTTP for predictions (the OpenAI SDK has no predictions call).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.api.test_deployments import deploy, tabular_csv, train
from tests.api.test_fine_tuning import make_dataset, tabular_frame
from tests.conftest import Org, Server, assert_error, create_org


@dataclass(frozen=True)
class Shared:
    server: Server
    a: Org
    b: Org
    c: Org
    deployment: dict[str, Any]
    model: str  # the registered model A deployed

    @property
    def name(self) -> str:
        """The id B sends: A's name, a slash, the deployment's name."""
        return f"{self.a.name}/{self.deployment['name']}"

    def http(self, org: Org) -> httpx.Client:
        return self.server.client(org.api_key)

    def grant(self, **body: Any) -> dict[str, Any]:
        payload = {
            "grantee": self.b.id,
            "object_type": "deployment",
            "object_id": self.deployment["id"],
            "permission": "use",
            **body,
        }
        with self.http(self.a) as http:
            response = http.post("/v1/grants", json=payload)
        assert response.status_code == 201, response.text
        return response.json()

    def revoke(self, grant_id: str) -> None:
        with self.http(self.a) as http:
            assert http.delete(f"/v1/grants/{grant_id}").status_code == 200


ROWS = tabular_frame(3, seed=11).to_dict(orient="records")


def predict(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/predictions", json={"model": model, "records": ROWS})


@pytest.fixture(scope="module")
def shared(server: Server) -> Shared:
    a, b, c = create_org(server), create_org(server), create_org(server)
    dataset = make_dataset(server, a, "points.csv", tabular_csv(rows=200))
    job = train(server, a, dataset["version"]["id"], n_epochs=2, suffix="shared")
    with server.client(a.api_key) as http:
        deployment = deploy(http, model=job.fine_tuned_model, name="shared-points")
    return Shared(server, a, b, c, deployment, job.fine_tuned_model)


def test_without_a_grant_another_organisation_gets_404(shared: Shared) -> None:
    for org in (shared.b, shared.c):
        with shared.http(org) as http:
            assert_error(predict(http, shared.name), 404, "model_not_found")
            assert_error(predict(http, shared.deployment["name"]), 404, "model_not_found")


def test_a_grantee_lists_and_calls_the_shared_deployment_and_is_billed_for_it(
    shared: Shared,
) -> None:
    made = shared.grant()
    try:
        client = openai.OpenAI(
            base_url=f"{shared.server.base_url}/v1", api_key=shared.b.api_key, max_retries=0
        )
        listed = {m.id: m for m in client.models.list()}
        assert shared.name in listed
        assert listed[shared.name].owned_by == shared.a.name
        assert client.models.retrieve(shared.name).owned_by == shared.a.name
        with shared.http(shared.b) as http:
            answers = [predict(http, shared.name) for _ in range(3)]
        for response in answers:
            assert response.status_code == 200, response.text
            assert len(response.json()["data"]) == len(ROWS)
        # The Open Inference Protocol takes the same id, slash and all.
        with shared.http(shared.b) as http:
            metadata = http.get(f"/v2/models/{shared.name}")
            assert metadata.status_code == 200, metadata.text
            assert metadata.json()["name"] == shared.name and metadata.json()["inputs"]
            ready = http.get(f"/v2/models/{shared.name}/ready")
            assert ready.status_code == 200 and ready.json()["ready"] is True
        with shared.http(shared.a) as http:
            own = predict(http, shared.deployment["name"]).json()
        assert [r["label"] for r in answers[0].json()["data"]] == [r["label"] for r in own["data"]]
        # C still sees nothing.
        with shared.http(shared.c) as http:
            assert_error(predict(http, shared.name), 404)
        c_models = openai.OpenAI(
            base_url=f"{shared.server.base_url}/v1", api_key=shared.c.api_key, max_retries=0
        ).models.list()
        assert shared.name not in [m.id for m in c_models]
        # Usage: B's own usage holds its three calls; A's shared usage names B and the grant.
        start = int(time.time()) // 86400 * 86400
        with shared.http(shared.b) as http:
            mine = http.get("/v1/usage", params={"start_time": start, "group_by": ["model"]})
        rows = [r for b in mine.json()["data"] for r in b["results"] if r["model"] == shared.name]
        # (B's refused calls of the first test count too, as errors.)
        assert sum(r["num_model_requests"] - r["num_errors"] for r in rows) == 3
        assert sum(r["input_items"] for r in rows) == 3 * len(ROWS)
        with shared.http(shared.a) as http:
            theirs = http.get(
                "/v1/usage",
                params={
                    "start_time": start,
                    "shared": "true",
                    "group_by": ["grant_id", "organization_id"],
                },
            ).json()
            own_usage = http.get(
                "/v1/usage", params={"start_time": start, "group_by": ["model"]}
            ).json()
        results = [r for b in theirs["data"] for r in b["results"]]
        assert [
            (r["grant_id"], r["organization_id"], r["num_model_requests"]) for r in results
        ] == [(made["id"], shared.b.id, 3)]
        own_rows = [r for b in own_usage["data"] for r in b["results"]]
        assert sum(r["num_model_requests"] - r["num_errors"] for r in own_rows) == 1
    finally:
        shared.revoke(made["id"])


def test_a_revoked_grant_stops_answering_on_the_next_request(shared: Shared) -> None:
    made = shared.grant()
    with shared.http(shared.b) as http:
        assert predict(http, shared.name).status_code == 200  # loaded, route cached
        shared.revoke(made["id"])
        assert_error(predict(http, shared.name), 404, "model_not_found")
    client = openai.OpenAI(
        base_url=f"{shared.server.base_url}/v1", api_key=shared.b.api_key, max_retries=0
    )
    assert shared.name not in [m.id for m in client.models.list()]


def test_an_expired_grant_stops_answering(shared: Shared) -> None:
    shared.grant(expires_at=int(time.time()) + 2)
    with shared.http(shared.b) as http:
        assert predict(http, shared.name).status_code == 200
        time.sleep(2.5)
        assert_error(predict(http, shared.name), 404, "model_not_found")


def test_a_capped_grant_answers_429_past_its_requests_per_minute(shared: Shared) -> None:
    made = shared.grant(max_requests_per_minute=2)
    try:
        with shared.http(shared.b) as http:
            statuses = [predict(http, shared.name).status_code for _ in range(2)]
            refused = predict(http, shared.name)
        assert statuses == [200, 200]
        assert_error(refused, 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert made["id"] in refused.json()["error"]["message"]
        # The cap is the grant's, not B's: A calls its own deployment as it likes.
        with shared.http(shared.a) as http:
            assert predict(http, shared.deployment["name"]).status_code == 200
    finally:
        shared.revoke(made["id"])


def test_a_grant_with_a_spent_monthly_token_quota_answers_429(shared: Shared) -> None:
    made = shared.grant(monthly_tokens=len(ROWS))  # one call's items
    try:
        with shared.http(shared.b) as http:
            assert predict(http, shared.name).status_code == 200
            # Usage is recorded once a response has gone out: the next call may still race it.
            deadline = time.monotonic() + 10
            while (refused := predict(http, shared.name)).status_code == 200:
                assert time.monotonic() < deadline, "the grant's quota never took effect"
                time.sleep(0.2)
        assert_error(refused, 429, "insufficient_quota")
        assert made["id"] in refused.json()["error"]["message"]
    finally:
        shared.revoke(made["id"])


def test_a_model_shared_for_use_is_deployed_and_served_by_the_grantee(shared: Shared) -> None:
    body = {"model": shared.model, "name": "borrowed"}
    with shared.http(shared.b) as http:
        assert_error(http.post("/v1/deployments", json=body), 404)  # no grant: no such model
    with shared.http(shared.a) as http:
        response = http.post(
            "/v1/grants",
            json={
                "grantee": shared.b.id,
                "object_type": "model",
                "object_id": shared.model,
                "version": 1,
                "permission": "use",
            },
        )
    assert response.status_code == 201, response.text
    made = response.json()
    client = openai.OpenAI(
        base_url=f"{shared.server.base_url}/v1", api_key=shared.b.api_key, max_retries=0
    )
    assert client.models.retrieve(shared.model).owned_by == shared.a.name
    assert shared.model in [m.id for m in client.models.list()]
    with shared.http(shared.b) as http:
        created = http.post("/v1/deployments", json=body)
        assert created.status_code == 201, created.text
        answer = predict(http, "borrowed")
        assert answer.status_code == 200, answer.text
        assert answer.json()["registered_model"] == shared.model
        assert answer.json()["model_version"] == 1
        # A version the grant does not cover is not B's to deploy.
        assert_error(http.post("/v1/deployments", json={**body, "name": "v2", "version": 2}), 404)
    with shared.http(shared.c) as http:  # B's deployment is B's: C sees nothing
        assert_error(predict(http, "borrowed"), 404)
        assert_error(predict(http, f"{shared.b.name}/borrowed"), 404)
    shared.revoke(made["id"])
    with shared.http(shared.b) as http:  # loaded and routed, yet it stops at once
        assert_error(predict(http, "borrowed"), 404, "model_not_found")
