"""The whole path through real processes: REST job -> 2 workers -> trainer -> SQLite -> report."""

import optuna
from optuna.trial import TrialState

JOB = {
    "name": "e2e",
    "dataset": "digits",
    "n_trials": 14,
    "max_epochs": 12,
    "search_space": {"batch_size": {"choices": [64, 128, 256]}},
    "sampler": {"name": "tpe", "seed": 3},
    "pruner": {"name": "hyperband", "min_resource": 1, "reduction_factor": 3},
    "early_stopping": {"patience": 3},
    "model": {"hidden_layers": [64]},
}

TRIAL_FIELDS = {"number", "state", "params", "value", "intermediate_values", "stop_reason",
                "stopped_epoch", "best_epoch", "datetime_start", "datetime_complete"}


def test_job_runs_to_exactly_n_trials_with_reasons(server):
    client = server.client("alice")
    r = client.post("/api/v1/jobs", json=JOB)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["n_trials"] == JOB["n_trials"]

    job = server.wait_job(client, job["id"])
    assert job["status"] == "succeeded", (job, server.log())
    assert job["finished"] == JOB["n_trials"]
    assert job["counts"]["complete"] + job["counts"]["pruned"] == JOB["n_trials"]
    assert job["counts"]["running"] == 0

    trials = client.get(f"/api/v1/jobs/{job['id']}/trials").json()
    finished = [t for t in trials["data"] if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == JOB["n_trials"]
    assert len({t["number"] for t in trials["data"]}) == trials["count"]
    for t in trials["data"]:
        assert set(t) >= TRIAL_FIELDS
        assert t["stopped_epoch"] == len(t["intermediate_values"]) or t["stop_reason"] == "diverged"
    pruned = [t for t in finished if t["stop_reason"] == "pruned"]
    assert pruned, "hyperband must prune some of 14 trials"
    for t in pruned:
        assert t["state"] == "PRUNED"
        assert t["details"]["pruner"] == "hyperband"
        assert t["details"]["prune_step"] == t["stopped_epoch"]
        assert "prune_cutoff" in t["details"]

    # The report's best trial is the study's best, read straight from the database.
    report = client.get(f"/api/v1/jobs/{job['id']}/report").json()
    study = optuna.load_study(study_name=f"job-{job['id']}",
                              storage=server.env["HPTUNE_DATABASE_URL"])
    assert report["best_trial"]["number"] == study.best_trial.number
    assert report["best_trial"]["value"] == study.best_value
    assert report["best_trial"]["test_metrics"]["accuracy"] > 0.5
    n_done = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    assert n_done == JOB["n_trials"]
    stopped = {r["number"] for r in report["stopped_trials"]}
    assert {t["number"] for t in pruned} <= stopped
    assert all(r["reason"] for r in report["stopped_trials"])


def test_study_carries_the_job_for_the_dashboard(server):
    client = server.client("alice")
    job = client.post("/api/v1/jobs", json={**JOB, "n_trials": 1, "name": "labelled"}).json()
    study = optuna.load_study(study_name=f"job-{job['id']}",
                              storage=server.env["HPTUNE_DATABASE_URL"])
    assert study.user_attrs["job_name"] == "labelled"
    assert study.user_attrs["spec"]["n_trials"] == 1
    server.wait_job(client, job["id"])


def test_missing_or_bad_key_is_401(server):
    import httpx

    r = httpx.get(f"{server.url}/api/v1/jobs")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(f"{server.url}/api/v1/jobs", headers={"Authorization": "Bearer hpt_nope"})
    assert r.status_code == 401


def test_bad_spec_is_422_naming_the_field_and_stores_nothing(server):
    client = server.client("carol")
    before = client.get("/api/v1/jobs").json()["count"]
    r = client.post("/api/v1/jobs", json={**JOB, "n_trials": 0})
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["errors"]] == ["n_trials"]
    r = client.post("/api/v1/jobs", content=b'{"n_trials": NaN}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "n_trials"
    r = client.post("/api/v1/jobs", json={**JOB, "dataset": "imagenet"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "dataset"
    r = client.post("/api/v1/jobs", json={**JOB, "search_space": {
        "learning_rate": {"low": 0.1, "high": 0.01, "log": True}}})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"].startswith("search_space.learning_rate")
    assert client.get("/api/v1/jobs").json()["count"] == before


def test_other_owners_job_is_404(server):
    alice, bob = server.client("alice"), server.client("bob")
    job = alice.post("/api/v1/jobs", json={**JOB, "n_trials": 1}).json()
    for path in ("", "/trials", "/report"):
        assert bob.get(f"/api/v1/jobs/{job['id']}{path}").status_code == 404
    assert bob.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 404
    server.wait_job(alice, job["id"])
