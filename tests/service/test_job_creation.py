"""Crash-safe job creation: a process that dies anywhere inside create_job leaves either no
job or one that the reaper finishes creating and that then runs to the end.

In process, on a real SQLite file: the repair itself (no study, a half-made one, a finished
one whose name was never stored, warm starts, specs that no longer validate, the job's lock
against create_job). Then real `hptune serve` processes on SQLite and PostgreSQL that exit at
each step of creation (HPTUNE_TEST_CRASH_IN_CREATE), and a normal server on the same database
that must leave no job stuck.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import httpx
import optuna
import pytest
from pydantic import ValidationError
from sqlalchemy import update

from search import JobSpec, create_study, study_name_for, trials_to_dicts
from search.study import STUDY_READY_ATTR, distributions, study_is_ready
from service import jobs, reaper, scheduler
from service.keys import create_key
from service.migrate import upgrade
from service.models import Job, utcnow
from service.settings import Settings
from service.spawn import tls_context
from service.worker import Worker
from tests.conftest import start_server, stop_server

# A tiny job: three trials of an 8-unit network, two epochs each, on iris.
SPEC = {"name": "crash-safe", "dataset": "iris", "n_trials": 3, "max_epochs": 2,
        "sampler": {"name": "random", "seed": 0}, "model": {"hidden_layers": [8]}}
LONG_AGO_S = 3600


@pytest.fixture
def db(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'create.db'}",
                        creation_grace_seconds=30)
    database = scheduler.open_database(settings)
    upgrade(database)
    yield database
    database.dispose()


def _stored(spec: dict) -> dict:
    return JobSpec.model_validate(spec).model_dump(mode="json")


def _orphan(db, spec: dict | None = None, age_s: float = LONG_AGO_S, owner: str = "alice"
            ) -> int:
    """A job row as create_job commits it before its study exists, `age_s` seconds old."""
    spec = spec if spec is not None else _stored(SPEC)
    with db.session() as s:
        job = Job(owner=owner, name=spec.get("name", "orphan"), spec=spec, status="queued",
                  n_trials=spec.get("n_trials", 3), reserved=0, claims=0,
                  created_at=utcnow() - timedelta(seconds=age_s))
        s.add(job)
        s.flush()
        return job.id


def _attrs(job_id: int) -> dict:
    return {"job_id": job_id, "job_name": SPEC["name"], "owner": "alice",
            "dataset": SPEC["dataset"], "n_trials": SPEC["n_trials"]}


def _study(db, job_id: int) -> optuna.Study:
    return optuna.load_study(study_name=study_name_for(job_id), storage=db.storage)


def _waiting(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))


def _assert_repaired(db, job_id: int) -> optuna.Study:
    job = jobs.get_job(db, None, job_id)
    assert job.study_name == study_name_for(job_id), job.study_name
    assert job.status == "queued" and job.error is None, (job.status, job.error)
    study = _study(db, job_id)
    attrs = study.user_attrs
    assert attrs[STUDY_READY_ATTR] is True and attrs["repaired"] is True, attrs
    assert attrs["spec"] == job.spec
    assert {k: attrs[k] for k in _attrs(job_id)} == _attrs(job_id)
    # The centre of the search space, queued once.
    assert len(_waiting(study)) == 1, study.get_trials()
    return study


def test_reaper_creates_the_study_of_a_job_left_without_one_and_the_job_runs(db):
    """A crash right after the job's row was committed: after the grace period the reaper
    creates the study from the stored spec, and the job runs to exactly n_trials."""
    job_id = _orphan(db, age_s=0)
    reaper.reap(db)  # within the grace period: its creator may still be at work
    assert jobs.get_job(db, None, job_id).study_name is None
    assert study_is_ready(db.storage, study_name_for(job_id), JobSpec(**SPEC)) is None
    assert scheduler.claimable_jobs(db) == []

    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(created_at=utcnow() - timedelta(seconds=LONG_AGO_S)))
    reaper.reap(db)
    _assert_repaired(db, job_id)

    Worker(db, "repair-worker").run(max_trials=3)
    reaper.reap(db)
    job = jobs.get_job(db, None, job_id)
    assert job.status == "succeeded", (job.status, job.error)
    trials = trials_to_dicts(jobs.study_trials(db, job))
    assert sum(t["state"] in ("COMPLETE", "PRUNED") for t in trials) == 3, trials
    assert len(trials) == 3, trials


def test_a_half_made_study_is_made_again(db):
    """A crash inside create_study (the study exists, the ready mark does not): the repair
    deletes it and creates it again, so nothing it had queued runs twice."""
    job_id = _orphan(db)
    name = study_name_for(job_id)
    spec = JobSpec(**SPEC)

    class Died(Exception):
        pass

    def die() -> None:
        raise Died

    with pytest.raises(Died):  # the bare study, without attributes or queued trials
        create_study(spec, db.storage, name, _attrs(job_id), on_created=die)
    assert study_is_ready(db.storage, name, spec) is False
    reaper.reap(db)
    first = _assert_repaired(db, job_id)

    # Past its queued trials, before the mark (as if set_user_attr never ran).
    other = _orphan(db)
    half = create_study(spec, db.storage, study_name_for(other), _attrs(other))
    half.set_user_attr(STUDY_READY_ATTR, False)
    half.set_user_attr("left_by_the_dead_creator", True)
    assert len(_waiting(half)) == 1
    reaper.reap(db)
    study = _assert_repaired(db, other)
    assert "left_by_the_dead_creator" not in study.user_attrs  # made again, not patched
    assert first.user_attrs["job_id"] == job_id


def test_a_finished_study_whose_name_was_never_stored_is_adopted(db):
    """A crash after create_study returned: the study is complete, only the job's
    study_name is missing; the repair stores it and keeps the study (and its id)."""
    job_id = _orphan(db)
    made = create_study(JobSpec(**SPEC), db.storage, study_name_for(job_id), _attrs(job_id))
    assert study_is_ready(db.storage, study_name_for(job_id), JobSpec(**SPEC)) is True
    assert reaper.repair_half_created(db, job_id) is True
    study = _assert_repaired(db, job_id)
    assert study._study_id == made._study_id
    assert reaper.repair_half_created(db, job_id) is False  # once only


def test_warm_start_configs_are_recomputed_from_the_earlier_job(db):
    """The repair queues the earlier job's best trials first, as create_job would have."""
    earlier = jobs.create_job(db, "alice", JobSpec(**SPEC))
    study = _study(db, earlier.id)
    dists = distributions(JobSpec(**SPEC))
    best = {"learning_rate": 0.02, "batch_size": 64, "dropout": 0.1, "weight_decay": 1e-4}
    worse = {"learning_rate": 0.2, "batch_size": 128, "dropout": 0.5, "weight_decay": 1e-3}
    for params, value in ((worse, 0.5), (best, 0.9)):
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                  value=value))
    spec = _stored({**SPEC, "warm_start": {"from_job": earlier.id, "top_k": 1}})
    job_id = _orphan(db, spec)
    reaper.reap(db)
    job = jobs.get_job(db, None, job_id)
    assert job.study_name == study_name_for(job_id), (job.status, job.error)
    waiting = _waiting(_study(db, job_id))
    queued = [t.system_attrs["fixed_params"] for t in waiting]
    assert queued == [best], queued


