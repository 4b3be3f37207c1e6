"""Prometheus metrics, read from the database at scrape time so every API process agrees.

A scrape costs what the live jobs hold, not what has ever run: an ended job's trials are
summed once into its `hptune_job_stats` row (counts by state, the duration histogram,
epochs saved), and a scrape adds those rows up in one aggregate, then sums the trials of the
jobs still without a valid row (active ones, and ended ones not yet summed) in one more.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import and_, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from search import JobSpec
from search.report import epochs_saved, trial_to_dict
from service import jobs, trial_store
from service.db import Database
from service.models import BUCKET_COLUMNS, DURATION_BUCKETS_S, Job, as_utc, job_stats
from service.registry import live_workers
from service.status import TERMINAL, JobStatus

__all__ = ["DURATION_BUCKETS_S", "metrics_registry", "render"]

# Epochs saved by active jobs are recomputed at most this often (they load the jobs' trials);
# a scrape in between reuses them. Counts and durations are read afresh on every scrape.
TRIAL_STATS_TTL_S = 10.0
# Ended jobs summed into their stats row per scrape at most (each loads its trials once):
# after an upgrade over many ended jobs, the epochs-saved gauge catches up over a few
# scrapes; their counts and durations are exact from the first.
SETTLE_PER_SCRAPE = 50
_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
_SAVED = ("pruned", "early_stopped")


class _Totals:
    """What a scrape reports: trials by state, the duration histogram, epochs saved."""

    def __init__(self) -> None:
        self.states = dict.fromkeys(_STATES, 0)
        self.durations, self.duration_sum = 0, 0.0
        self.buckets = [0] * len(DURATION_BUCKETS_S)
        self.saved = dict.fromkeys(_SAVED, 0.0)

    def add(self, t: trial_store.TrialTotals) -> None:
        for state, n in t.states.items():
            self.states[state] += n
        self.durations += t.durations
        self.duration_sum += t.duration_sum
        self.buckets = [a + b for a, b in zip(self.buckets, t.buckets, strict=True)]

    def add_saved(self, saved: dict[str, float]) -> None:
        for cause, n in saved.items():
            self.saved[cause] += n


class _Collector:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        # Epochs saved by each active job: (when read, the job's finished_at, saved).
        self._active_saved: dict[int, tuple[float, Any, dict[str, float]]] = {}

    def _totals(self) -> _Totals:
        totals = _Totals()
        settled = _settled_sums(self.db)
        if settled is not None:
            totals.add(settled[0])
            totals.add_saved(settled[1])
        live = _unsettled_jobs(self.db)
        by_study = trial_store.trial_totals(
            self.db, [j.study_name for j in live if j.study_name], DURATION_BUCKETS_S)
        budget = SETTLE_PER_SCRAPE
        with self._lock:
            live_ids = {j.id for j in live}
            self._active_saved = {k: v for k, v in self._active_saved.items() if k in live_ids}
            for job in live:
                trials = by_study.get(job.study_name or "")
                if trials is not None:
                    totals.add(trials)
                unfinished = trials is not None and (
                    trials.states["RUNNING"] or trials.states["WAITING"])
                if job.status in TERMINAL and not unfinished:
                    if budget > 0:
                        budget -= 1
                        totals.add_saved(self._settle(job, trials))
                    continue
                totals.add_saved(self._saved_while_active(job))
        return totals

    def _saved_while_active(self, job: Any) -> dict[str, float]:
        cached = self._active_saved.get(job.id)
        if (cached and cached[1] == job.finished_at
                and time.monotonic() - cached[0] < TRIAL_STATS_TTL_S):
            return cached[2]
        saved = _job_saved(self.db, job)
        self._active_saved[job.id] = (time.monotonic(), job.finished_at, saved)
        return saved

    def _settle(self, job: Any, trials: trial_store.TrialTotals | None) -> dict[str, float]:
        """Sum an ended job's trials into its stats row (once; another API process may race
        to write the same row, which is then left as it wrote it)."""
        saved = _job_saved(self.db, job)
        t = trials or trial_store.TrialTotals(dict.fromkeys(_STATES, 0), 0, 0.0,
                                              (0,) * len(DURATION_BUCKETS_S))
        row = {"job_id": job.id, "finished_at": job.finished_at,
               "complete": t.states["COMPLETE"], "pruned": t.states["PRUNED"],
               "failed": t.states["FAIL"], "durations": t.durations,
               "duration_sum": t.duration_sum, **dict(zip(BUCKET_COLUMNS, t.buckets, strict=True)),
               "saved_pruned": saved["pruned"], "saved_early_stopped": saved["early_stopped"]}
        with contextlib.suppress(IntegrityError), self.db.session() as s:
            s.execute(delete(job_stats).where(job_stats.c.job_id == job.id))
            s.execute(insert(job_stats).values(**row))
        return saved

    def collect(self):
        with self.db.session() as s:
            status_counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status))
                                 .all())
        g = GaugeMetricFamily("hptune_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            g.add_metric([status], status_counts.get(status, 0))
        yield g

        totals = self._totals()
        g = GaugeMetricFamily("hptune_trials", "Trials by Optuna state.", labels=["state"])
        for state, n in totals.states.items():
            g.add_metric([state], n)
        yield g

        buckets = [(str(b), c) for b, c in zip(DURATION_BUCKETS_S, totals.buckets, strict=True)]
        buckets.append(("+Inf", totals.durations))
        h = HistogramMetricFamily("hptune_trial_duration_seconds",
                                  "Wall time of finished trials.")
        h.add_metric([], buckets, sum_value=totals.duration_sum)
        yield h

        # A gauge: it falls when jobs are deleted.
        g = GaugeMetricFamily("hptune_epochs_saved",
                              "Epochs not trained because trials stopped early, by cause.",
                              labels=["cause"])
        for cause, n in totals.saved.items():
            g.add_metric([cause], round(n, 4))
        yield g

        workers = live_workers(self.db)
        yield GaugeMetricFamily("hptune_workers_live", "Workers seen within the last minute.",
                                value=len(workers))
        g = GaugeMetricFamily("hptune_worker_last_seen_timestamp_seconds",
                              "When each live worker last reported (Unix time).",
                              labels=["worker", "state"])
        for w in workers:
            g.add_metric([w.name, w.state], as_utc(w.last_seen).timestamp())
        yield g


def _valid_stats():
    """The join of jobs with their stats rows that still hold (same finished_at)."""
    return and_(job_stats.c.job_id == Job.id, job_stats.c.finished_at == Job.finished_at)


def _settled_sums(db: Database) -> tuple[trial_store.TrialTotals, dict[str, float]] | None:
    """Every valid stats row added up, in one aggregate; None when there is none."""
    c = job_stats.c
    columns = [c.complete, c.pruned, c.failed, c.durations, c.duration_sum,
               *(c[name] for name in BUCKET_COLUMNS), c.saved_pruned, c.saved_early_stopped]
    with db.session() as s:
        row = s.execute(select(func.count(), *(func.sum(col) for col in columns))
                        .select_from(job_stats).join(Job, _valid_stats())).one()
    if not row[0]:
        return None
    complete, pruned, failed, n, total, *rest = row[1:]
    states = {"COMPLETE": int(complete), "PRUNED": int(pruned), "FAIL": int(failed),
              "RUNNING": 0, "WAITING": 0}
    buckets = tuple(int(b) for b in rest[:len(BUCKET_COLUMNS)])
    saved = {"pruned": float(rest[-2]), "early_stopped": float(rest[-1])}
    return trial_store.TrialTotals(states, int(n), float(total), buckets), saved


def _unsettled_jobs(db: Database) -> list[Any]:
    """Jobs without a valid stats row: active ones, and ended ones not summed yet."""
    with db.session() as s:
        return list(s.execute(
            select(Job.id, Job.status, Job.study_name, Job.finished_at, Job.spec)
            .outerjoin(job_stats, _valid_stats()).where(job_stats.c.job_id.is_(None))).all())


def _job_saved(db: Database, job: Any) -> dict[str, float]:
    """The job's epochs saved by cause, as the report counts them (partial epochs, nothing
    for an audited pruning)."""
    max_epochs = JobSpec.model_validate(job.spec).max_epochs
    saved = dict.fromkeys(_SAVED, 0.0)
    try:
        trials = jobs.study_trials(db, job)
    except jobs.StudyMissing:  # not made yet (a job being created), or deleted outside hptune
        return saved
    for t in trials:
        saving = epochs_saved(trial_to_dict(t), max_epochs)
        if saving is not None:
            saved[saving[0]] += saving[1]
    return saved


def metrics_registry(db: Database) -> CollectorRegistry:
    """A registry whose only collector reads hptune's state from the database."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(db))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
