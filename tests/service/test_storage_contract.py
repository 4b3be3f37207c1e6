"""The storage contract that exact trial counts rest on, run in-process against each backend.

No training here: threads stand in for workers and drive Optuna's ask/tell directly through
the same claim lock, slot count and retry queue the worker uses, so races show up quickly.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timedelta

import optuna
import pytest
from optuna.storages._rdb import models
from optuna.trial import TrialState

from benchmarks.report_scale import add_trials, synthetic_trial
from search import ATTR_STOP_CAUSE, JobSpec, StopCause
from service import jobs, reaper, scheduler, trial_store
from service.migrate import upgrade
from service.settings import Settings

N_TRIALS = 15
N_THREADS = 6


def _settings(url: str, **kw) -> Settings:
    return Settings(**{"database_url": url, "heartbeat_interval": 1, "grace_period": 2,
                       "max_trial_retries": 2, **kw})


def _open(url: str, **kw) -> jobs.Database:
    return scheduler.open_database(_settings(url, **kw), role="test", retry_seconds=10)


@pytest.fixture
def db(backend):
    db = _open(backend.url)
    upgrade(db)
    yield db
    db.dispose()


def _job(db, n_trials: int = N_TRIALS, **spec) -> tuple[int, optuna.Study]:
    spec = JobSpec.model_validate({"name": "contract", "n_trials": n_trials,
                                   "sampler": {"name": "random", "seed": 0}, **spec})
    job = jobs.create_job(db, "alice", spec)
    return job.id, optuna.load_study(study_name=job.study_name, storage=db.storage)


def _claim_and_ask(db, job_id: int, study_name: str) -> optuna.Trial | None:
    """What a worker does: under the job's lock, take a slot and create the trial."""
    with db.job_lock(job_id):
        claim = scheduler.claim_slot(db, job_id)
        if claim is None:
            return None
        study = optuna.load_study(study_name=study_name, storage=db.storage)
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        return trial


def test_slots_are_counted_from_trials_and_retries_pop_first(db):
    job_id, study = _job(db, n_trials=3)
    t0 = _claim_and_ask(db, job_id, study.study_name)
    t1 = _claim_and_ask(db, job_id, study.study_name)
    t2 = _claim_and_ask(db, job_id, study.study_name)
    assert _claim_and_ask(db, job_id, study.study_name) is None, "a 4th slot of 3"
    study.tell(t0, 0.5)
    study.tell(t1, state=TrialState.FAIL)
    failed = study._storage.get_trial(t1._trial_id)
    assert scheduler.retry_failed_trial(db, study, failed)
    # Idempotent: the same failure is never queued twice, whoever asks again.
    assert not scheduler.retry_failed_trial(db, study, failed)
    retry = _claim_and_ask(db, job_id, study.study_name)
    assert retry is not None and retry.params == t1.params
    frozen = study._storage.get_trial(retry._trial_id)
    assert frozen.system_attrs["failed_trial"] == t1.number
    assert frozen.system_attrs["retry_history"] == [t1.number]
    assert _claim_and_ask(db, job_id, study.study_name) is None
    study.tell(t2, 0.1)
    study.tell(retry, 0.2)
    assert scheduler.refresh_job(db, job_id) == "succeeded"
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 3 and TrialState.RUNNING not in states


def test_no_retry_without_a_free_slot(db):
    """A failure whose slot already went to a fresh trial is not queued on top of n_trials."""
    job_id, study = _job(db, n_trials=2)
    a = _claim_and_ask(db, job_id, study.study_name)
    b = _claim_and_ask(db, job_id, study.study_name)
    study.tell(a, state=TrialState.FAIL)   # failed, but its retry is not queued yet
    c = _claim_and_ask(db, job_id, study.study_name)  # the free slot goes to a new sample
    assert c is not None
    assert not scheduler.retry_failed_trial(db, study, study._storage.get_trial(a._trial_id))
    study.tell(b, 1.0)
    study.tell(c, 1.0)
    assert scheduler.refresh_job(db, job_id) == "succeeded"


