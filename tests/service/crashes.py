"""What test_reliability_crash.py and test_reliability_retries.py share: their cluster's
settings (the `crash_cluster` fixture of conftest.py), a job whose trials run long enough to be
caught mid-run, and waits on its trials."""

from __future__ import annotations

import signal
import time

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


# Every worker of these clusters crashes hard on a trial with batch_size 33 (a value only the
# poison jobs of test_reliability_retries.py search), and a crashed trial is retried once.
# The shared cluster tests the heartbeat path, the only one for workers on other machines: its
# reapers do not look for gone processes on their own host (tested on its own cluster at the
# end of test_reliability_crash.py). Reaper rounds every second instead of every 5.
CRASH_ENV = {"HPTUNE_TEST_CRASH_ON_PARAM": "batch_size=33", "HPTUNE_MAX_TRIAL_RETRIES": "1",
             "HPTUNE_REAP_GONE_PROCESSES": "false", "HPTUNE_REAP_INTERVAL": "1"}
MAX_RETRIES = 1


def wait_running(cluster, job_id: int, n: int, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        if job["counts"]["running"] >= n:
            return job
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} trials running\n{cluster.logs()}")


def wait_two_mid_trial(cluster, job_id: int) -> None:
    """Until two of the job's trials run and each has reported an epoch: by then its worker
    has stamped it with its process identity and beaten once."""
    deadline = time.monotonic() + 60
    while True:
        wait_running(cluster, job_id, 2)
        running = [t for t in cluster.trials(job_id) if t["state"] == "RUNNING"]
        if len(running) >= 2 and all(t["intermediate_values"] for t in running):
            return
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.05)


def kill_every_worker_mid_trial(cluster, job_id: int) -> tuple[set[int], float]:
    """SIGKILL every live worker while two of the job's trials run; (their numbers, when).

    Waits until each running trial has reported an epoch (a worker killed in the milliseconds
    before is left to the heartbeat's grace period)."""
    wait_two_mid_trial(cluster, job_id)
    workers = cluster.live_workers()
    # Frozen first, so that the trials counted are the ones the kill catches: a reaper may fail
    # a killed worker's trial within the second, before a count made after the kill.
    for w in workers:
        w.proc.send_signal(signal.SIGSTOP)
    victims = {t["number"] for t in cluster.trials(job_id) if t["state"] == "RUNNING"}
    for w in workers:
        cluster.kill_worker(w, signal.SIGKILL)
        w.proc.wait()
    killed_at = time.monotonic()
    assert victims, "the kill must catch trials running"
    return victims, killed_at
