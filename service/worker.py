"""The worker process loop: claim a slot, run one trial, settle its outcome, repeat.

A worker never dies of a database error: the loop catches it, backs off and goes on, and a
trial whose result could not be stored is failed (here, or by the reaper once its heartbeat
stops) and retried, never lost and never counted twice. SIGTERM (or SIGINT) stops it at the
end of the running epoch: the trial is handed back (FAIL, stop_cause `handed_back`) and its
parameters queued again, and the process exits; after `HPTUNE_STOP_TIMEOUT` seconds, or on a
second signal, it exits at once and the heartbeat reaper takes over.

One trial's state (its heartbeat, stop checks and settling) is a `service.trial_run.TrialRun`;
faults that tests inject (`HPTUNE_TEST_CRASH_ON_PARAM`) live in `service.faults`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
import warnings

import optuna
from threadpoolctl import threadpool_limits

from search import TrialOutcome, build_pruner, build_sampler, load_study, run_trial
from search.pruners import rung_source
from service import reaper, scheduler, trial_store
from service.artifacts import WorkerArtifacts
from service.datasets import load_job_dataset
from service.db import Database, JobLock
from service.errors import DatabaseUnavailable, one_line
from service.faults import FaultInjector
from service.procs import process_identity
from service.retry import is_transient
from service.settings import Settings
from service.trial_run import TrialRun

log = logging.getLogger("hptune.worker")

# How often a worker updates its row in the worker registry (shown by /metrics).
REGISTRY_INTERVAL_S = 10.0
# Backoff of the loop after a database error: doubles from the first value up to the cap.
ERROR_BACKOFF_FIRST_S = 0.5
ERROR_BACKOFF_MAX_S = 10.0
# Studies a worker keeps open (most recently used first out last).
STUDY_CACHE_SIZE = 4

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# The worker drives ask/tell itself and runs Optuna's heartbeats in its own thread.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


class Worker:
    """Runs trials until `stop()`; one trial at a time, BLAS pinned to one thread."""

    def __init__(self, db: Database, name: str | None = None) -> None:
        self.db = db
        self.name = name or f"worker-{os.getpid()}"
        self._stop = threading.Event()
        self.trials_run = 0
        self._faults = FaultInjector.from_settings(db.settings, self.name)
        self._last_registry = 0.0
        # Open studies by name: their cache keeps finished trials, so a worker reads each
        # finished trial once instead of the whole study before every trial.
        self._studies: dict[str, optuna.Study] = {}
        # The job this worker ran its last trial for (informational: every trial re-picks).
        self._current: scheduler.Candidate | None = None
        self._identity = process_identity()

    def _study(self, claim: scheduler.Claim) -> optuna.Study:
        """The claim's study, with a sampler seeded by the claim number.

        TPE reads its bounded view of the study through a trial_store.BoundedHistory, which
        lives as long as the open study (on its sampler): each trial's new sampler takes it
        over, so every ask reads only what changed since the last. Successive halving reads
        its competitors through a trial_store.RungReader kept the same way (on the pruner).
        """
        study = self._studies.pop(claim.study_name, None)
        if study is None:
            study = load_study(claim.spec, self.db.storage, claim.study_name,
                               claim.claim_number)
        history = getattr(study.sampler, "history", None)
        if not isinstance(history, trial_store.BoundedHistory):
            history = trial_store.BoundedHistory(self.db, claim.study_name)
        study.sampler = build_sampler(claim.spec, claim.claim_number, history=history)
        rungs = rung_source(study.pruner)
        if not isinstance(rungs, trial_store.RungReader):
            rungs = trial_store.RungReader(self.db, claim.study_name)
        study.pruner = build_pruner(claim.spec, rungs=rungs)
        self._studies[claim.study_name] = study
        while len(self._studies) > STUDY_CACHE_SIZE:
            self._studies.pop(next(iter(self._studies)))
        return study

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, max_trials: int | None = None) -> None:
        """Loop until stopped (or until `max_trials` trials have run)."""
        log.info("%s started", self.name)
        last_reap = -math.inf  # reap before the first claim: a replacement finds at once the
        # trials of the worker it replaces (service.procs)
        errors = 0
        busy = False
        self._announce("idle", force=True)
        with threadpool_limits(limits=1):
            while not self.stopping:
                if time.monotonic() - last_reap > self.db.settings.reap_interval:
                    # Busy or idle, workers reap too: a dead peer's trial is retried sooner.
                    last_reap = time.monotonic()
                    try:
                        reaper.reap(self.db)
                    except Exception as exc:
                        log.warning("%s: reaper round failed: %s", self.name, one_line(exc))
                try:
                    ran = self.run_one()
                    errors = 0
                except Exception as exc:
                    errors += 1
                    delay = min(ERROR_BACKOFF_FIRST_S * 2 ** (errors - 1), ERROR_BACKOFF_MAX_S)
                    delay *= random.uniform(0.75, 1.25)
                    log.warning("%s: %s; trying again in %.1f s", self.name,
                                one_line(exc), delay)
                    if not isinstance(exc, DatabaseUnavailable) and not is_transient(exc):
                        log.debug("traceback", exc_info=exc)
                    self._stop.wait(delay)
                    continue
                if ran:
                    busy = True
                    if max_trials is not None and self.trials_run >= max_trials:
                        break
                    continue
                if busy:
                    # Back to idle: give back the connections the trials needed.
                    busy = False
                    self._studies.clear()
                    self.db.release_idle_connections()
                    self._announce("idle", force=True)
                self._announce("idle")
                self._stop.wait(self.db.settings.poll_interval)
        self._announce("stopped", force=True)
        log.info("%s stopped after %d trials", self.name, self.trials_run)

    def _announce(self, state: str, force: bool = False) -> None:
        """Keep this worker's row in the registry fresh (best effort)."""
        now = time.monotonic()
        if not force and now - self._last_registry < REGISTRY_INTERVAL_S:
            return
        self._last_registry = now
        try:
            from service.registry import worker_seen

            worker_seen(self.db, self.name, state, self.trials_run)
        except Exception as exc:
            log.debug("%s: registry update failed: %s", self.name, one_line(exc))

    def run_one(self) -> bool:
        """Claim a slot of the fairest job with room and run its trial; False if no work.

        One claim per trial: after each trial the worker picks again (scheduler.claimable_jobs:
        the owner with the fewest running trials first), so it never stays on one owner's
        job while another owner's job waits.
        """
        for cand in scheduler.claimable_jobs(self.db):
            if self._stop.is_set():
                return False
            if self._try(cand):
                self._current = cand
                return True
        self._current = None
        return False

    def _try(self, cand: scheduler.Candidate) -> bool:
        """Run one trial of the candidate job if a slot is free."""
        db = self.db
        try:
            data = load_job_dataset(db, cand.spec)
        except Exception as exc:
            if isinstance(exc, DatabaseUnavailable) or is_transient(exc):
                raise
            scheduler.fail_job(db, cand.job_id, f"dataset {cand.spec.dataset!r}: {exc}")
            return False
        lock = db.job_lock(cand.job_id)
        lock.acquire()
        try:
            claim = scheduler.claim_slot(db, cand.job_id)
            if claim is None:
                return False
            self._announce("busy", force=self.trials_run == 0)
            self.run_claim(claim, data, lock)
            self.trials_run += 1
            return True
        finally:
            lock.release()

    def run_claim(self, claim: scheduler.Claim, data: object, lock: JobLock | None = None) -> None:
        """Run the claimed slot's trial; whatever happens, the trial ends told or failed.

        `lock` (the job's claim lock, if held) is released as soon as the trial exists.
        """
        study = self._study(claim)
        run = TrialRun(self.db, claim, study, self._stop, self.name, lock=lock,
                       faults=self._faults, identity=self._identity,
                       keep_alive=lambda: self._announce("busy"))
        outcome: TrialOutcome | None = None
        error: BaseException | None = None
        try:
            outcome = run_trial(study, claim.spec, data, should_stop=run.should_stop,
                                on_started=run.on_started, tell_failed=run.tell_failed,
                                artifacts=WorkerArtifacts(self.db, claim.job_id))
            log.info("%s job %s trial %s: %s (%s)", self.name, claim.job_id, outcome.number,
                     outcome.state.name, outcome.stop_reason)
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            # The reaper failed this trial (its beats did not reach the database) and queued
            # its retry; what this worker computed is dropped, never counted twice.
            error = exc
            log.warning("%s job %s: trial was failed by the reaper meanwhile; dropping it",
                        self.name, claim.job_id)
        except Exception as exc:
            error = exc
            log.warning("%s job %s: trial failed: %s", self.name, claim.job_id, one_line(exc))
        finally:
            # The outcome is decided here, whatever happened: told, or FAIL and retried.
            run.finish(outcome, error)


