"""Learning-rate schedules as pure functions of the optimizer step (nanoGPT ``get_lr`` style).

Every function maps a 0-based optimizer step to the learning rate used for that step.
``lr_at(step, config, steps_per_epoch)`` combines warm-up with the configured schedule.
"""

from __future__ import annotations

import math

from trainer.config import TrainConfig
from trainer.vocab import Schedule


def constant(step: int, base_lr: float) -> float:
    """The same rate at every step."""
    return base_lr


def step_decay(step: int, base_lr: float, step_size: float, gamma: float) -> float:
    """base_lr * gamma ** floor(step / step_size) (PyTorch StepLR, counted in steps)."""
    return base_lr * gamma ** math.floor(step / step_size)


def exponential(step: int, base_lr: float, gamma: float, steps_per_epoch: int) -> float:
    """base_lr * gamma ** (step / steps_per_epoch): a smooth decay by gamma per epoch."""
    return base_lr * gamma ** (step / steps_per_epoch)


def cosine(step: int, base_lr: float, total_steps: int, min_lr: float = 0.0) -> float:
    """Half-cosine from base_lr at step 0 to min_lr at total_steps (and min_lr after)."""
    if step >= total_steps:
        return min_lr
    ratio = step / total_steps
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (base_lr - min_lr)


def cosine_restarts(
    step: int, base_lr: float, t0: float, t_mult: float, min_lr: float = 0.0
) -> float:
    """SGDR: cosine cycles of t0, t0*t_mult, t0*t_mult**2, ... steps, each restarting at base_lr."""
    t_cur, t_i = float(step), float(t0)
    while t_cur >= t_i:  # cycles grow geometrically, so this runs O(log step) times
        t_cur -= t_i
        t_i *= t_mult
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * t_cur / t_i)) * (base_lr - min_lr)


def onecycle(
    step: int,
    base_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    """One-cycle policy (PyTorch OneCycleLR, cosine annealing, three_phase=False).

    Rises from base_lr/div_factor to base_lr over pct_start of the steps, then falls to
    base_lr/(div_factor*final_div_factor) at the last step.
    """
    initial = base_lr / div_factor
    final = initial / final_div_factor
    peak_step = float(pct_start * total_steps) - 1.0
    last_step = float(total_steps) - 1.0
    if step <= peak_step:
        pct, start, end = (step / peak_step if peak_step > 0 else 1.0), initial, base_lr
    else:
        span = last_step - peak_step
        pct = min(1.0, (step - peak_step) / span) if span > 0 else 1.0
        start, end = base_lr, final
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up multiplier (step+1)/warmup_steps for step < warmup_steps, else 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def lr_at(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step `step` (0-based) for `config`.

    During the first round(warmup_epochs * steps_per_epoch) steps the rate ramps up
    linearly to the schedule's value at step 0; after that the schedule runs on the
    remaining steps as if they started at 0 (so cosine decays over max_epochs - warm-up).
    """
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = max(1, config.max_epochs * steps_per_epoch - warmup)
    if step < warmup:
        return warmup_factor(step, warmup) * _scheduled(0, config, steps_per_epoch, total)
    return _scheduled(step - warmup, config, steps_per_epoch, total)


def _scheduled(step: int, config: TrainConfig, steps_per_epoch: int, total: int) -> float:
    base = config.learning_rate
    name = config.schedule
    if name == Schedule.CONSTANT:
        return constant(step, base)
    if name == Schedule.STEP:
        gamma = 0.1 if config.gamma is None else config.gamma
        return step_decay(step, base, config.step_size_epochs * steps_per_epoch, gamma)
    if name == Schedule.EXPONENTIAL:
        gamma = 0.95 if config.gamma is None else config.gamma
        return exponential(step, base, gamma, steps_per_epoch)
    if name == Schedule.COSINE:
        return cosine(step, base, total, config.min_lr_ratio * base)
    if name == Schedule.COSINE_RESTARTS:
        t0 = config.t0_epochs * steps_per_epoch
        return cosine_restarts(step, base, t0, config.t_mult, config.min_lr_ratio * base)
    if name == Schedule.ONECYCLE:
        return onecycle(
            step, base, total, config.pct_start, config.div_factor, config.final_div_factor
        )
    raise ValueError(f"unknown schedule {name!r}")
