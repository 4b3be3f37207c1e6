"""First-order optimizers sharing one interface: ``step(params, grads)`` updates in place.

Conventions follow torch.optim (no dampening, bias-corrected Adam, eps outside the root).
``decay`` says, per parameter array, which part holds weight matrices that weight decay
applies to: True (all of it), False (none of it), a slice of the flattened array, or a
sequence of such slices; the default decays arrays with ndim >= 2. Decay is coupled (the L2
gradient term ``weight_decay * W``, added to the gradient) for every optimizer except
AdamW, whose decay is decoupled (``W -= lr * weight_decay * W`` before the Adam update).

`step` may overwrite `grads`; params must be contiguous (they are updated through views).
State buffers are allocated on the first call, so pass arrays of the same shapes in the
same order every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from trainer import vocab

Decay = Sequence[bool | slice | Sequence[slice]] | None
SUBNORMAL_MARGIN = 1e8


class Optimizer:
    """Base class: holds the learning rate, step count and weight-decay regions."""

    decoupled = False

    def __init__(self, lr: float, weight_decay: float = 0.0, decay: Decay = None) -> None:
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.decay = decay
        self.t = 0  # number of steps taken
        self._state: list[tuple[np.ndarray, ...]] | None = None

    def step(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        """Apply one update to each array in `params` given the matching `grads`."""
        if self._state is None:
            self._state = [self._init_state(p) for p in params]
        self.t += 1
        if self.t % self._flush_every == 0:
            self._flush_subnormals()
        wd = self.weight_decay
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if wd:
                for region in self._decay_regions(i, p):
                    wp = p.reshape(-1)[region]
                    if self.decoupled:
                        wp *= 1.0 - self.lr * wd
                    else:
                        g.reshape(-1)[region] += wd * wp
            self._update(p, g, self._state[i])

    # Moment buffers of parameters whose gradient is exactly 0 (dead ReLUs) decay
    # geometrically into subnormal floats, which x86 computes on up to 100x slower.
    # Every _flush_every steps, entries below SUBNORMAL_MARGIN * tiny are set to 0: too
    # few steps for any entry to decay from there into the subnormal range, and far too
    # small to move a parameter.
    decaying: tuple[int, ...] = ()  # indices into a parameter's state tuple
    _flush_every = 1 << 62

    def _set_decay_rate(self, *rates: float) -> None:
        """Choose the flush period for buffers multiplied by these factors every step."""
        per_step = min(rates)
        if 0 < per_step < 1:
            steps = 0.5 * math.log(SUBNORMAL_MARGIN) / -math.log(per_step)
            self._flush_every = max(1, int(steps))

    def _flush_subnormals(self) -> None:
        for state in self._state or ():
            for j in self.decaying:
                buf = state[j]
                limit = SUBNORMAL_MARGIN * np.finfo(buf.dtype).tiny
                np.putmask(buf, np.abs(buf) < limit, 0)

    def _decay_regions(self, i: int, p: np.ndarray) -> Sequence[slice]:
        flag = (p.ndim >= 2) if self.decay is None else self.decay[i]
        if flag is True:
            return (slice(None),)
        if flag is False:
            return ()
        if isinstance(flag, slice):
            return (flag,)
        return flag

    def _init_state(self, p: np.ndarray) -> tuple[np.ndarray, ...]:
        return (np.empty_like(p),)  # scratch buffer

    def _update(self, p: np.ndarray, g: np.ndarray, state: tuple[np.ndarray, ...]) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """p -= lr * g"""

    def _init_state(self, p: np.ndarray) -> tuple[np.ndarray, ...]:
        return ()

    def _update(self, p, g, state):
        g *= self.lr
        p -= g


class Momentum(Optimizer):
    """buf = momentum * buf + g; p -= lr * buf (heavy ball, PyTorch SGD(momentum))."""

    decaying = (0,)

    def __init__(self, lr, momentum=0.9, weight_decay=0.0, decay=None):
        super().__init__(lr, weight_decay, decay)
        self.momentum = float(momentum)
        self._set_decay_rate(self.momentum)

    def _init_state(self, p):
        return (np.zeros_like(p), np.empty_like(p))

    def _update(self, p, g, state):
        buf, _ = state
        buf *= self.momentum
        buf += g
        np.multiply(buf, self.lr, out=g)  # g is free now: use it as scratch
        p -= g


class Nesterov(Momentum):
    """buf = momentum * buf + g; p -= lr * (g + momentum * buf) (PyTorch nesterov=True)."""

    def _update(self, p, g, state):
        buf, tmp = state
        buf *= self.momentum
        buf += g
        np.multiply(buf, self.momentum, out=tmp)
        tmp += g
        tmp *= self.lr
        p -= tmp


class Adam(Optimizer):
    """Adam with bias correction: p -= lr * m_hat / (sqrt(v_hat) + eps)."""

    decaying = (0, 1)

    def __init__(self, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decay=None):
        super().__init__(lr, weight_decay, decay)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self._set_decay_rate(self.beta1, self.beta2)

    def _init_state(self, p):
        return (np.zeros_like(p), np.zeros_like(p))

    def _update(self, p, g, state):
        # The moments are stored unnormalised, M = m / (1 - beta1) and V = v / (1 - beta2),
        # so each update is M = beta1*M + g (two in-place ops, no scaled temporary); the
        # constant factors fold into the scalar step size and eps below. g serves as the
        # scratch buffer: fewer arrays in cache, and every op is in place.
        big_m, big_v = state
        b1, b2, t = self.beta1, self.beta2, self.t
        k1 = (1.0 - b1) / (1.0 - b1**t)
        k2 = math.sqrt((1.0 - b2) / (1.0 - b2**t))
        big_m *= b1
        big_m += g
        g *= g
        big_v *= b2
        big_v += g
        np.sqrt(big_v, out=g)
        g += self.eps / k2
        np.divide(big_m, g, out=g)
        g *= self.lr * k1 / k2
        p -= g


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): W -= lr * wd * W, then Adam."""

    decoupled = True


