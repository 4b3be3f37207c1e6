"""A reaper round's cost: over queued jobs, and over a running job as its finished trials grow.

    .venv/bin/python benchmarks/reap_round.py [--queued 20] [--finished 10000] [--out FILE.md]

Every worker and the API process run a reaper round every HPTUNE_REAP_INTERVAL seconds
(service/reaper.py), so its cost is paid by every process of the deployment, whatever they
are doing. On a fresh SQLite file, in process (no server, no training):

1. `--queued` jobs are created (service.jobs.create_job, each with its study) and nothing
   runs: a round over them, in CPU milliseconds (time.process_time), the median of 15.
2. One more job gets a RUNNING trial (claimed and asked as a worker does, with a heartbeat)
   and 10 finished trials (report_scale's synthetic trials, written into its study at
   once); then `--finished`. A round over all the jobs is timed the same way at each size.

The target is the ratio of the last two medians, at most 2: a round reads a job's
RUNNING and FAIL trials, never its finished ones. The first figure is for reference: what
a queued job costs a round (a count query, the job row and its status settling).

Prints a markdown table and writes it with the command, date and machine to `--out`
(default benchmarks/RESULTS_reap_round.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from benchmarks.report_scale import add_trials, synthetic_trial  # noqa: E402
from search import JobSpec  # noqa: E402
from service import jobs, reaper, scheduler, trial_store  # noqa: E402
from service.migrate import upgrade  # noqa: E402
from service.settings import Settings  # noqa: E402

RUNS = 15
RATIO_TARGET = 2.0  # the scale target of the other benchmarks (RESULTS_sampler.md)


def _round_ms(db) -> float:
    """Median CPU milliseconds of a reaper round."""
    times = []
    for _ in range(RUNS):
        started = time.process_time()
        reaper.reap(db)
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times)


def _running_job(db) -> tuple[optuna.Study, optuna.Trial]:
    spec = JobSpec.model_validate({"name": "running", "n_trials": 10_000})
    job = jobs.create_job(db, "alice", spec)
    study = optuna.load_study(study_name=job.study_name, storage=db.storage)
    with db.job_lock(job.id):
        assert scheduler.claim_slot(db, job.id) is not None
        trial = study.ask()
    db.storage.record_heartbeat(trial_store.trial_id(trial))
    return study, trial


def _add_finished(db, study: optuna.Study, n: int) -> None:
    rng, start = random.Random(n), datetime(2025, 1, 1)
    first = len(study.get_trials(deepcopy=False))
    finished = [t for t in (synthetic_trial(i, rng, start) for i in range(2 * n + 20))
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)][:n]
    for number, t in enumerate(finished, start=first):
        t.number = number
    for lo in range(0, n, 2000):
        add_trials(db.storage, study, finished[lo:lo + 2000])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=20)
    parser.add_argument("--finished", type=int, default=10_000)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_reap_round.md")))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        # A grace period no round reaches: the running trial stays live throughout.
        settings = Settings(database_url=f"sqlite:///{tmp}/reap.db", grace_period=3600,
                            max_active_jobs_per_owner=args.queued + 1,
                            max_queued_trials_per_owner=10**7)
        db = scheduler.open_database(settings)
        upgrade(db)
        for i in range(args.queued):
            jobs.create_job(db, "alice", JobSpec.model_validate({"name": f"q{i}",
                                                                 "n_trials": 10}))
        queued_ms = _round_ms(db)
        study, trial = _running_job(db)
        _add_finished(db, study, 10)
        small_ms = _round_ms(db)
        _add_finished(db, study, args.finished - 10)
        large_ms = _round_ms(db)
        assert study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0].number == \
            trial.number, "the running trial was reaped: the rounds measured something else"
        db.dispose()
    ratio = large_ms / small_ms
    rows = [
        (f"{args.queued} queued jobs, nothing running", queued_ms),
        ("+ a running job with 10 finished trials", small_ms),
        (f"+ a running job with {args.finished:,} finished trials", large_ms),
    ]
    table = ["| round over | CPU ms, median of 15 |", "| --- | ---: |"]
    table += [f"| {what} | {ms:.1f} |" for what, ms in rows]
    verdict = (f"- [{'x' if ratio <= RATIO_TARGET else ' '}] a round with {args.finished:,} "
               f"finished trials at most {RATIO_TARGET}x one with 10: "
               f"{large_ms:.1f} ms / {small_ms:.1f} ms = {ratio:.2f}x")
    print("\n".join(table) + "\n\n" + verdict)
    machine = (f"Measured {datetime.now():%Y-%m-%d %H:%M} on {platform.machine()}, "
               f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python "
               f"{platform.python_version()}, optuna {optuna.__version__}, SQLite "
               f"{sqlite3.sqlite_version}; os.getloadavg() before "
               f"{', '.join(f'{x:.2f}' for x in load_before)}, after "
               f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    Path(args.out).write_text(
        "# A reaper round's cost (benchmarks/reap_round.py)\n\n```bash\n"
        f".venv/bin/python benchmarks/reap_round.py {' '.join(sys.argv[1:])}".rstrip()
        + "\n```\n\n" + machine + "\n\n" + "\n".join(table) + "\n\n" + verdict + "\n")
    return 0 if ratio <= RATIO_TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
