"""Job spec -> Optuna study: samplers, pruners, search space and the trial runner."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from search.spec import CORE_PARAMS, Fixed, FloatRange, IntChoices, JobSpec, PrunerSpec
from trainer import Dataset, TrainConfig, fit

# Keys of the trial user attributes that explain an outcome; the report reads them back.
ATTR_STOP_REASON = "stop_reason"
ATTR_STOPPED_EPOCH = "stopped_epoch"
ATTR_BEST_EPOCH = "best_epoch"
# Study user attribute that create_study sets last: a study without it is half-made.
STUDY_READY_ATTR = "hptune_ready"

# Stop reasons, as in the trial JSON of the REST API.
MAX_EPOCHS = "max_epochs"
EARLY_STOPPED = "early_stopped"
PRUNED = "pruned"
DIVERGED = "diverged"
FAILED = "failed"
CANCELLED = "cancelled"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_name_for(job_id: int) -> str:
    """The Optuna study that holds a job's trials."""
    return f"job-{job_id}"


class MissingExtra(ValueError):
    """A sampler needs an optional dependency that is not installed."""


def sampler_available(name: str) -> str | None:
    """None if the sampler can run here, else what to install for it."""
    if name == "gp":
        try:
            import torch  # noqa: F401
        except ImportError:
            return "sampler 'gp' needs PyTorch: install the extra hptune[gp]"
    return None


def build_sampler(spec: JobSpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler; `seed_offset` keeps parallel workers from drawing the same points."""
    base = spec.sampler.seed if spec.sampler.seed is not None else spec.seed
    seed = (base * 1_000_003 + seed_offset) % (2**32)
    name = spec.sampler.name
    missing = sampler_available(name)
    if missing:
        raise MissingExtra(missing)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        # One scrambled Sobol sequence shared by every worker (the same seed), indexed by trial.
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=base,
                                          warn_asynchronous_seeding=False,
                                          warn_independent_sampling=False)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=spec.sampler.n_startup_trials,
            consider_pruned_trials=True, warn_independent_sampling=False,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials,
                                         warn_independent_sampling=False)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=spec.sampler.n_startup_trials,
        multivariate=True,
        # Running trials count as "bad" so parallel workers spread out.
        constant_liar=True,
    )


def build_pruner(spec: JobSpec | PrunerSpec, max_resource: int | None = None,
                 n_train: int | None = None) -> optuna.pruners.BasePruner:
    """The spec's pruner, with steps counted in the spec's resource (epochs or examples).

    Hyperband's max_resource is max_epochs, or max_epochs x n_train (the dataset's training
    rows) with resource "examples"; "auto" where that is unknown.
    """
    if isinstance(spec, JobSpec):
        max_resource = spec.max_epochs
        if spec.pruner.resource == "examples":
            max_resource = spec.max_epochs * n_train if n_train else None
        return build_pruner(spec.pruner, max_resource)
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
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    if p.name == "threshold":
        return optuna.pruners.ThresholdPruner(lower=p.lower, upper=p.upper,
                                              n_warmup_steps=p.n_warmup_steps)
    if p.name == "patient":
        wrapped = build_pruner(p.wrapped, max_resource) if p.wrapped else None
        return optuna.pruners.PatientPruner(wrapped, patience=p.patience, min_delta=p.min_delta)
    return optuna.pruners.HyperbandPruner(
        min_resource=p.min_resource, max_resource=max_resource or "auto",
        reduction_factor=p.reduction_factor)


MOMENTUM_OPTIMIZERS = ("momentum", "nesterov")


def distributions(spec: JobSpec) -> dict[str, BaseDistribution]:
    """The four core dimensions of the spec as Optuna distributions (fixed ones excluded)."""
    out: dict[str, BaseDistribution] = {}
    for name in CORE_PARAMS:
        dim = getattr(spec.search_space, name)
        if isinstance(dim, FloatRange):
            out[name] = FloatDistribution(dim.low, dim.high, log=dim.log)
        elif isinstance(dim, IntChoices):
            out[name] = CategoricalDistribution(dim.choices)
    return out


def suggest_conditional(trial: optuna.Trial, spec: JobSpec) -> dict[str, Any]:
    """Define-by-run the optional dimensions: momentum only for momentum optimizers, one
    width per hidden layer the trial has."""
    space = spec.search_space
    out: dict[str, Any] = {}
    if space.optimizer:
        out["optimizer"] = trial.suggest_categorical("optimizer", space.optimizer.choices)
    optimizer = out.get("optimizer", spec.model.optimizer)
    if space.momentum and optimizer in MOMENTUM_OPTIMIZERS:
        out["momentum"] = trial.suggest_float("momentum", space.momentum.low,
                                              space.momentum.high, log=space.momentum.log)
    if space.schedule:
        out["schedule"] = trial.suggest_categorical("schedule", space.schedule.choices)
    if space.activation:
        out["activation"] = trial.suggest_categorical("activation", space.activation.choices)
    if space.n_layers and space.layer_width:
        n = trial.suggest_int("n_layers", space.n_layers.low, space.n_layers.high)
        for i in range(n):
            out[f"width_{i}"] = trial.suggest_categorical(f"width_{i}", space.layer_width.choices)
        out["n_layers"] = n
    return out


def fixed_params(spec: JobSpec) -> dict[str, float]:
    """The core dimensions the spec holds constant."""
    return {name: dim.value for name in CORE_PARAMS
            if isinstance(dim := getattr(spec.search_space, name), Fixed)}


def hidden_layers(spec: JobSpec, params: dict[str, Any]) -> tuple[int, ...]:
    """The trial's layer widths: searched (n_layers, width_<i>) or the spec's model."""
    if "n_layers" in params:
        return tuple(int(params[f"width_{i}"]) for i in range(int(params["n_layers"])))
    return tuple(spec.model.hidden_layers)


def train_config(spec: JobSpec, params: dict[str, Any]) -> TrainConfig:
    """The trainer config for one trial: sampled params, fixed params and the spec's model."""
    values = {**fixed_params(spec), **params}
    return TrainConfig(
        hidden_layers=hidden_layers(spec, values),
        activation=values.get("activation", spec.model.activation),
        optimizer=values.get("optimizer", spec.model.optimizer),
        momentum=float(values.get("momentum", spec.model.momentum)),
        schedule=values.get("schedule", spec.model.schedule),
        warmup_epochs=spec.model.warmup_epochs,
        learning_rate=float(values["learning_rate"]),
        batch_size=int(values["batch_size"]),
        dropout=float(values["dropout"]),
        weight_decay=float(values["weight_decay"]),
        max_epochs=spec.max_epochs,
        patience=spec.early_stopping.patience,
        min_delta=spec.early_stopping.min_delta,
        monitor=spec.metric,
        seed=spec.seed,
    )


