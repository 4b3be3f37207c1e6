"""Jobs: creation, reads, cancellation, and the slot accounting that workers rely on."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import func, select, update

from search import (
    JobSpec,
    build_report,
    counts,
    create_study,
    study_name_for,
    trial_to_dict,
)
from search.datasets import bundled_names
from service.db import Database, retrying
from service.errors import Conflict, InvalidSpec, NotFound, QuotaExceeded
from service.models import Job, utcnow

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


REGRESSION_METRICS = ("val_loss", "val_rmse", "val_r2")
CLASSIFICATION_METRICS = ("val_loss", "val_accuracy")


def _check_spec(db: Database, owner: str, spec: JobSpec) -> None:
    """Checks that need the settings or the database; the spec's own checks ran in pydantic."""
    s = db.settings
    if spec.n_trials > s.max_trials_per_job:
        raise InvalidSpec(f"n_trials must be <= {s.max_trials_per_job}", field="n_trials")
    if spec.max_epochs > s.max_epochs_per_trial:
        raise InvalidSpec(f"max_epochs must be <= {s.max_epochs_per_trial}", field="max_epochs")
    if spec.timeout_seconds is not None and spec.timeout_seconds > s.max_timeout_seconds:
        raise InvalidSpec(f"timeout_seconds must be <= {s.max_timeout_seconds:g}",
                          field="timeout_seconds")
    if isinstance(spec.dataset, str):
        if spec.dataset not in bundled_names():
            raise InvalidSpec(
                f"unknown dataset {spec.dataset!r}; known: {', '.join(bundled_names())} "
                "or the integer id of an uploaded dataset", field="dataset")
        task = "regression" if spec.dataset == "regression" else "classification"
    else:
        from service.datasets import get_dataset

        try:
            task = get_dataset(db, owner, spec.dataset).task
        except NotFound:
            raise InvalidSpec(f"no dataset with id {spec.dataset}", field="dataset") from None
    allowed = REGRESSION_METRICS if task == "regression" else CLASSIFICATION_METRICS
    if spec.metric not in allowed:
        raise InvalidSpec(f"metric {spec.metric!r} does not fit a {task} dataset; use one of "
                          f"{', '.join(allowed)}", field="metric")


def _check_quota(db: Database, session: Any, owner: str, spec: JobSpec) -> None:
    s = db.settings
    active, queued = session.execute(
        select(func.count(), func.coalesce(func.sum(Job.n_trials - Job.reserved), 0))
        .where(Job.owner == owner, Job.status.in_(ACTIVE))
    ).one()
    if active + 1 > s.max_active_jobs_per_owner:
        raise QuotaExceeded(f"{owner} already has {active} active jobs "
                            f"(quota {s.max_active_jobs_per_owner})", field="n_trials")
    if queued + spec.n_trials > s.max_queued_trials_per_owner:
        raise QuotaExceeded(f"{owner} has {queued} queued trials; {spec.n_trials} more would pass "
                            f"the quota of {s.max_queued_trials_per_owner}", field="n_trials")


def create_job(db: Database, owner: str, spec: JobSpec) -> Job:
    """Store a queued job and create its study, with the spec as study attributes."""
    _check_spec(db, owner, spec)
    with db.session() as s:
        _check_quota(db, s, owner, spec)
        job = Job(owner=owner, name=spec.name, spec=spec.model_dump(mode="json"),
                  status="queued", n_trials=spec.n_trials, reserved=0, claims=0)
        s.add(job)
        s.flush()
        job_id = job.id
    name = study_name_for(job_id)
    try:
        retrying(lambda: create_study(spec, db.storage, name, {
            "job_id": job_id, "job_name": spec.name, "owner": owner,
            "dataset": spec.dataset, "n_trials": spec.n_trials,
        }))
    except Exception:
        with db.session() as s:
            s.delete(s.get(Job, job_id))
        raise
    with db.session() as s:
        job = s.get(Job, job_id)
        job.study_name = name
    return job


def get_job(db: Database, owner: str | None, job_id: int) -> Job:
    """The job, if `owner` may see it (None means any owner)."""
    with db.session() as s:
        job = s.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        raise NotFound(f"no job {job_id}")
    return job


