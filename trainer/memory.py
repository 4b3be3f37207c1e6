"""How much memory one training run takes at its peak, counted from what fit allocates.

A pure function of the dataset's shape and the run's configuration, so a service can refuse a
configuration before any process tries it (and is killed for memory). It follows the
allocations of `trainer.datasets.from_arrays`, `trainer.network.MLP` and `trainer.fit.fit`:

- the dataset: the float32 splits, and fit's copies of them (the training split with its
  column of ones, its per-epoch shuffled copy, the augmented validation split);
- the parameters: values, gradients, the best epoch's copy, the optimizer's state and the
  temporaries of an update (or of the initialisation, whichever is larger);
- the activations: the training workspaces (one per batch size: the batch and the epoch's
  last, shorter batch) and the dropout masks of a block of batches;
- evaluation: the forward-pass workspaces of the validation and test chunks;
- loading: the float64 temporaries of splitting and standardising the raw arrays, which come
  before training and are gone by then (the peak is the larger of the two phases).

Numbers are bytes. They leave out what does not grow with the run (the interpreter, BLAS
buffers, Python objects), so they are a floor on a worker's resident size, and an estimate of
the numpy allocations that tracemalloc sees (tests/trainer/test_memory.py compares them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from trainer.datasets import SPLIT
from trainer.fit import NOISE_BLOCK_VALUES
from trainer.network import EVAL_CHUNK
from trainer.vocab import Activation, Optimizer

# Arrays of one value per parameter in the optimizer's state (moments, scratch buffers).
OPTIMIZER_STATE_ARRAYS = {Optimizer.SGD: 0, Optimizer.MOMENTUM: 2, Optimizer.NESTEROV: 2,
                          Optimizer.ADAM: 2, Optimizer.ADAMW: 2, Optimizer.RMSPROP: 2,
                          Optimizer.ADAGRAD: 2}
# Optimizers that now and then flush subnormal moments: |buf| and a boolean mask, per buffer.
_FLUSHING = (Optimizer.MOMENTUM, Optimizer.NESTEROV, Optimizer.ADAM, Optimizer.ADAMW,
             Optimizer.RMSPROP)
_F64 = 8
_I64 = 8


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one training run, by what holds them."""

    dataset: int  # the splits and fit's copies of them, targets and shuffles
    parameters: int  # values, gradients, best copy, optimizer state, update temporaries
    activations: int  # training workspaces and dropout masks
    evaluation: int  # validation and test forward passes
    loading: int  # splitting and standardising the raw arrays (before training)

    @property
    def training(self) -> int:
        """Bytes held together while training."""
        return self.dataset + self.parameters + self.activations + self.evaluation

    @property
    def total(self) -> int:
        """The peak: loading and training do not overlap."""
        return max(self.loading, self.training)

    def largest_part(self) -> str:
        """The name of the part that holds the most bytes."""
        parts = {"dataset": self.dataset, "parameters": self.parameters,
                 "activations": self.activations, "evaluation": self.evaluation,
                 "loading": self.loading}
        return max(parts, key=parts.__getitem__)


def split_rows(n_rows: int) -> tuple[int, int, int]:
    """(train, validation, test) rows of an n_rows dataset split as from_arrays splits it."""
    n_val = max(1, round(SPLIT[1] * n_rows))
    n_test = max(1, round(SPLIT[2] * n_rows))
    return max(1, n_rows - n_val - n_test), n_val, n_test


def _forward_bytes(n: int, hidden: Sequence[int], n_outputs: int, activation: str,
                   itemsize: int) -> int:
    """A forward workspace of n rows: hidden outputs with their row of ones, pre-activations
    (ReLU computes in place, so only the output layer's), ReLU's zeros."""
    relu = activation == Activation.RELU
    values = sum(w + 1 for w in hidden) * n
    values += n_outputs * n if relu else (sum(hidden) + n_outputs) * n
    if relu and hidden:
        values += max(hidden) * n
    return values * itemsize


def _train_workspace_bytes(n: int, hidden: Sequence[int], n_outputs: int, activation: str,
                           itemsize: int) -> int:
    wmax = max([*hidden, n_outputs])
    values = sum(hidden) * n  # d loss / d hidden output
    values += 2 * wmax * n + n_outputs * n + 3 * n  # tf, tf2, e, row, row2, zy
    if activation == Activation.GELU:
        values += wmax * n  # the derivative's one temporary
    extra = wmax * n + 2 * n * _I64  # boolean gate, column indices
    return (_forward_bytes(n, hidden, n_outputs, activation, itemsize) + values * itemsize
            + extra)


def _eval_temporaries(n: int, n_outputs: int) -> int:
    """Loss and accuracy of one chunk: float64 copies of the outputs, shifted and exp'd."""
    return n * (3 * max(n_outputs, 2) + 4) * _F64


