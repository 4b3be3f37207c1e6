"""Prometheus metrics, read from the database at scrape time so every API process agrees."""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select

from search import JobSpec
from search.report import epochs_saved, trial_to_dict
from service import jobs
from service.db import Database
from service.models import Job, as_utc
from service.registry import live_workers
from service.status import JobStatus

# Trial durations (seconds) histogram buckets.
DURATION_BUCKETS_S = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Per-trial figures are recomputed at most this often; a scrape in between reuses them.
TRIAL_STATS_TTL_S = 10.0
# Jobs whose trials are summarised (the most recent ones).
MAX_JOBS_SUMMARISED = 500


class _Collector:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    def _trial_stats(self) -> dict[str, Any]:
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < TRIAL_STATS_TTL_S:
                return self._cached[1]
            by_state: dict[str, int] = {}
            durations: list[float] = []
            saved = {"pruned": 0.0, "early_stopped": 0.0}
            rows, _ = jobs.list_jobs(self.db, None, limit=MAX_JOBS_SUMMARISED)
            for job in rows:
                max_epochs = JobSpec.model_validate(job.spec).max_epochs
                for t in jobs.study_trials(self.db, job):
                    by_state[t.state.name] = by_state.get(t.state.name, 0) + 1
                    if t.datetime_start and t.datetime_complete:
                        durations.append((t.datetime_complete - t.datetime_start).total_seconds())
                    # As the report counts them: partial epochs, nothing for an audited pruning.
                    saving = epochs_saved(trial_to_dict(t), max_epochs)
                    if saving is not None:
                        saved[saving[0]] += saving[1]
            stats = {"by_state": by_state, "durations": durations, "saved": saved}
            self._cached = (time.monotonic(), stats)
            return stats

    def collect(self):
        with self.db.session() as s:
            status_counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status))
                                 .all())
        g = GaugeMetricFamily("hptune_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            g.add_metric([status], status_counts.get(status, 0))
        yield g

        stats = self._trial_stats()
        g = GaugeMetricFamily("hptune_trials", "Trials by Optuna state.", labels=["state"])
        for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"):
            g.add_metric([state], stats["by_state"].get(state, 0))
        yield g

        durations = stats["durations"]
        buckets = [(str(b), sum(1 for d in durations if d <= b)) for b in DURATION_BUCKETS_S]
        buckets.append(("+Inf", len(durations)))
        h = HistogramMetricFamily("hptune_trial_duration_seconds",
                                  "Wall time of finished trials.")
        h.add_metric([], buckets, sum_value=sum(durations))
        yield h

        # A gauge: summed over the most recent jobs, it falls when old jobs drop out or are
        # deleted.
        g = GaugeMetricFamily("hptune_epochs_saved",
                              f"Epochs not trained because trials stopped early, by cause, over "
                              f"the {MAX_JOBS_SUMMARISED} most recent jobs.", labels=["cause"])
        for cause, n in stats["saved"].items():
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
