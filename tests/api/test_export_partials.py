"""A hard kill during the one-time ONNX export leaves a `.partial` folder; the next start removes
it, and only it (issue 29).

The builder of a partial folder holds a lock on it for as long as it lives (`engines/partials.py`),
so a start that sweeps while another process is exporting leaves that export alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aiaas.engines import partials
from tests.conftest import Server, create_org

MODEL = "all-minilm-l6-v2"
EXPORT = f"""
from pathlib import Path
from aiaas.engines.embeddings.export import export_sentence_encoder, minilm_l6_v2_dir
export_sentence_encoder(minilm_l6_v2_dir(), Path({{cache!r}}), name={MODEL!r})
"""


def _partials(cache: Path) -> set[Path]:
    return {p for p in cache.iterdir() if p.name.endswith(".partial")} if cache.is_dir() else set()


def _kill_mid_export(cache: Path) -> Path:
    """Start the export in a process of its own and SIGKILL it once it has written a file."""
    process = subprocess.Popen(
        [sys.executable, "-c", EXPORT.format(cache=str(cache))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = _partials(cache)
            if found and any(any(p.iterdir()) for p in found):
                break
            assert process.poll() is None, "the export ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the export wrote nothing in time")
    finally:
        process.kill()
        process.wait()
    (partial,) = _partials(cache)
    return partial


def test_a_start_removes_what_a_killed_export_left(make_server: Callable[..., Server]) -> None:
    server = make_server("sqlite", models=MODEL)
    cache = server.data_dir / "models" / "embeddings"
    killed = _kill_mid_export(cache)
    assert not any(p.name.endswith(".json") for p in cache.iterdir())  # no export finished
    # One from an older build (no lock ever taken), last written an hour ago.
    legacy = cache / f".{MODEL}-0123456789abcdef.x1y2z3.partial"
    legacy.mkdir()
    (legacy / "model.fp32.onnx").write_bytes(b"half")
    os.utime(legacy, (time.time() - 3600,) * 2)
    # And one that a live process is building right now: it must survive the start.
    building = threading.Event()
    done = threading.Event()
    live: list[Path] = []

    def build() -> None:
        with partials.staging_dir(cache, "another-export") as path:
            os.utime(path, (time.time() - 3600,) * 2)  # old, but its builder lives
            live.append(path)
            building.set()
            done.wait(300)

    builder = threading.Thread(target=build)
    builder.start()
    assert building.wait(10)
    try:
        server.start()  # /health answers once the embedder is exported and loaded
        assert not killed.exists() and not legacy.exists()
        assert _partials(cache) == set(live)
        exports = [p for p in cache.iterdir() if (p / "manifest.json").is_file()]
        assert len(exports) == 1 and exports[0].name.startswith(f"{MODEL}-")
        with server.client(create_org(server).api_key) as client:
            response = client.post("/v1/embeddings", json={"model": MODEL, "input": ["it works"]})
        assert response.status_code == 200, response.text
        assert len(response.json()["data"][0]["embedding"]) == 384
    finally:
        done.set()
        builder.join()
        server.stop()
    assert not _partials(cache)  # the live builder cleaned up after itself


def test_sweepers_racing_leave_live_builds_and_remove_dead_ones(tmp_path: Path) -> None:
    dead = [tmp_path / f".m-{i}.dead.partial" for i in range(8)]
    for path in dead:
        path.mkdir()
        (path / "part").write_bytes(b"x")
        os.utime(path, (time.time() - 60,) * 2)
    young = tmp_path / ".m.young.partial"  # unlocked but just made: its builder may be starting
    young.mkdir()
    unrelated = tmp_path / "m-0123"
    unrelated.mkdir()
    with partials.staging_dir(tmp_path, "m") as live:
        os.utime(live, (time.time() - 60,) * 2)
        removed: list[list[Path]] = []
        sweepers = [
            threading.Thread(target=lambda: removed.append(partials.sweep(tmp_path)))
            for _ in range(4)
        ]
        for sweeper in sweepers:
            sweeper.start()
        for sweeper in sweepers:
            sweeper.join()
        assert sorted(p for found in removed for p in found) == sorted(dead)  # each once
        assert live.is_dir() and young.is_dir() and unrelated.is_dir()
        os.replace(live, tmp_path / "m-done")  # finished: renamed into place, lock and all
    assert (tmp_path / "m-done").is_dir()
    assert partials.sweep(tmp_path) == []  # the young one is still young
    os.utime(young, (time.time() - 60,) * 2)
    assert partials.sweep(tmp_path) == [young]
