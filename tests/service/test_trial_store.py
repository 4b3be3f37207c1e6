"""What service/trial_store.py (and search/optuna_internals.py) rely on from Optuna, pinned.

The trial store reads Optuna's tables with named SQL and wraps a few private names; an Optuna
upgrade that changes one of them must fail here, by name, rather than somewhere downstream.
Schema and queries run on SQLite and PostgreSQL (the `backend` fixture).
"""

from __future__ import annotations

import inspect
import math
from datetime import datetime

import optuna
import pytest
from optuna.storages._rdb import models
from optuna.trial import TrialState
from sqlalchemy import DateTime, Float, Integer, String, select
from sqlalchemy import inspect as sa_inspect

from search import optuna_internals
from search.pruners import BoundedSuccessiveHalvingPruner
from service import retry, scheduler, trial_store
from service.errors import DatabaseUnavailable
from service.migrate import upgrade
from service.models import Job
from service.settings import Settings
from tests.search.test_pruners import decisions

# Every table and column the named SQL and the buffered user attributes use, with the kind of
# type they are read as. `trials.state` is an enum (PostgreSQL ENUM, SQLite VARCHAR): the SQL
# casts it to VARCHAR and compares Optuna's state names.
OPTUNA_COLUMNS: dict[str, dict[str, type]] = {
    "studies": {"study_id": Integer, "study_name": String},
    "trials": {"trial_id": Integer, "study_id": Integer, "number": Integer, "state": String,
               "datetime_start": DateTime},
    "trial_values": {"trial_id": Integer, "objective": Integer, "value": Float},
    "trial_heartbeats": {"trial_id": Integer, "heartbeat": DateTime},
    "trial_system_attributes": {"trial_id": Integer, "key": String, "value_json": String},
    "trial_user_attributes": {"trial_id": Integer, "key": String, "value_json": String},
}


@pytest.fixture
def db(backend):
    settings = Settings(database_url=backend.url, heartbeat_interval=1, grace_period=2,
                        max_trial_retries=2)
    db = scheduler.open_database(settings, role="test", retry_seconds=5)
    upgrade(db)
    db.storage  # creates Optuna's tables  # noqa: B018
    yield db
    db.dispose()


def _study(db, name: str = "job-1", owner: str = "alice") -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=db.storage, direction="maximize")
    with db.session() as s:
        s.add(Job(owner=owner, name=name, spec={}, status="running", n_trials=10,
                  study_name=name))
    return study


def _column_types(db, table: str) -> dict[str, object]:
    return {c["name"]: c["type"] for c in sa_inspect(db.engine).get_columns(table)}


@pytest.mark.parametrize("table", sorted(OPTUNA_COLUMNS))
def test_optuna_tables_have_the_columns_the_sql_reads(db, table):
    types = _column_types(db, table)
    for column, kind in OPTUNA_COLUMNS[table].items():
        assert column in types, f"Optuna's {table} lost column {column}"
        assert isinstance(types[column], kind), (
            f"Optuna's {table}.{column} is {types[column]!r}, trial_store reads it as {kind}")


def test_orm_models_used_by_the_buffered_user_attributes():
    attr = models.TrialUserAttributeModel
    assert attr.__tablename__ == "trial_user_attributes"
    for column in ("trial_id", "key", "value_json"):
        assert hasattr(attr, column)
    assert models.TrialModel.__tablename__ == "trials"
    assert hasattr(models.TrialModel, "state") and hasattr(models.TrialModel, "trial_id")


