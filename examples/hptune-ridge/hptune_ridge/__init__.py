"""hptune objectives of their own, registered through the entry-point group
`hptune.objectives` (see this package's pyproject.toml).

`ridge`: a NumPy linear model (regression) or softmax regression (classification) trained by
mini-batch gradient descent with an elastic-net penalty. It searches learning_rate,
weight_decay and `l1_ratio` (the penalty's L1 share), which a job's spec sets, if it wants to,
under search_space.extra:

    {"objective": "ridge", "dataset": "digits",
     "search_space": {"extra": {"l1_ratio": {"kind": "float", "low": 0.0, "high": 0.5}}}}

It exports no ONNX model (export_onnx is the contract's default: None), so a ridge job's
GET /model answers 404.

`always_fails`: a test double for hptune's own plug-in tests; every trial raises.
"""

from __future__ import annotations

import io

import numpy as np

from search.objectives import Objective, Param, Reporter, TrialInput
from trainer import Direction, Task, TrainResult
from trainer.vocab import Metric

BATCH_SIZE = 64


def _forward(W: np.ndarray, b: np.ndarray, X: np.ndarray) -> np.ndarray:
    return X @ W + b


def _metrics(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, task: Task
             ) -> dict[str, float]:
    """{"loss", "accuracy"} or {"loss", "rmse", "r2"}, as the trainer's test_metrics."""
    z = _forward(W, b, X).astype(np.float64)
    if task == Task.REGRESSION:
        err = z[:, 0] - y
        mse = float(np.mean(err ** 2))
        sst = float(np.sum((y - y.mean()) ** 2))
        return {"loss": mse, "rmse": mse ** 0.5,
                "r2": 1.0 - float(np.sum(err ** 2)) / sst if sst > 0 else 0.0}
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return {"loss": float(-log_p[np.arange(len(y)), y].mean()),
            "accuracy": float((z.argmax(axis=1) == y).mean())}


def _gradient(W, b, X, y, task: Task):
    """Gradients of the mean loss (squared error or cross-entropy) for W and b."""
    z = _forward(W, b, X)
    if task == Task.REGRESSION:
        delta = 2.0 * (z - y[:, None]) / len(y)
    else:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        delta = e / e.sum(axis=1, keepdims=True)
        delta[np.arange(len(y)), y] -= 1.0
        delta /= len(y)
    return X.T @ delta, delta.sum(axis=0)


def _pack(epoch: int, weights: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, epoch=np.int64(epoch), **weights)
    return buf.getvalue()


def _unpack(blob: bytes) -> tuple[int, dict[str, np.ndarray]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as f:
        return int(f["epoch"]), {k: f[k].copy() for k in f.files if k != "epoch"}


class RidgeObjective(Objective):
    name = "ridge"
    params = {
        "learning_rate": Param.real(1e-3, 1.0, log=True),
        "weight_decay": Param.real(1e-6, 1e-1, log=True),
        "l1_ratio": Param.real(0.0, 1.0),
    }

    def train(self, trial: TrialInput, reporter: Reporter) -> TrainResult:
        data, task = trial.data, trial.data.task
        k = 1 if task == Task.REGRESSION else data.n_classes
        # The weights now and the best epoch's (by the job's metric), with its value.
        w = {"W": np.zeros((data.n_features, k)), "b": np.zeros(k),
             "best_W": np.zeros((data.n_features, k)), "best_b": np.zeros(k),
             "best_value": np.array(np.nan)}
        start = 0
        blob = reporter.load_checkpoint()
        if blob is not None:
            start, w = _unpack(blob)
        sign = 1.0 if Metric(trial.metric).direction == Direction.MAXIMIZE else -1.0
        for epoch in range(start + 1, trial.max_epochs + 1):
            self._epoch(trial, w, np.random.default_rng([trial.seed, epoch]))
            metrics = {f"val_{m}": v for m, v in
                       _metrics(w["W"], w["b"], data.X_val, data.y_val, task).items()}
            value = metrics[trial.metric]
            if np.isnan(w["best_value"]) or sign * value > sign * w["best_value"]:
                w.update(best_W=w["W"].copy(), best_b=w["b"].copy(), best_value=np.array(value))
            if not reporter.report(epoch, metrics):
                break
            if reporter.checkpoint_due(epoch):
                reporter.save_checkpoint(_pack(epoch, w))
        test = _metrics(w["best_W"], w["best_b"], data.X_test, data.y_test, task)
        return reporter.result(test)

    @staticmethod
    def _epoch(trial: TrialInput, w: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        """One pass of mini-batch gradient descent with the elastic-net penalty."""
        lr = float(trial.params["learning_rate"])
        wd = float(trial.params["weight_decay"])
        l1 = float(trial.params["l1_ratio"])
        X, y = trial.data.X_train.astype(np.float64), trial.data.y_train
        order = rng.permutation(len(X))
        for i in range(0, len(X), BATCH_SIZE):
            rows = order[i:i + BATCH_SIZE]
            gW, gb = _gradient(w["W"], w["b"], X[rows], y[rows], trial.data.task)
            w["W"] -= lr * (gW + wd * ((1.0 - l1) * w["W"] + l1 * np.sign(w["W"])))
            w["b"] -= lr * gb


class AlwaysFails(Objective):
    """Raises in every trial: hptune's tests check that such a job ends `failed`."""

    name = "always_fails"
    params = {"learning_rate": Param.real(1e-3, 1.0, log=True)}

    def train(self, trial: TrialInput, reporter: Reporter) -> TrainResult:
        raise RuntimeError("always_fails raises in every trial, by design")
