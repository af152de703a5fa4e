"""Test harness: the real server in a subprocess on a free loopback port, spoken to over HTTP.

Tests that touch the database run against SQLite and PostgreSQL: the `server` fixture is
parametrised over both backends and shared per session (one server per backend). PostgreSQL
comes from `AIAAS_TEST_POSTGRES_URL`; without it those tests skip, unless
`AIAAS_TEST_SERVICES=1` (as in CI), where a missing service is a failure.

Slow set-up is shared where tests only read it: `shared_model` trains, registers and deploys one
small model per backend for the whole session (the grant tests and others use it as the owner's
objects, each with grantee organisations of its own), and the test process's HTTP clients share
one TLS context (see `share_tls_contexts`).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

BACKENDS = ["sqlite", "postgres"]
STARTUP_DEADLINE_S = 120.0


def share_tls_contexts() -> None:
    """Let every HTTP client of the test process reuse one default TLS context.

    httpx builds a new `ssl.SSLContext` for each client, and a default one loads the whole CA
    bundle: 0.1-0.3 s of CPU on this 2-core machine, for each `server.client()`, each
    `openai.OpenAI` and each `/health` poll, thousands in a run. The tests speak plain HTTP to
    loopback, where the context is never used; a client that asks for anything but the default
    (`verify=` a context, a path or False; a client certificate) still gets its own. Where httpx
    has no such hook any more, nothing changes (the tests are only slower)."""
    try:
        from httpx._transports import default
    except ImportError:  # pragma: no cover
        return
    build = getattr(default, "create_ssl_context", None)
    if build is None or getattr(build, "shared", False):
        return
    made: dict[tuple[bool, str | None, str | None], Any] = {}  # key -> ssl.SSLContext

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if verify is not True or cert is not None:
            return build(verify=verify, cert=cert, trust_env=trust_env)
        # The default context depends on these (httpx reads them when `trust_env`).
        key = (trust_env, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        if key not in made:
            made[key] = build(verify=verify, cert=cert, trust_env=trust_env)
        return made[key]

    create_ssl_context.shared = True  # type: ignore[attr-defined]
    default.create_ssl_context = create_ssl_context


share_tls_contexts()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def services_required() -> bool:
    return os.environ.get("AIAAS_TEST_SERVICES") == "1"


def require_service(env_var: str, what: str) -> str:
    value = os.environ.get(env_var)
    if value:
        return value
    message = f"{what} is not available: set {env_var}"
    if services_required():
        pytest.fail(f"{message} (AIAAS_TEST_SERVICES=1 makes this a failure)")
    pytest.skip(message)


class PostgresDatabases:
    """Creates one fresh database per server so tests never see each other's rows."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    def _connect(self) -> Any:
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(self.admin_url)
        return psycopg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            password=url.password,
            dbname=url.database or "postgres",
            autocommit=True,
        )

    def create(self) -> str:
        from sqlalchemy.engine import make_url

        name = f"aiaas_test_{secrets.token_hex(6)}"
        with self._connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self._connect() as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[PostgresDatabases]:
    dbs = PostgresDatabases(require_service("AIAAS_TEST_POSTGRES_URL", "PostgreSQL"))
    yield dbs
    dbs.drop_all()


@dataclass
class Server:
    """One `aiaas serve` process and the settings it runs with."""

    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-key").read_text().strip()

    @property
    def stdout_path(self) -> Path:
        return self.data_dir / f"server-{self.starts}.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.data_dir / f"server-{self.starts}.stderr"

    def start(self) -> None:
        self.starts += 1
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aiaas",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=self.env,
            stdout=self.stdout_path.open("wb"),
            stderr=self.stderr_path.open("wb"),
        )
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited at start:\n{self.stderr_path.read_text()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not healthy in time:\n{self.stderr_path.read_text()}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `aiaas <args>` with the server's settings (works while it runs)."""
        return subprocess.run(
            [sys.executable, "-m", "aiaas", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def client(self, key: str | None = None, **headers: str) -> httpx.Client:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers={**auth, **headers}, timeout=30)


@pytest.fixture(scope="session")
def make_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Server]]:
    """Build (not start) a server on a fresh data dir, with SQLite or a fresh PostgreSQL db."""
    made: list[Server] = []

    def make(backend: str = "sqlite", **settings: str) -> Server:
        data_dir = tmp_path_factory.mktemp(f"aiaas-{backend}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIAAS_")}
        env |= {
            "AIAAS_DATA_DIR": str(data_dir),
            "AIAAS_MODELS": "",
            "AIAAS_LOG_LEVEL": "info",
            # One torch thread per training job: steadier on a shared 2-core machine.
            "AIAAS_TRAINING_THREADS": "1",
        }
        if backend == "postgres":
            dbs: PostgresDatabases = request.getfixturevalue("postgres_databases")
            env["AIAAS_DATABASE_URL"] = dbs.create()
        env |= {f"AIAAS_{k.upper()}": v for k, v in settings.items()}
        server = Server(data_dir=data_dir, env=env)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def server(request: pytest.FixtureRequest, make_server: Callable[..., Server]) -> Server:
    """A running server shared by the session, once per database backend."""
    srv = make_server(request.param)
    srv.start()
    return srv