def list_jobs(db: Database, owner: str | None, limit: int = 100, offset: int = 0
              ) -> tuple[list[Job], int]:
    with db.session() as s:
        q = select(Job)
        n = select(func.count()).select_from(Job)
        if owner is not None:
            q, n = q.where(Job.owner == owner), n.where(Job.owner == owner)
        rows = list(s.scalars(q.order_by(Job.id.desc()).limit(limit).offset(offset)))
        return rows, int(s.scalar(n) or 0)


def study_trials(db: Database, job: Job) -> list[FrozenTrial]:
    """The job's trials as Optuna stores them (empty before its study exists)."""
    if not job.study_name:
        return []
    study = retrying(lambda: optuna.load_study(study_name=job.study_name, storage=db.storage))
    return retrying(lambda: study.get_trials(deepcopy=False))


def job_public(db: Database, job: Job, trials: list[FrozenTrial] | None = None) -> dict[str, Any]:
    """A job with its counts by trial state, as the REST API shows it."""
    trials = study_trials(db, job) if trials is None else trials
    c = counts(trials)
    finished = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = None
    if finished:
        maximize = JobSpec.model_validate(job.spec).direction == "maximize"
        pick = max if maximize else min
        best = pick(t.value for t in finished)
    return {
        "id": job.id,
        "name": job.name,
        "owner": job.owner,
        "status": job.status,
        "n_trials": job.n_trials,
        "counts": c,
        "finished": c["complete"] + c["pruned"],
        "best_value": best,
        "metric": job.spec.get("metric"),
        "study_name": job.study_name,
        "error": job.error,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "spec": job.spec,
    }


def cancel_job(db: Database, owner: str | None, job_id: int) -> Job:
    """Stop handing out the job's trials; running ones stop within an epoch."""
    get_job(db, owner, job_id)
    with db.session() as s:
        res = s.execute(
            update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
            .values(status="cancelled", finished_at=utcnow())
        )
        if res.rowcount == 0:
            job = s.get(Job, job_id)
            raise Conflict(f"job {job_id} is already {job.status}")
    return get_job(db, owner, job_id)


def delete_job(db: Database, owner: str | None, job_id: int) -> None:
    """Delete a finished job and its study; active jobs must be cancelled first."""
    job = get_job(db, owner, job_id)
    if job.status in ACTIVE:
        raise Conflict(f"job {job_id} is {job.status}; cancel it first")
    if job.study_name:
        with contextlib.suppress(KeyError):
            retrying(lambda: optuna.delete_study(study_name=job.study_name, storage=db.storage))
    with db.session() as s:
        s.delete(s.get(Job, job_id))


def job_trials(db: Database, owner: str | None, job_id: int) -> list[dict[str, Any]]:
    job = get_job(db, owner, job_id)
    return [trial_to_dict(t) for t in study_trials(db, job)]


def job_report(db: Database, owner: str | None, job_id: int) -> dict[str, Any]:
    job = get_job(db, owner, job_id)
    study = retrying(lambda: optuna.load_study(study_name=job.study_name, storage=db.storage))
    public = job_public(db, job, study.get_trials(deepcopy=False))
    public.pop("spec")
    return build_report(study, JobSpec.model_validate(job.spec), public)


def _job_study(db: Database, owner: str | None, job_id: int) -> tuple[Job, optuna.Study]:
    job = get_job(db, owner, job_id)
    if not job.study_name:
        raise NotFound(f"job {job_id} has no trials yet")
    return job, retrying(lambda: optuna.load_study(study_name=job.study_name,
                                                   storage=db.storage))


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


def job_events(db: Database, owner: str | None, job_id: int, poll_s: float = 1.0,
               max_s: float = 24 * 3600) -> Iterator[str]:
    """Server-sent events: one `trial` event per trial state change, `job` events on status
    changes, ending after the job's final state."""
    get_job(db, owner, job_id)  # 404 before the stream starts
    seen: dict[int, str] = {}
    last_status = None
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        job = get_job(db, owner, job_id)
        trials = study_trials(db, job)
        for t in trials:
            if seen.get(t.number) != t.state.name:
                seen[t.number] = t.state.name
                yield _sse("trial", trial_to_dict(t))
        public = job_public(db, job, trials)
        public.pop("spec")
        if public["status"] != last_status or public["status"] in TERMINAL:
            last_status = public["status"]
            yield _sse("job", public)
        if public["status"] in TERMINAL:
            return
        yield ": keep-alive\n\n"
        time.sleep(poll_s)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


