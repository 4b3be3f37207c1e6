"""One training epoch of the same MLP in hptune's trainer and in PyTorch, single-threaded.

Model: 40 inputs -> 256 -> 256 -> 10 classes, ReLU, dropout 0.2, AdamW (lr 1e-3, weight
decay 1e-4 on weight matrices only), softmax cross-entropy; 4000 training rows of MNIST-1D.
Both sides shuffle once per epoch and then slice contiguous batches. Times are medians over
several epochs of one run (the first epoch is dropped as warm-up); ours is fit()'s
``train_seconds`` (the optimisation pass, without validation).

The floor is 6 * rows * parameters FLOPs per epoch (forward 2, backward 4 per weight per
row) at the single-thread float32 GEMM rate measured here on a large square matmul.

Usage: python benchmarks/trainer_vs_torch.py [--epochs 7] [--batch-sizes 16 32 128 512]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from trainer import Dataset, TrainConfig, fit, load_dataset

HIDDEN = (256, 256)
LR, WEIGHT_DECAY, DROPOUT = 1e-3, 1e-4, 0.2


def benchmark_data() -> Dataset:
    """4000 x 40 training rows (MNIST-1D's train+val), its 1000 test rows as validation."""
    d = load_dataset("mnist1d", seed=0)
    X = np.concatenate([d.X_train, d.X_val])
    y = np.concatenate([d.y_train, d.y_val])
    return Dataset("mnist1d-4000", "multiclass", X, y, d.X_test, d.y_test, d.X_test, d.y_test, 10)


def n_parameters(n_in: int, hidden: tuple[int, ...], n_out: int) -> int:
    sizes = (n_in, *hidden, n_out)
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """Single-thread float32 matmul rate in FLOP/s (best of `repeats`)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def ours(data: Dataset, batch: int, epochs: int) -> float:
    cfg = TrainConfig(
        hidden_layers=HIDDEN,
        activation="relu",
        optimizer="adamw",
        learning_rate=LR,
        batch_size=batch,
        dropout=DROPOUT,
        weight_decay=WEIGHT_DECAY,
        max_epochs=epochs,
        seed=0,
    )
    result = fit(cfg, data)
    return statistics.median(h["train_seconds"] for h in result.history[1:])


def theirs(data: Dataset, batch: int, epochs: int, fused: bool = False) -> float:
    import torch

    torch.manual_seed(0)
    layers, n_in = [], data.n_features
    for width in HIDDEN:
        layers += [torch.nn.Linear(n_in, width), torch.nn.ReLU(), torch.nn.Dropout(DROPOUT)]
        n_in = width
    model = torch.nn.Sequential(*layers, torch.nn.Linear(n_in, 10))
    named = list(model.named_parameters())
    groups = [
        {"params": [p for k, p in named if k.endswith("weight")], "weight_decay": WEIGHT_DECAY},
        {"params": [p for k, p in named if k.endswith("bias")], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, fused=True if fused else None)
    loss_fn = torch.nn.CrossEntropyLoss()
    X, y = torch.from_numpy(data.X_train), torch.from_numpy(data.y_train)
    n = len(X)
    gen = torch.Generator().manual_seed(0)
    times = []
    model.train()
    for _ in range(epochs):
        t = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        Xe, ye = X[perm], y[perm]
        for s in range(0, n, batch):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(Xe[s : s + batch]), ye[s : s + batch])
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=7, help="epochs per measurement (>= 2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 128, 512])
    parser.add_argument("--no-torch", action="store_true", help="time only our trainer")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
        has_torch = not args.no_torch
    except ImportError:
        torch, has_torch = None, False

    data = benchmark_data()
    n_rows = len(data.X_train)
    params = n_parameters(data.n_features, HIDDEN, 10)
    with threadpool_limits(1):
        blas = ", ".join(f"{i['internal_api']} {i.get('version')}" for i in threadpool_info())
        env = {k: os.environ.get(k, "(unset)") for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        print(f"machine: {platform.processor() or platform.machine()}, numpy {np.__version__}")
        print(f"blas: {blas}; env: {env}")
        if torch is not None:
            print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
        rate = gemm_rate()
        floor = 6.0 * n_rows * params / rate
        print(f"data: {n_rows} x {data.n_features}, params {params}, epochs per run {args.epochs}")
        print(f"single-thread float32 GEMM: {rate / 1e9:.1f} GFLOP/s; floor {floor * 1e3:.2f} ms")
        header = f"{'batch':>6} {'ours ms':>9} {'torch ms':>9} {'fused ms':>9} "
        print(header + f"{'torch/ours':>11} {'fused/ours':>11} {'ours/floor':>11}")
        for batch in args.batch_sizes:
            t_ours = ours(data, batch, args.epochs)
            if has_torch:
                t_torch = theirs(data, batch, args.epochs)
                t_fused = theirs(data, batch, args.epochs, fused=True)
                tail = f"{t_torch * 1e3:9.1f} {t_fused * 1e3:9.1f} {t_torch / t_ours:11.2f} "
                tail += f"{t_fused / t_ours:11.2f}"
            else:
                tail = f"{'-':>9} {'-':>9} {'-':>11} {'-':>11}"
            print(f"{batch:>6} {t_ours * 1e3:9.1f} {tail} {t_ours / floor:11.2f}", flush=True)


if __name__ == "__main__":
    main()
