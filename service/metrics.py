"""Prometheus metrics, read from the database at scrape time so every API process agrees."""

from __future__ import annotations

import threading
import time

from optuna.trial import TrialState
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select

from search import JobSpec
from search.report import epochs_saved, trial_to_dict
from service import jobs, trial_store
from service.db import Database
from service.models import Job, as_utc
from service.registry import live_workers
from service.status import TERMINAL, JobStatus

# Trial durations (seconds) histogram buckets.
DURATION_BUCKETS_S = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Epochs saved are recomputed at most this often; a scrape in between reuses them.
TRIAL_STATS_TTL_S = 10.0
# Jobs whose epochs saved are summed (the most recent ones).
MAX_JOBS_SUMMARISED = 500


class _Collector:
    """Reads hptune's state at scrape time in a bounded number of queries: trial counts and
    durations are aggregates over Optuna's tables; epochs saved are summed per job, and a
    job's sum is kept once the job has ended with no trial left running, until it ends again
    (service.lifecycle may extend or resume it: its finished_at changes)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, float]] | None = None
        self._settled: dict[tuple[int, object], dict[str, float]] = {}  # (id, finished_at)

    def _epochs_saved(self) -> dict[str, float]:
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < TRIAL_STATS_TTL_S:
                return self._cached[1]
            saved = {"pruned": 0.0, "early_stopped": 0.0}
            rows, _ = jobs.list_jobs(self.db, None, limit=MAX_JOBS_SUMMARISED)
            keys = [(j.id, j.finished_at) for j in rows]
            self._settled = {k: self._settled[k] for k in keys if k in self._settled}
            for job in rows:
                per_job = self._settled.get((job.id, job.finished_at)) or self._job_saved(job)
                for cause, n in per_job.items():
                    saved[cause] += n
            self._cached = (time.monotonic(), saved)
            return saved

    def _job_saved(self, job: Job) -> dict[str, float]:
        """The job's epochs saved by cause, as the report counts them (partial epochs,
        nothing for an audited pruning); kept when the job can no longer change."""
        max_epochs = JobSpec.model_validate(job.spec).max_epochs
        saved = {"pruned": 0.0, "early_stopped": 0.0}
        trials = jobs.study_trials(self.db, job)
        for t in trials:
            saving = epochs_saved(trial_to_dict(t), max_epochs)
            if saving is not None:
                saved[saving[0]] += saving[1]
        unfinished = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
        if job.status in TERMINAL and not unfinished:
            self._settled[(job.id, job.finished_at)] = saved
        return saved

    def collect(self):
        with self.db.session() as s:
            status_counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status))
                                 .all())
        g = GaugeMetricFamily("hptune_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            g.add_metric([status], status_counts.get(status, 0))
        yield g

        by_state = trial_store.trials_by_state(self.db)
        g = GaugeMetricFamily("hptune_trials", "Trials by Optuna state.", labels=["state"])
        for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"):
            g.add_metric([state], by_state.get(state, 0))
        yield g

        counts, n, total = trial_store.trial_duration_histogram(self.db, DURATION_BUCKETS_S)
        buckets = [(str(b), c) for b, c in zip(DURATION_BUCKETS_S, counts, strict=True)]
        buckets.append(("+Inf", n))
        h = HistogramMetricFamily("hptune_trial_duration_seconds",
                                  "Wall time of finished trials.")
        h.add_metric([], buckets, sum_value=total)
        yield h

        # A gauge: summed over the most recent jobs, it falls when old jobs drop out or are
        # deleted.
        g = GaugeMetricFamily("hptune_epochs_saved",
                              f"Epochs not trained because trials stopped early, by cause, over "
                              f"the {MAX_JOBS_SUMMARISED} most recent jobs.", labels=["cause"])
        for cause, n in self._epochs_saved().items():
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


def metrics_registry(db: Database) -> CollectorRegistry:
    """A registry whose only collector reads hptune's state from the database."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(db))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
