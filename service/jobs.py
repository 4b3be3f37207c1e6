"""Jobs: creation, reads, cancellation, and the slot accounting that workers rely on."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError
from sqlalchemy import bindparam, delete, func, select, text, update

from search import (
    JobSpec,
    build_report,
    counts,
    create_study,
    metric_direction,
    study_name_for,
    trial_to_dict,
    trials_to_dicts,
)
from search.datasets import bundled_names
from search.memory import (
    bundled_shape,
    largest_trial_memory,
    megabytes,
    memory_field,
    output_units,
)
from search.spec import in_space
from search.study import sampler_available, study_is_ready
from service.db import SLOT_STATES, Database, is_transient, retrying
from service.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidSpec,
    NotFound,
    QuotaExceeded,
)
from service.models import Job, as_utc, utcnow
from service.procs import WORKER_PROCESS_ATTR, process_gone

log = logging.getLogger("hptune.jobs")

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
        shape = bundled_shape(spec.dataset)
    else:
        from service.datasets import get_dataset

        try:
            row = get_dataset(db, owner, spec.dataset)
        except NotFound:
            raise InvalidSpec(f"no dataset with id {spec.dataset}", field="dataset") from None
        task = row.task
        shape = (row.n_rows, row.n_features, output_units(row.task, row.n_classes))
    missing = sampler_available(spec.sampler.name)
    if missing:
        raise InvalidSpec(missing, field="sampler.name")
    allowed = REGRESSION_METRICS if task == "regression" else CLASSIFICATION_METRICS
    if spec.metric not in allowed:
        raise InvalidSpec(f"metric {spec.metric!r} does not fit a {task} dataset; use one of "
                          f"{', '.join(allowed)}", field="metric")
    _check_trial_memory(s.max_trial_bytes, spec, *shape)


def _check_trial_memory(limit: int, spec: JobSpec, n_rows: int, n_features: int,
                        n_outputs: int) -> None:
    """Refuse a job whose largest trial would need more than `limit` bytes (a worker killed
    for memory would be killed again by every retry), naming the field to shrink."""
    estimate = largest_trial_memory(spec, n_rows, n_features, n_outputs)
    if estimate.total > limit:
        raise InvalidSpec(
            f"a trial of this job may need about {megabytes(estimate.total)} of memory "
            f"(largest part: {estimate.largest_part()}, for {n_rows} rows x {n_features} "
            f"features), more than the limit of {megabytes(limit)} (HPTUNE_MAX_TRIAL_BYTES); "
            "use fewer or narrower layers or smaller batches",
            field=memory_field(spec, estimate))


def _check_quota(db: Database, session: Any, owner: str, spec: JobSpec) -> None:
    """Refuse a job over the owner's quotas; `session` must hold the owner's lock
    (db.owner_session) and insert the job, so that no two submissions count the same room.

    The trial quota counts every trial of the owner's active jobs that has not finished,
    queued or running: a trial that starts still holds its room until it ends.
    """
    s = db.settings
    active = list(session.execute(select(Job.id, Job.n_trials, Job.study_name)
                                  .where(Job.owner == owner, Job.status.in_(ACTIVE))))
    if len(active) + 1 > s.max_active_jobs_per_owner:
        raise QuotaExceeded(f"{owner} already has {len(active)} active jobs "
                            f"(quota {s.max_active_jobs_per_owner})", field="n_trials")
    summaries = trial_summaries(db, [Job(study_name=r.study_name) for r in active], session)
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
    _check_spec(db, owner, spec)
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
                  status="queued", n_trials=spec.n_trials, reserved=0, claims=0)
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
            _create_job_study(db, job_id, owner, spec, warm)
        except Exception:
            _discard_job(db, job_id)
            raise
    return get_job(db, None, job_id)


def _create_job_study(db: Database, job_id: int, owner: str, spec: JobSpec,
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

    retrying(ensure)
    if repaired:
        retrying(lambda: db.storage.set_study_user_attr(
            db.storage.get_study_id_from_name(name), "repaired", True))
    _crash_point(db, "after_create_study")

    def store() -> None:
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.study_name.is_(None))
                      .values(study_name=name))
    retrying(store)
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


def creation_abandoned(db: Database, job: Job) -> bool:
    """Whether `job` is queued without a study for longer than the creation grace: the
    remains of a creation whose process died, for repair_half_created to finish."""
    if job.study_name or job.status != "queued" or job.created_at is None:
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
            _set_status(db, job_id, "failed",
                        f"job creation was interrupted and cannot be finished: {reason}")
            return False
        name = _create_job_study(db, job_id, job.owner, spec, warm, repaired=True)
    log.warning("job %s: finished its interrupted creation (study %s)", job_id, name)
    return True


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


class StudyMissing(NotFound):
    """A job's study is gone from Optuna's tables (deleted or renamed outside hptune)."""


def load_job_study(db: Database, job: Job) -> optuna.Study:
    """The job's Optuna study, or StudyMissing (404) if it no longer exists."""
    name = job.study_name
    try:
        return retrying(lambda: optuna.load_study(study_name=name, storage=db.storage))
    except KeyError:
        raise StudyMissing(f"job {job.id}'s study {name!r} no longer exists "
                           "(deleted or renamed outside hptune)") from None