def test_a_job_that_cannot_be_finished_fails_with_the_reason(db):
    """A stored spec that no longer validates, or a warm-start source that is gone: the
    repair fails the job with the reason instead of leaving it queued forever."""
    broken = _orphan(db, {**_stored(SPEC), "n_trials": 0})
    with pytest.raises(ValidationError):
        JobSpec.model_validate(jobs.get_job(db, None, broken).spec)
    gone = _orphan(db, _stored({**SPEC, "warm_start": {"from_job": 999}}))
    reaper.reap(db)
    for job_id, words in ((broken, "n_trials"), (gone, "no job 999")):
        job = jobs.get_job(db, None, job_id)
        assert job.status == "failed", (job.status, job.error)
        assert "cannot be finished" in job.error and words in job.error, job.error
        assert study_is_ready(db.storage, study_name_for(job_id), JobSpec(**SPEC)) is None
    assert reaper.active_job_ids(db) == []


def test_create_job_and_the_repair_never_both_create_the_study(db):
    """create_job's study step and the repair both hold the job's lock, and the repair looks
    again under it: a repair that waited for create_job finds the job done and does nothing."""
    job_id = _orphan(db)  # old enough to repair: create_job was slower than the grace
    result: list[bool] = []
    with db.job_lock(job_id):
        repairer = threading.Thread(target=lambda: result.append(
            reaper.repair_half_created(db, job_id)))
        repairer.start()
        # What create_job does under the lock, while the repair waits for it.
        jobs.create_job_study(db, job_id, "alice", JobSpec(**SPEC), [])
    repairer.join(timeout=60)
    assert result == [False]
    study = _study(db, job_id)
    assert "repaired" not in study.user_attrs, study.user_attrs
    assert len(_waiting(study)) == 1
    assert len(optuna.get_all_study_names(db.storage)) == 1


