"""Cost per trial as a job grows: the default sampler (windowed TPE) against plain TPE.

Trials run the way a worker runs them: one process holds the job's study open on the
service's storage (service.db.Database on a temporary SQLite file: ResilientRDBStorage under
Optuna's cache), builds each trial's sampler with the worker's own code (Worker._study: a
new sampler seeded by the claim number, the study's trial_store.BoundedHistory handed over)
and runs search.runner.run_trial: one-epoch trials on iris with the job spec's defaults
(sampler, pruner, warm start). Not included: the claim (job lock, slot counts), the
heartbeat thread and the job's refresh, which do not depend on the sampler.

Per configuration, the cost of a trial is its wall time from building its sampler to its
tell; the figures are medians over trials 100-300 and over the last 200 trials of the same
run, and their ratio (target for the default: at most 2 at 10,000 trials). `ask` is the part
up to the trial's creation with its parameters sampled (study.ask).

- ``default``: build_sampler as the worker calls it (WindowedTPESampler, BoundedHistory).
- ``plain``: Optuna's TPESampler with the same options, rebuilt per trial as the worker did
  before (the reference; --plain-trials, 2,000 by default).

Usage (repository root):
    python -m benchmarks.sampler_scale                    # 10,000 default + 2,000 plain
    python -m benchmarks.sampler_scale --trials 1500 --plain-trials 600 --out /tmp/s.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import optuna

from search import JobSpec, create_study, run_trial
from search.datasets import bundled
from service.db import Database
from service.scheduler import Claim
from service.settings import Settings
from service.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "RESULTS_sampler.md"
EARLY = (100, 300)  # trials whose median cost is the baseline
LATE_N = 200  # the last this many trials of the run
TARGET_RATIO = 2.0


def run(config: str, n_trials: int, workdir: Path, progress: bool = True) -> dict:
    """Run one job of `n_trials` trials; per-trial seconds (total, ask) and read counts."""
    db = Database(Settings(database_url=f"sqlite:///{workdir / f'{config}.db'}"),
                  role="worker")
    spec = JobSpec(name=f"scale-{config}", dataset="iris", n_trials=n_trials, max_epochs=1,
                   seed=0)
    name = f"job-{config}"
    create_study(spec, db.storage, name, {})
    data = bundled("iris", spec.seed)
    worker = Worker(db, name="bench")
    total, ask, loaded = [], [], []
    for i in range(n_trials):
        started = time.perf_counter()
        study = worker._study(Claim(job_id=1, spec=spec, study_name=name, claim_number=i))
        if config == "plain":  # build_sampler's TPE before the window: same options and seed
            study.sampler = optuna.samplers.TPESampler(
                seed=(spec.seed * 1_000_003 + i) % 2**32, multivariate=True,
                n_startup_trials=spec.sampler.n_startup_trials, constant_liar=True)
        run_trial(study, spec, data, on_started=lambda _t: ask.append(time.perf_counter()))
        total.append(time.perf_counter() - started)
        ask[-1] -= started
        history = getattr(study.sampler, "history", None)
        loaded.append(getattr(history, "last_loaded", 0))
        if progress and (i + 1) % 500 == 0:
            print(f"  {config}: {i + 1} trials, last {total[-1] * 1000:.1f} ms",
                  file=sys.stderr, flush=True)
    db.dispose()
    return {"total": total, "ask": ask, "loaded": loaded}


def summarise(config: str, r: dict) -> dict:
    n = len(r["total"])
    early, late = slice(*EARLY), slice(n - LATE_N, n)

    def med(key: str, part: slice) -> float:
        return statistics.median(r[key][part]) * 1000

    return {"config": config, "trials": n,
            "early": med("total", early), "late": med("total", late),
            "ask_early": med("ask", early), "ask_late": med("ask", late),
            "max_loaded_after_300": max(r["loaded"][300:], default=0)}


def markdown(rows: list[dict], argv: list[str], started: str, load: tuple) -> str:
    n = rows[0]["trials"]
    lines = [
        "# Sampler cost per trial as a job grows",
        "",
        "Produced by (repository root):",
        "",
        "```bash",
        "python -m benchmarks.sampler_scale " + " ".join(argv),
        "```",
        "",
        f"{started}, {platform.platform()}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.2f} before and {load[1]:.2f} after (the machine was shared).",
        "",
        "One process runs the job's trials as a worker does (see the benchmark's docstring): "
        "one-epoch iris trials, the job spec's defaults, SQLite through the service's storage. "
        f"Medians of the cost per trial (ms) over trials {EARLY[0]}-{EARLY[1]} and over the "
        f"last {LATE_N} trials of the same run.",
        "",
        "| sampler | trials | ms/trial 100-300 | ms/trial last 200 | ratio | ask ms 100-300 "
        "| ask ms last 200 | trials read per ask (max, after 300) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        late = f"{r['trials'] - LATE_N}-{r['trials']}"
        lines.append(
            f"| {r['config']} | {r['trials']} | {r['early']:.1f} | {r['late']:.1f} ({late}) "
            f"| {r['late'] / r['early']:.2f} | {r['ask_early']:.1f} | {r['ask_late']:.1f} "
            f"| {r['max_loaded_after_300'] or 'all (cache)'} |")
    default = next((r for r in rows if r["config"] == "default"), None)
    if default is not None:
        ratio = default["late"] / default["early"]
        mark = "x" if ratio <= TARGET_RATIO and n >= 10_000 else " "
        lines += ["", f"- [{mark}] target: a {n:,}-trial job with the default sampler costs at "
                  f"most {TARGET_RATIO:g}x per trial at its last {LATE_N} trials what it costs "
                  f"at trials 100-300: {ratio:.2f}x"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10_000, help="trials of the default's job")
    p.add_argument("--plain-trials", type=int, default=2_000, help="0: skip plain TPE")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if min(args.trials, args.plain_trials or 10**9) < EARLY[1] + LATE_N:
        p.error(f"need at least {EARLY[1] + LATE_N} trials per run")
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config, n in (("default", args.trials), ("plain", args.plain_trials)):
            if n:
                rows.append(summarise(config, run(config, n, Path(tmp))))
                print(rows[-1], file=sys.stderr, flush=True)
    text = markdown(rows, argv, started, (load_before, os.getloadavg()[0]))
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