def study_trials(db: Database, job: Job) -> list[FrozenTrial]:
    """The job's trials as Optuna stores them (empty before its study exists)."""
    if not job.study_name:
        return []
    study = load_job_study(db, job)
    return retrying(lambda: study.get_trials(deepcopy=False))


# Counts and best values come straight from Optuna's tables in one aggregate query: loading
# every trial of every listed job would cost a query per trial attribute. These tables and
# columns (studies, trials.state, trial_values.value) have kept their shape since Optuna 2.
_TRIAL_SUMMARY = text("""
    SELECT s.study_name AS study, t.state AS state, count(*) AS n,
           max(v.value) AS best_max, min(v.value) AS best_min
    FROM studies s
    JOIN trials t ON t.study_id = s.study_id
    LEFT JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0
    WHERE s.study_name IN :names
    GROUP BY s.study_name, t.state
""").bindparams(bindparam("names", expanding=True))


def trial_summaries(db: Database, jobs_: list[Job], session: Any = None
                    ) -> dict[str, dict[str, Any]]:
    """Per study name: counts by state and the best COMPLETE value (max and min).

    Reads through `session` when given (one that holds a lock must not wait for a second
    pooled connection), else through a session of its own, retried.
    """
    names = [j.study_name for j in jobs_ if j.study_name]
    out: dict[str, dict[str, Any]] = {n: {"counts": counts([]), "max": None, "min": None}
                                      for n in names}
    if not names:
        return out

    def attempt() -> list[Any]:
        if session is not None:
            return list(session.execute(_TRIAL_SUMMARY, {"names": names}))
        with db.session() as s:
            return list(s.execute(_TRIAL_SUMMARY, {"names": names}))

    keys = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed",
            "RUNNING": "running", "WAITING": "waiting"}
    for row in (attempt() if session is not None else retrying(attempt)):
        entry = out[row.study]
        entry["counts"][keys[row.state]] = int(row.n)
        if row.state == "COMPLETE":
            entry["max"], entry["min"] = row.best_max, row.best_min
    return out


