"""Connections to PostgreSQL: bounded per worker, and back to the idle baseline after jobs.

Every hptune process names itself in pg_stat_activity (application_name
`hptune-<role>-<pid>`), so the test counts each worker's connections on the real server.
"""

from __future__ import annotations

import time
from collections import Counter

# A worker uses at most: a session and a claim lock on the service's engine, Optuna's main
# thread and its heartbeat thread on Optuna's engine.
MAX_CONNECTIONS_PER_WORKER = 4
# Both engines' pools bound the API process (pool_size + max_overflow each, defaults 5 + 5).
MAX_CONNECTIONS_API = 2 * (5 + 5)


def _connections(server, database: str) -> Counter:
    rows = server.execute(
        "SELECT application_name, count(*) FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND application_name LIKE 'hptune-%' "
        "GROUP BY application_name")
    return Counter({name: n for name, n in rows})


def _workers(c: Counter) -> Counter:
    return Counter({k: v for k, v in c.items() if k.startswith("hptune-worker-")})


def _idle_workers(server, database: str) -> Counter:
    """Connections per worker, counting only workers whose connections are all idle."""
    rows = server.execute(
        "SELECT application_name, count(*), bool_and(state = 'idle') FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND application_name LIKE 'hptune-worker-%' "
        "GROUP BY application_name")
    return Counter({name: n for name, n, idle in rows if idle})


def test_connections_bounded_and_back_to_baseline(postgres_backend, cluster_factory, tiny_job,
                                                  check_trials):
    server = postgres_backend.server
    database = postgres_backend.url.rsplit("/", 1)[1]
    cluster = cluster_factory(postgres_backend.url)
    cluster.start_api()
    workers = cluster.start_workers(3)
    # The idle baseline: every worker started, with its connections open and all idle (none
    # in a transaction: the start-up's schema check and first reap and claim are done).
    deadline = time.monotonic() + 60
    while not (all("started" in w.log() for w in workers)
               and len(idle := _idle_workers(server, database)) == len(workers)):
        assert time.monotonic() < deadline, (_connections(server, database), cluster.logs())
        time.sleep(0.2)
    baseline = sum(idle.values())

    ids = [cluster.submit({**tiny_job, "name": f"conn-{i}"}) for i in range(3)]
    peak: Counter = Counter()
    while cluster.job(ids[-1])["status"] not in ("succeeded", "failed"):
        now = _connections(server, database)
        for name, n in now.items():
            peak[name] = max(peak[name], n)
        time.sleep(0.1)
    for job_id in ids:
        assert cluster.wait_job(job_id)["status"] == "succeeded"
        check_trials(cluster.trials(job_id), tiny_job["n_trials"])
    worker_peaks = _workers(peak)
    assert len(worker_peaks) == 3, peak
    assert max(worker_peaks.values()) <= MAX_CONNECTIONS_PER_WORKER, peak
    api = [n for name, n in peak.items() if name.startswith("hptune-api-")]
    assert api and max(api) <= MAX_CONNECTIONS_API, peak

    # Idle again, the workers give back what the trials needed.
    deadline = time.monotonic() + 20
    while True:
        after = sum(_workers(_connections(server, database)).values())
        if after <= baseline:
            break
        assert time.monotonic() < deadline, (baseline, _connections(server, database))
        time.sleep(0.5)
    print(f"worker connections: idle baseline {baseline}, peak per worker "
          f"{dict(worker_peaks)}, after the jobs {after}")
