"""service/lifecycle.py and its routes, client methods and CLI commands, in process on a real
SQLite file: extending a job (PATCH /api/v1/jobs/{id}) and resuming a cancelled one (POST
/api/v1/jobs/{id}/resume), their exact slot counts, timeout window and every error path.
Real worker processes on both backends: test_lifecycle_workers.py."""

from __future__ import annotations

import datetime as dt

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import update
from starlette.testclient import TestClient
from typer.testing import CliRunner

from service import cli, reaper, scheduler, trial_store
from service.client import ApiError, Client
from service.models import Job
from service.status import JobStatus
from service.worker import Worker
from tests.conftest import in_process_app, key_headers
from trainer import StopReason

TINY = {"n_trials": 2, "max_epochs": 2, "model": {"hidden_layers": [4]}}


@pytest.fixture
def app_db(tmp_path):
    with in_process_app(tmp_path / "lifecycle.db",
                        max_queued_trials_per_owner=10, max_active_jobs_per_owner=3) as pair:
        yield pair


def _submit(client: TestClient, **spec) -> int:
    r = client.post("/api/v1/jobs", json={**TINY, **spec})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _run(db, n: int) -> None:
    """Exactly `n` trials by an in-process worker (it stops after its n-th)."""
    Worker(db, "lifecycle-worker").run(max_trials=n)


def _job(client: TestClient, job_id: int) -> dict:
    r = client.get(f"/api/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _trials(db, job_id: int) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=f"job-{job_id}", storage=db.storage).get_trials()


def _set(db, job_id: int, **values) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def _error(r, status: int, field: str | None = None) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    if field is not None:
        assert [e["field"] for e in body["errors"]] == [field], body
    return body["detail"]


def _claim_and_ask(db, job_id: int) -> bool:
    """One claim as a worker makes it: a slot under the job's lock, then the trial."""
    with db.job_lock(job_id):
        claim = scheduler.claim_slot(db, job_id)
        if claim is None:
            return False
        optuna.load_study(study_name=claim.study_name, storage=db.storage).ask()
        return True


def test_extending_a_succeeded_job_runs_it_again_to_exactly_the_new_count(app_db):
    client, db = app_db
    job_id = _submit(client)
    _run(db, 2)
    before = _job(client, job_id)
    assert before["status"] == "succeeded" and before["finished_at"] is not None
    first = [(t.number, t.state, t.params) for t in _trials(db, job_id)]

    r = client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 4})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job == _job(client, job_id)  # the GET presenter
    assert job["status"] == "queued" and job["n_trials"] == 4 and job["spec"]["n_trials"] == 4
    assert job["finished"] == 2 and job["finished_at"] is None and job["started_at"] is None
    assert job["study_name"] == before["study_name"]
    attrs = optuna.load_study(study_name=job["study_name"], storage=db.storage).user_attrs
    assert attrs["n_trials"] == 4 and attrs["spec"]["n_trials"] == 4

    _run(db, 2)
    after = _job(client, job_id)
    assert after["status"] == "succeeded" and after["finished"] == 4, after
    trials = _trials(db, job_id)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [(t.number, t.state, t.params) for t in trials[:2]] == first  # history kept
    assert not _claim_and_ask(db, job_id)  # no fifth slot


def test_extending_a_running_job_frees_exactly_the_new_slots(app_db):
    client, db = app_db
    job_id = _submit(client)
    assert _claim_and_ask(db, job_id) and _claim_and_ask(db, job_id)
    assert not _claim_and_ask(db, job_id)  # both slots held
    started = _job(client, job_id)["started_at"]
    r = client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 3})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running" and r.json()["started_at"] == started
    assert _claim_and_ask(db, job_id)
    assert not _claim_and_ask(db, job_id)
    assert len(_trials(db, job_id)) == 3


def test_a_refresh_that_counted_against_the_old_n_trials_does_not_end_the_job(app_db):
    """refresh_job settles a job from n_trials it read before an extension committed: its
    status write is for that n_trials only, so the extended job stays active."""
    client, db = app_db
    job_id = _submit(client)
    assert _claim_and_ask(db, job_id)
    assert client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 5}).status_code == 200
    scheduler.set_status(db, job_id, JobStatus.SUCCEEDED, None, n_trials=2)
    assert _job(client, job_id)["status"] == "running"
    scheduler.set_status(db, job_id, JobStatus.SUCCEEDED, None, n_trials=5)
    assert _job(client, job_id)["status"] == "succeeded"


