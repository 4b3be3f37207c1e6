"""Extending and resuming jobs with real worker processes, on SQLite and PostgreSQL: `hptune
serve --workers 4` (tests/conftest.py's start_server) per backend.

A finished 20-trial job extended by 20 ends with exactly 40 COMPLETE or PRUNED trials in the
same study, its first 20 trials as they were and no trial number lost; a job extended while
it runs ends at exactly its new count; a cancelled job, resumed, ends with exactly n_trials
finished, the trials the cancel stopped still FAIL with their reason. Waits are bounded
polls on the job's state; nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.service.conftest import TINY_JOB, check_trials

# Trials of about a second (60 epochs of a 128-unit network, nothing stops them early): the
# workers are mid-trial when the cancel comes.
LONG_JOB = {
    "name": "resume-me",
    "dataset": "digits",
    "n_trials": 12,
    "max_epochs": 60,
    "search_space": {"batch_size": {"choices": [64]}},
    "sampler": {"name": "random", "seed": 3},
    "pruner": {"name": "none"},
    "early_stopping": {"patience": None},
    "model": {"hidden_layers": [128]},
}


@pytest.fixture(scope="module")
def lifecycle_server(module_backend, tmp_path_factory) -> Iterator[Server]:
    """`hptune serve --workers 4` on the backend's fresh database, for the module's tests."""
    srv = start_server(tmp_path_factory.mktemp(f"lifecycle-{module_backend.name}"),
                       database_url=module_backend.url, workers=4,
                       extra_env={"HPTUNE_POLL_INTERVAL": "0.2"})
    yield srv
    stop_server(srv)


@pytest.fixture
def client(lifecycle_server) -> Iterator[httpx.Client]:
    with lifecycle_server.client("alice") as c:
        yield c


def _submit(client: httpx.Client, spec: dict) -> int:
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _wait(server: Server, client: httpx.Client, job_id: int, done: Callable[[dict], bool],
          what: str, timeout_s: float = 240) -> dict:
    """Poll the job until `done(job)`; fail naming `what`, with the server's log, at the
    bound."""
    deadline = time.monotonic() + timeout_s
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never {what}: {job}\n{server.log()}")


def _settled(status: str) -> Callable[[dict], bool]:
    """The job is `status` with no trial running or queued for retry."""
    return lambda job: (job["status"] == status and job["counts"]["running"] == 0
                        and job["counts"]["waiting"] == 0)


def _trials(client: httpx.Client, job_id: int) -> list[dict]:
    """Every trial, page by page."""
    out: list[dict] = []
    path: str | None = f"/api/v1/jobs/{job_id}/trials?limit=1000"
    while path is not None:
        body = client.get(path).json()
        out += body["data"]
        path = body["next"]
    return out


def _kept(trial: dict) -> tuple:
    """What must not change in a trial that had ended."""
    return (trial["number"], trial["state"], trial["params"], trial["value"],
            trial["stop_reason"], trial["datetime_complete"])


def _check_numbers(trials: list[dict]) -> None:
    assert [t["number"] for t in trials] == list(range(len(trials))), "a trial number is lost"


def test_extending_a_finished_20_trial_job_by_20_finishes_exactly_40(lifecycle_server, client):
    job_id = _submit(client, {**TINY_JOB, "name": "extend-me", "n_trials": 20})
    first = _wait(lifecycle_server, client, job_id, _settled("succeeded"), "succeeded")
    assert first["finished"] == 20, first
    before = _trials(client, job_id)
    check_trials(before, 20)

    r = client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 40})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued" and r.json()["n_trials"] == 40
    job = _wait(lifecycle_server, client, job_id, _settled("succeeded"), "succeeded again")
    assert job["finished"] == 40 and job["n_trials"] == 40, job
    assert job["study_name"] == first["study_name"] == f"job-{job_id}"
    trials = _trials(client, job_id)
    states = check_trials(trials, 40)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 40, states
    _check_numbers(trials)
    assert [_kept(t) for t in trials[:len(before)]] == [_kept(t) for t in before]
    assert "Traceback" not in lifecycle_server.log()


def test_extending_a_running_job_ends_at_exactly_the_new_count(lifecycle_server, client):
    job_id = _submit(client, {**TINY_JOB, "name": "grow-me", "n_trials": 20})
    _wait(lifecycle_server, client, job_id, lambda j: j["finished"] >= 5, "ran 5 trials")
    # Running, most likely; if it already succeeded, the extension runs it again.
    r = client.patch(f"/api/v1/jobs/{job_id}", json={"n_trials": 30})
    assert r.status_code == 200, r.text
    job = _wait(lifecycle_server, client, job_id, _settled("succeeded"), "succeeded")
    assert job["finished"] == 30, job
    trials = _trials(client, job_id)
    check_trials(trials, 30)
    _check_numbers(trials)


def test_a_cancelled_job_resumed_finishes_exactly_n_trials(lifecycle_server, client):
    n_trials = LONG_JOB["n_trials"]
    job_id = _submit(client, LONG_JOB)
    _wait(lifecycle_server, client, job_id, lambda j: j["counts"]["running"] >= 2,
          "had 2 trials running")
    r = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text
    stopped = _wait(lifecycle_server, client, job_id, _settled("cancelled"), "settled")
    assert stopped["finished"] < n_trials, stopped
    before = _trials(client, job_id)
    cancelled = [t for t in before if t["state"] == "FAIL"]
    # The running trials stop at their next epoch (one may have just finished instead).
    assert cancelled and all(t["stop_reason"] == "cancelled" for t in cancelled), before

    r = client.post(f"/api/v1/jobs/{job_id}/resume")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued" and r.json()["started_at"] is None
    job = _wait(lifecycle_server, client, job_id, _settled("succeeded"), "succeeded")
    assert job["finished"] == n_trials and job["study_name"] == f"job-{job_id}", job
    trials = _trials(client, job_id)
    check_trials(trials, n_trials)
    _check_numbers(trials)
    # The history is kept as it was: the cancelled trials too, still FAIL with their reason.
    assert [_kept(t) for t in trials[:len(before)]] == [_kept(t) for t in before]
    r = client.post(f"/api/v1/jobs/{job_id}/resume")
    assert r.status_code == 409 and "is succeeded" in r.json()["detail"], r.text
    assert "Traceback" not in lifecycle_server.log()