def test_retry_limit_then_fresh_samples(db):
    job_id, study = _job(db, n_trials=1)
    first = _claim_and_ask(db, job_id, study.study_name)
    params = first.params
    trial = first
    for _ in range(db.settings.max_trial_retries):
        study.tell(trial, state=TrialState.FAIL)
        assert scheduler.retry_failed_trial(db, study, study._storage.get_trial(trial._trial_id))
        trial = _claim_and_ask(db, job_id, study.study_name)
        assert trial.params == params
    study.tell(trial, state=TrialState.FAIL)
    # The limit is reached: no more retries, the slot goes to a fresh sample.
    assert not scheduler.retry_failed_trial(db, study, study._storage.get_trial(trial._trial_id))
    fresh = _claim_and_ask(db, job_id, study.study_name)
    assert "failed_trial" not in study._storage.get_trial(fresh._trial_id).system_attrs


def test_hand_backs_do_not_use_up_the_retry_limit(db):
    job_id, study = _job(db, n_trials=1)
    trial = _claim_and_ask(db, job_id, study.study_name)
    for _ in range(db.settings.max_trial_retries + 2):
        trial.set_user_attr(ATTR_STOP_CAUSE, StopCause.HANDED_BACK)
        study.tell(trial, state=TrialState.FAIL)
        assert scheduler.retry_failed_trial(db, study, study._storage.get_trial(trial._trial_id))
        trial = _claim_and_ask(db, job_id, study.study_name)
    assert len(study._storage.get_trial(trial._trial_id).system_attrs["retry_history"]) == (
        db.settings.max_trial_retries + 2)


def test_many_threads_never_exceed_n_trials(backend, db):
    """Workers racing to claim, crash, retry and finish: exactly N_TRIALS finish."""
    job_id, study = _job(db)
    name = study.study_name
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine = _open(backend.url)  # its own engines and locks, like another process
        try:
            while scheduler.job_status(mine, job_id) in jobs.ACTIVE:
                trial = _claim_and_ask(mine, job_id, name)
                if trial is None:
                    reaper.reap(mine)
                    time.sleep(0.01)
                    continue
                s = optuna.load_study(study_name=name, storage=mine.storage)
                if rng.random() < 0.3:  # crash: fail it, then (maybe twice) queue its retry
                    s.tell(trial, state=TrialState.FAIL)
                    frozen = s._storage.get_trial(trial._trial_id)
                    scheduler.retry_failed_trial(mine, s, frozen)
                    scheduler.retry_failed_trial(mine, s, frozen)
                else:
                    s.tell(trial, rng.random())
                scheduler.refresh_job(mine, job_id)
        except BaseException as exc:
            errors.append(exc)
        finally:
            mine.dispose()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    trials = study.get_trials()
    assert len({t.number for t in trials}) == len(trials)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == N_TRIALS
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    retries = [t for t in trials if "retry_history" in t.system_attrs]
    parents = [t.system_attrs["retry_history"][-1] for t in retries]
    assert len(parents) == len(set(parents)), "a failure was retried twice"
    assert scheduler.job_status(db, job_id) == "succeeded"


def _set_back(db, trial_ids: list[int], seconds: float) -> None:
    """The trials' start and last beat moved `seconds` into the past, as if that long had gone
    by (the beat is compared with the database's own clock, which a test cannot move)."""
    session = db.storage.scoped_session()
    try:
        ago = timedelta(seconds=seconds)
        trials = models.TrialModel.trial_id.in_(trial_ids)
        for trial in session.query(models.TrialModel).filter(trials):
            trial.datetime_start -= ago
        beats = models.TrialHeartbeatModel.trial_id.in_(trial_ids)
        for beat in session.query(models.TrialHeartbeatModel).filter(beats):
            beat.heartbeat -= ago
        session.commit()
    finally:
        session.close()


def test_reaper_fails_silent_and_stale_trials_and_queues_retries(db):
    job_id, study = _job(db, n_trials=2)
    silent = _claim_and_ask(db, job_id, study.study_name)  # never beats: died at once
    beating = _claim_and_ask(db, job_id, study.study_name)
    db.storage.record_heartbeat(beating._trial_id)  # beat once, then died
    _set_back(db, [silent._trial_id, beating._trial_id], db.settings.grace_period + 1.5)
    reaper.reap(db)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[silent.number] == TrialState.FAIL
    assert states[beating.number] == TrialState.FAIL
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(
        [silent.number, beating.number])
    jobs.cancel_job(db, None, job_id)
    reaper.reap(db)
    # An ended job keeps nothing queued or running.
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))


