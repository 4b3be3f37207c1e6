"""The tuned model out of a real server and real workers: ONNX download, parity with the
trainer, predictions over REST (JSON and CSV), retention, and the errors a user can hit."""

import io

import numpy as np
import optuna
import pytest

from search import JobSpec
from search.study import train_config
from tests.conftest import hptune
from trainer import OnnxModel, fit, load_dataset

CLASSIFY = {"name": "model-digits", "dataset": "digits", "n_trials": 5, "max_epochs": 4,
            "sampler": {"name": "random", "seed": 1}, "pruner": {"name": "none"},
            "model": {"hidden_layers": [32]}}
REGRESS = {"name": "model-regression", "dataset": "regression", "n_trials": 4, "max_epochs": 4,
           "metric": "val_loss", "sampler": {"name": "random", "seed": 2},
           "pruner": {"name": "none"}, "model": {"hidden_layers": [16]}}


def _finished_job(server, client, spec):
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = server.wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", (job, server.log())
    return job


def _trainer_run(server, job_id, spec, number):
    """The trial retrained in process: the trainer's own network for parity checks."""
    study = optuna.load_study(study_name=f"job-{job_id}",
                              storage=server.env["HPTUNE_DATABASE_URL"])
    trial = study.trials[number]
    params = {**{k[6:]: v for k, v in trial.user_attrs.items() if k.startswith("fixed_")},
              **trial.params}
    parsed = JobSpec.model_validate(spec)
    data = load_dataset(spec["dataset"], seed=parsed.seed)
    return fit(train_config(parsed, params), data), data


@pytest.mark.parametrize("spec", [CLASSIFY, REGRESS], ids=["classification", "regression"])
def test_downloaded_model_matches_the_trainer(server, spec):
    client = server.client("modeler")
    job = _finished_job(server, client, spec)
    r = client.get(f"/api/v1/jobs/{job['id']}/model")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    number = int(r.headers["x-hptune-trial"])
    report = client.get(f"/api/v1/jobs/{job['id']}/report").json()
    assert number == report["best_trial"]["number"]

    result, data = _trainer_run(server, job["id"], spec, number)
    raw = data.X_test * data.feature_std + data.feature_mean  # the rows as a user has them
    model = OnnxModel(r.content)
    predictions, probabilities = model.predict(raw)
    if data.task == "regression":
        expected = result.network.predict(data.X_test).reshape(-1)
        np.testing.assert_allclose(predictions, expected, rtol=1e-4, atol=1e-4)
        assert probabilities is None
    else:
        logits = result.network.forward(data.X_test).astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected = e / e.sum(axis=1, keepdims=True)
        assert np.max(np.abs(probabilities - expected)) < 1e-5
        np.testing.assert_array_equal(predictions, np.argmax(expected, axis=1))

    # The same rows through POST /predict, as JSON and as CSV.
    rows = raw[:25].tolist()
    r = client.post(f"/api/v1/jobs/{job['id']}/predict", json={"rows": rows})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["trial"] == number
    np.testing.assert_allclose(body["predictions"], predictions[:25], rtol=1e-5, atol=1e-5)
    csv = io.StringIO()
    np.savetxt(csv, raw[:25], delimiter=",", header=",".join(
        f"f{i}" for i in range(raw.shape[1])), comments="")
    r = client.post(f"/api/v1/jobs/{job['id']}/predict", content=csv.getvalue(),
                    headers={"Content-Type": "text/csv"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], body["predictions"], rtol=1e-5,
                               atol=1e-5)


def test_models_kept_for_the_best_trials_only(server):
    client = server.client("keeper")
    job = _finished_job(server, client, {**CLASSIFY, "n_trials": 40, "max_epochs": 2,
                                         "name": "keep"})
    trials = client.get(f"/api/v1/jobs/{job['id']}/trials").json()["data"]
    complete = sorted((t for t in trials if t["state"] == "COMPLETE"),
                      key=lambda t: -t["value"])
    kept = [t["number"] for t in complete[:3]]  # HPTUNE_KEEP_MODELS defaults to 3
    for t in complete:
        r = client.get(f"/api/v1/jobs/{job['id']}/model", params={"trial": t["number"]})
        assert r.status_code == (200 if t["number"] in kept else 404), (t, r.text)
    report = client.get(f"/api/v1/jobs/{job['id']}/report").json()
    assert report["artifacts"]["model_bytes"] > 0
    assert report["artifacts"]["checkpoint_bytes"] == 0  # the job ended: none kept


