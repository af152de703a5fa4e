"""`aiaas grants create|list|revoke` and `aiaas catalog` against the real server."""

from __future__ import annotations

import json

from tests.cli.test_train_cli import run
from tests.conftest import Server, create_org


def _dataset(server: Server, key: str) -> str:
    lines = ["a,label"] + [f"{i}.5,{'ab'[i % 2]}" for i in range(40)]
    with server.client(key) as http:
        upload = http.post(
            "/v1/files",
            data={"purpose": "dataset"},
            files={"file": ("t.csv", ("\n".join(lines) + "\n").encode())},
        )
        assert upload.status_code == 200, upload.text
        made = http.post("/v1/datasets", json={"name": "shared", "file_ids": [upload.json()["id"]]})
        assert made.status_code == 201, made.text
    return made.json()["id"]


def test_grants_are_created_listed_revoked_and_catalogued_from_the_shell(
    sqlite_server: Server,
) -> None:
    owner, partner = create_org(sqlite_server), create_org(sqlite_server)
    dataset = _dataset(sqlite_server, owner.api_key)

    made = run(
        sqlite_server, owner.api_key, "grants", "create", "dataset", dataset, partner.name,
        "--permission", "train-on", "--version", "1", "--expires-in-days", "7", "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    grant = json.loads(made.stdout)
    assert (grant["grantee"], grant["permission"], grant["version"]) == (partner.id, "train-on", 1)
    assert grant["expires_at"] is not None

    received = run(sqlite_server, partner.api_key, "grants", "list", "--received", "--json")
    assert received.returncode == 0, received.stderr
    assert [g["id"] for g in json.loads(received.stdout)] == [grant["id"]]
    table = run(sqlite_server, owner.api_key, "grants", "list")
    assert table.returncode == 0, table.stderr
    assert "grantee" in table.stdout and "status" in table.stdout

    public = run(
        sqlite_server, owner.api_key, "grants", "create", "dataset", dataset, "*", "--json"
    )
    assert public.returncode == 0, public.stderr
    catalog = run(sqlite_server, partner.api_key, "catalog", "--json")
    assert catalog.returncode == 0, catalog.stderr
    entry = next(e for e in json.loads(catalog.stdout) if e["object_id"] == dataset)
    assert entry["owned_by"] == owner.name

    revoked = run(sqlite_server, owner.api_key, "grants", "revoke", grant["id"], "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["status"] == "revoked"

    refused = run(sqlite_server, partner.api_key, "grants", "revoke", grant["id"])
    assert refused.returncode == 1 and "No grant" in refused.stderr
    bad = run(sqlite_server, owner.api_key, "grants", "create", "file", dataset, partner.id)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
