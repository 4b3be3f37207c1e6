"""Jobs as the API sees them: spec and quota checks, crash-safe creation, reads, presenters,
cancellation and deletion."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import delete, func, select, update

from search import (
    JobSpec,
    counts,
    create_study,
    metric_direction,
    study_name_for,
    trial_to_dict,
)
from search.spec import in_space
from search.study import study_is_ready
from service import trial_store
from service.db import Database
from service.errors import Conflict, InvalidSpec, NotFound, QuotaExceeded
from service.job_checks import check_spec
from service.models import Job, as_utc, job_stats, utcnow
from service.repository import get_owned
from service.retry import DB_RETRY
from service.status import ACTIVE, JobStatus
from trainer import Direction, Metric

log = logging.getLogger("hptune.jobs")


def _check_quota(db: Database, session: Any, owner: str, spec: JobSpec,
                 job_id: int | None = None) -> None:
    """Refuse a job over the owner's quotas; `session` must hold the owner's lock
    (db.owner_session) and insert the job, so that no two submissions count the same room.
    With `job_id`, that job is counted as if new with spec.n_trials (service.lifecycle).

    The trial quota counts every trial of the owner's active jobs that has not finished,
    queued or running: a trial that starts still holds its room until it ends.
    """
    s = db.settings
    active = [r for r in session.execute(select(Job.id, Job.n_trials, Job.study_name).where(
        Job.owner == owner, Job.status.in_(ACTIVE))) if r.id != job_id]
    if len(active) + 1 > s.max_active_jobs_per_owner:
        raise QuotaExceeded(f"{owner} already has {len(active)} active jobs "
                            f"(quota {s.max_active_jobs_per_owner})", field="n_trials")
    summaries = trial_summaries(db, [r.study_name for r in active], session)
    unfinished = 0
    for r in active:
        c = summaries.get(r.study_name or "", {}).get("counts", {})
        unfinished += max(r.n_trials - c.get("complete", 0) - c.get("pruned", 0), 0)
    if unfinished + spec.n_trials > s.max_queued_trials_per_owner:
        raise QuotaExceeded(f"{owner} has {unfinished} unfinished trials; {spec.n_trials} more "
                            f"would pass the quota of {s.max_queued_trials_per_owner}",
                            field="n_trials")


def warm_start_configs(db: Database, owner: str, spec: JobSpec) -> list[dict[str, Any]]:
    """The best finished trials of `warm_start.from_job` that fit this job's search space."""
    ws = spec.warm_start
    if ws.from_job is None:
        return []
    try:
        earlier = get_job(db, owner, ws.from_job)
    except NotFound:
        raise InvalidSpec(f"no job {ws.from_job} to warm-start from",
                          field="warm_start.from_job") from None
    if earlier.spec.get("dataset") != spec.dataset:
        raise InvalidSpec(f"job {ws.from_job} tuned dataset {earlier.spec.get('dataset')!r}, "
                          f"not {spec.dataset!r}", field="warm_start.from_job")
    done = [t for t in study_trials(db, earlier)
            if t.state == TrialState.COMPLETE and t.value is not None
            and not t.user_attrs.get("audited")]
    done.sort(key=lambda t: t.value, reverse=spec.direction == "maximize")
    configs = []
    for t in done:
        cfg = {k: v for k, v in t.params.items() if in_space(spec.search_space, k, v)}
        if cfg and cfg not in configs:
            configs.append(cfg)
        if len(configs) >= ws.top_k:
            break
    return configs


def create_job(db: Database, owner: str, spec: JobSpec,
               on_insert: Callable[[Any, int], None] | None = None) -> Job:
    """Store a queued job and create its study, with the spec as study attributes.

    Crash-safe: a process that dies after the job's row is committed leaves a queued job
    without a study, which the reaper finishes after HPTUNE_CREATION_GRACE_SECONDS
    (repair_half_created). Both create the study under the job's lock, so only one does.
    """
    check_spec(db, owner, spec)
    if spec.timeout_seconds is None:
        # Stored in the spec, so the job and its report say when it will end.
        spec = spec.model_copy(update={"timeout_seconds": min(
            db.settings.default_timeout_seconds, db.settings.max_timeout_seconds)})
    warm = warm_start_configs(db, owner, spec)
    with db.owner_session(owner) as s:
        _check_quota(db, s, owner, spec)
        if isinstance(spec.dataset, int):
            from service.datasets import dataset_exists

            # Again under the owner's lock, which datasets.delete_dataset holds too.
            if not dataset_exists(s, spec.dataset):
                raise InvalidSpec(f"no dataset with id {spec.dataset}", field="dataset")
        job = Job(owner=owner, name=spec.name, spec=spec.model_dump(mode="json"),
                  status=JobStatus.QUEUED, n_trials=spec.n_trials, reserved=0, claims=0)
        s.add(job)
        s.flush()
        job_id = job.id
        if on_insert is not None:
            # In the insert's transaction (idempotency.Claim.record): both commit, or neither.
            on_insert(s, job_id)
        _crash_point(db, "before_row")
    _crash_point(db, "after_row")
    with db.job_lock(job_id):
        try:
            create_job_study(db, job_id, owner, spec, warm)
        except Exception:
            _discard_job(db, job_id)
            raise
    return get_job(db, None, job_id)


