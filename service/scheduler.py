"""The workers' side of jobs: fair choice of the next job, trial slots, job statuses, the crash
limit and the retry of failed trials."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import func, select, update

from search import ATTR_STOP_CAUSE, JobSpec, StopCause
from service import trial_store
from service.db import Database
from service.jobs import get_job, study_trials
from service.models import Job, utcnow
from service.retry import DB_RETRY
from service.status import ACTIVE, JobStatus
from service.trial_store import SLOT_STATES

# Exact trial counts. A trial holds one of its job's n_trials slots while it is RUNNING,
# COMPLETE or PRUNED (trial_store.SLOT_STATES); FAIL and WAITING trials hold none. Every step
# that adds such a trial runs under the job's lock (db.job_lock): a claim counts the slots in
# use and, only if one is free, asks Optuna for the trial (popping a queued retry first); queueing a
# retry needs a free slot too. Steps that take a slot away (a trial failing) need no lock.
# So RUNNING + COMPLETE + PRUNED + WAITING never exceeds n_trials, the job ends with exactly
# n_trials finished, and the count is read from the trials themselves: nothing to leak when a
# worker dies between two statements.

# Trials whose worker stopped early carry the trial user attribute `stop_cause`
# (search.ATTR_STOP_CAUSE, a search.StopCause): `handed_back` on SIGTERM, retried without
# using up the retry limit, or `timed_out` when the job timed out. Their stop_reason says
# `cancelled`: they ended on request.


@dataclass(frozen=True)
class Claim:
    """One trial slot of one job, handed to one worker."""

    job_id: int
    spec: JobSpec
    study_name: str
    # Distinct for every claim of the job: seeds the sampler so parallel workers differ.
    claim_number: int
    # Wall-clock time (Unix seconds) after which the job times out, if its spec says so.
    deadline: float | None = None


@dataclass(frozen=True)
class Candidate:
    """An active job that had a free slot when last looked at."""

    job_id: int
    spec: JobSpec
    study_name: str
    owner: str | None = None


def _as_utc_timestamp(dt: Any) -> float:
    from datetime import UTC

    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def job_deadline(spec: JobSpec | dict[str, Any], started_at: Any) -> float | None:
    """When a job with `timeout_seconds` times out (Unix seconds): its first claim + timeout."""
    timeout = spec.get("timeout_seconds") if isinstance(spec, dict) else spec.timeout_seconds
    if not timeout or started_at is None:
        return None
    return _as_utc_timestamp(started_at) + float(timeout)


def claimable_jobs(db: Database, limit: int = 50) -> list[Candidate]:
    """Active jobs with a free slot, fairest first (a hint: claim_slot re-checks under lock).

    Fair across owners: first the jobs of the owner with the fewest RUNNING trials over all
    its active jobs, then the job with the fewest running trials of its own, then the oldest.
    Workers pick again after every trial, so an owner's huge job queued first takes no more
    than its share of the workers once another owner's job waits.
    """
    def attempt() -> list[Candidate]:
        with db.session() as s:
            rows = s.execute(
                select(Job.id, Job.owner, Job.spec, Job.study_name, Job.n_trials)
                .where(Job.status.in_(ACTIVE), Job.study_name.is_not(None))
            ).all()
        counts = trial_store.slots_and_running(db, [r.study_name for r in rows])
        owner_running: dict[str, int] = {}
        for r in rows:
            owner_running[r.owner] = (owner_running.get(r.owner, 0)
                                      + counts.get(r.study_name, (0, 0))[1])
        free = [r for r in rows if counts.get(r.study_name, (0, 0))[0] < r.n_trials]
        free.sort(key=lambda r: (owner_running[r.owner], counts.get(r.study_name, (0, 0))[1],
                                 r.id))
        return [Candidate(r.id, JobSpec.model_validate(r.spec), r.study_name, r.owner)
                for r in free[:limit]]
    return DB_RETRY(attempt)


def claim_slot(db: Database, job_id: int) -> Claim | None:
    """Take one of the job's slots if one is free; None if the job is full or not active.

    A job past its crash limit (see refresh_job) is failed here rather than given a slot.

    The caller must hold `db.job_lock(job_id)` from before this call until its trial exists
    in the study (Optuna's ask returned), so that no other claim counts in between.
    """
    import time as _time

    def attempt() -> Claim | None:
        with db.session() as s:
            job = s.execute(select(Job.status, Job.n_trials, Job.study_name, Job.spec,
                                   Job.started_at).where(Job.id == job_id)).first()
        if job is None or job.status not in ACTIVE or not job.study_name:
            return None
        deadline = job_deadline(job.spec, job.started_at)
        if deadline is not None and _time.time() >= deadline:
            refresh_job(db, job_id)  # timed out: no new trial starts
            return None
        counts = trial_store.trial_state_counts(db, job.study_name)
        # A job past its crash limit starts nothing more: without this check, claims racing
        # the reaper's refresh could keep sampling trials that crash.
        if (counts.get("FAIL", 0) > _crash_limit(db, job.n_trials)
                and refresh_job(db, job_id) not in ACTIVE):
            return None
        in_use = sum(counts.get(state, 0) for state in SLOT_STATES)
        if in_use >= job.n_trials:
            return None
        with db.session() as s:
            row = s.execute(
                update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
                .values(reserved=in_use + 1, claims=Job.claims + 1, status=JobStatus.RUNNING,
                        started_at=func.coalesce(Job.started_at, utcnow()))
                .returning(Job.spec, Job.study_name, Job.claims, Job.started_at)
                .execution_options(synchronize_session=False)
            ).first()
        if row is None:
            return None
        spec = JobSpec.model_validate(row.spec)
        return Claim(job_id, spec, row.study_name, row.claims,
                     job_deadline(spec, row.started_at))

    return DB_RETRY(attempt)


def release_slot(db: Database, job_id: int) -> None:
    """Bring the job's `reserved` column up to date with its trials (it is informational:
    slots are counted from the trials themselves)."""
    def attempt() -> None:
        with db.session() as s:
            name = s.scalar(select(Job.study_name).where(Job.id == job_id))
        if not name:
            return
        n = trial_store.slots_in_use(db, [name]).get(name, 0)
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(reserved=n))
    DB_RETRY(attempt)


def job_status(db: Database, job_id: int) -> str | None:
    """The job's status, read fresh (workers poll it to stop cancelled trials)."""
    def attempt() -> str | None:
        with db.session() as s:
            return s.scalar(select(Job.status).where(Job.id == job_id))
    return DB_RETRY(attempt)


