"""The PyTorch objectives against the built-in NumPy MLP on digits, with the same search budget.

Every objective runs the same job spec (only `objective` differs): digits, n_trials trials of
at most 30 epochs, val_accuracy, TPE with the job's seed, and hptune's default pruner, early
stopping and warm start (the centre of the space first); MLP [128, 64] relu for `mlp` and
`torch_mlp` (`torch_cnn` has its own fixed net). Trials run one after another in this process
through search.run_trial on an in-memory Optuna study, as a worker runs them (one thread:
threadpool_limits for NumPy, torch.set_num_threads(1) by the objective itself).

Per run: the best trial's validation accuracy, the test accuracy of that trial (its best
epoch's weights), the epochs all trials trained, and the wall time. Medians over seeds.

Usage:
    python benchmarks/objectives_digits.py                      # 3 seeds x mlp torch_mlp torch_cnn
    python benchmarks/objectives_digits.py --seeds 0 --trials 5  # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import optuna
from threadpoolctl import threadpool_limits

from search import JobSpec, create_study, load_study, run_trial
from search.datasets import bundled


def spec_for(objective: str, seed: int, n_trials: int) -> JobSpec:
    return JobSpec.model_validate({
        "name": f"bench-{objective}", "objective": objective, "dataset": "digits",
        "n_trials": n_trials, "max_epochs": 30, "metric": "val_accuracy",
        "sampler": {"name": "tpe", "seed": seed}, "seed": seed,
        "model": {"hidden_layers": [128, 64], "activation": "relu"}})


def run(objective: str, seed: int, n_trials: int) -> dict[str, float]:
    spec = spec_for(objective, seed, n_trials)
    storage = optuna.storages.InMemoryStorage()
    create_study(spec, storage, "bench", {})
    data = bundled("digits", seed)
    started = time.perf_counter()
    for i in range(n_trials):
        run_trial(load_study(spec, storage, "bench", seed_offset=i), spec, data)
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name="bench", storage=storage)
    best = study.best_trial
    return {"val": best.value, "test": best.user_attrs["test_accuracy"],
            "epochs": sum(t.user_attrs.get("stopped_epoch") or 0 for t in study.trials),
            "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--objectives", nargs="+", default=["mlp", "torch_mlp", "torch_cnn"])
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with threadpool_limits(limits=1):
        for objective in args.objectives:
            runs = []
            for seed in args.seeds:
                runs.append(run(objective, seed, args.trials))
                r = runs[-1]
                print(f"{objective} seed {seed}: best val {r['val']:.4f} test {r['test']:.4f}"
                      f" epochs {r['epochs']} wall {r['wall']:.1f} s", flush=True)
            rows.append((objective, runs))
    print(f"\n{args.trials} trials x {len(args.seeds)} seeds {args.seeds}; medians\n")
    print("| objective | best val acc | test acc of best | per seed test acc | epochs | wall s |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for objective, runs in rows:
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        tests = ", ".join(f"{r['test']:.4f}" for r in runs)
        print(f"| {objective} | {med['val']:.4f} | {med['test']:.4f} | {tests} | "
              f"{med['epochs']:.0f} | {med['wall']:.1f} |")


if __name__ == "__main__":
    main()
