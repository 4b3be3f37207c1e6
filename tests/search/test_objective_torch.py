"""The PyTorch objectives (search/objective_torch.py) behind the objective contract, through
search.run_trial on in-memory studies: pruned, early-stopped and cancelled like the built-in,
a checkpointed trial resumed to the very weights of an uninterrupted one, and ONNX parity with
PyTorch's own outputs. Skips where PyTorch is not installed (the Makefile's `make test`
installs it), except the check that a missing PyTorch is refused by name."""

from __future__ import annotations

import importlib.util

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search import JobSpec, build_pruner, build_sampler, run_trial
from search.objectives import History, TrialInput, UnknownObjective, get_objective
from trainer import OnnxModel, StopReason, TrainResult, from_arrays, load_dataset

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is not installed (pip install 'hptune[torch]')")
FIXED = {"learning_rate": {"value": 3e-3}, "batch_size": {"value": 64},
         "dropout": {"value": 0.1}, "weight_decay": {"value": 1e-4}}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _spec(**kw) -> JobSpec:
    base = {"objective": "torch_mlp", "dataset": "digits", "n_trials": 6, "max_epochs": 6,
            "search_space": {"batch_size": {"choices": [64, 128]}},
            "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
            "model": {"hidden_layers": [32]}}
    base.update(kw)
    return JobSpec.model_validate(base)


def _study(spec: JobSpec) -> optuna.Study:
    return optuna.create_study(direction=spec.direction, sampler=build_sampler(spec),
                               pruner=build_pruner(spec))


class FakeArtifacts:
    """search.trial_reporter.TrialArtifacts in memory; `resume_from` names the trial whose
    latest checkpoint the next trial resumes (the service finds it by the retry chain)."""

    def __init__(self) -> None:
        self.checkpoints: dict[int, bytes] = {}
        self.models: dict[int, bytes] = {}
        self.resume_from: int | None = None

    def save_checkpoint(self, trial, blob: bytes) -> None:
        self.checkpoints[trial.number] = blob

    def load_checkpoint(self, trial) -> bytes | None:
        return None if self.resume_from is None else self.checkpoints[self.resume_from]

    def save_model(self, trial, onnx: bytes) -> None:
        self.models[trial.number] = onnx


class PlainReporter:
    """A Reporter that lets every epoch run: what objective.train sees without a search."""

    def __init__(self, metric) -> None:
        self.history = History(metric)

    def report(self, step, metrics) -> bool:
        self.history.add(step, metrics)
        return True

    def checkpoint_due(self, step) -> bool:
        return False

    def save_checkpoint(self, state) -> None:
        raise AssertionError("no checkpoint is due")

    def load_checkpoint(self) -> None:
        return None

    def result(self, test_metrics) -> TrainResult:
        return self.history.result(StopReason.MAX_EPOCHS, test_metrics, 0.0, 0)


def test_missing_torch_is_refused_by_name(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else find_spec(name, *a))
    get_objective.cache_clear()
    try:
        for name in ("torch_mlp", "torch_cnn"):
            with pytest.raises(UnknownObjective, match=r"hptune\[torch\]") as info:
                get_objective(name)
            assert info.value.name == name and name in str(info.value)
    finally:
        get_objective.cache_clear()


@needs_torch
def test_declared_like_the_builtin():
    builtin = get_objective("mlp")
    for name in ("torch_mlp", "torch_cnn"):
        objective = get_objective(name)
        assert objective.params == builtin.params and not objective.stops_early_itself
    assert "regression" not in get_objective("torch_cnn").tasks
    assert "regression" in get_objective("torch_mlp").tasks


@needs_torch
@pytest.mark.parametrize("objective", ["torch_mlp", "torch_cnn"])
def test_pruned_by_successive_halving(digits, objective):
    spec = _spec(objective=objective, n_trials=8,
                 pruner={"name": "successive_halving", "min_resource": 1,
                         "reduction_factor": 3})
    study = _study(spec)
    outcomes = [run_trial(study, spec, digits) for _ in range(spec.n_trials)]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, [o.state for o in outcomes]
    for t in pruned:
        assert t.user_attrs["stop_reason"] == StopReason.PRUNED
        assert t.user_attrs["stopped_epoch"] < spec.max_epochs
        assert max(t.intermediate_values) == t.user_attrs["stopped_epoch"]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete and all(set(t.user_attrs["curves"]) >= {"val_loss", "val_accuracy"}
                            for t in complete)


@needs_torch
def test_early_stopped_by_the_specs_patience(digits):
    # No epoch improves val_accuracy by half a point after the first: patience 1 stops at 2.
    spec = _spec(early_stopping={"patience": 1, "min_delta": 0.5})
    study = _study(spec)
    outcome = run_trial(study, spec, digits)
    trial = study.trials[0]
    assert outcome.state == TrialState.COMPLETE
    assert outcome.stop_reason == StopReason.EARLY_STOPPED
    assert trial.user_attrs["stopped_epoch"] == 2 and trial.user_attrs["patience"] == 1
    assert trial.user_attrs["epochs_trained"] == 2


