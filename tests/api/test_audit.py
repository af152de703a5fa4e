"""The audit log over HTTP and the CLI: complete, scoped to its org, and tamper-evident."""

from __future__ import annotations

from tests.conftest import Org, Server, assert_error, create_org


def _events(server: Server, key: str, **params: str) -> list[dict]:
    out, after = [], None
    with server.client(key) as client:
        while True:
            query = {"limit": 50, **params, **({"after": after} if after else {})}
            page = client.get("/v1/audit", params=query)
            assert page.status_code == 200, page.text
            body = page.json()
            out += body["data"]
            if not body["has_more"]:
                return out
            after = body["last_id"]


def test_tenancy_actions_are_audited_for_their_org_only(server: Server) -> None:
    org, other = create_org(server), create_org(server)
    with server.client(org.api_key) as client:
        project = client.post("/v1/projects", json={"name": "audited"}).json()
        key = client.post("/v1/api_keys", json={"name": "a", "project_id": project["id"]}).json()
        client.delete(f"/v1/api_keys/{key['id']}")
        client.post(f"/v1/projects/{project['id']}/archive")
    events = _events(server, org.api_key)
    types = [e["type"] for e in reversed(events)]  # newest first on the wire
    assert types == [
        "organization.created",
        "project.created",
        "api_key.created",
        "project.created",
        "api_key.created",
        "api_key.revoked",
        "project.archived",
    ]
    assert {e["organization_id"] for e in events} == {org.id}
    revoked = next(e for e in events if e["type"] == "api_key.revoked")
    assert revoked["target"] == {"type": "api_key", "id": key["id"]}
    assert revoked["actor"]["type"] == "api_key"
    assert key["value"] not in str(events)
    assert {e["organization_id"] for e in _events(server, other.api_key)} == {other.id}


def test_platform_admin_filters_by_org_and_verifies(server: Server, org: Org) -> None:
    scoped = _events(server, server.admin_key, organization_id=org.id)
    assert scoped and {e["organization_id"] for e in scoped} == {org.id}
    with server.client(server.admin_key) as client:
        report = client.get("/v1/audit/verify").json()
    assert report["ok"] is True and report["events"] >= len(scoped)


def test_audit_needs_admin_scope(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        reader = client.post("/v1/api_keys", json={"name": "r", "role": "reader"}).json()
    with server.client(reader["value"]) as client:
        assert_error(client.get("/v1/audit"), 403)


def test_cli_verifies_the_chain(server: Server, org: Org) -> None:
    result = server.cli("audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