def test_named_queries_agree_with_optuna(db):
    study = _study(db)
    done = study.ask()
    study.tell(done, 0.25)
    best = study.ask()
    study.tell(best, 0.75)
    pruned = study.ask()
    study.tell(pruned, state=TrialState.PRUNED)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    silent = study.ask()  # RUNNING, never beat
    beating = study.ask()  # RUNNING, beat once
    db.storage.record_heartbeat(trial_store.trial_id(beating))
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(
        study, trial_store.frozen_trial(study, failed))  # a WAITING retry of `failed`
    name = study.study_name

    counts = trial_store.trial_state_counts(db, name)
    expected = {s.name: n for s in TrialState
                if (n := len(study.get_trials(states=(s,))))}
    assert counts == expected == {"COMPLETE": 2, "PRUNED": 1, "FAIL": 1, "RUNNING": 2,
                                  "WAITING": 1}
    assert trial_store.slots_in_use(db, [name, "no-such-study"]) == {name: 5}
    assert trial_store.slots_and_running(db, [name]) == {name: (5, 2)}
    assert trial_store.slots_in_use(db, []) == {} == trial_store.slots_and_running(db, [])
    assert trial_store.studies_with_unfinished_trials(db) == [name]
    assert trial_store.running_and_failed(db, name) == (2, 1)
    assert trial_store.running_and_failed(db, "no-such-study") is None
    assert trial_store.running_trials_without_heartbeat(db, name) == [
        trial_store.trial_id(silent)]
    assert trial_store.retried_trial_numbers(db, name) == {failed.number}

    rows = {r.state: r for r in trial_store.trial_summary_rows(db, [name])}
    assert {s: rows[s].n for s in rows} == expected
    assert (rows["COMPLETE"].best_max, rows["COMPLETE"].best_min) == (0.75, 0.25)

    sid = trial_store.study_id(study)
    assert trial_store.owner_study_ids(db, "alice") == {sid}
    assert trial_store.owner_study_ids(db, "bob") == set()
    assert trial_store.owner_has_study(db, "alice", sid)
    assert not trial_store.owner_has_study(db, "bob", sid)
    assert trial_store.trial_study_id(db, trial_store.trial_id(done)) == sid
    assert trial_store.trial_study_id(db, 10**9) is None
    assert trial_store.running_and_failed(db, _study(db, "job-empty").study_name) == (0, 0)


def test_trial_page_agrees_with_optuna(db):
    """trial_store.trial_page: the study's trials a page at a time, as Optuna builds them
    (its private _build_frozen_trial_from_trial_model), failed trials linked to their retries
    on later pages."""
    from search.report import retry_links

    study = _study(db)
    for i in range(3):
        t = study.ask()
        t.report(0.1 * i, 0)
        t.set_user_attr("i", i)
        study.tell(t, 0.5 + i)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(
        study, trial_store.frozen_trial(study, failed))  # a WAITING retry, numbered 4
    every = study.get_trials(deepcopy=False)
    name = study.study_name
    pages, after = [], -1
    while True:
        trials, retried_as = trial_store.trial_page(db, name, after, 2)
        if not trials:
            break
        pages.append((trials, retried_as))
        after = trials[-1].number
    assert [len(p) for p, _ in pages] == [2, 2, 1]
    assert [t for p, _ in pages for t in p] == every
    assert pages[1][1] == retry_links(every) == {failed.number: 4}
    assert pages[0][1] == {} == pages[2][1]
    assert trial_store.trial_page(db, name, 4, 10) == ([], {})
    assert trial_store.trial_page(db, "no-such-study", -1, 10) == ([], {})


def test_private_ids_and_storage(db):
    study = _study(db)
    trial = study.ask()
    storage = trial_store.storage_of(study)
    assert isinstance(storage, optuna.storages.BaseStorage)
    assert trial_store.study_id(study) == db.storage.get_study_id_from_name(study.study_name)
    assert trial_store.trial_id(trial) == db.storage.get_trial_id_from_study_id_trial_number(
        trial_store.study_id(study), trial.number)
    frozen = trial_store.frozen_trial(study, trial)
    assert frozen.number == trial.number and frozen.state == TrialState.RUNNING
    assert trial_store.trial_id(frozen) == trial_store.trial_id(trial)
    # get_all_studies answers FrozenStudy objects; the dashboard's storage scopes them by id.
    (frozen_study,) = db.storage.get_all_studies()
    assert isinstance(frozen_study, trial_store.FrozenStudy)
    assert trial_store.study_id(frozen_study) == trial_store.study_id(study)


def test_resilient_storage_overrides_what_optuna_still_has():
    rdb = optuna.storages.RDBStorage
    for name in trial_store._RETRIED_METHODS:
        assert callable(getattr(rdb, name, None)), f"RDBStorage.{name} is gone"
    # Trial creation writes the buffered attributes first, through this private hook.
    params = list(inspect.signature(rdb._create_new_trial).parameters)
    assert params[:3] == ["self", "study_id", "template_trial"]


