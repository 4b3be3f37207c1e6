"""A PostgreSQL outage of 20 seconds in the middle of a job (a real server, really stopped).

The API answers 503 with a JSON body while the database is away (liveness stays 200), the
workers back off instead of dying, a worker started during the outage waits for the database,
and once PostgreSQL is back the job finishes with exactly n_trials: every trial that was
running when the database went away ends up told, or failed and retried, never lost and
never counted twice.
"""

from __future__ import annotations

import time

OUTAGE_S = 20
OUTAGE_JOB = {
    "name": "outage",
    "dataset": "digits",
    "n_trials": 20,
    "max_epochs": 40,
    "search_space": {"batch_size": {"choices": [64, 128]}},
    "sampler": {"name": "random", "seed": 5},
    "pruner": {"name": "none"},
    "early_stopping": {"patience": None},
    "model": {"hidden_layers": [128]},
}


def test_postgres_outage_mid_job(postgres_backend, cluster_factory, check_trials):
    server = postgres_backend.server
    cluster = cluster_factory(postgres_backend.url)
    cluster.start_api()
    workers = cluster.start_workers(3)
    client = cluster.client()
    job_id = cluster.submit(OUTAGE_JOB)
    cluster.wait_finished(job_id, 4)
    # The database goes away under running trials: the workers are frozen at a moment with
    # trials running, the server stopped, and the workers resumed into the outage.
    running = cluster.pause_workers_mid_trial(job_id)
    assert running >= 1
    try:
        server.stop("fast")
    finally:
        cluster.resume_workers()
    down_at = time.monotonic()
    codes: dict[str, list[int]] = {"job": [], "readyz": [], "healthz": []}
    late = None
    try:
        while time.monotonic() - down_at < OUTAGE_S:
            r = client.get(f"/api/v1/jobs/{job_id}")
            codes["job"].append(r.status_code)
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["detail"] and "Traceback" not in r.text
            for probe in ("readyz", "healthz"):
                codes[probe].append(client.get(f"/{probe}").status_code)
            if late is None and time.monotonic() - down_at > 3:
                late = cluster.start_workers(1)[0]  # starts while the database is away
            time.sleep(1)
    finally:
        server.start()
    print(f"outage of {OUTAGE_S} s with {running} trials running; API answers {codes}")
    assert set(codes["readyz"]) == {503} and set(codes["healthz"]) == {200}
    assert all(w.alive() for w in workers), cluster.logs()
    job = cluster.wait_job(job_id, timeout_s=180)
    assert job["status"] == "succeeded", (job, cluster.logs())
    states = check_trials(cluster.trials(job_id), OUTAGE_JOB["n_trials"])
    print(f"after the outage: {states}")
    assert all(w.alive() for w in [*workers, late]) and cluster.api.alive(), cluster.logs()
    assert "database not ready" in late.log()
    logs = cluster.all_logs()
    assert "Traceback" not in logs, cluster.logs()
    assert "trying again" in logs  # the workers noticed, backed off and went on
