"""The reaper: fails trials whose worker died, queues their retries, settles job statuses and
finishes creating jobs whose creator died."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError
from sqlalchemy import select

from search import ATTR_STOP_CAUSE, JobSpec, StopCause
from search.study import ATTR_STOP_REASON
from service import trial_store
from service.db import Database
from service.errors import DatabaseUnavailable, InvalidSpec, NotFound
from service.jobs import (
    StudyMissing,
    create_job_study,
    get_job,
    load_job_study,
    warm_start_configs,
)
from service.models import Job, as_utc, utcnow
from service.procs import WORKER_PROCESS_ATTR, process_gone
from service.retry import DB_RETRY, is_transient
from service.scheduler import job_status, refresh_job, retry_failed_trial, set_status
from service.status import ACTIVE, TERMINAL, JobStatus
from trainer import StopReason

log = logging.getLogger("hptune.jobs")


# After an outage the reaper waits this many heartbeat intervals (plus a second) before it
# fails trials as stale: live workers need a moment to record their next beat.
REAP_QUIET_INTERVALS = 2


def creation_abandoned(db: Database, job: Job) -> bool:
    """Whether `job` is queued without a study for longer than the creation grace: the
    remains of a creation whose process died, for repair_half_created to finish."""
    if job.study_name or job.status != JobStatus.QUEUED or job.created_at is None:
        return False
    age_s = (utcnow() - as_utc(job.created_at)).total_seconds()
    return age_s > db.settings.creation_grace_seconds


def repair_half_created(db: Database, job_id: int) -> bool:
    """Finish creating a job whose creator died between storing its row and its study's name.

    The study is created from the stored spec (warm-start configurations recomputed as
    create_job does), a half-made one is made again, a finished one is adopted; the study
    says `repaired: true`. A spec that no longer validates fails the job with the reason.
    Returns True if it repaired the job.
    """
    with db.job_lock(job_id):
        try:
            job = get_job(db, None, job_id)
        except NotFound:
            return False
        if not creation_abandoned(db, job):
            return False  # created meanwhile, cancelled, or not old enough
        try:
            spec = JobSpec.model_validate(job.spec)
            warm = warm_start_configs(db, job.owner, spec)
        except (ValidationError, InvalidSpec) as exc:
            reason = exc.message if isinstance(exc, InvalidSpec) else str(exc)
            log.warning("job %s: its creation was interrupted and cannot be finished: %s",
                        job_id, reason)
            set_status(db, job_id, JobStatus.FAILED,
                        f"job creation was interrupted and cannot be finished: {reason}")
            return False
        name = create_job_study(db, job_id, job.owner, spec, warm, repaired=True)
    log.warning("job %s: finished its interrupted creation (study %s)", job_id, name)
    return True


def active_job_ids(db: Database) -> list[int]:
    def attempt() -> list[int]:
        with db.session() as s:
            return list(s.scalars(select(Job.id).where(Job.status.in_(ACTIVE))))
    return DB_RETRY(attempt)


def fail_trial(db: Database, study: optuna.Study, trial_id: int,
               reason: StopReason | None = None, error: str | None = None) -> bool:
    """Mark a RUNNING or WAITING trial FAIL; True if this call did it (and nobody else)."""
    storage = trial_store.storage_of(study)
    try:
        if reason:
            storage.set_trial_user_attr(trial_id, ATTR_STOP_REASON, reason)
        if error:
            storage.set_trial_user_attr(trial_id, "error", error[:500])
        return bool(storage.set_trial_state_values(trial_id, state=TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _reap_quiet(db: Database) -> bool:
    """False shortly after this process saw the database down: live workers have not beaten
    again yet, and their trials must not be failed for the outage's silence."""
    quiet_s = REAP_QUIET_INTERVALS * db.settings.heartbeat_interval + 1.0
    return db.seconds_since_outage() > quiet_s


def _reap_job(db: Database, job: Job) -> None:
    """Fail the job's dead trials and queue their retries.

    Looked for without the job's lock; only when something is found are the trials failed
    and their retries queued, under one hold of that lock: a claim cannot take a failed
    trial's slot with a fresh sample before its retry is queued (the lock is re-entrant, so
    retry_failed_trial takes it again). A round that finds nothing holds no lock.
    """
    # Optuna storage calls ride out outages themselves (ResilientRDBStorage); plain SQL goes
    # through DB_RETRY.
    if DB_RETRY(trial_store.running_and_failed, db, job.study_name) == (0, 0):
        return  # nothing running, nothing failed: most rounds for most jobs, in one query
    study = load_job_study(db, job)  # StudyMissing if the study is gone
    dead = _dead_trials(db, job, study)
    if not dead and not _unretried_failures(db, job, study):
        return
    with db.job_lock(job.id):
        for trial_id, error in dead.items():
            fail_trial(db, study, trial_id, error=error)
        for t in _unretried_failures(db, job, study):  # the ones just failed among them
            retry_failed_trial(db, study, t)


