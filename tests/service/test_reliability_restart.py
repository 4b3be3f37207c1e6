"""Restarting the whole service mid-job, on SQLite and on PostgreSQL.

SIGKILL to the API and every worker half-way through a job while trials are running, as a
power cut would, then a fresh start: the dead workers' trials are failed after the grace
period and retried, and the job still ends with exactly n_trials.
"""

from __future__ import annotations

import signal

# Trials of a few tenths of a second, so that the restart lands in the middle of the job.
MID_JOB = {
    "name": "restart",
    "dataset": "digits",
    "n_trials": 12,
    "max_epochs": 40,
    "search_space": {"batch_size": {"choices": [64, 128]}},
    "sampler": {"name": "tpe", "seed": 2, "n_startup_trials": 4},
    "pruner": {"name": "none"},
    "early_stopping": {"patience": None},
    "model": {"hidden_layers": [128]},
}


def test_restart_everything_mid_job(backend, cluster_factory, check_trials):
    cluster = cluster_factory(backend.url)
    cluster.start_api()
    cluster.start_workers(2)
    n = MID_JOB["n_trials"]
    job_id = cluster.submit(MID_JOB)
    cluster.wait_finished(job_id, n // 2)
    # The workers are frozen at a moment with trials running, then killed with them.
    running = cluster.pause_workers_mid_trial(job_id)
    assert running >= 1
    for p in [cluster.api, *cluster.workers]:
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait()
    cluster.start_api()
    cluster.start_workers(2)
    job = cluster.wait_job(job_id, timeout_s=240)
    assert job["status"] == "succeeded", (job, cluster.logs())
    trials = cluster.trials(job_id)
    states = check_trials(trials, n)
    print(f"{backend.name}: killed with {running} running; after the restart {states}")
    # Each trial the kill interrupted was failed by the heartbeat reaper and retried.
    retried = {t["details"]["retry_of"] for t in trials if "retry_of" in t["details"]}
    assert len(retried) >= running, trials