def set_status(db: Database, job_id: int, status: JobStatus, error: str | None,
               n_trials: int | None = None) -> None:
    """End an active job with `status` and `error`; a job already ended is left as it is, and
    so is one whose n_trials is no longer `n_trials` when given (extended meanwhile)."""
    def attempt() -> None:
        q = update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
        if n_trials is not None:
            q = q.where(Job.n_trials == n_trials)
        with db.session() as s:
            s.execute(q.values(status=status, error=error[:1000] if error else None,
                               finished_at=utcnow()))
    DB_RETRY(attempt)


def _crash_limit(db: Database, n_trials: int) -> int:
    """Crashed trials a job may have; one more fails it (every trial and all its retries)."""
    return n_trials * (db.settings.max_trial_retries + 1)


def refresh_job(db: Database, job_id: int) -> str | None:
    """Settle an active job's status from its trials and clock.

    `succeeded` once exactly n_trials are COMPLETE or PRUNED and none runs or waits;
    `failed` with error "timed out ..." once `timeout_seconds` have passed since its first
    claim (running trials then stop within an epoch, finished ones stay in the report);
    `failed` when crashing trials exceed n_trials x (max_trial_retries + 1), so a job whose
    trials all crash (a poison search space) ends instead of looping.
    """
    import time as _time

    job = get_job(db, None, job_id)
    if job.status not in ACTIVE:
        return job.status
    c = (DB_RETRY(trial_store.trial_state_counts, db, job.study_name) if job.study_name
         else {})
    finished = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
    new = error = None
    deadline = job_deadline(job.spec, job.started_at)
    if (finished >= job.n_trials and c.get("RUNNING", 0) == 0
            and c.get("WAITING", 0) == 0):
        new = JobStatus.SUCCEEDED
    elif deadline is not None and _time.time() >= deadline:
        new = JobStatus.FAILED
        error = (f"timed out after {job.spec.get('timeout_seconds'):g} s with {finished} of "
                 f"{job.n_trials} trials finished")
    elif c.get("FAIL", 0) > _crash_limit(db, job.n_trials):
        crashed = [t for t in study_trials(db, job) if t.state == TrialState.FAIL
                   and t.user_attrs.get(ATTR_STOP_CAUSE) != StopCause.HANDED_BACK]
        if len(crashed) > _crash_limit(db, job.n_trials):
            new, error = JobStatus.FAILED, f"{len(crashed)} trials failed"
    if new:
        # Settled from the trials counted against this n_trials: an extension that committed
        # since (service.lifecycle, under the job's lock) keeps the job active.
        set_status(db, job_id, new, error, n_trials=job.n_trials)
        return new
    return job.status