def create_study(spec: JobSpec, storage: optuna.storages.BaseStorage, name: str,
                 attrs: dict[str, Any], warm_configs: list[dict[str, Any]] = (),
                 *, load_if_exists: bool = True,
                 on_created: Callable[[], None] | None = None) -> optuna.Study:
    """Create the job's study with its spec and settings as user attributes.

    The spec's warm-start configurations, then `warm_configs` (say, the best trials of an
    earlier job), are queued so that the first trials evaluate them; without any, the centre
    of the search space is (unless warm_start.center is off). The last step marks the study
    ready (STUDY_READY_ATTR, see study_is_ready): a process that dies before it leaves a study
    that readers can tell is half-made. `on_created` runs right after the bare study exists
    (tests inject a crash there).
    """
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=spec.direction,
        load_if_exists=load_if_exists,
    )
    if on_created is not None:
        on_created()
    study.set_user_attr("spec", spec.model_dump(mode="json"))
    study.set_user_attr("sampler", spec.sampler.model_dump(mode="json"))
    study.set_user_attr("pruner", spec.pruner.model_dump(mode="json"))
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    searched = distributions(spec)
    configs = [*spec.warm_start.configs, *warm_configs]
    if not configs and spec.warm_start.center:
        configs = [center_config(spec)]
    for cfg in configs:
        params = {k: v for k, v in cfg.items() if k in searched}
        if params:
            study.enqueue_trial(params, skip_if_exists=True)
    study.set_user_attr(STUDY_READY_ATTR, True)
    return study


