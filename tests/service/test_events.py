"""The event stream's cursor: each trial event's `id` resumes the stream (Last-Event-ID or
?after=) with exactly the changes not yet seen; `limit` ends a connection with a `next`
event; hostile cursors answer 422; and a poll costs the same in a 50- and a 2,000-trial job.
In process on SQLite and PostgreSQL; the trials are written straight into the job's study, and
no reaper runs (the app's lifespan is not entered), so only the test changes them."""

from __future__ import annotations

import json
import random
from datetime import datetime

import optuna
import pytest
from sqlalchemy import event
from starlette.testclient import TestClient

from benchmarks.report_scale import add_trials, synthetic_trial
from service import scheduler, trial_store
from service.api import create_app
from service.events import EVENT_PAGE, Cursor, EventPoller
from service.keys import create_key
from service.migrate import upgrade
from service.settings import Settings

TINY = {"n_trials": 5000, "max_epochs": 1, "model": {"hidden_layers": [4]}}


@pytest.fixture
def app_db(backend):
    settings = Settings(database_url=backend.url, max_queued_trials_per_owner=100_000)
    db = scheduler.open_database(settings)
    upgrade(db)
    with db.session() as s:
        row, key = create_key(s, "alice")
        key_id = row.id
    client = TestClient(create_app(settings, db))  # no lifespan: no reaper thread
    client.headers["Authorization"] = f"Bearer {key}"
    client.key_id = key_id
    yield client, db
    db.dispose()


def _job(client: TestClient) -> tuple[int, optuna.Study]:
    r = client.post("/api/v1/jobs", json=TINY)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    url = client.app.state.db.settings.database_url
    return job_id, optuna.load_study(study_name=f"job-{job_id}", storage=url)


def _complete(study: optuna.Study, value: float) -> int:
    trial = study.ask()
    study.tell(trial, value)
    return trial.number


def _events(body: str) -> list[dict]:
    """The stream's events: {"event", "id" (None without one), "data"}; comments dropped."""
    out = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if line and not line.startswith(":"))
        if fields:
            out.append({"event": fields["event"], "id": fields.get("id"),
                        "data": json.loads(fields["data"])})
    return out


