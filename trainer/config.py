"""Training configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from trainer.vocab import Activation, Direction, Metric, Optimizer, Schedule

ACTIVATIONS = tuple(Activation)
OPTIMIZERS = tuple(Optimizer)
SCHEDULES = tuple(Schedule)
INITS = ("auto", "he", "xavier")
DTYPES = ("float32", "float64")


def metric_mode(name: str) -> str:
    """Return "max" for metrics to maximise (val_accuracy, val_r2) and "min" otherwise."""
    maximize = name in tuple(Metric) and Metric(name).direction is Direction.MAXIMIZE
    return "max" if maximize else "min"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; same config + same data => same history.

    Step-based quantities (schedules, warm-up) are given in epochs and converted to
    optimizer steps with ``steps_per_epoch = ceil(n_train / batch_size)``.
    """

    # Widths of the hidden layers, input side first; () is a linear/logistic model.
    hidden_layers: tuple[int, ...] = (128, 64)
    # Hidden-layer nonlinearity; "gelu" is the tanh approximation (PyTorch approximate="tanh").
    activation: str = Activation.RELU
    # Update rule, see trainer.optimizers.
    optimizer: str = "adam"
    # Peak learning rate (before schedule/warm-up factors), > 0.
    learning_rate: float = 1e-3
    # Rows per optimizer step, an int >= 1, or "full" for batch gradient descent.
    batch_size: int | str = 64
    # Momentum coefficient of "momentum"/"nesterov" (PyTorch SGD convention, no dampening).
    momentum: float = 0.9
    # Adam/AdamW first- and second-moment decay rates, in [0, 1).
    beta1: float = 0.9
    beta2: float = 0.999
    # RMSprop's squared-gradient decay rate, in [0, 1).
    rho: float = 0.9
    # Denominator guard of adam/adamw/rmsprop/adagrad, > 0.
    eps: float = 1e-8
    # Probability of zeroing each hidden unit in training (inverted dropout), in [0, 1).
    dropout: float = 0.0
    # AdamW: decoupled decay, W -= lr * weight_decay * W each step. Other optimizers: the
    # coupled L2 gradient term weight_decay * W is added to the gradient (after clipping),
    # as torch.optim does. Weight matrices only, never biases.
    weight_decay: float = 0.0
    # Loss penalties l1 * sum|W| + l2 * sum(W**2) over weight matrices (never biases); they
    # enter the gradient (before clipping) but not the reported train_loss.
    l1: float = 0.0
    l2: float = 0.0
    # Clip the global L2 norm of the gradient to this value; None disables clipping.
    grad_clip: float | None = None
    # Std of Gaussian noise added to standardised inputs in training, >= 0.
    input_noise: float = 0.0
    # Weight init: "he" (normal, std sqrt(2/fan_in)), "xavier" (normal, std
    # sqrt(2/(fan_in+fan_out))), "auto" = he for relu/leaky_relu/gelu, xavier otherwise.
    init: str = "auto"
    # Learning-rate schedule over optimizer steps, see trainer.schedules.
    schedule: str = "constant"
    # "step": multiply the rate by gamma every step_size_epochs epochs.
    step_size_epochs: float = 10.0
    # Decay factor: per step_size_epochs for "step", per epoch for "exponential".
    # None means 0.1 for "step" and 0.95 for "exponential".
    gamma: float | None = None
    # "cosine_restarts": length of the first cycle in epochs, and each next cycle's
    # length multiplier (>= 1).
    t0_epochs: float = 10.0
    t_mult: float = 2.0
    # "cosine"/"cosine_restarts": floor of the rate as a fraction of learning_rate.
    min_lr_ratio: float = 0.0
    # "onecycle": fraction of steps spent rising from learning_rate/div_factor to
    # learning_rate, then cosine annealing down to learning_rate/(div_factor*final_div_factor).
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    # Linear warm-up in epochs (may be fractional), applied before any schedule.
    warmup_epochs: float = 0
    # Upper bound on training epochs, >= 1.
    max_epochs: int = 30
    # Also evaluate the validation split every this many training examples (counted across
    # epochs; at the first batch boundary at or past each multiple) and pass the metrics to
    # fit's on_examples callback; None: only at the end of each epoch.
    eval_every_examples: int | None = None
    # Stop after this many epochs without improvement of `monitor`; None disables.
    patience: int | None = None
    # An epoch improves only if it beats the best value by more than this (>= 0).
    min_delta: float = 0.0
    # Validation metric that decides the best epoch: val_loss, val_accuracy (classification),
    # val_rmse, val_r2 (regression). *accuracy/*r2 are maximised, the others minimised.
    monitor: str = "val_loss"
    # Put the weights of the best epoch back at the end (also after divergence).
    restore_best: bool = True
    # Seeds weight init, shuffling, dropout and input noise.
    seed: int = 0
    # Floating-point type of parameters and activations; float64 is for gradient checks.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        hidden = self.hidden_layers
        if isinstance(hidden, int) or not hasattr(hidden, "__iter__"):
            raise ValueError(f"hidden_layers must be a sequence of ints, got {hidden!r}")
        hidden = tuple(hidden)
        if not all(_is_int(h) and h >= 1 for h in hidden):
            raise ValueError(f"hidden_layers must contain ints >= 1, got {hidden!r}")
        object.__setattr__(self, "hidden_layers", tuple(int(h) for h in hidden))
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("init", self.init, INITS)
        _choice("dtype", self.dtype, DTYPES)
        _positive("learning_rate", self.learning_rate)
        if self.batch_size != "full" and not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1 or 'full', got {self.batch_size!r}")
        for name in ("momentum", "beta1", "beta2", "rho"):
            _in_range(name, getattr(self, name), 0.0, 1.0)
        _positive("eps", self.eps)
        _in_range("dropout", self.dropout, 0.0, 1.0)
        for name in ("weight_decay", "l1", "l2", "input_noise", "min_delta", "warmup_epochs"):
            _non_negative(name, getattr(self, name))
        if self.grad_clip is not None:
            _positive("grad_clip", self.grad_clip)
        _positive("step_size_epochs", self.step_size_epochs)
        if self.gamma is not None:
            _positive("gamma", self.gamma)
        _positive("t0_epochs", self.t0_epochs)
        _finite("t_mult", self.t_mult)
        if self.t_mult < 1:
            raise ValueError(f"t_mult must be >= 1, got {self.t_mult!r}")
        _in_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, high_inclusive=True)
        _in_range("pct_start", self.pct_start, 0.0, 1.0)
        _positive("div_factor", self.div_factor)
        _positive("final_div_factor", self.final_div_factor)
        if not (_is_int(self.max_epochs) and self.max_epochs >= 1):
            raise ValueError(f"max_epochs must be an int >= 1, got {self.max_epochs!r}")
        if self.eval_every_examples is not None and not (
            _is_int(self.eval_every_examples) and self.eval_every_examples >= 1
        ):
            raise ValueError(
                f"eval_every_examples must be None or an int >= 1, got {self.eval_every_examples!r}"
            )
        if self.patience is not None and not (_is_int(self.patience) and self.patience >= 1):
            raise ValueError(f"patience must be None or an int >= 1, got {self.patience!r}")
        if not isinstance(self.monitor, str) or not self.monitor.startswith("val_"):
            raise ValueError(f"monitor must name a validation metric (val_*), got {self.monitor!r}")
        if not isinstance(self.restore_best, bool):
            raise ValueError(f"restore_best must be a bool, got {self.restore_best!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    @property
    def monitor_mode(self) -> str:
        """Direction in which `monitor` improves: "max" or "min"."""
        return metric_mode(self.monitor)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the config (tuples become lists)."""
        out = asdict(self)
        out["hidden_layers"] = list(self.hidden_layers)
        return out


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _choice(name: str, value: object, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")


def _finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _positive(name: str, value: object) -> None:
    _finite(name, value)
    if value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _non_negative(name: str, value: object) -> None:
    _finite(name, value)
    if value < 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _in_range(
    name: str, value: object, low: float, high: float, high_inclusive: bool = False
) -> None:
    _finite(name, value)
    ok = low <= value <= high if high_inclusive else low <= value < high  # type: ignore[operator]
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
