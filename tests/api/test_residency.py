"""Data residency: regions on organisations and datasets, and what a strict dataset refuses.

A node in region `eu-north` holds a strict dataset of org A. A `read` grant to an organisation
of another region, or to everyone, is a 403 `residency_violation` naming both regions; `read`
within the region and `train-on` are fine. The same node restarted as `us-east` refuses a job on
that dataset, while a dataset without strict residency still trains there. Every refusal is in
the audit log, and the chain verifies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.api.test_fine_tuning import api, make_dataset, tabular_csv
from tests.conftest import Org, Server, assert_error, create_org


@pytest.fixture(scope="module")
def eu_server(make_server: Callable[..., Server]) -> Iterator[Server]:
    server = make_server("sqlite", region="eu-north")
    server.start()
    yield server
    server.stop()


def org_in(server: Server, region: str | None = None) -> Org:
    if region is None:
        return create_org(server)
    with server.client(server.admin_key) as http:
        response = http.post(
            "/v1/organizations", json={"name": f"org-{region}-{server.starts}", "region": region}
        )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["region"] == region
    return Org(body["id"], body["name"], body["project_id"], body["api_key"])


def grant(server: Server, owner: Org, grantee: str, dataset: dict[str, Any], permission: str):
    with server.client(owner.api_key) as http:
        return http.post(
            "/v1/grants",
            json={
                "grantee": grantee,
                "object_type": "dataset",
                "object_id": dataset["id"],
                "permission": permission,
            },
        )


def test_a_strict_dataset_stays_in_its_region(eu_server: Server) -> None:
    a = org_in(eu_server)
    with eu_server.client(a.api_key) as http:
        assert http.get(f"/v1/organizations/{a.id}").json()["region"] == "eu-north"
    strict = make_dataset(eu_server, a, "strict.csv", tabular_csv(60), residency="strict")
    loose = make_dataset(eu_server, a, "loose.csv", tabular_csv(60))
    assert (strict["region"], strict["residency"]) == ("eu-north", "strict")
    assert (loose["region"], loose["residency"]) == ("eu-north", "none")

    us, eu = org_in(eu_server, "us-east"), org_in(eu_server, "eu-north")
    for grantee in (us.id, us.name, "*"):
        error = assert_error(
            grant(eu_server, a, grantee, strict, "read"), 403, "residency_violation"
        )
        assert "eu-north" in error["message"], error
        if grantee != "*":
            assert "us-east" in error["message"], error
    # Within the region, and for training without reading, a strict dataset is shared.
    assert grant(eu_server, a, eu.id, strict, "read").status_code == 201
    assert grant(eu_server, a, us.id, strict, "train-on").status_code == 201
    # A dataset without strict residency is readable from anywhere.
    assert grant(eu_server, a, us.id, loose, "read").status_code == 201

    # The same data on a node that says it is in us-east: no job may use the strict dataset.
    eu_server.stop()
    eu_server.env["AIAAS_REGION"] = "us-east"
    eu_server.start()
    try:
        with eu_server.client(a.api_key) as http:
            refused = http.post(
                "/v1/fine_tuning/jobs",
                json={"model": "mlp", "training_file": strict["version"]["id"]},
            )
        error = assert_error(refused, 403, "residency_violation")
        assert "eu-north" in error["message"] and "us-east" in error["message"], error
        job = api(eu_server, a).fine_tuning.jobs.create(
            model="mlp", training_file=loose["version"]["id"]
        )
        api(eu_server, a).fine_tuning.jobs.cancel(job.id)
        # New organisations here are labelled with the node's region.
        assert org_in(eu_server).id
        with eu_server.client(eu_server.admin_key) as http:
            orgs = http.get("/v1/organizations", params={"limit": 100}).json()["data"]
            assert orgs[-1]["region"] == "us-east"
            assert http.get("/v1/audit/verify").json()["ok"] is True
        with eu_server.client(a.api_key) as http:
            events = http.get("/v1/audit", params={"limit": 100}).json()["data"]
        refusals = [e for e in events if e["type"] == "residency.refused"]
        assert len(refusals) == 4  # three grants and one job
        assert {e["target"]["id"] for e in refusals} == {strict["id"]}
        assert {e["data"]["grantee_org_id"] for e in refusals} == {us.id, None}
    finally:
        eu_server.stop()
        eu_server.env["AIAAS_REGION"] = "eu-north"
        eu_server.start()
