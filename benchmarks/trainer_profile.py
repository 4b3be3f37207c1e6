"""Where one training epoch of the trainer_vs_torch model goes, single-threaded.

Part 1 times fit()'s calls per epoch (timers wrapped around MLP.step_grad, the optimizer's
step and the dropout draw) next to the epoch's matrix products alone at their shapes
(trainer_vs_torch.shape_gemms); medians over epochs 2..N. Part 2 times the two single passes
the trainer's choices rest on: ReLU against the scalar 0 and against a zeros array (one
256 x 512 float32 layer), and one batch-512 step's dropout bits (2 x 256 x 512 16-bit
integers) from PCG64 and from SFC64.

Usage (from the repository root): python -m benchmarks.trainer_profile [--batch-sizes 16 512]
                                                     [--epochs 11]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.trainer_vs_torch import (
    DROPOUT,
    HIDDEN,
    LR,
    WEIGHT_DECAY,
    benchmark_data,
    shape_gemms,
)
from trainer import MLP, TrainConfig, fit
from trainer.optimizers import Optimizer

fit_module = sys.modules["trainer.fit"]  # the module; `trainer.fit` is the function


def _timed(cls: type, name: str, totals: dict[str, float]) -> None:
    inner = getattr(cls, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t

    setattr(cls, name, wrapper)


def epoch_breakdown(batch: int, epochs: int) -> dict[str, float]:
    """Median ms per epoch: the whole pass, step_grad, its GEMMs, dropout draw, optimizer."""
    data = benchmark_data()
    cfg = TrainConfig(hidden_layers=HIDDEN, activation="relu", optimizer="adamw",
                      learning_rate=LR, batch_size=batch, dropout=DROPOUT,
                      weight_decay=WEIGHT_DECAY, max_epochs=epochs, seed=0)
    totals: dict[str, float] = defaultdict(float)
    rows: dict[str, list[float]] = defaultdict(list)
    originals = [(MLP, "step_grad"), (Optimizer, "step"), (fit_module._Dropout, "draw")]
    saved = [(cls, name, getattr(cls, name)) for cls, name in originals]
    for cls, name in originals:
        _timed(cls, name, totals)

    def on_epoch(epoch: int, row: dict) -> None:
        if epoch > 1:  # the first epoch builds the workspaces
            rows["train"].append(row["train_seconds"])
            for key, value in totals.items():
                rows[key].append(value)
        totals.clear()

    try:
        fit(cfg, data, on_epoch=on_epoch)
    finally:
        for cls, name, method in saved:
            setattr(cls, name, method)
    out = {k: 1e3 * statistics.median(v) for k, v in rows.items()}
    out["gemms"] = 1e3 * shape_gemms(data.n_features, len(data.X_train), batch)
    return out


def _median_us(fn, repeats: int = 200) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def single_passes() -> dict[str, float]:
    rng = np.random.default_rng(0)
    z0 = rng.standard_normal((256, 512), dtype=np.float32)
    z, zeros = z0.copy(), np.zeros_like(z0)
    copy = _median_us(lambda: np.copyto(z, z0))
    words = 2 * 256 * 512 // 4  # 64-bit words holding four 16-bit integers each
    pcg = np.random.Generator(np.random.PCG64(0))
    sfc = np.random.Generator(np.random.SFC64(0))
    top = np.iinfo(np.uint64).max
    return {
        "relu vs scalar 0": _median_us(lambda: (np.copyto(z, z0), np.maximum(z, 0, out=z)))
        - copy,
        "relu vs zeros": _median_us(lambda: (np.copyto(z, z0), np.maximum(z, zeros, out=z)))
        - copy,
        "mask bits PCG64": _median_us(
            lambda: pcg.integers(0, top, words, dtype=np.uint64, endpoint=True)),
        "mask bits SFC64": _median_us(
            lambda: sfc.integers(0, top, words, dtype=np.uint64, endpoint=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--epochs", type=int, default=11, help="per batch size (>= 2)")
    args = parser.parse_args()
    with threadpool_limits(1):
        print(f"{'batch':>6} {'epoch ms':>9} {'step_grad':>10} {'its GEMMs':>10} "
              f"{'dropout':>8} {'optimizer':>10} {'loop, rest':>11}")
        for batch in args.batch_sizes:
            r = epoch_breakdown(batch, args.epochs)
            rest = r["train"] - r["step_grad"] - r["draw"] - r["step"]
            print(f"{batch:>6} {r['train']:9.2f} {r['step_grad']:10.2f} {r['gemms']:10.2f} "
                  f"{r['draw']:8.2f} {r['step']:10.2f} {rest:11.2f}")
        print("single passes, median us:")
        for name, us in single_passes().items():
            print(f"  {name:<18} {us:7.1f}")


if __name__ == "__main__":
    main()
