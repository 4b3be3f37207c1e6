"""Reads at scale: a 10,000-trial job's trial pages and CLI download, and /metrics over
10 against 1,000 finished jobs, measured in one run.

    .venv/bin/python benchmarks/read_scale.py [--trials 10000] [--jobs 1000] [--out FILE.md]

1. Trial pages. Starts `hptune serve --workers 0` (SQLite, no training) on a fresh database
   file (HPTUNE_MAX_QUEUED_TRIALS_PER_OWNER raised to `--trials` from its 5,000), creates a
   key with `hptune keys create`, submits one job (api_keyed_reads.py's JOB, n_trials
   `--trials`) and writes `--trials` finished trials (COMPLETE or PRUNED, shaped as
   search.runner records them: report_scale.synthetic_trial) straight into its study
   `job-<id>` with report_scale.add_trials (Optuna's tables, 2,000 trials a transaction).
   Once the API's reaper has marked the job succeeded, it times GET
   /api/v1/jobs/{id}/trials with limit 100 and 1000 at the first page, a middle one
   (after=trials/2) and the last one (after=trials-limit), 15 times each on one kept-alive
   httpx client: the first (cold: the API process has no JSON of those trials yet), the
   median and the max, in ms. Then `hptune trials ID -o FILE.json` (the venv's `hptune`
   script in a subprocess, 3 runs, wall seconds; the file must hold every trial once),
   `hptune trials ID` (the table of the last 50), and `hptune --help` and `python -c pass`
   as the floor every CLI call pays. Targets: every page under 100 ms; the whole job through
   the CLI under 10 s.
2. /metrics. A second database holds `10` finished jobs (service.models.Job rows, status
   succeeded, inserted through the service's own session), each with a study of 20 finished
   trials (report_scale's writer); a server is started on it, GET /metrics is scraped once
   (cold) and then 30 times with an admin key (`hptune keys create --admin`); the server is
   stopped, jobs are added up to `--jobs`, and a fresh server is scraped the same way. The
   target is the ratio of the medians, `--jobs` over 10: at most 2.

Prints a markdown table and writes it with the command, date and machine to `--out`
(default benchmarks/RESULTS_read_scale.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from benchmarks.api_keyed_reads import JOB  # noqa: E402
from benchmarks.report_scale import add_trials, spec, synthetic_trial  # noqa: E402
from service.metrics import SETTLE_PER_SCRAPE  # noqa: E402
from service.spawn import cli_create_key, free_port, spawn_service, wait_healthy  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "RESULTS_read_scale.md"
HPTUNE = Path(sys.executable).parent / "hptune"
PAGE_REPEATS, CLI_RUNS, SCRAPES = 15, 3, 30
PAGE_TARGET_MS, CLI_TARGET_S, METRICS_TARGET = 100.0, 10.0, 2.0
TRIALS_PER_JOB = 20
SMALL_JOBS = 10


def finished_trials(n: int, seed: int = 0) -> list[FrozenTrial]:
    """Trials numbered 0..n-1, each COMPLETE or PRUNED (report_scale's mix, failures drawn
    again: a failed trial does not count towards a job's n_trials)."""
    rng, start, out = random.Random(seed), datetime(2025, 1, 1), []
    for i in range(n):
        t = synthetic_trial(i, rng, start)
        while t.state == TrialState.FAIL:
            t = synthetic_trial(i, rng, start)
        out.append(t)
    return out


def write_study_trials(storage: optuna.storages.RDBStorage, name: str, n: int,
                       seed: int = 0) -> None:
    """`n` finished trials into the existing study `name`, 2,000 a transaction."""
    study = optuna.load_study(study_name=name, storage=storage)
    trials = finished_trials(n, seed)
    for lo in range(0, n, 2000):
        add_trials(storage, study, trials[lo:lo + 2000])


def serve(tmp: Path, env: dict[str, str], tag: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log_path = tmp / f"serve-{tag}.log"
    with open(log_path, "w") as log:
        proc = spawn_service(["serve", "--port", str(port), "--workers", "0"], env, log,
                             cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url, proc, timeout_s=60):
        proc.kill()
        raise RuntimeError(f"hptune serve did not start:\n{log_path.read_text()}")
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def timed_gets(client: httpx.Client, path: str, n: int) -> list[float]:
    """Milliseconds of `n` GETs of `path`, in order (the first may be cold)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(path)
        out.append(1000 * (time.perf_counter() - t0))
        r.raise_for_status()
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {"cold": samples[0], "median": statistics.median(samples), "max": max(samples),
            "n": len(samples)}


def wall_runs(cmd: list[str], runs: int, env: dict[str, str] | None = None
              ) -> tuple[list[float], subprocess.CompletedProcess]:
    """Wall seconds of `runs` runs of `cmd` (each must exit 0) and the last run."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        times.append(time.perf_counter() - t0)
        if done.returncode:
            raise RuntimeError(f"{cmd} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return times, done


def big_job(url: str, key: str, db_url: str, n: int) -> int:
    """Submit the job and fill its study with `n` finished trials; wait until it succeeded."""
    h = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{url}/api/v1/jobs", json={**JOB, "name": "read-scale", "n_trials": n},
                   headers=h, timeout=60)
    r.raise_for_status()
    job_id = r.json()["id"]
    t0 = time.perf_counter()
    storage = optuna.storages.RDBStorage(db_url)
    write_study_trials(storage, f"job-{job_id}", n)
    storage.engine.dispose()
    print(f"{n} trials written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    deadline = time.monotonic() + 180  # the API's reaper settles the job within a round or two
    while httpx.get(f"{url}/api/v1/jobs/{job_id}", headers=h,
                    timeout=60).json()["status"] != "succeeded":
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not succeed")
        time.sleep(0.5)
    return job_id


def measure_pages(url: str, key: str, job_id: int, n: int) -> dict[str, dict[str, float]]:
    """{"limit=L&after=A": timings} for the first, a middle and the last page of each size."""
    out = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as client:
        for limit in (100, 1000):
            for after in (None, n // 2, max(n - limit, 0)):
                query = f"limit={limit}" + ("" if after is None else f"&after={after}")
                path = f"/api/v1/jobs/{job_id}/trials?{query}"
                t0 = time.perf_counter()
                first = client.get(path)
                cold = 1000 * (time.perf_counter() - t0)
                first.raise_for_status()
                out[query] = summary([cold, *timed_gets(client, path, PAGE_REPEATS - 1)])
                # A cold page presents at most MAX_PRESENTED_PER_PAGE trials, then `next`.
                out[query]["items"] = (len(first.json()["data"]),
                                       len(client.get(path).json()["data"]))
    return out


def measure_cli(url: str, key: str, job_id: int, n: int, tmp: Path) -> dict[str, Any]:
    """`hptune trials ID -o FILE.json` (checked: every trial once), the table, the floor."""
    env = {**os.environ, "HPTUNE_URL": url, "HPTUNE_API_KEY": key, "COLUMNS": "160"}
    target = tmp / "trials.json"
    download, _ = wall_runs([str(HPTUNE), "trials", str(job_id), "-o", str(target)],
                            CLI_RUNS, env)
    body = json.loads(target.read_text())
    numbers = sorted(t["number"] for t in body["trials"])
    if body["count"] != n or numbers != list(range(n)):
        raise RuntimeError(f"{target} holds {body['count']} trials, not 0..{n - 1} once each")
    table, done = wall_runs([str(HPTUNE), "trials", str(job_id)], CLI_RUNS, env)
    if f" {n - 1} " not in done.stdout or (n > 50 and "left out" not in done.stdout):
        raise RuntimeError(f"the table misses trial {n - 1}:\n{done.stdout[-2000:]}")
    help_, _ = wall_runs([str(HPTUNE), "--help"], CLI_RUNS)
    bare, _ = wall_runs([sys.executable, "-c", "pass"], CLI_RUNS)
    return {"download_s": download, "table_s": table, "help_s": help_, "python_s": bare,
            "bytes": target.stat().st_size}


def bench_trials(tmp: Path, n: int) -> dict[str, Any]:
    db_url = f"sqlite:///{tmp / 'trials.db'}"
    # One owner may have 5,000 trials queued by default; this job queues `n` at once.
    env = {**os.environ, "HPTUNE_DATABASE_URL": db_url,
           "HPTUNE_MAX_QUEUED_TRIALS_PER_OWNER": str(max(n, 5000))}
    key = cli_create_key(env, "bench", cwd=ROOT)
    proc, url = serve(tmp, env, "trials")
    try:
        job_id = big_job(url, key, db_url, n)
        pages = measure_pages(url, key, job_id, n)
        cli = measure_cli(url, key, job_id, n, tmp)
    finally:
        stop(proc)
    return {"pages": pages, "cli": cli}


def insert_jobs(db_url: str, n_jobs: int, seed: int) -> None:
    """`n_jobs` succeeded jobs owned by `bench`, each with a study of TRIALS_PER_JOB finished
    trials: Job rows through the service's session, studies through Optuna."""
    from service.db import Database
    from service.models import Job
    from service.settings import Settings
    from service.status import JobStatus

    db = Database(Settings(database_url=db_url), role="bench")
    storage = optuna.storages.RDBStorage(db_url)
    done = datetime.now(UTC) - timedelta(hours=1)
    job_spec = spec(TRIALS_PER_JOB).model_dump(mode="json")
    with db.session() as s:
        rows = [Job(owner="bench", name=f"done-{seed}-{i}", spec=job_spec, n_trials=TRIALS_PER_JOB,
                    status=JobStatus.SUCCEEDED, reserved=TRIALS_PER_JOB, claims=TRIALS_PER_JOB,
                    created_at=done, started_at=done, finished_at=done + timedelta(minutes=1))
                for i in range(n_jobs)]
        s.add_all(rows)
        s.flush()
        for row in rows:
            row.study_name = f"job-{row.id}"
        names = [row.study_name for row in rows]
    for i, name in enumerate(names):
        optuna.create_study(storage=storage, study_name=name, direction="maximize")
        write_study_trials(storage, name, TRIALS_PER_JOB, seed=seed * 100_000 + i)
    storage.engine.dispose()
    db.dispose()


def scrape(tmp: Path, env: dict[str, str], key: str, tag: str, n_jobs: int
           ) -> dict[str, float]:
    """A fresh server's first /metrics (cold), the scrapes that sum the ended jobs not summed
    yet (their time with the cold one's, in s), then SCRAPES more: their summary, in ms."""
    proc, url = serve(tmp, env, tag)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                          timeout=120) as client:
            cold = timed_gets(client, "/metrics", 1)[0]
            # Ended jobs not summed yet are summed SETTLE_PER_SCRAPE per scrape, once ever
            # (as jobs end one by one, each scrape sums the few that ended since the last).
            settling = timed_gets(client, "/metrics", math.ceil(n_jobs / SETTLE_PER_SCRAPE))
            out = summary(timed_gets(client, "/metrics", SCRAPES))
            out["cold"], out["settling_s"] = cold, (cold + sum(settling)) / 1000
            text = client.get("/metrics").text
    finally:
        stop(proc)
    line = next(ln for ln in text.splitlines() if ln.startswith('hptune_jobs{status="succeeded"'))
    out["jobs"] = float(line.split()[-1])
    return out


def bench_metrics(tmp: Path, n_jobs: int) -> dict[str, dict[str, float]]:
    db_url = f"sqlite:///{tmp / 'metrics.db'}"
    env = {**os.environ, "HPTUNE_DATABASE_URL": db_url}
    key = cli_create_key(env, "bench-admin", admin=True, cwd=ROOT)  # upgrades the schema too
    out = {}
    for total, seed in ((SMALL_JOBS, 1), (n_jobs, 2)):
        t0 = time.perf_counter()
        insert_jobs(db_url, total - sum(int(r["jobs"]) for r in out.values()), seed)
        print(f"{total} jobs ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        out[str(total)] = scrape(tmp, env, key, f"metrics-{total}", total)
        if out[str(total)]["jobs"] != total:
            raise RuntimeError(f"/metrics counts {out[str(total)]['jobs']} jobs, not {total}")
    return out


def table(res: dict[str, Any], n: int, n_jobs: int) -> tuple[str, list[str]]:
    """The markdown table and one target line per target."""
    lines = ["| read | first (cold) | median | max | runs |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, s in res["trials"]["pages"].items():
        lines.append(f"| `GET .../trials?{name}` ({n:,} trials; page of {s['items'][0]} cold, "
                     f"{s['items'][1]} warm), ms | "
                     f"{s['cold']:.1f} | {s['median']:.1f} | {s['max']:.1f} | {s['n']} |")
    cli = res["trials"]["cli"]
    for label, key in (("`hptune trials ID -o FILE.json`", "download_s"),
                       ("`hptune trials ID` (table of the last 50)", "table_s"),
                       ("floor: `hptune --help`", "help_s"),
                       ("floor: `python -c pass`", "python_s")):
        t = cli[key]
        lines.append(f"| {label}, s | {t[0]:.2f} | {statistics.median(t):.2f} | "
                     f"{max(t):.2f} | {len(t)} |")
    for total, s in res["metrics"].items():
        lines.append(f"| `GET /metrics`, {int(total):,} finished jobs, ms | {s['cold']:.1f} | "
                     f"{s['median']:.1f} | {s['max']:.1f} | {s['n']} |")
        lines.append(f"| summing the ended jobs not summed yet ({int(total):,} jobs), s, once | "
                     f"{s['settling_s']:.2f} | | | |")
    worst = max(max(s["cold"], s["max"]) for s in res["trials"]["pages"].values())
    cli_s = statistics.median(cli["download_s"])
    m = res["metrics"]
    ratio = m[str(n_jobs)]["median"] / m[str(SMALL_JOBS)]["median"]
    targets = [
        f"- [{'x' if worst < PAGE_TARGET_MS else ' '}] every trials page under "
        f"{PAGE_TARGET_MS:.0f} ms: the slowest of all {6 * PAGE_REPEATS} reads, cold ones "
        f"included, took {worst:.1f} ms",
        f"- [{'x' if cli_s < CLI_TARGET_S else ' '}] the whole {n:,}-trial job through the "
        f"CLI under {CLI_TARGET_S:.0f} s: median {cli_s:.2f} s ({cli['bytes'] / 2**20:.1f} MiB "
        f"of JSON; floor `hptune --help` {statistics.median(cli['help_s']):.2f} s)",
        f"- [{'x' if ratio <= METRICS_TARGET else ' '}] /metrics with {n_jobs:,} finished jobs "
        f"at most {METRICS_TARGET:.0f}x its time with {SMALL_JOBS}: median "
        f"{m[str(n_jobs)]['median']:.1f} ms / {m[str(SMALL_JOBS)]['median']:.1f} ms = "
        f"{ratio:.2f}x",
    ]
    return "\n".join(lines), targets


def results_page(args: argparse.Namespace, body: str, targets: list[str],
                 load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
               f"{platform.release()}, Python {platform.python_version()}, optuna "
               f"{optuna.__version__}, SQLite {__import__('sqlite3').sqlite_version}")
    before, after = (", ".join(f"{x:.2f}" for x in la) for la in load)
    return "\n".join([
        "# Reads at scale: a 10,000-trial job's pages and /metrics over 1,000 jobs "
        "(benchmarks/read_scale.py)", "", "```bash", f"{' '.join(['.venv/bin/python', *sys.argv])}",
        "```", "", f"Measured {datetime.now():%Y-%m-%d %H:%M} on {machine}; "
        f"os.getloadavg() before {before}, after {after}.", "",
        f"Trials: `--trials {args.trials}`; /metrics: {SMALL_JOBS} and `--jobs {args.jobs}` "
        f"succeeded jobs of {TRIALS_PER_JOB} trials each. How each figure is taken: the "
        "script's docstring. \"First (cold)\" is the first read of that URL by the server "
        "process (a trials page: its trials' JSON not yet cached; /metrics: a fresh server).",
        "", body, "", *targets, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000, help="trials in the big job")
    ap.add_argument("--jobs", type=int, default=1000, help="finished jobs, against 10")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the results page to write")
    args = ap.parse_args()
    if args.jobs <= SMALL_JOBS:
        ap.error(f"--jobs must be above {SMALL_JOBS}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hptune-read-scale-") as tmp_s:
        tmp = Path(tmp_s)
        res = {"trials": bench_trials(tmp, args.trials), "metrics": bench_metrics(tmp, args.jobs)}
    body, targets = table(res, args.trials, args.jobs)
    print(body)
    print("\n".join(targets))
    args.out.write_text(results_page(args, body, targets, (load_before, os.getloadavg())))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
