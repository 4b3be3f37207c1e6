"""Workers that die or are stopped, timed: real processes and real signals.

SIGTERM hands the running trial back within an epoch; with every worker dead, the API's
reaper alone fails their trials after the grace period and queues their retries; a cancel
stops running trials within an epoch; on the dead worker's own host its trial is failed
without waiting for the grace period. Each runs once per storage backend. Retries and poison
trials without a latency bound are in test_reliability_retries.py.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime

import pytest

from tests.service.conftest import CLUSTER_ENV
from tests.service.crashes import (
    CRASH_ENV,
    LONG_JOB,
    MAX_RETRIES,
    kill_every_worker_mid_trial,
    wait_running,
    wait_two_mid_trial,
)

# Latencies asserted against fixed bounds (a cancel within an epoch plus 0.3 s, SIGTERM to
# exit in 5 s, the reaper's rounds), and trials that train hard: beside other tests they ran
# up to four times slower. Run alone.
pytestmark = pytest.mark.serial


@pytest.fixture
def cluster(crash_cluster):
    """The module's crash cluster with two live workers (a test before may have killed some)."""
    crash_cluster.ensure_workers(2)
    return crash_cluster


def test_sigterm_hands_the_trial_back_within_an_epoch(cluster, module_backend, check_trials):
    stopped, other = cluster.live_workers()[:2]
    job_id = cluster.submit(LONG_JOB)
    wait_two_mid_trial(cluster, job_id)  # both workers inside a trial's epochs
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


def test_api_reaps_dead_trials_while_no_worker_is_alive(cluster, module_backend, measure):
    """kill -9 every worker mid-trial and start none: the API's own reaper fails the stale
    RUNNING trials after the grace period and queues their retries."""
    job_id = cluster.submit(LONG_JOB)
    victims, killed_at = kill_every_worker_mid_trial(cluster, job_id)
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


# What a cancelled trial may take beyond the epoch it was in: the job-status read (at most
# CANCEL_POLL_MIN_S = 0.05 s late), storing its outcome (a dozen writes before its completion
# time) and the scheduler of a busy machine.
CANCEL_LATENCY_S = 0.3


def test_cancel_stops_running_trials_within_an_epoch(cluster, module_backend, measure):
    workers = cluster.live_workers()
    job_id = cluster.submit(LONG_JOB)
    wait_running(cluster, job_id, 2)
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
    victims, killed_at = kill_every_worker_mid_trial(cluster, job_id)
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
