"""Schedules against their formulas at chosen steps."""

import itertools
import math

import pytest

from trainer.config import TrainConfig
from trainer.schedules import (
    constant,
    cosine,
    cosine_restarts,
    exponential,
    lr_at,
    onecycle,
    step_decay,
    warmup_factor,
)


def test_constant():
    assert constant(0, 0.1) == constant(12345, 0.1) == 0.1


def test_step_decay():
    assert step_decay(0, 1.0, 10, 0.5) == 1.0
    assert step_decay(9, 1.0, 10, 0.5) == 1.0
    assert step_decay(10, 1.0, 10, 0.5) == 0.5
    assert step_decay(35, 1.0, 10, 0.5) == 0.125


def test_exponential():
    assert exponential(0, 2.0, 0.9, 5) == 2.0
    assert exponential(5, 2.0, 0.9, 5) == pytest.approx(1.8)
    assert exponential(12, 2.0, 0.9, 5) == pytest.approx(2.0 * 0.9**2.4)


def test_cosine():
    assert cosine(0, 1.0, 100) == 1.0
    assert cosine(50, 1.0, 100) == pytest.approx(0.5)
    expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    assert cosine(25, 1.0, 100, 0.1) == pytest.approx(expected)
    assert cosine(100, 1.0, 100, 0.1) == 0.1
    assert cosine(500, 1.0, 100, 0.1) == 0.1


def test_cosine_restarts():
    # cycles of 10, 20, 40 steps
    assert cosine_restarts(0, 1.0, 10, 2.0) == 1.0
    assert cosine_restarts(5, 1.0, 10, 2.0) == pytest.approx(0.5)
    assert cosine_restarts(10, 1.0, 10, 2.0) == 1.0
    assert cosine_restarts(20, 1.0, 10, 2.0) == pytest.approx(0.5)
    assert cosine_restarts(30, 1.0, 10, 2.0) == 1.0
    expected = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))  # 10 steps into the 40-step cycle
    assert cosine_restarts(40, 1.0, 10, 2.0, 0.2) == pytest.approx(expected)
    assert cosine_restarts(27, 1.0, 9, 1.0) == 1.0


def test_onecycle():
    total = 100
    assert onecycle(0, 1.0, total, 0.3, 25.0, 1e4) == pytest.approx(1.0 / 25)
    assert onecycle(29, 1.0, total, 0.3, 25.0, 1e4) == pytest.approx(1.0)
    mid_up = onecycle(14, 1.0, total, 0.3, 25.0, 1e4)
    expected = 1.0 + (0.04 - 1.0) / 2 * (math.cos(math.pi * 14 / 29) + 1)
    assert mid_up == pytest.approx(expected)
    assert onecycle(99, 1.0, total, 0.3, 25.0, 1e4) == pytest.approx(0.04 / 1e4)


def test_warmup_factor():
    assert warmup_factor(0, 4) == 0.25
    assert warmup_factor(3, 4) == 1.0
    assert warmup_factor(10, 4) == 1.0
    assert warmup_factor(0, 0) == 1.0


def test_warmup_then_cosine():
    cfg = TrainConfig(
        learning_rate=0.1, schedule="cosine", warmup_epochs=2, max_epochs=10, min_lr_ratio=0.1
    )
    spe = 5  # 10 warm-up steps, then cosine over the remaining 40
    assert lr_at(0, cfg, spe) == pytest.approx(0.1 / 10)
    assert lr_at(4, cfg, spe) == pytest.approx(0.1 * 5 / 10)
    assert lr_at(9, cfg, spe) == pytest.approx(0.1)
    assert lr_at(10, cfg, spe) == pytest.approx(0.1)
    assert lr_at(30, cfg, spe) == pytest.approx(0.01 + 0.09 * 0.5)
    expected = 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 39 / 40))
    assert lr_at(49, cfg, spe) == pytest.approx(expected)
    lrs = [lr_at(s, cfg, spe) for s in range(50)]
    assert max(lrs) == pytest.approx(0.1)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))


def test_lr_at_dispatches_every_schedule():
    spe = 10
    base = dict(learning_rate=1.0, max_epochs=10)
    halving = TrainConfig(schedule="step", step_size_epochs=2, gamma=0.5, **base)
    assert lr_at(25, halving, spe) == 0.5
    default_gamma = TrainConfig(schedule="step", step_size_epochs=1, **base)
    assert lr_at(25, default_gamma, spe) == pytest.approx(0.01)
    assert lr_at(20, TrainConfig(schedule="exponential", **base), spe) == pytest.approx(0.95**2)
    assert lr_at(50, TrainConfig(schedule="cosine", **base), spe) == pytest.approx(0.5)
    assert lr_at(10, TrainConfig(schedule="cosine_restarts", t0_epochs=1, **base), spe) == 1.0
    assert lr_at(0, TrainConfig(schedule="onecycle", **base), spe) == pytest.approx(1 / 25)
    assert lr_at(99, TrainConfig(schedule="onecycle", **base), spe) == pytest.approx(1 / 25 / 1e4)
