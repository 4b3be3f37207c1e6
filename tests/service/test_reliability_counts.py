"""Exact trial budgets with 1 to 8 real worker processes, on SQLite and on PostgreSQL.

Whatever the number of workers, a job ends with exactly n_trials COMPLETE or PRUNED trials,
unique numbers, nothing RUNNING, and no retry counted twice; the embedded SQLite default
never answers "database is locked".
"""

from __future__ import annotations

import time

REPETITIONS = 20


def _no_errors_in(logs: str) -> None:
    assert "database is locked" not in logs
    assert "Traceback" not in logs, logs[-4000:]


def test_exact_count_with_1_2_4_8_workers(backend, cluster_factory, tiny_job, check_trials):
    cluster = cluster_factory(backend.url)
    cluster.start_api()
    timings = {}
    for n_workers in (1, 2, 4, 8):
        cluster.start_workers(n_workers - len(cluster.workers))
        started = time.monotonic()
        job_id = cluster.submit({**tiny_job, "name": f"exact-{n_workers}"})
        job = cluster.wait_job(job_id)
        timings[n_workers] = round(time.monotonic() - started, 1)
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert job["finished"] == tiny_job["n_trials"]
        check_trials(cluster.trials(job_id), tiny_job["n_trials"])
    print(f"{backend.name}: seconds per 12-trial job by workers {timings}")
    assert len(cluster.live_workers()) == 8
    _no_errors_in(cluster.all_logs())


def test_twenty_repetitions_with_8_workers(backend, cluster_factory, tiny_job, check_trials):
    cluster = cluster_factory(backend.url)
    cluster.start_api()
    cluster.start_workers(8)
    started = time.monotonic()
    ids = [cluster.submit({**tiny_job, "name": f"rep-{i}", "sampler": {"name": "random",
                                                                        "seed": i}})
           for i in range(REPETITIONS)]
    for job_id in ids:
        job = cluster.wait_job(job_id, timeout_s=300)
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert job["finished"] == tiny_job["n_trials"]
        check_trials(cluster.trials(job_id), tiny_job["n_trials"])
    print(f"{backend.name}: {REPETITIONS} jobs x {tiny_job['n_trials']} trials on 8 workers "
          f"in {time.monotonic() - started:.1f} s")
    assert len(cluster.live_workers()) == 8
    _no_errors_in(cluster.all_logs())