def test_buffered_user_attributes_land_before_the_next_call(db):
    study = _study(db)
    trial = study.ask()
    tid = trial_store.trial_id(trial)
    db.storage.set_trial_user_attr(tid, "stop_reason", "pruned")
    # Buffered, then written by the next storage call, via Optuna's ORM models.
    assert optuna.storages.RDBStorage.get_trial(db.storage, tid).user_attrs == {}
    assert db.storage.get_trial(tid).user_attrs == {"stop_reason": "pruned"}
    study.ask()  # _create_new_trial flushes too
    study.tell(trial, 1.0)
    assert study.get_trials()[0].user_attrs["stop_reason"] == "pruned"


def _pruned_study(pruner: optuna.pruners.BasePruner) -> optuna.Study:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for i in range(6):
        trial = study.ask()
        for step in range(9):
            trial.report(i * 0.1 + step * 0.01, step)
            if trial.should_prune():
                break
        study.tell(trial, i * 0.1)
    return study


def test_pruner_settings_read_by_explain_prune():
    median = optuna.pruners.MedianPruner()
    assert optuna_internals.percentile(median) == 50.0
    assert optuna_internals.percentile(optuna.pruners.PercentilePruner(25.0)) == 25.0
    patient = optuna.pruners.PatientPruner(median, patience=3)
    assert optuna_internals.patient_settings(patient) == (median, 3)
    # An absent bound reads as an infinity (explain_prune compares the value with it).
    assert optuna_internals.threshold_bounds(
        optuna.pruners.ThresholdPruner(lower=0.1)) == (0.1, math.inf)
    assert optuna_internals.threshold_bounds(
        optuna.pruners.ThresholdPruner(upper=2.0)) == (-math.inf, 2.0)
    halving = optuna.pruners.SuccessiveHalvingPruner(reduction_factor=3)
    assert optuna_internals.reduction_factor(halving) == 3
    hyperband = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9,
                                               reduction_factor=3)
    assert optuna_internals.reduction_factor(hyperband) == 3
    study = _pruned_study(hyperband)
    brackets = {optuna_internals.hyperband_bracket(hyperband, study, t)
                for t in study.get_trials()}
    assert brackets and all(isinstance(b, int) and b >= 0 for b in brackets)
    for t in study.get_trials():  # a trial's bracket is a function of the trial
        assert (optuna_internals.hyperband_bracket(hyperband, study, t)
                == optuna_internals.hyperband_bracket(hyperband, study, t))
    # Successive halving records what explain_prune compares: completed_rung_<n>.
    assert any(k.startswith("completed_rung_") for t in study.get_trials()
               for k in t.system_attrs)


def test_retry_policy_retries_transient_errors_then_answers_503(monkeypatch):
    from sqlalchemy.exc import OperationalError

    calls: list[int] = []
    monkeypatch.setattr(retry.DB_RETRY, "sleep", lambda _s: None)

    def locked() -> None:
        calls.append(1)
        raise OperationalError("SELECT 1", {}, Exception("database is locked"))

    with pytest.raises(DatabaseUnavailable):
        retry.DB_RETRY(locked)
    assert len(calls) == retry.RETRY_ATTEMPTS

    calls.clear()

    def broken() -> None:
        calls.append(1)
        raise OperationalError("SELECT 1", {}, Exception("no such table: x"))

    with pytest.raises(OperationalError):
        retry.DB_RETRY(broken)
    assert len(calls) == 1, "a non-transient error is not retried"


def test_outage_budget_stops_every_call_once_spent(monkeypatch):
    from sqlalchemy.exc import OperationalError

    monkeypatch.setattr("time.sleep", lambda _s: None)
    outages: list[datetime] = []
    budget = retry.OutageBudget(0.0, on_outage=lambda: outages.append(datetime.now()))
    policy = budget.policy()

    def down() -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    with pytest.raises(DatabaseUnavailable):
        policy(down)
    assert outages and budget.left() <= 0
    budget.clear()  # a success ends the outage: the next one gets the whole budget again
    assert policy(lambda: 7) == 7


