"""Tuning jobs: submit, list, read, extend, cancel, resume, delete, and their trials, reports,
plots and event stream."""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.background import BackgroundTask

from search import JobSpec
from service import idempotency, jobs, lifecycle, reports, trial_pages
from service.deps import (
    DbDep,
    EventCursorDep,
    IdempotencyKeyDep,
    JobId,
    KeyDep,
    OwnerDep,
    RendersDep,
    StreamsDep,
    TrialJsonDep,
)
from service.events import MAX_EVENT_LIMIT
from service.limits import OwnerSlots
from service.routes import idempotent_response, model_response, next_page
from service.schemas import ErrorBody, JobPublic, JobsPublic, JobUpdate, TrialsPublic

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

# The HTML report is one self-contained page: inline styles and data: images, no script.
REPORT_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'none'")

ReportFormat = Literal["json", "html", "csv"]


def jsonable(value: Any) -> Any:
    """The report with non-finite floats as null, so it is always valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _held_stream(slots: OwnerSlots, owner: str, stream: AsyncIterator[str]
                 ) -> StreamingResponse:
    """An event-stream response holding one of `owner`'s stream slots: taken now (429 before
    anything streams), given back once when the stream ends, however it ends."""
    slots.acquire(owner)
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            slots.release(owner)

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in stream:
                yield chunk
        finally:
            release()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(release))


@router.post("", status_code=201, response_model=JobPublic)
def submit_job(spec: JobSpec, db: DbDep, key: KeyDep, idem_key: IdempotencyKeyDep
               ) -> JSONResponse:
    """Queue a tuning job; workers start on it at once. With an Idempotency-Key, a retry
    answers the first job instead of making a second."""
    return idempotent_response(idempotency.submit_job(db, key.owner, spec, idem_key))


@router.get("", response_model=JobsPublic)
def list_jobs(db: DbDep, owner: OwnerDep,
              after: Annotated[int | None, Query(
                  ge=0, le=2**31 - 1,
                  description="cursor: the last job id seen; this page starts below it")] = None,
              limit: Annotated[int, Query(ge=1, le=500, description="page size")] = 100,
              offset: Annotated[int, Query(ge=0, le=2**31 - 1, description=(
                  "jobs to skip first (older clients; prefer the cursor)"))] = 0,
              ) -> Response:
    """The caller's jobs, newest first, a page at a time: follow `next` until it is null."""
    rows, count = jobs.list_jobs(db, owner, limit + 1, offset, after)
    more, rows = len(rows) > limit, rows[:limit]
    return model_response(JobsPublic, {
        "data": jobs.jobs_public(db, rows), "count": count,
        "next": next_page(router.prefix, rows[-1].id if more else None, limit)})


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: JobId, db: DbDep, owner: OwnerDep) -> Response:
    """One job with its counts by trial state."""
    return model_response(JobPublic, jobs.job_view(db, owner, job_id))


@router.delete("/{job_id}", status_code=204)
def delete_job(job_id: JobId, db: DbDep, owner: OwnerDep) -> None:
    """Delete a finished job and its trials."""
    jobs.delete_job(db, owner, job_id)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: JobId, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
    """Stop the job; its running trials stop within one epoch."""
    return jobs.job_public(db, jobs.cancel_job(db, owner, job_id))


@router.patch("/{job_id}", response_model=JobPublic)
def extend_job(job_id: JobId, body: JobUpdate, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
    """Raise the job's n_trials (never lower it), keeping its study and trials: a queued or
    running job runs on to the new count, a succeeded one runs again. 409 for a cancelled
    job (resume it first) or a failed one; 429 past the owner's quotas."""
    return lifecycle.extend_job(db, owner, job_id, body.n_trials)


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(job_id: JobId, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
    """Resume a cancelled job where it stopped: queued again with its study and trials, it
    runs to exactly n_trials finished, with a fresh timeout window. 409 for any other status."""
    return lifecycle.resume_job(db, owner, job_id)


@router.get("/{job_id}/trials", response_model=TrialsPublic)
def list_trials(job_id: JobId, db: DbDep, owner: OwnerDep, cache: TrialJsonDep,
                after: Annotated[int | None, Query(
                    ge=0, le=2**31 - 1,
                    description="cursor: the last trial number seen")] = None,
                limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
                ) -> Response:
    """The job's trials in number order with their state, values and why they stopped, a
    page at a time: follow `next` until it is null. `count` is all of the job's trials."""
    data, count, last = trial_pages.trials_page(db, owner, job_id, after, limit, cache)
    body = trial_pages.page_body(
        data, count, next_page(f"{router.prefix}/{job_id}/trials", last, limit))
    return Response(body, media_type="application/json")


@router.get("/{job_id}/report",
            responses={200: {"content": {"application/json": {}, "text/html": {},
                                         "text/csv": {}}}})
def report(job_id: JobId, db: DbDep, key: KeyDep, owner: OwnerDep, renders: RendersDep,
           format: Annotated[ReportFormat, Query(description="json, html or csv")] = "json",
           ) -> Response:
    """The early-stopped trial report: best trial, stopped trials, compute saved."""
    with renders.slot(key.owner):
        if format == "html":
            return HTMLResponse(reports.job_report_html(db, owner, job_id),
                                headers={"Content-Security-Policy": REPORT_CSP})
        if format == "csv":
            return PlainTextResponse(
                reports.job_report_csv(db, owner, job_id), media_type="text/csv",
                headers={"Content-Disposition": f'attachment; filename="job-{job_id}.csv"'})
        return JSONResponse(jsonable(jsonable_encoder(reports.job_report(db, owner, job_id))))


@router.get("/{job_id}/plots/{name}",
            responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorBody}})
def plot(job_id: JobId, name: Annotated[str, Path(max_length=50)], db: DbDep,
         key: KeyDep, owner: OwnerDep, renders: RendersDep,
         width: Annotated[int, Query(ge=200, le=4000)] = 1000,
         height: Annotated[int, Query(ge=200, le=4000)] = 600) -> Response:
    """A report picture as PNG: learning_curves, history, importances, lr_vs_batch."""
    with renders.slot(key.owner):
        png = reports.job_plot(db, owner, job_id, name, width, height)
    return Response(png, media_type="image/png")


@router.get("/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}})
def events(job_id: JobId, db: DbDep, key: KeyDep, owner: OwnerDep, streams: StreamsDep,
           cursor: EventCursorDep,
           limit: Annotated[int | None, Query(
               ge=1, le=MAX_EVENT_LIMIT,
               description="trial events this connection sends before it ends with a `next` "
                           "event (default: no end before the job's)")] = None,
           ) -> StreamingResponse:
    """Server-sent events: trial state changes, each with an `id` to resume from
    (`Last-Event-ID` or `?after=`: no change twice, none left out), then the job's final
    state."""
    stream = reports.job_events(db, owner, job_id, key.id, cursor=cursor, limit=limit,
                                path=f"{router.prefix}/{job_id}/events")
    return _held_stream(streams, key.owner, stream)