def create_job_study(db: Database, job_id: int, owner: str, spec: JobSpec,
                      warm: list[dict[str, Any]], *, repaired: bool = False) -> str:
    """Create job `job_id`'s study and store its name in the job; the caller holds the lock.

    A study that create_study finished for this spec is kept (its creator died before storing
    the name); a half-made one is deleted and made again. Retried whole on transient errors.
    """
    name = study_name_for(job_id)
    attrs = {"job_id": job_id, "job_name": spec.name, "owner": owner,
             "dataset": spec.dataset, "n_trials": spec.n_trials}

    def ensure() -> None:
        ready = study_is_ready(db.storage, name, spec)
        if ready:
            return
        if ready is False:
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=name, storage=db.storage)
        try:
            create_study(spec, db.storage, name, attrs, warm, load_if_exists=False,
                         on_created=lambda: _crash_point(db, "after_study"))
        except optuna.exceptions.DuplicatedStudyError:
            # Made meanwhile by a process outside the job's lock: kept only once finished.
            if not study_is_ready(db.storage, name, spec):
                raise Conflict(f"study {name!r} is being created by another process") from None

    DB_RETRY(ensure)
    if repaired:  # both storage calls ride out outages themselves (ResilientRDBStorage)
        db.storage.set_study_user_attr(db.storage.get_study_id_from_name(name), "repaired", True)
    _crash_point(db, "after_create_study")

    def store() -> None:
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.study_name.is_(None))
                      .values(study_name=name))
    DB_RETRY(store)
    return name


def _discard_job(db: Database, job_id: int) -> None:
    """Undo a creation that failed (the caller holds the job's lock): its study, then its row.

    Best effort: if the database is down, the half-created job stays, and the reaper finishes
    it once the database is back (repair_half_created).
    """
    try:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=study_name_for(job_id), storage=db.storage)
        with db.session() as s:
            s.execute(delete(Job).where(Job.id == job_id, Job.study_name.is_(None)))
    except Exception as exc:
        log.warning("job %s: could not undo its failed creation (%s); the reaper will finish "
                    "creating it", job_id, exc)


def _crash_point(db: Database, step: str) -> None:
    """Fault injection for tests (HPTUNE_TEST_CRASH_IN_CREATE): die at `step` of job creation
    as a killed process would, with no cleanup."""
    if db.settings.test_crash_in_create == step:
        log.error("HPTUNE_TEST_CRASH_IN_CREATE: exiting at %s", step)
        os._exit(1)


def get_job(db: Database, owner: str | None, job_id: int) -> Job:
    """The job, if `owner` may see it (None means any owner)."""
    return get_owned(db, Job, owner, job_id, "job")


def list_jobs(db: Database, owner: str | None, limit: int = 100, offset: int = 0,
              after: int | None = None) -> tuple[list[Job], int]:
    """`owner`'s jobs (None: every owner's), newest first: at most `limit` of them, with ids
    below the cursor `after` when given, and the count of all of them."""
    with db.session() as s:
        q = select(Job)
        n = select(func.count()).select_from(Job)
        if owner is not None:
            q, n = q.where(Job.owner == owner), n.where(Job.owner == owner)
        if after is not None:
            q = q.where(Job.id < after)
        rows = list(s.scalars(q.order_by(Job.id.desc()).limit(limit).offset(offset)))
        return rows, int(s.scalar(n) or 0)


class StudyMissing(NotFound):
    """A job's study is gone from Optuna's tables (deleted or renamed outside hptune)."""


def load_job_study(db: Database, job: Job) -> optuna.Study:
    """The job's Optuna study, or StudyMissing (404) if it no longer exists.

    Not retried here: the storage's reads ride out outages themselves (ResilientRDBStorage).
    """
    name = job.study_name
    try:
        return optuna.load_study(study_name=name, storage=db.storage)
    except KeyError:
        raise StudyMissing(f"job {job.id}'s study {name!r} no longer exists "
                           "(deleted or renamed outside hptune)") from None


def study_trials(db: Database, job: Job) -> list[FrozenTrial]:
    """The job's trials as Optuna stores them (empty before its study exists)."""
    if not job.study_name:
        return []
    study = load_job_study(db, job)
    return study.get_trials(deepcopy=False)


