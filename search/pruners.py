"""The spec's pruner (build_pruner), why it stopped a trial (explain_prune), and successive
halving whose cost per decision does not grow with the job.

Optuna's SuccessiveHalvingPruner reads every trial of the study (`study.get_trials`) each
time a trial reaches a rung, to collect the values that trial competes with at that rung.
In a 10,000-trial job that read, and the report's explanation of each pruned trial
(explain_prune below), grew to the largest part of a one-epoch trial's cost after
the sampler's was bounded (benchmarks/RESULTS_sampler.md).

`BoundedSuccessiveHalvingPruner` takes the very same decisions (the rung arithmetic is
Optuna's, tests/search/test_pruners.py compares every decision with Optuna's pruner) but asks
a `RungSource` for the competing values: `rungs(study, key)` returns the values recorded
under the rung's system attribute `key`, as a `RungValues` (sorted values and the ids of
their trials). The default (`public_rung_values`) reads the study through Optuna's public
API, as Optuna does; the service passes service.trial_store.RungReader, which reads only the
values recorded since its last read.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.optuna_internals import (
    hyperband_bracket,
    patient_settings,
    percentile,
    reduction_factor,
    storage_of,
    threshold_bounds,
    trial_id,
)
from search.spec import JobSpec, PrunerSpec


@dataclass
class RungValues:
    """The values recorded at one rung: sorted, and the storage ids of their trials."""

    values: list[float] = field(default_factory=list)
    trial_ids: set[int] = field(default_factory=set)

    def add(self, trial: int, value: float) -> None:
        if trial not in self.trial_ids:
            self.trial_ids.add(trial)
            bisect.insort(self.values, value)

    def with_trial(self, trial: int, value: float) -> list[float]:
        """The sorted competing values of `trial` (its own value counted once)."""
        if trial in self.trial_ids:
            return list(self.values)
        out = list(self.values)
        bisect.insort(out, value)
        return out


RungSource = Callable[[optuna.Study, str], RungValues]


def rung_key(rung: int) -> str:
    """The system attribute under which a trial's value at `rung` is recorded (Optuna's)."""
    return f"completed_rung_{rung}"


def public_rung_values(study: optuna.Study, key: str) -> RungValues:
    """Every value recorded under `key` in the study, read through Optuna's public API."""
    out = RungValues()
    for t in study.get_trials(deepcopy=False):
        if key in t.system_attrs:
            out.add(trial_id(t), float(t.system_attrs[key]))
    return out


def cutoff(competing: list[float], reduction_factor: int, maximize: bool) -> float:
    """The worst value that still goes on to the next rung, among sorted `competing` values
    (Optuna's rule: the top len // reduction_factor, at least the best one)."""
    idx = max(len(competing) // reduction_factor - 1, 0)
    return competing[-(idx + 1)] if maximize else competing[idx]


class BoundedSuccessiveHalvingPruner(optuna.pruners.SuccessiveHalvingPruner):
    """Optuna's successive halving (asynchronous, ASHA) reading its competitors from `rungs`."""

    def __init__(self, min_resource: int = 1, reduction_factor: int = 4,
                 min_early_stopping_rate: int = 0, bootstrap_count: int = 0,
                 rungs: RungSource | None = None) -> None:
        if not isinstance(min_resource, int):
            raise TypeError("min_resource must be an int ('auto' reads the whole study)")
        super().__init__(min_resource=min_resource, reduction_factor=reduction_factor,
                         min_early_stopping_rate=min_early_stopping_rate,
                         bootstrap_count=bootstrap_count)
        self.min_resource = min_resource
        self.reduction_factor = reduction_factor
        self.min_early_stopping_rate = min_early_stopping_rate
        self.bootstrap_count = bootstrap_count
        self.rungs: RungSource = rungs or public_rung_values

    def competitors(self, study: optuna.Study, trial: FrozenTrial, rung: int
                    ) -> list[float]:
        """The sorted values `trial` competes with at `rung`, its own included."""
        key = rung_key(rung)
        return self.rungs(study, key).with_trial(trial_id(trial),
                                                 float(trial.system_attrs[key]))

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        rung = 0
        while rung_key(rung) in trial.system_attrs:
            rung += 1
        value = trial.intermediate_values[step]
        maximize = study.direction == StudyDirection.MAXIMIZE
        while True:
            promotion_step = self.min_resource * (
                self.reduction_factor ** (self.min_early_stopping_rate + rung))
            if step < promotion_step:
                return False
            if math.isnan(value):
                return True
            key = rung_key(rung)
            storage_of(study).set_trial_system_attr(trial_id(trial), key, value)
            competing = self.rungs(study, key).with_trial(trial_id(trial), value)
            if len(competing) <= self.bootstrap_count:
                return True
            best_kept = cutoff(competing, self.reduction_factor, maximize)
            if (value < best_kept) if maximize else (value > best_kept):
                return True
            rung += 1


def rung_source(pruner: optuna.pruners.BasePruner | None) -> RungSource | None:
    """The rung source of a (possibly wrapped) bounded successive-halving pruner, else None."""
    if isinstance(pruner, optuna.pruners.PatientPruner):
        pruner = patient_settings(pruner)[0]
    return pruner.rungs if isinstance(pruner, BoundedSuccessiveHalvingPruner) else None


def build_pruner(spec: JobSpec | PrunerSpec, max_resource: int | None = None,
                 n_train: int | None = None, rungs: RungSource | None = None
                 ) -> optuna.pruners.BasePruner:
    """The spec's pruner, with steps counted in the spec's resource (epochs or examples).

    Hyperband's max_resource is max_epochs, or max_epochs x n_train (the dataset's training
    rows) with resource "examples"; "auto" where that is unknown. Successive halving reads
    its competitors from `rungs` (default: the whole study, search.pruners).
    """
    if isinstance(spec, JobSpec):
        max_resource = spec.max_epochs
        if spec.pruner.resource == "examples":
            max_resource = spec.max_epochs * n_train if n_train else None
        return build_pruner(spec.pruner, max_resource, rungs=rungs)
    p = spec
    if p.name == "none":
        return optuna.pruners.NopPruner()
    if p.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "successive_halving":
        return BoundedSuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor, rungs=rungs)
    if p.name == "threshold":
        return optuna.pruners.ThresholdPruner(lower=p.lower, upper=p.upper,
                                              n_warmup_steps=p.n_warmup_steps)
    if p.name == "patient":
        wrapped = build_pruner(p.wrapped, max_resource, rungs=rungs) if p.wrapped else None
        return optuna.pruners.PatientPruner(wrapped, patience=p.patience, min_delta=p.min_delta)
    return optuna.pruners.HyperbandPruner(
        min_resource=p.min_resource, max_resource=max_resource or "auto",
        reduction_factor=p.reduction_factor)


