"""The training loop: minibatch epochs, validation, early stopping, divergence detection."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from trainer.checkpoint import Checkpoint, Counters, RunState
from trainer.config import TrainConfig
from trainer.datasets import Dataset
from trainer.network import MLP, output_units
from trainer.optimizers import make_optimizer
from trainer.schedules import lr_at
from trainer.vocab import StopReason, Task

# A batch loss that is not finite, or larger than this factor times max(1, first batch
# loss of the run), means the run diverged; it stops at that step.
DIVERGENCE_FACTOR = 1e6
# Dropout masks and input noise are drawn for about this many values at a time (whole
# batches), which keeps random-number calls out of most steps at small batch sizes while
# the block stays cache-sized.
NOISE_BLOCK_VALUES = 1 << 18
# Dropout compares 16-bit random integers with round(p * 2**16), so p is effectively
# quantised to multiples of 2**-16; the kept units are scaled by the exact 1/P(keep).
_MASK_LEVELS = 1 << 16
_U64_MAX = (1 << 64) - 1

EpochCallback = Callable[[int, dict[str, float]], Any]
ExamplesCallback = Callable[[int, dict[str, float]], Any]


@dataclass
class TrainResult:
    """Outcome of `fit`; history rows are also what on_epoch received."""

    history: list[dict[str, float]]
    best_epoch: int | None  # 1-based; None only if the first epoch diverged
    best_value: float | None  # value of config.monitor at best_epoch
    stop_reason: StopReason  # one of STOP_REASONS
    stopped_epoch: int  # last epoch trained (a partial one counts) == len(history)
    test_metrics: dict[str, float]  # of the weights kept at the end (best ones by default)
    diverged_loss: float | None = None  # the offending batch loss when stop_reason == "diverged"
    examples_seen: int = 0  # training examples the optimizer stepped on, over all epochs
    monitor: str = "val_loss"
    seconds: float = 0.0  # wall time of the whole fit
    network: MLP | None = field(default=None, repr=False)  # trained model, best weights loaded
    resumed_from_epoch: int | None = None  # the resumed checkpoint's epoch, if any

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no network)."""
        return {
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_value": self.best_value,
            "stop_reason": self.stop_reason,
            "stopped_epoch": self.stopped_epoch,
            "test_metrics": self.test_metrics,
            "diverged_loss": self.diverged_loss,
            "examples_seen": self.examples_seen,
            "monitor": self.monitor,
            "seconds": self.seconds,
            "resumed_from_epoch": self.resumed_from_epoch,
        }


class Rngs(NamedTuple):
    """Independent random streams of one run, all derived from config.seed."""

    init: np.random.Generator  # weight initialisation
    shuffle: np.random.Generator  # exactly one permutation(n_train) per epoch
    noise: np.random.Generator  # dropout masks and input noise (SFC64)


def make_rngs(seed: int) -> Rngs:
    """The run's random streams; fit uses exactly these, so tests can replay them.

    The noise stream, which draws a random 16-bit integer per hidden unit and row for
    dropout, runs on numpy's SFC64 bit generator (Small Fast Chaotic; at least 2**64 draws
    per seed before any repeat), which draws those bits in about 20% less time here than
    the default PCG64 (benchmarks/trainer_profile.py).
    """
    init, shuffle, noise = np.random.SeedSequence(seed).spawn(3)
    return Rngs(
        np.random.default_rng(init),
        np.random.default_rng(shuffle),
        np.random.Generator(np.random.SFC64(noise)),
    )


def build_network(config: TrainConfig, data: Dataset, rng: np.random.Generator | None = None):
    """The initial network fit would train for (config, data)."""
    if rng is None:
        rng = make_rngs(config.seed).init
    return MLP(
        data.n_features,
        config.hidden_layers,
        output_units(data.task, data.n_classes),
        task=data.task,
        activation=config.activation,
        init=config.init,
        dtype=config.dtype,
        rng=rng,
    )


def validation_metric_names(task: str) -> tuple[str, ...]:
    """Metrics `monitor` may name for a task."""
    return Task(task).metrics