@needs_torch
def test_cancelled_between_epochs(digits):
    spec = _spec()
    calls = []
    study = _study(spec)
    outcome = run_trial(study, spec, digits, should_stop=lambda: calls.append(1) or
                        len(calls) >= 2)
    assert outcome.state == TrialState.FAIL and outcome.stop_reason == StopReason.CANCELLED
    assert len(study.trials[0].intermediate_values) == 2


def _initializers(onnx_bytes: bytes) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@needs_torch
@pytest.mark.parametrize("objective", ["torch_mlp", "torch_cnn"])
def test_resumed_trial_ends_as_if_never_interrupted(digits, objective):
    spec = _spec(objective=objective, max_epochs=6, checkpoint_every=3,
                 search_space=FIXED, early_stopping={"patience": None})
    study, artifacts = _study(spec), FakeArtifacts()
    whole = run_trial(study, spec, digits, artifacts=artifacts)
    calls = []
    stopped = run_trial(study, spec, digits, artifacts=artifacts,
                        should_stop=lambda: calls.append(1) or len(calls) == 5)
    assert stopped.state == TrialState.FAIL and stopped.number in artifacts.checkpoints
    artifacts.resume_from = stopped.number  # the retry resumes its predecessor's epoch 3
    resumed = run_trial(study, spec, digits, artifacts=artifacts)

    a, b = study.trials[whole.number], study.trials[resumed.number]
    assert b.user_attrs["resumed_from_epoch"] == 3
    assert resumed.state == TrialState.COMPLETE and resumed.value == whole.value
    assert b.intermediate_values == a.intermediate_values
    assert b.user_attrs["curves"] == a.user_attrs["curves"]
    assert {k: v for k, v in b.user_attrs.items() if k.startswith("test_")} == \
        {k: v for k, v in a.user_attrs.items() if k.startswith("test_")}
    weights_a = _initializers(artifacts.models[whole.number])
    weights_b = _initializers(artifacts.models[resumed.number])
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        np.testing.assert_array_equal(weights_b[name], value, err_msg=name)


def _trained(objective: str, data, params=None, hidden=(32,), max_epochs=4):
    spec = _spec(objective=objective, model={"hidden_layers": list(hidden)},
                 metric="val_loss")
    params = params or {"learning_rate": 3e-3, "batch_size": 64, "dropout": 0.1,
                        "weight_decay": 1e-4}
    obj = get_objective(objective)
    result = obj.train(TrialInput(params, data, max_epochs, spec.metric, 0, 0, spec),
                       PlainReporter(spec.metric))
    return obj, result


@needs_torch
@pytest.mark.parametrize(("objective", "dataset"), [
    ("torch_mlp", "digits"), ("torch_mlp", "breast_cancer"), ("torch_mlp", "regression"),
    ("torch_cnn", "digits")])
def test_onnx_matches_torch_on_raw_rows(objective, dataset):
    import torch

    data = load_dataset(dataset, seed=0)
    obj, result = _trained(objective, data)
    model = OnnxModel(obj.export_onnx(result, data))
    assert model.input_name == "features" and model.metadata["task"] == data.task
    raw = data.X_test * data.feature_std + data.feature_mean  # the rows as a user has them
    predictions, probabilities = model.predict(raw)
    with torch.no_grad():
        out = result.network(torch.as_tensor(data.X_test)).double()
    if data.task == "regression":
        assert probabilities is None
        assert np.max(np.abs(predictions - out[:, 0].numpy())) < 1e-5
        return
    expected = torch.softmax(out, dim=1).numpy()
    assert probabilities.shape == (len(raw), data.n_classes)
    assert np.max(np.abs(probabilities - expected)) < 1e-5
    np.testing.assert_array_equal(predictions, expected.argmax(axis=1))
    assert set(result.test_metrics) == {"accuracy", "loss"}


@needs_torch
def test_onnx_predicts_the_datasets_own_labels():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    names = np.array(["setosa", "versicolor", "virginica"])
    data = from_arrays(X * 10 + 3, names[(X[:, 0] > 0).astype(int) + (X[:, 1] > 1)], seed=0)
    obj, result = _trained("torch_mlp", data)
    raw = data.X_test * data.feature_std + data.feature_mean
    predictions, _ = OnnxModel(obj.export_onnx(result, data)).predict(raw)
    assert set(predictions) <= set(names)


@needs_torch
def test_cnn_refuses_tables():
    wine = load_dataset("wine", seed=0)
    with pytest.raises(ValueError, match="square images"):
        _trained("torch_cnn", wine)


@needs_torch
def test_regression_reports_rmse_and_r2():
    data = load_dataset("regression", seed=0)
    spec = _spec(dataset="regression", metric="val_r2", max_epochs=3)
    study = _study(spec)
    outcome = run_trial(study, spec, data)
    trial = study.trials[0]
    assert outcome.state == TrialState.COMPLETE
    assert set(trial.user_attrs["curves"]) >= {"val_loss", "val_rmse", "val_r2"}
    assert {"test_loss", "test_rmse", "test_r2"} <= set(trial.user_attrs)
    assert trial.value == max(trial.intermediate_values.values())
