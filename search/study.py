"""Job spec -> Optuna study: samplers, pruners, search space (the trial runner: search.runner)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from search.pruners import build_pruner
from search.sampler import HistorySource, WindowedTPESampler
from search.spec import CORE_PARAMS, JobSpec
from search.spec_dims import Fixed, FloatRange, IntChoices
from trainer import Optimizer, TrainConfig

# Keys of the trial user attributes that explain an outcome; the report reads them back.
ATTR_STOP_REASON = "stop_reason"
ATTR_STOPPED_EPOCH = "stopped_epoch"
ATTR_BEST_EPOCH = "best_epoch"
# Set beside stop_reason `cancelled` when a worker stopped the trial early (a StopCause).
ATTR_STOP_CAUSE = "stop_cause"
# Study user attribute that create_study sets last: a study without it is half-made.
STUDY_READY_ATTR = "hptune_ready"


class StopCause(StrEnum):
    """Why a worker stopped a trial early (its stop_reason is then `cancelled`)."""

    # The worker got SIGTERM; the trial is retried without using up the retry limit.
    HANDED_BACK = "handed_back"
    # The job's timeout passed.
    TIMED_OUT = "timed_out"


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


def build_sampler(spec: JobSpec, seed_offset: int = 0, history: HistorySource | None = None
                  ) -> optuna.samplers.BaseSampler:
    """The spec's sampler; `seed_offset` keeps parallel workers from drawing the same points.

    TPE is search.sampler.WindowedTPESampler: its cost per trial does not grow with the job.
    `history` is where it reads its bounded view of the study (default: Optuna's public API;
    the worker passes service.trial_store.BoundedHistory, which reads only the view).
    """
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
    return WindowedTPESampler(
        history=history,
        seed=seed,
        n_startup_trials=spec.sampler.n_startup_trials,
        multivariate=True,
        # Running trials count as "bad" so parallel workers spread out.
        constant_liar=True,
    )


MOMENTUM_OPTIMIZERS = tuple(o for o in Optimizer if o.uses_momentum)


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
    searched = searched_distributions(spec)
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


def searched_distributions(spec: JobSpec, objective: Any = None
                           ) -> dict[str, BaseDistribution]:
    """What a trial of the spec samples up front: the core dimensions for the built-in
    objective, the declared parameters (in the spec's or their default ranges) for another
    (`objective`: the spec's, looked up by name unless given)."""
    from search.objective_space import distributions_for
    from search.objectives import DEFAULT_OBJECTIVE, get_objective

    if spec.objective == DEFAULT_OBJECTIVE:
        return distributions(spec)
    return distributions_for(spec, objective or get_objective(spec.objective))[0]


def center_config(spec: JobSpec, objective: Any = None) -> dict[str, Any]:
    """The centre of the spec's searched dimensions: the geometric middle of a log range, the
    middle of a linear one (rounded down for integers), the middle choice (the lower of two
    middles)."""
    out: dict[str, Any] = {}
    for name, dist in searched_distributions(spec, objective).items():
        if isinstance(dist, FloatDistribution):
            if dist.log:
                out[name] = math.sqrt(dist.low * dist.high)
            else:
                out[name] = (dist.low + dist.high) / 2
        elif isinstance(dist, IntDistribution):
            out[name] = (dist.low + dist.high) // 2
        else:
            try:
                choices = sorted(dist.choices)
            except TypeError:  # names and numbers mixed: the order given
                choices = list(dist.choices)
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