def job_public(db: Database, job: Job, summary: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """A job with its counts by trial state, as the REST API shows it."""
    if summary is None:
        summary = trial_summaries(db, [job]).get(job.study_name or "", {
            "counts": counts([]), "max": None, "min": None})
    c = summary["counts"]
    maximize = metric_direction(job.spec.get("metric", "val_accuracy")) == "maximize"
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
    summaries = trial_summaries(db, jobs_)
    return [job_public(db, j, summaries.get(j.study_name or "")) for j in jobs_]


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
    # A job cancelled before its creation was finished may have a half-made study.
    name = job.study_name or study_name_for(job.id)
    with contextlib.suppress(KeyError):
        retrying(lambda: optuna.delete_study(study_name=name, storage=db.storage))
    with db.session() as s:
        s.delete(s.get(Job, job_id))


def job_trials(db: Database, owner: str | None, job_id: int) -> list[dict[str, Any]]:
    job = get_job(db, owner, job_id)
    return trials_to_dicts(study_trials(db, job))


def job_report(db: Database, owner: str | None, job_id: int) -> dict[str, Any]:
    job = get_job(db, owner, job_id)
    if not job.study_name:
        raise NotFound(f"job {job_id} has no trials yet")
    study = load_job_study(db, job)
    public = job_public(db, job)
    public.pop("spec")
    return build_report(study, JobSpec.model_validate(job.spec), public)


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


# --- the workers' side ---------------------------------------------------------------------
#
# Exact trial counts. A trial holds one of its job's n_trials slots while it is RUNNING,
# COMPLETE or PRUNED (db.SLOT_STATES); FAIL and WAITING trials hold none. Every step that adds
# such a trial runs under the job's lock (db.job_lock): a claim counts the slots in use and,
# only if one is free, asks Optuna for the trial (popping a queued retry first); queueing a
# retry needs a free slot too. Steps that take a slot away (a trial failing) need no lock.
# So RUNNING + COMPLETE + PRUNED + WAITING never exceeds n_trials, the job ends with exactly
# n_trials finished, and the count is read from the trials themselves: nothing to leak when a
# worker dies between two statements.

# After an outage the reaper waits this many heartbeat intervals (plus a second) before it
# fails trials as stale: live workers need a moment to record their next beat.
REAP_QUIET_INTERVALS = 2
# Trials whose worker stopped early: on SIGTERM (`handed_back`, retried without using up
# the retry limit) or when the job timed out (`timed_out`). Recorded as the trial user
# attribute `stop_cause` (the trial's stop_reason says `cancelled`: it ended on request).
STOP_CAUSE = "stop_cause"
HANDED_BACK = "handed_back"
TIMED_OUT = "timed_out"


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
        counts = db.slots_and_running([r.study_name for r in rows])
        owner_running: dict[str, int] = {}
        for r in rows:
            owner_running[r.owner] = (owner_running.get(r.owner, 0)
                                      + counts.get(r.study_name, (0, 0))[1])
        free = [r for r in rows if counts.get(r.study_name, (0, 0))[0] < r.n_trials]
        free.sort(key=lambda r: (owner_running[r.owner], counts.get(r.study_name, (0, 0))[1],
                                 r.id))
        return [Candidate(r.id, JobSpec.model_validate(r.spec), r.study_name, r.owner)
                for r in free[:limit]]
    return retrying(attempt)


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
        counts = db.trial_state_counts(job.study_name)
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
                .values(reserved=in_use + 1, claims=Job.claims + 1, status="running",
                        started_at=func.coalesce(Job.started_at, utcnow()))
                .returning(Job.spec, Job.study_name, Job.claims, Job.started_at)
                .execution_options(synchronize_session=False)
            ).first()
        if row is None:
            return None
        spec = JobSpec.model_validate(row.spec)
        return Claim(job_id, spec, row.study_name, row.claims,
                     job_deadline(spec, row.started_at))

    return retrying(attempt)


def release_slot(db: Database, job_id: int) -> None:
    """Bring the job's `reserved` column up to date with its trials (it is informational:
    slots are counted from the trials themselves)."""
    def attempt() -> None:
        with db.session() as s:
            name = s.scalar(select(Job.study_name).where(Job.id == job_id))
        if not name:
            return
        n = db.slots_in_use([name]).get(name, 0)
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(reserved=n))
    retrying(attempt)


def job_status(db: Database, job_id: int) -> str | None:
    """The job's status, read fresh (workers poll it to stop cancelled trials)."""
    def attempt() -> str | None:
        with db.session() as s:
            return s.scalar(select(Job.status).where(Job.id == job_id))
    return retrying(attempt)


def _set_status(db: Database, job_id: int, status: str, error: str | None) -> None:
    def attempt() -> None:
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
                      .values(status=status, error=error[:1000] if error else None,
                              finished_at=utcnow()))
    retrying(attempt)


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
    c = retrying(lambda: db.trial_state_counts(job.study_name)) if job.study_name else {}
    finished = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
    new = error = None
    deadline = job_deadline(job.spec, job.started_at)
    if (finished >= job.n_trials and c.get("RUNNING", 0) == 0
            and c.get("WAITING", 0) == 0):
        new = "succeeded"
    elif deadline is not None and _time.time() >= deadline:
        new = "failed"
        error = (f"timed out after {job.spec.get('timeout_seconds'):g} s with {finished} of "
                 f"{job.n_trials} trials finished")
    elif c.get("FAIL", 0) > _crash_limit(db, job.n_trials):
        crashed = [t for t in study_trials(db, job) if t.state == TrialState.FAIL
                   and t.user_attrs.get(STOP_CAUSE) != HANDED_BACK]
        if len(crashed) > _crash_limit(db, job.n_trials):
            new, error = "failed", f"{len(crashed)} trials failed"
    if new:
        _set_status(db, job_id, new, error)
        return new
    return job.status