@pytest.mark.parametrize(("body", "field"), [
    ({"n_trials": "20"}, "n_trials"),
    ({"n_trials": 20.5}, "n_trials"),
    ({"n_trials": 20.0}, "n_trials"),
    ({"n_trials": True}, "n_trials"),
    ({"n_trials": None}, "n_trials"),
    ({"n_trials": -3}, "n_trials"),
    ({"n_trials": 0}, "n_trials"),
    ({"n_trials": 10_001}, "n_trials"),
    ({"n_trials": 10**12}, "n_trials"),
    ({"n_trials": 10**30}, "n_trials"),
    ({}, "n_trials"),
    ({"n_trials": 20, "status": "queued"}, "status"),
    ([20], None),
])
def test_hostile_bodies_are_refused_naming_the_field(app_db, body, field):
    client, _ = app_db
    job_id = _submit(client)
    _error(client.patch(f"/api/v1/jobs/{job_id}", json=body), 422, field)
    assert _job(client, job_id)["n_trials"] == 2


def test_a_body_that_is_not_json_is_refused(app_db):
    client, _ = app_db
    job_id = _submit(client)
    r = client.patch(f"/api/v1/jobs/{job_id}", content=b"n_trials=20",
                     headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("n_trials", [1, 2])
def test_n_trials_not_above_the_jobs_answers_422(app_db, n_trials):
    client, _ = app_db
    job_id = _submit(client)
    detail = _error(client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": n_trials}),
                    422, "n_trials")
    assert "more than" in detail and "2" in detail, detail


def test_n_trials_over_the_servers_limit_answers_422(app_db, monkeypatch):
    client, db = app_db
    job_id = _submit(client)
    monkeypatch.setattr(db.settings, "max_trials_per_job", 5)
    detail = _error(client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 6}), 422,
                    "n_trials")
    assert "<= 5" in detail


def test_the_trial_quota_counts_the_extension(app_db):
    """The quota (10 unfinished trials) counts the job's trials once, as a creation would."""
    client, db = app_db
    job_id = _submit(client, n_trials=4)
    other = _submit(client, n_trials=3)
    r = client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 8})
    assert _error(r, 429, "n_trials").startswith("alice has 3 unfinished trials")
    assert r.headers["retry-after"] == "60"
    assert client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 7}).status_code == 200
    # Finished trials hold no room: with 7 finished, the job may grow to 17.
    client.post(f"/api/v1/jobs/{other}/cancel")
    _run(db, 7)
    assert _job(client, job_id)["status"] == "succeeded"
    assert client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 18}).status_code == 429
    assert client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 17}).status_code == 200


def test_the_active_jobs_quota_counts_a_job_made_active_again_once(app_db):
    """3 active jobs at most: an active job may grow, a succeeded one may not come back."""
    client, db = app_db
    done = _submit(client, n_trials=1)
    _run(db, 1)
    active = [_submit(client, n_trials=1) for _ in range(3)]
    assert client.patch(f"/api/v1/jobs/{active[0]}", json={"n_trials": 2}).status_code == 200
    detail = _error(client.patch(f"/api/v1/jobs/{done}", json={"n_trials": 2}), 429,
                    "n_trials")
    assert "3 active jobs" in detail
    client.post(f"/api/v1/jobs/{active[1]}/cancel")
    assert client.patch(f"/api/v1/jobs/{done}", json={"n_trials": 2}).status_code == 200
    detail = _error(client.post(f"/api/v1/jobs/{active[1]}/resume"), 429, "n_trials")
    assert "3 active jobs" in detail
    assert _job(client, active[1])["status"] == "cancelled"


@pytest.mark.parametrize(("status", "hint"), [("cancelled", "resume it first"),
                                              ("failed", "submit a new job")])
def test_extending_a_cancelled_or_failed_job_answers_409(app_db, status, hint):
    client, db = app_db
    job_id = _submit(client)
    if status == "cancelled":
        assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    else:
        _set(db, job_id, status=status, error="2 trials failed")
    detail = _error(client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 5}), 409)
    assert f"is {status}" in detail and hint in detail, detail
    assert _job(client, job_id)["n_trials"] == 2


@pytest.mark.parametrize("status", ["queued", "running", "succeeded", "failed"])
def test_resuming_a_job_that_is_not_cancelled_answers_409(app_db, status):
    client, db = app_db
    job_id = _submit(client)
    if status != "queued":
        _set(db, job_id, status=status)
    detail = _error(client.post(f"/api/v1/jobs/{job_id}/resume"), 409)
    assert f"is {status}" in detail and "only a cancelled job" in detail, detail
    assert _job(client, job_id)["status"] == status