def study_is_ready(storage: optuna.storages.BaseStorage, name: str, spec: JobSpec
                   ) -> bool | None:
    """None if no study `name` exists; True if create_study finished it for `spec`; False if
    it is half-made (its creator died) or was made for another spec."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    attrs = storage.get_study_user_attrs(study_id)
    return bool(attrs.get(STUDY_READY_ATTR)) and attrs.get("spec") == spec.model_dump(mode="json")


def center_config(spec: JobSpec) -> dict[str, Any]:
    """The centre of the spec's searched core dimensions: the geometric middle of a log
    range, the middle of a linear one, the middle choice (the lower of two middles)."""
    out: dict[str, Any] = {}
    for name, dist in distributions(spec).items():
        if isinstance(dist, FloatDistribution):
            if dist.log:
                out[name] = math.sqrt(dist.low * dist.high)
            else:
                out[name] = (dist.low + dist.high) / 2
        else:
            choices = sorted(dist.choices)
            out[name] = choices[(len(choices) - 1) // 2]
    return out


def load_study(spec: JobSpec, storage: optuna.storages.BaseStorage, name: str,
               seed_offset: int = 0) -> optuna.Study:
    """Open a job's study with the sampler and pruner its spec asks for."""
    return optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=build_sampler(spec, seed_offset),
        pruner=build_pruner(spec),
    )