def estimate_trial_memory(
    n_features: int,
    n_outputs: int,
    n_rows: int,
    hidden_layers: Sequence[int],
    batch_size: int,
    optimizer: str = "adam",
    activation: str = Activation.RELU,
    dropout: bool = True,
    itemsize: int = 4,
    raw_itemsize: int = 8,
) -> MemoryEstimate:
    """Peak bytes of `fit` on an n_rows x n_features dataset split 70/15/15.

    hidden_layers are the widths (input side first), batch_size the rows per step (capped
    at the training rows, as fit does), n_outputs the output units (classes of a multiclass
    task, else 1). `dropout` says whether masks are drawn; itemsize is the network's float
    size (4: float32); raw_itemsize that of the arrays the dataset is built from.
    """
    if optimizer not in OPTIMIZER_STATE_ARRAYS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATE_ARRAYS)}; "
                         f"got {optimizer!r}")
    hidden = [int(w) for w in hidden_layers]
    f, k, s = int(n_features), int(n_outputs), int(itemsize)
    n_train, n_val, n_test = split_rows(int(n_rows))
    n = n_train + n_val + n_test
    batch = max(1, min(int(batch_size), n_train))

    # Dataset: the standardised float32 splits with their targets, then fit's augmented
    # training split, its shuffled copy (np.take buffers the copy once more), the augmented
    # validation split, shuffled targets, per-row records, shuffles.
    resident = n * f * 4 + n * _I64
    in_fit = (3 * n_train + n_val) * (f + 1) * s + n_train * (2 * _I64 + s + 2 * _I64)
    dataset = resident + in_fit

    parameters = _parameter_bytes([f, *hidden, k], optimizer, s)

    # Activations: a workspace per training batch size, dropout masks for a block of batches
    # plus the 16-bit random draws they come from.
    tail = n_train % batch
    activations = sum(_train_workspace_bytes(m, hidden, k, activation, s)
                      for m in (batch, tail) if m)
    if dropout and hidden:
        total_width = sum(hidden)
        block = batch * max(1, NOISE_BLOCK_VALUES // max(1, batch * total_width))
        rows = min(block, n_train)
        activations += total_width * rows * (s + 2)

    evaluation = _evaluation_bytes(n_val, n_test, f, hidden, k, activation, s)

    # Loading: the raw arrays, their float64 copy, and while the training split is
    # standardised its float64 selection, (X - mean), the quotient and the float32 result.
    loading = n * f * (raw_itemsize + _F64) + n_train * f * (3 * _F64 + 4) + n * 2 * _I64

    return MemoryEstimate(dataset=dataset, parameters=parameters, activations=activations,
                          evaluation=evaluation, loading=loading)


def _parameter_bytes(sizes: list[int], optimizer: str, s: int) -> int:
    """Peak bytes of a network of layer widths `sizes`: its parameters and their updates."""
    # Parameters: one flat buffer each of values, gradients and the best epoch's copy, the
    # optimizer's state, and a scratch buffer the size of the largest weight matrix.
    shapes = list(pairwise(sizes))
    n_params = sum((a + 1) * b for a, b in shapes)
    largest = max(a * b for a, b in shapes)
    held = (3 + OPTIMIZER_STATE_ARRAYS[optimizer]) * n_params * s + largest * s
    # An update's temporaries: |moments| and a mask when flushing subnormals, else the
    # weight-decay term of the largest matrix.
    update = n_params * (s + 1) if optimizer in _FLUSHING else largest * s
    # Initialisation draws each matrix in float64 and scales it in place (numpy reuses the
    # temporary), while only values, gradients and scratch exist.
    init = 2 * n_params * s + largest * s + largest * _F64
    return max(held + update, init)


def _evaluation_bytes(n_val: int, n_test: int, f: int, hidden: list[int], k: int,
                      activation: str, s: int) -> int:
    """Peak bytes of evaluating the validation and test splits in chunks."""
    # Evaluation: a workspace per chunk size of the validation and test splits (the test
    # split's also stages its rows with the column of ones), and each chunk's loss temporaries.
    chunk_sizes: dict[int, bool] = {}
    for rows, staged in ((n_val, False), (n_test, True)):
        for m in {min(EVAL_CHUNK, rows), rows % EVAL_CHUNK}:
            if m:
                chunk_sizes[m] = chunk_sizes.get(m, False) or staged
    evaluation = sum(_forward_bytes(m, hidden, k, activation, s)
                     + (m * (f + 1) * s if staged else 0) for m, staged in chunk_sizes.items())
    evaluation += _eval_temporaries(min(EVAL_CHUNK, max(n_val, n_test)), k)
    return evaluation


def megabytes(n_bytes: int) -> str:
    """Bytes as whole megabytes (10^6), for messages."""
    return f"{math.ceil(n_bytes / 1e6):,} MB"
