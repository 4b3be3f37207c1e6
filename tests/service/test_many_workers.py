"""Many real workers on one PostgreSQL: straight to the server, and through a real PgBouncer in
transaction pooling mode (README, "Many workers and PgBouncer", shows what these tests run).

Sixteen `hptune worker` processes and the API (`hptune serve --workers 0`) share one job of
trials that train for about a millisecond (iris, one epoch, a 4-unit layer), so the claim path,
not training, is what runs. The job must end with exactly n_trials finished trials, none
counted twice, the logs clean; PostgreSQL's server connections (pg_stat_activity, polled all
along) must stay within the stated bound: per process 2 x (HPTUNE_POOL_SIZE +
HPTUNE_MAX_OVERFLOW) straight, and PgBouncer's default_pool_size through it while PgBouncer
holds many more client connections. Without PgBouncer (Debian: apt-get install pgbouncer)
the PgBouncer half skips with the reason; with HPTUNE_REQUIRE_POSTGRES=1 (CI) it fails.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from service.settings import Settings
from tests.postgres import ConnectionWatch, PgBouncer, pgbouncer_unavailable_reason

# Sixteen workers on two cores already load the machine fully: run alone.
pytestmark = pytest.mark.serial

WORKERS = 16
N_TRIALS = 32
# PgBouncer's server connections for the test database: more than the locks that can be held
# at once (schema upgrade, this job's claim lock, the owner's lock), far fewer than clients.
POOL_SIZE = 8
# A trial of about a millisecond: the claim path is what 16 workers on two cores exercise.
SHORT_JOB = {
    "name": "many-workers",
    "dataset": "iris",
    "n_trials": N_TRIALS,
    "max_epochs": 1,
    "search_space": {"batch_size": {"value": 32}},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "early_stopping": {"patience": None},
    "model": {"hidden_layers": [4]},
}
# Sixteen workers on two cores: heartbeats late by seconds must not fail live trials.
ENV = {"HPTUNE_HEARTBEAT_INTERVAL": "5", "HPTUNE_GRACE_PERIOD": "20"}
# Log lines that would mean a failure of the pooled path or a lost claim.
BAD_LOG_LINES = ("Traceback", "prepared statement", "query_wait_timeout", "lock timeout",
                 "IntegrityError", "UniqueViolation", " ERROR ")


@pytest.fixture(scope="module")
def pgbouncer(pg_server):
    """A PgBouncer (transaction pooling, default_pool_size POOL_SIZE) in front of the session's
    PostgreSQL, for this module (skips without pgbouncer, or fails under CI)."""
    reason = pgbouncer_unavailable_reason()
    if reason is not None:
        if os.environ.get("HPTUNE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"HPTUNE_REQUIRE_POSTGRES=1 but PgBouncer cannot start: {reason}")
        pytest.skip(f"PgBouncer-backed test: {reason}")
    pg_server.ensure_running()
    bouncer = PgBouncer(pg_server, pool_size=POOL_SIZE).start()
    yield bouncer
    bouncer.stop()


def _worker_processes(server, database: str, study_name: str) -> int:
    """How many distinct worker processes ran the study's trials."""
    rows = server.execute(
        "SELECT COUNT(DISTINCT a.value_json) FROM trials t JOIN studies s USING (study_id) "
        "JOIN trial_system_attributes a ON a.trial_id = t.trial_id "
        f"WHERE s.study_name = '{study_name}' AND a.key = 'hptune:worker_process'", database)
    return rows[0][0]


def _run_job(cluster, watch: ConnectionWatch, check_trials) -> dict:
    cluster.start_api(wait=False)
    cluster.start_workers(WORKERS)
    cluster.wait_api()
    job_id = cluster.submit(SHORT_JOB)
    job = cluster.wait_job(job_id, timeout_s=240)
    assert job["status"] == "succeeded", (job, cluster.logs())
    assert job["finished"] == N_TRIALS, job
    check_trials(cluster.trials(job_id), N_TRIALS)
    assert len(cluster.live_workers()) == WORKERS, cluster.logs()
    logs = cluster.all_logs()
    for bad in BAD_LOG_LINES:
        assert bad not in logs, f"{bad!r} in the logs:\n{cluster.logs()}"
    assert not watch.errors and watch.samples > 0, watch.errors
    return job


