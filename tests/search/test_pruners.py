"""search.pruners: bounded successive halving decides exactly as Optuna's pruner does."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from search import JobSpec, build_pruner, explain_prune
from search.optuna_internals import frozen_trial
from search.pruners import (
    BoundedSuccessiveHalvingPruner,
    RungValues,
    cutoff,
    public_rung_values,
    rung_source,
)


def decisions(pruner: optuna.pruners.BasePruner, direction: str, n_trials: int = 60,
              seed: int = 0, storage: optuna.storages.BaseStorage | str | None = None,
              study_name: str | None = None) -> list[tuple[int, int]]:
    """(trial, step it was pruned at, or -1) for trials reporting the same random curves."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(direction=direction, pruner=pruner, storage=storage,
                                study_name=study_name)
    out = []
    for number in range(n_trials):
        trial = study.ask()
        level, slope = rng.random(), rng.random() * 0.05
        pruned_at = -1
        for step in range(1, 28):
            trial.report(level + slope * step + rng.normal(0, 0.01), step)
            if trial.should_prune():
                pruned_at = step
                break
        study.tell(trial, state=optuna.trial.TrialState.PRUNED) if pruned_at > 0 else \
            study.tell(trial, level)
        out.append((number, pruned_at))
    return out


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize(("min_resource", "factor", "bootstrap"),
                         [(1, 2, 0), (1, 3, 0), (2, 3, 0), (1, 4, 2)])
def test_decisions_equal_optunas(direction, min_resource, factor, bootstrap):
    optunas = optuna.pruners.SuccessiveHalvingPruner(
        min_resource=min_resource, reduction_factor=factor, bootstrap_count=bootstrap)
    ours = BoundedSuccessiveHalvingPruner(
        min_resource=min_resource, reduction_factor=factor, bootstrap_count=bootstrap)
    expected = decisions(optunas, direction)
    assert decisions(ours, direction) == expected
    # Not a vacuous comparison: trials were pruned at more than one rung.
    assert len({s for _, s in expected} - {-1}) >= 2


def test_rung_values_count_a_trial_once_and_stay_sorted():
    rv = RungValues()
    for tid, v in [(3, 0.5), (1, 0.9), (2, 0.1), (3, 0.7)]:
        rv.add(tid, v)
    assert rv.values == [0.1, 0.5, 0.9] and rv.trial_ids == {1, 2, 3}
    assert rv.with_trial(2, 123.0) == [0.1, 0.5, 0.9]  # already counted
    assert rv.with_trial(9, 0.6) == [0.1, 0.5, 0.6, 0.9]
    assert rv.values == [0.1, 0.5, 0.9]  # with_trial copies


@pytest.mark.parametrize(("values", "factor", "maximize", "expected"), [
    ([1.0], 3, True, 1.0),
    ([1.0, 2.0], 3, True, 2.0),  # fewer than the factor: only the best goes on
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, True, 5.0),  # the top 2 of 6
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, False, 2.0),
    ([1.0, 2.0, 3.0, 4.0], 2, False, 2.0),
])
def test_cutoff(values, factor, maximize, expected):
    assert cutoff(values, factor, maximize) == expected


def test_min_resource_auto_is_refused():
    with pytest.raises(TypeError, match="min_resource"):
        BoundedSuccessiveHalvingPruner(min_resource="auto")


def test_the_spec_builds_it_and_a_rung_source_survives_a_rebuild():
    spec = JobSpec(name="p", dataset="iris")
    assert spec.pruner.name == "successive_halving"

    def source(study, key):
        return RungValues()

    pruner = build_pruner(spec, rungs=source)
    assert isinstance(pruner, BoundedSuccessiveHalvingPruner)
    assert rung_source(pruner) is source
    assert rung_source(build_pruner(spec)) is public_rung_values
    patient = build_pruner(JobSpec(name="p", dataset="iris", pruner={
        "name": "patient", "patience": 2, "wrapped": {"name": "successive_halving"}}),
        rungs=source)
    assert rung_source(patient) is source
    assert rung_source(optuna.pruners.MedianPruner()) is None


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_explain_prune_names_the_cutoff_the_decision_used(direction):
    pruner = BoundedSuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    study = optuna.create_study(direction=direction, pruner=pruner)
    rng = np.random.default_rng(1)
    explained = 0
    for _ in range(40):
        trial = study.ask()
        for step in range(1, 10):
            trial.report(float(rng.random()), step)
            if trial.should_prune():
                frozen = frozen_trial(study, trial)
                info = explain_prune(study, frozen, step)
                assert info["pruner"] == "successive_halving"
                value, cut = info["prune_value"], info["prune_cutoff"]
                assert (value < cut) if direction == "maximize" else (value > cut)
                # Every trial that recorded this rung so far is a peer, this one included.
                key = f"completed_rung_{info['prune_rung']}"
                peers = [t for t in study.get_trials(deepcopy=False) if key in t.system_attrs]
                assert info["prune_n_peers"] == len(peers)
                explained += 1
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, 0.5)
    assert explained >= 10
