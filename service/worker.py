"""The worker process loop: claim a slot, run one trial, settle its outcome, repeat."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings

import optuna
from threadpoolctl import threadpool_limits

from search import load_study, run_trial
from service import jobs
from service.datasets import load_job_dataset
from service.db import Database
from service.settings import Settings

log = logging.getLogger("hptune.worker")

# How often a running trial asks whether its job was cancelled.
CANCEL_POLL_INTERVAL_S = 1.0
# How often an idle worker also runs the reaper.
IDLE_REAP_INTERVAL_S = 5.0

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


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
                log.warning("heartbeat for trial %s failed: %s", self.trial_id, exc)
            if self._stop.wait(self._interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class Worker:
    """Runs trials until `stop()`; one trial at a time, BLAS pinned to one thread."""

    def __init__(self, db: Database, name: str | None = None) -> None:
        self.db = db
        self.name = name or f"worker-{os.getpid()}"
        self._stop = threading.Event()
        self.trials_run = 0

    def stop(self) -> None:
        self._stop.set()

    def run(self, max_trials: int | None = None) -> None:
        """Loop until stopped (or until `max_trials` trials have run)."""
        log.info("%s started", self.name)
        last_reap = 0.0
        with threadpool_limits(limits=1):
            while not self._stop.is_set():
                claim = jobs.claim_slot(self.db)
                if claim is None:
                    if time.monotonic() - last_reap > IDLE_REAP_INTERVAL_S:
                        jobs.reap(self.db)
                        last_reap = time.monotonic()
                    self._stop.wait(self.db.settings.poll_interval)
                    continue
                self.run_claim(claim)
                self.trials_run += 1
                if max_trials is not None and self.trials_run >= max_trials:
                    break
        log.info("%s stopped after %d trials", self.name, self.trials_run)

    def run_claim(self, claim: jobs.Claim) -> None:
        """Run the claimed slot's trial; whatever happens, the slot ends accounted for."""
        db = self.db
        try:
            data = load_job_dataset(self.db, claim.spec)
        except Exception as exc:
            jobs.fail_job(db, claim.job_id, f"dataset {claim.spec.dataset!r}: {exc}")
            return
        study = load_study(claim.spec, db.storage, claim.study_name, claim.claim_number)
        heartbeat: list[Heartbeat] = []
        last_poll = [time.monotonic()]

        def on_started(trial: optuna.Trial) -> None:
            hb = Heartbeat(db.storage, trial._trial_id, db.settings.heartbeat_interval)
            hb.start()
            heartbeat.append(hb)

        def should_stop() -> bool:
            if self._stop.is_set():
                return True
            now = time.monotonic()
            if now - last_poll[0] < CANCEL_POLL_INTERVAL_S:
                return False
            last_poll[0] = now
            return jobs.job_status(db, claim.job_id) not in jobs.ACTIVE

        outcome = None
        try:
            outcome = run_trial(study, claim.spec, data, should_stop=should_stop,
                                on_started=on_started)
            log.info("%s job %s trial %s: %s (%s)", self.name, claim.job_id, outcome.number,
                     outcome.state.name, outcome.stop_reason)
        except Exception:
            log.exception("%s job %s: trial failed", self.name, claim.job_id)
        finally:
            for hb in heartbeat:
                hb.stop()
            if outcome is None or outcome.state == optuna.trial.TrialState.FAIL:
                # A failed or handed-back trial frees its slot; an active job retries its params.
                if heartbeat and jobs.job_status(db, claim.job_id) in jobs.ACTIVE:
                    failed = study._storage.get_trial(heartbeat[0].trial_id)
                    jobs.retry_failed_trial(db, study, failed)
                else:
                    jobs.release_slot(db, claim.job_id)
            jobs.refresh_job(db, claim.job_id)


def run_worker(settings: Settings) -> None:
    """Entry point of `hptune worker`: migrate, then loop until SIGTERM or SIGINT."""
    from service.migrate import upgrade

    db = jobs.open_database(settings)
    upgrade(db)
    worker = Worker(db)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s got signal %d; finishing the current epoch", worker.name, signum)
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.run()
    finally:
        db.dispose()
