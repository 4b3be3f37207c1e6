"""Reports of a job: JSON, HTML, CSV, plots and the server-sent event stream."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search import JobSpec, build_report
from service import trial_store
from service.artifacts import CHECKPOINT, MODEL, job_artifact_bytes
from service.db import Database
from service.errors import NotFound
from service.events import Cursor, EventPoller, event_stream, key_revoked
from service.jobs import StudyMissing, get_job, job_public, load_job_study
from service.models import Job
from service.retry import DB_RETRY

__all__ = ["job_events", "job_plot", "job_report", "job_report_csv", "job_report_html",
           "job_trials", "key_revoked"]


# Trials a report reads at a time (trial_store.read_page: two queries a page, no ORM objects).
REPORT_PAGE = 1000
# What no report, CSV or picture reads of a trial: its per-epoch metrics (the learning curves
# draw the pruner's intermediate values), dropped as each page arrives.
_UNREAD_ATTRS = ("curves",)


def _job_study(db: Database, owner: str | None, job_id: int) -> tuple[Job, optuna.Study]:
    job = get_job(db, owner, job_id)
    if not job.study_name:
        raise NotFound(f"job {job_id} has no trials yet")
    return job, load_job_study(db, job)


def job_trials(db: Database, job: Job) -> list[FrozenTrial]:
    """Every trial of the job's study in number order, read page by page: what one report,
    CSV or picture request reads, once (never Optuna's load of the whole study through its
    ORM, which took ~0.8 ms a trial)."""
    trials: list[FrozenTrial] = []
    after = -1
    with _gc_paused():
        while True:
            page = DB_RETRY(trial_store.read_page, db, job.study_name, after, REPORT_PAGE)
            if page is None:
                raise StudyMissing(f"job {job.id}'s study {job.study_name!r} no longer exists "
                                   "(deleted or renamed outside hptune)")
            for t in page.trials:
                for key in _UNREAD_ATTRS:
                    t.user_attrs.pop(key, None)
            trials += page.trials
            if len(page.trials) < REPORT_PAGE:
                return trials
            after = page.trials[-1].number


_gc_lock = threading.Lock()
_gc_holds = [0, False]  # reads under way, and whether the collector was on before the first


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while trials are read: a read builds tens of
    thousands of acyclic dicts, and each full collection they trigger walks every one built
    so far again (40% of a 10,000-trial read's CPU time). Concurrent reads share one pause;
    the last one out restores the collector as it was."""
    with _gc_lock:
        _gc_holds[0] += 1
        if _gc_holds[0] == 1:
            _gc_holds[1] = gc.isenabled()
            gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holds[0] -= 1
            if _gc_holds[0] == 0 and _gc_holds[1]:
                gc.enable()


def _report(db: Database, job: Job, study: optuna.Study, trials: list[FrozenTrial]
            ) -> dict[str, Any]:
    public = job_public(db, job)
    public.pop("spec")
    report = build_report(study, JobSpec.model_validate(job.spec), public, trials=trials)
    stored = DB_RETRY(job_artifact_bytes, db, job.id)
    report["artifacts"] = {"model_bytes": stored[MODEL], "checkpoint_bytes": stored[CHECKPOINT]}
    return report


def job_report(db: Database, owner: str | None, job_id: int) -> dict[str, Any]:
    """The early-stopped trial report (search.report.build_report) with the job's artifacts."""
    job, study = _job_study(db, owner, job_id)
    return _report(db, job, study, job_trials(db, job))


def job_report_html(db: Database, owner: str | None, job_id: int) -> str:
    """The report as one self-contained HTML page with its pictures inline: the report and
    the pictures from one read of the trials."""
    from search.report_html import render_html

    job, study = _job_study(db, owner, job_id)
    trials = job_trials(db, job)
    return render_html(_report(db, job, study, trials), study, trials=trials)


def job_report_csv(db: Database, owner: str | None, job_id: int) -> str:
    """Every trial of the job as a CSV row."""
    from search.report_csv import render_csv

    job, study = _job_study(db, owner, job_id)
    return render_csv(study, trials=job_trials(db, job))


def job_plot(db: Database, owner: str | None, job_id: int, name: str, width: int, height: int
             ) -> bytes:
    """One of the report's pictures as PNG."""
    from search.plots import PLOTS, render_png

    if name not in PLOTS:
        raise NotFound(f"no plot {name!r}; plots: {', '.join(PLOTS)}")
    job, study = _job_study(db, owner, job_id)
    return render_png(study, name, width_px=width, height_px=height,
                      trials=job_trials(db, job))


def job_events(db: Database, owner: str | None, job_id: int, key_id: int,
               poll_s: float = 1.0, max_s: float = 3600, *, cursor: Cursor | None = None,
               limit: int | None = None, path: str | None = None) -> AsyncIterator[str]:
    """Server-sent events: one `trial` event per trial state change, each with the `id` a
    client resumes from (service.events), `job` events on status changes, ending after the
    job's final state. From `cursor` when given; after `limit` trial events, or `max_s`, it
    ends with a `next` event naming the path that goes on. Raises NotFound before streaming.

    The stream is asynchronous: it holds a thread only while it reads the database, never
    while it waits, so open streams cannot starve the routes of threads. It ends when the key
    `key_id` that opened it is revoked.
    """
    job = get_job(db, owner, job_id)
    if job.study_name:
        load_job_study(db, job)  # StudyMissing now, as a 404, rather than an empty stream
    poller = EventPoller(db, owner, job_id, key_id, cursor, limit, path)
    return event_stream(poller, poll_s, max_s)