@dataclass(frozen=True)
class TrialOutcome:
    """How one trial ended."""

    number: int
    state: TrialState
    stop_reason: str
    value: float | None


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
        inner = pruner._wrapped_pruner
        details = explain_prune(study, trial, step, inner) if inner else {}
        details.update(pruner="patient", prune_patience=pruner._patience,
                       prune_wrapped=_pruner_name(inner) if inner else "none")
        return details
    if isinstance(pruner, optuna.pruners.ThresholdPruner):
        lower, upper = pruner._lower, pruner._upper
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
            q = pruner._percentile
            info["prune_cutoff"] = float(np.nanpercentile(peers, 100 - q if maximize else q))
        return info
    if isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner | optuna.pruners.HyperbandPruner):
        rungs = sorted(
            int(k.rsplit("_", 1)[1]) for k in trial.system_attrs if k.startswith("completed_rung_")
        )
        if not rungs:
            return info
        rung = rungs[-1]
        key = f"completed_rung_{rung}"
        peers_trials = study.get_trials(deepcopy=False)
        if isinstance(pruner, optuna.pruners.HyperbandPruner):
            # Hyperband compares a trial only with the trials of its own bracket.
            bracket = pruner._get_bracket_id(study, trial)
            peers_trials = [t for t in peers_trials if pruner._get_bracket_id(study, t) == bracket]
            info["prune_bracket"] = bracket
        competing = sorted(float(t.system_attrs[key]) for t in peers_trials
                           if key in t.system_attrs)
        idx = max(len(competing) // pruner._reduction_factor - 1, 0)
        cutoff = competing[-(idx + 1)] if maximize else competing[idx]
        info.update(prune_rung=rung, prune_value=float(trial.system_attrs[key]),
                    prune_cutoff=cutoff, prune_n_peers=len(competing))
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
    return names.get(type(pruner), type(pruner).__name__)


def run_trial(
    study: optuna.Study,
    spec: JobSpec,
    data: Dataset,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_started: Callable[[optuna.Trial], None] = lambda trial: None,
) -> TrialOutcome:
    """Ask the study for one trial, train it epoch by epoch and tell the outcome with its reason.

    `should_stop` is polled once per epoch; when it answers true the trial ends as FAIL with
    reason `cancelled`. Exceptions from training propagate after the trial is told FAIL.
    """
    trial = study.ask(fixed_distributions=distributions(spec))
    on_started(trial)
    suggest_conditional(trial, spec)
    config = train_config(spec, trial.params)
    for key, value in fixed_params(spec).items():
        trial.set_user_attr(f"fixed_{key}", value)
    pruned_at: list[int] = []
    cancelled: list[bool] = []
    # Audited trials keep training after the pruner's verdict, silently: the study sees exactly
    # what it would have seen without the audit.
    audit = _audit_draw(spec, trial.number)
    n_train = len(data.X_train)
    by_examples = spec.pruner.resource == "examples"
    if by_examples:
        # Hyperband's largest rung depends on the dataset's size.
        study.pruner = build_pruner(spec, n_train=n_train)
        config = replace(config,
                         eval_every_examples=spec.pruner.report_every or n_train)
    started = time.perf_counter()

    def report(step: int, metrics: dict[str, float]) -> bool:
        """Report the metric at `step` (in the pruner's resource); True stops the trial."""
        value = float(metrics[spec.metric])
        # Diverged epochs are the trainer's to stop; audited trials report nothing past the
        # pruner's verdict.
        reportable = math.isfinite(value) and not pruned_at
        if reportable:
            trial.report(value, step)
        if should_stop():
            cancelled.append(True)
            return True
        if reportable and trial.should_prune():
            pruned_at.append(step)
            return not audit
        return False

    def on_examples(mark: int, metrics: dict[str, float]) -> bool:
        # A batch that passes several multiples of report_every reports once, at the last of
        # them: never more than one database write and pruning check per mini-batch.
        every = config.eval_every_examples
        if mark != int(metrics["examples"]) // every * every:
            return False
        return report(mark, metrics)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
        if not by_examples:
            return report(epoch, metrics)
        if should_stop():
            cancelled.append(True)
            return True
        return False

    try:
        result = fit(config, data, on_epoch=on_epoch,
                     on_examples=on_examples if by_examples else None)
    except BaseException as exc:
        trial.set_user_attr(ATTR_STOP_REASON, FAILED)
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        raise

    elapsed = time.perf_counter() - started
    attrs: dict[str, Any] = {
        ATTR_STOPPED_EPOCH: result.stopped_epoch,
        ATTR_BEST_EPOCH: result.best_epoch,
        "train_seconds": round(elapsed, 4),
        "epoch_seconds": round(elapsed / max(result.stopped_epoch, 1), 5),
        "best_value": _finite_or_none(result.best_value),
        "curves": _curves(result.history),
        "examples_seen": result.examples_seen,
        "epochs_trained": round(result.examples_seen / n_train, 4),
    }
    for key, value in result.test_metrics.items():
        attrs[f"test_{key}"] = _finite_or_none(value)

    if cancelled:
        reason, state = CANCELLED, TrialState.FAIL
    elif pruned_at:
        reason, state = PRUNED, TrialState.PRUNED
        frozen = study._storage.get_trial(trial._trial_id)
        attrs.update(explain_prune(study, frozen, pruned_at[0]))
        if audit:
            attrs.update({
                "audited": True,
                "audit_best_value": attrs.pop("best_value"),
                "audit_best_epoch": attrs[ATTR_BEST_EPOCH],
                "audit_trained_epochs": result.stopped_epoch,
                "audit_stop_reason": result.stop_reason,
                ATTR_STOPPED_EPOCH: _epoch_of(pruned_at[0], by_examples, n_train),
                ATTR_BEST_EPOCH: _epoch_of(_best_epoch(frozen, spec.direction), by_examples,
                                           n_train),
                "epochs_trained": round(_epoch_of(pruned_at[0], by_examples, n_train, exact=True),
                                        4),
            })
            for key in [k for k in attrs if k.startswith("test_")]:
                attrs[f"audit_{key}"] = attrs.pop(key)
    elif result.stop_reason == "diverged":
        reason, state = DIVERGED, TrialState.PRUNED
        attrs["diverged_epoch"] = result.stopped_epoch
        attrs["diverged_loss"] = str(result.diverged_loss)
    elif result.stop_reason == "early_stopped":
        reason, state = EARLY_STOPPED, TrialState.COMPLETE
        attrs["patience"] = spec.early_stopping.patience
        attrs["min_delta"] = spec.early_stopping.min_delta
    else:
        reason, state = MAX_EPOCHS, TrialState.COMPLETE
    attrs[ATTR_STOP_REASON] = reason
    for key, value in attrs.items():
        trial.set_user_attr(key, value)

    value = _finite_or_none(result.best_value)
    if state == TrialState.COMPLETE and value is not None:
        study.tell(trial, value)
    elif state == TrialState.COMPLETE:
        state = TrialState.PRUNED
        study.tell(trial, state=state)
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
