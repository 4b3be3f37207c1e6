"""service/artifacts.py in process, on real databases (SQLite file and PostgreSQL) and real
Optuna studies: model retention by the job metric's direction, checkpoint chains of retried
trials, retention of checkpoints, the owner quota, deletion with the job, and artifact ids
that try to leave the directory store."""

from __future__ import annotations

import io
import os
import re
import uuid

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import select
from sqlalchemy.exc import DataError

from search import JobSpec
from service import artifacts, scheduler
from service.artifacts import CHECKPOINT, MODEL, ArtifactStore, WorkerArtifacts
from service.errors import Conflict, NotFound
from service.jobs import cancel_job, create_job, delete_job, get_job, load_job_study
from service.migrate import upgrade
from service.models import Artifact
from service.settings import Settings

SPEC = {"name": "artifacts", "dataset": "digits", "n_trials": 20, "max_epochs": 2,
        "pruner": {"name": "none"}, "warm_start": {"center": False}}
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
MIB = 1 << 20


@pytest.fixture(params=["database", "directory"])
def store_dir(request, tmp_path) -> str | None:
    """None for the database store, else the directory of Optuna's FileSystemArtifactStore."""
    if request.param == "database":
        return None
    path = tmp_path / "artifacts"
    path.mkdir()
    return str(path)


@pytest.fixture
def open_db(backend, store_dir):
    """open_db(**settings) -> a migrated Database on the backend's fresh database."""
    made = []

    def make(**overrides):
        settings = Settings(database_url=backend.url,
                            artifact_store=store_dir or "database", **overrides)
        db = scheduler.open_database(settings)
        upgrade(db)
        made.append(db)
        return db

    yield make
    for db in made:
        db.dispose()


def _job(db, owner: str = "alice", metric: str = "val_accuracy"):
    job = create_job(db, owner, JobSpec.model_validate({**SPEC, "metric": metric}))
    return job, load_job_study(db, job)


def _blob(n: int, size: int = 1000) -> bytes:
    return bytes([n % 251]) * 7 + os.urandom(size - 7)


def _complete(db, job, study, value: float, body: bytes) -> int:
    """One trial as the runner ends it: the model saved, then the value told."""
    trial = study.ask()
    WorkerArtifacts(db, job.id).save_model(trial, body)
    study.tell(trial, value)
    return trial.number


def _rows(db, job_id: int, kind: str | None = None) -> dict[str, int]:
    """{artifact id: trial number} of the job's stored artifacts (of `kind`)."""
    with db.session() as s:
        q = select(Artifact.id, Artifact.trial_number).where(Artifact.job_id == job_id)
        if kind is not None:
            q = q.where(Artifact.kind == kind)
        return {a: n for a, n in s.execute(q)}


def _files(db) -> set[str]:
    where = db.settings.artifact_store
    return set() if where == "database" else set(os.listdir(where))


def _by_trial(db, job_id: int, kind: str) -> dict[int, str]:
    return {n: a for a, n in _rows(db, job_id, kind).items()}


@pytest.mark.parametrize(("metric", "best"), [("val_accuracy", [1, 3]), ("val_loss", [0, 4])])
def test_retain_keeps_the_best_models_by_the_metrics_direction(open_db, metric, best):
    db = open_db(keep_models=2)
    job, study = _job(db, metric=metric)
    values = [0.5, 0.9, 0.7, 0.8, 0.6]
    bodies = {n: _blob(n, 1000 + n) for n in range(len(values))}
    assert [_complete(db, job, study, v, bodies[i]) for i, v in enumerate(values)] == \
        list(range(5))
    assert len(_rows(db, job.id, MODEL)) == 5  # nothing dropped before retain
    artifacts.retain(db, job.id)

    kept = _by_trial(db, job.id, MODEL)
    assert sorted(kept) == sorted(best)
    store = ArtifactStore(db)
    for number, artifact_id in kept.items():
        assert store.read(artifact_id) == bodies[number]
    if db.settings.artifact_store != "database":
        assert _files(db) == set(kept.values())  # the dropped models' files are gone
    assert artifacts.model_of(db, job, None) == (best[0], kept[best[0]])
    assert artifacts.model_of(db, job, best[1]) == (best[1], kept[best[1]])
    dropped = next(n for n in range(5) if n not in best)
    with pytest.raises(NotFound) as err:
        artifacts.model_of(db, job, dropped)
    assert f"for trial {dropped}" in str(err.value)
    assert f"{best[0]}, {best[1]}" in str(err.value)
    # Each kept model is linked to its trial for optuna-dashboard.
    frozen = study.trials[best[0]]
    metas = optuna.artifacts.get_all_artifact_meta(frozen, storage=db.storage)
    assert kept[best[0]] in {m.artifact_id for m in metas}


