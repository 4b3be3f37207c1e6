"""What the report pictures read from a study: one snapshot of its trials, and per trial
its outcome, learning curve, best value and parameters (search.plots draws them)."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import optuna
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from search.report import stop_reason
from search.spec import CORE_PARAMS
from trainer.vocab import StopReason

RUNNING = "running"

# What a picture draws at most, however many trials the job has: a 10,000-trial job's pictures
# draw as fast, and read as well, as a 1,000-trial one's. Counts in legends and titles are of
# every trial; the drawn ones are the best and an even sample of the rest (pick).
MAX_CURVES = 300  # learning curves
BEST_CURVES = 50
MAX_POINTS = 2000  # markers of the history and of learning rate against batch size
BEST_POINTS = 200
MAX_IMPORTANCE_TRIALS = 1000  # completed trials PED-ANOVA weighs: an even sample by value

T = TypeVar("T")

# The studies in memory that importances builds are no news: their creation is not logged.
_WEIGHED_PREFIX = "hptune-importances-"
logging.getLogger("optuna.storages._in_memory").addFilter(
    lambda record: _WEIGHED_PREFIX not in record.getMessage())

# One colour per outcome, shared by every plot (Okabe-Ito: readable with colour blindness).
STYLE: dict[str, tuple[str, str]] = {
    StopReason.MAX_EPOCHS: ("#0072B2", "completed (max epochs)"),
    StopReason.EARLY_STOPPED: ("#009E73", "early-stopped"),
    StopReason.PRUNED: ("#E69F00", "pruned"),
    StopReason.DIVERGED: ("#D55E00", "diverged"),
    StopReason.FAILED: ("#666666", "failed"),
    StopReason.CANCELLED: ("#AAAAAA", "cancelled"),
    RUNNING: ("#CC79A7", "running"),
}

BEST_COLOUR = "#111111"
NO_VALUE_COLOUR = "#BBBBBB"


@dataclass(frozen=True)
class Snapshot:
    """The study read once: every plot of one request draws from the same trials."""

    study: optuna.Study
    trials: list[FrozenTrial]
    metric: str
    maximize: bool
    best: FrozenTrial | None
    # Training examples per epoch where the pruner counts steps in examples, else None.
    examples_per_epoch: float | None
    # What the learning curves' x values count: "epoch", or "examples seen" where a study counted
    # in examples has no finished trial yet to tell how many make an epoch.
    x_unit: str


def snapshot(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> Snapshot:
    """The study's trials read once (`trials` when the caller has read them already)."""
    trials = list(study.get_trials(deepcopy=False) if trials is None else trials)
    spec = study.user_attrs.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in trials if t.state == TrialState.COMPLETE and finite(t.value)]
    best = None
    if done:
        best = (max if maximize else min)(done, key=lambda t: t.value)
    examples_per_epoch, x_unit = None, "epoch"
    if (spec.get("pruner") or {}).get("resource") == "examples":
        examples_per_epoch = _examples_per_epoch(trials)
        x_unit = "epoch" if examples_per_epoch else "examples seen"
    return Snapshot(study, trials, spec.get("metric") or "objective value", maximize, best,
                    examples_per_epoch, x_unit)


def _examples_per_epoch(trials: list[FrozenTrial]) -> float | None:
    """The training set's size, from the finished trial that saw the most examples.

    Trials record the examples they saw and the (rounded) epochs that makes; the trial that saw
    the most gives the closest ratio, and the size is a whole number of rows. Audited trials
    are left out: their epochs_trained is where the pruner stopped them, not what they saw.
    """
    seen = [(t.user_attrs["examples_seen"], t.user_attrs.get("epochs_trained"))
            for t in trials
            if t.user_attrs.get("examples_seen") and not t.user_attrs.get("audited")]
    seen = [(n, e) for n, e in seen if finite(e) and e > 0]
    if not seen:
        return None
    n, epochs = max(seen)
    return float(round(n / epochs))


def finite(v: float | None) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def outcome(t: FrozenTrial) -> str:
    reason = stop_reason(t)
    if reason in STYLE:
        return reason
    if t.state in (TrialState.RUNNING, TrialState.WAITING):
        return RUNNING
    if t.state == TrialState.COMPLETE:
        return StopReason.MAX_EPOCHS
    return StopReason.FAILED if t.state == TrialState.FAIL else StopReason.PRUNED


