"""The training memory estimate against what numpy really allocates (traced by tracemalloc)."""

import tracemalloc

import numpy as np
import pytest

from trainer import DATASETS, TrainConfig, fit, from_arrays, load_dataset
from trainer.datasets import DATASET_SHAPES
from trainer.memory import estimate_trial_memory, split_rows
from trainer.network import output_units


def test_bundled_shapes_match_the_loaded_datasets():
    assert set(DATASET_SHAPES) == set(DATASETS)
    for name in DATASETS:
        data = load_dataset(name)
        n_rows, n_features, n_classes, task = DATASET_SHAPES[name]
        assert sum(data.sizes().values()) == n_rows, name
        assert (data.n_features, data.n_classes, data.task) == (n_features, n_classes, task)


def _measured_peak(n, f, n_classes, config):
    """Peak traced bytes of building the dataset from float32 arrays and fitting on it."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        rng = np.random.default_rng(0)
        X = rng.standard_normal((n, f), dtype=np.float32)
        y = rng.integers(0, n_classes, n)
        data = from_arrays(X, y, seed=0)
        del X, y
        fit(config, data)
        return tracemalloc.get_traced_memory()[1] - base, data
    finally:
        tracemalloc.stop()


# (rows, features, classes, hidden layers, batch, optimizer, activation, dropout): one case
# dominated by each part of the estimate.
CASES = {
    "parameters": (1000, 20, 10, (1024, 1024), 64, "adam", "relu", 0.2),
    "parameters_sgd": (1000, 20, 10, (1024, 1024), 64, "sgd", "relu", 0.0),
    "activations": (3000, 30, 10, (512, 512, 512), 2048, "adam", "gelu", 0.2),
    "dataset": (8000, 200, 5, (16,), 64, "adam", "relu", 0.2),
    "binary_tanh": (3000, 10, 2, (256,), 1024, "rmsprop", "tanh", 0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_is_close_to_the_traced_peak(case):
    n, f, k, hidden, batch, optimizer, activation, dropout = CASES[case]
    config = TrainConfig(hidden_layers=hidden, batch_size=batch, optimizer=optimizer,
                         activation=activation, dropout=dropout, weight_decay=1e-4,
                         max_epochs=1, seed=0)
    measured, data = _measured_peak(n, f, k, config)
    estimate = estimate_trial_memory(f, output_units(data.task, data.n_classes), n, hidden,
                                     batch, optimizer, activation, dropout > 0, raw_itemsize=4)
    ratio = estimate.total / measured
    print(f"{case}: estimate {estimate.total / 1e6:.1f} MB, traced peak {measured / 1e6:.1f} MB,"
          f" ratio {ratio:.2f} ({estimate})")
    assert 0.85 <= ratio <= 1.75, (case, ratio, estimate, measured)


def test_split_rows_match_from_arrays():
    for n in (10, 150, 1797, 20_000):
        X = np.zeros((n, 1), np.float32)
        y = np.arange(n, dtype=np.float64)
        data = from_arrays(X, y, task="regression")
        sizes = data.sizes()
        assert split_rows(n) == (sizes["train"], sizes["val"], sizes["test"])


def test_estimate_grows_with_what_a_trial_allocates():
    base = estimate_trial_memory(64, 10, 1797, (128, 64), 64)
    wider = estimate_trial_memory(64, 10, 1797, (4096,) * 8, 64)
    bigger_batch = estimate_trial_memory(40, 10, 5000, (1024,), 4096)
    assert wider.total > 100 * base.total and wider.largest_part() == "parameters"
    assert bigger_batch.largest_part() == "activations"
    # The batch is capped at the training rows, as fit caps it.
    assert estimate_trial_memory(64, 10, 1797, (128,), 65_536).total == estimate_trial_memory(
        64, 10, 1797, (128,), split_rows(1797)[0]).total
    # Adam keeps two moments per parameter, plain SGD none.
    assert (estimate_trial_memory(64, 10, 1797, (2048, 2048), 64, "adam").parameters
            > estimate_trial_memory(64, 10, 1797, (2048, 2048), 64, "sgd").parameters)
    # An (10, 2M) upload feeding a 4096-wide layer: 8e9 weights, far past any worker.
    assert estimate_trial_memory(2_000_000, 2, 10, (4096,), 16).total > 8e9 * 4 * 5
    with pytest.raises(ValueError, match="optimizer"):
        estimate_trial_memory(4, 3, 150, (8,), 16, optimizer="lbfgs")
