"""One training epoch of the same MLP in hptune's trainer and in PyTorch, single-threaded.

Model: 40 inputs -> 256 -> 256 -> 10 classes, ReLU, dropout 0.2, AdamW (lr 1e-3, weight
decay 1e-4 on weight matrices only), softmax cross-entropy; 4000 training rows of MNIST-1D.
Both sides shuffle once per epoch and then slice contiguous batches. Times are medians over
the epochs of several alternating runs per side (the first epoch of each run is dropped as
warm-up); ours is fit()'s ``train_seconds`` (the optimisation pass, without validation).
"fused" is PyTorch's AdamW(fused=True), its fastest CPU optimizer path.

The floor is 6 * rows * parameters FLOPs per epoch (forward 2, backward 4 per weight per
row) at the single-thread float32 GEMM rate measured here on a large square matmul.

Usage: python benchmarks/trainer_vs_torch.py [--epochs 4] [--repeats 3]
                                           [--batch-sizes 16 32 128 512] [--no-torch]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
import types

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import trainer.fit
from trainer import Dataset, TrainConfig, fit, load_dataset

CLOCK = time.perf_counter
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


def gemm_rates(n: int = 2048, repeats: int = 3) -> list[float]:
    """Single-thread float32 matmul rates in FLOP/s, one per timed repeat."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)
    rates = []
    for _ in range(repeats):
        t = CLOCK()
        np.matmul(a, b, out=out)
        rates.append(2.0 * n**3 / (CLOCK() - t))
    return rates


def shape_gemms(n_in: int, n_rows: int, batch: int, repeats: int = 5) -> float:
    """Seconds of one epoch's matrix products alone, at the shapes a training step has.

    Per step: the forward product of each layer, and backward the weight-gradient product of
    each layer plus the input-gradient product of every layer above the first, in the
    feature-major layout the trainer uses (bias folded in as a row of ones). Median of
    `repeats` epochs. Against the floor it shows how far these shapes (a 41-row input layer,
    a 10-row output layer) keep BLAS from its 2048^3 rate; against ours, what the trainer
    spends besides the products.
    """
    rng = np.random.default_rng(0)
    sizes = (n_in, *HIDDEN, 10)
    ws = [rng.standard_normal((o, i + 1), dtype=np.float32) for i, o in itertools.pairwise(sizes)]
    steps = [min(batch, n_rows - s) for s in range(0, n_rows, batch)]
    bufs = {}
    for n in set(steps):
        hs = [rng.standard_normal((i + 1, n), dtype=np.float32) for i in sizes[:-1]]
        zs = [np.empty((o, n), np.float32) for o in sizes[1:]]
        ds = [np.empty((i, n), np.float32) for i in sizes[1:-1]]
        gs = [np.empty((i + 1, o), np.float32) for i, o in itertools.pairwise(sizes)]
        bufs[n] = (hs, zs, ds, gs)

    def epoch() -> None:
        for n in steps:
            hs, zs, ds, gs = bufs[n]
            for w, h, z in zip(ws, hs, zs, strict=True):
                np.matmul(w, h, out=z)
            for k in range(len(ws) - 1, -1, -1):
                np.matmul(hs[k], zs[k].T, out=gs[k])
                if k:
                    np.matmul(ws[k][:, :-1].T, zs[k], out=ds[k - 1])

    epoch()
    times = []
    for _ in range(repeats):
        t = CLOCK()
        epoch()
        times.append(CLOCK() - t)
    return statistics.median(times)


def ours(data: Dataset, batch: int, epochs: int) -> list[float]:
    """Seconds of each epoch's optimisation pass after the first (fit's train_seconds)."""
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
    return [h["train_seconds"] for h in fit(cfg, data).history[1:]]


def theirs(data: Dataset, batch: int, epochs: int, fused: bool = False) -> list[float]:
    """Seconds of each PyTorch training epoch after the first."""
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
        t = CLOCK()
        perm = torch.randperm(n, generator=gen)
        Xe, ye = X[perm], y[perm]
        for s in range(0, n, batch):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(Xe[s : s + batch]), ye[s : s + batch])
            loss.backward()
            opt.step()
        times.append(CLOCK() - t)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 128, 512])
    parser.add_argument("--no-torch", action="store_true", help="time only our trainer")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: time.process_time for every measurement, which leaves out the time this "
        "process waits for a core on a busy machine (both sides are single-threaded)",
    )
    args = parser.parse_args()
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
        # fit() times its epochs with time.perf_counter; point its module at the CPU clock.
        trainer.fit.time = types.SimpleNamespace(perf_counter=time.process_time)
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
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
            f"load average {load}; numpy {np.__version__}"
        )
        print(f"blas: {blas}; env: {env}; clock: {args.clock}")
        if torch is not None:
            print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
        print(
            f"data: {n_rows} x {data.n_features}, params {params}; {args.repeats} runs x "
            f"{args.epochs} epochs per side, first epoch of each run untimed"
        )
        flops = 6.0 * n_rows * params
        rows = []
        rates = gemm_rates()
        for batch in args.batch_sizes:
            # Alternate short runs of each side so that load from other processes on the
            # machine hits both alike; medians over all timed epochs.
            t_ours, t_torch, t_fused, t_gemm = [], [], [], []
            for _ in range(args.repeats):
                t_gemm.append(shape_gemms(data.n_features, n_rows, batch))
                t_ours += ours(data, batch, args.epochs)
                if has_torch:
                    t_torch += theirs(data, batch, args.epochs)
                    t_fused += theirs(data, batch, args.epochs, fused=True)
                rates += gemm_rates(repeats=1)  # the GEMM rate is sampled under the same load
            rows.append((batch, t_ours, t_torch, t_fused, statistics.median(t_gemm)))
        # The floor uses the median GEMM rate sampled between the runs: under load from
        # other processes a best-of rate would compare a quiet moment with median epochs.
        rate = statistics.median(rates)
        floor = flops / rate
        print(
            f"single-thread float32 GEMM: median {rate / 1e9:.1f} GFLOP/s (best "
            f"{max(rates) / 1e9:.1f}) over {len(rates)} 2048^3 matmuls; "
            f"floor = 6 * rows * params / rate = {floor * 1e3:.2f} ms"
        )
        header = f"{'batch':>6} {'ours ms':>9} {'torch ms':>9} {'fused ms':>9} "
        print(header + f"{'torch/ours':>11} {'fused/ours':>11} {'ours/floor':>11} "
              f"{'gemms ms':>9} {'gemms/floor':>12} {'ours/gemms':>11}")
        for batch, t_ours, t_torch, t_fused, t_gemm in rows:
            m_ours = statistics.median(t_ours)
            if t_torch:
                m_torch, m_fused = statistics.median(t_torch), statistics.median(t_fused)
                tail = f"{m_torch * 1e3:9.1f} {m_fused * 1e3:9.1f} {m_torch / m_ours:11.2f} "
                tail += f"{m_fused / m_ours:11.2f}"
            else:
                tail = f"{'-':>9} {'-':>9} {'-':>11} {'-':>11}"
            print(f"{batch:>6} {m_ours * 1e3:9.1f} {tail} {m_ours / floor:11.2f} "
                  f"{t_gemm * 1e3:9.1f} {t_gemm / floor:12.2f} {m_ours / t_gemm:11.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