# --- the workers' side ---------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One trial slot of one job, handed to one worker."""

    job_id: int
    spec: JobSpec
    study_name: str
    # Distinct for every claim of the job: seeds the sampler so parallel workers differ.
    claim_number: int


def claim_slot(db: Database) -> Claim | None:
    """Atomically take one trial slot of the oldest active job, or None if there is no work.

    One UPDATE increments `reserved` only while it is below `n_trials`; under concurrency the
    condition is re-checked on the locked row, so a job never hands out more than n_trials.
    """
    pick = (
        select(Job.id)
        .where(Job.status.in_(ACTIVE), Job.reserved < Job.n_trials, Job.study_name.is_not(None))
        .order_by(Job.id)
        .limit(1)
        .scalar_subquery()
    )
    stmt = (
        update(Job)
        .where(Job.id == pick, Job.status.in_(ACTIVE), Job.reserved < Job.n_trials)
        .values(reserved=Job.reserved + 1, claims=Job.claims + 1, status="running",
                started_at=func.coalesce(Job.started_at, utcnow()))
        .returning(Job.id, Job.spec, Job.study_name, Job.claims)
        .execution_options(synchronize_session=False)
    )

    def attempt() -> Claim | None:
        with db.session() as s:
            row = s.execute(stmt).first()
        if row is None:
            return None
        return Claim(row.id, JobSpec.model_validate(row.spec), row.study_name, row.claims)

    return retrying(attempt)


def release_slot(db: Database, job_id: int) -> None:
    """Give a slot back (its trial failed), so that a retry or a new trial can take it."""
    def attempt() -> None:
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.reserved > 0)
                      .values(reserved=Job.reserved - 1))
    retrying(attempt)


def job_status(db: Database, job_id: int) -> str | None:
    """The job's status, read fresh (workers poll it to stop cancelled trials)."""
    def attempt() -> str | None:
        with db.session() as s:
            return s.scalar(select(Job.status).where(Job.id == job_id))
    return retrying(attempt)


def refresh_job(db: Database, job_id: int) -> str | None:
    """Move an active job to `succeeded` (or `failed`) once its trials say so."""
    job = get_job(db, None, job_id)
    if job.status not in ACTIVE:
        return job.status
    c = counts(study_trials(db, job))
    finished = c["complete"] + c["pruned"]
    new = None
    error = None
    if finished >= job.n_trials and c["running"] == 0 and c["waiting"] == 0:
        new = "succeeded"
    elif c["failed"] > job.n_trials * (db.settings.max_trial_retries + 1):
        new, error = "failed", f"{c['failed']} trials failed"
    if new:
        def attempt() -> None:
            with db.session() as s:
                s.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
                          .values(status=new, error=error, finished_at=utcnow()))
        retrying(attempt)
        return new
    return job.status


def fail_job(db: Database, job_id: int, error: str) -> None:
    """End a job that cannot run (its dataset will not load, say)."""
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
                  .values(status="failed", error=error[:1000], finished_at=utcnow()))


def active_job_ids(db: Database) -> list[int]:
    with db.session() as s:
        return list(s.scalars(select(Job.id).where(Job.status.in_(ACTIVE))))


def retry_failed_trial(db: Database, study: optuna.Study, trial: FrozenTrial) -> None:
    """Give a failed trial's slot back and queue its parameters again, up to the retry limit.

    The retry carries `failed_trial` and `retry_history` system attributes linking it to the
    original; past the limit the slot goes to a freshly sampled trial instead.
    """
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=db.settings.max_trial_retries
    )
    retrying(lambda: retry(study, trial))
    release_slot(db, int(study.user_attrs["job_id"]))


def open_database(settings: Any) -> Database:
    """A Database whose storage retries trials that the heartbeat found dead."""
    return Database(settings, stale_trial_callback=retry_failed_trial)


def reap(db: Database) -> int:
    """Fail trials whose worker stopped beating, queue their retries, settle job statuses.

    Needs no live worker: the API process runs it too. Returns the number of jobs looked at.
    """
    ids = active_job_ids(db)
    for job_id in ids:
        job = get_job(db, None, job_id)
        if job.study_name:
            retrying(lambda name=job.study_name: optuna.storages.fail_stale_trials(
                optuna.load_study(study_name=name, storage=db.storage)))
        refresh_job(db, job_id)
    return len(ids)
