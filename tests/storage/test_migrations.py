"""The Alembic migrations build exactly the schema in `tables.py`, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from aiaas.storage.db import Database
from aiaas.storage.tables import metadata
from tests.conftest import BACKENDS, PostgresDatabases


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'm.db'}"
    else:
        dbs: PostgresDatabases = request.getfixturevalue("postgres_databases")
        url = dbs.create()
    db = Database(url)
    yield db
    db.close()


def test_migrations_match_the_tables(database: Database) -> None:
    database.migrate()
    database.migrate()  # a second run is a no-op
    with database.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_audit_chain_starts_at_genesis(database: Database) -> None:
    from aiaas.storage.repos import audit

    database.migrate()
    with database.read() as conn:
        assert audit.head(conn) == (0, audit.GENESIS_HASH)
