"""Edge bundles through HTTP: a model trained here, downloaded as a zip, run without aiaas.

A tabular MLP and a keyword LSTM are trained once on SQLite and deployed. Each bundle is
unzipped and its `run.py` run by a Python that has only numpy and onnxruntime (a venv whose
site-packages links just those two from ours, so the test works offline); its predictions must
equal `/v1/predictions` for the same records.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest

from aiaas.edge.bundle import bundle_stem
from tests.api.test_deployments import (
    deploy,
    keyword_csv,
    keyword_texts,
    make_dataset,
    predict,
    registered_version,
    tabular_csv,
    tabular_frame,
    train,
)
from tests.api.test_fine_tuning import api, sentiment_csv
from tests.api.test_fine_tuning import train as train_with
from tests.cli.test_train_cli import cli_env
from tests.conftest import Org, Server, assert_error, create_org

BUNDLE_FILES = {
    "model.onnx",
    "preprocessing.json",
    "model.json",
    "labels.json",
    "run.py",
    "README.md",
    "manifest.json",
}


@dataclass(frozen=True)
class Deployed:
    server: Server
    org: Org
    model: str
    version: dict[str, Any]
    name: str  # the deployment

    def bundle_url(self, version: int = 1) -> str:
        return f"/v1/models/{self.model}/versions/{version}/bundle"


def train_and_deploy(server: Server, org: Org, dataset: dict[str, Any], **options: Any) -> Deployed:
    job = train(server, org, dataset["version"]["id"], **options)
    assert job.fine_tuned_model is not None
    with server.client(org.api_key) as http:
        deployment = deploy(http, model=job.fine_tuned_model, version=1)
    version = registered_version(server, org, job)
    return Deployed(server, org, job.fine_tuned_model, version, deployment["name"])


@pytest.fixture(scope="module")
def tabular(sqlite_server: Server) -> Deployed:
    org = create_org(sqlite_server)
    dataset = make_dataset(sqlite_server, org, "points.csv", tabular_csv(rows=300))
    return train_and_deploy(sqlite_server, org, dataset, n_epochs=3, suffix="edge")


@pytest.fixture(scope="module")
def text(sqlite_server: Server) -> Deployed:
    org = create_org(sqlite_server)
    step = {"kind": "text", "column": "text", "max_length": 16}
    dataset = make_dataset(sqlite_server, org, "reviews.csv", keyword_csv(), features=[step])
    return train_and_deploy(sqlite_server, org, dataset, model="lstm", n_epochs=3, lr_multiplier=1)


@pytest.fixture(scope="module")
def edge_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python with numpy and onnxruntime and nothing else: no pandas, tokenizers, torch, aiaas."""
    root = tmp_path_factory.mktemp("edge-python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    linked = root / "site"
    linked.mkdir()
    for package in (np, onnxruntime):
        folder = Path(package.__file__).parent
        for name in (folder.name, f"{folder.name}.libs"):
            if (folder.parent / name).exists():
                (linked / name).symlink_to(folder.parent / name)
    [site] = (root / "venv").glob("lib/python*/site-packages")
    (site / "edge.pth").write_text(f"{linked}\n")
    python = root / "venv" / "bin" / "python"
    for missing in ("pandas", "aiaas", "tokenizers", "torch", "PIL", "pydantic"):
        probe = run_python(python, "-c", f"import {missing}", cwd=root)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, missing
    assert run_python(python, "-c", "import numpy, onnxruntime", cwd=root).returncode == 0
    return python


def run_python(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run(
        [str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def download(deployed: Deployed, target: Path) -> Path:
    """The bundle, unzipped under `target`; the bundle's folder."""
    with deployed.server.client(deployed.org.api_key) as http:
        response = http.get(deployed.bundle_url())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert int(response.headers["content-length"]) == len(response.content)
    stem = bundle_stem(deployed.model, 1)
    assert "-v1" in stem and ":" not in stem
    assert response.headers["content-disposition"] == f'attachment; filename="{stem}.zip"'
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert all(name.startswith(f"{stem}/") for name in archive.namelist())
        archive.extractall(target)
    return target / stem


def check_manifest(folder: Path, deployed: Deployed) -> dict[str, Any]:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["model"], manifest["version"]) == (deployed.model, 1)
    assert manifest["version_id"] == deployed.version["id"]
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    for name, entry in manifest["files"].items():
        content = (folder / name).read_bytes()
        assert hashlib.sha256(content).hexdigest() == entry["sha256"], name
        assert len(content) == entry["bytes"], name
    registered = {a["name"]: a["sha256"] for a in deployed.version["artifacts"]}
    for name in ("model.onnx", "preprocessing.json", "model.json"):
        assert manifest["files"][name]["sha256"] == registered[name], name
    return manifest


def assert_same_predictions(
    ours: list[dict[str, Any]], platform: list[dict[str, Any]], classes: list[str]
) -> None:
    assert [p["index"] for p in ours] == list(range(len(platform)))
    assert [p["label"] for p in ours] == [p["label"] for p in platform]
    assert all(p["value"] is None for p in ours)
    mine = [[p["probabilities"][c] for c in classes] for p in ours]
    theirs = [[p["probabilities"][c] for c in classes] for p in platform]
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-5)


def run_bundle(
    python: Path, folder: Path, records: list[dict[str, Any]], tmp_path: Path
) -> list[dict[str, Any]]:
    """Predictions from the bundle's CLI, checked against its importable `predict`."""
    records_path = tmp_path / "records.jsonl"
    records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = run_python(python, str(folder / "run.py"), str(records_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    script = (
        f"import json, sys; sys.path.insert(0, {str(folder)!r}); from run import predict; "
        f"print(json.dumps(predict(json.load(open({str(records_path) + '.json'!r})))))"
    )
    Path(f"{records_path}.json").write_text(json.dumps(records))
    imported = run_python(python, "-c", script, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == lines
    verified = run_python(python, str(folder / "run.py"), "--verify", cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    return lines


@pytest.mark.slow
def test_a_tabular_bundle_predicts_as_the_platform_does_without_aiaas(
    tabular: Deployed, edge_python: Path, tmp_path: Path
) -> None:
    folder = download(tabular, tmp_path / "unzipped")
    assert {p.name for p in folder.iterdir()} == BUNDLE_FILES
    check_manifest(folder, tabular)
    labels = json.loads((folder / "labels.json").read_text())
    assert labels == {"task": "classification", "column": "label", "classes": ["no", "yes"]}
    readme = (folder / "README.md").read_text()
    for words in ("python", "run.py", "accuracy", tabular.version["job_id"], "`color`", "Lineage"):
        assert words in readme, words

    records = tabular_frame(60, seed=21).drop(columns=["label"]).to_dict(orient="records")
    records += [  # gaps, an unseen category, numbers as text, an extra key
        {"a": None, "b": 0.5, "noise": None, "color": "purple", "y": 1.0},
        {"a": "1.25", "b": -2, "noise": 0, "color": None, "y": None, "id": 7},
    ]
    with tabular.server.client(tabular.org.api_key) as http:
        platform = predict(http, tabular.name, records=records)["data"]
    ours = run_bundle(edge_python, folder, records, tmp_path)
    assert_same_predictions(ours, platform, ["no", "yes"])

    (folder / "model.onnx").write_bytes(b"tampered")
    tampered = run_python(edge_python, str(folder / "run.py"), "--verify", cwd=tmp_path)
    assert tampered.returncode == 1 and "model.onnx" in tampered.stderr


@pytest.mark.slow
def test_a_text_bundle_tokenises_as_the_platform_does_without_aiaas(
    text: Deployed, edge_python: Path, tmp_path: Path
) -> None:
    folder = download(text, tmp_path / "unzipped")
    assert {p.name for p in folder.iterdir()} == BUNDLE_FILES
    check_manifest(folder, text)
    texts, _ = keyword_texts(40, seed=5)
    texts += ["", "EXCELLENT!!! but unheard-of words", "awful " * 30, "Ça, c'était excellent."]
    records = [{"text": t} for t in texts]
    with text.server.client(text.org.api_key) as http:
        platform = predict(http, text.name, records=records)["data"]
    ours = run_bundle(edge_python, folder, records, tmp_path)
    assert_same_predictions(ours, platform, ["bad", "good"])


@pytest.mark.slow
def test_a_fine_tuned_minilm_bundle_reads_wordpieces_without_tokenizers(
    sqlite_server: Server, edge_python: Path, tmp_path: Path
) -> None:
    org = create_org(sqlite_server)
    step = {"kind": "text", "column": "text", "max_length": 32}
    dataset = make_dataset(sqlite_server, org, "sentiment.csv", sentiment_csv(), features=[step])
    job = train_with(
        api(sqlite_server, org),
        dataset["version"]["id"],
        "all-minilm-l6-v2",
        n_epochs=1,
        batch_size=8,
        lr_multiplier=4,
        timeout_s=300,
    )
    assert job.fine_tuned_model is not None
    with sqlite_server.client(org.api_key) as http:
        name = deploy(http, model=job.fine_tuned_model, version=1)["name"]
    minilm = Deployed(
        sqlite_server, org, job.fine_tuned_model, registered_version(sqlite_server, org, job), name
    )
    folder = download(minilm, tmp_path / "unzipped")
    assert {p.name for p in folder.iterdir()} == BUNDLE_FILES | {"tokenizer.json"}
    check_manifest(folder, minilm)
    texts = [
        "What a WONDERFUL, charming film!",
        "Honestly, the staff were rude and the food was disgusting.",
        "Café naïve résumé: un-believably good… 10/10 #recommended",
        "東京 was fine, I guess",
        "",
        "an excellent day " * 20,  # longer than max_length: cut, keeping [SEP]
    ]
    records = [{"text": text} for text in texts]
    with sqlite_server.client(org.api_key) as http:
        platform = predict(http, name, records=records)["data"]
    ours = run_bundle(edge_python, folder, records, tmp_path)
    assert_same_predictions(ours, platform, ["negative", "positive"])


@pytest.mark.slow
def test_bundle_requests_that_cannot_be_served_are_openai_errors(tabular: Deployed) -> None:
    server, model = tabular.server, tabular.model
    with server.client(tabular.org.api_key) as http:
        assert_error(http.get(f"/v1/models/ft:mlp:{tabular.org.name}:nope/versions/1/bundle"), 404)
        assert_error(http.get(tabular.bundle_url(9)), 404)
        response = http.post("/v1/api_keys", json={"name": "no-read", "scopes": ["inference"]})
        assert response.status_code == 201, response.text
        limited = response.json()["value"]
    with server.client(limited) as http:
        error = assert_error(http.get(tabular.bundle_url()), 403)
        assert "models:read" in error["message"]
    with server.client(create_org(server).api_key) as http:
        error = assert_error(http.get(tabular.bundle_url()), 404)
        assert model in error["message"]
    with server.client() as http:
        assert_error(http.get(tabular.bundle_url()), 401)


@pytest.mark.slow
def test_aiaas_export_downloads_the_bundle_with_progress(tabular: Deployed, tmp_path: Path) -> None:
    env = cli_env(tabular.server, tabular.org.api_key)
    done = subprocess.run(
        [sys.executable, "-m", "aiaas", "export", tabular.model],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    stem = bundle_stem(tabular.model, 1)
    written = tmp_path / f"{stem}.zip"
    assert written.is_file() and str(written.name) in done.stdout
    with zipfile.ZipFile(written) as archive:
        assert {Path(name).name for name in archive.namelist()} == BUNDLE_FILES
    assert [p.name for p in tmp_path.iterdir()] == [written.name]  # no partial file left

    elsewhere = tmp_path / "out" / "edge.zip"
    elsewhere.parent.mkdir()
    again = subprocess.run(
        [sys.executable, "-m", "aiaas", "export", tabular.model, "--version", "1", "-o", elsewhere],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert elsewhere.read_bytes() == written.read_bytes()  # one version, one bundle

    missing = subprocess.run(
        [sys.executable, "-m", "aiaas", "export", tabular.model, "--version", "9"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 1 and "no version 9" in missing.stderr
    assert "Traceback" not in missing.stderr