def run_worker(settings: Settings) -> None:
    """Entry point of `hptune worker`: migrate, then loop until SIGTERM or SIGINT."""
    from service.migrate import upgrade

    db = scheduler.open_database(settings, role="worker", retry_seconds=settings.db_retry_seconds)
    worker = Worker(db)

    def on_signal(signum: int, _frame: object) -> None:
        if worker.stopping:
            log.warning("%s got signal %d again; exiting now", worker.name, signum)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s got signal %d; handing back after the current epoch", worker.name, signum)
        worker.stop()
        # A bound on the hand-back: past it the heartbeat reaper takes over the trial.
        timer = threading.Timer(settings.stop_timeout, _exit_late, args=(worker.name,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    attempt = 0
    while not worker.stopping:
        try:
            upgrade(db)
            db.release_idle_connections()  # the migration's connections are not needed again
            break
        except Exception as exc:  # the database may not be up yet (cold start, outage)
            attempt += 1
            delay = min(ERROR_BACKOFF_FIRST_S * 2 ** (attempt - 1), ERROR_BACKOFF_MAX_S)
            log.warning("%s: database not ready (%s); trying again in %.1f s", worker.name,
                        one_line(exc), delay)
            worker._stop.wait(delay)
    try:
        worker.run()
    finally:
        db.dispose()


def _exit_late(name: str) -> None:
    log.error("%s did not stop within HPTUNE_STOP_TIMEOUT; exiting now", name)
    logging.shutdown()
    os._exit(1)
