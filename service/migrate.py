"""Schema upgrades, serialised across processes so that a cold start creates it once."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

import migrations
from service.db import Database
from service.pg_locks import take_xact_lock

# Arbitrary constant naming hptune's schema lock among PostgreSQL advisory locks.
PG_ADVISORY_LOCK_ID = 0x68707475  # "hptu"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def _schema_lock(db: Database, conn: Connection) -> Iterator[None]:
    if db.settings.is_sqlite:
        path = make_url(db.settings.database_url).database or ":memory:"
        if path == ":memory:":
            yield
            return
        with open(f"{path}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif db.settings.database_pooler == "transaction":
        # Behind a transaction pooler a session lock would stay with whichever server
        # connection took it: a transaction-scoped one, held open until the upgrade is done.
        take_xact_lock(lambda: conn, conn.rollback, (PG_ADVISORY_LOCK_ID,), poll=True,
                       what="the schema upgrade lock")
        try:
            yield
        finally:
            conn.rollback()
    else:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_ADVISORY_LOCK_ID})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_ADVISORY_LOCK_ID})
            conn.commit()


def upgrade(db: Database) -> None:
    """Bring the service's tables and Optuna's to the current schema, once across processes."""
    with db.engine.connect() as lock_conn, _schema_lock(db, lock_conn):
        cfg = alembic_config(db.settings.database_url)
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        # Optuna creates (and checks) its own tables when its storage is first opened.
        _ = db.storage
