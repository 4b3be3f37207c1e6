"""Cost per trial as a job grows: the default sampler (windowed TPE) against plain TPE.

Trials run the way a worker runs them: one process holds the job's study open on the
service's storage (service.db.Database on a temporary SQLite file: ResilientRDBStorage under
Optuna's cache), builds each trial's sampler with the worker's own code (Worker._study: a
new sampler seeded by the claim number, the study's trial_store.BoundedHistory handed over)
and runs search.runner.run_trial: one-epoch trials on iris with the job spec's defaults
(sampler, pruner, warm start). Not included: the claim (job lock, slot counts), the
heartbeat thread and the job's refresh, which do not depend on the sampler.

Per configuration, the cost of a trial is its time from building its sampler to its tell,
as wall time and as this process's CPU time (which a shared machine's load inflates far less);
`sampler` is the wall time spent in the sampler's calls (reading its view included). The
figures are medians over trials 100-300 and over the last 200 trials of the same run, and
their ratio (target for the default: at most 2 at 10,000 trials).

- ``default``: build_sampler and build_pruner as the worker calls them (WindowedTPESampler
  with a BoundedHistory; BoundedSuccessiveHalvingPruner with a RungReader).
- ``plain``: Optuna's TPESampler with the same options, rebuilt per trial as the worker did
  before, and Optuna's SuccessiveHalvingPruner (the reference; --plain-trials, 2,000 by
  default).

Usage (repository root):
    python -m benchmarks.sampler_scale                    # 10,000 default + 2,000 plain
    python -m benchmarks.sampler_scale --trials 1500 --plain-trials 600 --out /tmp/s.md
"""

from __future__ import annotations

import argparse
import json
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
BLOCK = 1000  # trials per point of the cost curve
# Anything below this line in the results file is kept when the benchmark rewrites it.
NOTES_MARKER = "<!-- notes below this line are kept when the benchmark rewrites this file -->"


SAMPLER_CALLS = ("infer_relative_search_space", "sample_relative", "sample_independent")


def _time_sampler(sampler: optuna.samplers.BaseSampler, spent: list[float]) -> None:
    """Add the wall time of the sampler's sampling calls to spent[-1] (instance attributes
    shadow the class's methods; the class's own super() calls are not timed twice)."""
    for name in SAMPLER_CALLS:
        method = getattr(sampler, name)

        def timed(*args, _method=method, **kwargs):
            t = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[-1] += time.perf_counter() - t

        setattr(sampler, name, timed)


def run(config: str, n_trials: int, workdir: Path, save: Path | None = None) -> dict:
    """Run one job of `n_trials` trials; per-trial seconds (wall, CPU, sampler), read counts.
    Every 500 trials: a line of progress, and the figures so far into `save` (if given)."""
    db = Database(Settings(database_url=f"sqlite:///{workdir / f'{config}.db'}"),
                  role="worker")
    spec = JobSpec(name=f"scale-{config}", dataset="iris", n_trials=n_trials, max_epochs=1,
                   seed=0)
    name = f"job-{config}"
    create_study(spec, db.storage, name, {})
    data = bundled("iris", spec.seed)
    worker = Worker(db, name="bench")
    total, cpu, sampler, loaded, load = [], [], [], [], []
    for i in range(n_trials):
        started, cpu_started = time.perf_counter(), time.process_time()
        sampler.append(0.0)
        study = worker._study(Claim(job_id=1, spec=spec, study_name=name, claim_number=i))
        if config == "plain":  # the worker before: plain TPE (same options and seed) and
            # Optuna's successive halving, both reading the whole study
            study.sampler = optuna.samplers.TPESampler(
                seed=(spec.seed * 1_000_003 + i) % 2**32, multivariate=True,
                n_startup_trials=spec.sampler.n_startup_trials, constant_liar=True)
            study.pruner = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=spec.pruner.min_resource,
                reduction_factor=spec.pruner.reduction_factor)
        _time_sampler(study.sampler, sampler)
        run_trial(study, spec, data)
        total.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        load.append(os.getloadavg()[0])
        history = getattr(study.sampler, "history", None)
        loaded.append(getattr(history, "last_loaded", 0))
        if (i + 1) % 500 == 0:
            print(f"  {config}: {i + 1} trials, last {total[-1] * 1000:.1f} ms",
                  file=sys.stderr, flush=True)
            if save is not None:
                save.write_text(json.dumps({"config": config, "total": total, "cpu": cpu,
                                            "sampler": sampler, "loaded": loaded,
                                            "load": load}))
    db.dispose()
    return {"total": total, "cpu": cpu, "sampler": sampler, "loaded": loaded, "load": load}


