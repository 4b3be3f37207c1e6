"""pytest-alembic's fixtures for the service's migrations, on SQLite and on PostgreSQL.

Every test runs once per backend on a fresh database: a SQLite file, or a new database on the
session's throwaway PostgreSQL server (tests/postgres.py; with HPTUNE_REQUIRE_POSTGRES=1 a
missing server fails the PostgreSQL half instead of skipping it). Optuna's tables, and its own
`alembic_version`, are created first, as in a deployed database: the service's migrations keep
their version in `hptune_alembic_version` (migrations/env.py) and must not touch Optuna's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import optuna
import pytest
import pytest_alembic
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.pool import NullPool

from service.migrate import alembic_config as service_alembic_config
from tests.service.conftest import pg_server  # noqa: F401  (the session's PostgreSQL server)


@dataclass
class MigrationDB:
    """A fresh database holding only Optuna's tables."""

    backend: str
    url: str
    engine: Engine


@pytest.fixture(params=["sqlite", "postgresql"])
def migration_db(request, tmp_path) -> Iterator[MigrationDB]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'hptune.db'}"
    else:
        server = request.getfixturevalue("pg_server")
        server.ensure_running()
        url = server.create_database("hptune_migrations")
    storage = optuna.storages.RDBStorage(url)  # creates and stamps Optuna's schema
    storage.remove_session()
    storage.engine.dispose()
    engine = create_engine(url, poolclass=NullPool)
    try:
        yield MigrationDB(request.param, url, engine)
    finally:
        engine.dispose()


@pytest.fixture
def alembic_config(migration_db: MigrationDB) -> pytest_alembic.Config:
    """The service's own Alembic config (migrations/, its version table via env.py)."""
    return pytest_alembic.Config(alembic_config=service_alembic_config(migration_db.url))


@pytest.fixture
def alembic_engine(migration_db: MigrationDB) -> Iterator[Connection]:
    """A connection, not an engine: env.py runs migrations on `attributes["connection"]` as
    service.migrate.upgrade hands it one."""
    with migration_db.engine.connect() as conn:
        yield conn
