"""What survives a restart, what the first start creates, and tamper evidence on disk."""

from __future__ import annotations

import json
import sqlite3
import stat
import time
from collections.abc import Callable

import pytest

from tests.conftest import BACKENDS, Server, create_org


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_survives_a_restart(make_server: Callable[..., Server], backend: str) -> None:
    server = make_server(backend)
    server.start()
    admin_key = server.admin_key
    org = create_org(server, "persistent")
    with server.client(org.api_key) as client:
        key = client.post("/v1/api_keys", json={"name": "kept", "role": "reader"}).json()
        audit_before = client.get("/v1/audit", params={"limit": 100}).json()["data"]
    server.stop()

    server.start()
    assert server.admin_key == admin_key
    assert "platform-admin API key" not in server.stdout_path.read_text()
    with server.client(key["value"]) as client:
        assert client.get("/v1/models").status_code == 200
    with server.client(org.api_key) as client:
        assert client.get(f"/v1/api_keys/{key['id']}").json()["name"] == "kept"
        audit_after = client.get("/v1/audit", params={"limit": 100}).json()["data"]
    with server.client(admin_key) as client:
        orgs = client.get("/v1/organizations").json()["data"]
        report = client.get("/v1/audit/verify").json()
    assert [o["name"] for o in orgs] == ["persistent"]
    assert audit_after == audit_before
    assert report["ok"] is True
    verify = server.cli("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_first_start_prints_and_saves_the_admin_key(make_server: Callable[..., Server]) -> None:
    server = make_server("sqlite")
    server.start()
    key_file = server.data_dir / "admin-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    printed = server.stdout_path.read_text()
    assert printed.count(server.admin_key) == 1
    # Secrets never reach the logs.
    org = create_org(server)
    server.stop()
    logs = server.stderr_path.read_text()
    assert server.admin_key not in logs and org.api_key not in logs


def test_logs_are_json_with_the_request_id(sqlite_server: Server) -> None:
    headers_id = "log-probe-7f3a"
    with sqlite_server.client() as client:
        client.get("/health", headers={"x-request-id": headers_id})
    deadline = time.monotonic() + 10
    while True:  # the access line is written just after the response is sent
        text = sqlite_server.stderr_path.read_text()
        lines = [json.loads(line) for line in text.splitlines()]
        access = [line for line in lines if line.get("request_id") == headers_id]
        if access or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert access, lines[-5:]
    assert access[0]["status"] == 200 and access[0]["route"] == "/health"
    assert {"ts", "level", "logger", "message"} <= set(access[0])


def test_cli_creates_an_org_while_the_server_runs(sqlite_server: Server) -> None:
    result = sqlite_server.cli("org", "create", "from-cli", "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert set(created) == {"id", "name", "project_id", "api_key"}
    assert created["name"] == "from-cli"
    with sqlite_server.client(created["api_key"]) as client:
        projects = client.get("/v1/projects").json()["data"]
    assert [p["id"] for p in projects] == [created["project_id"]]
    again = sqlite_server.cli("org", "create", "from-cli", "--json")
    assert again.returncode != 0
    assert "already exists" in again.stdout + again.stderr


def test_tampered_audit_event_breaks_the_chain(make_server: Callable[..., Server]) -> None:
    server = make_server("sqlite")
    server.start()
    create_org(server, "victim")
    server.stop()
    with sqlite3.connect(server.data_dir / "aiaas.db") as db:
        db.execute('UPDATE audit_events SET data = \'{"name":"forged"}\' WHERE seq = 2')
    result = server.cli("audit", "verify")
    assert result.returncode == 1
    assert "BROKEN at event 2" in result.stdout
    with sqlite3.connect(server.data_dir / "aiaas.db") as db:
        db.execute("DELETE FROM audit_events WHERE seq = (SELECT max(seq) FROM audit_events)")
        db.execute('UPDATE audit_events SET data = \'{"name":"victim"}\' WHERE seq = 2')
    result = server.cli("audit", "verify")
    assert result.returncode == 1, result.stdout
