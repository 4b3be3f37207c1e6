"""Samplers, pruners, warm start and the pruning audit, on real studies in SQLite."""

import importlib.util
import itertools

import optuna
import pytest
from optuna.trial import TrialState
from pydantic import ValidationError

from search import JobSpec, build_report, create_study, load_study, run_trial
from search.datasets import bundled
from search.study import MissingExtra, build_pruner, build_sampler

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture
def storage(tmp_path):
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")


def _spec(**kw):
    base = {"dataset": "digits", "n_trials": 6, "max_epochs": 4,
            "search_space": {"batch_size": {"choices": [128, 256]}},
            "sampler": {"name": "random", "seed": 0, "n_startup_trials": 2},
            "pruner": {"name": "none"}, "early_stopping": {"patience": None},
            "model": {"hidden_layers": [16]}}
    base.update(kw)
    return JobSpec.model_validate(base)


def _run(storage, spec, n=None, name="job-1"):
    create_study(spec, storage, name, {"job_id": 1})
    data = bundled("digits", 0)
    for i in range(n or spec.n_trials):
        run_trial(load_study(spec, storage, name, seed_offset=i), spec, data)
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.parametrize("sampler", ["random", "tpe", "qmc", "cmaes", "gp"])
def test_every_sampler_runs_and_parallel_seeds_differ(storage, sampler):
    spec = _spec(sampler={"name": sampler, "seed": 3, "n_startup_trials": 2})
    if sampler == "gp" and not HAS_TORCH:
        with pytest.raises(MissingExtra, match="hptune\\[gp\\]"):
            build_sampler(spec)
        return
    study = _run(storage, spec, n=4)
    params = [tuple(sorted(t.params.items())) for t in study.get_trials()]
    assert len(params) == 4 and len(set(params)) == 4, params


def test_same_seed_offsets_reproduce_and_differ():
    spec = _spec(sampler={"name": "random", "seed": 9})
    a = build_sampler(spec, 1).sample_independent(
        None, None, "x", optuna.distributions.FloatDistribution(0, 1))
    b = build_sampler(spec, 1).sample_independent(
        None, None, "x", optuna.distributions.FloatDistribution(0, 1))
    c = build_sampler(spec, 2).sample_independent(
        None, None, "x", optuna.distributions.FloatDistribution(0, 1))
    assert a == b != c


def test_pruners_are_built_from_the_spec():
    p = build_pruner(_spec(pruner={"name": "patient", "patience": 3,
                                   "wrapped": {"name": "percentile", "percentile": 40}}))
    assert isinstance(p, optuna.pruners.PatientPruner)
    assert isinstance(p._wrapped_pruner, optuna.pruners.PercentilePruner)
    assert p._wrapped_pruner._percentile == 40 and p._patience == 3
    p = build_pruner(_spec(max_epochs=27, pruner={"name": "hyperband", "reduction_factor": 3}))
    assert isinstance(p, optuna.pruners.HyperbandPruner) and p._max_resource == 27


@pytest.mark.parametrize(("pruner", "msg"), [
    ({"name": "threshold"}, "lower or upper"),
    ({"name": "threshold", "lower": 0.9, "upper": 0.1}, "lower must be <= upper"),
    ({"name": "median", "wrapped": {"name": "median"}}, "only the patient"),
    ({"name": "patient", "wrapped": {"name": "patient"}}, "cannot wrap"),
    ({"name": "percentile", "percentile": 100}, "less than 100"),
    ({"name": "median", "report_every": 100}, 'needs resource "examples"'),
    ({"name": "patient", "wrapped": {"name": "median", "resource": "examples"}},
     "outer"),
    ({"name": "median", "resource": "steps"}, "resource"),
])
def test_bad_pruner_settings_are_rejected(pruner, msg):
    with pytest.raises(ValidationError, match=msg):
        _spec(pruner=pruner)


