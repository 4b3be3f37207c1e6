"""Rows written under the first revision survive every later one, on SQLite and PostgreSQL.

A fresh database is upgraded to the first revision and filled as that schema allows; each
table that a later revision creates gets its rows at the revision where it appears. At the
head every row is read back field by field, through the reflected tables and through the
service's models (old keys still authenticate, a revoked one does not, new rows get fresh
ids), including what data migrations rewrote: 0005 replaces hptune_api_keys.prefix by
service.keys.fingerprint(key_hash). Then the history is undone to base and replayed to the
head. Optuna's tables and its `alembic_version` row are there throughout and never change.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pytest_alembic import MigrationContext
from sqlalchemy import Connection, inspect, select, text
from sqlalchemy.orm import Session

from service import keys
from service.errors import Unauthorized
from service.models import (
    ApiKey,
    Base,
    DashboardSession,
    Job,
    UploadedDataset,
    WorkerRow,
    as_utc,
)

T0 = datetime(2026, 11, 22, 9, 30, 15, 123456, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


SECRETS = {
    "alice": "hpt_alice-live-secret-0000000000000000000000",
    "root": "hpt_root-admin-secret-111111111111111111111",
    "alice-old": "hpt_alice-revoked-secret-22222222222222222",
    "bob": "hpt_bob-default-admin-flag-3333333333333333",
}


def _key_row(name: str, owner: str, **extra: Any) -> dict[str, Any]:
    # Before 0005, `prefix` held the secret's first characters.
    secret = SECRETS[name]
    return {"owner": owner, "key_hash": keys.hash_key(secret), "prefix": secret[:12], **extra}


# Each table's rows, keyed by a column that identifies a row without its generated id.
API_KEYS = [
    _key_row("alice", "alice", is_admin=False, created_at=at(0), revoked_at=None),
    _key_row("root", "root", is_admin=True, created_at=at(1), revoked_at=None),
    _key_row("alice-old", "alice", is_admin=False, created_at=at(2), revoked_at=at(30)),
    # is_admin left to the column's server default.
    _key_row("bob", "bob", created_at=at(3)),
]
SPEC = {
    "name": "digits-tpe",
    "dataset": "digits",
    "n_trials": 20,
    "max_epochs": 5,
    "search_space": {"lr": {"low": 1e-4, "high": 0.3, "log": True},
                     "batch_size": {"choices": [32, 64, "full"]}},
    "sampler": {"name": "tpe", "seed": 7},
    "pruner": None,
    "notes": "éß \u2013 ✓ \"quoted\" \\ back",
}
JOBS = [
    {"owner": "alice", "name": "queued job", "spec": SPEC, "status": "queued", "n_trials": 20,
     "created_at": at(10)},  # reserved and claims left to their server defaults
    {"owner": "alice", "name": "running job", "spec": {**SPEC, "n_trials": 8},
     "status": "running", "n_trials": 8, "reserved": 3, "claims": 5,
     "study_name": "hptune-job-2", "created_at": at(11), "started_at": at(12)},
    {"owner": "bob", "name": "succeeded job", "spec": {"nested": [{"a": [1, 2.5, None]}]},
     "status": "succeeded", "n_trials": 4, "reserved": 4, "claims": 4,
     "study_name": "hptune-job-3", "created_at": at(13), "started_at": at(14),
     "finished_at": at(20)},
    {"owner": "bob", "name": "failed job", "spec": SPEC, "status": "failed", "n_trials": 2,
     "reserved": 1, "claims": 3, "study_name": "hptune-job-4",
     "error": "trial 3 failed:\nValueError: loss is nan ✗", "created_at": at(15),
     "started_at": at(16), "finished_at": at(17)},
    {"owner": "alice", "name": "cancelled job", "spec": {}, "status": "cancelled",
     "n_trials": 50, "reserved": 0, "claims": 0, "created_at": at(18), "finished_at": at(19)},
]
CONTENT = bytes(range(256)) * 64 + b"\x00\xff" * 1000  # every byte value, NULs included
DATASETS = [
    {"owner": "alice", "name": "iris-upload", "filename": "iris.csv", "format": "csv",
     "target": "species", "task": "multiclass", "n_rows": 150, "n_features": 4,
     "n_classes": 3, "features": ["sepal_length", "sepal_width", "petal_length", "petal_width"],
     "sha256": hashlib.sha256(CONTENT).hexdigest(), "size_bytes": len(CONTENT),
     "content": CONTENT, "created_at": at(21)},
    {"owner": "bob", "name": "arrays", "filename": "xy.npz", "format": "npz", "target": None,
     "task": "regression", "n_rows": 3, "n_features": 2, "n_classes": 0, "features": [],
     "sha256": hashlib.sha256(b"PK\x03\x04").hexdigest(), "size_bytes": 4,
     "content": b"PK\x03\x04", "created_at": at(22)},
]
WORKERS = [
    {"name": "host-a:101", "hostname": "host-a", "pid": 101, "state": "busy", "trials_run": 7,
     "started_at": at(5), "last_seen": at(25)},
    {"name": "host-b:202", "hostname": "host-b", "pid": 202, "state": "stopped",
     "trials_run": 0, "started_at": at(6), "last_seen": at(7)},
]
SESSIONS = [
    {"id_hash": hashlib.sha256(b"session-1").hexdigest(), "key_name": "root", "owner": "root",
     "is_admin": True, "created_at": at(26), "expires_at": at(26 + 12 * 60)},
]
# table: (rows, the column that identifies a row, values the server fills in when left out)
TABLES: dict[str, tuple[list[dict[str, Any]], str, dict[str, Any]]] = {
    "hptune_api_keys": (API_KEYS, "key_hash", {"is_admin": False}),
    "hptune_jobs": (JOBS, "name", {"reserved": 0, "claims": 0}),
    "hptune_datasets": (DATASETS, "name", {}),
    "hptune_workers": (WORKERS, "name", {}),
    "hptune_dashboard_sessions": (SESSIONS, "id_hash", {}),
}
MODELS = {m.__tablename__: m for m in (ApiKey, Job, UploadedDataset, WorkerRow, DashboardSession)}


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def _optuna_state(conn: Connection) -> tuple[set[str], list[tuple]]:
    names = {t for t in _tables(conn) if not t.startswith("hptune_")}
    return names, list(conn.execute(text("SELECT version_num FROM alembic_version")))


def _key_ids(conn: Connection) -> dict[str, int]:
    by_hash = dict(conn.execute(text("SELECT key_hash, id FROM hptune_api_keys")).all())
    return {name: by_hash[keys.hash_key(secret)] for name, secret in SECRETS.items()}


def _rows_for(table: str, conn: Connection) -> list[dict[str, Any]]:
    rows = TABLES[table][0]
    if table != "hptune_dashboard_sessions":
        return rows
    ids = _key_ids(conn)  # sessions point at keys by their generated id
    return [{k: v for k, v in r.items() if k != "key_name"} | {"key_id": ids[r["key_name"]]}
            for r in rows]


def _expected(table: str, conn: Connection) -> dict[Any, dict[str, Any]]:
    """What each row must hold at the head, by its identifying column."""
    _, ident, server_defaults = TABLES[table]
    out = {}
    for row in _rows_for(table, conn):
        want = {**server_defaults, **row}
        if table == "hptune_api_keys":
            want["prefix"] = keys.fingerprint(want["key_hash"])  # 0005's rewrite
        out[want[ident]] = want
    return out


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, datetime):
        # SQLite hands back naive datetimes, written in UTC.
        return isinstance(actual, datetime) and as_utc(actual) == expected
    return type(actual) is type(expected) and actual == expected


def _assert_rows(rows: list[dict[str, Any]], table: str, conn: Connection) -> None:
    ident = TABLES[table][1]
    expected = _expected(table, conn)
    got = {r[ident]: r for r in rows}
    assert set(got) == set(expected), table
    for key, want in expected.items():
        for column, value in want.items():
            assert _same(value, got[key][column]), (table, key, column, value, got[key][column])


def test_rows_survive_upgrades_and_round_trip(alembic_runner: MigrationContext,
                                              alembic_engine: Connection) -> None:
    conn = alembic_engine
    revisions = alembic_runner.history.revisions  # "base", oldest ... newest, "heads"
    assert len(alembic_runner.heads) == 1
    head = alembic_runner.heads[0]
    optuna_before = _optuna_state(conn)
    assert optuna_before[1], "Optuna's alembic_version should hold its revision"

    # The first revision, then one revision at a time: each table gets its rows where it appears.
    filled: dict[str, str] = {}
    for revision in revisions[1:-1]:
        alembic_runner.migrate_up_to(revision)
        assert alembic_runner.current == revision
        for table in TABLES:
            if table in _tables(conn) and table not in filled:
                alembic_runner.insert_into(table, _rows_for(table, conn))
                filled[table] = revision
    assert filled["hptune_api_keys"] == filled["hptune_jobs"] == revisions[1]
    assert set(filled) == set(TABLES), f"tables never created: {set(TABLES) - set(filled)}"

    # The head: every row, field by field, as the tables now stand.
    assert alembic_runner.current == head
    assert conn.execute(text("SELECT version_num FROM hptune_alembic_version")).all() == [(head,)]
    assert _optuna_state(conn) == optuna_before
    for table in TABLES:
        reflected = alembic_runner.table_at_revision(table, revision=head)
        written = {c for row in _rows_for(table, conn) for c in row}
        assert written <= set(reflected.c.keys()), f"{table} lost columns: {written}"
        rows = [dict(r._mapping) for r in conn.execute(select(reflected))]
        _assert_rows(rows, table, conn)

    # ... and as the service reads them.
    with Session(bind=conn) as session:
        for table, model in MODELS.items():
            columns = {c for want in _expected(table, conn).values() for c in want}
            objs = session.scalars(select(model)).all()
            _assert_rows([{c: getattr(o, c) for c in columns} for o in objs], table, conn)
        for name in ("alice", "root", "bob"):
            assert keys.authenticate(session, SECRETS[name]).owner == name
        with pytest.raises(Unauthorized):
            keys.authenticate(session, SECRETS["alice-old"])
        new, secret = keys.create_key(session, "carol")
        assert new.id > max(_key_ids(conn).values())
        assert keys.authenticate(session, secret).id == new.id
        job = Job(owner="carol", name="after upgrade", spec=SPEC, n_trials=3)
        session.add(job)
        session.flush()
        assert job.id > len(JOBS) and job.reserved == 0 and job.status == "queued"

    # Down to base: the service's tables go, Optuna's stay as they were; then up again.
    alembic_runner.migrate_down_to("base")
    assert alembic_runner.current == "base"
    assert not {t for t in _tables(conn) if t.startswith("hptune_")} - {"hptune_alembic_version"}
    assert conn.execute(text("SELECT count(*) FROM hptune_alembic_version")).scalar_one() == 0
    assert _optuna_state(conn) == optuna_before
    alembic_runner.migrate_up_to("heads")
    assert alembic_runner.current == head
    assert set(Base.metadata.tables) <= _tables(conn)
    for table in Base.metadata.tables:
        assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0, table
    assert _optuna_state(conn) == optuna_before
