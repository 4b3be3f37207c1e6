"""service/jobs.py, scheduler.py, reaper.py and the API around them, in process on a real
SQLite file: the reaper's resilience to a broken job, quotas, report headers, and what a
database outage tells."""

from __future__ import annotations

import datetime as dt

import optuna
import pytest
from sqlalchemy import update
from starlette.testclient import TestClient

from service import reaper, scheduler
from service.api import create_app
from service.keys import create_key
from service.migrate import upgrade
from service.models import Job
from service.settings import Settings
from service.spawn import free_port
from service.worker import Worker

SMALL = {"n_trials": 2, "max_epochs": 2, "model": {"hidden_layers": [8]}}


@pytest.fixture
def app_db(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
                        max_queued_trials_per_owner=10)
    db = scheduler.open_database(settings)
    upgrade(db)
    with db.session() as s:
        _, key = create_key(s, "alice")
        _, admin = create_key(s, "ops", is_admin=True)
    app = create_app(settings, db)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        client.admin = admin
        yield client, db
    db.dispose()


def _submit(client, **spec) -> int:
    r = client.post("/api/v1/jobs", json={**SMALL, **spec})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_reaper_goes_on_past_a_job_whose_study_is_gone(app_db):
    """A study deleted or renamed outside hptune (an admin in optuna-dashboard) fails its
    job with the reason; the jobs after it are still reaped and settled."""
    client, db = app_db
    broken = _submit(client, name="broken")
    later = _submit(client, name="later", timeout_seconds=1)
    optuna.delete_study(study_name=f"job-{broken}", storage=db.storage)
    # `later` started long ago and its timeout has passed: only the reaper can end it.
    with db.session() as s:
        s.execute(update(Job).where(Job.id == later).values(
            status="running", started_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)))
    reaper.reap(db)
    a = client.get(f"/api/v1/jobs/{broken}").json()
    b = client.get(f"/api/v1/jobs/{later}").json()
    assert a["status"] == "failed" and "no longer exists" in a["error"], a
    assert b["status"] == "failed" and b["error"].startswith("timed out"), b
    for path in ("trials", "report", "events"):
        r = client.get(f"/api/v1/jobs/{broken}/{path}")
        assert r.status_code == 404 and "no longer exists" in r.json()["detail"], (path, r.text)


def test_trial_quota_counts_running_trials(app_db):
    """The quota (10 here) holds unfinished trials: a trial that starts keeps its room."""
    client, db = app_db
    job_id = _submit(client, n_trials=8)
    with db.job_lock(job_id):
        claim = scheduler.claim_slot(db, job_id)
        assert claim is not None
        optuna.load_study(study_name=claim.study_name, storage=db.storage).ask()
    r = client.post("/api/v1/jobs", json={**SMALL, "n_trials": 3})
    assert r.status_code == 429, r.text
    assert "8 unfinished trials" in r.json()["detail"]
    assert client.post("/api/v1/jobs", json={**SMALL, "n_trials": 2}).status_code == 201


def test_html_report_has_a_strict_content_security_policy(app_db):
    client, db = app_db
    job_id = _submit(client)
    Worker(db, "report-worker").run(max_trials=2)
    r = client.get(f"/api/v1/jobs/{job_id}/report", params={"format": "html"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp, csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script" not in r.text.lower()  # the policy would block it: the page needs none


def test_an_outage_answers_503_without_the_drivers_words(tmp_path):
    """Host, port and driver text stay in the log, even for a request with a bogus key."""
    pytest.importorskip("psycopg")
    port = free_port()  # nothing listens there
    settings = Settings(database_url=f"postgresql+psycopg://u:pw@127.0.0.1:{port}/nowhere",
                        db_retry_seconds=0)
    app = create_app(settings, scheduler.open_database(settings, retry_seconds=0))
    with TestClient(app) as client:
        for headers in ({"Authorization": "Bearer hpt_bogus"}, {}):
            r = client.get("/readyz", headers=headers)
            assert r.status_code == 503, r.text
            assert str(port) not in r.text and "127.0.0.1" not in r.text, r.text
        r = client.get("/api/v1/jobs", headers={"Authorization": "Bearer hpt_bogus"})
        assert r.status_code == 503, r.text
        assert str(port) not in r.text and "127.0.0.1" not in r.text, r.text
        assert r.json()["detail"] == "database unavailable, try again shortly"


def test_reads_without_an_orm_session_answer_503_in_an_outage():
    """Database.reading (the hot reads' Core connection: GET /jobs/{id}, the trials page)
    maps an outage to DatabaseUnavailable (503) as Database.session does."""
    pytest.importorskip("psycopg")
    from sqlalchemy import text

    from service import jobs, trial_pages
    from service.errors import DatabaseUnavailable

    settings = Settings(database_url=f"postgresql+psycopg://u:pw@127.0.0.1:{free_port()}/no",
                        db_retry_seconds=0)
    db = scheduler.open_database(settings, retry_seconds=0)
    try:
        with pytest.raises(DatabaseUnavailable), db.reading() as conn:
            conn.execute(text("SELECT 1"))
        assert db.seconds_since_outage() < 60
        with pytest.raises(DatabaseUnavailable):
            jobs.job_view(db, None, 1)
        with pytest.raises(DatabaseUnavailable):
            trial_pages.trials_page(db, None, 1, None, 10, trial_pages.TrialJsonCache())
    finally:
        db.dispose()
