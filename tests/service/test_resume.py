"""A trial killed with SIGKILL at a random epoch resumes from its last checkpoint and ends
bit-identical to the same trial never interrupted: weights, every reported value, test
metrics (real API and worker processes, SQLite and PostgreSQL)."""

import io
import random
import time

import numpy as np
import onnx
import optuna
from onnx import numpy_helper
from threadpoolctl import threadpool_limits

from search import JobSpec
from search.study import train_config
from trainer import fit, load_dataset, to_onnx

MAX_EPOCHS = 40
# One trial with every parameter fixed, wide enough that an epoch takes tens of milliseconds:
# time to see it running and kill its worker between two checkpoints.
SPEC = {
    "name": "resume", "dataset": "digits", "n_trials": 1, "max_epochs": MAX_EPOCHS,
    "checkpoint_every": 2, "pruner": {"name": "none"}, "seed": 5,
    "search_space": {"learning_rate": {"value": 0.01}, "batch_size": {"value": 64},
                     "dropout": {"value": 0.1}, "weight_decay": {"value": 1e-4}},
    "model": {"hidden_layers": [512, 512], "optimizer": "adamw", "schedule": "cosine"},
    "warm_start": {"center": False},
}


def _uninterrupted():
    spec = JobSpec.model_validate(SPEC)
    params = {"learning_rate": 0.01, "batch_size": 64, "dropout": 0.1, "weight_decay": 1e-4}
    data = load_dataset("digits", seed=spec.seed)
    with threadpool_limits(1):  # as the workers train
        return fit(train_config(spec, params), data), data


def _wait_running_epoch(cluster, job_id: int, epoch: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        trials = cluster.trials(job_id)
        if trials and trials[0]["state"] == "RUNNING" and \
                len(trials[0]["intermediate_values"]) >= epoch:
            return
        assert not trials or trials[0]["state"] in ("RUNNING", "WAITING"), trials
        time.sleep(0.02)
    raise AssertionError(f"trial 0 never reached epoch {epoch}\n{cluster.logs()}")


def _weights(model_bytes: bytes) -> dict[str, np.ndarray]:
    model = onnx.load_model(io.BytesIO(model_bytes))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_killed_trial_resumes_bit_identical(backend, cluster_factory):
    expected, data = _uninterrupted()
    cluster = cluster_factory(backend.url)
    cluster.start_api()
    (worker,) = cluster.start_workers(1)
    job_id = cluster.submit(SPEC)
    kill_at = random.Random().randint(3, MAX_EPOCHS - 10)
    _wait_running_epoch(cluster, job_id, kill_at)
    cluster.kill_worker(worker)
    cluster.start_workers(1)
    job = cluster.wait_job(job_id)
    assert job["status"] == "succeeded", (job, cluster.logs())

    trials = cluster.trials(job_id)
    assert [t["state"] for t in trials] == ["FAIL", "COMPLETE"], trials
    retry = trials[1]
    assert retry["details"]["retry_of"] == 0
    resumed = retry["details"]["resumed_from_epoch"]
    # Checkpoints every 2 epochs: the retry went on from one of the last two before the kill.
    assert resumed % 2 == 0 and kill_at - 2 <= resumed <= kill_at + 1, (kill_at, resumed)

    # Every value the pruner saw, and the test metrics, exactly as the uninterrupted run's.
    history = [row["val_accuracy"] for row in expected.history]
    assert [retry["intermediate_values"][str(e)] for e in range(1, MAX_EPOCHS + 1)] == history
    study = optuna.load_study(study_name=f"job-{job_id}", storage=backend.url)
    attrs = study.trials[1].user_attrs
    assert attrs["test_accuracy"] == expected.test_metrics["accuracy"]
    assert attrs["test_loss"] == expected.test_metrics["loss"]
    assert attrs["best_epoch"] == expected.best_epoch

    # The weights, bit for bit: the stored model against the uninterrupted run's export.
    with cluster.client() as client:
        r = client.get(f"/api/v1/jobs/{job_id}/model", params={"trial": 1})
    assert r.status_code == 200, r.text
    got = _weights(r.content)
    want = _weights(to_onnx(expected.network, feature_mean=data.feature_mean,
                            feature_std=data.feature_std, task=data.task))
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name