def curve(t: FrozenTrial, examples_per_epoch: float | None = None) -> np.ndarray:
    """The trial's (step, monitored value) points with non-finite values dropped; steps in
    examples become (fractional) epochs where `examples_per_epoch` is given."""
    pts = [(s, v) for s, v in sorted(t.intermediate_values.items()) if finite(v)]
    pts = np.asarray(pts, dtype=float).reshape(-1, 2)
    if examples_per_epoch:
        pts[:, 0] /= examples_per_epoch
    return pts


def reached(t: FrozenTrial, maximize: bool) -> float | None:
    """A trial's value, or for a stopped one the best value it reached before stopping."""
    if t.state == TrialState.COMPLETE and finite(t.value):
        return float(t.value)
    best = t.user_attrs.get("best_value")
    if finite(best):
        return float(best)
    ys = curve(t)[:, 1]
    if ys.size == 0:
        return None
    return float(ys.max() if maximize else ys.min())


def param(t: FrozenTrial, name: str) -> float | None:
    """A sampled parameter, or the value the job fixed it at."""
    v = t.params.get(name, t.user_attrs.get(f"fixed_{name}"))
    return float(v) if finite(v) else None


def thin(items: Sequence[T], k: int) -> list[T]:
    """At most `k` of `items`, evenly spaced, the first and the last among them."""
    n = len(items)
    if n <= k:
        return list(items)
    if k <= 1:
        return list(items[:k])
    return [items[i * (n - 1) // (k - 1)] for i in range(k)]


def pick(items: Sequence[T], k: int, n_best: int, key: Callable[[T], Any]) -> list[T]:
    """At most `k` of `items` in their order: the `n_best` smallest by `key` and an even
    sample of the others (all of them when there are no more than `k`)."""
    if len(items) <= k:
        return list(items)
    best = set(sorted(range(len(items)), key=lambda i: key(items[i]))[:n_best])
    rest = thin([i for i in range(len(items)) if i not in best], k - len(best))
    return [items[i] for i in sorted(best.union(rest))]


def best_first(maximize: bool) -> Callable[[FrozenTrial], tuple[bool, float, int]]:
    """A sort key of trials by the value they reached, best first, those without one last."""
    def key(t: FrozenTrial) -> tuple[bool, float, int]:
        v = reached(t, maximize)
        return (v is None, 0.0 if v is None else -v if maximize else v, t.number)
    return key


def importance_sample(completed: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The completed trials PED-ANOVA weighs: all of them up to MAX_IMPORTANCE_TRIALS, else an
    even sample by value (every quantile keeps its share, which is what PED-ANOVA compares)."""
    done = [t for t in completed if finite(t.value)]
    if len(done) <= MAX_IMPORTANCE_TRIALS:
        return done
    return sorted(thin(sorted(done, key=lambda t: (t.value, t.number)), MAX_IMPORTANCE_TRIALS),
                  key=lambda t: t.number)


def importances(study: optuna.Study, completed: Sequence[FrozenTrial]) -> dict[str, float]:
    """PED-ANOVA importances over `completed` (importance_sample of them), computed on a study
    in memory holding just those: never a second read of the study's storage."""
    completed = importance_sample(completed)
    if len(completed) < 2:
        raise ValueError(f"importances need at least 2 completed trials; "
                         f"this study has {len(completed)}")
    varying = sorted({name for t in completed for name, d in t.distributions.items()
                      if not d.single()})
    if len(varying) < 2:
        only = f" ({varying[0]})" if varying else ""
        raise ValueError(f"importances compare 2 or more searched parameters; "
                         f"this study searches {len(varying)}{only}")
    order = {p: i for i, p in enumerate(CORE_PARAMS)}
    varying.sort(key=lambda p: (order.get(p, len(order)), p))
    weighed = optuna.create_study(directions=study.directions,
                                  study_name=f"{_WEIGHED_PREFIX}{uuid.uuid4()}")
    weighed.add_trials(completed)
    return optuna.importance.get_param_importances(
        weighed, evaluator=PedAnovaImportanceEvaluator(), params=varying)