def test_a_model_saved_before_its_trial_is_told_survives_anothers_retain(open_db):
    """The runner saves a model, then tells; another worker's retain in between (its own
    trial just ended) must not judge the still-RUNNING trial as one without a value."""
    db = open_db(keep_models=1)
    job, study = _job(db)
    _complete(db, job, study, 0.5, _blob(0))
    late = study.ask()
    body = _blob(1)
    WorkerArtifacts(db, job.id).save_model(late, body)
    artifacts.retain(db, job.id)  # the other worker settles its trial
    assert late.number in _by_trial(db, job.id, MODEL)
    study.tell(late, 0.9)
    artifacts.retain(db, job.id)
    number, artifact_id = artifacts.model_of(db, job, None)
    assert number == late.number and ArtifactStore(db).read(artifact_id) == body
    assert list(_by_trial(db, job.id, MODEL)) == [late.number]


def test_no_model_yet_is_not_found(open_db):
    db = open_db()
    job, _ = _job(db)
    with pytest.raises(NotFound, match="no stored model yet"):
        artifacts.model_of(db, job, None)


def _retry(study, failed_number: int) -> optuna.Trial:
    """Queue the failed trial again as the scheduler does, and take the retry."""
    frozen = study.trials[failed_number]
    assert frozen.state == TrialState.FAIL
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, frozen)
    retry = study.ask()
    assert study.trials[retry.number].system_attrs["retry_history"][-1] == failed_number
    return retry


def test_checkpoints_keep_the_latest_and_a_retry_resumes_the_chain(open_db):
    db = open_db()
    job, study = _job(db)
    arts = WorkerArtifacts(db, job.id)
    first = study.ask()
    arts.save_checkpoint(first, b"epoch-2")
    arts.save_checkpoint(first, b"epoch-4")
    only = _rows(db, job.id, CHECKPOINT)
    assert list(only.values()) == [first.number]
    assert ArtifactStore(db).read(next(iter(only))) == b"epoch-4"
    if db.settings.artifact_store != "database":
        assert _files(db) == set(only)
    assert arts.load_checkpoint(first) is None  # not a retry: starts fresh
    study.tell(first, state=TrialState.FAIL)

    second = _retry(study, first.number)
    assert arts.load_checkpoint(second) == b"epoch-4"
    arts.save_checkpoint(second, b"epoch-6")
    study.tell(second, state=TrialState.FAIL)
    third = _retry(study, second.number)
    assert study.trials[third.number].system_attrs["retry_history"] == \
        [first.number, second.number]
    assert arts.load_checkpoint(third) == b"epoch-6"  # the chain's latest, not the first's

    fresh = study.ask()
    assert arts.load_checkpoint(fresh) is None


def test_retain_drops_finished_trials_checkpoints_then_all_once_the_job_ends(open_db):
    db = open_db()
    job, study = _job(db)
    arts = WorkerArtifacts(db, job.id)
    trials = {state: study.ask() for state in ("complete", "pruned", "fail", "running")}
    for name, trial in trials.items():
        arts.save_checkpoint(trial, name.encode())
    study.tell(trials["complete"], 0.5)
    study.tell(trials["pruned"], state=TrialState.PRUNED)
    study.tell(trials["fail"], state=TrialState.FAIL)
    artifacts.retain(db, job.id)
    left = _by_trial(db, job.id, CHECKPOINT)
    assert sorted(left) == sorted([trials["fail"].number, trials["running"].number])
    assert ArtifactStore(db).read(left[trials["fail"].number]) == b"fail"
    if db.settings.artifact_store != "database":
        assert _files(db) == set(left.values())

    cancel_job(db, None, job.id)
    artifacts.retain(db, job.id)
    assert _rows(db, job.id, CHECKPOINT) == {}
    assert _files(db) == set()


def test_owner_quota_skips_models_and_checkpoints_without_error(open_db):
    db = open_db(max_artifact_bytes_per_owner=MIB)
    job, study = _job(db, owner="alice")
    arts = WorkerArtifacts(db, job.id)
    kept = _complete(db, job, study, 0.5, _blob(0, 700_000))
    over = study.ask()
    arts.save_model(over, _blob(1, 400_000))  # 1_100_000 > 1 MiB: not stored, no exception
    study.tell(over, 0.9)
    frozen = study.trials[over.number]
    assert "would exceed" in frozen.user_attrs["model_not_kept"]
    assert "model_not_kept" not in study.trials[kept].user_attrs
    assert list(_rows(db, job.id).values()) == [kept]
    running = study.ask()
    arts.save_checkpoint(running, _blob(2, 400_000))  # skipped quietly as well
    assert list(_rows(db, job.id).values()) == [kept]
    if db.settings.artifact_store != "database":
        assert len(_files(db)) == 1
    assert artifacts.job_artifact_bytes(db, job.id) == {CHECKPOINT: 0, MODEL: 700_000}
    assert artifacts.model_of(db, job, None)[0] == kept  # the better trial has no model

    other, other_study = _job(db, owner="bob")
    body = _blob(3, 700_000)
    number = _complete(db, other, other_study, 0.5, body)
    WorkerArtifacts(db, other.id).save_checkpoint(other_study.ask(), b"x" * 1000)
    assert artifacts.job_artifact_bytes(db, other.id) == {CHECKPOINT: 1000, MODEL: 700_000}
    _, artifact_id = artifacts.model_of(db, other, number)
    assert ArtifactStore(db).read(artifact_id) == body


