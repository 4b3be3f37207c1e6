"""The report and its pictures as a job grows: 1,000 against 10,000 finished trials.

A study is written straight into a SQLite file (Optuna's own tables, one transaction: adding
10,000 trials one by one through Optuna takes minutes), its trials shaped as
search.runner.run_trial records them: a mix of outcomes (most pruned early, as Hyperband
prunes), an intermediate value and a `curves` entry per epoch, the stop's details. Each step
is then timed on a study loaded afresh, as a request loads it (so each includes reading the
trials), and run once more under tracemalloc for its peak of Python memory:

- ``load``: the study's trials read (Optuna's get_trials), the floor under everything else;
- ``report_json``: search.report.build_report, then the JSON body as the API encodes it;
- ``report_html``: build_report and search.report_html.render_html (its four pictures);
- ``report_csv``: search.report_csv.render_csv;
- ``plot_<name>``: search.plots.render_png of each picture, 1000 x 600.

The ratio of the 10,000-trial figure to the 1,000-trial one, in the same run, is the
target's measure (a report that grew with the trials drawn would show about 10).

Usage (repository root):
    python -m benchmarks.report_scale                 # 1,000 and 10,000 trials
    python -m benchmarks.report_scale --sizes 500 5000 --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from search.plots import PLOTS, render_png
from search.report import build_report
from search.report_csv import render_csv
from search.report_html import render_html
from search.spec import JobSpec
from service.db import Database
from service.reports import job_trials
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "RESULTS_report_scale.md"
MAX_EPOCHS = 20
DISTS = {
    "learning_rate": FloatDistribution(1e-4, 0.3, log=True),
    "batch_size": CategoricalDistribution([16, 32, 64, 128, 256]),
    "dropout": FloatDistribution(0.0, 0.6),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}
# (stop reason, share of the trials): Hyperband stops most trials in their first epochs.
OUTCOMES = (("pruned", 0.62), ("early_stopped", 0.14), ("max_epochs", 0.18),
            ("diverged", 0.03), ("failed", 0.03))


def spec(n_trials: int) -> JobSpec:
    return JobSpec.model_validate({"name": f"scale-{n_trials}", "n_trials": n_trials,
                                   "max_epochs": MAX_EPOCHS, "pruner": {"name": "hyperband"}})


def _epochs(reason: str, rng: random.Random) -> int:
    return {"pruned": rng.choice((1, 1, 1, 3, 3, 9)), "early_stopped": rng.randint(6, 18),
            "max_epochs": MAX_EPOCHS, "diverged": rng.randint(1, 3),
            "failed": rng.randint(1, 5)}[reason]


def synthetic_trial(i: int, rng: random.Random, start: datetime) -> FrozenTrial:
    """Trial number `i` with what search.runner.run_trial records for its outcome."""
    reason = rng.choices([r for r, _ in OUTCOMES], [w for _, w in OUTCOMES])[0]
    epochs = _epochs(reason, rng)
    params = {"learning_rate": 10 ** rng.uniform(-4, math.log10(0.3)),
              "batch_size": rng.choice([16, 32, 64, 128, 256]),
              "dropout": rng.uniform(0, 0.6), "weight_decay": 10 ** rng.uniform(-6, -2)}
    ceiling = 0.6 + 0.35 * rng.random()
    iv = {e: round(ceiling * (1 - math.exp(-0.3 * e)) + rng.gauss(0, 0.004), 6)
          for e in range(1, epochs + 1)}
    best_epoch = max(iv, key=iv.get)
    attrs: dict[str, Any] = {
        "stop_reason": reason, "stopped_epoch": epochs, "best_epoch": best_epoch,
        "train_seconds": round(0.4 * epochs, 4), "epoch_seconds": 0.4,
        "best_value": iv[best_epoch], "examples_seen": 1000 * epochs,
        "epochs_trained": float(epochs),
        "curves": {"train_loss": [round(1 / (e + 1), 6) for e in iv],
                   "val_loss": [round(1.1 / (e + 1), 6) for e in iv],
                   "val_accuracy": list(iv.values())}}
    state, value = TrialState.PRUNED, None
    if reason in ("max_epochs", "early_stopped"):
        state, value = TrialState.COMPLETE, iv[best_epoch]
        attrs.update(test_accuracy=value - 0.01, test_loss=0.5)
        if reason == "early_stopped":
            attrs.update(patience=5, min_delta=0.0)
    elif reason == "pruned":
        attrs.update(pruner="hyperband", prune_step=epochs, prune_rung=epochs // 3,
                     prune_value=iv[epochs], prune_cutoff=iv[epochs] + 0.02, prune_n_peers=9)
    elif reason == "diverged":
        attrs.update(diverged_epoch=epochs + 1, diverged_loss="nan", stopped_epoch=epochs + 1)
    else:
        state, attrs["error"] = TrialState.FAIL, "RuntimeError: worker lost"
    began = start + timedelta(seconds=2 * i)
    trial = optuna.create_trial(state=state, value=value, params=params, distributions=DISTS,
                                user_attrs=attrs, intermediate_values=iv)
    trial.number = i
    trial.datetime_start, trial.datetime_complete = began, began + timedelta(seconds=epochs)
    return trial


def _children(trial_id: int, t: FrozenTrial) -> dict[type, list[dict[str, Any]]]:
    """The rows of `t`'s values, parameters, user attributes and intermediate values."""
    rows: dict[type, list[dict[str, Any]]] = {}
    if t.values:
        v, kind = models.TrialValueModel.value_to_stored_repr(t.value)
        rows[models.TrialValueModel] = [
            {"trial_id": trial_id, "objective": 0, "value": v, "value_type": kind}]
    rows[models.TrialParamModel] = [
        {"trial_id": trial_id, "param_name": k,
         "param_value": t.distributions[k].to_internal_repr(v),
         "distribution_json": optuna.distributions.distribution_to_json(t.distributions[k])}
        for k, v in t.params.items()]
    rows[models.TrialUserAttributeModel] = [
        {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
        for k, v in t.user_attrs.items()]
    stored = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr
    rows[models.TrialIntermediateValueModel] = [
        {"trial_id": trial_id, "step": step, "intermediate_value": stored(v)[0],
         "intermediate_value_type": stored(v)[1]}
        for step, v in t.intermediate_values.items()]
    return rows


def add_trials(storage: optuna.storages.RDBStorage, study: optuna.Study,
               trials: list[FrozenTrial]) -> None:
    """Write `trials` (numbered as they are) into the study's tables in one transaction, as
    bulk inserts (the ORM's unit of work took seconds for 2,000 trials)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    with storage.engine.begin() as conn:
        ids = conn.scalars(
            sa.insert(models.TrialModel.__table__).returning(
                models.TrialModel.__table__.c.trial_id, sort_by_parameter_order=True),
            [{"number": t.number, "study_id": study_id, "state": t.state,
              "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete}
             for t in trials]).all()
        tables: dict[type, list[dict[str, Any]]] = {}
        for trial_id, t in zip(ids, trials, strict=True):
            for model, rows in _children(trial_id, t).items():
                tables.setdefault(model, []).extend(rows)
        for model, rows in tables.items():
            if rows:
                conn.execute(sa.insert(model.__table__), rows)


def build_study(url: str, n_trials: int, name: str | None = None, seed: int = 0
                ) -> optuna.Study:
    """A study of `n_trials` finished trials of every outcome on the database `url`."""
    storage = optuna.storages.RDBStorage(url)
    name = name or f"job-scale-{n_trials}"
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    study.set_user_attr("spec", spec(n_trials).model_dump(mode="json"))
    rng = random.Random(seed)
    start = datetime(2025, 1, 1)
    for lo in range(0, n_trials, 2000):
        add_trials(storage, study, [synthetic_trial(i, rng, start)
                                    for i in range(lo, min(lo + 2000, n_trials))])
    storage.engine.dispose()
    return study


# --- measuring -----------------------------------------------------------------------------

def _steps(url: str, name: str, n: int, through_optuna: bool = False
           ) -> dict[str, Callable[[], Any]]:
    """Each step as a request makes it: the service's read of the trials, page by page
    (service.reports.job_trials), then the search function on them; or, `through_optuna`,
    as before that read existed: the study loaded through Optuna by each function itself."""
    db = Database(Settings(database_url=url))
    job = SimpleNamespace(id=0, study_name=name)

    def fresh() -> optuna.Study:
        return optuna.load_study(study_name=name, storage=url)

    def trials() -> dict[str, Any]:
        return {} if through_optuna else {"trials": job_trials(db, job)}

    def report(study: optuna.Study, read: dict[str, Any]) -> dict[str, Any]:
        return build_report(study, spec(n), {"id": 1, "name": name, "status": "succeeded"},
                            **read)

    def html() -> str:
        study, read = fresh(), trials()
        return render_html(report(study, read), study, **read)

    steps: dict[str, Callable[[], Any]] = {
        "load": (lambda: fresh().get_trials(deepcopy=False)) if through_optuna else (
            lambda: job_trials(db, job)),
        "report_json": lambda: json.dumps(report(fresh(), trials()), default=str),
        "report_html": html,
        "report_csv": lambda: render_csv(fresh(), **trials()),
    }
    for plot in PLOTS:
        steps[f"plot_{plot}"] = lambda plot=plot: render_png(fresh(), plot, **trials())
    return steps


def measure(fn: Callable[[], Any]) -> dict[str, Any]:
    """Wall and CPU seconds of one call (after a warm-up call), then the tracemalloc peak of
    another (tracemalloc slows Python down, so it is not on while timing)."""
    fn()
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    size = len(out) if isinstance(out, str | bytes) else None
    del out
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"seconds": seconds, "cpu_s": cpu, "peak_mib": peak / 2**20, "bytes": size}


def run(sizes: list[int], workdir: Path, through_optuna: bool = False
        ) -> dict[int, dict[str, dict[str, float]]]:
    results: dict[int, dict[str, dict[str, float]]] = {}
    for n in sizes:
        path = workdir / f"scale-{n}.db"
        url = f"sqlite:///{path}"
        t0 = time.perf_counter()
        if not path.exists():
            build_study(url, n)
        print(f"{n} trials ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results[n] = {}
        for step, fn in _steps(url, f"job-scale-{n}", n, through_optuna).items():
            results[n][step] = measure(fn)
            print(f"  {step}: {results[n][step]}", file=sys.stderr)
    return results


def markdown(results: dict[int, dict[str, dict[str, Any]]], note: str = "") -> str:
    small, big = min(results), max(results)
    lines = [f"| step | {small:,}: wall s | CPU s | peak MiB | {big:,}: wall s | CPU s | "
             f"peak MiB | ratio CPU | ratio MiB | bytes at {big:,} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for step in results[big]:
        a, b = results[small][step], results[big][step]
        lines.append(
            f"| {step} | {a['seconds']:.2f} | {a['cpu_s']:.2f} | {a['peak_mib']:.1f} | "
            f"{b['seconds']:.2f} | {b['cpu_s']:.2f} | {b['peak_mib']:.1f} | "
            f"{b['cpu_s'] / max(a['cpu_s'], 1e-9):.1f} | "
            f"{b['peak_mib'] / max(a['peak_mib'], 1e-9):.1f} | "
            f"{b['bytes'] if b['bytes'] is not None else '-'} |")
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
               f"{platform.python_version()}, optuna {optuna.__version__}")
    return "\n".join([f"Measured {datetime.now():%Y-%m-%d} on {machine}{note}.", "",
                      *lines, ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--through-optuna", action="store_true",
                        help="each function loads the study through Optuna (the way before "
                             "the service read trials page by page; runs older search/ too)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the studies' SQLite files here and reuse them")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the table here (default: print it)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    note = ", each function loading the study through Optuna" if args.through_optuna else ""
    with tempfile.TemporaryDirectory(prefix="hptune-report-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        table = markdown(run(args.sizes, workdir, args.through_optuna), note)
    if args.out:
        args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