class RMSprop(Optimizer):
    """v = rho * v + (1 - rho) * g**2; p -= lr * g / (sqrt(v) + eps)."""

    decaying = (0,)

    def __init__(self, lr, rho=0.9, eps=1e-8, weight_decay=0.0, decay=None):
        super().__init__(lr, weight_decay, decay)
        self.rho, self.eps = float(rho), float(eps)
        self._set_decay_rate(self.rho)

    def _init_state(self, p):
        return (np.zeros_like(p), np.empty_like(p))

    def _update(self, p, g, state):
        v, tmp = state
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.rho
        v *= self.rho
        v += tmp
        np.sqrt(v, out=tmp)
        tmp += self.eps
        np.divide(g, tmp, out=tmp)
        tmp *= self.lr
        p -= tmp


class Adagrad(Optimizer):
    """s += g**2; p -= lr * g / (sqrt(s) + eps)."""

    def __init__(self, lr, eps=1e-8, weight_decay=0.0, decay=None):
        super().__init__(lr, weight_decay, decay)
        self.eps = float(eps)

    def _init_state(self, p):
        return (np.zeros_like(p), np.empty_like(p))

    def _update(self, p, g, state):
        s, tmp = state
        np.multiply(g, g, out=tmp)
        s += tmp
        np.sqrt(s, out=tmp)
        tmp += self.eps
        np.divide(g, tmp, out=tmp)
        tmp *= self.lr
        p -= tmp


def make_optimizer(config, decay: Decay = None) -> Optimizer:
    """Build the optimizer named by a TrainConfig, with its hyperparameters."""
    name, lr, wd = config.optimizer, config.learning_rate, config.weight_decay
    if name == vocab.Optimizer.SGD:
        return SGD(lr, weight_decay=wd, decay=decay)
    if name == vocab.Optimizer.MOMENTUM:
        return Momentum(lr, config.momentum, weight_decay=wd, decay=decay)
    if name == vocab.Optimizer.NESTEROV:
        return Nesterov(lr, config.momentum, weight_decay=wd, decay=decay)
    if name in (vocab.Optimizer.ADAM, vocab.Optimizer.ADAMW):
        cls = AdamW if name == vocab.Optimizer.ADAMW else Adam
        return cls(lr, config.beta1, config.beta2, config.eps, weight_decay=wd, decay=decay)
    if name == vocab.Optimizer.RMSPROP:
        return RMSprop(lr, config.rho, config.eps, weight_decay=wd, decay=decay)
    if name == vocab.Optimizer.ADAGRAD:
        return Adagrad(lr, config.eps, weight_decay=wd, decay=decay)
    raise ValueError(f"unknown optimizer {name!r}")
