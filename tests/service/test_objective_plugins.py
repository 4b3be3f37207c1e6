"""Objectives from installed packages, through a real server and real workers: the example
package examples/hptune-ridge (`ridge`, and `always_fails`, which raises in every trial)
installed into a directory on the workers' PYTHONPATH, as an operator would install it; the
422s a job naming a missing objective or an undeclared parameter gets; and a `torch_mlp` job
whose model GET /model and POST /predict serve."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, start_server, stop_server
from trainer import OnnxModel, load_dataset

EXAMPLE = ROOT / "examples" / "hptune-ridge"
RIDGE = {"name": "ridge", "objective": "ridge", "dataset": "digits", "n_trials": 5,
         "max_epochs": 4, "sampler": {"name": "random", "seed": 3},
         "pruner": {"name": "none"},
         "search_space": {"learning_rate": {"low": 0.01, "high": 0.3, "log": True},
                          "extra": {"l1_ratio": {"kind": "float", "low": 0.0, "high": 0.5}}}}


def _install_example(tmp: Path) -> Path:
    """pip install the example package into tmp/site (built from a copy: the source tree
    stays free of build outputs)."""
    source = tmp / "hptune-ridge"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site),
                    str(source)], check=True, capture_output=True, timeout=300)
    return site


@pytest.fixture(scope="module")
def plugin_server(tmp_path_factory):
    """`hptune serve --workers 2` whose processes find the example package."""
    tmp = tmp_path_factory.mktemp("plugins")
    site = _install_example(tmp)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    srv = start_server(tmp, extra_env={"PYTHONPATH": path, "HPTUNE_POLL_INTERVAL": "0.2"})
    yield srv
    stop_server(srv)


def _submit(client, spec: dict) -> int:
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_installed_objective_runs_a_job(plugin_server, check_trials):
    client = plugin_server.client("ridge-user")
    job = plugin_server.wait_job(client, _submit(client, RIDGE))
    assert job["status"] == "succeeded", (job, plugin_server.log())
    trials = client.get(f"/api/v1/jobs/{job['id']}/trials").json()["data"]
    check_trials(trials, RIDGE["n_trials"])
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    for t in finished:
        assert set(t["params"]) == {"learning_rate", "weight_decay", "l1_ratio"}, t
        assert 0.0 <= t["params"]["l1_ratio"] <= 0.5
        assert 0.01 <= t["params"]["learning_rate"] <= 0.3
        # It counts no examples: the runner records the whole epochs it trained.
        assert t["details"]["epochs_trained"] == t["stopped_epoch"] > 0, t
    assert max(t["value"] for t in finished if t["value"] is not None) > 0.8
    report = client.get(f"/api/v1/jobs/{job['id']}/report").json()
    assert report["best_trial"]["number"] in {t["number"] for t in finished}
    # ridge exports no ONNX: there is no model to download.
    r = client.get(f"/api/v1/jobs/{job['id']}/model")
    assert r.status_code == 404, r.text


def test_jobs_the_objective_cannot_run_are_refused_by_name(plugin_server):
    client = plugin_server.client("ridge-user")
    for spec, names in [
        ({**RIDGE, "objective": "not_installed_here"}, ["not_installed_here", "objective"]),
        ({**RIDGE, "search_space": {"dropout": {"low": 0.0, "high": 0.5}}},
         ["search_space.dropout", "ridge"]),
        ({**RIDGE, "search_space": {"extra": {"depth": {"kind": "int", "low": 1,
                                                         "high": 3}}}},
         ["search_space.extra.depth"]),
        ({**RIDGE, "search_space": {"extra": {"l1_ratio": {"kind": "categorical",
                                                            "choices": ["a", "b"]}}}},
         ["search_space.extra.l1_ratio", "float"]),
        ({**RIDGE, "objective": "torch_cnn", "dataset": "regression", "metric": "val_loss",
          "search_space": {}}, ["torch_cnn", "objective"]),
    ]:
        r = client.post("/api/v1/jobs", json=spec)
        assert r.status_code == 422, (spec, r.text)
        for name in names:
            assert name in r.text, (name, r.text)


def test_objective_that_always_raises_fails_its_job(plugin_server):
    client = plugin_server.client("ridge-user")
    spec = {**RIDGE, "name": "poison", "objective": "always_fails", "n_trials": 2,
            "search_space": {}}
    job = plugin_server.wait_job(client, _submit(client, spec), timeout_s=240)
    assert job["status"] == "failed", job
    assert "trials failed" in (job["error"] or ""), job
    trials = client.get(f"/api/v1/jobs/{job['id']}/trials").json()["data"]
    failed = [t for t in trials if t["state"] == "FAIL"]
    # More crashes than n_trials x (max_trial_retries + 1) end the job; nothing else ran.
    # (The last failure's queued retry may stay WAITING: the job ended before a claim.)
    assert len(failed) > spec["n_trials"] * 3, trials
    assert {t["state"] for t in trials} <= {"FAIL", "WAITING"}, trials
    for t in failed:
        assert t["stop_reason"] == "failed", t
        assert "always_fails raises in every trial" in str(t["details"].get("error")), t
        # Searched over the objective's own default range (1e-3..1), not the built-in's.
        assert 1e-3 <= t["params"]["learning_rate"] <= 1.0, t


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="PyTorch is not installed (pip install 'hptune[torch]')")
def test_torch_job_serves_its_model(server):
    client = server.client("torch-user")
    spec = {"name": "torch-digits", "objective": "torch_mlp", "dataset": "digits",
            "n_trials": 3, "max_epochs": 3, "sampler": {"name": "random", "seed": 1},
            "pruner": {"name": "none"}, "model": {"hidden_layers": [32]},
            "search_space": {"learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}}
    job = server.wait_job(client, _submit(client, spec))
    assert job["status"] == "succeeded", (job, server.log())
    r = client.get(f"/api/v1/jobs/{job['id']}/model")
    assert r.status_code == 200, r.text
    number = int(r.headers["x-hptune-trial"])
    best = next(t for t in client.get(f"/api/v1/jobs/{job['id']}/trials").json()["data"]
                if t["number"] == number)

    data = load_dataset("digits", seed=0)
    raw = data.X_test * data.feature_std + data.feature_mean
    model = OnnxModel(r.content)
    predictions, probabilities = model.predict(raw)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The served model is the best epoch's: its test accuracy is the one the trial recorded.
    accuracy = float(np.mean(predictions == data.y_test))
    assert abs(accuracy - best["details"]["test_accuracy"]) <= 1.0 / len(raw), best
    r = client.post(f"/api/v1/jobs/{job['id']}/predict", json={"rows": raw[:20].tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["trial"] == number
    assert r.json()["predictions"] == predictions[:20].tolist()
    np.testing.assert_allclose(r.json()["probabilities"], probabilities[:20], atol=1e-6)