def test_rungs_in_examples_put_batch_sizes_on_equal_compute(storage):
    # Batch sizes 16 and 256 report at the same examples counts (multiples of 200, at the
    # first batch boundary past each), so successive halving compares them at equal compute,
    # and it prunes within an epoch (digits has 1259 training rows). A batch reports at most
    # once: one that passes two multiples reports the last of them.
    spec = _spec(n_trials=8, max_epochs=2,
                 search_space={"batch_size": {"choices": [16, 256]}},
                 pruner={"name": "successive_halving", "resource": "examples",
                         "report_every": 200, "min_resource": 200, "reduction_factor": 3})
    study = _run(storage, spec)
    trials = study.get_trials()
    n_train = len(bundled("digits", 0).X_train)
    assert {t.params["batch_size"] for t in trials} == {16, 256}
    for t in trials:
        steps = sorted(t.intermediate_values)
        batch = t.params["batch_size"]
        assert steps[0] == 200 and all(s % 200 == 0 for s in steps), steps
        assert all(200 <= b - a <= 200 + batch for a, b in itertools.pairwise(steps))
        if batch < 200:  # no batch passes two multiples: every one is reported
            assert steps == list(range(200, steps[-1] + 1, 200)), steps
        seen = t.user_attrs["examples_seen"]
        if t.state == TrialState.PRUNED:  # stopped at the first batch boundary past a mark
            assert steps[-1] <= seen < steps[-1] + t.params["batch_size"]
        assert t.user_attrs["epochs_trained"] == pytest.approx(seen / n_train, abs=1e-4)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert done and all(t.user_attrs["examples_seen"] == 2 * n_train for t in done)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "successive halving pruned nothing in 8 trials"
    # Rungs at 200, 600, 1800 examples: a trial is only ever pruned at one of them (at the
    # report of the batch that passed it), and some within the first epoch.
    for t in pruned:
        rung_step = 200 * 3 ** t.user_attrs["prune_rung"]
        assert rung_step in {200, 600, 1800}
        assert rung_step <= t.user_attrs["prune_step"] < rung_step + t.params["batch_size"]
    assert any(t.user_attrs["examples_seen"] < n_train for t in pruned)
    assert all(t.user_attrs["stopped_epoch"] == (1 if t.user_attrs["examples_seen"] <= n_train
                                                 else 2) for t in pruned)
    # The report counts the partial epochs, not whole ones.
    report = build_report(study, spec, {"id": 1})
    exact = sum(t.user_attrs["examples_seen"] for t in trials) / n_train
    assert report["total_epochs"] == pytest.approx(exact, abs=0.01)
    assert report["total_epochs"] < sum(t.user_attrs["stopped_epoch"] for t in trials)
    assert report["compute_saved"]["pruned_epochs"] == pytest.approx(
        sum(2 - t.user_attrs["examples_seen"] / n_train for t in pruned), abs=0.01)


