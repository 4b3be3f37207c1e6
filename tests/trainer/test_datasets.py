"""Bundled and generated datasets, and validation of caller-supplied arrays."""

import numpy as np
import pytest

from trainer import DATASETS, from_arrays, load_dataset
from trainer.datasets import mnist1d_arrays, mnist1d_templates

EXPECTED = {  # name: (task, n_classes, n_features, total rows)
    "digits": ("multiclass", 10, 64, 1797),
    "breast_cancer": ("binary", 2, 30, 569),
    "wine": ("multiclass", 3, 13, 178),
    "iris": ("multiclass", 3, 4, 150),
    "mnist1d": ("multiclass", 10, 40, 5000),
    "regression": ("regression", 1, 10, 3000),
}


def test_known_names():
    assert set(DATASETS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_shapes_types_and_standardisation(name):
    task, n_classes, n_features, rows = EXPECTED[name]
    d = load_dataset(name, seed=0)
    assert (d.name, d.task, d.n_classes, d.n_features) == (name, task, n_classes, n_features)
    assert sum(d.sizes().values()) == rows
    for X, y in ((d.X_train, d.y_train), (d.X_val, d.y_val), (d.X_test, d.y_test)):
        assert X.dtype == np.float32 and X.ndim == 2 and X.shape[1] == n_features
        assert len(X) == len(y) > 0
        assert y.dtype == (np.float32 if task == "regression" else np.int64)
        assert np.isfinite(X).all()
    # Standardised on the training split: mean 0, std 1 (or 0 for constant columns).
    np.testing.assert_allclose(d.X_train.mean(axis=0), 0, atol=1e-4)
    std = d.X_train.std(axis=0)
    assert np.all((np.abs(std - 1) < 1e-3) | (std < 1e-6))
    if task != "regression":
        assert set(np.unique(d.y_train)) == set(range(n_classes))


def test_splits_are_deterministic_and_seeded():
    a, b, c = (load_dataset("wine", seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.X_train, c.X_train)


def test_classification_split_is_stratified():
    d = load_dataset("digits", seed=0)
    n = sum(d.sizes().values())
    assert abs(d.sizes()["val"] - 0.15 * n) < 10
    for y in (d.y_train, d.y_val, d.y_test):
        counts = np.bincount(y, minlength=10) / len(y)
        assert np.all(np.abs(counts - 0.1) < 0.02)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*digits.*mnist1d"):
        load_dataset("mnist")


def test_mnist1d_generator():
    X, y = mnist1d_arrays()
    assert X.shape == (5000, 40) and y.shape == (5000,)
    assert np.bincount(y).tolist() == [500] * 10
    assert abs(X.mean()) < 1e-9 and abs(X.std() - 1) < 1e-9
    t = mnist1d_templates()
    assert t.shape == (10, 12) and np.all(t[:, 0] == 0)
    assert mnist1d_arrays() is mnist1d_arrays()  # cached in-process
    d = load_dataset("mnist1d", seed=3)
    assert d.sizes() == {"train": 3400, "val": 600, "test": 1000}
    # The test set does not depend on the split seed.
    np.testing.assert_array_equal(d.y_test, load_dataset("mnist1d", seed=0).y_test)


def _xy(n=100, d=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, classes, n)


def test_from_arrays_infers_tasks():
    X, y = _xy()
    assert from_arrays(X, y).task == "multiclass"
    assert from_arrays(X, y % 2).task == "binary"
    assert from_arrays(X, y.astype(float)).task == "multiclass"
    assert from_arrays(X, np.linspace(0, 1, 100)).task == "regression"
    assert from_arrays(X, np.arange(100)).task == "regression"  # too many distinct values
    labels = np.array(["cat", "dog"])[y % 2]
    d = from_arrays(X, labels)
    assert d.task == "binary" and list(d.classes) == ["cat", "dog"]
    assert from_arrays(X, y % 2, task="multiclass").task == "multiclass"


def test_from_arrays_split_sizes_and_constant_columns():
    X, y = _xy(200)
    X[:, 1] = 5.0
    d = from_arrays(X, y, seed=2, name="upload-3")
    assert d.name == "upload-3"
    assert sum(d.sizes().values()) == 200
    assert 130 <= d.sizes()["train"] <= 150
    assert np.isfinite(d.X_train).all() and np.all(d.X_train[:, 1] == 0)
    np.testing.assert_allclose(d.feature_mean[1], 5.0)


@pytest.mark.parametrize(
    "X,y,match",
    [
        (np.zeros(20), np.zeros(20), "X must be 2-D"),
        (np.zeros((20, 2)), np.zeros((20, 2)), "y must be 1-D"),
        (np.zeros((20, 2)), np.zeros(19), "different numbers of rows"),
        (np.zeros((5, 2)), np.arange(5) % 2, "at least 10 rows"),
        (np.zeros((20, 0)), np.arange(20) % 2, "no feature columns"),
        (np.full((20, 2), np.nan), np.arange(20) % 2, "NaN"),
        (np.zeros((20, 2)), np.ones(20, dtype=int), "at least 2 classes"),
    ],
)
def test_from_arrays_rejects_bad_input(X, y, match):
    with pytest.raises(ValueError, match=match):
        from_arrays(X, y)


def test_from_arrays_rejects_bad_task():
    X, y = _xy()
    with pytest.raises(ValueError, match="task"):
        from_arrays(X, y, task="ranking")
    with pytest.raises(ValueError, match="exactly 2 classes"):
        from_arrays(X, y, task="binary")
    with pytest.raises(ValueError, match="numeric"):
        from_arrays(X, np.array(["a"] * 100, dtype=object), task="regression")


# A new process loads a dataset, tells whether it imported scikit-learn and how often it
# generated MNIST-1D, and saves what it loaded.
_LOAD_IN_A_NEW_PROCESS = """
import sys
import numpy as np
import trainer.datasets as d
made = []
generate = d._generate_mnist1d
d._generate_mnist1d = lambda seed: made.append(seed) or generate(seed)
data = d.load_dataset(sys.argv[1])
np.savez(sys.argv[2], X=data.X_train, y=data.y_train, X_test=data.X_test)
print("sklearn" in sys.modules, len(made))
"""


def _load_in_a_new_process(name, out, cache):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HPTUNE_CACHE_DIR": str(cache)}
    run = subprocess.run([sys.executable, "-c", _LOAD_IN_A_NEW_PROCESS, name, str(out)],
                         env=env, capture_output=True, text=True, check=True)
    imported_sklearn, generated = run.stdout.split()
    with np.load(out) as saved:
        return imported_sklearn == "True", int(generated), {k: saved[k] for k in saved.files}


@pytest.mark.parametrize("name, cold_work", [("digits", (True, 0)), ("mnist1d", (False, 1))])
def test_disk_cache_spares_new_processes_the_work(tmp_path, name, cold_work):
    cache = tmp_path / "cache"
    *work, cold = _load_in_a_new_process(name, tmp_path / "cold.npz", cache)
    assert tuple(work) == cold_work
    assert len(list(cache.glob(f"{name}-*.npz"))) == 1
    *work, warm = _load_in_a_new_process(name, tmp_path / "warm.npz", cache)
    assert tuple(work) == (False, 0)  # neither scikit-learn nor the generator ran
    for key in cold:
        assert np.array_equal(cold[key], warm[key]), key
    # Bit for bit what the generator or scikit-learn gives without a cache.
    *work, uncached = _load_in_a_new_process(name, tmp_path / "off.npz", "")
    assert tuple(work) == cold_work and not list(tmp_path.glob("*.tmp"))
    for key in cold:
        assert np.array_equal(cold[key], uncached[key]), key


def test_a_damaged_cache_file_is_made_again(tmp_path):
    cache = tmp_path / "cache"
    *_, first = _load_in_a_new_process("mnist1d", tmp_path / "a.npz", cache)
    (stored,) = cache.glob("mnist1d-*.npz")
    stored.write_bytes(stored.read_bytes()[:1000])  # cut short, as by a full disk
    _, generated, again = _load_in_a_new_process("mnist1d", tmp_path / "b.npz", cache)
    assert generated == 1 and np.array_equal(first["X"], again["X"])
    _, generated, _ = _load_in_a_new_process("mnist1d", tmp_path / "c.npz", cache)
    assert generated == 0  # repaired