def _trials(db: Database, study: optuna.Study, state: TrialState) -> list[FrozenTrial]:
    """The study's trials in `state`, selected by state in the database. A round loads each
    job's study afresh, and that study's own (cached) storage reads every trial of the study
    on its first read: with 8 workers each reaping every few seconds, that read was a third
    of a short trial's worker CPU, and it grew with the job."""
    return db.storage.get_all_trials(trial_store.study_id(study), deepcopy=False,
                                     states=(state,))


def _dead_trials(db: Database, job: Job, study: optuna.Study) -> dict[int, str]:
    """{trial id: why} of the job's RUNNING trials whose worker is dead: its process is gone
    (seen from this host: no grace), its heartbeat stopped (the grace period), or it never
    beat at all (died right after creating the trial)."""
    import datetime as _dt

    dead: dict[int, str] = {}
    if db.settings.reap_gone_processes:
        for t in _trials(db, study, TrialState.RUNNING):
            identity = t.system_attrs.get(WORKER_PROCESS_ATTR)
            if identity and process_gone(identity):
                dead[trial_store.trial_id(t)] = "its worker process is gone"
    for trial_id in trial_store.stale_trial_ids(study):
        dead.setdefault(trial_id, "its heartbeat stopped for the grace period")
    grace = _dt.timedelta(seconds=db.settings.grace_period)
    for trial_id in DB_RETRY(trial_store.running_trials_without_heartbeat, db, job.study_name):
        t = trial_store.storage_of(study).get_trial(trial_id)
        if t.datetime_start is not None and _dt.datetime.now() - t.datetime_start > grace:
            dead.setdefault(trial_id, "the worker died before its first heartbeat")
    return dead


def _unretried_failures(db: Database, job: Job, study: optuna.Study) -> list[FrozenTrial]:
    """FAIL trials of an active job without a retry: just failed, or a worker or reaper died
    between failing one and queueing its retry, or a retry found no free slot then. Chains
    at their retry limit are left alone (their slot goes to a fresh sample)."""
    if job.status not in ACTIVE:
        return []
    retried = DB_RETRY(trial_store.retried_trial_numbers, db, job.study_name)
    failed = _trials(db, study, TrialState.FAIL)
    handed_back = {t.number for t in failed
                   if t.user_attrs.get(ATTR_STOP_CAUSE) == StopCause.HANDED_BACK}
    out = []
    for t in failed:
        if t.number in retried:
            continue
        chain = [*(t.system_attrs.get("retry_history") or []), t.number]
        if len(chain) > db.settings.max_trial_retries + len(handed_back.intersection(chain)):
            continue
        out.append(t)
    return out


def _settle_ended_jobs(db: Database) -> None:
    """Jobs that ended (cancelled, timed out, failed) keep no RUNNING or WAITING trials: stale
    running ones are failed once their heartbeat stops, queued retries are failed at once."""
    names = DB_RETRY(trial_store.studies_with_unfinished_trials, db)
    if not names:
        return
    with db.session() as s:
        ended = list(s.scalars(select(Job).where(Job.study_name.in_(names),
                                                 Job.status.in_(TERMINAL))))
    for job in ended:
        with _one_job(db, job.id), db.job_lock(job.id):
            if job_status(db, job.id) not in TERMINAL:
                continue  # resumed or extended since (service.lifecycle): its retries run
            study = load_job_study(db, job)
            _reap_job(db, job)
            for t in _trials(db, study, TrialState.WAITING):
                fail_trial(db, study, trial_store.trial_id(t), reason=StopReason.CANCELLED,
                           error=f"job {job.status} before this retry ran")


@contextlib.contextmanager
def _one_job(db: Database, job_id: int) -> Iterator[None]:
    """Reap one job so that its failure cannot stop the round: a job whose study is gone is
    failed with the reason, any other error is logged and the round goes on. Outages still
    end the round (every job would fail the same way)."""
    try:
        yield
    except StudyMissing as exc:
        log.warning("job %s: %s", job_id, exc.message)
        set_status(db, job_id, JobStatus.FAILED, exc.message)
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        log.exception("reaping job %s failed; the round goes on", job_id)


def reap(db: Database) -> int:
    """Fail trials whose worker died, queue their retries, settle job statuses and timeouts,
    and finish creating jobs whose creator died (repair_half_created).

    Needs no live worker: the API process runs it every few seconds, idle workers too. Just
    after this process saw an outage it waits for live workers to beat again before failing
    anything. Returns the number of active jobs looked at.
    """
    try:
        ids = active_job_ids(db)
    except Exception:
        db.note_outage()
        raise
    quiet = _reap_quiet(db)
    for job_id in ids:
        with _one_job(db, job_id):
            job = get_job(db, None, job_id)
            if creation_abandoned(db, job):
                repair_half_created(db, job_id)
            if job.study_name and quiet:
                _reap_job(db, job)
            refresh_job(db, job_id)
    if quiet:
        _settle_ended_jobs(db)
    return len(ids)
