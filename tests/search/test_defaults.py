"""hptune's default sampler, pruner and early stopping are a measured choice: pin them.

They were picked with benchmarks/search_efficiency.py (results and the runs behind the choice
in benchmarks/RESULTS_search.md). Changing a default here without re-running that benchmark
is what these tests are for: they fail, and say which value moved.
"""

import json
import re
from pathlib import Path

import optuna
import pytest

from search import JobSpec
from search.pruners import BoundedSuccessiveHalvingPruner
from search.study import build_pruner, build_sampler

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "RESULTS_search.md"

# The documented defaults, in the shape the benchmark prints them for strategy D.
DOCUMENTED = {
    "sampler": {"name": "tpe", "n_startup_trials": 8},
    "pruner": {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3},
    "early_stopping": {"patience": None, "min_delta": 0.0},
    # The first trial evaluates the centre of the search space.
    "first_trial": "center",
}
# Successive halving's rungs (epochs) for the default 30 epochs: min_resource * 3**k.
DOCUMENTED_RUNGS = [1, 3, 9, 27]


def _defaults(spec: JobSpec) -> dict:
    return {
        "sampler": {"name": spec.sampler.name,
                    "n_startup_trials": spec.sampler.n_startup_trials},
        "pruner": {"name": spec.pruner.name, "min_resource": spec.pruner.min_resource,
                   "reduction_factor": spec.pruner.reduction_factor},
        "early_stopping": {"patience": spec.early_stopping.patience,
                           "min_delta": spec.early_stopping.min_delta},
        "first_trial": ("center" if spec.warm_start.center and not spec.warm_start.configs
                        and spec.warm_start.from_job is None else "sampler"),
    }


@pytest.mark.parametrize("part", sorted(DOCUMENTED))
def test_spec_defaults_are_the_documented_ones(part):
    assert _defaults(JobSpec())[part] == DOCUMENTED[part]


def test_a_spec_with_only_the_common_fields_gets_the_defaults():
    spec = JobSpec.model_validate({"dataset": "mnist1d", "n_trials": 40, "max_epochs": 30,
                                   "metric": "val_accuracy", "seed": 3})
    assert _defaults(spec) == DOCUMENTED
    assert spec.sampler.seed is None  # the job's seed drives the sampler


def test_default_sampler_is_multivariate_tpe_with_a_constant_liar():
    sampler = build_sampler(JobSpec())
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == DOCUMENTED["sampler"]["n_startup_trials"]
    assert sampler._multivariate is True
    assert sampler._constant_liar is True


def test_default_pruner_rungs_in_epochs():
    spec = JobSpec()
    assert spec.max_epochs == 30
    pruner = build_pruner(spec)
    # Optuna's successive halving, reading its competitors a bounded amount (search.pruners).
    assert type(pruner) is BoundedSuccessiveHalvingPruner
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    trial = study.ask()
    rungs = []
    for epoch in range(1, spec.max_epochs + 1):
        trial.report(0.5, epoch)
        before = _completed_rungs(study, trial)
        assert not trial.should_prune()  # the first trial is always promoted
        if _completed_rungs(study, trial) > before:
            rungs.append(epoch)
    assert rungs == DOCUMENTED_RUNGS


def _completed_rungs(study: optuna.Study, trial: optuna.Trial) -> int:
    attrs = study._storage.get_trial(trial._trial_id).system_attrs
    return sum(1 for k in attrs if k.startswith("completed_rung_"))


def test_the_benchmark_results_measured_these_defaults():
    """RESULTS_search.md's strategy D must be the defaults the code has now."""
    line = re.search(r"^- `D`: `(\{.*\})`$", RESULTS.read_text(), re.MULTILINE)
    assert line, "benchmarks/RESULTS_search.md lists no settings for strategy D"
    measured = json.loads(line.group(1))
    assert measured == DOCUMENTED, (
        "the defaults changed since benchmarks/search_efficiency.py measured them; "
        "re-run it and update DOCUMENTED")


def test_the_first_trial_is_the_centre_of_the_space(tmp_path):
    from search import create_study
    from search.study import center_config

    spec = JobSpec.model_validate({"dataset": "digits", "search_space": {
        "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "batch_size": {"choices": [256, 16, 64, 32]},
        "dropout": {"low": 0.1, "high": 0.5},
        "weight_decay": {"value": 1e-4}}})
    center = center_config(spec)
    assert center == {"learning_rate": pytest.approx(1e-3), "batch_size": 32,
                      "dropout": pytest.approx(0.3)}
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = create_study(spec, storage, "c", {})
    (queued,) = study.get_trials()
    assert queued.state == optuna.trial.TrialState.WAITING
    assert queued.system_attrs["fixed_params"] == center
    # Given warm-start configs (or center off), the centre is not queued.
    off = spec.model_copy(update={"warm_start": spec.warm_start.model_copy(
        update={"center": False})})
    assert create_study(off, storage, "c2", {}).get_trials() == []