def fail_job(db: Database, job_id: int, error: str) -> None:
    """End a job that cannot run (its dataset will not load, say)."""
    set_status(db, job_id, JobStatus.FAILED, error)


def _retry_of(trial: FrozenTrial) -> int | None:
    """The number of the trial that `trial` retries directly, if it is a retry."""
    history = trial.system_attrs.get("retry_history") or []
    return int(history[-1]) if history else None


def retry_failed_trial(db: Database, study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue a failed trial's parameters again (a WAITING trial the next claim pops).

    Idempotent and exactly-once: under the job's lock it does nothing if the trial already has
    a retry, if its job is no longer active, or if no slot is free (the slot already went to a
    fresh trial). The retry carries Optuna's `failed_trial` and `retry_history` system
    attributes (RetryHeartbeatStaleTrialCallback), shown as details.retry_of in the trial
    JSON. A chain is retried at most HPTUNE_MAX_TRIAL_RETRIES times, not counting hand-backs
    (a worker stopped by SIGTERM); past that its slot goes to a freshly sampled trial.
    Returns True when it queued a retry.
    """
    import copy

    job_id = int(study.user_attrs["job_id"])
    with db.job_lock(job_id):
        def attempt() -> bool:
            with db.session() as s:
                job = s.execute(select(Job.status, Job.n_trials)
                                .where(Job.id == job_id)).first()
            if job is None or job.status not in ACTIVE:
                return False
            trials = study.get_trials(deepcopy=False)
            by_number = {t.number: t for t in trials}
            current = by_number.get(trial.number, trial)
            if current.state != TrialState.FAIL:
                return False
            if any(_retry_of(t) == trial.number for t in trials):
                return False
            held = sum(t.state in (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED,
                                   TrialState.WAITING) for t in trials)
            if held >= job.n_trials:
                return False
            chain = [*(current.system_attrs.get("retry_history") or []), trial.number]
            handed_back = sum(
                1 for n in chain if n in by_number
                and by_number[n].user_attrs.get(ATTR_STOP_CAUSE) == StopCause.HANDED_BACK
            )
            template = copy.deepcopy(current)
            # The retry starts clean: only the spec's fixed values carry over, not the failed
            # run's reason, error or curves.
            template.user_attrs = {k: v for k, v in current.user_attrs.items()
                                   if k.startswith("fixed_")}
            n_before = len(trials)
            optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=db.settings.max_trial_retries + handed_back
            )(study, template)
            return len(study.get_trials(deepcopy=False)) > n_before

        queued = DB_RETRY(attempt)
    if queued:
        release_slot(db, job_id)
    return queued


def open_database(settings: Any, *, role: str = "api", retry_seconds: float | None = None
                  ) -> Database:
    """A Database whose storage retries trials that the heartbeat found dead.

    Workers pass role="worker" and retry_seconds=settings.db_retry_seconds, so they ride out
    outages; the API keeps the short default and answers 503 instead.
    """
    from service.db import API_RETRY_SECONDS

    return Database(settings, stale_trial_callback=retry_failed_trial, role=role,
                    retry_seconds=API_RETRY_SECONDS if retry_seconds is None else retry_seconds)
