"""Authentication and authorisation: who may call what, and what everyone else sees."""

from __future__ import annotations

import time

import openai
import pytest

from tests.conftest import Org, Server, assert_error, create_org


def _create_key(server: Server, org: Org, **body: object) -> dict:
    with server.client(org.api_key) as client:
        response = client.post("/v1/api_keys", json={"name": "k", **body})
    assert response.status_code == 201, response.text
    return response.json()


def test_missing_key_gets_401(server: Server) -> None:
    with server.client() as client:
        error = assert_error(client.get("/v1/models"), 401, "invalid_api_key")
    assert "API key" in error["message"]


@pytest.mark.parametrize(
    "token",
    [
        "not-a-key",
        "sk-aiaas-",
        "sk-aiaas-zzzzzzzzzzzzzzzz-" + "a" * 43,
        "sk-aiaas-0123456789abcdef-short",
        "sk-aiaas-0123456789abcdef-" + "a" * 43,  # well-formed, unknown id
    ],
)
def test_malformed_or_unknown_key_gets_401(server: Server, token: str) -> None:
    with server.client(token) as client:
        assert_error(client.get("/v1/models"), 401, "invalid_api_key")


def test_wrong_secret_for_real_key_id_gets_401(server: Server, org: Org) -> None:
    forged = org.api_key[:-4] + ("AAAA" if not org.api_key.endswith("AAAA") else "BBBB")
    with server.client(forged) as client:
        assert_error(client.get("/v1/models"), 401, "invalid_api_key")


def test_non_bearer_scheme_gets_401(server: Server, org: Org) -> None:
    with server.client(Authorization=f"Basic {org.api_key}") as client:
        response = client.get("/v1/models")
    assert_error(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"


def test_openai_client_with_bad_key_raises_authentication_error(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-aiaas-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.code == "invalid_api_key"


def test_revoked_key_gets_401(server: Server, org: Org) -> None:
    key = _create_key(server, org, role="reader")
    with server.client(key["value"]) as client:
        assert client.get("/v1/models").status_code == 200
    with server.client(org.api_key) as admin:
        revoked = admin.delete(f"/v1/api_keys/{key['id']}")
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    with server.client(key["value"]) as client:
        error = assert_error(client.get("/v1/models"), 401, "invalid_api_key")
    assert "revoked" in error["message"]


def test_expired_key_gets_401(server: Server, org: Org) -> None:
    key = _create_key(server, org, role="reader", expires_in=1)
    assert key["expires_at"] is not None
    deadline = time.monotonic() + 15
    with server.client(key["value"]) as client:
        while time.monotonic() < deadline:
            response = client.get("/v1/models")
            if response.status_code == 401:
                break
            assert response.status_code == 200
            time.sleep(0.2)
    error = assert_error(response, 401, "invalid_api_key")
    assert "expired" in error["message"]


def test_key_without_scope_gets_403(server: Server, org: Org) -> None:
    key = _create_key(server, org, scopes=["inference"])
    with server.client(key["value"]) as client:
        assert_error(client.get("/v1/models"), 403, "insufficient_permissions")
        error = assert_error(client.get("/v1/projects"), 403, "insufficient_permissions")
        assert "admin" in error["message"]
        assert_error(client.get("/v1/audit"), 403)
        assert_error(client.get("/metrics"), 403)


def test_org_admin_is_not_platform_admin(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        assert_error(client.post("/v1/organizations", json={"name": "x"}), 403)
        assert_error(client.get("/metrics"), 403)
        assert_error(client.get("/v1/audit/verify"), 403)


def test_other_orgs_objects_are_404(server: Server, org: Org, other_org: Org) -> None:
    other_key = _create_key(server, other_org, role="reader")
    with server.client(org.api_key) as client:
        assert_error(client.get(f"/v1/projects/{other_org.project_id}"), 404)
        assert_error(client.post(f"/v1/projects/{other_org.project_id}", json={"name": "x"}), 404)
        assert_error(client.post(f"/v1/projects/{other_org.project_id}/archive"), 404)
        assert_error(client.get(f"/v1/api_keys/{other_key['id']}"), 404)
        assert_error(client.delete(f"/v1/api_keys/{other_key['id']}"), 404)
        assert_error(client.get(f"/v1/organizations/{other_org.id}"), 404)
        assert_error(
            client.post("/v1/api_keys", json={"name": "x", "project_id": other_org.project_id}), 404
        )
        # Naming the other org in the header does not help either.
        assert_error(client.get("/v1/projects", headers={"OpenAI-Organization": other_org.id}), 404)
    with server.client(other_key["value"]) as client:
        assert client.get("/v1/models").status_code == 200  # untouched by the attempts


def test_archived_projects_keys_stop_working(server: Server, org: Org) -> None:
    with server.client(org.api_key) as admin:
        project = admin.post("/v1/projects", json={"name": "temp"}).json()
    key = _create_key(server, org, role="reader", project_id=project["id"])
    with server.client(key["value"]) as client:
        assert client.get("/v1/models").status_code == 200
    with server.client(org.api_key) as admin:
        archived = admin.post(f"/v1/projects/{project['id']}/archive")
        assert archived.json()["status"] == "archived"
        assert_error(
            admin.post("/v1/api_keys", json={"name": "late", "project_id": project["id"]}), 400
        )
    with server.client(key["value"]) as client:
        assert_error(client.get("/v1/models"), 401, "invalid_api_key")


def test_platform_admin_acts_in_an_org_through_the_header(server: Server) -> None:
    org = create_org(server)
    with server.client(server.admin_key) as client:
        assert_error(client.get("/v1/projects"), 400)
        listed = client.get("/v1/projects", headers={"OpenAI-Organization": org.id})
        assert listed.status_code == 200
        assert [p["id"] for p in listed.json()["data"]] == [org.project_id]
        assert_error(client.get("/v1/projects", headers={"OpenAI-Organization": "org_nope"}), 404)


def test_key_lifetime_is_capped_by_the_setting(make_server) -> None:
    server = make_server("sqlite", max_key_lifetime_days="1")
    server.start()
    org = create_org(server)
    with server.client(org.api_key) as client:
        error = assert_error(
            client.post("/v1/api_keys", json={"name": "long", "expires_in": 2 * 86400}), 400
        )
        assert error["param"] == "expires_in"
        ok = client.post("/v1/api_keys", json={"name": "short", "expires_in": 3600})
    assert ok.status_code == 201
    server.stop()
