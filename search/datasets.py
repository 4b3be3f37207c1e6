"""Datasets a job may name, cached per process because every trial of a job reads the same one."""

from __future__ import annotations

from functools import lru_cache

from trainer import DATASETS, Dataset, from_arrays, load_dataset

__all__ = ["Dataset", "bundled", "bundled_names", "from_arrays"]


def bundled_names() -> tuple[str, ...]:
    """Names of the datasets that ship with the trainer."""
    return tuple(DATASETS)


@lru_cache(maxsize=8)
def bundled(name: str, seed: int = 0) -> Dataset:
    """A bundled dataset, split and standardised for `seed`, loaded once per process."""
    return load_dataset(name, seed=seed)