def summarise(config: str, r: dict) -> dict:
    n = len(r["total"])
    early, late = slice(*EARLY), slice(n - LATE_N, n)

    def med(key: str, part: slice) -> float:
        return statistics.median(r[key][part]) * 1000

    out = {"config": config, "trials": n,
           "max_loaded_after_300": max(r["loaded"][300:], default=0),
           "load": (statistics.mean(r["load"][early]), statistics.mean(r["load"][late]))}
    for key in ("total", "cpu", "sampler"):
        out[key] = (med(key, early), med(key, late))
    return out


def markdown(rows: list[dict], curves: dict[str, list[float]], argv: list[str],
             started: str) -> str:
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
        f"{started}, {platform.platform()}, {os.cpu_count()} CPUs, shared with other work "
        "(the load average over each window is in the table).",
        "",
        "One process runs the job's trials as a worker does (see the benchmark's docstring): "
        "one-epoch iris trials, the job spec's defaults, SQLite through the service's storage. "
        f"Medians of the cost per trial in ms over trials {EARLY[0]}-{EARLY[1]} (early) and "
        f"over the last {LATE_N} trials of the same run (late): wall time, this process's CPU "
        "time, and the wall time inside the sampler's calls.",
        "",
        "| sampler | trials | wall early / late (ratio) | CPU early / late (ratio) "
        "| in the sampler early / late | load avg early / late | trials read per ask "
        "after 300 (max) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cells = [f"{a:.1f} / {b:.1f} ({b / a:.2f}x)" for a, b in (r["total"], r["cpu"])]
        sampler = "{:.1f} / {:.1f}".format(*r["sampler"])
        lines.append(f"| {r['config']} | {r['trials']} | {cells[0]} | {cells[1]} | {sampler} "
                     f"| {r['load'][0]:.1f} / {r['load'][1]:.1f} "
                     f"| {r['max_loaded_after_300'] or 'all (from the cache)'} |")
    lines += ["", f"CPU ms per trial, median of each block of {BLOCK} trials:", ""]
    for config, curve in curves.items():
        lines.append(f"- {config}: " + " ".join(f"{v:.0f}" for v in curve))
    default = next((r for r in rows if r["config"] == "default"), None)
    if default is not None:
        ratios = [b / a for a, b in (default["total"], default["cpu"])]
        mark = "x" if max(ratios) <= TARGET_RATIO and n >= 10_000 else " "
        lines += ["", f"- [{mark}] target: a {n:,}-trial job with the default sampler costs at "
                  f"most {TARGET_RATIO:g}x per trial at its last {LATE_N} trials what it costs "
                  f"at trials 100-300: {ratios[0]:.2f}x wall, {ratios[1]:.2f}x CPU"]
    return "\n".join(lines) + "\n"


def block_medians(values: list[float]) -> list[float]:
    return [statistics.median(values[i:i + BLOCK]) * 1000 for i in range(0, len(values), BLOCK)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10_000, help="trials of the default's job")
    p.add_argument("--plain-trials", type=int, default=2_000, help="0: skip plain TPE")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--save", type=Path, default=None, help="every trial's figures as JSON")
    args = p.parse_args(argv)
    if min(args.trials, args.plain_trials or 10**9) < EARLY[1] + LATE_N:
        p.error(f"need at least {EARLY[1] + LATE_N} trials per run")
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    rows, curves, raw = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for config, n in (("default", args.trials), ("plain", args.plain_trials)):
            if n:
                partial = args.save.with_suffix(f".{config}.json") if args.save else None
                raw[config] = run(config, n, Path(tmp), partial)
                rows.append(summarise(config, raw[config]))
                curves[config] = block_medians(raw[config]["cpu"])
                print(rows[-1], file=sys.stderr, flush=True)
                if args.save:
                    args.save.write_text(json.dumps(raw))
    text = markdown(rows, curves, argv, started)
    old = args.out.read_text() if args.out.exists() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else NOTES_MARKER + "\n"
    args.out.write_text(text + "\n" + notes)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
