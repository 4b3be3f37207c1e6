"""The PyTorch objectives `torch_mlp` and `torch_cnn` (the `torch` extra: pip install
'hptune[torch]'), registered through the entry-point group `hptune.objectives`.

Both search the built-in's four parameters over the same default ranges (learning_rate,
batch_size, dropout, weight_decay) and train with torch.optim.AdamW under a cosine schedule
(CosineAnnealingLR over max_epochs, stepped per epoch), on CUDA when the worker has it.
`torch_mlp` trains the spec's model.hidden_layers and model.activation on any table;
`torch_cnn` (search.torch_nets.cnn) trains classifiers on square images (n_features = s*s,
s >= 4: digits is 8x8) and refuses other datasets when a trial starts.

Every epoch reports train_loss, val_loss and val_accuracy (or val_rmse and val_r2 for
regression); the reporter decides pruning, cancelling and the spec's patience
(stops_early_itself is False). The weights of the best epoch by the job's metric are kept and
give the test metrics and the exported model.

A trial is deterministic under its seed: torch.manual_seed for the initial weights and the
dropout masks, its own torch.Generator for the shuffles. A checkpoint (torch.save of tensors,
numbers and dicts, read back with weights_only=True) holds the model, AdamW and the schedule,
both random states and the best weights, so a trial resumed from one ends as if never stopped.

PyTorch is imported inside the functions only: `import search` never needs it.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
from dataclasses import dataclass, replace
from typing import Any

from search.objective_mlp import _defaults
from search.objectives import Objective, Reporter, TrialInput
from search.torch_nets import cnn, image_side, mlp, output_units, to_onnx
from trainer import Dataset, Direction, StopReason, Task, TrainResult
from trainer.vocab import Metric

EXTRA = "hptune[torch]"
EVAL_ROWS = 4096  # rows per forward pass when evaluating a split


def _torch() -> Any:
    """PyTorch, imported once per process, with its threads pinned to one (a worker runs one
    trial per core, as the NumPy trainer does under threadpool_limits)."""
    import torch

    _pin_threads(torch)
    return torch


@functools.cache
def _pin_threads(torch: Any) -> None:
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _device(torch: Any) -> Any:
    """CUDA when this worker has it (deterministic kernels where cheap), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return torch.device("cuda")


def _adamw(torch: Any, model: Any, lr: float, weight_decay: float) -> Any:
    """AdamW, fused where this PyTorch has it for the device (a quarter faster per step on
    small CPU networks); the same update either way."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                 fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


@dataclass(eq=False)
class _Run:
    """One trial's training state: everything a checkpoint holds."""

    torch: Any
    device: Any
    model: Any
    optimizer: Any
    scheduler: Any
    shuffle: Any  # torch.Generator (CPU) of the epochs' permutations
    direction: Direction
    epoch: int = 0
    best_value: float | None = None
    best_state: dict[str, Any] | None = None

    def keep_if_best(self, value: float) -> None:
        if not math.isfinite(value):
            return
        better = self.best_value is None or (
            value > self.best_value if self.direction == Direction.MAXIMIZE
            else value < self.best_value)
        if better:
            self.best_value = value
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def to_bytes(self) -> bytes:
        torch = self.torch
        cuda = self.device.type == "cuda"
        state = {"epoch": self.epoch, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "rng": torch.get_rng_state(), "shuffle": self.shuffle.get_state(),
                 "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
                 "best_value": self.best_value, "best_state": self.best_state}
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    def restore(self, blob: bytes) -> None:
        torch = self.torch
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.shuffle.set_state(state["shuffle"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.epoch = int(state["epoch"])
        self.best_value = state["best_value"]
        best = state["best_state"]
        self.best_state = (None if best is None else
                           {k: v.to(self.device) for k, v in best.items()})


@dataclass(frozen=True, eq=False)
class _Split:
    """One split's tensors on the trial's device."""

    X: Any
    y: Any

    @staticmethod
    def of(torch: Any, X: Any, y: Any, task: Task, device: Any) -> _Split:
        dtype = torch.float32 if task == Task.REGRESSION else torch.int64
        return _Split(torch.as_tensor(X, dtype=torch.float32, device=device),
                      torch.as_tensor(y, dtype=dtype, device=device))


def _loss(torch: Any, out: Any, y: Any, task: Task) -> Any:
    functional = torch.nn.functional
    if task == Task.REGRESSION:
        return functional.mse_loss(out[:, 0], y)
    return functional.cross_entropy(out, y)


def _train_epoch(run: _Run, split: _Split, batch_size: int, task: Task) -> float:
    """One pass over the shuffled training split; the mean training loss."""
    torch, model, optimizer = run.torch, run.model, run.optimizer
    model.train()
    n = len(split.X)
    perm = torch.randperm(n, generator=run.shuffle).to(run.device)
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(torch, model(split.X[idx]), split.y[idx], task)
        loss.backward()
        optimizer.step()
        total += loss.detach().double() * len(idx)
    run.scheduler.step()
    return float(total / n)


def evaluate(torch: Any, model: Any, split: _Split, task: Task) -> dict[str, float]:
    """{"loss", "accuracy"} or {"loss", "rmse", "r2"} of `model` on `split`, as the trainer's
    test_metrics (the loss: mean cross-entropy or mean squared error)."""
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(split.X[i:i + EVAL_ROWS])
                         for i in range(0, len(split.X), EVAL_ROWS)]).double()
    if task == Task.REGRESSION:
        y = split.y.double()
        sse = float(torch.sum((out[:, 0] - y) ** 2))
        sst = float(torch.sum((y - y.mean()) ** 2))
        mse = sse / len(y)
        return {"loss": mse, "rmse": math.sqrt(mse) if math.isfinite(mse) else mse,
                "r2": 1.0 - sse / sst if sst > 0 else 0.0}
    loss = float(torch.nn.functional.cross_entropy(out, split.y))
    accuracy = float((out.argmax(dim=1) == split.y).double().mean())
    return {"loss": loss, "accuracy": accuracy}