def test_a_reaper_round_reads_the_same_trials_however_many_have_finished(backend, db,
                                                                        monkeypatch):
    """A round reads a job's RUNNING and FAIL trials, not its finished ones: with a live
    trial and a failed one already retried, it costs the same with 10 finished trials as
    with 400."""
    db = _open(backend.url, grace_period=3600)  # the live trial stays live on a slow machine
    built = []
    real = optuna.storages.RDBStorage._build_frozen_trial_from_trial_model

    def counted(storage, model):
        built.append(model.trial_id)
        return real(storage, model)

    monkeypatch.setattr(optuna.storages.RDBStorage, "_build_frozen_trial_from_trial_model",
                        counted)
    read = {}
    for n_finished in (10, 400):
        job_id, study = _job(db, n_trials=n_finished + 5)
        rng, start = random.Random(n_finished), datetime(2025, 1, 1)
        finished = [t for t in (synthetic_trial(i, rng, start) for i in range(2 * n_finished))
                    if t.state != TrialState.FAIL][:n_finished]  # a FAIL would be retried
        first = len(study.get_trials(deepcopy=False))  # after the queued warm-start trial
        for number, t in enumerate(finished, start=first):
            t.number = number
        add_trials(db.storage, study, finished)
        failed = _claim_and_ask(db, job_id, study.study_name)
        study.tell(failed, state=TrialState.FAIL)
        running = _claim_and_ask(db, job_id, study.study_name)
        db.storage.record_heartbeat(running._trial_id)
        reaper.reap(db)  # queues the failed trial's retry (that reads the whole study)
        waiting = study.get_trials(states=(TrialState.WAITING,))
        assert [t.system_attrs["failed_trial"] for t in waiting] == [failed.number]
        built.clear()
        reaper.reap(db)  # a round with nothing to do: what most rounds are
        read[n_finished] = len(built)
        assert study.get_trials(states=(TrialState.RUNNING,))[0].number == running.number
        study.tell(running, 0.5)
        jobs.cancel_job(db, None, job_id)
        reaper.reap(db)  # fails the queued retry: the job holds nothing unfinished
        assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    db.dispose()
    assert read[10] == read[400] <= 10, read


def test_state_change_is_atomic_between_tell_and_reaper(db):
    """Only one of two racing state changes wins; the loser learns it and counts nothing."""
    job_id, study = _job(db, n_trials=1)
    trial = _claim_and_ask(db, job_id, study.study_name)
    results: list[object] = []

    def change(state: TrialState) -> None:
        other = _open(db.settings.database_url)
        try:
            results.append(other.storage.set_trial_state_values(trial._trial_id, state=state))
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            results.append(exc)
        finally:
            other.dispose()

    threads = [threading.Thread(target=change, args=(s,))
               for s in (TrialState.COMPLETE, TrialState.FAIL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is True for r in results) == 1, results


def test_timeout_fails_the_job_with_a_clear_error(db, monkeypatch):
    job_id, study = _job(db, n_trials=3, timeout_seconds=1)
    trial = _claim_and_ask(db, job_id, study.study_name)
    study.tell(trial, 0.5)
    # refresh_job reads time.time(): the test sets the clock from the job's first claim
    # rather than sleeping, or racing a loaded machine to stay within the second.
    job = jobs.get_job(db, None, job_id)
    deadline = scheduler.job_deadline(job.spec, job.started_at)
    monkeypatch.setattr(time, "time", lambda: deadline - 0.5)
    assert scheduler.refresh_job(db, job_id) == "running"  # within its second
    monkeypatch.setattr(time, "time", lambda: deadline + 0.2)
    assert scheduler.refresh_job(db, job_id) == "failed"
    job = jobs.get_job(db, None, job_id)
    assert job.error.startswith("timed out after 1 s with 1 of 3 trials finished")


def test_service_storage_rides_out_a_transient_error(db):
    """The storage the service opens retries a storage call that hit a transient error (a
    plain RDBStorage would raise it): the first statement on its engine fails, then passes."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    _, study = _job(db, n_trials=1)
    failures: list[str] = []

    def fail_once(conn, cursor, statement, *args) -> None:
        if not failures:
            failures.append(statement)
            raise OperationalError(statement, {}, Exception("database is locked"))

    engine = db.storage.engine
    event.listen(engine, "before_cursor_execute", fail_once)
    try:
        assert db.storage.get_study_id_from_name(study.study_name) == trial_store.study_id(study)
    finally:
        event.remove(engine, "before_cursor_execute", fail_once)
    assert len(failures) == 1, "the injected failure did not reach the storage"
