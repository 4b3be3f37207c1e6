"""Datasets: bundled scikit-learn tables, offline MNIST-1D, a synthetic regression set, and
caller-supplied arrays. Every split is deterministic for a given seed and standardised with
the training split's statistics.

scikit-learn is imported lazily inside the loaders only to read its bundled files. The raw
arrays of the bundled sets and of MNIST-1D are kept in an on-disk cache (`HPTUNE_CACHE_DIR`,
default `~/.cache/hptune`; empty turns it off): a new worker process would otherwise spend
1-2 s of CPU importing scikit-learn or generating MNIST-1D before its first trial.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from trainer.mnist1d import MNIST1D_SEED, recipe_digest
from trainer.mnist1d import generate_mnist1d as _generate_mnist1d
from trainer.mnist1d import mnist1d_templates as mnist1d_templates  # re-exported
from trainer.vocab import Task

DATASETS = ("digits", "breast_cancer", "wine", "iris", "mnist1d", "regression")
# What each bundled dataset is, known without loading it: (rows, features, classes, task);
# classes is 1 for regression. tests/trainer/test_memory.py checks it against load_dataset.
DATASET_SHAPES = {
    "digits": (1797, 64, 10, Task.MULTICLASS),
    "breast_cancer": (569, 30, 2, Task.BINARY),
    "wine": (178, 13, 3, Task.MULTICLASS),
    "iris": (150, 4, 3, Task.MULTICLASS),
    "mnist1d": (5000, 40, 10, Task.MULTICLASS),
    "regression": (3000, 10, 1, Task.REGRESSION),
}
SPLIT = (0.70, 0.15, 0.15)  # train / validation / test fractions for from_arrays and sklearn sets
MIN_ROWS = 10  # fewest rows from_arrays accepts (each split needs at least one)
MAX_CLASSES_INFERRED = 50  # integer targets with more distinct values are treated as regression
MNIST1D_TEST_ROWS = 1000
MNIST1D_VAL_FRACTION = 0.15  # of the 4000 non-test rows


@dataclass(frozen=True, eq=False)
class Dataset:
    """Standardised train/validation/test arrays.

    X arrays are float32 (rows, n_features). y is int64 class ids 0..n_classes-1 for
    "multiclass" and "binary" tasks and float32 for "regression". n_classes is the number of
    classes (2 for binary, whose network has a single sigmoid output unit) and 1 for
    regression.
    """

    name: str
    task: Task
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    # Original labels of class ids 0..n_classes-1 (None for regression).
    classes: np.ndarray | None = None
    # Train-split statistics used to standardise the features (apply to new rows).
    feature_mean: np.ndarray | None = field(default=None, repr=False)
    feature_std: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_features(self) -> int:
        """Number of input columns."""
        return int(self.X_train.shape[1])

    def sizes(self) -> dict[str, int]:
        """Rows per split."""
        return {"train": len(self.X_train), "val": len(self.X_val), "test": len(self.X_test)}


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """Load a named dataset (see DATASETS) split with `seed`."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if name == "mnist1d":
        return _mnist1d(seed)
    if name == "regression":
        X, y = _regression_data()
        return from_arrays(X, y, seed=seed, name=name, task=Task.REGRESSION)
    X, y = _sklearn_data(name)
    return from_arrays(X, y, seed=seed, name=name, task=DATASET_SHAPES[name][3])


def from_arrays(
    X: np.ndarray, y: np.ndarray, seed: int = 0, name: str = "arrays", task: str | None = None
) -> Dataset:
    """Split caller-supplied (X, y) 70/15/15 (stratified for classification) and standardise.

    task None infers it: integer-valued (or non-numeric) y with at most 50 distinct values
    is classification ("binary" with 2 classes, else "multiclass"); anything else regression.
    """
    X, y = _checked_arrays(X, y)
    if task is None:
        task = _infer_task(y)
    if task not in tuple(Task):
        raise ValueError(f"task must be {', '.join(Task)} or None; got {task!r}")
    task = Task(task)
    y_out, classes, splits = _targets_and_split(y, task, np.random.default_rng(seed))
    for split, rows in zip(("train", "validation", "test"), splits, strict=True):
        if len(rows) == 0:
            raise ValueError(f"too few rows ({len(X)}) for a non-empty {split} split")
    n_classes = 1 if classes is None else len(classes)
    parts = [(X[rows], y_out[rows]) for rows in splits]
    return _standardised(name, task, parts, n_classes, classes)


