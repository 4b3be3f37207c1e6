"""Many workers on one PostgreSQL, straight and through PgBouncer: exact budgets, claim rate,
claim latency and server connections, 8 against 64 workers in the same run.

For each route (`direct`: every process connects to PostgreSQL; `pgbouncer`: through a
throwaway PgBouncer in transaction pooling mode, HPTUNE_DATABASE_POOLER=transaction) and each
worker count, this starts a throwaway PostgreSQL database, `hptune serve --workers 0` and N
`hptune worker` processes (tests/service/conftest.py's Cluster, on service/spawn.py), then
runs a warm-up job (one trial per worker, not counted) and then R jobs one after another of
trials that train for about a millisecond (iris, one epoch, a 4-unit layer), so that what is
measured is the claim path, not training. Per job:

  exact       COMPLETE + PRUNED == n_trials, unique numbers, nothing RUNNING or WAITING
  trials/s    n_trials / (last trial's end - first trial's start): claims per second too
  claim p50/p99  per worker process, a trial's start (Optuna's ask) minus the end of the
              same worker's previous trial in the job: settling, picking the job, waiting for
              its claim lock, counting and asking, i.e. all a worker does between two trials
  servers     peak PostgreSQL connections to the database (pg_stat_activity, polled every
              50 ms); clients: peak PgBouncer clients (SHOW POOLS), = servers when direct

Usage: python benchmarks/many_workers.py [--workers 8 64] [--runs 5] [--n-trials 128]
                                         [--routes direct pgbouncer] [--pool-size 16]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.postgres import (  # noqa: E402
    ConnectionWatch,
    PgBouncer,
    PostgresServer,
    pgbouncer_unavailable_reason,
)
from tests.service.conftest import Cluster  # noqa: E402
from tests.service.test_many_workers import SHORT_JOB  # noqa: E402

# The test's job (tests/service/test_many_workers.py), its n_trials set per run.
JOB = {k: v for k, v in SHORT_JOB.items() if k != "n_trials"}
# 64 workers on two cores: late heartbeats must not fail live trials.
ENV = {"HPTUNE_HEARTBEAT_INTERVAL": "5", "HPTUNE_GRACE_PERIOD": "20",
       "HPTUNE_LOG_LEVEL": "WARNING"}
TIMELINE = """
SELECT t.number, t.state, t.datetime_start, t.datetime_complete, a.value_json
FROM trials t JOIN studies s USING (study_id)
LEFT JOIN trial_system_attributes a
  ON a.trial_id = t.trial_id AND a.key = 'hptune:worker_process'
WHERE s.study_name = '{study}' ORDER BY t.datetime_start
"""


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def job_figures(server: PostgresServer, database: str, job: dict, n_trials: int) -> dict:
    """Exactness, trials/s and the claim gaps of one finished job, from Optuna's tables."""
    rows = server.execute(TIMELINE.format(study=job["study_name"]), database)
    finished = [r for r in rows if r[1] in ("COMPLETE", "PRUNED")]
    numbers = [r[0] for r in rows]
    exact = (job["status"] == "succeeded" and len(finished) == n_trials
             and len(set(numbers)) == len(numbers)
             and not any(r[1] in ("RUNNING", "WAITING") for r in rows))
    by_worker: dict[str, list[tuple]] = defaultdict(list)
    for r in finished:
        by_worker[r[4]].append(r)
    gaps = [(b[2] - a[3]).total_seconds()
            for trials in by_worker.values() for a, b in itertools.pairwise(trials)]
    span = (max(r[3] for r in finished) - min(r[2] for r in finished)).total_seconds()
    return {"exact": exact, "finished": len(finished), "failed": sum(r[1] == "FAIL" for r in rows),
            "trials_per_s": len(finished) / span, "gaps": gaps, "workers_used": len(by_worker),
            "trial_s": statistics.median((r[3] - r[2]).total_seconds() for r in finished)}


