"""Chaos on PostgreSQL: four workers, one killed with SIGKILL every few seconds and replaced.

The kills go on until the job ends. A 60-trial job still ends with exactly 60 finished
trials, nothing RUNNING, every retry linked to the trial it retries, and a wall time close to
an undisturbed run of the same job (shown in the terminal summary's measurements; asserted
loosely, because a replacement worker's start-up costs CPU on a small machine).
"""

from __future__ import annotations

import random
import signal
import time

import pytest

# A wall-time ratio of two runs: other tests' load beside either run would skew it.
pytestmark = pytest.mark.serial

N_TRIALS = 60
N_WORKERS = 4
# One kill every few seconds, each once the last replacement is up (on two cores its start-up
# takes seconds of CPU): never more than one worker down at a time.
KILL_EVERY_S = 4.0
# The chaos run fails past this, however the kills go.
CHAOS_TIMEOUT_S = 400
# Each kill loses at most one partly trained trial plus the grace period before its retry;
# on two cores the replacement's start-up also slows the others, and on a shared CI machine
# the two runs may see different loads. The target is 1.5x; the assertion only catches a
# stall (a lost retry, a stuck slot), which shows as many times the undisturbed wall time.
WALL_RATIO_LIMIT = 3.0
CHAOS_JOB = {
    "name": "chaos",
    "dataset": "digits",
    "n_trials": N_TRIALS,
    # Long enough (about 15 s undisturbed on two cores) for several kills at KILL_EVERY_S.
    "max_epochs": 16,
    "search_space": {"batch_size": {"choices": [64]}},
    "sampler": {"name": "random", "seed": 11},
    "pruner": {"name": "none"},
    "early_stopping": {"patience": None},
    "model": {"hidden_layers": [256, 256]},
}


def test_chaos_kill_workers_during_a_60_trial_job(postgres_backend, cluster_factory,
                                                  check_trials, measure):
    cluster = cluster_factory(postgres_backend.url)
    cluster.start_api()
    cluster.start_workers(N_WORKERS)
    # Warm up (every worker loads the dataset once), then an undisturbed run for reference.
    cluster.wait_job(cluster.submit({**CHAOS_JOB, "n_trials": 2 * N_WORKERS}))
    started = time.monotonic()
    calm = cluster.wait_job(cluster.submit({**CHAOS_JOB, "name": "calm"}), timeout_s=300)
    calm_s = time.monotonic() - started
    assert calm["status"] == "succeeded"

    rng = random.Random(0)
    started = time.monotonic()
    job_id = cluster.submit(CHAOS_JOB)
    kills = 0
    next_kill = started + KILL_EVERY_S
    replacement = None
    while cluster.job(job_id)["status"] not in ("succeeded", "failed", "cancelled"):
        up = replacement is None or "started" in replacement.log()
        if time.monotonic() >= next_kill and up:
            # A worker that has run trials is likely in the middle of one: kill it.
            busy = [w for w in cluster.live_workers() if "job " in w.log()]
            victim = rng.choice(busy or cluster.live_workers())
            cluster.kill_worker(victim, signal.SIGKILL)
            victim.proc.wait()
            kills += 1
            replacement = cluster.start_workers(1)[0]
            next_kill = time.monotonic() + KILL_EVERY_S
        assert time.monotonic() - started < CHAOS_TIMEOUT_S, cluster.logs()
        time.sleep(0.2)
    chaos_s = time.monotonic() - started
    job = cluster.wait_job(job_id)
    assert job["status"] == "succeeded", (job, cluster.logs())
    trials = cluster.trials(job_id)
    states = check_trials(trials, N_TRIALS)
    retries = [t for t in trials if "retry_of" in t["details"]]
    ratio = chaos_s / calm_s
    measure("chaos_wall_ratio", f"chaos: {kills} workers killed; {states}; {len(retries)} "
            f"retries; wall {chaos_s:.1f} s vs {calm_s:.1f} s undisturbed ({ratio:.2f}x)")
    assert kills >= 2
    assert states.get("FAIL", 0) >= 1, "a kill must have hit a running trial"
    assert len(retries) >= 1
    assert ratio <= WALL_RATIO_LIMIT, f"chaos run took {ratio:.2f}x the undisturbed one"
