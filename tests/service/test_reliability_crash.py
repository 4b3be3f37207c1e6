"""Workers that die, are stopped, or run poison trials: real processes and real signals.

SIGTERM hands the running trial back within an epoch; a trial whose worker died is failed
after the grace period and its parameters retried (linked to the original), by the API's
reaper alone when no worker is left; a trial that crashes its worker every time is retried at
most the limit; a cancel stops running trials within an epoch; a cancelled or timed-out job
keeps nothing RUNNING; on the dead worker's own host its trial is failed without waiting for
the grace period. Each runs once per storage backend.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime

import pytest

from tests.service.conftest import CLUSTER_ENV

# Latencies asserted against fixed bounds (a cancel within an epoch plus 0.3 s, SIGTERM to
# exit in 5 s, the reaper's rounds), and trials that train hard: beside other tests they ran
# up to four times slower. Run alone.
pytestmark = pytest.mark.serial

# Trials of about three seconds on a quiet machine (0.02 s an epoch): long enough to be
# caught mid-run by a signal or a cancel sent half a second after they start.
LONG_JOB = {
    "name": "long",
    "dataset": "digits",
    "n_trials": 4,
    "max_epochs": 150,
    "search_space": {"batch_size": {"choices": [64]}},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "early_stopping": {"patience": None},
    "model": {"hidden_layers": [256, 256]},
}


# Every worker of this module's cluster crashes hard on a trial with batch_size 33 (a value
# only the poison jobs below search), and a crashed trial is retried once. The shared cluster
# tests the heartbeat path, the only one for workers on other machines: its reapers do not
# look for gone processes on their own host (tested on its own at the end).
CRASH_ENV = {"HPTUNE_TEST_CRASH_ON_PARAM": "batch_size=33", "HPTUNE_MAX_TRIAL_RETRIES": "1",
             "HPTUNE_REAP_GONE_PROCESSES": "false", "HPTUNE_REAP_INTERVAL": "1"}
MAX_RETRIES = 1


@pytest.fixture(scope="module")
def shared(module_backend, module_cluster_factory):
    """One API for the module's tests, per backend; each test gets two live workers."""
    cluster = module_cluster_factory(module_backend.url, **CRASH_ENV)
    cluster.start_api()
    return cluster


@pytest.fixture
def cluster(shared):
    shared.ensure_workers(2)
    return shared


def _wait_running(cluster, job_id: int, n: int, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        if job["counts"]["running"] >= n:
            return job
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} trials running\n{cluster.logs()}")


def _wait_two_mid_trial(cluster, job_id: int) -> None:
    """Until two of the job's trials run and each has reported an epoch: by then its worker
    has stamped it with its process identity and beaten once."""
    deadline = time.monotonic() + 60
    while True:
        _wait_running(cluster, job_id, 2)
        running = [t for t in cluster.trials(job_id) if t["state"] == "RUNNING"]
        if len(running) >= 2 and all(t["intermediate_values"] for t in running):
            return
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.05)


def _kill_every_worker_mid_trial(cluster, job_id: int) -> tuple[set[int], float]:
    """SIGKILL every live worker while two of the job's trials run; (their numbers, when).

    Waits until each running trial has reported an epoch (a worker killed in the milliseconds
    before is left to the heartbeat's grace period)."""
    _wait_two_mid_trial(cluster, job_id)
    for w in cluster.live_workers():
        cluster.kill_worker(w, signal.SIGKILL)
        w.proc.wait()
    killed_at = time.monotonic()
    victims = {t["number"] for t in cluster.trials(job_id) if t["state"] == "RUNNING"}
    assert victims, "the kill must catch trials running"
    return victims, killed_at


def test_sigterm_hands_the_trial_back_within_an_epoch(cluster, module_backend, check_trials):
    stopped, other = cluster.live_workers()[:2]
    job_id = cluster.submit(LONG_JOB)
    _wait_two_mid_trial(cluster, job_id)  # both workers inside a trial's epochs
    t0 = time.monotonic()
    stopped.proc.send_signal(signal.SIGTERM)
    rc = stopped.proc.wait(timeout=15)
    took = time.monotonic() - t0
    print(f"{module_backend.name}: SIGTERM to exit {took:.2f} s")
    assert rc == 0, stopped.log()
    assert took < 5, f"SIGTERM took {took:.1f} s"
    trials = cluster.trials(job_id)
    handed = [t for t in trials if t["details"].get("stop_cause") == "handed_back"]
    assert len(handed) == 1, trials
    assert handed[0]["state"] == "FAIL"
    assert handed[0]["stop_reason"] in ("handed_back", "cancelled")
    # Its parameters are queued again at once (no grace period to wait out).
    retry = [t for t in trials if t["details"].get("retry_of") == handed[0]["number"]]
    assert len(retry) == 1 and retry[0]["state"] in ("WAITING", "RUNNING"), trials
    assert "got signal 15" in stopped.log()
    cluster.start_workers(1)
    job = cluster.wait_job(job_id)
    assert job["status"] == "succeeded", cluster.logs()
    check_trials(cluster.trials(job_id), LONG_JOB["n_trials"], MAX_RETRIES)
    assert other.alive()


def test_killed_worker_trial_is_retried_after_grace(cluster, module_backend, check_trials):
    victim, survivor = cluster.live_workers()[:2]
    job_id = cluster.submit(LONG_JOB)
    _wait_running(cluster, job_id, 2)
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