def fail_job(db: Database, job_id: int, error: str) -> None:
    """End a job that cannot run (its dataset will not load, say)."""
    _set_status(db, job_id, "failed", error)


def active_job_ids(db: Database) -> list[int]:
    def attempt() -> list[int]:
        with db.session() as s:
            return list(s.scalars(select(Job.id).where(Job.status.in_(ACTIVE))))
    return retrying(attempt)


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
            trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
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
                1 for n in chain
                if n in by_number and by_number[n].user_attrs.get(STOP_CAUSE) == HANDED_BACK
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
            return len(study._storage.get_all_trials(study._study_id, deepcopy=False)) > n_before

        queued = retrying(attempt)
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


def fail_trial(db: Database, study: optuna.Study, trial_id: int, reason: str | None = None,
               error: str | None = None) -> bool:
    """Mark a RUNNING or WAITING trial FAIL; True if this call did it (and nobody else)."""
    storage = study._storage
    try:
        if reason:
            storage.set_trial_user_attr(trial_id, "stop_reason", reason)
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
    import datetime as _dt

    study = load_job_study(db, job)
    if db.settings.reap_gone_processes:
        # Trials whose worker process this host can see is gone: FAIL at once, no grace.
        running = retrying(lambda: db.storage.get_all_trials(
            study._study_id, deepcopy=False, states=(TrialState.RUNNING,)))
        for t in running:
            identity = t.system_attrs.get(WORKER_PROCESS_ATTR)
            if identity and process_gone(identity):
                fail_trial(db, study, t._trial_id, error="its worker process is gone")
                # the retry follows below
    # Heartbeat-stale trials: FAIL, then the storage's callback queues their retry.
    retrying(lambda: optuna.storages.fail_stale_trials(study))
    # Trials that never beat at all (the worker died right after creating them).
    grace = _dt.timedelta(seconds=db.settings.grace_period)
    for trial_id in retrying(lambda: db.running_trials_without_heartbeat(job.study_name)):
        t = retrying(lambda tid=trial_id: study._storage.get_trial(tid))
        if t.datetime_start is not None and _dt.datetime.now() - t.datetime_start > grace:
            fail_trial(db, study, trial_id, error="the worker died before its first heartbeat")
            # the retry follows below
    # FAIL trials without a retry: a worker or reaper that died between failing a trial and
    # queueing its retry, or a retry that found no free slot then. Chains at their retry
    # limit are left alone (their slot goes to a fresh sample).
    if job.status in ACTIVE:
        retried = retrying(lambda: db.retried_trial_numbers(job.study_name))
        failed = retrying(lambda: db.storage.get_all_trials(
            study._study_id, deepcopy=False, states=(TrialState.FAIL,)))
        handed_back = {t.number for t in failed if t.user_attrs.get(STOP_CAUSE) == HANDED_BACK}
        for t in failed:
            if t.number in retried:
                continue
            chain = [*(t.system_attrs.get("retry_history") or []), t.number]
            if len(chain) > db.settings.max_trial_retries + len(handed_back.intersection(chain)):
                continue
            retry_failed_trial(db, study, t)


def _settle_ended_jobs(db: Database) -> None:
    """Jobs that ended (cancelled, timed out, failed) keep no RUNNING or WAITING trials: stale
    running ones are failed once their heartbeat stops, queued retries are failed at once."""
    names = retrying(db.studies_with_unfinished_trials)
    if not names:
        return
    with db.session() as s:
        ended = list(s.scalars(select(Job).where(Job.study_name.in_(names),
                                                 Job.status.in_(TERMINAL))))
    for job in ended:
        with _one_job(db, job.id):
            study = load_job_study(db, job)
            _reap_job(db, job)
            for t in retrying(lambda s=study: s.get_trials(deepcopy=False,
                                                           states=(TrialState.WAITING,))):
                fail_trial(db, study, t._trial_id, reason="cancelled",
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
        _set_status(db, job_id, "failed", exc.message)
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
