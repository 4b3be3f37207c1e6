"""Crashed, poisoned and timed-out trials through real worker processes: a trial whose
worker died is failed after the grace period and its parameters retried (linked to the
original); a trial that crashes its worker every time is retried at most the limit; a
timed-out job keeps nothing RUNNING. Each runs once per storage backend.

These assert outcomes, not latencies (those are in test_reliability_crash.py), but they still
run alone: beside other tests in CI, a job once had a second retry where one is asserted,
most likely a live trial whose heartbeat came later than the 3 s grace period.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.service.crashes import LONG_JOB, MAX_RETRIES, wait_running

# Two workers' heartbeats against a 3 s grace period: run alone (see the docstring).
pytestmark = pytest.mark.serial


@pytest.fixture
def cluster(crash_cluster):
    """The module's crash cluster with two live workers (a test before may have killed some)."""
    crash_cluster.ensure_workers(2)
    return crash_cluster


def test_killed_worker_trial_is_retried_after_grace(cluster, module_backend, check_trials):
    victim, survivor = cluster.live_workers()[:2]
    job_id = cluster.submit(LONG_JOB)
    wait_running(cluster, job_id, 2)
    cluster.kill_worker(victim, signal.SIGKILL)
    t0 = time.monotonic()
    # Nothing stays RUNNING: after the grace period (3 s) the reaper fails it and queues it.
    while True:
        trials = cluster.trials(job_id)
        failed = [t for t in trials if t["state"] == "FAIL"]
        if failed:
            break
        assert time.monotonic() - t0 < 20, cluster.logs()
        time.sleep(0.2)
    print(f"{module_backend.name}: dead worker's trial failed after "
          f"{time.monotonic() - t0:.1f} s")
    job = cluster.wait_job(job_id)
    assert job["status"] == "succeeded", cluster.logs()
    trials = cluster.trials(job_id)
    check_trials(trials, LONG_JOB["n_trials"], MAX_RETRIES)
    retries = [t for t in trials if "retry_of" in t["details"]]
    assert [r["details"]["retry_of"] for r in retries] == [failed[0]["number"]]
    assert survivor.alive()


POISON_JOB = {
    "name": "poison",
    "dataset": "digits",
    "n_trials": 3,
    "max_epochs": 3,
    "search_space": {"batch_size": {"choices": [33, 128]}},
    "sampler": {"name": "random", "seed": 4},
    "pruner": {"name": "none"},
    "model": {"hidden_layers": [16]},
}


def _supervise(cluster, job_id: int, n_workers: int, timeout_s: float = 150) -> dict:
    """Keep n_workers alive (a poison trial kills its worker) until the job ends."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        missing = n_workers - len(cluster.live_workers())
        if missing > 0:
            cluster.start_workers(missing)
        job = cluster.job(job_id)
        if job["status"] in ("succeeded", "failed", "cancelled") and (
            job["counts"]["running"] == 0 and job["counts"]["waiting"] == 0
        ):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not end\n{cluster.logs()}")


def test_poison_trial_is_retried_at_most_the_limit(cluster, check_trials):
    """batch_size=33 crashes its worker hard every time: each such trial runs 1 + 1 times,
    then the slot goes to a new sample and the job goes on to exactly n_trials."""
    job_id = cluster.submit(POISON_JOB)
    job = _supervise(cluster, job_id, 2)
    assert job["status"] == "succeeded", (job, cluster.logs())
    trials = cluster.trials(job_id)
    check_trials(trials, POISON_JOB["n_trials"], MAX_RETRIES)
    poison = [t for t in trials if t["params"]["batch_size"] == 33]
    assert poison, "the seed must draw the poison value at least once"
    assert all(t["state"] == "FAIL" for t in poison)
    roots = [t for t in poison if "retry_of" not in t["details"]]
    for root in roots:
        chain = [t for t in poison if t["details"].get("retry_of") == root["number"]]
        assert len(chain) == 1, (root, chain)  # retried once (the limit), never again
    assert all(t["params"]["batch_size"] == 128 for t in trials
               if t["state"] in ("COMPLETE", "PRUNED"))
    assert "HPTUNE_TEST_CRASH_ON_PARAM matches" in cluster.all_logs()
    assert max(w.proc.returncode or 0 for w in cluster.workers) == 86  # os._exit in the worker


def test_all_poison_job_ends_instead_of_looping(cluster):
    n_trials = 1
    job_id = cluster.submit({**POISON_JOB, "n_trials": n_trials,
                             "search_space": {"batch_size": {"choices": [33]}}})
    job = _supervise(cluster, job_id, 2)
    assert job["status"] == "failed", (job, cluster.logs())
    assert "trials failed" in job["error"]
    # It stops at the threshold: n_trials x (retries + 1) crashes, plus the one that passed it
    # (and at most one more that was already running).
    assert n_trials * 2 < job["counts"]["failed"] <= n_trials * 2 + 2, job
    assert job["counts"]["running"] == 0 and job["counts"]["waiting"] == 0


def test_timeout_ends_the_job_cleanly(cluster):
    # Trials far longer than the timeout, so that it always falls in the middle of the first
    # ones: with LONG_JOB's (about 3 s on SQLite, 4 s on PostgreSQL) they could end just
    # before the deadline, and then no trial was left running to stop.
    job_id = cluster.submit({**LONG_JOB, "n_trials": 20, "max_epochs": 1000,
                             "timeout_seconds": 4})
    job = cluster.wait_job(job_id, timeout_s=60)
    assert job["status"] == "failed", job
    assert job["error"].startswith("timed out after 4 s with "), job
    trials = cluster.trials(job_id)
    assert not [t for t in trials if t["state"] in ("RUNNING", "WAITING")]
    stopped = [t for t in trials if t["state"] == "FAIL"]
    assert stopped and all(t["details"].get("stop_cause") == "timed_out" for t in stopped)
    assert job["finished"] < 20
    started = job["started_at"] and job["finished_at"]
    assert started
