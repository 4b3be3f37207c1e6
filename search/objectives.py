"""Objectives: what one trial trains, behind one contract.

An objective declares its parameters (names, kinds, default ranges) and the tasks it can
train, and trains one trial given the sampled parameters, the dataset and a `Reporter`:

    class MyModel(Objective):
        name = "my_model"
        params = {"learning_rate": Param.real(1e-4, 0.3, log=True),
                  "batch_size": Param.categorical(32, 64, 128)}

        def train(self, trial: TrialInput, reporter: Reporter) -> TrainResult:
            state = reporter.load_checkpoint()          # bytes of a trial it resumes, or None
            for epoch in range(start, trial.max_epochs + 1):
                ...                                     # train one epoch
                if not reporter.report(epoch, {"val_loss": ..., "val_accuracy": ...}):
                    break                               # pruned, cancelled or early-stopped
                reporter.save_checkpoint(state_bytes)  # when reporter.checkpoint_due(epoch)
            return reporter.result({"accuracy": ..., "loss": ...})

`report(step, metrics)` answers whether to go on: pruning, the job's cancel and timeout,
the worker's hand-back and the spec's early stopping (patience, min_delta on the job's
metric) are decided there, the same for every objective. `result(test_metrics)` turns what
was reported into the trainer's `TrainResult`, so reports, the pruning audit and compute
saved treat every objective alike. `export_onnx(result, data)` gives the trained model as
ONNX (raw feature rows in), or None when the objective cannot.

Objectives are found by name: the built-in `mlp` (the NumPy trainer), then the Python
entry-point group `hptune.objectives` (this package registers `torch_mlp` and `torch_cnn`,
which need the `torch` extra; an operator `pip install`s more into the workers). Tenants
name an objective; they never send code.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol

from trainer import Dataset, Direction, StopReason, Task, TrainResult
from trainer.vocab import Metric

ENTRY_POINT_GROUP = "hptune.objectives"
DEFAULT_OBJECTIVE = "mlp"


@dataclass(frozen=True)
class Param:
    """One parameter an objective takes, with the range searched when a spec does not say."""

    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @staticmethod
    def real(low: float, high: float, *, log: bool = False) -> Param:
        return Param("float", low, high, log)

    @staticmethod
    def integer(low: int, high: int) -> Param:
        return Param("int", low, high)

    @staticmethod
    def categorical(*values: Any) -> Param:
        return Param("categorical", choices=tuple(values))


@dataclass(frozen=True)
class TrialInput:
    """What one trial of an objective gets: its parameters and what to train on."""

    params: Mapping[str, Any]  # sampled and fixed values, by declared name
    data: Dataset
    max_epochs: int
    metric: Metric  # the job's metric, reported as one of the metrics every epoch
    seed: int
    number: int = 0  # the trial's number
    spec: Any = None  # the whole search.JobSpec, for objectives that read more of it


class Reporter(Protocol):
    """An objective's line to the search: reports, checkpoints, the decision to go on."""

    def report(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Record `metrics` at epoch `step`; False: stop now (see `stop_reason`)."""

    def checkpoint_due(self, step: int) -> bool:
        """Whether to save a checkpoint after epoch `step` (each pruning rung, an interval)."""

    def save_checkpoint(self, state: bytes) -> None:
        """Keep `state` as the trial's latest checkpoint (the last reported step's)."""

    def load_checkpoint(self) -> bytes | None:
        """The latest checkpoint of the trial this one resumes, or None: start afresh."""

    def result(self, test_metrics: Mapping[str, float]) -> TrainResult:
        """What was reported, as a TrainResult (history, best epoch, stop reason)."""


class Objective(ABC):
    """One trainable model family; subclasses set `name`, `params` and `tasks`."""

    name: str = ""
    params: Mapping[str, Param] = {}
    tasks: tuple[Task, ...] = tuple(Task)
    # Objectives that early-stop themselves (the built-in trainer) say so; for the others
    # the reporter applies the spec's patience.
    stops_early_itself: bool = False
    # Whether a job may count its pruner's steps in training examples (resource "examples").
    reports_examples: bool = False

    @abstractmethod
    def train(self, trial: TrialInput, reporter: Reporter) -> TrainResult:
        """Train one trial, reporting every epoch; return reporter.result(...) or a
        TrainResult of its own."""

    def export_onnx(self, result: TrainResult, data: Dataset) -> bytes | None:
        """The trained model as ONNX taking raw feature rows, or None."""
        return None


class UnknownObjective(LookupError):
    """No installed package provides the objective, or its package cannot load here (a
    missing optional dependency: `reason` says what to install)."""

    def __init__(self, name: str, known: list[str], reason: str | None = None) -> None:
        message = (f"objective {name!r} cannot run here: {reason}" if reason else
                   f"objective {name!r} is not installed; installed: {', '.join(known)}")
        super().__init__(message)
        self.name = name


@functools.cache
def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def installed() -> list[str]:
    """Names of the objectives this process can run."""
    return sorted({DEFAULT_OBJECTIVE, *_entry_points()})


@functools.cache
def get_objective(name: str) -> Objective:
    """The objective called `name`; UnknownObjective if no installed package provides it."""
    if name == DEFAULT_OBJECTIVE:
        from search.objective_mlp import MLPObjective

        return MLPObjective()
    ep = _entry_points().get(name)
    if ep is None:
        raise UnknownObjective(name, installed())
    try:
        obj = ep.load()
        obj = obj() if isinstance(obj, type) else obj
    except ImportError as exc:  # its package, or an extra it needs, is missing
        raise UnknownObjective(name, installed(), reason=str(exc)) from exc
    if not isinstance(obj, Objective):
        raise TypeError(f"entry point {name!r} gives {type(obj).__name__}, not an Objective")
    return obj


@dataclass(eq=False)
class EarlyStopping:
    """Patience on the job's metric, for objectives that do not stop early themselves."""

    patience: int | None
    min_delta: float
    direction: Direction
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0

    def update(self, step: int, value: float) -> bool:
        """Record `value`; True when patience has run out."""
        if not math.isfinite(value):
            return False
        better = self.best is None or (
            value < self.best - self.min_delta if self.direction == Direction.MINIMIZE
            else value > self.best + self.min_delta)
        if better:
            self.best, self.best_step, self.since_best = value, step, 0
            return False
        self.since_best += 1
        return self.patience is not None and self.since_best >= self.patience


@dataclass(eq=False)
class History:
    """The rows an objective reported, and what TrainResult needs from them."""

    monitor: Metric
    rows: list[dict[str, float]] = field(default_factory=list)

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        self.rows.append({"epoch": float(step), **{k: float(v) for k, v in metrics.items()}})

    def best(self) -> tuple[int | None, float | None]:
        values = [(int(r["epoch"]), r.get(self.monitor)) for r in self.rows]
        values = [(s, v) for s, v in values if v is not None and math.isfinite(v)]
        if not values:
            return None, None
        pick = min if self.monitor.direction == Direction.MINIMIZE else max
        return pick(values, key=lambda sv: sv[1])

    def result(self, reason: StopReason, test_metrics: Mapping[str, float],
               seconds: float, examples_per_epoch: int) -> TrainResult:
        best_epoch, best_value = self.best()
        stopped = int(self.rows[-1]["epoch"]) if self.rows else 0
        return TrainResult(history=list(self.rows), best_epoch=best_epoch,
                           best_value=best_value, stop_reason=reason, stopped_epoch=stopped,
                           test_metrics=dict(test_metrics),
                           examples_seen=stopped * examples_per_epoch,
                           monitor=str(self.monitor), seconds=seconds)
