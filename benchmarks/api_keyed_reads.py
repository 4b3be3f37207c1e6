"""What a keyed read costs the API, against /healthz in the same run, under Debian's `wrk`.

    .venv/bin/python benchmarks/api_keyed_reads.py [--rounds 3] [--seconds 10] [--trials 120]

Starts `hptune serve --workers 0` (SQLite, no training) on a fresh database file, creates a
key with `hptune keys create`, submits one job and writes `--trials` finished trials straight
into its study `job-<id>` through Optuna, on the storage the service uses (service.db), with
the parameters, learning curves and user attributes a trained trial records. Then, for each
round, runs `wrk -t2 -c50 -d10s --timeout 30s --latency` against each target in turn
(interleaved, so the machine's load falls alike on all of them):

  healthz   GET /healthz                               no key, no database
  job       GET /api/v1/jobs/{id}                      key, job row, trial counts
  jobs      GET /api/v1/jobs                           key, one page of jobs (one job)
  trials    GET /api/v1/jobs/{id}/trials?limit=100     key, a 100-trial page

and prints, per target, the median over rounds of requests per second, of wrk's p50 and p99
latency and of the ratio to /healthz's requests per second in the same round; and the
server process's CPU milliseconds per request (from /proc, over the wrk run) with /healthz's
over the target's, in the same round: on a busy machine requests per second follow the
neighbours' load, CPU time per request far less. Non-2xx answers fail the run. `--out FILE`
also writes every round's figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.spawn import cli_create_key, free_port, spawn_service, wait_healthy  # noqa: E402

# No centre-first trial: the job holds exactly the trials written below, so it has succeeded
# (no reaper round reads its study) by the time the reads are measured.
JOB = {"name": "keyed-reads", "dataset": "digits", "max_epochs": 20,
       "sampler": {"name": "random", "seed": 0}, "warm_start": {"center": False}}
TARGETS = {
    "healthz": "/healthz",
    "job": "/api/v1/jobs/{id}",
    "jobs": "/api/v1/jobs",
    "trials": "/api/v1/jobs/{id}/trials?limit=100",
}


def write_trials(db_url: str, study_name: str, n: int, max_epochs: int, seed: int = 0) -> None:
    """`n` finished trials (3 in 4 COMPLETE, the rest PRUNED) as a trained trial stores them."""
    import optuna

    from search import JobSpec
    from search.study import distributions
    from service.db import Database
    from service.settings import Settings

    db = Database(Settings(database_url=db_url), role="bench")
    rng = random.Random(seed)
    dists = distributions(JobSpec(**JOB))
    start = datetime.now(UTC) - timedelta(hours=1)
    trials = []
    for number in range(n):
        pruned = number % 4 == 3
        epochs = rng.randint(1, 5) if pruned else max_epochs
        curve = [round(0.5 + 0.45 * (1 - 0.8 ** e) + rng.uniform(-0.01, 0.01), 6)
                 for e in range(1, epochs + 1)]
        attrs = {"stop_reason": "pruned" if pruned else "max_epochs", "stopped_epoch": epochs,
                 "best_epoch": curve.index(max(curve)) + 1, "train_seconds": 0.8,
                 "epoch_seconds": 0.04, "best_value": max(curve), "examples_seen": epochs * 1000,
                 "epochs_trained": float(epochs), "test_accuracy": max(curve) - 0.01,
                 "test_loss": 0.3, "curves": {"train_loss": curve, "val_loss": curve,
                                              "val_accuracy": curve}}
        if pruned:
            attrs.update(pruner="SuccessiveHalvingPruner", rung=epochs, cutoff=0.9,
                         value_at_rung=curve[-1], peers=5)
        trials.append(optuna.trial.create_trial(
            params={k: d.to_external_repr(d.to_internal_repr(_sample(d, rng)))
                    for k, d in dists.items()},
            distributions=dists, value=None if pruned else max(curve),
            intermediate_values=dict(enumerate(curve, start=1)), user_attrs=attrs,
            state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE))
        trials[-1].datetime_start = start + timedelta(seconds=number)
        trials[-1].datetime_complete = start + timedelta(seconds=number + 0.8)
    optuna.load_study(study_name=study_name, storage=db.storage).add_trials(trials)
    db.dispose()


def _sample(dist: object, rng: random.Random) -> object:
    choices = getattr(dist, "choices", None)
    if choices is not None:
        return rng.choice(choices)
    return rng.uniform(dist.low, dist.high)  # type: ignore[attr-defined]


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, key: str | None, seconds: int, threads: int, connections: int,
            pid: int) -> dict[str, float]:
    """One wrk run: requests per second, p50/p99 in ms, the non-2xx/3xx answers, and the
    server's CPU milliseconds per request (robust to a busy machine, unlike requests/s)."""
    # wrk's own timeout is 2 s: a slower answer would count as a socket error, not a latency.
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
           "--latency", url]
    if key is not None:
        cmd[1:1] = ["-H", f"Authorization: Bearer {key}"]
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=seconds + 60).stdout
    cpu = cpu_seconds(pid) - cpu0
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {}
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        pct[q] = float(m.group(1)) * _UNITS_MS[m.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": pct["50"], "p99_ms": pct["99"],
            "cpu_ms": 1000 * cpu / requests if requests else float("nan"),
            "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1) if errors else ""}


def start(tmp: Path, trials: int) -> tuple[subprocess.Popen, str, str, int]:
    """The server on a fresh SQLite file, a key, and a job holding `trials` finished trials."""
    db_url = f"sqlite:///{tmp / 'reads.db'}"
    env = {**os.environ, "HPTUNE_DATABASE_URL": db_url}
    key = cli_create_key(env, "bench", cwd=ROOT)
    port = free_port()
    log = open(tmp / "serve.log", "w")  # noqa: SIM115 (open while the server runs)
    proc = spawn_service(["serve", "--port", str(port), "--workers", "0"], env, log, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url, proc, timeout_s=60):
        proc.kill()
        raise RuntimeError(f"hptune serve did not start:\n{(tmp / 'serve.log').read_text()}")
    h = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{url}/api/v1/jobs", json={**JOB, "n_trials": trials}, headers=h, timeout=60)
    r.raise_for_status()
    job_id = r.json()["id"]
    write_trials(db_url, f"job-{job_id}", trials, JOB["max_epochs"])
    deadline = time.monotonic() + 60  # the API's reaper settles the job within a round (5 s)
    while httpx.get(f"{url}/api/v1/jobs/{job_id}", headers=h,
                    timeout=60).json()["status"] != "succeeded":
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not succeed")
        time.sleep(0.2)
    page = httpx.get(f"{url}/api/v1/jobs/{job_id}/trials?limit=100", headers=h, timeout=60)
    page.raise_for_status()
    if len(page.json()["data"]) != min(trials, 100):
        raise RuntimeError(f"the trials page holds {len(page.json()['data'])} trials")
    return proc, url, key, job_id


def measure(url: str, key: str, job_id: int, pid: int, args: argparse.Namespace
            ) -> list[dict]:
    """Every round's figures: {target: wrk's figures plus the ratios to /healthz's requests/s
    and to its CPU time per request}."""
    rounds = []
    for i in range(args.rounds):
        row = {}
        for name, path in TARGETS.items():
            row[name] = run_wrk(url + path.format(id=job_id), None if name == "healthz" else key,
                                args.seconds, args.threads, args.connections, pid)
            if row[name]["non_2xx"]:
                raise RuntimeError(f"{name}: {row[name]['non_2xx']} answers were not 2xx")
        for name in TARGETS:
            row[name]["ratio"] = row[name]["rps"] / row["healthz"]["rps"]
            row[name]["cpu_ratio"] = row["healthz"]["cpu_ms"] / row[name]["cpu_ms"]
        rounds.append(row)
        print(f"round {i + 1}: " + ", ".join(
            f"{n} {r['rps']:.0f}/s ({r['ratio']:.2f}) {r['cpu_ms']:.2f} ms CPU"
            for n, r in row.items()), flush=True)
    return rounds


def table(rounds: list[dict]) -> str:
    lines = ["| target | req/s | p50 ms | p99 ms | req/s / /healthz's | server CPU ms/req "
             "| /healthz's CPU / this |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, path in TARGETS.items():
        med = {k: statistics.median(r[name][k] for r in rounds)
               for k in ("rps", "p50_ms", "p99_ms", "ratio", "cpu_ms", "cpu_ratio")}
        lines.append(f"| `GET {path}` | {med['rps']:.0f} | {med['p50_ms']:.1f} | "
                     f"{med['p99_ms']:.1f} | {med['ratio']:.2f} | {med['cpu_ms']:.2f} | "
                     f"{med['cpu_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--trials", type=int, default=120, help="finished trials in the job")
    ap.add_argument("--out", type=Path, help="write every round's figures here as JSON")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_s:
        proc, url, key, job_id = start(Path(tmp_s), args.trials)
        try:
            rounds = measure(url, key, job_id, proc.pid, args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    report = {"command": " ".join(sys.argv), "cpus": os.cpu_count(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "wrk": f"-t{args.threads} -c{args.connections} -d{args.seconds}s",
              "rounds": rounds}
    print(table(rounds))
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} "
          f"({os.cpu_count()} CPUs)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
