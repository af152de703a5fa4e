"""The LLM servers under test, each told how to provision, launch and talk to itself.

Every system loads the same GGUF file with the same thread count. A `System` is used in order:
`prepare()` once (install or build; returns a version string), `launch(port)` for the command,
then `connect(client)` once the server is healthy, for the auth header and the model id.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from peers import (
    LLAMA_CPP_PYTHON_VERSION,
    ensure_llama_server,
    ensure_peers_python,
    tool_output,
    tool_version,
)

__all__ = [
    "SYSTEM_NAMES",
    "BenchSetup",
    "Connection",
    "Launch",
    "LlamaCppPythonServer",
    "LlamaServer",
    "Ours",
    "SetupError",
    "System",
    "make_system",
]

log = logging.getLogger("bench")

OURS_MODEL_ID = "gemma-3-270m"
# The KV cache llama-server shares among its slots: ours' default (`AIAAS_LLM_KV_CELLS`).
_LLAMA_SERVER_KV_CELLS = 16384
# Passed when the binary knows them. `--kv-unified` makes the slots share one KV cache, as ours
# does; without it each slot owns a fixed stream, and a batch whose slots lie far apart attends
# over every stream between them (measured: ~1.7x slower steps at concurrency 8), so results
# hinge on which slots earlier requests happened to leave warm. The web UI is not built anyway.
_LLAMA_SERVER_OPTIONAL_FLAGS = ("--kv-unified", "--no-webui")


class SetupError(Exception):
    """A server came up but did not answer its setup calls as its contract says."""


@dataclass(frozen=True, slots=True)
class BenchSetup:
    """What every system shares: the model file, threads, and where scratch files go."""

    repo: Path
    model_path: Path
    threads: int
    slots: int
    work_dir: Path
    llama_sdist: Path | None = None


@dataclass(frozen=True, slots=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    health_path: str


@dataclass(frozen=True, slots=True)
class Connection:
    model: str
    headers: dict[str, str] = field(default_factory=dict)


class System(Protocol):
    name: str

    def prepare(self) -> str: ...

    def launch(self, port: int) -> Launch: ...

    def connect(self, client: httpx.Client) -> Connection: ...


class Ours:
    """`aiaas serve` from the project's venv, with a fresh data dir and one org per run."""

    name = "ours"

    def __init__(self, setup: BenchSetup, *, env: Mapping[str, str] | None = None) -> None:
        self._setup = setup
        self._data_dir = setup.work_dir / "ours-data"
        # Extra `AIAAS_*` settings on top of the bench's, e.g. `AIAAS_SCHEDULING=fifo`.
        self._extra_env = dict(env or {})

    def prepare(self) -> str:
        python = self._python()
        if not python.exists():
            raise SetupError(f"{python} is missing; run `make run` once to create the venv")
        # Point ours at the very file the peers load. Without it, ours assembles its own copy
        # (same SHA-256) into the data dir at start, which only costs start-up time.
        cache = self._data_dir / "models"
        cache.mkdir(parents=True, exist_ok=True)
        link = cache / self._setup.model_path.name
        if not link.exists():
            link.symlink_to(self._setup.model_path)
        return f"aiaas {importlib.metadata.version('aiaas')}"

    def launch(self, port: int) -> Launch:
        argv = [str(self._python()), "-m", "aiaas", "serve", "--host", "127.0.0.1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIAAS_")}
        env |= {
            "AIAAS_DATA_DIR": str(self._data_dir),
            "AIAAS_MODELS": OURS_MODEL_ID,
            "AIAAS_LLM_SLOTS": str(self._setup.slots),
            "AIAAS_LLM_THREADS": str(self._setup.threads),
        }
        env |= self._extra_env
        return Launch(argv=[*argv, "--port", str(port)], env=env, health_path="/health")

    def connect(self, client: httpx.Client) -> Connection:
        return self.create_org(client, "bench")

    def create_org(self, client: httpx.Client, name: str) -> Connection:
        """A new organisation, made with the admin key; connects as its API key (its tenant)."""
        admin_key = self._admin_key(timeout_s=30.0)
        response = client.post(
            "/v1/organizations",
            json={"name": name},
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        if response.status_code not in (httpx.codes.OK, httpx.codes.CREATED):
            raise SetupError(
                f"POST /v1/organizations answered {response.status_code}: {response.text[:300]}"
            )
        api_key = response.json().get("api_key")
        if not isinstance(api_key, str) or not api_key:
            raise SetupError(f"POST /v1/organizations gave no api_key: {response.text[:300]}")
        return Connection(model=OURS_MODEL_ID, headers={"Authorization": f"Bearer {api_key}"})

    def _python(self) -> Path:
        return self._setup.repo / ".venv" / "bin" / "python"

    def _admin_key(self, *, timeout_s: float) -> str:
        # Written at first start, before /health turns 200; the wait only covers a slow disk.
        path = self._data_dir / "admin-key"
        deadline = time.monotonic() + timeout_s
        while not path.exists() or not path.read_text().strip():
            if time.monotonic() >= deadline:
                raise SetupError(f"{path} did not appear within {timeout_s:.0f} s")
            time.sleep(0.1)
        return path.read_text().strip()


class LlamaCppPythonServer:
    """llama-cpp-python's server (`python -m llama_cpp.server`) from `bench/.venv-peers`."""

    name = "llama_cpp.server"

    def __init__(self, setup: BenchSetup) -> None:
        self._setup = setup
        self._python: Path | None = None

    def prepare(self) -> str:
        self._python = ensure_peers_python()
        return f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"

    def launch(self, port: int) -> Launch:
        if self._python is None:
            raise RuntimeError("prepare() first")
        threads = str(self._setup.threads)
        argv = [
            *(str(self._python), "-m", "llama_cpp.server"),
            *("--model", str(self._setup.model_path)),
            *("--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "4096"),
            # By default a waiting request makes the streaming one stop after its next token;
            # that would cut every stream short at concurrency > 1 instead of queueing it.
            *("--interrupt_requests", "false"),
            *("--host", "127.0.0.1", "--port", str(port)),
        ]
        return Launch(argv=argv, env=dict(os.environ), health_path="/v1/models")

    def connect(self, client: httpx.Client) -> Connection:
        return Connection(model=_first_model_id(client))


class LlamaServer:
    """llama.cpp's `llama-server`, built from the sources vendored in the same sdist."""

    name = "llama-server"

    def __init__(self, setup: BenchSetup) -> None:
        self._setup = setup
        self._binary: Path | None = None
        self._extra_flags: list[str] = []

    def prepare(self) -> str:
        self._binary = ensure_llama_server(sdist=self._setup.llama_sdist)
        help_text = tool_output([str(self._binary), "--help"])
        self._extra_flags = []
        for flag in _LLAMA_SERVER_OPTIONAL_FLAGS:
            if re.search(rf"{re.escape(flag)}(?![\w-])", help_text):
                self._extra_flags.append(flag)
            else:
                log.warning("llama-server: this version has no %s; running without it", flag)
        return tool_version([str(self._binary), "--version"])

    def launch(self, port: int) -> Launch:
        if self._binary is None:
            raise RuntimeError("prepare() first")
        threads = str(self._setup.threads)
        argv = [
            str(self._binary),
            *("-m", str(self._setup.model_path)),
            *("-np", str(self._setup.slots), "-t", threads, "-tb", threads),
            *("-c", str(_LLAMA_SERVER_KV_CELLS)),
            *self._extra_flags,
            *("--host", "127.0.0.1", "--port", str(port)),
        ]
        return Launch(argv=argv, env=dict(os.environ), health_path="/health")

    def connect(self, client: httpx.Client) -> Connection:
        return Connection(model=_first_model_id(client))


SYSTEM_NAMES = ("ours", "llama-server", "llama_cpp.server")


def make_system(name: str, setup: BenchSetup, ours_env: dict[str, str] | None = None) -> System:
    if name == Ours.name:
        return Ours(setup, env=ours_env)
    if name == LlamaServer.name:
        return LlamaServer(setup)
    if name == LlamaCppPythonServer.name:
        return LlamaCppPythonServer(setup)
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEM_NAMES)}")


def _first_model_id(client: httpx.Client) -> str:
    response = client.get("/v1/models")
    response.raise_for_status()
    data = response.json().get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0].get("id"), str):
        raise SetupError(f"/v1/models lists no model: {response.text[:300]}")
    return str(data[0]["id"])