class TorchObjective(Objective):
    """What the two PyTorch objectives share; subclasses build the network."""

    params = _defaults()
    stops_early_itself = False

    def __init__(self) -> None:
        # Refused when the job is created (search.objectives.get_objective: UnknownObjective).
        if importlib.util.find_spec("torch") is None:
            raise ImportError(f"objective {self.name!r} needs PyTorch: install the extra "
                              f"{EXTRA}")

    def network(self, torch: Any, trial: TrialInput) -> Any:
        raise NotImplementedError

    def train(self, trial: TrialInput, reporter: Reporter) -> TrainResult:
        torch = _torch()
        data, task = trial.data, trial.data.task
        run = self._setup(torch, trial)
        blob = reporter.load_checkpoint()
        if blob is not None:
            run.restore(blob)
        train = _Split.of(torch, data.X_train, data.y_train, task, run.device)
        val = _Split.of(torch, data.X_val, data.y_val, task, run.device)
        batch_size = int(trial.params["batch_size"])
        diverged = None
        for epoch in range(run.epoch + 1, trial.max_epochs + 1):
            metrics = {"train_loss": _train_epoch(run, train, batch_size, task)}
            metrics.update({f"val_{k}": v for k, v in evaluate(torch, run.model, val,
                                                               task).items()})
            run.epoch = epoch
            run.keep_if_best(metrics[trial.metric])
            go_on = reporter.report(epoch, metrics)
            if not all(math.isfinite(v) for v in metrics.values()):
                diverged = metrics["train_loss"]
                break
            if not go_on:
                break
            if reporter.checkpoint_due(epoch):
                reporter.save_checkpoint(run.to_bytes())
        return self._finish(torch, run, trial, reporter, diverged)

    def _setup(self, torch: Any, trial: TrialInput) -> _Run:
        """The fresh trial: seeded weights, AdamW, the cosine schedule, the shuffle stream."""
        missing = [p for p in ("learning_rate", "batch_size", "dropout", "weight_decay")
                   if p not in trial.params]
        if missing:
            raise ValueError(f"objective {self.name!r} got no value for {', '.join(missing)}")
        device = _device(torch)
        torch.manual_seed(trial.seed)
        model = self.network(torch, trial).to(device)
        optimizer = _adamw(torch, model, float(trial.params["learning_rate"]),
                           float(trial.params["weight_decay"]))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(trial.max_epochs, 1))
        shuffle = torch.Generator().manual_seed(trial.seed)
        return _Run(torch, device, model, optimizer, scheduler, shuffle,
                    Metric(trial.metric).direction)

    def _finish(self, torch: Any, run: _Run, trial: TrialInput, reporter: Reporter,
                diverged: float | None) -> TrainResult:
        """Test metrics of the best epoch's weights; the model (on the CPU) on the result."""
        data = trial.data
        if run.best_state is not None:
            run.model.load_state_dict(run.best_state)
        test = _Split.of(torch, data.X_test, data.y_test, data.task, run.device)
        result = reporter.result(evaluate(torch, run.model, test, data.task))
        result = replace(result, network=run.model.to("cpu").eval(),
                         examples_seen=result.stopped_epoch * len(data.X_train))
        if diverged is not None:
            result = replace(result, stop_reason=StopReason.DIVERGED, diverged_loss=diverged)
        return result

    def export_onnx(self, result: TrainResult, data: Dataset) -> bytes | None:
        if result.network is None or data.feature_mean is None:
            return None
        return to_onnx(_torch(), result.network, data, self.name)


class TorchMLPObjective(TorchObjective):
    """`torch_mlp`: the spec's model.hidden_layers and model.activation in PyTorch."""

    name = "torch_mlp"

    def network(self, torch: Any, trial: TrialInput) -> Any:
        model = getattr(trial.spec, "model", None)
        hidden = tuple(model.hidden_layers) if model is not None else (128, 64)
        activation = model.activation if model is not None else "relu"
        data = trial.data
        return mlp(torch, data.n_features, output_units(data), hidden, activation,
                   float(trial.params["dropout"]))


class TorchCNNObjective(TorchObjective):
    """`torch_cnn`: a small convolutional classifier for square images (digits: 8x8)."""

    name = "torch_cnn"
    tasks = (Task.MULTICLASS, Task.BINARY)

    def network(self, torch: Any, trial: TrialInput) -> Any:
        data = trial.data
        side = image_side(data.n_features)
        if data.task not in self.tasks:
            raise ValueError(f"objective 'torch_cnn' trains classifiers; dataset "
                             f"{data.name!r} is {data.task}")
        if side is None:
            raise ValueError(
                f"objective 'torch_cnn' needs square images (n_features = s*s with s >= 4, "
                f"e.g. digits: 64 = 8x8); dataset {data.name!r} has {data.n_features} "
                "features: use torch_mlp")
        return cnn(torch, side, output_units(data), float(trial.params["dropout"]))