def _checked_arrays(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X as float64, y as 1-D), or ValueError naming what is wrong with them."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (rows, features), got shape {X.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D (one target per row), got shape {y.shape}")
    if len(X) != len(y):
        raise ValueError(f"X and y have different numbers of rows: {len(X)} != {len(y)}")
    if X.shape[1] == 0:
        raise ValueError("X has no feature columns")
    if len(X) < MIN_ROWS:
        raise ValueError(
            f"need at least {MIN_ROWS} rows to split into train/validation/test, got {len(X)}"
        )
    try:
        X = X.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"X must be numeric: {exc}") from None
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    return X, y


def _targets_and_split(y: np.ndarray, task: Task, rng: np.random.Generator):
    """(targets as the trainer wants them, class labels or None, (train, val, test) rows)."""
    if task == Task.REGRESSION:
        try:
            y = y.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError("regression targets y must be numeric") from None
        if not np.isfinite(y).all():
            raise ValueError("y contains NaN or infinite values")
        return y.astype(np.float32), None, _random_split(len(y), rng)
    classes, ids = np.unique(y, return_inverse=True)
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError(f"classification needs at least 2 classes, y has only {classes!r}")
    if task == Task.BINARY and n_classes != 2:
        raise ValueError(f"task 'binary' needs exactly 2 classes, y has {n_classes}")
    return ids.astype(np.int64), classes, _stratified_split(ids, rng)


def _standardised(name: str, task: Task, parts, n_classes: int, classes) -> Dataset:
    """The Dataset of parts ((X, y) train, val, test), standardised by the train split."""
    (X_train, y_train), (X_val, y_val), (X_test, y_test) = parts
    mean, std = _standardiser(X_train)
    return Dataset(
        name=name,
        task=task,
        X_train=_apply(X_train, mean, std),
        y_train=y_train,
        X_val=_apply(X_val, mean, std),
        y_val=y_val,
        X_test=_apply(X_test, mean, std),
        y_test=y_test,
        n_classes=n_classes,
        classes=classes,
        feature_mean=mean.astype(np.float32),
        feature_std=std.astype(np.float32),
    )


def _infer_task(y: np.ndarray) -> Task:
    if y.dtype.kind in "biu" or y.dtype.kind in "OUS":
        integer_valued = True
    elif y.dtype.kind == "f":
        integer_valued = bool(np.isfinite(y).all() and (y == np.round(y)).all())
    else:
        integer_valued = False
    n_distinct = len(np.unique(y))
    if integer_valued and n_distinct <= MAX_CLASSES_INFERRED:
        return Task.BINARY if n_distinct == 2 else Task.MULTICLASS
    if y.dtype.kind in "OUS":
        raise ValueError(f"y has {n_distinct} distinct non-numeric labels; too many classes")
    return Task.REGRESSION


def _random_split(n: int, rng: np.random.Generator):
    perm = rng.permutation(n)
    n_val = max(1, round(SPLIT[1] * n))
    n_test = max(1, round(SPLIT[2] * n))
    n_train = n - n_val - n_test
    return (
        np.sort(perm[:n_train]),
        np.sort(perm[n_train : n_train + n_val]),
        np.sort(perm[n_train + n_val :]),
    )


