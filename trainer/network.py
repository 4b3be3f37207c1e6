"""A multilayer perceptron on one flat parameter buffer: forward, losses, backward.

Layout: all weight matrices first (layer order, each (fan_in, fan_out), C order), then all
biases. ``params[:n_weights]`` is therefore exactly the set of arrays that weight decay and
the l1/l2 penalties act on, and an optimizer can update everything with a few vectorised
operations over one contiguous buffer. ``grad`` has the same layout.

Heads by task: "multiclass" = n_classes logits + softmax cross-entropy; "binary" = one
logit + sigmoid binary cross-entropy (labels 0/1); "regression" = one linear output + mean
squared error. Losses are means over the rows of a batch.

Per batch size the network keeps a workspace of preallocated activation and gradient
buffers, so a training step allocates (almost) nothing. Internally activations are
feature-major, (width, rows): with weights stored (fan_in, fan_out), every GEMM of a step
then has a shape OpenBLAS runs well even for a handful of rows (with row-major activations
``delta @ W.T`` is about twice as slow at batch 16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TASKS = ("multiclass", "binary", "regression")
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")
LEAKY_SLOPE = 0.01  # leaky_relu's slope for negative inputs
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715
EVAL_CHUNK = 2048  # rows per forward pass when evaluating

Masks = Sequence[np.ndarray | None] | None


def output_units(task: str, n_classes: int) -> int:
    """Width of the output layer: n_classes for multiclass, 1 for binary and regression."""
    return n_classes if task == "multiclass" else 1


class _Workspace:
    """Preallocated buffers for batches of exactly n rows, feature-major (width, n)."""

    def __init__(self, net: MLP, n: int, train: bool) -> None:
        dt = net.dtype
        widths = net.sizes[1:]
        self.z = [np.empty((w, n), dt) for w in widths]  # pre-activations; last = output
        # Hidden outputs after dropout. ReLU is computed in place, so there a is z.
        if net.activation == "relu":
            self.a = self.z[:-1]
        else:
            self.a = [np.empty((w, n), dt) for w in widths[:-1]]
        if not train:
            return
        self.d = [np.empty((w, n), dt) for w in widths[:-1]]  # d loss / d hidden output
        wmax = max(widths)
        self.tb = np.empty((wmax, n), bool)
        self.tf = np.empty((wmax, n), dt)
        self.tf2 = np.empty((wmax, n), dt)
        self.e = np.empty((widths[-1], n), dt)  # d loss / d output
        self.row = np.empty(n, dt)
        self.row2 = np.empty(n, dt)
        self.zy = np.empty(n, dt)
        self.ones = np.ones(n, dt)
        self.colbase = np.arange(n, dtype=np.int64)
        self.idx = np.empty(n, np.int64)


class MLP:
    """Fully connected network with one activation for all hidden layers."""

    def __init__(
        self,
        n_inputs: int,
        hidden_layers: Sequence[int],
        n_outputs: int,
        task: str = "multiclass",
        activation: str = "relu",
        init: str = "auto",
        dtype: str | np.dtype = "float32",
        rng: np.random.Generator | int | None = 0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
        if task != "multiclass" and n_outputs != 1:
            raise ValueError(f"a {task} network has 1 output unit, got n_outputs={n_outputs}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        self.task = task
        self.activation = activation
        self.dtype = np.dtype(dtype)
        self.sizes = (int(n_inputs), *(int(h) for h in hidden_layers), int(n_outputs))
        shapes = list(zip(self.sizes[:-1], self.sizes[1:], strict=True))
        self.n_weights = sum(a * b for a, b in shapes)
        n_total = self.n_weights + sum(b for _, b in shapes)
        self.params = np.zeros(n_total, self.dtype)
        self.grad = np.zeros(n_total, self.dtype)
        self.weights: list[np.ndarray] = []
        self.grad_weights: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []
        self.grad_biases: list[np.ndarray] = []
        wpos, bpos = 0, self.n_weights
        for fan_in, fan_out in shapes:
            end = wpos + fan_in * fan_out
            self.weights.append(self.params[wpos:end].reshape(fan_in, fan_out))
            self.grad_weights.append(self.grad[wpos:end].reshape(fan_in, fan_out))
            self.biases.append(self.params[bpos : bpos + fan_out])
            self.grad_biases.append(self.grad[bpos : bpos + fan_out])
            wpos, bpos = end, bpos + fan_out
        self._bias_cols = [b.reshape(-1, 1) for b in self.biases]
        self._workspaces: dict[tuple[int, bool], _Workspace] = {}
        self._wscratch = np.empty(self.n_weights, self.dtype)
        self.initialize(init, rng)

    @property
    def n_parameters(self) -> int:
        """Number of trainable scalars (weights and biases)."""
        return self.params.size

    def initialize(self, init: str = "auto", rng: np.random.Generator | int | None = 0) -> None:
        """Draw weights (He or Xavier normal) and zero the biases."""
        if init == "auto":
            init = "he" if self.activation in ("relu", "leaky_relu", "gelu") else "xavier"
        if init not in ("he", "xavier"):
            raise ValueError(f"init must be auto, he or xavier; got {init!r}")
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        for w in self.weights:
            fan_in, fan_out = w.shape
            std = math.sqrt(2.0 / fan_in) if init == "he" else math.sqrt(2.0 / (fan_in + fan_out))
            w[...] = rng.standard_normal(w.shape) * std
        for b in self.biases:
            b[...] = 0.0

    def release_buffers(self) -> None:
        """Drop the per-batch-size workspaces (they are rebuilt on demand)."""
        self._workspaces.clear()

    # ------------------------------------------------------------------ forward

    def _workspace(self, n: int, train: bool) -> _Workspace:
        ws = self._workspaces.get((n, train))
        if ws is None:
            if len(self._workspaces) > 8:  # odd sizes (eval tails, uploads): don't hoard
                self._workspaces.clear()
            ws = self._workspaces[(n, train)] = _Workspace(self, n, train)
        return ws

    def _forward(self, XT: np.ndarray, ws: _Workspace, masks_t: Masks) -> np.ndarray:
        """Output values (k, n) for inputs XT (n_inputs, n); masks_t are (width, n) or None."""
        h = XT
        last = len(self.weights) - 1
        for i, w in enumerate(self.weights):
            z = ws.z[i]
            np.matmul(w.T, h, out=z)
            z += self._bias_cols[i]
            if i == last:
                return z
            a = ws.a[i]
            self._activate(z, a)
            if masks_t is not None and masks_t[i] is not None:
                a *= masks_t[i]
            h = a
        raise AssertionError("unreachable")

    def _activate(self, z: np.ndarray, a: np.ndarray) -> None:
        act = self.activation
        if act == "relu":
            np.maximum(z, 0, out=a)
        elif act == "leaky_relu":
            np.multiply(z, LEAKY_SLOPE, out=a)
            np.maximum(z, a, out=a)
        elif act == "tanh":
            np.tanh(z, out=a)
        elif act == "sigmoid":
            _sigmoid(z, a)
        else:  # gelu, tanh approximation: 0.5 z (1 + tanh(c (z + a z^3)))
            np.multiply(z, z, out=a)
            a *= _GELU_A
            a += 1.0
            a *= z
            a *= _GELU_C
            np.tanh(a, out=a)
            a += 1.0
            a *= z
            a *= 0.5

    def forward(self, X: np.ndarray, masks: Masks = None) -> np.ndarray:
        """Output-layer values (logits / predictions), shape (rows, outputs), as a new array.

        `masks` (one per hidden layer, each (rows, width) or None) multiply the hidden
        activations: pass inverted-dropout masks (0 or 1/(1-p)) to reproduce a training pass.
        """
        X = np.ascontiguousarray(X, dtype=self.dtype)
        if masks is not None:
            ws = self._workspace(len(X), False)
            return self._forward(X.T, ws, self._transpose_masks(masks)).T.copy()
        out = np.empty((len(X), self.sizes[-1]), self.dtype)
        for s in range(0, len(X), EVAL_CHUNK):
            xs = X[s : s + EVAL_CHUNK]
            out[s : s + len(xs)] = self._forward(xs.T, self._workspace(len(xs), False), None).T
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class ids (classification) or predicted values (regression) for rows X."""
        out = self.forward(X)
        if self.task == "multiclass":
            return out.argmax(axis=1)
        if self.task == "binary":
            return (out[:, 0] > 0).astype(np.int64)
        return out[:, 0]

    def _transpose_masks(self, masks: Masks) -> Masks:
        if masks is None:
            return None
        return [None if m is None else np.asarray(m, self.dtype).T for m in masks]

    # ------------------------------------------------------------------ losses

    def prepare_targets(self, y: np.ndarray) -> np.ndarray:
        """Targets as the loss wants them: 1-D int64 ids (multiclass) or 1-D floats."""
        dtype = np.int64 if self.task == "multiclass" else self.dtype
        return np.ascontiguousarray(y, dtype=dtype).reshape(-1)

    def penalty(self, l1: float = 0.0, l2: float = 0.0) -> float:
        """l1 * sum|W| + l2 * sum(W**2) over the weight matrices."""
        w = self.params[: self.n_weights]
        total = 0.0
        if l1:
            total += l1 * float(np.abs(w).sum(dtype=np.float64))
        if l2:
            total += l2 * float(np.dot(w, w))
        return total

    def loss(
        self, X: np.ndarray, y: np.ndarray, masks: Masks = None, l1: float = 0.0, l2: float = 0.0
    ) -> float:
        """Mean data loss on (X, y) plus the l1/l2 penalties, without touching `grad`."""
        out = self.forward(X, masks)
        return _loss_sum(self.task, out, np.asarray(y)) / len(X) + self.penalty(l1, l2)

    def loss_and_grad(
        self, X: np.ndarray, y: np.ndarray, masks: Masks = None, l1: float = 0.0, l2: float = 0.0
    ) -> float:
        """Fill `grad` with d(loss)/d(params) on the batch and return the mean *data* loss.

        The gradient includes the l1/l2 penalty terms; the returned value does not (add
        `penalty(l1, l2)` for the full objective). masks are (rows, width) per hidden layer.
        """
        X = np.ascontiguousarray(X, dtype=self.dtype)
        targets = self.prepare_targets(y)
        return self.step_grad(X.T, targets, self._transpose_masks(masks), l1, l2)

    def step_grad(
        self,
        XT: np.ndarray,
        y: np.ndarray,
        masks_t: Masks = None,
        l1: float = 0.0,
        l2: float = 0.0,
        record: np.ndarray | None = None,
    ) -> float:
        """`loss_and_grad` for the training loop: feature-major inputs, no conversions.

        XT is (n_inputs, rows) in this network's dtype (the transposed view of row-major
        rows is fine), y comes from `prepare_targets`, masks_t are (width, rows). `record`,
        if given, is a (rows,) array that receives what `count_correct` needs.
        """
        n = XT.shape[1]
        ws = self._workspace(n, True)
        z = self._forward(XT, ws, masks_t)
        loss, delta = self._head(z, y, ws, n, record)
        self._backward(XT, ws, masks_t, delta)
        if l1 or l2:
            self._penalty_grad(l1, l2)
        return loss

    def count_correct(self, record: np.ndarray, y: np.ndarray) -> int:
        """Correctly classified rows, from `record`s filled by step_grad and their targets."""
        if self.task == "multiclass":
            # Logits were shifted by their column max, so the true class is (one of) the
            # argmax exactly when its shifted logit is 0.
            return int(np.count_nonzero(record == 0))
        return int(np.count_nonzero((record > 0) == (y > 0.5)))

    def _head(self, z: np.ndarray, y: np.ndarray, ws: _Workspace, n: int, record=None):
        """Return (mean loss, d loss / d z) for output values z (k, n); z may be clobbered."""
        e = ws.e
        if self.task == "multiclass":
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
        if self.task == "binary":
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
            _sigmoid(z, e)
            e -= y
            e *= 1.0 / n
            return loss, e
        np.subtract(z, y, out=e)
        loss = float(np.dot(e[0], e[0])) / n
        e *= 2.0 / n
        return loss, e

    # ------------------------------------------------------------------ backward

    def _backward(self, XT: np.ndarray, ws: _Workspace, masks_t: Masks, delta) -> None:
        ones = ws.ones
        for i in range(len(self.weights) - 1, -1, -1):
            h = XT if i == 0 else ws.a[i - 1]
            np.matmul(h, delta.T, out=self.grad_weights[i])
            np.matmul(delta, ones, out=self.grad_biases[i])
            if i == 0:
                return
            d = ws.d[i - 1]
            np.matmul(self.weights[i], delta, out=d)
            if masks_t is not None and masks_t[i - 1] is not None:
                d *= masks_t[i - 1]
            self._activation_grad(ws.z[i - 1], ws.a[i - 1], d, ws)
            delta = d

    def _activation_grad(self, z: np.ndarray, a: np.ndarray, d: np.ndarray, ws) -> None:
        """d *= activation'(z), in place; a is the layer's output after dropout."""
        w = z.shape[0]
        act = self.activation
        if act == "relu":
            # z was overwritten by a = relu(z) * mask. Where the mask kept a unit, a > 0
            # iff z > 0; dropped units already have d == 0 from the mask.
            tb = ws.tb[:w]
            np.greater(a, 0, out=tb)
            np.multiply(d, tb, out=d)
            return
        t = ws.tf[:w]
        if act == "leaky_relu":
            tb = ws.tb[:w]
            np.greater(z, 0, out=tb)
            np.multiply(tb, 1.0 - LEAKY_SLOPE, out=t)
            t += LEAKY_SLOPE
        elif act == "tanh":
            np.tanh(z, out=t)
            np.multiply(t, t, out=t)
            np.subtract(1.0, t, out=t)
        elif act == "sigmoid":
            _sigmoid(z, t)
            t2 = ws.tf2[:w]
            np.subtract(1.0, t, out=t2)
            t *= t2
        else:  # gelu: 0.5(1+tanh u) + 0.5 z (1 - tanh(u)^2) c (1 + 3a z^2), u = c(z + a z^3)
            t2 = ws.tf2[:w]
            np.multiply(z, z, out=t2)  # z^2
            np.multiply(t2, _GELU_A, out=t)
            t += 1.0
            t *= z
            t *= _GELU_C
            np.tanh(t, out=t)  # tanh(u)
            t2 *= 3.0 * _GELU_A
            t2 += 1.0
            t2 *= _GELU_C
            t2 *= z  # c z (1 + 3a z^2)
            sech2 = np.multiply(t, t)  # small allocation; gelu is off the hot path
            np.subtract(1.0, sech2, out=sech2)
            t2 *= sech2
            t += 1.0
            t += t2
            t *= 0.5
        d *= t

    def _penalty_grad(self, l1: float, l2: float) -> None:
        w = self.params[: self.n_weights]
        g = self.grad[: self.n_weights]
        s = self._wscratch
        if l2:
            np.multiply(w, 2.0 * l2, out=s)
            g += s
        if l1:
            np.sign(w, out=s)
            s *= l1
            g += s

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Metrics on (X, y) without dropout: loss and accuracy, or loss, rmse and r2."""
        X = np.ascontiguousarray(X, dtype=self.dtype)
        y = np.asarray(y)
        n = len(X)
        loss_sum = 0.0
        correct = 0
        for s in range(0, n, EVAL_CHUNK):
            xs, ys = X[s : s + EVAL_CHUNK], y[s : s + EVAL_CHUNK]
            out = self._forward(xs.T, self._workspace(len(xs), False), None).T
            loss_sum += _loss_sum(self.task, out, ys)
            if self.task == "multiclass":
                correct += int(np.count_nonzero(out.argmax(axis=1) == ys))
            elif self.task == "binary":
                correct += int(np.count_nonzero((out[:, 0] > 0) == (ys.reshape(-1) > 0.5)))
        loss = loss_sum / n
        if self.task != "regression":
            return {"loss": loss, "accuracy": correct / n}
        yv = y.reshape(-1).astype(np.float64)
        sst = float(np.square(yv - yv.mean()).sum())
        r2 = 1.0 - loss * n / sst if sst > 0 else float("nan")
        return {"loss": loss, "rmse": math.sqrt(loss) if loss >= 0 else float("nan"), "r2": r2}

    # ------------------------------------------------------------------ weights

    def get_weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Copies of (W, b) per layer, W shaped (fan_in, fan_out)."""
        return [(w.copy(), b.copy()) for w, b in zip(self.weights, self.biases, strict=True)]

    def set_weights(self, layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """Load (W, b) per layer, as returned by get_weights."""
        if len(layers) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} layers, got {len(layers)}")
        for i, (w, b) in enumerate(layers):
            self.weights[i][...] = w
            self.biases[i][...] = b


def _sigmoid(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function: 0.5 * (1 + tanh(z / 2))."""
    np.multiply(z, 0.5, out=out)
    np.tanh(out, out=out)
    out *= 0.5
    out += 0.5
    return out


def _loss_sum(task: str, out: np.ndarray, y: np.ndarray) -> float:
    """Summed (not mean) loss of outputs `out` (rows, k) against y; allocates, for evaluation."""
    out64 = out.astype(np.float64)
    if task == "multiclass":
        y = y.reshape(-1).astype(np.int64)
        shifted = out64 - out64.max(axis=1, keepdims=True)
        lse = np.log(np.exp(shifted).sum(axis=1))
        return float((lse - shifted[np.arange(len(y)), y]).sum())
    z = out64[:, 0]
    yv = y.reshape(-1).astype(np.float64)
    if task == "binary":
        return float((np.maximum(z, 0) - z * yv + np.log1p(np.exp(-np.abs(z)))).sum())
    return float(np.square(z - yv).sum())
