"""Exact trial budgets with 8, 4, 2 and 1 real worker processes, on SQLite and PostgreSQL.

Whatever the number of workers, a job ends with exactly n_trials COMPLETE or PRUNED trials,
unique numbers, nothing RUNNING, and no retry counted twice; the embedded SQLite default
never answers "database is locked". The module's cluster is itself a cold start: the API and
eight workers start at the same moment on an empty database.
"""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import create_engine, text

REPETITIONS = 20
# Log lines that would mean a start-up race or an unhandled failure.
BAD_LOG_LINES = ("Traceback", "already exists", "UniqueViolation", "IntegrityError",
                 "database is locked", "DuplicateTable", " ERROR ")


@pytest.fixture(scope="module")
def cluster(module_backend, module_cluster_factory):
    """Cold start: the API and 8 workers at once, on an empty database."""
    cluster = module_cluster_factory(module_backend.url)
    cluster.start_api(wait=False)
    cluster.start_workers(8)
    cluster.wait_api()
    return cluster


def _no_bad_lines(cluster) -> None:
    logs = cluster.all_logs()
    for bad in BAD_LOG_LINES:
        assert bad not in logs, f"{bad!r} in the logs:\n{cluster.logs()}"


def test_cold_start_creates_the_schema_once(cluster, module_backend, tiny_job, check_trials):
    job_id = cluster.submit({**tiny_job, "name": "cold-start"})
    job = cluster.wait_job(job_id, timeout_s=240)
    assert job["status"] == "succeeded", (job, cluster.logs())
    check_trials(cluster.trials(job_id), tiny_job["n_trials"])
    assert len(cluster.live_workers()) == 8 and cluster.api.alive()
    _no_bad_lines(cluster)
    # One version row each, ours and Optuna's: no process created the schema twice.
    engine = create_engine(module_backend.url)
    try:
        with engine.connect() as conn:
            for table in ("hptune_alembic_version", "version_info", "alembic_version"):
                assert conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar() == 1
    finally:
        engine.dispose()


def test_twenty_repetitions_with_8_workers(cluster, module_backend, tiny_job, check_trials):
    assert len(cluster.ensure_workers(8)) == 0
    started = time.monotonic()
    ids = [cluster.submit({**tiny_job, "name": f"rep-{i}",
                           "sampler": {"name": "random", "seed": i}})
           for i in range(REPETITIONS)]
    for job_id in ids:
        job = cluster.wait_job(job_id, timeout_s=300)
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert job["finished"] == tiny_job["n_trials"]
        check_trials(cluster.trials(job_id), tiny_job["n_trials"])
    print(f"{module_backend.name}: {REPETITIONS} jobs x {tiny_job['n_trials']} trials on "
          f"8 workers in {time.monotonic() - started:.1f} s")
    assert len(cluster.live_workers()) == 8
    _no_bad_lines(cluster)


def test_exact_count_with_8_4_2_1_workers(cluster, module_backend, tiny_job, check_trials):
    """Shrinks the cluster by SIGTERM (graceful stops) between jobs: 8, 4, 2, then 1."""
    cluster.ensure_workers(8)
    timings = {}
    for n_workers in (8, 4, 2, 1):
        for w in cluster.live_workers()[n_workers:]:
            w.proc.send_signal(signal.SIGTERM)
            assert w.proc.wait(timeout=30) == 0, w.log()
        assert len(cluster.live_workers()) == n_workers
        started = time.monotonic()
        job_id = cluster.submit({**tiny_job, "name": f"exact-{n_workers}"})
        job = cluster.wait_job(job_id)
        timings[n_workers] = round(time.monotonic() - started, 1)
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert job["finished"] == tiny_job["n_trials"]
        check_trials(cluster.trials(job_id), tiny_job["n_trials"])
    print(f"{module_backend.name}: seconds per {tiny_job['n_trials']}-trial job by workers "
          f"{timings}")
    _no_bad_lines(cluster)