def test_quota_counts_every_job_of_the_owner(open_db):
    db = open_db(max_artifact_bytes_per_owner=MIB)
    a, study_a = _job(db)
    b, study_b = _job(db)
    _complete(db, a, study_a, 0.5, _blob(0, 600_000))
    trial = study_b.ask()
    WorkerArtifacts(db, b.id).save_model(trial, _blob(1, 600_000))
    assert "model_not_kept" in study_b.trials[trial.number].user_attrs
    assert _rows(db, b.id) == {}


def test_delete_job_removes_every_artifact(open_db):
    db = open_db()
    job, study = _job(db)
    keep, _ = _job(db)  # another job of the owner: untouched
    arts = WorkerArtifacts(db, job.id)
    _complete(db, job, study, 0.5, _blob(0, 3000))
    _complete(db, job, study, 0.7, _blob(1, 2000))
    running = study.ask()
    arts.save_checkpoint(running, b"c" * 500)
    other_study = load_job_study(db, keep)
    _complete(db, keep, other_study, 0.5, _blob(2, 100))
    assert artifacts.job_artifact_bytes(db, job.id) == {CHECKPOINT: 500, MODEL: 5000}
    assert len(_rows(db, job.id)) == 3
    if db.settings.artifact_store != "database":
        assert len(_files(db)) == 4

    with pytest.raises(Conflict, match="cancel it first"):
        delete_job(db, None, job.id)  # an active job keeps its artifacts
    assert len(_rows(db, job.id)) == 3
    cancel_job(db, None, job.id)
    delete_job(db, None, job.id)
    with pytest.raises(NotFound):
        get_job(db, None, job.id)
    assert _rows(db, job.id) == {}
    assert artifacts.job_artifact_bytes(db, job.id) == {CHECKPOINT: 0, MODEL: 0}
    assert artifacts.job_artifact_bytes(db, keep.id) == {CHECKPOINT: 0, MODEL: 100}
    if db.settings.artifact_store != "database":
        assert _files(db) == set(_rows(db, keep.id))


def test_saved_artifact_ids_are_uuid4(open_db):
    """Every id our save paths make is a uuid4: nothing a user sends names a file."""
    db = open_db()
    job, study = _job(db)
    arts = WorkerArtifacts(db, job.id)
    trial = study.ask()
    arts.save_checkpoint(trial, b"a")
    arts.save_checkpoint(trial, b"b")
    arts.save_model(trial, b"onnx")
    ids = set(_rows(db, job.id))
    assert len(ids) == 2 and all(UUID4.match(i) for i in ids), ids
    if db.settings.artifact_store != "database":
        assert _files(db) == ids


@pytest.mark.parametrize("hostile", ["../escape", "sub/../../escape", "..", "<absolute>"])
def test_directory_store_refuses_ids_that_leave_it(backend, tmp_path, hostile):
    root = tmp_path / "store" / "artifacts"
    root.mkdir(parents=True)
    settings = Settings(database_url=backend.url, artifact_store=str(root))
    db = scheduler.open_database(settings)
    try:
        upgrade(db)
        job, _ = _job(db)
        store = ArtifactStore(db)
        secret = tmp_path / "store" / "escape"
        secret.write_bytes(b"outside")
        hostile = str(secret) if hostile == "<absolute>" else hostile
        with pytest.raises(ValueError, match="Invalid artifact_id"):
            store.open_reader(hostile)
        with pytest.raises(ValueError, match="Invalid artifact_id"):
            store.remove(hostile)
        # Refused by Optuna's path check, or first by the id column (36 characters).
        with pytest.raises((ValueError, DataError)):
            store.bound(job, 0, MODEL).write(hostile, io.BytesIO(b"overwrite"))
        assert secret.read_bytes() == b"outside"
        assert not (tmp_path / "escape").exists() and os.listdir(root) == []
    finally:
        db.dispose()


def test_database_store_reads_no_unknown_id(open_db):
    db = open_db()
    with pytest.raises(optuna.artifacts.exceptions.ArtifactNotFound):
        ArtifactStore(db).open_reader(str(uuid.uuid4()))
