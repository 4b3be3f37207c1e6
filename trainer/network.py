"""A multilayer perceptron on one flat parameter buffer: forward, losses, backward.

Layout: layer by layer, each layer's weight matrix (fan_in, fan_out) followed by its bias
as one more row, i.e. an augmented (fan_in + 1, fan_out) matrix in C order. Activations
carry a constant row of ones, so one GEMM computes ``W.T @ h + b`` and one GEMM gives both
the weight and the bias gradient. ``decay_slices`` locate the weight matrices (what weight
decay and the l1/l2 penalties act on; never the biases) inside ``params``; an optimizer
updates everything with a few vectorised operations over one contiguous buffer. ``grad``
has the same layout.

Heads and their losses (means over a batch's rows) are in trainer.losses, activations in
trainer.activations. Per batch size the network keeps a workspace (trainer.workspace) of
preallocated buffers, so a training step allocates (almost) nothing. Internally activations
are feature-major, (width + 1, rows): with weights stored (fan_in, fan_out), every GEMM of a
step then has a shape OpenBLAS runs well even for a handful of rows (with row-major
activations ``delta @ W.T`` is about twice as slow at batch 16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from trainer.activations import activate, activation_grad
from trainer.losses import head, summed_loss
from trainer.vocab import Activation, Task
from trainer.workspace import Workspace

TASKS = tuple(Task)
ACTIVATIONS = tuple(Activation)
EVAL_CHUNK = 2048  # rows per forward pass when evaluating

Masks = Sequence[np.ndarray | None] | None


def output_units(task: str, n_classes: int) -> int:
    """Width of the output layer: n_classes for multiclass, 1 for binary and regression."""
    return n_classes if task == Task.MULTICLASS else 1


class MLP:
    """Fully connected network with one activation for all hidden layers."""

    def __init__(
        self,
        n_inputs: int,
        hidden_layers: Sequence[int],
        n_outputs: int,
        task: str = Task.MULTICLASS,
        activation: str = Activation.RELU,
        init: str = "auto",
        dtype: str | np.dtype = "float32",
        rng: np.random.Generator | int | None = 0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
        if task != Task.MULTICLASS and n_outputs != 1:
            raise ValueError(f"a {task} network has 1 output unit, got n_outputs={n_outputs}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        self.task = task
        self.activation = activation
        self.dtype = np.dtype(dtype)
        self.sizes = (int(n_inputs), *(int(h) for h in hidden_layers), int(n_outputs))
        shapes = list(zip(self.sizes[:-1], self.sizes[1:], strict=True))
        self.n_weights = sum(a * b for a, b in shapes)
        n_total = sum((a + 1) * b for a, b in shapes)
        self.params = np.zeros(n_total, self.dtype)
        self.grad = np.zeros(n_total, self.dtype)
        self.layers: list[np.ndarray] = []  # augmented (fan_in + 1, fan_out) views
        self.grad_layers: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.grad_weights: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []
        self.grad_biases: list[np.ndarray] = []
        slices = []
        pos = 0
        for fan_in, fan_out in shapes:
            end = pos + (fan_in + 1) * fan_out
            layer = self.params[pos:end].reshape(fan_in + 1, fan_out)
            glayer = self.grad[pos:end].reshape(fan_in + 1, fan_out)
            self.layers.append(layer)
            self.grad_layers.append(glayer)
            self.weights.append(layer[:fan_in])
            self.grad_weights.append(glayer[:fan_in])
            self.biases.append(layer[fan_in])
            self.grad_biases.append(glayer[fan_in])
            slices.append(slice(pos, pos + fan_in * fan_out))
            pos = end
        # Where the weight matrices lie in `params`/`grad` (decay and penalties; not biases).
        self.decay_slices: tuple[slice, ...] = tuple(slices)
        self._layers_t = [layer.T for layer in self.layers]
        # _params_below[i]: parameters of layers 0..i-1 (rescaled when a mask scale is deferred)
        self._params_below = [
            sum(layer.size for layer in self.layers[:i]) for i in range(len(self.layers))
        ]
        self._wflat = [(self.params[s], self.grad[s]) for s in self.decay_slices]
        self._workspaces: dict[tuple[int, bool], Workspace] = {}
        self._wscratch = np.empty(max(a * b for a, b in shapes), self.dtype)
        self.initialize(init, rng)

    @property
    def n_parameters(self) -> int:
        """Number of trainable scalars (weights and biases)."""
        return self.params.size

    def weight_mask(self) -> np.ndarray:
        """Boolean mask over `params`: True for weight-matrix entries, False for biases."""
        mask = np.zeros(self.params.size, bool)
        for s in self.decay_slices:
            mask[s] = True
        return mask

    def augment(self, X: np.ndarray) -> np.ndarray:
        """Rows X with a trailing column of ones, in this network's dtype (C order)."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(f"expected inputs of shape (rows, {self.sizes[0]}), got {X.shape}")
        out = np.empty((X.shape[0], X.shape[1] + 1), self.dtype)
        out[:, :-1] = X
        out[:, -1] = 1.0
        return out

    def initialize(self, init: str = "auto", rng: np.random.Generator | int | None = 0) -> None:
        """Draw weights (He or Xavier normal) and zero the biases."""
        if init == "auto":
            he = (Activation.RELU, Activation.LEAKY_RELU, Activation.GELU)
            init = "he" if self.activation in he else "xavier"
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

    def _workspace(self, n: int, train: bool) -> Workspace:
        ws = self._workspaces.get((n, train))
        if ws is None:
            if len(self._workspaces) > 8:  # odd sizes (eval tails, uploads): don't hoard
                self._workspaces.clear()
            ws = self._workspaces[(n, train)] = Workspace(self, n, train)
        return ws

    def _forward(self, XTa: np.ndarray, ws: Workspace, masks_t: Masks) -> np.ndarray:
        """Output values (k, n) for augmented inputs XTa (n_inputs + 1, n).

        masks_t are (width, n) per hidden layer, or None.
        """
        h = XTa
        relu = self.activation == Activation.RELU
        layers_t = self._layers_t
        for i in range(len(layers_t) - 1):
            z = ws.z[i]
            np.matmul(layers_t[i], h, out=z)
            a = ws.a[i]
            if relu:
                np.maximum(z, ws.zeros[: z.shape[0]], out=z)  # a is z
            else:
                activate(self.activation, z, a)
            if masks_t is not None and masks_t[i] is not None:
                a *= masks_t[i]
            h = ws.h[i]
        z = ws.z[-1]
        np.matmul(layers_t[-1], h, out=z)
        return z

    def forward(self, X: np.ndarray, masks: Masks = None) -> np.ndarray:
        """Output-layer values (logits / predictions), shape (rows, outputs), as a new array.

        `masks` (one per hidden layer, each (rows, width) or None) multiply the hidden
        activations: pass inverted-dropout masks (0 or 1/(1-p)) to reproduce a training pass.
        """
        if masks is not None:
            Xa = self.augment(X)
            ws = self._workspace(len(Xa), False)
            return self._forward(Xa.T, ws, self._transpose_masks(masks)).T.copy()
        X = np.asarray(X)
        out = np.empty((len(X), self.sizes[-1]), self.dtype)
        for s, ws, xta in self._chunks(X):
            out[s : s + xta.shape[1]] = self._forward(xta, ws, None).T
        return out

    def _chunks(self, X: np.ndarray, augmented: bool = False):
        """(start, workspace, augmented inputs (n_inputs + 1, rows)) per evaluation chunk."""
        for s in range(0, len(X), EVAL_CHUNK):
            xs = X[s : s + EVAL_CHUNK]
            ws = self._workspace(len(xs), False)
            if augmented:
                yield s, ws, np.asarray(xs, self.dtype).T
                continue
            if ws.xa is None:
                ws.xa = np.empty((len(xs), self.sizes[0] + 1), self.dtype)
                ws.xa[:, -1] = 1.0
            ws.xa[:, :-1] = xs
            yield s, ws, ws.xa.T

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class ids (classification) or predicted values (regression) for rows X."""
        out = self.forward(X)
        if self.task == Task.MULTICLASS:
            return out.argmax(axis=1)
        if self.task == Task.BINARY:
            return (out[:, 0] > 0).astype(np.int64)
        return out[:, 0]

    def _transpose_masks(self, masks: Masks) -> Masks:
        if masks is None:
            return None
        return [None if m is None else np.asarray(m, self.dtype).T for m in masks]

    # ------------------------------------------------------------------ losses

    def prepare_targets(self, y: np.ndarray) -> np.ndarray:
        """Targets as the loss wants them: 1-D int64 ids (multiclass) or 1-D floats."""
        dtype = np.int64 if self.task == Task.MULTICLASS else self.dtype
        return np.ascontiguousarray(y, dtype=dtype).reshape(-1)

    def penalty(self, l1: float = 0.0, l2: float = 0.0) -> float:
        """l1 * sum|W| + l2 * sum(W**2) over the weight matrices."""
        total = 0.0
        for w, _ in self._wflat:
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
        return summed_loss(self.task, out, np.asarray(y)) / len(X) + self.penalty(l1, l2)

    def loss_and_grad(
        self, X: np.ndarray, y: np.ndarray, masks: Masks = None, l1: float = 0.0, l2: float = 0.0
    ) -> float:
        """Fill `grad` with d(loss)/d(params) on the batch and return the mean *data* loss.

        The gradient includes the l1/l2 penalty terms; the returned value does not (add
        `penalty(l1, l2)` for the full objective). masks are (rows, width) per hidden layer.
        """
        Xa = self.augment(X)
        targets = self.prepare_targets(y)
        return self.step_grad(Xa.T, targets, self._transpose_masks(masks), l1, l2)

    def step_grad(
        self,
        XTa: np.ndarray,
        y: np.ndarray,
        masks_t: Masks = None,
        l1: float = 0.0,
        l2: float = 0.0,
        record: np.ndarray | None = None,
        mask_scale: float | None = None,
    ) -> float:
        """`loss_and_grad` for the training loop: feature-major inputs, no conversions.

        XTa is (n_inputs + 1, rows) in this network's dtype, its last row all ones (the
        transposed view of rows from `augment` is fine); y comes from `prepare_targets`;
        masks_t are (width, rows). `record`, if given, is a (rows,) array that receives what
        `count_correct` needs. `mask_scale` promises that every mask holds only the values
        0 and mask_scale (inverted dropout), which lets ReLU networks skip mask passes.
        """
        n = XTa.shape[1]
        ws = self._workspaces.get((n, True)) or self._workspace(n, True)
        z = self._forward(XTa, ws, masks_t)
        loss, delta = head(self.task, z, y, ws, n, record)
        if self.activation == Activation.RELU and (masks_t is None or mask_scale is not None):
            self._backward_relu(XTa, ws, masks_t, delta, mask_scale)
        else:
            self._backward(XTa, ws, masks_t, delta)
        if l1 or l2:
            self._penalty_grad(l1, l2)
        return loss

    def count_correct(self, record: np.ndarray, y: np.ndarray) -> int:
        """Correctly classified rows, from `record`s filled by step_grad and their targets."""
        if self.task == Task.MULTICLASS:
            # Logits were shifted by their column max, so the true class is (one of) the
            # argmax exactly when its shifted logit is 0.
            return int(np.count_nonzero(record == 0))
        return int(np.count_nonzero((record > 0) == (y > 0.5)))

    # ------------------------------------------------------------------ backward

    def _backward(self, XTa: np.ndarray, ws: Workspace, masks_t: Masks, delta) -> None:
        for i in range(len(self.layers) - 1, -1, -1):
            h = XTa if i == 0 else ws.h[i - 1]
            np.matmul(h, delta.T, out=self.grad_layers[i])  # weights and bias row at once
            if i == 0:
                return
            d = ws.d[i - 1]
            np.matmul(self.weights[i], delta, out=d)
            if masks_t is not None and masks_t[i - 1] is not None:
                d *= masks_t[i - 1]
            activation_grad(self.activation, ws.z[i - 1], ws.a[i - 1], d, ws)
            delta = d

    def _backward_relu(self, XTa, ws: Workspace, masks_t: Masks, delta, scale) -> None:
        """Backward pass of a ReLU network whose masks (if any) hold only 0 and `scale`.

        With a = relu(z) * mask, a > 0 exactly where the mask kept a unit with z > 0, so
        d loss / d z = scale * (d loss / d a) * [a > 0]: the mask itself is not needed, only
        its scale. For the top hidden layer the scale goes into the (tiny) output delta;
        below that it is carried as a factor c of the remaining gradients when multiplying
        the (smaller) gradient blocks of the layers underneath by c is cheaper than a pass
        of the mask. d loss / d a is written over a (no longer needed), keeping the working
        set small.
        """
        c = 1.0
        top = len(self.layers) - 1
        for i in range(top, -1, -1):
            grad = self.grad_layers[i]
            np.matmul(XTa if i == 0 else ws.h[i - 1], delta.T, out=grad)
            if c != 1.0:
                grad *= c
            if i == 0:
                return
            a = ws.a[i - 1]
            gate = ws.tb[: a.shape[0]]
            np.greater(a, 0, out=gate)
            if masks_t is None:
                np.matmul(self.weights[i], delta, out=a)
            elif i == top:
                delta *= scale
                np.matmul(self.weights[i], delta, out=a)
            else:
                np.matmul(self.weights[i], delta, out=a)
                if c != 1.0 or a.size > self._params_below[i]:
                    c *= scale
                else:
                    a *= masks_t[i - 1]
            np.multiply(a, gate, out=a)
            delta = a

    def _penalty_grad(self, l1: float, l2: float) -> None:
        for w, g in self._wflat:
            s = self._wscratch[: w.size]
            if l2:
                np.multiply(w, 2.0 * l2, out=s)
                g += s
            if l1:
                np.sign(w, out=s)
                s *= l1
                g += s

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, X: np.ndarray, y: np.ndarray, augmented: bool = False) -> dict[str, float]:
        """Metrics on (X, y) without dropout: loss and accuracy, or loss, rmse and r2.

        augmented=True says X already carries the column of ones (see `augment`).
        """
        X = np.asarray(X)
        y = np.asarray(y)
        n = len(X)
        loss_sum = 0.0
        correct = 0
        for s, ws, xta in self._chunks(X, augmented):
            out = self._forward(xta, ws, None).T
            ys = y[s : s + len(out)]
            loss_sum += summed_loss(self.task, out, ys)
            if self.task == Task.MULTICLASS:
                correct += int(np.count_nonzero(out.argmax(axis=1) == ys))
            elif self.task == Task.BINARY:
                correct += int(np.count_nonzero((out[:, 0] > 0) == (ys.reshape(-1) > 0.5)))
        loss = loss_sum / n
        if self.task != Task.REGRESSION:
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
