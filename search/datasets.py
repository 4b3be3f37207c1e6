"""Datasets a job may name, cached per process because every trial of a job reads the same one."""

from __future__ import annotations

from functools import lru_cache

from trainer import DATASETS, Dataset, Task, from_arrays, load_dataset
from trainer.datasets import DATASET_SHAPES

__all__ = ["Dataset", "bundled", "bundled_names", "bundled_task", "from_arrays"]


def bundled_names() -> tuple[str, ...]:
    """Names of the datasets that ship with the trainer."""
    return tuple(DATASETS)


def bundled_task(name: str) -> Task:
    """The task of a bundled dataset, known without loading it."""
    return DATASET_SHAPES[name][3]


@lru_cache(maxsize=8)
def bundled(name: str, seed: int = 0) -> Dataset:
    """A bundled dataset, split and standardised for `seed`, loaded once per process."""
    return load_dataset(name, seed=seed)