def test_api_reaps_dead_trials_while_no_worker_is_alive(cluster, module_backend, measure):
    """kill -9 every worker mid-trial and start none: the API's own reaper fails the stale
    RUNNING trials after the grace period and queues their retries."""
    job_id = cluster.submit(LONG_JOB)
    victims, killed_at = _kill_every_worker_mid_trial(cluster, job_id)
    heartbeat_s = float(CLUSTER_ENV["HPTUNE_HEARTBEAT_INTERVAL"])
    grace_s = float(CLUSTER_ENV["HPTUNE_GRACE_PERIOD"])
    reap_s = float(CRASH_ENV["HPTUNE_REAP_INTERVAL"])
    # A beat at most one interval before the kill, the grace period, then the reaper's round.
    limit_s = grace_s + reap_s + 5
    while (running := cluster.job(job_id)["counts"]["running"]) > 0:
        assert time.monotonic() - killed_at < limit_s, (running, cluster.logs())
        time.sleep(0.2)
    took = time.monotonic() - killed_at
    measure("reap_without_workers_s", f"{module_backend.name}: no worker alive, {len(victims)} "
            f"dead trials failed by the API after {took:.1f} s (grace {grace_s:g} s)")
    assert took >= grace_s - heartbeat_s, "failed before its grace period ran out"
    assert not cluster.live_workers()
    # Their parameters wait for the next worker, linked to the trials they retry (each trial
    # is failed, then its retry queued: the second step may trail the first by a moment).
    while True:
        trials = {t["number"]: t for t in cluster.trials(job_id)}
        retries = {t["details"]["retry_of"]: t for t in trials.values()
                   if "retry_of" in t["details"]}
        if set(retries) == victims or time.monotonic() - killed_at > limit_s:
            break
        time.sleep(0.2)
    for number in victims:
        assert trials[number]["state"] == "FAIL", trials[number]
        assert trials[number]["stop_reason"] == "failed", trials[number]
    assert set(retries) == victims, trials
    assert all(t["state"] == "WAITING" for t in retries.values()), retries
    with cluster.client() as c:  # leave nothing for the next test's workers
        assert c.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    assert cluster.wait_job(job_id, timeout_s=30)["status"] == "cancelled"


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


# What a cancelled trial may take beyond the epoch it was in: the job-status read (at most
# CANCEL_POLL_MIN_S = 0.05 s late), storing its outcome (a dozen writes before its completion
# time) and the scheduler of a busy machine.
CANCEL_LATENCY_S = 0.3


def test_cancel_stops_running_trials_within_an_epoch(cluster, module_backend, measure):
    workers = cluster.live_workers()
    job_id = cluster.submit(LONG_JOB)
    _wait_running(cluster, job_id, 2)
    with cluster.client() as c:
        assert c.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    # The trials' timestamps are Optuna's: naive local time, on this machine's clock.
    cancelled_at = datetime.now()
    t0 = time.monotonic()
    job = cluster.wait_job(job_id, timeout_s=30)
    took = time.monotonic() - t0
    assert took < 5
    assert job["status"] == "cancelled"
    trials = cluster.trials(job_id)
    assert not [t for t in trials if t["state"] in ("RUNNING", "WAITING")]
    cancelled = [t for t in trials if t["state"] == "FAIL"]
    # Both running trials stop at their next epoch (one may have just finished instead).
    assert 1 <= len(cancelled) <= 2, trials
    assert all(t["stop_reason"] == "cancelled" for t in cancelled)
    # Each ended (completion time, with its outcome stored) within one of its epochs of the
    # cancel, plus the fixed latency.
    lags = [((datetime.fromisoformat(t["datetime_complete"]) - cancelled_at).total_seconds(),
             t["details"]["epoch_seconds"]) for t in cancelled]
    measure("cancel_latency_s", f"{module_backend.name}: cancel to no trial running "
            f"{took:.2f} s; each trial ended " + ", ".join(
                f"{lag:.3f} s after the cancel ({epoch:.3f} s epochs)" for lag, epoch in lags))
    for lag, epoch in lags:
        assert lag <= epoch + CANCEL_LATENCY_S, (lags, trials)
    assert not [t for t in trials if "retry_of" in t["details"]], "a cancelled job retries"
    assert all(w.alive() for w in workers)


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


def test_a_gone_worker_process_is_reaped_without_waiting_for_the_grace_period(
        backend, cluster_factory, measure):
    """On the worker's own host a reaper sees that its process is gone (kill -9) and fails
    the trial at once: with a 60 s grace period, the API alone retries it within seconds, and
    a replacement worker runs the retry."""
    cluster = cluster_factory(backend.url, HPTUNE_GRACE_PERIOD="60",
                              HPTUNE_REAP_INTERVAL=CRASH_ENV["HPTUNE_REAP_INTERVAL"])
    cluster.start_api()
    cluster.start_workers(2)
    job_id = cluster.submit(LONG_JOB)
    victims, killed_at = _kill_every_worker_mid_trial(cluster, job_id)
    while True:
        trials = {t["number"]: t for t in cluster.trials(job_id)}
        retried = {t["details"]["retry_of"] for t in trials.values() if "retry_of" in t["details"]}
        if retried == victims:
            break
        limit_s = float(CRASH_ENV["HPTUNE_REAP_INTERVAL"]) + 10
        assert time.monotonic() - killed_at < limit_s, (trials, cluster.logs())
        time.sleep(0.2)
    took = time.monotonic() - killed_at
    measure("reap_gone_process_s", f"{backend.name}: {len(victims)} trials of killed workers "
            f"failed and queued again by the API after {took:.1f} s (grace 60 s)")
    for number in victims:
        assert trials[number]["state"] == "FAIL", trials[number]
        assert trials[number]["details"].get("error") == "its worker process is gone"
    cluster.start_workers(2)
    job = cluster.wait_job(job_id, timeout_s=120)
    assert job["status"] == "succeeded" and job["finished"] == LONG_JOB["n_trials"], job
