"""Per-batch-size buffers of an MLP, so that a training step allocates (almost) nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from trainer.vocab import Activation

if TYPE_CHECKING:
    from trainer.network import MLP


class Workspace:
    """Preallocated buffers for batches of exactly n rows, feature-major (width, n)."""

    def __init__(self, net: MLP, n: int, train: bool) -> None:
        dt = net.dtype
        widths = net.sizes[1:]
        hidden = widths[:-1]
        # Hidden outputs after dropout, plus a row of ones that multiplies the bias row.
        self.h = [np.empty((w + 1, n), dt) for w in hidden]
        for h in self.h:
            h[-1] = 1.0
        self.a = [h[:-1] for h in self.h]
        # Pre-activations; ReLU is computed in place, so there z is a.
        if net.activation == Activation.RELU:
            self.z = [*self.a, np.empty((widths[-1], n), dt)]
        else:
            self.z = [np.empty((w, n), dt) for w in widths]
        self.xa: np.ndarray | None = None  # (n, n_inputs + 1) staging for raw inputs
        # ReLU is np.maximum(z, zeros): against an array of zeros numpy 2.4 runs it about 3x
        # faster than against the scalar 0 (benchmarks/trainer_profile.py).
        if net.activation == Activation.RELU and hidden:
            self.zeros = np.zeros((max(hidden), n), dt)
        if not train:
            return
        self.d = [np.empty((w, n), dt) for w in hidden]  # d loss / d hidden output
        wmax = max(widths)
        self.tb = np.empty((wmax, n), bool)
        self.tf = np.empty((wmax, n), dt)
        self.tf2 = np.empty((wmax, n), dt)
        self.e = np.empty((widths[-1], n), dt)  # d loss / d output
        self.row = np.empty(n, dt)
        self.row2 = np.empty(n, dt)
        self.zy = np.empty(n, dt)
        self.colbase = np.arange(n, dtype=np.int64)
        self.idx = np.empty(n, np.int64)
