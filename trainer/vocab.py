"""The trainer's names, defined once: tasks, activations, optimizers, schedules,
validation metrics and their directions, and why a run stopped.

The loss has no name of its own: it follows from the task (network.py's heads).

Each is a StrEnum, so a member equals its string ("relu" == Activation.RELU) and JSON,
stored specs and user attributes keep plain strings. search/ and service/ derive their
lists and checks from these instead of spelling the names again.
"""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    """What a dataset's targets are, which decides the network's head and loss."""

    MULTICLASS = "multiclass"
    BINARY = "binary"
    REGRESSION = "regression"

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The validation metrics a run on this task reports (and may monitor)."""
        return _TASK_METRICS[self]


class Activation(StrEnum):
    """Hidden-layer nonlinearities; "gelu" is the tanh approximation."""

    RELU = "relu"
    LEAKY_RELU = "leaky_relu"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    GELU = "gelu"


class Optimizer(StrEnum):
    """Update rules of trainer.optimizers."""

    SGD = "sgd"
    MOMENTUM = "momentum"
    NESTEROV = "nesterov"
    ADAM = "adam"
    ADAMW = "adamw"
    RMSPROP = "rmsprop"
    ADAGRAD = "adagrad"

    @property
    def uses_momentum(self) -> bool:
        """Whether the `momentum` coefficient changes this rule's updates."""
        return self in (Optimizer.MOMENTUM, Optimizer.NESTEROV)


class Schedule(StrEnum):
    """Learning-rate schedules of trainer.schedules."""

    CONSTANT = "constant"
    STEP = "step"
    EXPONENTIAL = "exponential"
    COSINE = "cosine"
    COSINE_RESTARTS = "cosine_restarts"
    ONECYCLE = "onecycle"


class Direction(StrEnum):
    """Which way a metric improves, in Optuna's words."""

    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"


class Metric(StrEnum):
    """Validation metrics a run reports after each epoch (history keys, `monitor`)."""

    VAL_ACCURACY = "val_accuracy"
    VAL_LOSS = "val_loss"
    VAL_RMSE = "val_rmse"
    VAL_R2 = "val_r2"

    @property
    def direction(self) -> Direction:
        """`maximize` for accuracy and R^2, `minimize` for the loss and RMSE."""
        return _METRIC_DIRECTION[self]


class StopReason(StrEnum):
    """Why a trial's training stopped, as in TrainResult.stop_reason and the trial JSON.

    fit ends with one of the first four (STOP_REASONS); the search marks a trial whose
    training raised as FAILED and one its job stopped as CANCELLED.
    """

    MAX_EPOCHS = "max_epochs"
    EARLY_STOPPED = "early_stopped"
    PRUNED = "pruned"
    DIVERGED = "diverged"
    FAILED = "failed"
    CANCELLED = "cancelled"


# The reasons fit itself can end with.
STOP_REASONS: tuple[StopReason, ...] = (StopReason.MAX_EPOCHS, StopReason.EARLY_STOPPED,
                                        StopReason.PRUNED, StopReason.DIVERGED)

_METRIC_DIRECTION = {
    Metric.VAL_ACCURACY: Direction.MAXIMIZE,
    Metric.VAL_LOSS: Direction.MINIMIZE,
    Metric.VAL_RMSE: Direction.MINIMIZE,
    Metric.VAL_R2: Direction.MAXIMIZE,
}
_CLASSIFICATION_METRICS = (Metric.VAL_LOSS, Metric.VAL_ACCURACY)
_TASK_METRICS: dict[Task, tuple[Metric, ...]] = {
    Task.MULTICLASS: _CLASSIFICATION_METRICS,
    Task.BINARY: _CLASSIFICATION_METRICS,
    Task.REGRESSION: (Metric.VAL_LOSS, Metric.VAL_RMSE, Metric.VAL_R2),
}