def steps_per_epoch(config: TrainConfig, n_train: int) -> int:
    """Optimizer steps in one epoch."""
    batch = n_train if config.batch_size == "full" else min(int(config.batch_size), n_train)
    return math.ceil(n_train / batch)


def fit(
    config: TrainConfig,
    data: Dataset,
    on_epoch: EpochCallback | None = None,
    on_examples: ExamplesCallback | None = None,
    *,
    checkpoint_when: Callable[[int], bool] | None = None,
    on_checkpoint: Callable[[Checkpoint], Any] | None = None,
    resume: Checkpoint | None = None,
) -> TrainResult:
    """Train a fresh network on data.X_train, monitoring the validation split.

    After each finished epoch: compute the metrics, update the best epoch (it must beat the
    best by more than min_delta), then call on_epoch(epoch, metrics); a truthy return stops
    with "pruned", otherwise `patience` epochs without improvement stop with
    "early_stopped".

    With config.eval_every_examples = k, the validation metrics are also computed each time
    the examples trained on (counted across epochs) pass a multiple m of k, at the first
    batch boundary at or past it, and on_examples(m, metrics) is called (once for each mark
    that one batch passes, with the same metrics): the same marks for any batch size, so
    callers can compare runs at equal compute. metrics carry "examples" (the exact count)
    and the val_* entries. A truthy return stops with "pruned" at once; the partial epoch is
    then the last history row. When m falls on an epoch's last batch, the epoch's own
    evaluation is used (before on_epoch).

    A non-finite or exploding batch loss (see DIVERGENCE_FACTOR) stops at once with
    "diverged"; that epoch is recorded with the offending loss as train_loss and NaN
    validation metrics. A non-finite validation loss after an epoch also stops with
    "diverged". on_epoch is not called for a diverged epoch. At the end the best weights are
    restored (restore_best) and test_metrics computed with them.

    History rows also carry "train_seconds" (the optimisation pass alone) next to
    "seconds" (the whole epoch, evaluation included). train_loss and train_accuracy are
    running means over the epoch's batches, with dropout active and without penalties.

    Checkpoints (trainer.checkpoint): after an epoch that training goes on from, if
    checkpoint_when(epoch) is true, on_checkpoint gets a Checkpoint of the whole state.
    fit(..., resume=checkpoint) goes on from it at checkpoint.epoch + 1, bit-identically to
    the run never interrupted; the callbacks are not called for the epochs it holds, and
    the result's history starts with its rows.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    allowed = validation_metric_names(data.task)
    if config.monitor not in allowed:
        raise ValueError(
            f"monitor {config.monitor!r} is not available for a {data.task} task; "
            f"choose one of {', '.join(allowed)}"
        )
    started = time.perf_counter()
    rngs = make_rngs(config.seed)
    net = build_network(config, data, rngs.init)
    dtype = net.dtype
    X_train = net.augment(data.X_train)  # with a column of ones for the bias rows
    y_train = net.prepare_targets(data.y_train)
    X_val = net.augment(data.X_val)
    n = len(X_train)
    if n == 0 or len(X_val) == 0:
        raise ValueError("the dataset needs non-empty train and validation splits")
    batch = n if config.batch_size == "full" else min(int(config.batch_size), n)
    spe = math.ceil(n / batch)
    # Dropout masks and input noise are drawn for a block of whole batches at a time.
    widths = sum(config.hidden_layers) if config.dropout else 0
    widths += data.n_features if config.input_noise else 0
    block_rows = batch * max(1, NOISE_BLOCK_VALUES // max(1, batch * widths))
    dropout = _Dropout(config.dropout, config.hidden_layers, min(block_rows, n), dtype)

    mask_scale = dropout.scale if dropout else None
    optimizer = make_optimizer(config, decay=[net.decay_slices])
    state = RunState(config, data, net, optimizer, rngs)
    step, seen, next_mark, loss_bound = state.start(resume)  # seen: examples stepped on
    checkpoint_when = checkpoint_when if on_checkpoint is not None else None
    params, grads = [net.params], [net.grad]
    constant_lr = config.schedule == "constant" and config.warmup_epochs == 0
    X_epoch = np.empty_like(X_train)
    y_epoch = np.empty_like(y_train)
    record = np.empty(n, dtype)  # per-row correctness evidence, see MLP.count_correct
    classification = data.task != Task.REGRESSION
    l1, l2, clip = config.l1, config.l2, config.grad_clip
    stop_reason = StopReason.MAX_EPOCHS
    diverged_loss: float | None = None
    history, every = state.history, config.eval_every_examples  # next_mark: every's next multiple

    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        for epoch in range(len(history) + 1, config.max_epochs + 1):
            t0 = time.perf_counter()
            perm = rngs.shuffle.permutation(n)
            np.take(X_train, perm, axis=0, out=X_epoch)
            np.take(y_train, perm, axis=0, out=y_epoch)
            loss_sum = 0.0
            lr = config.learning_rate
            bad_loss: float | None = None
            masks: list[np.ndarray] | None = None
            marks: list[int] = []  # multiples of `every` passed, not yet reported
            mid: dict[str, float] | None = None  # metrics of a mid-epoch stop
            for block_start in range(0, n, block_rows):
                block_end = min(n, block_start + block_rows)
                if config.input_noise:
                    xb = X_epoch[block_start:block_end, :-1]  # not the column of ones
                    xb += config.input_noise * rngs.noise.standard_normal(xb.shape, dtype=dtype)
                if dropout:
                    dropout.draw(rngs.noise, block_end - block_start)
                for s in range(block_start, block_end, batch):
                    e = min(s + batch, block_end)
                    if not constant_lr:
                        lr = optimizer.lr = lr_at(step, config, spe)
                    if dropout:
                        masks = dropout.masks(s - block_start, e - block_start)
                    loss = net.step_grad(
                        X_epoch[s:e].T, y_epoch[s:e], masks, l1, l2, record[s:e], mask_scale
                    )
                    if loss_bound is None:
                        loss_bound = DIVERGENCE_FACTOR * max(1.0, loss)
                    if not loss <= loss_bound:  # also catches NaN
                        bad_loss = loss
                        break
                    loss_sum += loss * (e - s)
                    if clip is not None:
                        norm = math.sqrt(float(np.dot(net.grad, net.grad)))
                        if norm > clip:
                            net.grad *= clip / norm
                    optimizer.step(params, grads)
                    step += 1
                    seen += e - s
                    if next_mark is not None and seen >= next_mark:
                        marks = list(range(next_mark, seen + 1, every))
                        next_mark = marks[-1] + every
                        if e == n:
                            break  # the epoch's own evaluation serves these marks
                        val = _val_metrics(net, X_val, data.y_val, classification)
                        if _report(on_examples, marks, seen, val):
                            mid = val
                            break
                        marks = []
                if bad_loss is not None or mid is not None:
                    break
            train_seconds = time.perf_counter() - t0
            rows_done = seen - (epoch - 1) * n

            if bad_loss is not None:
                nan = float("nan")
                row = {"epoch": epoch, "train_loss": bad_loss}
                names = (
                    ("val_loss", "val_accuracy", "train_accuracy")
                    if classification
                    else ("val_loss", "train_rmse", "val_rmse", "train_r2", "val_r2")
                )
                row.update({k: nan for k in names})
                row.update(lr=lr, seconds=time.perf_counter() - t0, train_seconds=train_seconds)
                history.append(row)
                stop_reason, diverged_loss = StopReason.DIVERGED, bad_loss
                break

            val = mid if mid is not None else _val_metrics(net, X_val, data.y_val, classification)
            row = {"epoch": epoch, "train_loss": loss_sum / rows_done}
            if classification:
                row["train_accuracy"] = (
                    net.count_correct(record[:rows_done], y_epoch[:rows_done]) / rows_done
                )
            else:
                mse = loss_sum / rows_done
                var = float(np.var(y_train, dtype=np.float64))
                row["train_rmse"] = math.sqrt(mse)
                row["train_r2"] = 1.0 - mse / var if var > 0 else float("nan")
            row.update(val)
            if rows_done < n:
                row["examples"] = rows_done  # a partial (mid-epoch stopped) epoch
            row["lr"] = lr
            row["train_seconds"] = train_seconds
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            if not math.isfinite(val["val_loss"]):
                # The epoch's last update broke the weights: the next batch would diverge.
                stop_reason, diverged_loss = StopReason.DIVERGED, val["val_loss"]
                break

            state.update(epoch, row[config.monitor])
            if mid is not None:
                stop_reason = StopReason.PRUNED
                break
            if marks and _report(on_examples, marks, seen, val):
                stop_reason = StopReason.PRUNED
                break
            if on_epoch is not None and on_epoch(epoch, dict(row)):
                stop_reason = StopReason.PRUNED
                break
            if state.out_of_patience:
                stop_reason = StopReason.EARLY_STOPPED
                break
            if checkpoint_when is not None and epoch < config.max_epochs and checkpoint_when(epoch):
                on_checkpoint(state.capture(epoch, Counters(step, seen, next_mark, loss_bound)))

        if config.restore_best and state.best_epoch is not None:
            np.copyto(net.params, state.best_params)
        test = net.evaluate(data.X_test, data.y_test)
    net.release_buffers()
    if classification:
        test_metrics = {"accuracy": test["accuracy"], "loss": test["loss"]}
    else:
        test_metrics = {"rmse": test["rmse"], "r2": test["r2"], "loss": test["loss"]}
    return TrainResult(
        history=history,
        best_epoch=state.best_epoch,
        best_value=state.best_value,
        stop_reason=stop_reason,
        stopped_epoch=len(history),
        test_metrics=test_metrics,
        diverged_loss=diverged_loss,
        examples_seen=seen,
        monitor=config.monitor,
        seconds=time.perf_counter() - started,
        network=net,
        resumed_from_epoch=None if resume is None else resume.epoch,
    )


def _report(on_examples: ExamplesCallback | None, marks: list[int], seen: int,
            val: dict[str, float]) -> bool:
    """Call on_examples for each mark (all evaluated at `seen` examples); True to stop."""
    if on_examples is None:
        return False
    return any(on_examples(m, {"examples": seen, **val}) for m in marks)


def _val_metrics(net: MLP, X_val: np.ndarray, y_val: np.ndarray, classification: bool
                 ) -> dict[str, float]:
    """The validation metrics of a history row: val_loss and val_accuracy, or val_rmse/r2."""
    val = net.evaluate(X_val, y_val, augmented=True)
    if classification:
        return {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
    return {"val_loss": val["loss"], "val_rmse": val["rmse"], "val_r2": val["r2"]}


class _Dropout:
    """Inverted-dropout masks (0 or 1/P(keep)) for a block of rows, feature-major."""

    def __init__(self, p: float, widths: tuple[int, ...], rows: int, dtype: np.dtype) -> None:
        self.threshold = min(round(p * _MASK_LEVELS), _MASK_LEVELS - 1)
        self.scale = _MASK_LEVELS / (_MASK_LEVELS - self.threshold)
        self.bufs = [np.empty((w, rows), dtype) for w in widths] if self.threshold else []
        self.total = sum(widths)

    def __bool__(self) -> bool:
        return bool(self.bufs)

    def draw(self, rng: np.random.Generator, rows: int) -> None:
        # Each uniform 64-bit integer gives four 16-bit uniforms: ~10x faster than drawing
        # floats with rng.random (and a little faster than bit_generator.random_raw).
        words = -(-self.total * rows // 4)
        raw = rng.integers(0, _U64_MAX, words, dtype=np.uint64, endpoint=True).view(np.uint16)
        start = 0
        for buf in self.bufs:
            width = buf.shape[0]
            u = raw[start : start + width * rows].reshape(width, rows)
            start += width * rows
            m = buf[:, :rows]
            np.greater_equal(u, self.threshold, out=m)
            m *= self.scale

    def masks(self, start: int, end: int) -> list[np.ndarray]:
        return [buf[:, start:end] for buf in self.bufs]