def run_cluster(server: PostgresServer, bouncer: PgBouncer | None, workers: int, runs: int,
                n_trials: int, tmp: Path) -> dict:
    """One database, API and `workers` workers; `runs` jobs one after another."""
    url = server.create_database("hptune_bench")
    database = url.rsplit("/", 1)[1]
    env = dict(ENV)
    if bouncer is not None:
        url, env["HPTUNE_DATABASE_POOLER"] = bouncer.url(database), "transaction"
    cluster = Cluster(tmp / f"{'pgb' if bouncer else 'direct'}-{workers}", url, env)
    cluster.tmp.mkdir(parents=True)
    load = os.getloadavg()[0]
    done = []
    with ConnectionWatch(server, database, bouncer) as watch:
        try:
            t0 = time.monotonic()
            cluster.start_api()
            cluster.start_workers(workers)
            # Warm-up, not counted: every worker started, imported and loaded the dataset.
            cluster.wait_job(cluster.submit({**JOB, "n_trials": workers, "name": "warm-up"}),
                             timeout_s=900)
            for i in range(runs):
                job_id = cluster.submit({**JOB, "n_trials": n_trials, "name": f"run-{i}",
                                         "sampler": {"name": "random", "seed": i}})
                done.append(cluster.wait_job(job_id, timeout_s=900))
                print(f"  {'pgbouncer' if bouncer else 'direct'} x{workers} run {i + 1}: "
                      f"{done[-1]['status']} ({time.monotonic() - t0:.0f} s in)",
                      file=sys.stderr, flush=True)
            alive = len(cluster.live_workers())
        finally:
            cluster.stop()
    # Read after the watch: this reader's own connection goes straight to the database.
    jobs = [job_figures(server, database, job, n_trials) for job in done]
    return {"jobs": jobs, "alive": alive, "load": load, "peak_server": watch.peak_server,
            "peak_clients": watch.peak_clients, "watch_errors": len(watch.errors)}


def row(route: str, workers: int, res: dict, pool: int | None) -> str:
    jobs = res["jobs"]
    gaps = [g for j in jobs for g in j["gaps"]]
    tps = [j["trials_per_s"] for j in jobs]
    exact = sum(j["exact"] for j in jobs)
    bound = f" (pool {pool})" if pool else ""
    return (f"| {route} | {workers} | {exact} of {len(jobs)} | "
            f"{statistics.median(tps):.2f} ({min(tps):.2f}-{max(tps):.2f}) | "
            f"{pct(gaps, 0.5):.2f} | {pct(gaps, 0.99):.2f} | {len(gaps)} | "
            f"{res['peak_server']}{bound} | {res['peak_clients']} | "
            f"{sum(j['failed'] for j in jobs)} | {res['load']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", nargs="+", type=int, default=[8, 64])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n-trials", type=int, default=128)
    ap.add_argument("--routes", nargs="+", default=["direct", "pgbouncer"])
    ap.add_argument("--pool-size", type=int, default=16, help="PgBouncer default_pool_size")
    args = ap.parse_args()
    if "pgbouncer" in args.routes and (reason := pgbouncer_unavailable_reason()):
        sys.exit(f"cannot run the pgbouncer route: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="hptune-many-"))
    server = PostgresServer.create()
    server.start()
    bouncer = None
    lines = []
    try:
        if "pgbouncer" in args.routes:
            bouncer = PgBouncer(server, pool_size=args.pool_size).start()
        for route in args.routes:
            for n in args.workers:
                res = run_cluster(server, bouncer if route == "pgbouncer" else None, n,
                                  args.runs, args.n_trials, tmp)
                lines.append(row(route, n, res, args.pool_size if route == "pgbouncer" else None))
                if res["alive"] != n or res["watch_errors"]:
                    lines[-1] += (f" workers alive {res['alive']}, "
                                  f"watch errors {res['watch_errors']}")
    finally:
        if bouncer is not None:
            bouncer.stop()
        server.destroy()
    print(f"\n{platform.platform()}, {os.cpu_count()} CPUs, n_trials {args.n_trials} per job, "
          f"{args.runs} jobs per row\n")
    print("| route | workers | exact n_trials | trials/s median (min-max) | claim p50 s | "
          "claim p99 s | claims timed | peak server conns | peak client conns | FAIL trials "
          "| load avg at start |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