def trial_summaries(db: Database, study_names: list[str | None], session: Any = None
                    ) -> dict[str, dict[str, Any]]:
    """Per study name (None, a job without a study yet, is skipped): counts by state and the
    best COMPLETE value (max and min).

    Reads through `session` when given (one that holds a lock must not wait for a second
    pooled connection), else through a session of its own, retried.
    """
    names = [n for n in study_names if n]
    out: dict[str, dict[str, Any]] = {n: {"counts": counts([]), "max": None, "min": None}
                                      for n in names}
    if not names:
        return out

    rows = (trial_store.trial_summary_rows(db, names, session) if session is not None
            else DB_RETRY(trial_store.trial_summary_rows, db, names))
    for row in rows:
        _add_to_summary(out[row.study], row.state, row.n, row.best_max, row.best_min)
    return out


_COUNT_KEYS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed",
               "RUNNING": "running", "WAITING": "waiting"}


def _add_to_summary(entry: dict[str, Any], state: str, n: int, best_max: float | None,
                    best_min: float | None) -> None:
    entry["counts"][_COUNT_KEYS[state]] = int(n)
    if state == "COMPLETE":
        entry["max"], entry["min"] = best_max, best_min


def job_view(db: Database, owner: str | None, job_id: int) -> dict[str, Any]:
    """`job_public(db, get_job(db, owner, job_id))` (NotFound alike), read in one query."""
    found = DB_RETRY(trial_store.job_summary, db, job_id)
    if found is None or (owner is not None and found[0].owner != owner):
        raise NotFound(f"no job {job_id}")
    job, by_state, best = found
    summary: dict[str, Any] = {"counts": counts([]), "max": None, "min": None}
    for row in by_state:
        _add_to_summary(summary, row.trial_state, row.n, None, None)
    if summary["counts"]["complete"] and best is not None:
        summary["max"], summary["min"] = best.best_max, best.best_min
    return job_public(db, job, summary)  # the row has a Job's attributes


def job_public(db: Database, job: Job, summary: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """A job with its counts by trial state, as the REST API shows it."""
    if summary is None:
        summary = trial_summaries(db, [job.study_name]).get(job.study_name or "", {
            "counts": counts([]), "max": None, "min": None})
    c = summary["counts"]
    maximize = metric_direction(job.spec.get("metric", Metric.VAL_ACCURACY)) == Direction.MAXIMIZE
    best = summary["max"] if maximize else summary["min"]
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
        "created_at": as_utc(job.created_at),
        "started_at": as_utc(job.started_at),
        "finished_at": as_utc(job.finished_at),
        "spec": job.spec,
    }


def jobs_public(db: Database, jobs_: list[Job]) -> list[dict[str, Any]]:
    """Several jobs with one summary query for all of them."""
    summaries = trial_summaries(db, [j.study_name for j in jobs_])
    return [job_public(db, j, summaries.get(j.study_name or "")) for j in jobs_]


def cancel_job(db: Database, owner: str | None, job_id: int) -> Job:
    """Stop handing out the job's trials; running ones stop within an epoch."""
    get_job(db, owner, job_id)
    with db.session() as s:
        res = s.execute(
            update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
            .values(status=JobStatus.CANCELLED, finished_at=utcnow())
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
    # A job cancelled before its creation was finished may have a half-made study.
    name = job.study_name or study_name_for(job.id)
    with contextlib.suppress(KeyError):
        DB_RETRY(optuna.delete_study, study_name=name, storage=db.storage)
    from service.artifacts import delete_job_artifacts

    DB_RETRY(delete_job_artifacts, db, job_id)
    with db.session() as s:
        s.execute(delete(job_stats).where(job_stats.c.job_id == job_id))
        s.delete(s.get(Job, job_id))


def job_trials_page(db: Database, owner: str | None, job_id: int, after: int | None,
                    limit: int) -> tuple[list[dict[str, Any]], int, bool]:
    """One page of the job's trials as the REST API shows them: at most `limit` numbered
    above `after`, in number order; with the job's trial count and whether more follow.
    Reads the page and the count in one query (trial_store.read_page), never the study."""
    job = get_job(db, owner, job_id)
    if not job.study_name:
        return [], 0, False
    name = job.study_name
    page = DB_RETRY(trial_store.read_page, db, name, -1 if after is None else after, limit + 1)
    if page is None:  # a study deleted outside hptune is a 404, as load_job_study says
        raise StudyMissing(f"job {job.id}'s study {name!r} no longer exists "
                           "(deleted or renamed outside hptune)")
    more = len(page.trials) > limit
    rows = [trial_to_dict(t, page.retried_as.get(t.number)) for t in page.trials[:limit]]
    return rows, page.total, more