def explain_prune(study: optuna.Study, trial: FrozenTrial, step: int,
                  pruner: optuna.pruners.BasePruner | None = None) -> dict[str, Any]:
    """Why the pruner stopped `trial` at `step`: its value, the cut-off and the peer count.

    Mirrors the decision rules of Optuna's pruners (reading their settings), so the report can
    say what the trial was compared with.
    """
    pruner = pruner or study.pruner
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    value = trial.intermediate_values.get(step, math.nan)
    info: dict[str, Any] = {"pruner": _pruner_name(pruner), "prune_step": step,
                            "prune_value": value}
    if isinstance(pruner, optuna.pruners.PatientPruner):
        inner, patience = patient_settings(pruner)
        details = explain_prune(study, trial, step, inner) if inner else {}
        details.update(pruner="patient", prune_patience=patience,
                       prune_wrapped=_pruner_name(inner) if inner else "none")
        return details
    if isinstance(pruner, optuna.pruners.ThresholdPruner):
        lower, upper = threshold_bounds(pruner)
        info["prune_cutoff"] = lower if lower is not None and value < lower else upper
        return info
    if isinstance(pruner, optuna.pruners.PercentilePruner):
        # Compares the trial's best-so-far with a percentile of the completed trials' values
        # at the same step.
        values = list(trial.intermediate_values.values())
        best = float(np.nanmax(values) if maximize else np.nanmin(values))
        peers = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if step in t.intermediate_values
        ]
        info.update(prune_value=best, prune_n_peers=len(peers))
        if peers:
            q = percentile(pruner)
            info["prune_cutoff"] = float(np.nanpercentile(peers, 100 - q if maximize else q))
        return info
    if isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner | optuna.pruners.HyperbandPruner):
        rungs = sorted(
            int(k.rsplit("_", 1)[1]) for k in trial.system_attrs if k.startswith("completed_rung_")
        )
        if not rungs:
            return info
        rung = rungs[-1]
        key = rung_key(rung)
        if isinstance(pruner, BoundedSuccessiveHalvingPruner):
            competing = pruner.competitors(study, trial, rung)
        else:
            peers = [t for t in study.get_trials(deepcopy=False) if key in t.system_attrs]
            if isinstance(pruner, optuna.pruners.HyperbandPruner):
                # Hyperband compares a trial only with the trials of its own bracket.
                bracket = hyperband_bracket(pruner, study, trial)
                peers = [t for t in peers if hyperband_bracket(pruner, study, t) == bracket]
                info["prune_bracket"] = bracket
            competing = sorted(float(t.system_attrs[key]) for t in peers)
        info.update(prune_rung=rung, prune_value=float(trial.system_attrs[key]),
                    prune_cutoff=cutoff(competing, reduction_factor(pruner), maximize),
                    prune_n_peers=len(competing))
    return info


def _pruner_name(pruner: optuna.pruners.BasePruner) -> str:
    if isinstance(pruner, optuna.pruners.MedianPruner):
        return "median"
    names = {
        optuna.pruners.PercentilePruner: "percentile",
        optuna.pruners.SuccessiveHalvingPruner: "successive_halving",
        optuna.pruners.HyperbandPruner: "hyperband",
        optuna.pruners.ThresholdPruner: "threshold",
        optuna.pruners.PatientPruner: "patient",
        optuna.pruners.NopPruner: "none",
    }
    return next((name for cls, name in names.items() if isinstance(pruner, cls)),
                type(pruner).__name__)