def test_model_errors(server):
    alice, bob = server.client("model-alice"), server.client("model-bob")
    job = _finished_job(server, alice, {**CLASSIFY, "n_trials": 2, "name": "errors"})
    base = f"/api/v1/jobs/{job['id']}"
    # Another owner's job is not there at all.
    assert bob.get(f"{base}/model").status_code == 404
    assert bob.post(f"{base}/predict", json={"rows": [[0.0] * 64]}).status_code == 404
    # Hostile and wrong rows: 422 naming the field, never a 500.
    for body in ({"rows": [[0.0] * 63]}, {"rows": [[0.0] * 64, [1.0]]}, {"rows": []},
                 {"rows": [["x"] * 64]}, {"rows": [[0.0]] * 10_001},
                 {"rows": [[0.0] * 64], "extra": 1}, {"rows": "[[1]]"}):
        r = alice.post(f"{base}/predict", json=body)
        assert r.status_code == 422, (str(body)[:80], r.text)
        assert "rows" in r.text or "extra" in r.text
    r = alice.post(f"{base}/predict", content=b'{"rows": [[NaN' + b', 0' * 63 + b']]}',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    r = alice.post(f"{base}/predict", content=b"1,2,3\n", headers={"Content-Type": "text/csv"})
    assert r.status_code == 422 and "64" in r.text, r.text
    r = alice.post(f"{base}/predict", content=b"\xff\xfe", headers={"Content-Type": "text/csv"})
    assert r.status_code == 422, r.text
    # A trial without a stored model, and an id past any trial.
    assert alice.get(f"{base}/model", params={"trial": 999}).status_code == 404
    assert alice.get(f"{base}/model", params={"trial": -1}).status_code == 422


def test_unknown_objective_is_refused_by_name(server):
    client = server.client("objector")
    r = client.post("/api/v1/jobs", json={**CLASSIFY, "objective": "no_such_model"})
    assert r.status_code == 422, r.text
    assert "no_such_model" in r.text and "objective" in r.text
    r = client.post("/api/v1/jobs", json={
        **CLASSIFY, "search_space": {"extra": {"depth": {"kind": "int", "low": 1, "high": 3}}}})
    assert r.status_code == 422 and "depth" in r.text, r.text


def test_cli_downloads_the_model_and_predicts(server, tmp_path):
    client = server.client("cli-modeler")
    job = _finished_job(server, client, {**CLASSIFY, "n_trials": 3, "name": "cli"})
    env = {**server.env, "HPTUNE_URL": server.url, "HPTUNE_API_KEY": server.keys["cli-modeler"]}
    out = tmp_path / "model.onnx"
    done = hptune("model", str(job["id"]), "-o", str(out), env=env)
    assert "trial" in done.stderr
    assert out.read_bytes() == client.get(f"/api/v1/jobs/{job['id']}/model").content

    data = load_dataset("digits", seed=0)
    raw = data.X_test[:7] * data.feature_std + data.feature_mean
    csv = tmp_path / "rows.csv"
    np.savetxt(csv, raw, delimiter=",")
    done = hptune("predict", str(job["id"]), str(csv), env=env)
    lines = done.stdout.strip().splitlines()
    predictions, probabilities = OnnxModel(out.read_bytes()).predict(raw)
    assert [int(line.split(",")[0]) for line in lines] == predictions.tolist()
    got = np.array([[float(v) for v in line.split(",")[1:]] for line in lines])
    np.testing.assert_allclose(got, probabilities, rtol=1e-5, atol=1e-6)

    # Errors name the problem, exit non-zero and print no traceback.
    bad = hptune("model", "999999", "-o", str(out), env=env, check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "999999" in bad.stderr
