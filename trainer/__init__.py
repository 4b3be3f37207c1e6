"""hptune's NumPy neural-network trainer: datasets, a configurable MLP and its training loop.

Imports only numpy and the standard library (scikit-learn is read lazily, only to load its
bundled datasets).
"""

from trainer.config import TrainConfig
from trainer.datasets import DATASETS, Dataset, from_arrays, load_dataset
from trainer.fit import STOP_REASONS, TrainResult, fit
from trainer.network import MLP

__all__ = [
    "DATASETS",
    "MLP",
    "STOP_REASONS",
    "Dataset",
    "TrainConfig",
    "TrainResult",
    "fit",
    "from_arrays",
    "load_dataset",
]
