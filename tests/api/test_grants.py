"""Grants through HTTP: create, list, retrieve, revoke, expire; the catalogue; the audit trail.

Three organisations on the real server (SQLite and PostgreSQL): A owns a dataset and grants it,
B receives, C is a bystander who must see nothing of it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.api.test_fine_tuning import make_dataset, tabular_csv
from tests.conftest import Org, Server, assert_error, create_org


def grant(server: Server, owner: Org, **body: Any) -> dict[str, Any]:
    with server.client(owner.api_key) as http:
        response = http.post("/v1/grants", json=body)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def three(server: Server) -> tuple[Org, Org, Org, dict[str, Any]]:
    a, b, c = create_org(server), create_org(server), create_org(server)
    dataset = make_dataset(server, a, "points.csv", tabular_csv(60), label_column="label")
    return a, b, c, dataset


def test_a_grant_is_created_by_name_listed_both_ways_and_retrieved(
    server: Server, three: tuple[Org, Org, Org, dict[str, Any]]
) -> None:
    a, b, c, dataset = three
    made = grant(
        server,
        a,
        grantee=b.name,
        object_type="dataset",
        object_id=dataset["id"],
        permission="train-on",
        version=1,
    )
    assert made["object"] == "grant"
    assert made["organization_id"] == a.id and made["grantee"] == b.id
    assert made["permission"] == "train-on" and made["version"] == 1
    assert made["status"] == "active" and made["revoked_at"] is None
    with server.client(a.api_key) as http:
        given = http.get("/v1/grants", params={"direction": "given"}).json()["data"]
        assert made["id"] in [g["id"] for g in given]
        assert http.get("/v1/grants", params={"direction": "received"}).json()["data"] == []
    with server.client(b.api_key) as http:
        received = http.get("/v1/grants", params={"direction": "received"}).json()["data"]
        assert [g["id"] for g in received] == [made["id"]]
        assert http.get(f"/v1/grants/{made['id']}").json() == made
    with server.client(c.api_key) as http:
        assert_error(http.get(f"/v1/grants/{made['id']}"), 404)
        assert_error(http.delete(f"/v1/grants/{made['id']}"), 404)
    with server.client(b.api_key) as http:  # the grantee cannot revoke
        assert_error(http.delete(f"/v1/grants/{made['id']}"), 404)


def test_bad_grants_are_refused_with_the_right_status(
    server: Server, three: tuple[Org, Org, Org, dict[str, Any]]
) -> None:
    a, b, _c, dataset = three
    base = {"grantee": b.id, "object_type": "dataset", "object_id": dataset["id"]}
    with server.client(a.api_key) as http:
        # Not the caller's object: 404, like anything of another tenant's.
        assert_error(
            http.post("/v1/grants", json={**base, "object_id": "ds_nope", "permission": "use"}), 404
        )
        assert_error(
            http.post("/v1/grants", json={**base, "permission": "read", "version": 9}), 404
        )
        # Oneself or an unknown organisation: 400.
        assert_error(
            http.post("/v1/grants", json={**base, "grantee": a.id, "permission": "use"}), 400
        )
        assert_error(
            http.post("/v1/grants", json={**base, "grantee": "org-nobody", "permission": "use"}),
            400,
        )
        assert_error(http.post("/v1/grants", json={**base, "permission": "own"}), 400)
        assert_error(
            http.post("/v1/grants", json={**base, "permission": "use", "expires_at": 1}), 400
        )
        # A deployment is used, never read, and never public.
        assert_error(
            http.post(
                "/v1/grants", json={**base, "object_type": "deployment", "permission": "use"}
            ),
            404,
        )
    with server.client(b.api_key) as http:  # B cannot grant A's dataset
        assert_error(
            http.post("/v1/grants", json={**base, "grantee": a.id, "permission": "use"}), 404
        )
    # Only an admin key grants.
    with server.client(a.api_key) as http:
        reader = http.post("/v1/api_keys", json={"name": "r", "role": "reader"})
    assert reader.status_code == 201, reader.text
    with server.client(reader.json()["value"]) as http:
        assert_error(http.post("/v1/grants", json={**base, "permission": "use"}), 403)


def test_revoke_and_expiry_end_a_grant_and_the_audit_log_holds_both(
    server: Server, three: tuple[Org, Org, Org, dict[str, Any]]
) -> None:
    a, b, _c, dataset = three
    made = grant(
        server, a, grantee=b.id, object_type="dataset", object_id=dataset["id"], permission="use"
    )
    with server.client(a.api_key) as http:
        revoked = http.delete(f"/v1/grants/{made['id']}")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"] is not None
        again = http.delete(f"/v1/grants/{made['id']}")  # idempotent
        assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    soon = grant(
        server,
        a,
        grantee=b.id,
        object_type="dataset",
        object_id=dataset["id"],
        permission="use",
        expires_at=int(time.time()) + 2,
    )
    time.sleep(3)
    with server.client(b.api_key) as http:
        assert http.get(f"/v1/grants/{soon['id']}").json()["status"] == "expired"
    with server.client(a.api_key) as http:
        events = http.get("/v1/audit", params={"limit": 100}).json()["data"]
    actions = {(e["type"], e["target"]["id"]) for e in events}
    assert ("grant.created", made["id"]) in actions
    assert ("grant.revoked", made["id"]) in actions
    assert ("grant.expired", soon["id"]) in actions
    expired = [e for e in events if e["type"] == "grant.expired"]
    assert len([e for e in expired if e["target"]["id"] == soon["id"]]) == 1
    created = next(
        e for e in events if e["type"] == "grant.created" and e["target"]["id"] == made["id"]
    )
    assert created["data"]["grantee_org_id"] == b.id
    with server.client(server.admin_key) as http:
        assert http.get("/v1/audit/verify").json()["ok"] is True


def test_a_public_grant_is_in_every_organisations_catalogue_until_revoked(
    server: Server, three: tuple[Org, Org, Org, dict[str, Any]]
) -> None:
    a, _b, c, dataset = three
    public = grant(
        server,
        a,
        grantee="*",
        object_type="dataset",
        object_id=dataset["id"],
        permission="train-on",
        version=1,
    )
    assert public["grantee"] == "*"
    with server.client(c.api_key) as http:
        entries = http.get("/v1/catalog", params={"limit": 100}).json()["data"]
    entry = next(e for e in entries if e["id"] == public["id"])
    assert entry["object"] == "catalog.entry"
    assert entry["owned_by"] == a.name and entry["owner_id"] == a.id
    assert (entry["object_type"], entry["object_id"], entry["version"]) == (
        "dataset",
        dataset["id"],
        1,
    )
    with server.client(a.api_key) as http:
        assert http.delete(f"/v1/grants/{public['id']}").status_code == 200
    with server.client(c.api_key) as http:
        entries = http.get("/v1/catalog", params={"limit": 100}).json()["data"]
    assert public["id"] not in [e["id"] for e in entries]


def test_deleting_an_object_revokes_its_grants(
    server: Server, three: tuple[Org, Org, Org, dict[str, Any]]
) -> None:
    a, b, c, _dataset = three
    doomed = make_dataset(server, a, "doomed.csv", tabular_csv(40), label_column="label")
    made = grant(
        server, a, grantee="*", object_type="dataset", object_id=doomed["id"], permission="read"
    )
    with server.client(a.api_key) as http:
        assert http.delete(f"/v1/datasets/{doomed['id']}").status_code == 200
        assert http.get(f"/v1/grants/{made['id']}").json()["status"] == "revoked"
    with server.client(c.api_key) as http:
        entries = http.get("/v1/catalog", params={"limit": 100}).json()["data"]
    assert made["id"] not in [e["id"] for e in entries]
    with server.client(b.api_key) as http:
        assert_error(http.get(f"/v1/datasets/{doomed['id']}"), 404)
