"""service/metrics.py in process, on SQLite and a real PostgreSQL: what a scrape says, and that
its cost in queries does not grow with the number of finished jobs."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event
from starlette.testclient import TestClient

from search import trial_to_dict
from search.report import epochs_saved
from service import jobs, metrics
from service.api import create_app
from service.keys import create_key
from service.migrate import upgrade
from service.scheduler import open_database
from service.settings import Settings
from service.worker import Worker

JOB = {"n_trials": 3, "max_epochs": 4, "model": {"hidden_layers": [8]},
       "pruner": {"name": "none"}, "early_stopping": {"patience": 1}}


@pytest.fixture
def scraper(backend, monkeypatch):
    monkeypatch.setattr(metrics, "TRIAL_STATS_TTL_S", 0.0)  # every scrape reads afresh
    settings = Settings(database_url=backend.url, max_active_jobs_per_owner=100)
    db = open_database(settings)
    upgrade(db)
    with db.session() as s:
        _, key = create_key(s, "alice")
        _, admin = create_key(s, "ops", is_admin=True)
    with TestClient(create_app(settings, db)) as client:
        client.headers["Authorization"] = f"Bearer {key}"

        def run_jobs(n: int) -> None:
            for _ in range(n):
                assert client.post("/api/v1/jobs", json=JOB).status_code == 201
            Worker(db, "metrics-worker").run(max_trials=n * JOB["n_trials"])

        def scrape() -> tuple[dict, int]:
            statements = []

            def count(*_args) -> None:
                statements.append(1)

            event.listen(db.engine, "before_cursor_execute", count)
            try:
                r = client.get("/metrics", headers={"Authorization": f"Bearer {admin}"})
            finally:
                event.remove(db.engine, "before_cursor_execute", count)
            assert r.status_code == 200, r.text
            return {f.name: f for f in text_string_to_metric_families(r.text)}, len(statements)

        yield db, run_jobs, scrape
    db.dispose()


def test_a_scrape_counts_what_the_studies_hold(scraper):
    db, run_jobs, scrape = scraper
    run_jobs(2)
    families, _ = scrape()
    rows, _ = jobs.list_jobs(db, None)
    trials = [t for job in rows for t in jobs.study_trials(db, job)]
    by_state = {s.labels["state"]: s.value for s in families["hptune_trials"].samples}
    assert by_state["COMPLETE"] + by_state["PRUNED"] == len(trials) == 6
    hist = {(s.name, s.labels.get("le")): s.value
            for s in families["hptune_trial_duration_seconds"].samples}
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    assert hist[("hptune_trial_duration_seconds_count", None)] == len(durations)
    assert hist[("hptune_trial_duration_seconds_sum", None)] == pytest.approx(sum(durations),
                                                                              abs=0.01)
    for bound in metrics.DURATION_BUCKETS_S:
        expected = sum(d <= bound for d in durations)
        assert hist[("hptune_trial_duration_seconds_bucket", str(bound))] == expected
    saved = {"pruned": 0.0, "early_stopped": 0.0}
    for t in trials:
        s = epochs_saved(trial_to_dict(t), JOB["max_epochs"])
        if s is not None:
            saved[s[0]] += s[1]
    got = {s.labels["cause"]: s.value for s in families["hptune_epochs_saved"].samples}
    assert got == pytest.approx(saved)


def test_a_scrape_costs_the_same_with_more_finished_jobs(scraper, measure):
    _, run_jobs, scrape = scraper
    run_jobs(2)
    scrape()  # finished jobs' sums are kept from here on
    _, few = scrape()
    run_jobs(4)
    scrape()
    _, more = scrape()
    measure("metrics_queries", f"queries per scrape: {few} with 2 finished jobs, {more} with 6")
    assert more == few, (few, more)
