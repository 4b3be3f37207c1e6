"""Search efficiency through the real service: hptune's defaults against random search and
against what a plain Optuna user would configure.

Every run is one job submitted over REST to a real ``hptune serve --workers 2`` on a temporary
SQLite file and a free loopback port; its trials are read back from
``GET /api/v1/jobs/{id}/trials``. Jobs run one after another, so each has both workers.

Strategies (40 trials of at most 30 epochs, MLP [128, 64] relu adam, DESIGN.md's search space):

- ``R``: random search, no pruner, no early stopping (``patience: null``): the reference.
- ``O``: a plain Optuna user: TPE with Optuna's default 10 startup trials plus Optuna's
  ``HyperbandPruner()`` defaults (min_resource 1, reduction_factor 3, max_resource = the
  epochs), no patience. The spec cannot switch off hptune's multivariate TPE with a constant
  liar, so O uses them too (they are what hptune's ``tpe`` means).
- ``D``: hptune's defaults: a spec with only dataset, n_trials, max_epochs, metric, seed and
  model; the sampler, pruner and early stopping are whatever ``search/spec.py`` defaults to.
  ``--default-override JSON`` merges into D's spec (to measure candidate defaults);
  ``--candidate NAME=JSON`` adds more such variants as strategies of their own.

Seeds: seed ``s`` is the job's ``seed`` for every strategy (the dataset's train/validation
split and the weight initialisation), so strategies are compared on the same splits; the
sampler's random stream is independent per strategy (R samples with seed ``s + 1000``, O with
``s + 2000``; D, which may not name a sampler, with ``s`` itself).

Per run: best validation accuracy, test accuracy of the best trial, epochs trained (sum of the
trials' ``stopped_epoch``), wall time (job ``started_at`` to ``finished_at``), and epochs to
target: the epochs all trials had trained when the job first held a model at the target (see
``epochs_to_target``); the target is, per dataset, the median over seeds of R's best
validation accuracy minus 0.5 percentage points (``inf`` if never reached).

Usage:
    python benchmarks/search_efficiency.py                       # 2 datasets x 10 seeds x R O D
    python benchmarks/search_efficiency.py --quick               # smoke run, about a minute
    python benchmarks/search_efficiency.py --strategies D --load runs.json \\
        --default-override '{"pruner": {"name": "successive_halving"}}'
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from service.spawn import cli_create_key, free_port, spawn_service, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "RESULTS_search.md"
# Anything below this line in the results file is kept when the benchmark rewrites it.
NOTES_MARKER = "<!-- notes below this line are kept when the benchmark rewrites this file -->"

N_TRIALS = 40
MAX_EPOCHS = 30
MODEL = {"hidden_layers": [128, 64], "activation": "relu", "optimizer": "adam"}
SEARCH_SPACE = {
    "learning_rate": {"low": 1e-4, "high": 0.3, "log": True},
    "batch_size": {"choices": [16, 32, 64, 128, 256]},
    "dropout": {"low": 0.0, "high": 0.6, "log": False},
    "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
}
# The target is the median of R's best validation accuracy minus this much.
TARGET_MARGIN = 0.005
# Offsets that give R and O sampler streams of their own.
SAMPLER_SEED_OFFSET = {"R": 1000, "O": 2000}
JOB_TIMEOUT_S = 3600.0
POLL_S = 0.5


# --- specs ----------------------------------------------------------------------------------

def common_fields(dataset: str, seed: int, n_trials: int, max_epochs: int) -> dict[str, Any]:
    """The fields every strategy's spec shares: D is exactly these (plus an override)."""
    return {"dataset": dataset, "n_trials": n_trials, "max_epochs": max_epochs,
            "metric": "val_accuracy", "seed": seed, "model": copy.deepcopy(MODEL)}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, nested dicts key by key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def strategy_spec(strategy: str, dataset: str, seed: int, n_trials: int, max_epochs: int,
                  overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The job spec a strategy submits for one (dataset, seed)."""
    spec = common_fields(dataset, seed, n_trials, max_epochs)
    spec["name"] = f"bench-{dataset}-{strategy}-s{seed}"
    if strategy == "R":
        spec.update(search_space=copy.deepcopy(SEARCH_SPACE),
                    sampler={"name": "random", "seed": seed + SAMPLER_SEED_OFFSET["R"]},
                    pruner={"name": "none"},
                    early_stopping={"patience": None},
                    warm_start={"center": False})
    elif strategy == "O":
        spec.update(search_space=copy.deepcopy(SEARCH_SPACE),
                    sampler={"name": "tpe", "seed": seed + SAMPLER_SEED_OFFSET["O"],
                             "n_startup_trials": 10},
                    pruner={"name": "hyperband", "min_resource": 1, "reduction_factor": 3},
                    early_stopping={"patience": None},
                    warm_start={"center": False})
    else:  # D and candidates: the common fields, plus the candidate's override (if any)
        spec = deep_merge(spec, overrides.get(strategy, {}))
    return spec


def check_default_space() -> None:
    """D relies on the spec's default search space being DESIGN.md's; fail loudly otherwise."""
    from search.spec import JobSpec

    space = JobSpec().search_space.model_dump(mode="json")
    # Dimensions beyond the four core ones must be off (None, or no `extra` ones) by default.
    space = {k: v for k, v in space.items() if k in SEARCH_SPACE or v not in (None, {})}
    if space != SEARCH_SPACE:
        raise SystemExit(f"JobSpec's default search space {space} is not DESIGN.md's "
                         f"{SEARCH_SPACE}; D would search another space")


def effective_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """Sampler, pruner and early stopping as the service will read them (defaults filled)."""
    from search.spec import JobSpec

    s = JobSpec.model_validate(spec)
    pruner = {"name": s.pruner.name}
    if s.pruner.name in ("successive_halving", "hyperband"):
        pruner.update(min_resource=s.pruner.min_resource,
                      reduction_factor=s.pruner.reduction_factor)
    elif s.pruner.name in ("median", "percentile"):
        pruner.update(n_startup_trials=s.pruner.n_startup_trials,
                      n_warmup_steps=s.pruner.n_warmup_steps)
    if s.pruner.resource != "epochs":
        pruner.update(resource=s.pruner.resource, report_every=s.pruner.report_every)
    sampler = {"name": s.sampler.name}
    if s.sampler.name != "random":
        sampler["n_startup_trials"] = s.sampler.n_startup_trials
    w = s.warm_start
    first = ("center" if w.center and not w.configs and w.from_job is None
             else f"{len(w.configs)} configs" if w.configs else
             f"job {w.from_job}" if w.from_job else "sampler")
    return {"sampler": sampler, "pruner": pruner,
            "early_stopping": s.early_stopping.model_dump(mode="json"),
            "first_trial": first}


# --- the service ----------------------------------------------------------------------------

class Service:
    """A real `hptune serve --workers N` on a temporary SQLite file, with one API key."""

    def __init__(self, workdir: Path, workers: int = 2):
        self.workdir = workdir
        self.env = {**os.environ, "HPTUNE_DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}",
                    "HPTUNE_LOG_LEVEL": os.environ.get("HPTUNE_LOG_LEVEL", "WARNING")}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = spawn_service(["serve", "--port", str(self.port), "--workers", str(workers)],
                                  self.env, self._log, cwd=ROOT)
        try:
            self._wait_healthy()
            key = cli_create_key(self.env, "bench", cwd=ROOT)
        except BaseException:
            self.stop()
            raise
        self.http = httpx.Client(base_url=self.url, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"})

    def _wait_healthy(self, timeout_s: float = 90) -> None:
        if wait_healthy(self.url, self.proc, timeout_s):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"hptune serve exited:\n{self.log_tail()}")
        raise RuntimeError(f"hptune serve did not answer:\n{self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def run_job(self, spec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
        """Submit `spec`, wait for it to end; the job, its trials and the client-side seconds."""
        started = time.monotonic()
        r = self.http.post("/api/v1/jobs", json=spec)
        if r.status_code != 201:
            raise RuntimeError(f"submit answered {r.status_code}: {r.text}")
        job_id = r.json()["id"]
        deadline = started + JOB_TIMEOUT_S
        while True:
            job = self.http.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"hptune serve died:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} did not finish in {JOB_TIMEOUT_S} s")
            time.sleep(POLL_S)
        elapsed = time.monotonic() - started
        trials = self.http.get(f"/api/v1/jobs/{job_id}/trials",
                               params={"limit": 1000}).json()["data"]  # one page: <= 1000
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}\n"
                               f"{self.log_tail()}")
        return job, trials, elapsed

    def _children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def stop(self) -> None:
        """Stop the server and its workers.

        SIGINT, not SIGTERM: uvicorn re-raises the signal it caught once it has shut down, and
        a re-raised SIGTERM kills `hptune serve` before it stops its workers, leaving them
        orphaned; a re-raised SIGINT is a KeyboardInterrupt, which runs serve's cleanup. Any
        worker still alive afterwards is terminated by its pid.
        """
        workers = self._children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        ours = self.env["HPTUNE_DATABASE_URL"].encode()
        for pid in workers:
            try:  # only a process that is still one of this server's workers
                if ours in Path(f"/proc/{pid}/environ").read_bytes():
                    os.kill(pid, signal.SIGTERM)
            except (OSError, ProcessLookupError):
                pass
        self._log.close()


# --- measurements ---------------------------------------------------------------------------

def _time(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The COMPLETE trial with the highest value (the earliest finished one on a tie)."""
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    if not done:
        return None
    done.sort(key=lambda t: (-t["value"], t["datetime_complete"] or "", t["number"]))
    return done[0]


def epochs_of(trial: dict[str, Any]) -> float:
    """Epochs a trial trained: fractional when a pruner counting examples stopped it
    mid-epoch; 0 for one that never reported an epoch."""
    exact = (trial.get("details") or {}).get("epochs_trained", trial.get("epochs_trained"))
    return float(exact) if exact is not None else float(trial.get("stopped_epoch") or 0)


def _first_reach(trial: dict[str, Any], target: float) -> float | None:
    """The fraction of its run a COMPLETE trial had trained when its metric first reached
    `target` (its intermediate values, in epochs or examples), or None if it never did."""
    if trial["state"] != "COMPLETE" or trial["value"] is None or trial["value"] < target:
        return None
    steps = sorted((float(k), v) for k, v in trial["intermediate_values"].items())
    last = steps[-1][0] if steps else 0.0
    for step, value in steps:
        if value is not None and value >= target:
            return step / last if last else 1.0
    return 1.0


def epochs_to_target(trials: list[dict[str, Any]], target: float | None) -> float | None:
    """Epochs trained, over all trials, until the job first held a model at the target.

    A COMPLETE trial reaches the target at the first report of a metric >= target (its best
    weights are kept, so the job's best is at least that good from then on); that moment is
    placed in time by spreading the trial's epochs evenly over its run (datetime_start to
    datetime_complete). The epochs every trial (pruned ones included) had trained by the
    earliest such moment, pro rata for trials running then, are summed: with parallel
    workers this counts what the other worker spent meanwhile. ``inf`` if no trial reaches
    the target, None without a target.
    """
    if target is None:
        return None
    runs = []
    for t in trials:
        if t["datetime_start"] and t["datetime_complete"]:
            t0 = _time(t["datetime_start"]).timestamp()
            t1 = _time(t["datetime_complete"]).timestamp()
            runs.append((t, t0, max(t1, t0)))
    reach = [t0 + f * (t1 - t0) for t, t0, t1 in runs
             if (f := _first_reach(t, target)) is not None]
    if not reach:
        return math.inf
    when = min(reach)
    spent = 0.0
    for t, t0, t1 in runs:
        if when >= t1:
            spent += epochs_of(t)
        elif when > t0:
            spent += epochs_of(t) * (when - t0) / (t1 - t0)
    return round(spent, 2)


def measure(job: dict[str, Any], trials: list[dict[str, Any]], client_s: float
            ) -> dict[str, Any]:
    """One run's numbers that do not depend on the target."""
    best = best_trial(trials)
    started, finished = _time(job.get("started_at")), _time(job.get("finished_at"))
    wall = (finished - started).total_seconds() if started and finished else client_s
    reasons: dict[str, int] = {}
    for t in trials:
        reasons[t["stop_reason"] or "?"] = reasons.get(t["stop_reason"] or "?", 0) + 1
    return {
        "job_id": job["id"],
        "best_val": best["value"] if best else None,
        "test_acc": (best["details"].get("test_accuracy") if best else None),
        "best_trial": best["number"] if best else None,
        "total_epochs": round(sum(epochs_of(t) for t in trials), 2),
        "wall_s": round(wall, 2),
        "client_s": round(client_s, 2),
        "started_at": job.get("started_at"),
        "finished_at": job.get("finished_at"),
        "stop_reasons": reasons,
        # Kept so that the epochs to a target can be recomputed for any target later.
        "trials": [{"number": t["number"], "state": t["state"], "value": t["value"],
                    "stopped_epoch": t["stopped_epoch"],
                    "epochs_trained": t["details"].get("epochs_trained"),
                    "intermediate_values": t["intermediate_values"],
                    "datetime_start": t["datetime_start"],
                    "datetime_complete": t["datetime_complete"]} for t in trials],
    }


def targets_from(runs: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per dataset: the median over seeds of R's best validation accuracy minus the margin."""
    by_ds: dict[str, list[float]] = {}
    for r in runs:
        if r["strategy"] == "R" and r["best_val"] is not None:
            by_ds.setdefault(r["dataset"], []).append(r["best_val"])
    return {ds: statistics.median(v) - TARGET_MARGIN for ds, v in by_ds.items()}


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(sorted(vals)) if vals else None


def summarise(runs: list[dict[str, Any]], targets: dict[str, float]
              ) -> list[dict[str, Any]]:
    """Medians over seeds per (dataset, strategy), in the order they first appear."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        rows.setdefault((r["dataset"], r["strategy"]), []).append(r)
    out = []
    for (ds, strat), rs in rows.items():
        target = targets.get(ds)
        ett = [epochs_to_target(r["trials"], target) for r in rs]
        out.append({
            "dataset": ds, "strategy": strat, "n": len(rs),
            "seeds": sorted(r["seed"] for r in rs),
            "best_val": median([r["best_val"] for r in rs]),
            "test_acc": median([r["test_acc"] for r in rs]),
            "total_epochs": median([r["total_epochs"] for r in rs]),
            "epochs_to_target": median(ett),
            "reached": sum(1 for e in ett if e is not None and math.isfinite(e)),
            "wall_s": median([r["wall_s"] for r in rs]),
            "settings": rs[0]["settings"],
        })
    return out


def check_targets(summary: list[dict[str, Any]], d: str = "D") -> list[tuple[str, bool, str]]:
    """The issue's three targets for strategy `d`, per dataset: (name, met, numbers)."""
    by = {(s["dataset"], s["strategy"]): s for s in summary}
    checks = []
    for ds in dict.fromkeys(s["dataset"] for s in summary):
        r, o, x = by.get((ds, "R")), by.get((ds, "O")), by.get((ds, d))
        if x is None:
            continue
        if r is not None and r["best_val"] is not None and x["best_val"] is not None:
            gap = (r["best_val"] - x["best_val"]) * 100
            checks.append((f"{ds}: {d} best val acc within 0.5 pp of R's", gap <= 0.5 + 1e-9,
                           f"{x['best_val']:.4f} vs {r['best_val']:.4f} ({gap:+.2f} pp)"))
            ratio = x["total_epochs"] / r["total_epochs"]
            checks.append((f"{ds}: {d} total epochs <= 1/5 of R's", ratio <= 0.2 + 1e-9,
                           f"{x['total_epochs']:g} vs {r['total_epochs']:g} "
                           f"({ratio:.3f} of R)"))
        if o is not None and o["epochs_to_target"] is not None:
            a, b = x["epochs_to_target"], o["epochs_to_target"]
            ok = a is not None and (a <= b / 2 if math.isfinite(b) else math.isfinite(a))
            ratio = a / b if a is not None and math.isfinite(b) and b else math.nan
            checks.append((f"{ds}: {d} epochs to target <= 1/2 of O's", ok,
                           f"{_num(a)} vs {_num(b)} ({ratio:.3f} of O)"))
    return checks


# --- output ---------------------------------------------------------------------------------

def _num(v: float | None, fmt: str = "g") -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    return format(v, fmt)


def table(summary: list[dict[str, Any]]) -> str:
    head = ("| dataset | strategy | seeds | best val acc | test acc | total epochs | "
            "epochs to target (reached) | wall s |")
    lines = [head, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        lines.append(
            f"| {s['dataset']} | {s['strategy']} | {s['n']} | {_num(s['best_val'], '.4f')} | "
            f"{_num(s['test_acc'], '.4f')} | {_num(s['total_epochs'], '.0f')} | "
            f"{_num(s['epochs_to_target'], '.0f')} ({s['reached']}/{s['n']}) | "
            f"{_num(s['wall_s'], '.1f')} |")
    return "\n".join(lines)


def settings_lines(summary: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, dict[str, Any]] = {}
    for s in summary:
        seen.setdefault(s["strategy"], s["settings"])
    return [f"- `{k}`: `{json.dumps(v, sort_keys=True)}`" for k, v in seen.items()]


def runs_table(runs: list[dict[str, Any]], targets: dict[str, float]) -> str:
    lines = ["| dataset | strategy | seed | job | best val | test acc | epochs | "
             "epochs to target | wall s | stop reasons |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in runs:
        e = epochs_to_target(r["trials"], targets.get(r["dataset"]))
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["stop_reasons"].items()))
        lines.append(f"| {r['dataset']} | {r['strategy']} | {r['seed']} | {r['job_id']} | "
                     f"{_num(r['best_val'], '.4f')} | {_num(r['test_acc'], '.4f')} | "
                     f"{r['total_epochs']} | {_num(e, '.0f')} | {r['wall_s']:.1f} | "
                     f"{reasons} |")
    return "\n".join(lines)


def report(runs: list[dict[str, Any]], command: str, n_trials: int, max_epochs: int) -> str:
    targets = targets_from(runs)
    summary = summarise(runs, targets)
    parts = [
        "# Search efficiency: hptune's defaults vs random search vs plain Optuna",
        "",
        "Produced by:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Each run is one job through the real service (`hptune serve --workers 2`, SQLite): "
        f"{n_trials} trials of at most {max_epochs} epochs, MLP [128, 64] relu adam, DESIGN.md's "
        "search space. Medians over seeds. `total epochs` sums the epochs the trials trained "
        "(fractional where a pruner counting examples stopped one mid-epoch); `epochs to "
        "target` sums the epochs all trials had trained when the job first held a model at "
        "the target: the first report of a COMPLETE trial at or above it, placed in time by "
        "spreading that trial's epochs evenly over its run, with trials running at that "
        "moment counted pro rata (target: median of R's best val acc - 0.5 pp; `inf` if "
        "never; in brackets how many seeds reached it). `wall s` is the job's "
        "`started_at` to `finished_at` on this machine, which other work shared.",
        "",
        "Targets: " + ", ".join(f"{ds} {t:.4f}" for ds, t in targets.items()),
        "",
        table(summary),
        "",
        "Settings (sampler, pruner, early stopping as the service reads them):",
        "",
        *settings_lines(summary),
        "",
    ]
    for strat in dict.fromkeys(s["strategy"] for s in summary):
        if strat in ("R", "O"):
            continue
        checks = check_targets(summary, strat)
        if not checks:
            continue
        title = "hptune's defaults" if strat == "D" else "a candidate for the defaults"
        met = sum(ok for _, ok, _ in checks)
        parts += [f"Targets of issue 7 for {strat} ({title}): {met}/{len(checks)} met", ""]
        parts += [f"- [{'x' if ok else ' '}] {name}: {nums}" for name, ok, nums in checks]
        parts.append("")
    audited = [r for r in runs if r.get("audit")]
    if audited:
        parts += ["Pruning audit (a share of the would-be-pruned trials trained on to the end "
                  "in secret; a false prune is one that would have beaten the best kept "
                  "trial):", "",
                  "| dataset | strategy | seed | audited | false prunes (rungs) | "
                  "beat the median kept | regret (pp) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in audited:
            a = r["audit"]
            regret = a["regret"] * 100 if a["regret"] is not None else None
            parts.append(f"| {r['dataset']} | {r['strategy']} | {r['seed']} | "
                         f"{a['n_audited']} | {a['false_prunes']} {a['false_prune_rungs']} | "
                         f"{a['beat_median_kept']} | {_num(regret, '.2f')} |")
        parts.append("")
    parts += ["<details><summary>Every run</summary>", "", runs_table(runs, targets), "",
              "</details>", ""]
    return "\n".join(parts)


def write_report(path: Path, text: str) -> None:
    """Write `text`, keeping whatever follows the notes marker in the existing file."""
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1]
    path.write_text(text + "\n" + NOTES_MARKER + notes)


# --- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=None,
                   help="bundled datasets (default: digits mnist1d; --quick: digits)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per dataset and strategy (default 10; --quick: 1)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--strategies", nargs="+", default=["R", "O", "D"],
                   help="any of R O D, in the order to run them (default: R O D)")
    p.add_argument("--default-override", default=None, metavar="JSON",
                   help="JSON merged into D's spec, e.g. a candidate pruner")
    p.add_argument("--candidate", action="append", default=[], metavar="NAME=JSON",
                   help="another D-like strategy: the common fields merged with JSON")
    p.add_argument("--n-trials", type=int, default=None, help=f"default {N_TRIALS}")
    p.add_argument("--max-epochs", type=int, default=None, help=f"default {MAX_EPOCHS}")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, digits, 6 trials of at most 5 epochs")
    p.add_argument("--workers", type=int, default=2, help="workers of the service (default 2)")
    p.add_argument("--load", type=Path, action="append", default=[],
                   help="runs saved by --save earlier (say R's), used for targets and the table")
    p.add_argument("--save", type=Path, default=None, help="write every run as JSON here")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results markdown (default {DEFAULT_OUT.relative_to(ROOT)}; "
                        "--quick: none)")
    args = p.parse_args(argv)
    args.datasets = args.datasets or (["digits"] if args.quick else ["digits", "mnist1d"])
    args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 10)
    args.n_trials = args.n_trials or (6 if args.quick else N_TRIALS)
    args.max_epochs = args.max_epochs or (5 if args.quick else MAX_EPOCHS)
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    args.overrides = {}
    if args.default_override:
        args.overrides["D"] = json.loads(args.default_override)
    for c in args.candidate:
        name, _, js = c.partition("=")
        if not name or not js or name in ("R", "O"):
            p.error(f"--candidate wants NAME=JSON with a new NAME, not {c!r}")
        args.overrides[name] = json.loads(js)
        if name not in args.strategies:
            args.strategies.append(name)
    for s in args.strategies:
        if s not in ("R", "O", "D") and s not in args.overrides:
            p.error(f"unknown strategy {s!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server and its workers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    check_default_space()
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [str(Path(sys.argv[0]).resolve().relative_to(ROOT))
                                    if Path(sys.argv[0]).resolve().is_relative_to(ROOT)
                                    else sys.argv[0], *sys.argv[1:]])
    loaded: list[dict[str, Any]] = []
    for path in args.load:
        loaded += json.loads(path.read_text())["runs"]
    runs: list[dict[str, Any]] = []
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with tempfile.TemporaryDirectory(prefix="hptune-bench-") as tmp:
        service = Service(Path(tmp), workers=args.workers)
        try:
            for dataset in args.datasets:
                for strategy in args.strategies:
                    for seed in seeds:
                        spec = strategy_spec(strategy, dataset, seed, args.n_trials,
                                             args.max_epochs, args.overrides)
                        job, trials, client_s = service.run_job(spec)
                        run = {"dataset": dataset, "strategy": strategy, "seed": seed,
                               "spec": spec, "settings": effective_settings(spec),
                               **measure(job, trials, client_s)}
                        if spec.get("audit_fraction"):
                            report_ = service.http.get(
                                f"/api/v1/jobs/{job['id']}/report").json()
                            audit = report_.get("pruning_audit") or {}
                            run["audit"] = {k: audit.get(k) for k in (
                                "n_audited", "false_prunes", "false_prune_rungs",
                                "beat_median_kept", "regret", "audit_epochs")}
                            print(f"  pruning audit: {run['audit']}", flush=True)
                        runs.append(run)
                        print(f"{dataset:8s} {strategy:6s} seed {seed}: best val "
                              f"{_num(run['best_val'], '.4f')} test "
                              f"{_num(run['test_acc'], '.4f')} epochs {run['total_epochs']:7.1f} "
                              f"wall {run['wall_s']:6.1f} s  {run['stop_reasons']}",
                              flush=True)
                        if args.save:  # after every run, so a long benchmark can be resumed
                            args.save.write_text(json.dumps({"command": command, "runs": runs}))
        finally:
            service.stop()
    fresh = {(r["dataset"], r["strategy"], r["seed"]) for r in runs}
    every = [r for r in loaded if (r["dataset"], r["strategy"], r["seed"]) not in fresh] + runs
    text = report(every, command, args.n_trials, args.max_epochs)
    print()
    print(text.split("<details>")[0])
    if args.out:
        write_report(args.out, text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
