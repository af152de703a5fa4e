"""`aiaas files` and `aiaas datasets` against the real server, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import Server, create_org


def run(server: Server, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**server.env, "AIAAS_BASE_URL": server.base_url, "AIAAS_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "aiaas", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_upload_then_create_list_and_show_a_dataset(sqlite_server: Server, tmp_path: Path) -> None:
    org = create_org(sqlite_server)
    source = tmp_path / "flowers.csv"
    lines = ["petal,sepal,label"] + [f"{i % 7}.5,{i % 5}.25,{'ab'[i % 2]}" for i in range(200)]
    source.write_text("\n".join(lines) + "\n")

    uploaded = run(sqlite_server, org.api_key, "files", "upload", str(source), "--json")
    assert uploaded.returncode == 0, uploaded.stderr
    file = json.loads(uploaded.stdout)
    assert file["bytes"] == source.stat().st_size and file["purpose"] == "dataset"

    made = run(
        sqlite_server,
        org.api_key,
        "datasets",
        "create",
        "flowers",
        "--file",
        file["id"],
        "--seed",
        "3",
        "--json",
    )
    assert made.returncode == 0, made.stderr
    dataset = json.loads(made.stdout)
    assert dataset["version"]["rows"] == 200 and dataset["version"]["label_column"] == "label"
    assert dataset["version"]["preprocessing"]["split"]["seed"] == 3

    listed = json.loads(run(sqlite_server, org.api_key, "datasets", "list", "--json").stdout)
    assert [d["id"] for d in listed] == [dataset["id"]]
    shown = run(sqlite_server, org.api_key, "datasets", "show", dataset["id"])
    assert shown.returncode == 0 and "flowers" in shown.stdout and "petal" in shown.stdout

    with_bar = run(
        sqlite_server, org.api_key, "files", "upload", str(source), "--purpose", "user_data"
    )
    assert with_bar.returncode == 0 and with_bar.stdout.startswith("file-"), with_bar.stderr
    files = json.loads(run(sqlite_server, org.api_key, "files", "list", "--json").stdout)
    assert [f["purpose"] for f in files] == ["user_data", "dataset"]


def test_errors_exit_nonzero_with_the_server_message(sqlite_server: Server, tmp_path: Path) -> None:
    org = create_org(sqlite_server)
    missing = run(sqlite_server, org.api_key, "datasets", "show", "ds_nope")
    assert missing.returncode == 1 and "No dataset" in missing.stderr
    bad_key = run(sqlite_server, "sk-aiaas-0000000000000000-x", "datasets", "list")
    assert bad_key.returncode == 1 and "401" in bad_key.stderr
