"""The artifact store on S3 (HPTUNE_ARTIFACT_STORE=s3://<bucket>, Optuna's Boto3ArtifactStore)
against an S3-compatible HTTP server on loopback (moto's), with a real SQLite database and
real Optuna studies: models stored, read back, kept for the best trials only, and deleted
with their job."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import boto3
import httpx
import pytest
from optuna.artifacts.exceptions import ArtifactNotFound

from search import JobSpec
from service import artifacts, scheduler
from service.artifacts import MODEL, ArtifactStore, WorkerArtifacts
from service.errors import NotFound
from service.jobs import cancel_job, create_job, delete_job, load_job_study
from service.migrate import upgrade
from service.settings import Settings
from service.spawn import free_port

BUCKET = "hptune-artifacts"
SPEC = {"name": "s3", "dataset": "digits", "n_trials": 10, "max_epochs": 2,
        "pruner": {"name": "none"}, "warm_start": {"center": False}}


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"moto's S3 server did not start (rc={proc.poll()})")
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.kill()
    proc.wait()


def _objects() -> set[str]:
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET)
    return {o["Key"] for o in listed.get("Contents", [])}


def test_models_on_s3_kept_read_and_deleted(s3_endpoint, tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'hptune.db'}",
                        artifact_store=f"s3://{BUCKET}", keep_models=2)
    db = scheduler.open_database(settings)
    upgrade(db)
    job = create_job(db, "alice", JobSpec.model_validate(SPEC))
    study = load_job_study(db, job)
    bodies = {}
    for value in (0.5, 0.9, 0.7, 0.8):
        trial = study.ask()
        bodies[trial.number] = os.urandom(3000)
        WorkerArtifacts(db, job.id).save_model(trial, bodies[trial.number])
        study.tell(trial, value)
    assert len(_objects()) == 4  # the bytes are in the bucket, not the database
    artifacts.retain(db, job.id)
    ranked = artifacts.ranked_models(db, job)
    assert [n for n, _ in ranked] == [1, 3]  # 0.9 and 0.8: the two best
    assert _objects() == {a for _, a in ranked}
    store = ArtifactStore(db)
    for number, artifact_id in ranked:
        assert store.read(artifact_id) == bodies[number]
    with pytest.raises(NotFound, match="1, 3"):
        artifacts.model_of(db, job, 0)
    with pytest.raises(ArtifactNotFound):
        store.open_reader("00000000-0000-4000-8000-000000000000")
    assert artifacts.job_artifact_bytes(db, job.id)[MODEL] == 6000

    cancel_job(db, "alice", job.id)
    delete_job(db, "alice", job.id)
    assert _objects() == set()
    db.dispose()


def test_s3_store_setting_is_checked():
    with pytest.raises(ValueError, match="bucket"):
        Settings(artifact_store="s3://")