def _stream(client, job_id, headers=None, **params) -> list[dict]:
    r = client.get(f"/api/v1/jobs/{job_id}/events", params=params, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return _events(r.text)


def _trials(events: list[dict]) -> list[tuple[int, str]]:
    return [(e["data"]["number"], e["data"]["state"]) for e in events if e["event"] == "trial"]


def test_resuming_with_last_event_id_sends_exactly_the_missing_events(app_db):
    client, _ = app_db
    job_id, study = _job(client)
    for i in range(5):
        _complete(study, 0.1 * i)                       # 0..4 COMPLETE
    running = study.ask()                               # 5 RUNNING
    study.enqueue_trial({})                             # 6 WAITING
    for i in range(3):
        study.add_trial(optuna.create_trial(value=0.5 + i / 10))  # 7..9 COMPLETE

    first = _stream(client, job_id, limit=4)
    assert _trials(first) == [(n, "COMPLETE") for n in range(4)]
    assert [e["id"] for e in first[:4]] == ["0", "1", "2", "3"]
    assert first[-1] == {"event": "next", "id": "3",
                         "data": {"next": f"/api/v1/jobs/{job_id}/events?after=3&limit=4"}}

    second = _stream(client, job_id, {"Last-Event-ID": first[-1]["id"]}, limit=6)
    assert _trials(second) == [(4, "COMPLETE"), (5, "RUNNING"), (6, "WAITING"),
                               (7, "COMPLETE"), (8, "COMPLETE"), (9, "COMPLETE")]
    assert [e["id"] for e in second[:6]] == ["4", "5.5r", "6.5r.6w", "7.5r.6w", "8.5r.6w",
                                             "9.5r.6w"]
    assert second[-1]["event"] == "next"

    # While no one listens: 5 completes, 6 starts running, 10 is added; the job is cancelled.
    study.tell(running, 0.99)
    assert study.ask().number == 6
    assert _complete(study, 0.3) == 7 + 3
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200

    # A reconnecting EventSource sends Last-Event-ID to the URL it first opened (?after= of
    # the first connection): the header wins. The stream ends with the job's final state.
    third = _stream(client, job_id, {"Last-Event-ID": second[5]["id"]}, after="0")
    assert _trials(third) == [(5, "COMPLETE"), (6, "RUNNING"), (10, "COMPLETE")]
    assert [e["id"] for e in third] == ["9.6w", "9.6r", "10.6r", "10.6r"]
    assert third[-1]["event"] == "job" and third[-1]["data"]["status"] == "cancelled"

    # Nothing changed since: only the job's state, no trial twice. ?after= works alike.
    assert [e["event"] for e in _stream(client, job_id, after=third[-1]["id"])] == ["job"]

    # Every event of the three connections, applied in order, is what a fresh stream shows.
    seen: dict[int, str] = {}
    for number, state in _trials(first + second + third):
        seen[number] = state
    fresh = _stream(client, job_id)
    assert dict(_trials(fresh)) == seen and len(_trials(fresh)) == len(seen) == 11
    assert fresh[-1]["event"] == "job"


def test_a_bare_trial_number_is_a_cursor(app_db):
    client, _ = app_db
    job_id, study = _job(client)
    for i in range(6):
        _complete(study, i)
    client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert _trials(_stream(client, job_id, after="3")) == [(4, "COMPLETE"), (5, "COMPLETE")]
    # Past the last trial: nothing yet (trials numbered up to 99 count as seen).
    assert _trials(_stream(client, job_id, after="99")) == []


@pytest.mark.parametrize("after", ["-1", "abc", "1.5", "1e3", "3.5r", "2.1r.1w", "0x10",
                                   "99999999999", "2147483648", "1.", " 1", "1;2"])
def test_hostile_cursors_answer_422_naming_the_parameter(app_db, after):
    client, _ = app_db
    job_id, _ = _job(client)
    r = client.get(f"/api/v1/jobs/{job_id}/events", params={"after": after})
    assert r.status_code == 422, (after, r.text)
    assert [e["field"] for e in r.json()["errors"]] == ["query.after"]
    if after != after.strip():
        return  # a header's surrounding blanks are not its value
    r = client.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": after})
    assert r.status_code == 422, (after, r.text)
    assert [e["field"] for e in r.json()["errors"]] == ["header.last-event-id"]


@pytest.mark.parametrize("limit", ["0", "-5", "10001", "2.5", "many"])
def test_hostile_limits_answer_422(app_db, limit):
    client, _ = app_db
    job_id, _ = _job(client)
    r = client.get(f"/api/v1/jobs/{job_id}/events", params={"limit": limit})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "query.limit"


def test_a_huge_cursor_is_refused_not_parsed():
    with pytest.raises(ValueError):
        Cursor.parse("5" + ".1r" * 5000)
    assert str(Cursor.parse("41.38r.40w")) == "41.38r.40w"


class _Costs:
    """Statements sent to the database (both engines) and trials built, while counting."""

    def __init__(self, db, monkeypatch) -> None:
        self.statements = self.trials = 0
        for engine in (db.engine, db.storage.engine):
            event.listen(engine, "before_cursor_execute", self._statement)
        real = trial_store._frozen_from_model

        def counted(storage, row):
            self.trials += 1
            return real(storage, row)

        monkeypatch.setattr(trial_store, "_frozen_from_model", counted)

    def _statement(self, *_args) -> None:
        self.statements += 1

    def reset(self) -> tuple[int, int]:
        out, self.statements, self.trials = (self.statements, self.trials), 0, 0
        return out


def _study_of(client, n_finished: int) -> tuple[int, optuna.Study, list]:
    """A job whose study holds its warm-start trial (#0, which the first ask runs),
    `n_finished` finished trials of every outcome after it, and a last trial running."""
    job_id, study = _job(client)
    rng, start = random.Random(n_finished), datetime(2025, 1, 1)
    storage = optuna.storages.RDBStorage(client.app.state.db.settings.database_url)
    add_trials(storage, study, [synthetic_trial(i, rng, start)
                                for i in range(1, n_finished + 1)])
    storage.engine.dispose()
    return job_id, study, [study.ask(), study.ask()]


def test_a_poll_costs_the_same_however_many_trials(app_db, monkeypatch):
    client, db = app_db
    costs = _Costs(db, monkeypatch)
    per_poll = {}
    for n in (50, 2000):
        job_id, study, running = _study_of(client, n)
        poller = EventPoller(db, None, job_id, client.key_id)
        costs.reset()
        catch_up = []
        while True:  # the catch-up: a page of trials a poll, read without waiting
            events, over, more = poller.poll()
            catch_up.append((len(events), *costs.reset()))
            assert not over
            if not more:
                break
        assert sum(e for e, _, _ in catch_up) == n + 2 + 1  # every trial, and the job once
        assert all(built <= EVENT_PAGE for _, _, built in catch_up)
        assert len(catch_up) == n // EVENT_PAGE + 1
        idle = [(poller.poll()[0], *costs.reset()) for _ in range(3)]
        study.tell(running[0], 0.5)
        changed = (poller.poll()[0], *costs.reset())
        assert [e for e, _, _ in idle] == [[], [], []]
        assert running[0].number == 0 and running[1].number == n + 1
        assert len(changed[0]) == 1 and '"number": 0, "state": "COMPLETE"' in changed[0][0]
        per_poll[n] = ([s for _, s, _ in idle], [b for _, _, b in idle], changed[1:])
    # Statements and trials read per poll: the same at 50 and at 2,000 trials.
    assert per_poll[50] == per_poll[2000]
    assert per_poll[50][1] == [0, 0, 0] and per_poll[50][2][1] == 1