@pytest.fixture(scope="session")
def sqlite_server(make_server: Callable[..., Server]) -> Server:
    """A running SQLite-backed server for tests that are not about the database."""
    srv = make_server("sqlite")
    srv.start()
    return srv


LLM_MODELS = "smollm2-135m-instruct,gemma-3-270m,all-minilm-l6-v2"
LLM_SETTINGS = {
    "models": LLM_MODELS,
    "llm_slots": "8",
    "llm_kv_cells": "8192",
    "llm_context_length": "2048",
}


@pytest.fixture(scope="session")
def llm_server(make_server: Callable[..., Server]) -> Server:
    """A running server with both bundled LLMs loaded, shared by the session."""
    srv = make_server("sqlite", **LLM_SETTINGS)
    srv.start()
    return srv


@dataclass(frozen=True)
class Org:
    id: str
    name: str
    project_id: str
    api_key: str


def create_org(server: Server, name: str | None = None) -> Org:
    name = name or f"org-{secrets.token_hex(4)}"
    with server.client(server.admin_key) as client:
        response = client.post("/v1/organizations", json={"name": name})
    assert response.status_code == 201, response.text
    body = response.json()
    return Org(
        id=body["id"], name=body["name"], project_id=body["project_id"], api_key=body["api_key"]
    )


@pytest.fixture
def org(server: Server) -> Org:
    return create_org(server)


@pytest.fixture
def other_org(server: Server) -> Org:
    return create_org(server)


@dataclass(frozen=True)
class SharedModel:
    """The owner's objects of `shared_model`: read them, grant them, never change them."""

    server: Server
    owner: Org
    dataset: dict[str, Any]  # as created, with its first `version`; version 2 holds the same rows
    rows: int  # rows in each version
    job_id: str  # the fine-tuning job that trained `model` (succeeded)
    model: str  # the registered model: one version, trained on version 1; alias `stable` -> 1
    deployment: dict[str, Any]  # the owner's deployment of `model` (the latest version), loaded
    tensor: dict[str, Any]  # one OIP input row for the deployment

    @property
    def dataset_id(self) -> str:
        return str(self.dataset["id"])

    @property
    def version_id(self) -> str:
        return str(self.dataset["version"]["id"])

    @property
    def source_file(self) -> str:
        return str(self.dataset["version"]["source_file_ids"][0])


SHARED_MODEL_ROWS = 120


@pytest.fixture(scope="session")
def shared_model(server: Server) -> SharedModel:
    """One owner organisation per backend with a two-version dataset, a small MLP trained on it
    (2 epochs), the alias `stable` on that version and a loaded deployment: one training job per
    backend for the whole session instead of one per module.

    Tests share it as the owner's objects and make their own grantee and third organisations
    (grants are per owner and grantee, so a fresh grantee sees only its own grants). A test must
    not change these objects: one that deletes, re-versions or re-shares the owner's object, or
    reads anything summed over the owner's organisation (its usage, its audit log), makes its own.
    """
    # Imported here: the test modules import this one.
    from tests.api.test_deployments import deploy
    from tests.api.test_fine_tuning import api, make_dataset, tabular_csv, train

    owner = create_org(server, f"shared-owner-{secrets.token_hex(4)}")
    data = tabular_csv(SHARED_MODEL_ROWS)
    dataset = make_dataset(server, owner, "shared.csv", data, label_column="label")
    source_file = dataset["version"]["source_file_ids"][0]
    with server.client(owner.api_key) as http:
        second = http.post(
            f"/v1/datasets/{dataset['id']}/versions", json={"file_ids": [source_file]}
        )
        assert second.status_code == 201, second.text
    job = train(api(server, owner), dataset["version"]["id"], n_epochs=2)
    assert job.fine_tuned_model is not None
    model = job.fine_tuned_model
    with server.client(owner.api_key) as http:
        alias = http.put(f"/v1/models/{model}/aliases/stable", json={"version": 1})
        assert alias.status_code == 200, alias.text
        deployment = deploy(http, model=model, name=f"shared-{secrets.token_hex(3)}")
        metadata = http.get(f"/v2/models/{deployment['name']}")  # loads it, too
        assert metadata.status_code == 200, metadata.text
    [tensor] = metadata.json()["inputs"]
    width = tensor["shape"][-1]
    row = {"name": tensor["name"], "shape": [1, width], "datatype": "FP32", "data": [0.0] * width}
    return SharedModel(server, owner, dataset, SHARED_MODEL_ROWS, job.id, model, deployment, row)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is an OpenAI-style error with this status (and code, when given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error