def test_unknown_and_other_owners_jobs_answer_404_admins_reach_every_job(app_db):
    client, _ = app_db
    job_id = _submit(client)
    client.post(f"/api/v1/jobs/{job_id}/cancel")
    for headers in (None, key_headers(client, "bob")):
        target = 999 if headers is None else job_id
        for r in (client.patch(f"/api/v1/jobs/{target}", json={"n_trials": 5}, headers=headers),
                  client.post(f"/api/v1/jobs/{target}/resume", headers=headers)):
            assert _error(r, 404) == f"no job {target}"
    assert _job(client, job_id)["status"] == "cancelled"
    # An admin resumes and extends alice's job; the quota counted is alice's.
    r = client.post(f"/api/v1/jobs/{job_id}/resume", headers=key_headers(client, "admin"))
    assert r.status_code == 200 and r.json()["owner"] == "alice", r.text
    r = client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 11},
                     headers=key_headers(client, "admin"))
    assert _error(r, 429, "n_trials").startswith("alice has 0 unfinished trials")


def test_resume_keeps_the_history_and_runs_to_exactly_n_trials(app_db):
    """A trial the cancel stopped stays FAIL with its reason and frees its slot; the job,
    queued again with a fresh timeout window, ends with exactly n_trials finished."""
    client, db = app_db
    job_id = _submit(client, n_trials=3, timeout_seconds=600)
    _run(db, 1)
    assert _claim_and_ask(db, job_id)  # a trial running when the cancel comes
    # The job began long ago: without a fresh window it would time out at its next claim.
    _set(db, job_id, started_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    study = optuna.load_study(study_name=f"job-{job_id}", storage=db.storage)
    running = study.get_trials(states=(TrialState.RUNNING,))[0]
    # As the worker leaves it once it reads the cancel.
    reaper.fail_trial(db, study, trial_store.trial_id(running), reason=StopReason.CANCELLED)
    history = [(t.number, t.state, t.params, t.user_attrs) for t in _trials(db, job_id)]
    assert [t[1] for t in history] == [TrialState.COMPLETE, TrialState.FAIL]

    r = client.post(f"/api/v1/jobs/{job_id}/resume")
    assert r.status_code == 200, r.text
    job = r.json()
    assert job == _job(client, job_id)  # the GET presenter
    assert job["status"] == "queued" and job["started_at"] is None and job["finished_at"] is None
    assert job["finished"] == 1 and job["counts"]["failed"] == 1 and job["error"] is None
    assert job["study_name"] == f"job-{job_id}"
    _run(db, 2)
    end = _job(client, job_id)
    assert end["status"] == "succeeded" and end["finished"] == 3, end
    restarted = dt.datetime.fromisoformat(end["started_at"])
    assert dt.datetime.now(dt.UTC) - restarted < dt.timedelta(minutes=5)
    trials = _trials(db, job_id)
    assert [t.number for t in trials] == list(range(len(trials)))
    assert [(t.number, t.state, t.params, t.user_attrs) for t in trials[:2]] == history
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3
    assert not _claim_and_ask(db, job_id)


def test_the_405_allow_header_names_the_new_methods(app_db):
    client, _ = app_db
    job_id = _submit(client)
    r = client.put(f"/api/v1/jobs/{job_id}", json={"n_trials": 3})
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH", r.headers
    r = client.get(f"/api/v1/jobs/{job_id}/resume")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers


def test_client_and_cli_extend_and_resume(app_db, monkeypatch):
    client, _ = app_db
    api = Client("http://testserver", None)
    api.http = client  # the TestClient is an httpx.Client with alice's key
    job_id = _submit(client)
    assert api.extend(job_id, 3)["n_trials"] == 3
    with pytest.raises(ApiError, match=r"HTTP 409: job \d+ is queued: only a cancelled"):
        api.resume(job_id)
    api.cancel(job_id)
    assert api.resume(job_id)["status"] == "queued"

    monkeypatch.setattr(cli, "_client", lambda url, key: api)
    runner = CliRunner()
    out = runner.invoke(cli.app, ["extend", str(job_id), "4"])
    assert out.exit_code == 0 and f"job {job_id} queued: 0/4 trials finished" in out.stdout, (
        out.output)
    out = runner.invoke(cli.app, ["extend", str(job_id), "4"])
    assert out.exit_code == 1 and "HTTP 422" in out.stderr and "n_trials" in out.stderr
    assert "Traceback" not in out.output
    out = runner.invoke(cli.app, ["resume", str(job_id)])
    assert out.exit_code == 1 and "HTTP 409" in out.stderr and "is queued" in out.stderr
    api.cancel(job_id)
    out = runner.invoke(cli.app, ["resume", str(job_id)])
    assert out.exit_code == 0 and f"job {job_id} queued" in out.stdout, out.output
    out = runner.invoke(cli.app, ["extend", "x", "4"])
    assert out.exit_code == 2
