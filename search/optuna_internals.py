"""The one module of search/ (and, through service/trial_store.py, of service/) that reads
Optuna's private attributes. Each is wrapped in a small public function, so an Optuna upgrade
that renames one breaks here, and tests/service/test_trial_store.py says which.

search/ may not import service/ (imports flow service -> search -> trainer), so the helpers
that both packages need live here; service/trial_store.py re-exports them.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (live or frozen); Optuna keeps it private."""
    return int(trial._trial_id)


def study_id(study: Any) -> int:
    """The storage's id of a study (an optuna.Study, or the FrozenStudy get_all_studies gives)."""
    return int(study._study_id)


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Ids of the study's RUNNING trials whose heartbeat is older than the storage's grace
    period (what optuna.storages.fail_stale_trials would fail)."""
    return list(storage_of(study)._get_stale_trial_ids(study._study_id))


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes through (Optuna wraps an RDBStorage in a cache)."""
    return study._storage


def frozen_trial(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """The trial as its storage holds it now (its system attributes included)."""
    return storage_of(study).get_trial(trial_id(trial))


# --- pruner settings, read to explain a pruning decision ----------------------------------

def patient_settings(pruner: optuna.pruners.PatientPruner
                     ) -> tuple[optuna.pruners.BasePruner | None, int]:
    """A PatientPruner's wrapped pruner and patience."""
    return pruner._wrapped_pruner, int(pruner._patience)


def threshold_bounds(pruner: optuna.pruners.ThresholdPruner) -> tuple[float | None, float | None]:
    """A ThresholdPruner's lower and upper bounds (Optuna keeps -inf/inf where unbounded)."""
    lower, upper = pruner._lower, pruner._upper
    return (None if lower is None else float(lower), None if upper is None else float(upper))


def percentile(pruner: optuna.pruners.PercentilePruner) -> float:
    """A PercentilePruner's percentile (a MedianPruner's is 50)."""
    return float(pruner._percentile)


def reduction_factor(pruner: optuna.pruners.SuccessiveHalvingPruner
                     | optuna.pruners.HyperbandPruner) -> int:
    """The reduction factor of successive halving (Hyperband's applies to every bracket)."""
    return int(pruner._reduction_factor)


def hyperband_bracket(pruner: optuna.pruners.HyperbandPruner, study: optuna.Study,
                      trial: FrozenTrial) -> int:
    """The Hyperband bracket that `trial` belongs to (it competes only within it)."""
    return int(pruner._get_bracket_id(study, trial))
