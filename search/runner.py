"""The trial runner: ask the study for one trial, train it epoch by epoch, tell its outcome.

`run_trial` reads top to bottom: ask and set up, train with the spec's objective
(search.objectives) against a `TrialReporter` (pruner reports, the caller's stop check,
checkpoints), then decide the outcome and its reason (`_decide`) and tell the study
(`_tell`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.objective_space import distributions_for
from search.objectives import (
    DEFAULT_OBJECTIVE,
    EarlyStopping,
    Objective,
    TrialInput,
    get_objective,
)
from search.optuna_internals import frozen_trial
from search.pruners import build_pruner, explain_prune, rung_source
from search.spec import JobSpec
from search.study import (
    ATTR_BEST_EPOCH,
    ATTR_STOP_REASON,
    ATTR_STOPPED_EPOCH,
    TrialOutcome,
    distributions,
    fixed_params,
    suggest_conditional,
)
from search.trial_reporter import TrialArtifacts, TrialReporter
from trainer import Dataset, StopReason, TrainResult


def run_trial(
    study: optuna.Study,
    spec: JobSpec,
    data: Dataset,
    *,
    should_stop: Callable[[], object] = lambda: False,
    on_started: Callable[[optuna.Trial], None] = lambda trial: None,
    tell_failed: Callable[[optuna.Study, optuna.Trial], None] | None = None,
    artifacts: TrialArtifacts | None = None,
) -> TrialOutcome:
    """Ask the study for one trial, train it with the spec's objective and tell the outcome
    with its reason.

    `should_stop` is polled once per epoch; when it answers true the trial ends as FAIL with
    reason `cancelled`. Exceptions from training propagate after the trial is told FAIL.
    `tell_failed(study, trial)` tells a FAIL (default: study.tell); the service's workers
    pass one that also queues the retry under the job's lock, as one step. `artifacts` keeps
    the trial's checkpoints (a retry resumes from its chain's latest) and its model.
    """
    tell_failed = tell_failed or _tell_fail
    objective = get_objective(spec.objective)
    trial, params = _ask(study, spec, objective)
    on_started(trial)
    n_train = len(data.X_train)
    by_examples = spec.pruner.resource == "examples"
    if by_examples:
        # Hyperband's largest rung depends on the dataset's size.
        study.pruner = build_pruner(spec, n_train=n_train, rungs=rung_source(study.pruner))
    early = (None if objective.stops_early_itself else
             EarlyStopping(spec.early_stopping.patience, spec.early_stopping.min_delta,
                           spec.direction))
    reporter = TrialReporter(trial, spec, should_stop, audit=_audit_draw(spec, trial.number),
                             artifacts=artifacts, early=early, by_examples=by_examples,
                             every=(spec.pruner.report_every or n_train) if by_examples else 0)
    started = time.perf_counter()
    try:
        result = objective.train(
            TrialInput(params, data, spec.max_epochs, spec.metric, spec.seed, trial.number,
                       spec), reporter)
    except BaseException as exc:
        trial.set_user_attr(ATTR_STOP_REASON, StopReason.FAILED)
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
        tell_failed(study, trial)
        raise
    attrs = _result_attrs(result, time.perf_counter() - started, n_train)
    reason, state = _decide(study, trial, spec, result, reporter, attrs, n_train)
    attrs[ATTR_STOP_REASON] = reason
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    if artifacts is not None and state == TrialState.COMPLETE:
        onnx = objective.export_onnx(result, data)
        if onnx is not None:
            artifacts.save_model(trial, onnx)
    return _tell(study, trial, state, reason, _finite_or_none(result.best_value), tell_failed)


def _ask(study: optuna.Study, spec: JobSpec, objective: Objective
         ) -> tuple[optuna.Trial, dict[str, Any]]:
    """A new trial (or the queued retry) and its parameters, fixed ones included; the fixed
    ones are user attributes `fixed_<name>` too, which a retry carries over."""
    if objective.name == DEFAULT_OBJECTIVE:
        trial = study.ask(fixed_distributions=distributions(spec))
        suggest_conditional(trial, spec)
        fixed: dict[str, Any] = fixed_params(spec)
    else:
        dists, fixed = distributions_for(spec, objective)
        trial = study.ask(fixed_distributions=dists)
    for key, value in fixed.items():
        trial.set_user_attr(f"fixed_{key}", value)
    return trial, {**fixed, **trial.params}


def _tell_fail(study: optuna.Study, trial: optuna.Trial) -> None:
    study.tell(trial, state=TrialState.FAIL)


def _result_attrs(result: TrainResult, elapsed: float, n_train: int) -> dict[str, Any]:
    """The user attributes every trained trial records, whatever its outcome."""
    # An objective that does not count examples (reporter.result) trained whole epochs.
    examples = result.examples_seen or result.stopped_epoch * n_train
    attrs: dict[str, Any] = {
        ATTR_STOPPED_EPOCH: result.stopped_epoch,
        ATTR_BEST_EPOCH: result.best_epoch,
        "train_seconds": round(elapsed, 4),
        "epoch_seconds": round(elapsed / max(result.stopped_epoch, 1), 5),
        "best_value": _finite_or_none(result.best_value),
        "curves": _curves(result.history),
        "examples_seen": examples,
        "epochs_trained": round(examples / n_train, 4),
    }
    for key, value in result.test_metrics.items():
        attrs[f"test_{key}"] = _finite_or_none(value)
    return attrs


def _decide(study: optuna.Study, trial: optuna.Trial, spec: JobSpec, result: TrainResult,
            reporter: TrialReporter, attrs: dict[str, Any], n_train: int
            ) -> tuple[StopReason, TrialState]:
    """The trial's stop reason and state; adds the reason's details to `attrs`."""
    if reporter.cancelled:
        return StopReason.CANCELLED, TrialState.FAIL
    if reporter.pruned_at is not None:
        frozen = frozen_trial(study, trial)
        attrs.update(explain_prune(study, frozen, reporter.pruned_at))
        if reporter.audit:
            _move_to_audit(attrs, frozen, spec, result, reporter.pruned_at, n_train)
        return StopReason.PRUNED, TrialState.PRUNED
    if result.stop_reason == "diverged":
        attrs["diverged_epoch"] = result.stopped_epoch
        attrs["diverged_loss"] = str(result.diverged_loss)
        return StopReason.DIVERGED, TrialState.PRUNED
    if result.stop_reason == "early_stopped":
        attrs["patience"] = spec.early_stopping.patience
        attrs["min_delta"] = spec.early_stopping.min_delta
        return StopReason.EARLY_STOPPED, TrialState.COMPLETE
    return StopReason.MAX_EPOCHS, TrialState.COMPLETE


def _move_to_audit(attrs: dict[str, Any], frozen: FrozenTrial, spec: JobSpec,
                   result: TrainResult, pruned_at: int, n_train: int) -> None:
    """An audited trial records what the pruner saw; what it trained past that is `audit_*`."""
    by_examples = spec.pruner.resource == "examples"
    attrs.update({
        "audited": True,
        "audit_best_value": attrs.pop("best_value"),
        "audit_best_epoch": attrs[ATTR_BEST_EPOCH],
        "audit_trained_epochs": result.stopped_epoch,
        "audit_stop_reason": result.stop_reason,
        ATTR_STOPPED_EPOCH: _epoch_of(pruned_at, by_examples, n_train),
        ATTR_BEST_EPOCH: _epoch_of(_best_epoch(frozen, spec.direction), by_examples, n_train),
        "epochs_trained": round(_epoch_of(pruned_at, by_examples, n_train, exact=True), 4),
    })
    for key in [k for k in attrs if k.startswith("test_")]:
        attrs[f"audit_{key}"] = attrs.pop(key)


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, reason: StopReason,
          value: float | None,
          tell_failed: Callable[[optuna.Study, optuna.Trial], None]) -> TrialOutcome:
    """Tell the study; a COMPLETE trial without a finite value is told PRUNED."""
    if state == TrialState.COMPLETE and value is not None:
        study.tell(trial, value)
    elif state == TrialState.COMPLETE:
        state = TrialState.PRUNED
        study.tell(trial, state=state)
    elif state == TrialState.FAIL:
        tell_failed(study, trial)
    else:
        study.tell(trial, state=state)
    return TrialOutcome(trial.number, state, reason, value)


def _audit_draw(spec: JobSpec, number: int) -> bool:
    """Whether trial `number` is audited: a fixed draw per (seed, trial), at audit_fraction."""
    if spec.audit_fraction <= 0:
        return False
    return random.Random(f"{spec.seed}:{number}").random() < spec.audit_fraction


def _epoch_of(step: int | None, by_examples: bool, n_train: int, exact: bool = False
              ) -> float | None:
    """The epoch a pruner step falls in (the step itself when steps are epochs)."""
    if step is None or not by_examples:
        return step
    return step / n_train if exact else math.ceil(step / n_train)


def _best_epoch(trial: FrozenTrial, direction: str) -> int | None:
    values = trial.intermediate_values
    if not values:
        return None
    pick = max if direction == "maximize" else min
    return pick(values, key=lambda step: values[step])


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _curves(history: list[dict[str, float]]) -> dict[str, list[float | None]]:
    """Per-epoch metrics as compact columns for learning-curve plots."""
    keys = [k for k in (history[0] if history else {}) if k not in ("epoch",)]
    return {k: [_round(h.get(k)) for h in history] for k in keys}


def _round(v: float | None) -> float | None:
    v = _finite_or_none(v)
    return None if v is None else round(v, 6)
