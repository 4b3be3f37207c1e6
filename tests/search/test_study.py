"""The trial runner against a real Optuna study in a real SQLite file."""

import optuna
import pytest
from optuna.trial import TrialState

from search import JobSpec, build_report, create_study, load_study, run_trial, trial_to_dict
from search.datasets import bundled


@pytest.fixture
def storage(tmp_path):
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")


def _spec(**kw):
    base = {
        "dataset": "digits", "n_trials": 12, "max_epochs": 9, "metric": "val_accuracy",
        "search_space": {"batch_size": {"choices": [64, 128]}},
        "sampler": {"name": "random", "seed": 1},
        "pruner": {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3},
        "early_stopping": {"patience": 3},
        "model": {"hidden_layers": [32]},
    }
    base.update(kw)
    return JobSpec.model_validate(base)


def test_trials_record_why_they_stopped(storage):
    spec = _spec()
    create_study(spec, storage, "job-1", {"job_id": 1})
    data = bundled("digits", 0)
    outcomes = []
    for i in range(spec.n_trials):
        study = load_study(spec, storage, "job-1", seed_offset=i)
        outcomes.append(run_trial(study, spec, data))
    study = optuna.load_study(study_name="job-1", storage=storage)
    trials = study.get_trials()
    assert len(trials) == spec.n_trials
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = [t for t in trials if t.user_attrs["stop_reason"] == "pruned"]
    assert pruned, "successive halving with rf=3 over 12 trials must prune some"
    for t in pruned:
        assert t.state == TrialState.PRUNED
        ua = t.user_attrs
        assert ua["pruner"] == "successive_halving"
        # The recorded step is the last reported epoch and the stopped epoch.
        assert ua["prune_step"] == ua["stopped_epoch"] == len(t.intermediate_values)
        # A pruned trial lost against the cut-off of its rung.
        assert ua["prune_value"] < ua["prune_cutoff"]
        assert ua["prune_n_peers"] >= 2
    for t in trials:
        d = trial_to_dict(t)
        assert d["stopped_epoch"] == len(t.intermediate_values)
        assert d["stop_reason"] in ("max_epochs", "early_stopped", "pruned", "diverged")
        if d["stop_reason"] == "max_epochs":
            assert d["stopped_epoch"] == spec.max_epochs
        if d["stop_reason"] == "early_stopped":
            assert d["stopped_epoch"] - d["best_epoch"] >= spec.early_stopping.patience

    report = build_report(study, spec, {"id": 1})
    assert report["best_trial"]["number"] == study.best_trial.number
    assert report["best_trial"]["value"] == pytest.approx(study.best_value)
    assert report["counts"]["complete"] + report["counts"]["pruned"] == spec.n_trials
    assert 0 < report["best_trial"]["test_metrics"]["accuracy"] <= 1
    stopped_numbers = {r["number"] for r in report["stopped_trials"]}
    assert {t.number for t in pruned} <= stopped_numbers
    saved = report["compute_saved"]
    assert saved["pruned_epochs"] == sum(
        spec.max_epochs - len(t.intermediate_values) for t in pruned)
    assert report["total_epochs"] == sum(len(t.intermediate_values) for t in trials)


def test_divergence_is_pruned_with_its_reason(storage):
    spec = _spec(search_space={"learning_rate": {"value": 1e4}, "batch_size": {"value": 64}},
                 model={"hidden_layers": [32], "optimizer": "sgd"}, pruner={"name": "none"})
    create_study(spec, storage, "job-2", {"job_id": 2})
    study = load_study(spec, storage, "job-2")
    out = run_trial(study, spec, bundled("digits", 0))
    assert out.state == TrialState.PRUNED and out.stop_reason == "diverged"
    t = study.get_trials()[0]
    assert t.user_attrs["diverged_epoch"] == 1


def test_should_stop_cancels_within_an_epoch(storage):
    spec = _spec(pruner={"name": "none"})
    create_study(spec, storage, "job-3", {"job_id": 3})
    study = load_study(spec, storage, "job-3")
    out = run_trial(study, spec, bundled("digits", 0), should_stop=lambda: True)
    assert out.state == TrialState.FAIL and out.stop_reason == "cancelled"
    assert len(study.get_trials()[0].intermediate_values) == 1
