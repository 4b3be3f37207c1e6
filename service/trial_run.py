"""One claimed trial while a worker runs it: its heartbeat, its stop checks, its settling.

`Worker.run_claim` builds a `TrialRun` and hands its methods to `search.run_trial`:
`on_started` once the trial exists (first heartbeat, claim lock released), `should_stop` at
every epoch end (hand-back, job timeout, cancel); whatever happens it then calls `finish`,
which leaves the trial told or FAIL with its retry queued, and stops the heartbeat.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from search import ATTR_STOP_CAUSE, StopCause, TrialOutcome
from service import artifacts, reaper, scheduler, trial_store
from service.db import Database, JobLock
from service.errors import one_line
from service.faults import FaultInjector
from service.procs import WORKER_PROCESS_ATTR
from service.status import ACTIVE
from trainer import StopReason

log = logging.getLogger("hptune.worker")

# Shortest time between two reads of a running trial's job status (cancel checks).
CANCEL_POLL_MIN_S = 0.05


class Heartbeat:
    """Records Optuna heartbeats for one running trial from a background thread."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval_s: float):
        self._storage = storage
        self.trial_id = trial_id
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self._storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a missed beat is retried; the grace period absorbs it
                log.warning("heartbeat for trial %s failed: %s", self.trial_id, one_line(exc))
            if self._stop.wait(self._interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


@dataclass(eq=False)
class TrialRun:
    """What a worker knows of one claimed trial, from its claim to its settling."""

    db: Database
    claim: scheduler.Claim
    study: optuna.Study
    # The worker's stop event (SIGTERM): the trial is handed back at the next epoch end.
    stop_event: threading.Event
    worker_name: str
    # The job's claim lock, if held: released as soon as the trial exists.
    lock: JobLock | None = None
    faults: FaultInjector = field(default_factory=FaultInjector)
    # This process, recorded on the trial so that a reaper on this host sees at once if it dies.
    identity: str | None = None
    # Called at each epoch end that goes on: keeps the worker's registry row fresh.
    keep_alive: Callable[[], None] = lambda: None
    # Set by on_started.
    trial: optuna.Trial | None = None
    heartbeat: Heartbeat | None = None
    # Why should_stop stopped the trial: a StopCause, or StopReason.CANCELLED.
    stopped_by: str | None = None
    _last_status_read: float = -math.inf

    def on_started(self, trial: optuna.Trial) -> None:
        """The trial exists (its slot is counted): release the claim lock, then beat once at
        once and start the heartbeat (the reaper gives a trial that never beat the grace
        period, so the first beat need not happen under the lock)."""
        self.release_lock()
        self.trial = trial
        trial_id = trial_store.trial_id(trial)
        storage = self.db.storage
        try:  # a first beat before anything else, so the reaper sees the trial alive
            storage.record_heartbeat(trial_id)
            if self.identity:
                storage.set_trial_system_attr(trial_id, WORKER_PROCESS_ATTR, self.identity)
        except Exception as exc:
            log.warning("first heartbeat of trial %s failed: %s", trial.number, one_line(exc))
        self.heartbeat = Heartbeat(storage, trial_id, self.db.settings.heartbeat_interval)
        self.heartbeat.start()

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def should_stop(self) -> str | None:
        """Polled at each epoch end: why the trial must stop now, or None to go on."""
        if self.trial is not None:
            self.faults.after_epoch(self.trial)
        if self.stop_event.is_set():
            return self.stop_with(StopCause.HANDED_BACK)
        if self.claim.deadline is not None and time.time() >= self.claim.deadline:
            scheduler.refresh_job(self.db, self.claim.job_id)  # marks the job timed out
            return self.stop_with(StopCause.TIMED_OUT)
        if self._job_stopped():
            return self.stop_with(None)
        # A long trial keeps the worker's registry row fresh too (rate-limited).
        self.keep_alive()
        return None

    def _job_stopped(self) -> bool:
        """Whether the job is no longer active (cancelled, failed), read at most every
        CANCEL_POLL_MIN_S: a cancel stops the trial within one epoch plus that, and very
        short epochs do not pay a database round trip each."""
        now = time.monotonic()
        if now - self._last_status_read < CANCEL_POLL_MIN_S:
            return False
        self._last_status_read = now
        return scheduler.job_status(self.db, self.claim.job_id) not in ACTIVE

    def stop_with(self, cause: StopCause | None) -> str:
        """Record a worker's stop cause on the trial; the answer for should_stop."""
        if cause and self.trial is not None:
            try:
                self.trial.set_user_attr(ATTR_STOP_CAUSE, cause)
            except Exception as exc:
                log.warning("could not record stop cause: %s", one_line(exc))
        self.stopped_by = cause or StopReason.CANCELLED
        return self.stopped_by

    def tell_failed(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """Tell FAIL and queue the retry as one step under the job's lock, so no claim takes
        the freed slot with a fresh sample in between (finish re-checks, idempotently)."""
        with self.db.job_lock(self.claim.job_id):
            study.tell(trial, state=TrialState.FAIL)
            scheduler.retry_failed_trial(self.db, study, trial_store.frozen_trial(study, trial))

    def finish(self, outcome: TrialOutcome | None, error: BaseException | None) -> None:
        """Whatever happened: release the lock, settle the trial, then stop its heartbeat."""
        self.release_lock()
        try:
            self._settle(outcome, error)
        finally:
            if self.heartbeat is not None:
                self.heartbeat.stop()

    def _settle(self, outcome: TrialOutcome | None, error: BaseException | None) -> None:
        """Leave the trial told (COMPLETE/PRUNED) or FAIL with its retry queued."""
        db, study, trial = self.db, self.study, self.trial
        try:
            if trial is not None and (outcome is None or outcome.state == TrialState.FAIL):
                trial_id = trial_store.trial_id(trial)
                frozen = trial_store.frozen_trial(study, trial)
                if frozen.state == TrialState.RUNNING:
                    # The tell never landed (an outage outlasted the retries): fail it here.
                    reaper.fail_trial(db, study, trial_id, reason=StopReason.FAILED,
                                      error=one_line(error) if error else "not told")
                    frozen = trial_store.frozen_trial(study, trial)
                if frozen.state == TrialState.FAIL:
                    scheduler.retry_failed_trial(db, study, frozen)
            scheduler.refresh_job(db, self.claim.job_id)
            artifacts.retain(db, self.claim.job_id)
        except Exception as exc:
            # The database is still away: the trial stays RUNNING without heartbeats, and the
            # reaper fails and retries it after the grace period.
            log.warning("%s job %s: could not settle the trial (%s); the reaper will",
                        self.worker_name, self.claim.job_id, one_line(exc))
