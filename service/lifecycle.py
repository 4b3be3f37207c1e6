"""A job after its creation: extend it to more trials, or resume it once cancelled.

Both keep the job's Optuna study, so its trials (and with them the sampler's history) stay as
they are, and both change the job's row under the job's lock (db.job_lock): the lock every
claim counts the job's slots under (service/scheduler.py). A claim sees the old n_trials or
the new one, never half a change, so the slot protocol still ends the job with exactly
n_trials COMPLETE or PRUNED trials, whatever the number of workers. The spec's checks and the
owner's quotas are those of a creation (service/jobs.py), the quotas counted under the
owner's lock in the transaction that writes the row, as create_job counts them.

A job made active again (a succeeded job extended, a cancelled one resumed) is `queued`
without `started_at`: its next claim starts it, and with it a fresh timeout window
(scheduler.job_deadline counts `timeout_seconds` from started_at).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy import ColumnElement, case, null, update

from search import JobSpec
from service import jobs
from service.db import Database
from service.errors import Conflict, InvalidSpec, one_line
from service.job_checks import check_spec
from service.models import Job
from service.status import ACTIVE, JobStatus

log = logging.getLogger("hptune.jobs")

# A job may be extended while it waits or runs, and once it has succeeded (it runs again).
EXTENDABLE: tuple[JobStatus, ...] = (*ACTIVE, JobStatus.SUCCEEDED)


def extend_job(db: Database, owner: str | None, job_id: int, n_trials: int
               ) -> dict[str, Any]:
    """Raise job `job_id`'s n_trials to `n_trials` and return the job as GET /jobs/{id} does.

    A queued or running job keeps its status; a succeeded one is queued again. NotFound for a
    job `owner` may not see (None: any owner's); InvalidSpec (422) for n_trials not above the
    job's or over the limits a submission has; QuotaExceeded (429) past the owner's quotas;
    Conflict (409) for a cancelled job (resume it first) or a failed one.
    """
    jobs.get_job(db, owner, job_id)
    with db.job_lock(job_id):
        job = jobs.get_job(db, None, job_id)
        if job.status not in EXTENDABLE:
            raise _not_extendable(job)
        if n_trials <= job.n_trials:
            raise InvalidSpec(f"n_trials must be more than job {job_id}'s {job.n_trials} to "
                              "extend it", field="n_trials")
        spec = _spec_with(job, n_trials)
        check_spec(db, job.owner, spec)
        reopen = Job.status == JobStatus.SUCCEEDED
        changed = _update_row(
            db, job, spec, Job.status.in_(EXTENDABLE) & (Job.n_trials == job.n_trials),
            {"n_trials": n_trials, "spec": {**job.spec, "n_trials": n_trials},
             "status": case((reopen, JobStatus.QUEUED.value), else_=Job.status),
             "started_at": case((reopen, null()), else_=Job.started_at),
             "finished_at": None, "error": None})
        if not changed:  # cancelled or failed meanwhile (neither takes the job's lock)
            raise _not_extendable(jobs.get_job(db, None, job_id))
        _show_in_study(db, job, n_trials)
    log.info("job %s extended from %s to %s trials", job_id, job.n_trials, n_trials)
    return jobs.job_public(db, jobs.get_job(db, owner, job_id))


def resume_job(db: Database, owner: str | None, job_id: int) -> dict[str, Any]:
    """Make cancelled job `job_id` active again and return it as GET /jobs/{id} does.

    Its study is kept: the trials that the cancel stopped stay FAIL (stop reason
    `cancelled`) and hold no slot, so the job runs on to exactly n_trials finished. Queued
    again with a fresh timeout window. NotFound for a job `owner` may not see; Conflict (409)
    for a job in any other status; InvalidSpec (422) and QuotaExceeded (429) as a submission
    of its spec would get them.
    """
    jobs.get_job(db, owner, job_id)
    with db.job_lock(job_id):
        job = jobs.get_job(db, None, job_id)
        if job.status != JobStatus.CANCELLED:
            raise _not_resumable(job)
        spec = _spec_with(job, job.n_trials)
        check_spec(db, job.owner, spec)
        if not _update_row(db, job, spec, Job.status == JobStatus.CANCELLED,
                           {"status": JobStatus.QUEUED.value, "started_at": None,
                            "finished_at": None, "error": None}):
            raise _not_resumable(jobs.get_job(db, None, job_id))
    log.info("job %s resumed", job_id)
    return jobs.job_public(db, jobs.get_job(db, owner, job_id))


def _not_extendable(job: Job) -> Conflict:
    if job.status == JobStatus.CANCELLED:
        return Conflict(f"job {job.id} is cancelled: resume it first (POST "
                        f"/api/v1/jobs/{job.id}/resume), then extend it")
    return Conflict(f"job {job.id} is {job.status}: only a queued, running or succeeded job "
                    "can be extended; submit a new job (warm_start.from_job starts it from "
                    "this one's best trials)")


def _not_resumable(job: Job) -> Conflict:
    hint = (f"; extend it to run more trials (PATCH /api/v1/jobs/{job.id} with n_trials)"
            if job.status == JobStatus.SUCCEEDED else "")
    return Conflict(f"job {job.id} is {job.status}: only a cancelled job can be resumed{hint}")


def _spec_with(job: Job, n_trials: int) -> JobSpec:
    """The job's stored spec with `n_trials`, validated as a submission's is."""
    try:
        return JobSpec.model_validate({**job.spec, "n_trials": n_trials})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidSpec(f"job {job.id}'s spec is not valid (any more): {first['msg']}",
                          field=".".join(str(p) for p in first["loc"]) or None) from None


def _update_row(db: Database, job: Job, spec: JobSpec, condition: ColumnElement[bool],
                values: dict[str, Any]) -> bool:
    """Check the owner's quotas for `job` with `spec`, then update its row with `values` if
    `condition` still holds, in one transaction under the owner's lock; whether it did.

    The caller holds the job's lock. The job counts as one active job with its unfinished
    trials (spec.n_trials less those finished), as a new job with that many would.
    """
    from service.datasets import dataset_exists

    with db.owner_session(job.owner) as s:
        name = job.study_name
        counts = jobs.trial_summaries(db, [name], s).get(name or "", {}).get("counts", {})
        finished = counts.get("complete", 0) + counts.get("pruned", 0)
        unfinished = spec.model_copy(update={"n_trials": max(spec.n_trials - finished, 0)})
        jobs._check_quota(db, s, job.owner, unfinished, job_id=job.id)
        # Under the owner's lock, which datasets.delete_dataset takes to see that no active
        # job uses the dataset: a job made active again must still find its data.
        if isinstance(spec.dataset, int) and not dataset_exists(s, spec.dataset):
            raise InvalidSpec(f"no dataset with id {spec.dataset}", field="dataset")
        result = s.execute(update(Job).where(Job.id == job.id, condition).values(**values)
                           .execution_options(synchronize_session=False))
        return bool(result.rowcount)


def _show_in_study(db: Database, job: Job, n_trials: int) -> None:
    """Copy the new n_trials into the study's user attributes, which optuna-dashboard shows.
    Best effort: the job's row, already committed, is what claims count against."""
    if not job.study_name:
        return
    storage = db.storage
    try:
        study_id = storage.get_study_id_from_name(job.study_name)
        stored = storage.get_study_user_attrs(study_id).get("spec")
        storage.set_study_user_attr(study_id, "n_trials", n_trials)
        if isinstance(stored, dict):
            storage.set_study_user_attr(study_id, "spec", {**stored, "n_trials": n_trials})
    except Exception as exc:
        log.warning("job %s: could not record n_trials %s in its study: %s", job.id, n_trials,
                    one_line(exc))
