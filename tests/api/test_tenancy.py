"""Organisations, projects and keys through the HTTP API, as an org admin uses them."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Org, Server, assert_error, create_org


def test_new_org_key_works_with_the_openai_client(server: Server, org: Org) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=org.api_key, max_retries=0)
    assert list(client.models.list()) == []
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"


def test_org_names_are_unique(server: Server, org: Org) -> None:
    with server.client(server.admin_key) as client:
        assert_error(client.post("/v1/organizations", json={"name": org.name}), 409, "conflict")


def test_orgs_see_only_themselves(server: Server, org: Org, other_org: Org) -> None:
    with server.client(org.api_key) as client:
        listed = client.get("/v1/organizations").json()
        own = client.get(f"/v1/organizations/{org.id}")
    assert [o["id"] for o in listed["data"]] == [org.id]
    assert own.json()["name"] == org.name
    with server.client(server.admin_key) as client:
        everyone = []
        after = None
        while True:
            params = {"limit": 2, **({"after": after} if after else {})}
            page = client.get("/v1/organizations", params=params).json()
            everyone += [o["id"] for o in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
    assert {org.id, other_org.id} <= set(everyone)
    assert len(everyone) == len(set(everyone))


def test_project_lifecycle(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        created = client.post("/v1/projects", json={"name": "research"})
        assert created.status_code == 201
        project = created.json()
        assert project["organization_id"] == org.id
        assert project["status"] == "active" and not project["is_default"]
        assert_error(client.post("/v1/projects", json={"name": "research"}), 409)
        renamed = client.post(f"/v1/projects/{project['id']}", json={"name": "research-2"})
        assert renamed.json()["name"] == "research-2"
        assert client.get(f"/v1/projects/{project['id']}").json()["name"] == "research-2"
        listed = [p["id"] for p in client.get("/v1/projects").json()["data"]]
        assert listed == [org.project_id, project["id"]]
        assert client.post(f"/v1/projects/{project['id']}/archive").json()["archived_at"]
        active = [p["id"] for p in client.get("/v1/projects").json()["data"]]
        assert active == [org.project_id]
        every = client.get("/v1/projects", params={"include_archived": "true"}).json()["data"]
        assert len(every) == 2
        assert_error(client.post(f"/v1/projects/{org.project_id}/archive"), 400)


def test_key_secret_is_shown_once_and_never_listed(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        created = client.post("/v1/api_keys", json={"name": "ci", "role": "developer"}).json()
        assert created["value"].startswith("sk-aiaas-")
        assert created["project_id"] == org.project_id
        assert "admin" not in created["scopes"] and "training" in created["scopes"]
        fetched = client.get(f"/v1/api_keys/{created['id']}").json()
        listed = client.get("/v1/api_keys").text
    assert "value" not in fetched
    assert created["value"] not in listed
    assert created["value"][-4:] == fetched["redacted_value"][-4:]
    assert created["value"][:-4] not in fetched["redacted_value"]


def test_key_listing_pages_and_filters(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        project = client.post("/v1/projects", json={"name": "paging"}).json()
        made = [
            client.post("/v1/api_keys", json={"name": f"k{i}", "project_id": project["id"]}).json()[
                "id"
            ]
            for i in range(5)
        ]
        seen, after = [], None
        while True:
            params = {
                "limit": 2,
                "project_id": project["id"],
                **({"after": after} if after else {}),
            }
            page = client.get("/v1/api_keys", params=params).json()
            seen += [k["id"] for k in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == made
        client.delete(f"/v1/api_keys/{made[0]}")
        live = client.get("/v1/api_keys", params={"project_id": project["id"]}).json()["data"]
        assert [k["id"] for k in live] == made[1:]
        every = client.get(
            "/v1/api_keys", params={"project_id": project["id"], "include_revoked": "true"}
        ).json()["data"]
        assert len(every) == 5


def test_key_last_used_is_recorded(server: Server) -> None:
    org = create_org(server)
    with server.client(org.api_key) as client:
        key = client.post("/v1/api_keys", json={"name": "u", "role": "reader"}).json()
        assert key["last_used_at"] is None
        with server.client(key["value"]) as user:
            assert user.get("/v1/models").status_code == 200
        assert client.get(f"/v1/api_keys/{key['id']}").json()["last_used_at"] is not None


def test_metrics_for_the_platform_admin(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        client.get("/v1/projects")
    with server.client(server.admin_key) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "aiaas_http_requests_total" in text
    assert f'org="{org.id}"' in text
    assert 'route="/v1/projects"' in text
    assert "aiaas_http_request_duration_seconds_bucket" in text