def test_deleting_a_cancelled_half_created_job_deletes_its_half_made_study(db):
    job_id = _orphan(db, age_s=0)
    with pytest.raises(ZeroDivisionError):
        create_study(JobSpec(**SPEC), db.storage, study_name_for(job_id), _attrs(job_id),
                     on_created=lambda: 1 / 0)
    jobs.cancel_job(db, "alice", job_id)
    jobs.delete_job(db, "alice", job_id)
    assert optuna.get_all_study_names(db.storage) == []


def test_the_crash_setting_is_refused_in_production_and_checked():
    with pytest.raises(ValidationError, match="HPTUNE_TEST_CRASH_IN_CREATE"):
        Settings(environment="production", database_url="postgresql+psycopg://h/db",
                 test_crash_in_create="after_row")
    with pytest.raises(ValidationError):
        Settings(test_crash_in_create="somewhere")


# --- real processes --------------------------------------------------------------------------

# (step, whether the job exists afterwards): before its row commits, the job never was.
CRASH_STEPS = [("before_row", False), ("after_row", True), ("after_study", True),
               ("after_create_study", True)]


def _key(url: str, owner: str) -> str:
    from service.db import Database

    database = Database(Settings(database_url=url), role="test")
    try:
        with database.session() as s:
            return create_key(s, owner)[1]
    finally:
        database.dispose()


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, verify=tls_context(),
                        headers={"Authorization": f"Bearer {key}"})


@pytest.mark.parametrize(("step", "survives"), CRASH_STEPS, ids=[s for s, _ in CRASH_STEPS])
def test_an_api_killed_inside_job_creation_leaves_no_stuck_job(backend, tmp_path, step,
                                                               survives, check_trials):
    crashing = start_server(tmp_path, backend.url, workers=0,
                            extra_env={"HPTUNE_TEST_CRASH_IN_CREATE": step})
    try:
        key = _key(backend.url, "alice")
        with _client(crashing.url, key) as c:
            before = c.get("/api/v1/jobs").json()["count"]
            with pytest.raises(httpx.TransportError):  # the connection drops: no answer
                c.post("/api/v1/jobs", json=SPEC)
        assert crashing.proc.wait(timeout=30) == 1, crashing.log()
        assert f"exiting at {step}" in crashing.log()
    finally:
        stop_server(crashing)

    server = start_server(tmp_path, backend.url, workers=2,
                          extra_env={"HPTUNE_CREATION_GRACE_SECONDS": "1",
                                     "HPTUNE_MAX_ACTIVE_JOBS_PER_OWNER": "2"})
    try:
        with _client(server.url, key) as c:
            listed = c.get("/api/v1/jobs").json()
            assert listed["count"] == before + survives, listed
            for job in listed["data"]:
                done = server.wait_job(c, job["id"], timeout_s=120)
                assert done["status"] == "succeeded", (done, server.log())
                assert done["finished"] == SPEC["n_trials"], done
                assert done["study_name"] == study_name_for(job["id"])
                r = c.get(f"/api/v1/jobs/{job['id']}/trials")
                assert r.status_code == 200, r.text
                check_trials(r.json()["data"], SPEC["n_trials"])
                storage = optuna.storages.RDBStorage(backend.url)
                try:
                    attrs = storage.get_study_user_attrs(
                        storage.get_study_id_from_name(done["study_name"]))
                finally:
                    storage.engine.dispose()
                assert attrs["repaired"] is True and attrs[STUDY_READY_ATTR] is True, attrs
            # Nothing left holding the owner's room: the quota of 2 active jobs is all free.
            extra = [c.post("/api/v1/jobs", json={**SPEC, "n_trials": 1}) for _ in range(3)]
            assert [r.status_code for r in extra] == [201, 201, 429], [r.text for r in extra]
            for r in extra[:2]:
                c.post(f"/api/v1/jobs/{r.json()['id']}/cancel")
    finally:
        stop_server(server)