@pytest.mark.parametrize("route", ["direct", "pgbouncer"])
def test_sixteen_workers_exact_budget_bounded_connections(route, request, pg_server,
                                                          cluster_factory, check_trials,
                                                          measure):
    pg_server.ensure_running()
    url = pg_server.create_database("hptune_many")
    database = url.rsplit("/", 1)[1]
    bouncer = request.getfixturevalue("pgbouncer") if route == "pgbouncer" else None
    env = dict(ENV)
    if bouncer is not None:
        url = bouncer.url(database)
        env["HPTUNE_DATABASE_POOLER"] = "transaction"
    cluster = cluster_factory(url, **env)
    with ConnectionWatch(pg_server, database, bouncer) as watch:
        job = _run_job(cluster, watch, check_trials)
    workers_used = _worker_processes(pg_server, database, job["study_name"])
    assert workers_used >= 2, workers_used  # the trials were spread, not run by one worker
    per_process = 2 * (Settings().pool_size + Settings().max_overflow)
    if bouncer is None:
        # Each process's two engines (the service's and Optuna's) hold at most their pools.
        assert watch.peak_per_process <= per_process, watch.peak_per_process
        assert watch.peak_server <= (WORKERS + 1) * per_process, watch.peak_server
    else:
        assert watch.peak_server <= POOL_SIZE, watch.peak_server
        # Every worker keeps its own client connections: many more clients than servers.
        assert watch.peak_clients >= WORKERS > POOL_SIZE, watch.peak_clients
    measure(f"many_workers_{route}",
            f"{route}: {WORKERS} workers, {N_TRIALS} trials exact; trials run by "
            f"{workers_used} worker processes; peak server connections {watch.peak_server} "
            f"(most by one process {watch.peak_per_process}), peak client connections "
            f"{watch.peak_clients}, {watch.samples} samples")


def _repeat_statement(url: str, pooler: str) -> None:
    """Run one statement 8 times on each of 3 connections of the service's engine, then
    check that neither engine of the process (the service's, Optuna's) prepares."""
    from sqlalchemy import text

    from service.db import Database

    db = Database(Settings(database_url=url, database_pooler=pooler), role="test")
    try:
        with contextlib.ExitStack() as stack:
            conns = [stack.enter_context(db.engine.connect()) for _ in range(3)]
            for _ in range(8):
                for conn in conns:
                    assert conn.execute(text("SELECT CAST(:x AS int) + 1"),
                                        {"x": 1}).scalar() == 2
                    conn.commit()
        for engine in (db.engine, db.storage.engine):
            with engine.connect() as conn:
                assert conn.connection.dbapi_connection.prepare_threshold is None
    finally:
        db.dispose()


def test_pooled_engines_prepare_nothing(pg_server, pgbouncer):
    """Behind transaction pooling, a statement run more often than psycopg's prepare threshold
    (5) on several connections must keep working: HPTUNE_DATABASE_POOLER=transaction turns
    preparing off for every engine of the process, Optuna's included. Without it, PgBouncer
    before 1.21 hands the prepared statement's next run to another server connection."""
    from sqlalchemy.exc import DBAPIError

    url = pgbouncer.url(pg_server.create_database("hptune_prep").rsplit("/", 1)[1])
    _repeat_statement(url, "transaction")
    version = pgbouncer.show("VERSION")[0]["version"].split()[-1]
    if tuple(int(p) for p in version.split(".")[:2]) < (1, 21):
        with pytest.raises(DBAPIError, match="prepared statement"):
            _repeat_statement(url, "none")


def test_lock_waiters_hold_no_server_connection(pg_server, pgbouncer):
    """Behind transaction pooling, more processes waiting for a job's lock than PgBouncer has
    server connections leave the holder free to work: waiters poll, they never wait in the
    server (no backend waits on a lock), and each gets the lock once the holder lets go."""
    import threading

    from sqlalchemy import text

    from service.db import Database

    database = pg_server.create_database("hptune_locks").rsplit("/", 1)[1]
    settings = Settings(database_url=pgbouncer.url(database), database_pooler="transaction")
    holder = Database(settings, role="holder")
    waiters = [Database(settings, role="waiter") for _ in range(POOL_SIZE + 4)]
    got: list[int] = []
    lock = holder.job_lock(7)
    lock.acquire()

    def wait_for_lock(i: int, db: Database) -> None:
        with db.job_lock(7):
            got.append(i)

    threads = [threading.Thread(target=wait_for_lock, args=(i, db), daemon=True)
               for i, db in enumerate(waiters)]
    try:
        for t in threads:
            t.start()
        for _ in range(200):  # bounded: until every waiter is connected to PgBouncer
            pools = [p for p in pgbouncer.show("POOLS") if p["database"] == database]
            if pools and pools[0]["cl_active"] + pools[0]["cl_waiting"] > len(waiters):
                break
            threading.Event().wait(0.05)
        for _ in range(20):  # the holder's other work still gets a server connection
            with holder.session() as s:
                assert s.execute(text("SELECT 1")).scalar() == 1
        blocked = pg_server.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = "
                                    f"'{database}' AND wait_event_type = 'Lock'")[0][0]
        assert blocked == 0 and not got
    finally:
        lock.release()
        for t in threads:
            t.join(timeout=60)
        for db in (holder, *waiters):
            db.dispose()
    assert sorted(got) == list(range(len(waiters)))


def test_pooler_setting_is_for_postgresql():
    with pytest.raises(ValueError, match="HPTUNE_DATABASE_POOLER"):
        Settings(database_url="sqlite:///x.db", database_pooler="transaction")
