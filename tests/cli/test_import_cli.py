"""`aiaas models import` against the real server, as a user runs it."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

from tests.api.test_imports import SIGNATURE, classifier_onnx
from tests.conftest import Server, create_org


def run(server: Server, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**server.env, "AIAAS_BASE_URL": server.base_url, "AIAAS_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "aiaas", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_models_import_uploads_with_a_progress_bar_and_registers_a_version(
    sqlite_server: Server, tmp_path: Path
) -> None:
    org = create_org(sqlite_server)
    graph = tmp_path / "iris.onnx"
    graph.write_bytes(classifier_onnx())
    signature = tmp_path / "signature.json"
    signature.write_text(json.dumps(SIGNATURE))

    shown = run(
        sqlite_server,
        org.api_key,
        "models",
        "import",
        str(graph),
        "--name",
        "iris-cli",
        "--signature",
        f"@{signature}",
    )
    assert shown.returncode == 0, shown.stderr
    model_id = f"iris-cli:{org.name.lower()}"
    assert f"{model_id}  version 1  (onnx; task classification)" in shown.stdout
    assert "uploading iris.onnx" in shown.stderr  # the progress bar, on stderr

    again = run(
        sqlite_server,
        org.api_key,
        "models",
        "import",
        str(graph),
        "--name",
        "iris-cli",
        "--format",
        "onnx",
        "--signature",
        json.dumps(SIGNATURE),
        "--json",
    )
    assert again.returncode == 0, again.stderr
    body = json.loads(again.stdout)
    assert (body["model"], body["version"], body["task"]) == (model_id, 2, "classification")
    assert "uploading" not in again.stderr  # --json: no bar

    versions = run(sqlite_server, org.api_key, "models", "versions", model_id, "--json")
    assert [v["version"] for v in json.loads(versions.stdout)["versions"]] == [1, 2]


def test_models_import_refuses_a_pickle_with_the_servers_message(
    sqlite_server: Server, tmp_path: Path
) -> None:
    org = create_org(sqlite_server)
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    refused = run(sqlite_server, org.api_key, "models", "import", str(pickled), "--name", "p")
    assert refused.returncode == 1
    assert "error (400)" in refused.stderr and "GGUF" in refused.stderr
    bad_json = run(
        sqlite_server,
        org.api_key,
        "models",
        "import",
        str(pickled),
        "--name",
        "p",
        "--signature",
        "{nope",
    )
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr
