"""The output heads' losses: per training step on workspace buffers, and for evaluation.

Heads by task: "multiclass" = softmax cross-entropy over n_classes logits; "binary" =
sigmoid binary cross-entropy on one logit (labels 0/1); "regression" = mean squared error.
"""

from __future__ import annotations

import numpy as np

from trainer.activations import sigmoid
from trainer.vocab import Task
from trainer.workspace import Workspace


def head(task: str, z: np.ndarray, y: np.ndarray, ws: Workspace, n: int, record=None):
    """Return (mean loss, d loss / d z) for output values z (k, n); z may be clobbered."""
    e = ws.e
    if task == Task.MULTICLASS:
        # ufunc methods rather than np.max/np.sum/np.take: at batch 16 the wrappers'
        # microseconds are a visible share of a step.
        row = ws.row
        np.maximum.reduce(z, axis=0, out=row)
        np.subtract(z, row, out=z)
        np.exp(z, out=e)
        np.add.reduce(e, axis=0, out=row)
        idx = np.multiply(y, n, out=ws.idx)
        idx += ws.colbase
        zy = z.take(idx, out=ws.zy if record is None else record)
        lse = np.log(row, out=ws.row2)
        lse -= zy
        loss = float(np.add.reduce(lse)) / n
        row *= n  # fold the 1/n of the mean into the softmax normalisation
        np.divide(e, row, out=e)
        ef = e.reshape(-1)
        ef[idx] -= 1.0 / n
        return loss, e
    if record is not None:
        record[...] = z[0]
    if task == Task.BINARY:
        # softplus(z) - y*z, with softplus(z) = max(z, 0) + log1p(exp(-|z|))
        t1, t2 = ws.tf[0], ws.tf2[0]
        np.abs(z[0], out=t1)
        np.negative(t1, out=t1)
        np.exp(t1, out=t1)
        np.log1p(t1, out=t1)
        np.maximum(z[0], 0, out=t2)
        t1 += t2
        np.multiply(z[0], y, out=t2)
        t1 -= t2
        loss = float(t1.sum()) / n
        sigmoid(z, e)
        e -= y
        e *= 1.0 / n
        return loss, e
    np.subtract(z, y, out=e)
    loss = float(np.dot(e[0], e[0])) / n
    e *= 2.0 / n
    return loss, e


def summed_loss(task: str, out: np.ndarray, y: np.ndarray) -> float:
    """Summed (not mean) loss of outputs `out` (rows, k) against y; allocates, for evaluation."""
    out64 = out.astype(np.float64)
    if task == Task.MULTICLASS:
        y = y.reshape(-1).astype(np.int64)
        shifted = out64 - out64.max(axis=1, keepdims=True)
        lse = np.log(np.exp(shifted).sum(axis=1))
        return float((lse - shifted[np.arange(len(y)), y]).sum())
    z = out64[:, 0]
    yv = y.reshape(-1).astype(np.float64)
    if task == Task.BINARY:
        return float((np.maximum(z, 0) - z * yv + np.log1p(np.exp(-np.abs(z)))).sum())
    return float(np.square(z - yv).sum())