def test_pruning_audit_in_examples_counts_epochs(storage):
    spec = _spec(n_trials=6, max_epochs=2, audit_fraction=1.0,
                 search_space={"learning_rate": {"low": 1e-5, "high": 0.3, "log": True},
                               "batch_size": {"choices": [64]}},
                 pruner={"name": "successive_halving", "resource": "examples",
                         "report_every": 300, "min_resource": 300, "reduction_factor": 2})
    study = _run(storage, spec)
    n_train = len(bundled("digits", 0).X_train)
    audited = [t for t in study.get_trials() if t.user_attrs.get("audited")]
    assert audited
    for t in audited:
        step = t.user_attrs["prune_step"]  # in examples
        assert step % 300 == 0 and max(t.intermediate_values) == step
        assert t.user_attrs["epochs_trained"] == pytest.approx(step / n_train, abs=1e-4)
        assert t.user_attrs["stopped_epoch"] == -(-step // n_train)
        assert t.user_attrs["audit_trained_epochs"] == 2
    audit = build_report(study, spec, {"id": 1})["pruning_audit"]
    assert audit["audit_epochs"] == pytest.approx(
        sum(2 - t.user_attrs["epochs_trained"] for t in audited), abs=0.01)


def test_hyperband_in_examples_sizes_its_brackets_by_the_dataset(storage):
    spec = _spec(n_trials=3, max_epochs=3,
                 pruner={"name": "hyperband", "resource": "examples", "min_resource": 100})
    create_study(spec, storage, "hb", {"job_id": 1})
    data = bundled("digits", 0)
    study = load_study(spec, storage, "hb")
    run_trial(study, spec, data)
    n_train = len(data.X_train)
    assert study.pruner._max_resource == 3 * n_train
    # Reported once per epoch, at examples = epochs x training rows.
    (t,) = study.get_trials()
    assert sorted(t.intermediate_values) == [n_train, 2 * n_train, 3 * n_train]


def test_threshold_pruner_records_its_cutoff(storage):
    spec = _spec(pruner={"name": "threshold", "lower": 0.99, "n_warmup_steps": 0},
                 n_trials=2)
    study = _run(storage, spec)
    for t in study.get_trials():
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["pruner"] == "threshold"
        assert t.user_attrs["prune_cutoff"] == 0.99
        assert t.user_attrs["prune_value"] < 0.99 and t.user_attrs["stopped_epoch"] == 1


def test_patient_pruner_explains_through_its_wrapped_pruner(storage):
    # A learning rate this large makes validation accuracy fall back now and then: each fall
    # exhausts patience 0, and the wrapped threshold pruner then stops the trial.
    spec = _spec(n_trials=4, max_epochs=8,
                 search_space={"learning_rate": {"value": 0.3}, "dropout": {"value": 0.5},
                               "batch_size": {"choices": [128, 256]}},
                 pruner={"name": "patient", "patience": 0,
                         "wrapped": {"name": "threshold", "lower": 0.999, "n_warmup_steps": 0}})
    study = _run(storage, spec)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert pruned
    for t in pruned:
        assert t.user_attrs["pruner"] == "patient" and t.user_attrs["prune_wrapped"] == "threshold"
        assert t.user_attrs["prune_cutoff"] == 0.999 and t.user_attrs["prune_patience"] == 0
        curve = list(t.intermediate_values.values())
        # It stopped at an epoch that fell below the best before it.
        assert curve[-1] < max(curve[:-1])


def test_warm_start_configs_run_first(storage):
    configs = [{"learning_rate": 0.01, "batch_size": 128, "dropout": 0.1,
                "weight_decay": 1e-4},
               {"learning_rate": 0.002, "batch_size": 256, "dropout": 0.0,
                "weight_decay": 1e-5}]
    spec = _spec(warm_start={"configs": configs}, n_trials=3)
    study = _run(storage, spec)
    trials = study.get_trials()
    assert trials[0].params == configs[0] and trials[1].params == configs[1]
    assert trials[2].params not in configs


def test_warm_start_outside_the_space_is_rejected():
    with pytest.raises(ValidationError, match="outside the search space"):
        _spec(warm_start={"configs": [{"batch_size": 64}]})
    with pytest.raises(ValidationError, match="unknown parameter"):
        _spec(warm_start={"configs": [{"momentum": 0.9}]})


def test_pruning_audit_trains_pruned_trials_on_silently(storage):
    spec = _spec(n_trials=9, max_epochs=6, audit_fraction=1.0,
                 search_space={"learning_rate": {"low": 1e-5, "high": 0.3, "log": True},
                               "batch_size": {"choices": [128, 256]}},
                 pruner={"name": "successive_halving", "reduction_factor": 2})
    study = _run(storage, spec)
    audited = [t for t in study.get_trials() if t.user_attrs.get("audited")]
    assert audited, "with audit_fraction 1 every pruned trial is audited"
    for t in audited:
        assert t.state == TrialState.PRUNED
        # The study saw only the epochs up to the pruning, as it would without the audit ...
        assert len(t.intermediate_values) == t.user_attrs["prune_step"] == \
            t.user_attrs["stopped_epoch"]
        # ... while the trial trained on to the end.
        assert t.user_attrs["audit_trained_epochs"] == spec.max_epochs
        assert len(t.user_attrs["curves"]["val_accuracy"]) == spec.max_epochs
    report = build_report(study, spec, {"id": 1})
    audit = report["pruning_audit"]
    assert audit["n_audited"] == len(audited)
    kept = [t.value for t in study.get_trials(states=(TrialState.COMPLETE,))]
    finals = [t.user_attrs["audit_best_value"] for t in audited]
    assert audit["false_prunes"] == sum(f > max(kept) for f in finals)
    assert audit["regret"] == pytest.approx(max(0.0, max(finals) - max(kept)))
    assert report["best_trial"]["number"] == study.best_trial.number
    assert not study.best_trial.user_attrs.get("audited")


def test_conditional_dimensions_follow_their_parents(storage):
    spec = _spec(n_trials=8, search_space={
        "batch_size": {"choices": [128, 256]},
        "optimizer": {"choices": ["adam", "momentum", "nesterov"]},
        "momentum": {"low": 0.5, "high": 0.95},
        "schedule": {"choices": ["constant", "cosine", "onecycle"]},
        "activation": {"choices": ["relu", "tanh", "gelu"]},
        "n_layers": {"low": 1, "high": 3},
        "layer_width": {"choices": [8, 16]},
    })
    study = _run(storage, spec)
    seen_optimizers = set()
    for t in study.get_trials():
        p = t.params
        seen_optimizers.add(p["optimizer"])
        assert ("momentum" in p) == (p["optimizer"] in ("momentum", "nesterov")), p
        widths = [k for k in p if k.startswith("width_")]
        assert len(widths) == p["n_layers"], p
        assert p["schedule"] in ("constant", "cosine", "onecycle")
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert len(seen_optimizers) >= 2


def test_unknown_names_in_optional_dimensions_are_rejected():
    with pytest.raises(ValidationError, match="unknown"):
        _spec(search_space={"optimizer": {"choices": ["adam", "lion"]}})
    with pytest.raises(ValidationError, match="searched together"):
        _spec(search_space={"n_layers": {"low": 1, "high": 2}})