def test_job_summary_agrees_with_the_job_and_its_summary(db):
    """trial_store.job_summary_rows, through jobs.job_view (GET /jobs/{id} in one query):
    exactly job_public of get_job, for a job without a study, without trials, with trials of
    every state; another owner's job and a missing one are NotFound alike."""
    from service import jobs
    from service.errors import NotFound

    with db.session() as s:
        bare = Job(owner="alice", name="bare", spec={"metric": "val_loss"}, status="queued",
                   n_trials=3)
        s.add(bare)
        s.flush()
        bare_id = bare.id
    study = _study(db, "job-2")
    with db.session() as s:
        busy_id = s.scalar(select(Job.id).where(Job.study_name == "job-2"))
    expected = jobs.job_public(db, jobs.get_job(db, "alice", busy_id))
    assert jobs.job_view(db, "alice", busy_id) == expected  # a study without trials
    for value, state in [(0.25, TrialState.COMPLETE), (0.75, TrialState.COMPLETE),
                         (None, TrialState.PRUNED), (None, TrialState.FAIL)]:
        t = study.ask()
        study.tell(t, value, state=state)
    study.ask()  # RUNNING
    for owner, job_id in [("alice", bare_id), ("alice", busy_id), (None, busy_id)]:
        expected = jobs.job_public(db, jobs.get_job(db, owner, job_id))
        assert jobs.job_view(db, owner, job_id) == expected
    assert jobs.job_view(db, None, busy_id)["counts"] == {
        "complete": 2, "pruned": 1, "failed": 1, "running": 1, "waiting": 0}
    assert jobs.job_view(db, None, busy_id)["best_value"] == 0.75
    for owner, job_id in [("bob", busy_id), ("alice", 10**6)]:
        with pytest.raises(NotFound, match=f"no job {job_id}"):
            jobs.job_view(db, owner, job_id)


def test_read_page_builds_trials_as_optuna_does(db):
    """trial_store.read_page builds FrozenTrials from rows, without Optuna's ORM: equal to
    Optuna's own for every kind of parameter, stored infinities and NaN, attributes of both
    kinds, several objectives, and trials that never started or finished."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    dists = {"lr": FloatDistribution(1e-5, 1.0, log=True), "q": FloatDistribution(0, 1, step=0.1),
             "n": IntDistribution(1, 64, log=True), "c": CategoricalDistribution(
                 [None, 2, 2.5, "s", True])}
    study = _study(db)
    for i, value in enumerate([0.5, math.inf, -math.inf]):
        t = study.ask(dists)
        for step, v in enumerate([0.1, math.nan, math.inf, -math.inf, 1e-300][: i + 3]):
            t.report(v, step * 3)
        t.set_user_attr("nested", {"a": [1, None, "\u202e"], "i": i})
        db.storage.set_trial_system_attr(trial_store.trial_id(t), "sys", [i, "x"])
        study.tell(t, value)
    study.enqueue_trial({"lr": 0.01})  # WAITING: no start time
    study.ask()  # RUNNING
    two = optuna.create_study(study_name="job-2", storage=db.storage,
                              directions=["minimize", "maximize"])
    t = two.ask(dists)
    two.tell(t, [1.5, -math.inf])
    for s_, name in ((study, "job-1"), (two, "job-2")):
        page = trial_store.read_page(db, name, -1, 100)
        assert [_nan_equal(t) for t in page.trials] == [
            _nan_equal(t) for t in s_.get_trials(deepcopy=False)]
        assert page.total == len(page.trials) and page.retried_as == {}
    assert trial_store.read_page(db, "no-such-study", -1, 10) is None


def _nan_equal(trial: optuna.trial.FrozenTrial) -> dict:
    """The trial's fields, NaN intermediate values as a string (NaN equals nothing)."""
    fields = dict(trial.__dict__)
    fields["intermediate_values"] = {k: "nan" if math.isnan(v) else v
                                     for k, v in trial.intermediate_values.items()}
    return fields


@pytest.mark.parametrize("full_every", [1, 7, 10**9])
def test_rung_reader_decides_as_optuna_reading_each_value_once(db, full_every):
    expected = decisions(optuna.pruners.SuccessiveHalvingPruner(min_resource=1,
                                                                reduction_factor=3), "minimize")
    reader = trial_store.RungReader(db, "job-rungs", full_every=full_every)
    ours = BoundedSuccessiveHalvingPruner(min_resource=1, reduction_factor=3, rungs=reader)
    assert decisions(ours, "minimize", storage=db.storage, study_name="job-rungs") == expected
    study = optuna.load_study(study_name="job-rungs", storage=db.storage)
    recorded = sum(k.startswith("completed_rung_") for t in study.get_trials()
                   for k in t.system_attrs)
    assert recorded > 60
    if full_every == 10**9:  # incremental only: every recorded value read exactly once
        assert reader.rows_read == recorded
    else:  # the periodic whole reads read more
        assert reader.rows_read > recorded
    with pytest.raises(ValueError, match="job-rungs"):
        reader(optuna.create_study(study_name="other"), "completed_rung_0")
