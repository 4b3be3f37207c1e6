"""The trainer's names (trainer.vocab) against what the trainer really does with them."""

import json

import numpy as np
import pytest

from trainer import (
    STOP_REASONS,
    Activation,
    Metric,
    Optimizer,
    Schedule,
    StopReason,
    Task,
    TrainConfig,
    fit,
    from_arrays,
)
from trainer.config import metric_mode
from trainer.datasets import DATASET_SHAPES


def _data(task: Task):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    if task == Task.REGRESSION:
        y = X @ np.array([1.0, -2.0, 0.5])
    else:
        y = (X[:, 0] > 0).astype(int) + (2 * (X[:, 1] > 0) if task == Task.MULTICLASS else 0)
    return from_arrays(X, y, task=task)


@pytest.mark.parametrize("task", list(Task))
def test_task_metrics_are_the_validation_metrics_fit_reports(task):
    result = fit(TrainConfig(hidden_layers=(4,), max_epochs=1, batch_size=16), _data(task))
    reported = {k for k in result.history[0] if k.startswith("val_")}
    assert reported == set(task.metrics)
    for metric in task.metrics:
        fit(TrainConfig(hidden_layers=(4,), max_epochs=1, monitor=metric), _data(task))


def test_metric_direction_matches_the_trainers_monitor_mode():
    for metric in Metric:
        assert metric_mode(metric) == {"maximize": "max", "minimize": "min"}[metric.direction]
    assert Metric.VAL_ACCURACY.direction == "maximize" and Metric.VAL_LOSS.direction == "minimize"


@pytest.mark.parametrize("name", [*Activation, *Optimizer, *Schedule])
def test_every_name_builds_a_config(name):
    field = {Activation: "activation", Optimizer: "optimizer", Schedule: "schedule"}[type(name)]
    TrainConfig(**{field: str(name), "max_epochs": 2})


def test_fit_stops_only_with_its_own_reasons():
    assert set(STOP_REASONS) < set(StopReason)
    result = fit(TrainConfig(hidden_layers=(4,), max_epochs=1), _data(Task.BINARY))
    assert result.stop_reason in STOP_REASONS


def test_names_serialise_as_plain_strings():
    assert json.dumps([Task.BINARY, StopReason.PRUNED]) == '["binary", "pruned"]'
    assert f"{Optimizer.ADAMW}" == "adamw" and Schedule("cosine") is Schedule.COSINE


def test_bundled_tasks_are_tasks():
    assert all(isinstance(shape[3], Task) for shape in DATASET_SHAPES.values())