def _stratified_split(ids: np.ndarray, rng: np.random.Generator):
    """Per class: shuffle, then 70/15/15 with the val/test shares rounded (train gets the rest)."""
    parts: tuple[list, list, list] = ([], [], [])
    for c in range(int(ids.max()) + 1):
        rows = np.flatnonzero(ids == c)
        rows = rows[rng.permutation(len(rows))]
        n_val = math.floor(SPLIT[1] * len(rows) + 0.5)
        n_test = math.floor(SPLIT[2] * len(rows) + 0.5)
        if len(rows) - n_val - n_test < 1:  # keep every class in the training split
            n_val = n_test = 0
        n_train = len(rows) - n_val - n_test
        parts[0].append(rows[:n_train])
        parts[1].append(rows[n_train : n_train + n_val])
        parts[2].append(rows[n_train + n_val :])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def _standardiser(X_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    # Constant columns would divide by zero: leave them centred at 0 with scale 1.
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return mean, std


def _apply(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((X - mean) / std, dtype=np.float32)


# ---------------------------------------------------------------------- bundled sets


def cache_dir() -> Path | None:
    """Where raw dataset arrays are cached: $HPTUNE_CACHE_DIR, else ~/.cache/hptune (or under
    $XDG_CACHE_HOME); None when HPTUNE_CACHE_DIR is set but empty."""
    configured = os.environ.get("HPTUNE_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured else None
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no home directory to be found: no cache
            return None
    return Path(base) / "hptune"


def _disk_cached(key: str, make: Callable[[], tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) from the cache file for `key`, else made by `make` and stored there.

    The file is written under a temporary name and renamed, so processes starting together
    never read half a file; an unreadable file is made again. `key` must change whenever the
    arrays would (it carries the generator's version).
    """
    folder = cache_dir()
    if folder is None:
        return make()
    path = folder / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            return stored["X"], stored["y"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # absent or damaged: make it again
    X, y = make()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.savez(fh, X=X, y=y)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only home: no cache, same arrays
    return X, y


@functools.cache
def _sklearn_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    def read() -> tuple[np.ndarray, np.ndarray]:
        import sklearn.datasets  # lazy: only to read the files bundled with scikit-learn

        bunch = getattr(sklearn.datasets, f"load_{name}")()
        return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)

    return _disk_cached(f"{name}-scikit-learn-{metadata.version('scikit-learn')}", read)


@functools.cache
def _regression_data(n: int = 3000, n_features: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A fixed smooth nonlinear function of 10 Gaussian features plus noise (R^2 ceiling ~0.96)."""
    rng = np.random.default_rng(20240601)
    X = rng.standard_normal((n, n_features))
    f = (
        1.5 * np.sin(X[:, 0])
        + X[:, 1] * X[:, 2]
        + 0.5 * X[:, 3] ** 2
        + np.tanh(X[:, 4] + X[:, 5])
        + 0.8 * X[:, 6]
        - 0.6 * X[:, 7]
        + 0.3 * np.abs(X[:, 8])
    )
    f = (f - f.mean()) / f.std()
    y = f + 0.2 * rng.standard_normal(n)
    return X, y


# ---------------------------------------------------------------------- MNIST-1D


@functools.cache
def mnist1d_arrays(seed: int = MNIST1D_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST-1D samples (40 points each) and labels; cached per process and on disk."""
    return _disk_cached(f"mnist1d-{recipe_digest(seed)}", lambda: _generate_mnist1d(seed))


def _mnist1d(seed: int) -> Dataset:
    """4000 rows split into train/validation by `seed` (stratified), fixed 1000-row test set."""
    X, y = mnist1d_arrays()
    n_test = MNIST1D_TEST_ROWS
    X_rest, y_rest, X_test, y_test = X[:-n_test], y[:-n_test], X[-n_test:], y[-n_test:]
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for c in range(10):
        rows = np.flatnonzero(y_rest == c)
        rows = rows[rng.permutation(len(rows))]
        n_val = round(MNIST1D_VAL_FRACTION * len(rows))
        val_parts.append(rows[:n_val])
        train_parts.append(rows[n_val:])
    train = np.sort(np.concatenate(train_parts))
    val = np.sort(np.concatenate(val_parts))
    parts = [(X_rest[train], y_rest[train]), (X_rest[val], y_rest[val]), (X_test, y_test)]
    return _standardised("mnist1d", Task.MULTICLASS, parts, 10, np.arange(10))
