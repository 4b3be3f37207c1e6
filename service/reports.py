"""Reports of a job: JSON, HTML, CSV, plots and the server-sent event stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import optuna
from sqlalchemy import select

from search import JobSpec, build_report, trial_to_dict
from service.artifacts import CHECKPOINT, MODEL, job_artifact_bytes
from service.db import Database
from service.errors import NotFound
from service.jobs import get_job, job_public, load_job_study, study_trials
from service.models import Job
from service.retry import DB_RETRY
from service.status import TERMINAL


def job_report(db: Database, owner: str | None, job_id: int) -> dict[str, Any]:
    job = get_job(db, owner, job_id)
    if not job.study_name:
        raise NotFound(f"job {job_id} has no trials yet")
    study = load_job_study(db, job)
    public = job_public(db, job)
    public.pop("spec")
    report = build_report(study, JobSpec.model_validate(job.spec), public)
    stored = DB_RETRY(job_artifact_bytes, db, job.id)
    report["artifacts"] = {"model_bytes": stored[MODEL], "checkpoint_bytes": stored[CHECKPOINT]}
    return report


def _job_study(db: Database, owner: str | None, job_id: int) -> tuple[Job, optuna.Study]:
    job = get_job(db, owner, job_id)
    if not job.study_name:
        raise NotFound(f"job {job_id} has no trials yet")
    return job, load_job_study(db, job)


def job_report_html(db: Database, owner: str | None, job_id: int) -> str:
    """The report as one self-contained HTML page with its pictures inline."""
    from search.report_html import render_html

    _, study = _job_study(db, owner, job_id)
    return render_html(job_report(db, owner, job_id), study)


def job_report_csv(db: Database, owner: str | None, job_id: int) -> str:
    """Every trial of the job as a CSV row."""
    from search.report_csv import render_csv

    _, study = _job_study(db, owner, job_id)
    return render_csv(study)


def job_plot(db: Database, owner: str | None, job_id: int, name: str, width: int, height: int
             ) -> bytes:
    """One of the report's pictures as PNG."""
    from search.plots import PLOTS, render_png

    if name not in PLOTS:
        raise NotFound(f"no plot {name!r}; plots: {', '.join(PLOTS)}")
    _, study = _job_study(db, owner, job_id)
    return render_png(study, name, width_px=width, height_px=height)


def job_events(db: Database, owner: str | None, job_id: int, key_id: int,
               poll_s: float = 1.0, max_s: float = 3600) -> AsyncIterator[str]:
    """Server-sent events: one `trial` event per trial state change, `job` events on status
    changes, ending after the job's final state. Raises NotFound before streaming starts.

    The stream is asynchronous: it holds a thread only while it reads the database, never
    while it waits, so open streams cannot starve the routes of threads. It ends when the key
    `key_id` that opened it is revoked, and after `max_s` (clients reconnect).
    """
    job = get_job(db, owner, job_id)
    if job.study_name:
        load_job_study(db, job)  # StudyMissing now, as a 404, rather than an empty stream
    return _event_stream(db, owner, job_id, key_id, poll_s, max_s)


async def _event_stream(db: Database, owner: str | None, job_id: int, key_id: int,
                        poll_s: float, max_s: float) -> AsyncIterator[str]:
    import anyio

    seen: dict[int, str] = {}
    last_status: list[str | None] = [None]

    def poll() -> tuple[list[str], bool]:
        """The events since the last poll, and whether the stream is over."""
        if key_revoked(db, key_id):
            return [], True
        job = get_job(db, owner, job_id)
        out = []
        for t in study_trials(db, job):
            if seen.get(t.number) != t.state.name:
                seen[t.number] = t.state.name
                out.append(_sse("trial", trial_to_dict(t)))
        public = job_public(db, job)
        public.pop("spec")
        done = public["status"] in TERMINAL
        if public["status"] != last_status[0] or done:
            last_status[0] = public["status"]
            out.append(_sse("job", public))
        return out, done

    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        try:
            events, done = await anyio.to_thread.run_sync(poll)
        except NotFound:  # deleted while watched
            return
        for event in events:
            yield event
        if done:
            return
        yield ": keep-alive\n\n"
        await anyio.sleep(poll_s)


def key_revoked(db: Database, key_id: int) -> bool:
    """Whether API key `key_id` is revoked (or gone)."""
    from service.models import ApiKey

    with db.session() as s:
        row = s.execute(select(ApiKey.revoked_at).where(ApiKey.id == key_id)).first()
    return row is None or row.revoked_at is not None


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"
