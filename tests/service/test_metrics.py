"""service/metrics.py in process, on SQLite and a real PostgreSQL: what a scrape says, and that
its cost in queries does not grow with the number of finished jobs."""

from __future__ import annotations

import re
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, func, select
from starlette.testclient import TestClient

from search import trial_to_dict
from search.report import epochs_saved
from service import jobs, metrics
from service.api import create_app
from service.keys import create_key
from service.lifecycle import extend_job
from service.migrate import upgrade
from service.models import job_stats
from service.scheduler import open_database
from service.settings import Settings
from service.worker import Worker

JOB = {"n_trials": 3, "max_epochs": 4, "model": {"hidden_layers": [8]},
       "pruner": {"name": "none"}, "early_stopping": {"patience": 1}}


@pytest.fixture
def scraper(backend, monkeypatch):
    monkeypatch.setattr(metrics, "TRIAL_STATS_TTL_S", 0.0)  # every scrape reads afresh
    # key_cache_seconds=0: every scrape verifies its key in one query. With the 1 s cache, a
    # scrape that took over a second (settling jobs on a loaded machine) let the next one
    # verify again, one query more, while a faster one did not.
    settings = Settings(database_url=backend.url, max_active_jobs_per_owner=100,
                        key_cache_seconds=0)
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
                # The app's reaper thread (service/api.py) shares the engine: its rounds are
                # no part of a scrape's cost (under load, one fell within a scrape).
                if threading.current_thread().name != "reaper":
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


def _trial_states(families: dict) -> dict[str, float]:
    return {s.labels["state"]: s.value for s in families["hptune_trials"].samples}


def _saved(families: dict) -> dict[str, float]:
    return {s.labels["cause"]: s.value for s in families["hptune_epochs_saved"].samples}


def test_an_ended_job_is_summed_once_and_kept_across_processes(scraper):
    db, run_jobs, scrape = scraper
    run_jobs(2)
    first, _ = scrape()
    with db.session() as s:  # both ended jobs now have their stats row
        assert s.execute(select(func.count()).select_from(job_stats)).scalar() == 2
    # A fresh registry (another API process, or a restart) reads the rows, not the trials:
    # the same queries as any scrape with nothing live (no trial is read).
    fresh = metrics.metrics_registry(db)
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        if threading.current_thread().name != "reaper":  # the app's reaper shares the engine
            statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        text = metrics.render(fresh).decode()
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert not [q for q in statements if re.search(r"\btrials\b", q)], statements
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert _trial_states(families) == _trial_states(first)
    assert _saved(families) == _saved(first)


def test_an_extended_job_is_summed_again_when_it_ends_again(scraper):
    db, run_jobs, scrape = scraper
    run_jobs(1)
    before, _ = scrape()
    assert _trial_states(before)["COMPLETE"] + _trial_states(before)["PRUNED"] == 3
    (job,), _ = jobs.list_jobs(db, None)
    extend_job(db, None, job.id, 5)
    during, _ = scrape()  # re-opened: its trials are summed live, not from the stale row
    assert _trial_states(during)["COMPLETE"] + _trial_states(during)["PRUNED"] == 3
    Worker(db, "metrics-worker").run(max_trials=2)
    after, _ = scrape()
    assert _trial_states(after)["COMPLETE"] + _trial_states(after)["PRUNED"] == 5
    with db.session() as s:
        (row,) = s.execute(select(job_stats)).all()
    assert row.complete + row.pruned == 5


def test_a_deleted_job_leaves_the_totals(scraper):
    db, run_jobs, scrape = scraper
    run_jobs(2)
    scrape()
    rows, _ = jobs.list_jobs(db, None)
    jobs.delete_job(db, None, rows[0].id)
    families, _ = scrape()
    assert _trial_states(families)["COMPLETE"] + _trial_states(families)["PRUNED"] == 3
    assert families["hptune_jobs"].samples  # still answers


def test_ended_jobs_are_summed_a_few_per_scrape(scraper, monkeypatch):
    db, run_jobs, scrape = scraper
    monkeypatch.setattr(metrics, "SETTLE_PER_SCRAPE", 1)
    run_jobs(3)
    trials = [t for job in jobs.list_jobs(db, None)[0] for t in jobs.study_trials(db, job)]
    expected = {"pruned": 0.0, "early_stopped": 0.0}
    for t in trials:
        s = epochs_saved(trial_to_dict(t), JOB["max_epochs"])
        if s is not None:
            expected[s[0]] += s[1]
    seen = []
    for _ in range(3):
        families, _ = scrape()
        # Counts and durations are exact at once; epochs saved as the jobs are summed.
        assert _trial_states(families)["COMPLETE"] + _trial_states(families)["PRUNED"] == 9
        seen.append(_saved(families))
    with db.session() as s:
        assert s.execute(select(func.count()).select_from(job_stats)).scalar() == 3
    assert seen[-1] == pytest.approx(expected)
