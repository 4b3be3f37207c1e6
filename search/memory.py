"""The largest trial a job spec allows, and how much memory it takes (before any trial runs)."""

from __future__ import annotations

from itertools import product

from search.spec import JobSpec
from search.spec_dims import Fixed
from trainer.datasets import DATASET_SHAPES
from trainer.memory import MemoryEstimate, estimate_trial_memory, megabytes
from trainer.network import output_units

__all__ = ["MemoryEstimate", "bundled_shape", "largest_batch_size", "largest_hidden_layers",
           "largest_trial_memory", "megabytes", "memory_field", "output_units"]


def bundled_shape(name: str) -> tuple[int, int, int]:
    """(rows, features, output units) of a bundled dataset, without loading it."""
    n_rows, n_features, n_classes, task = DATASET_SHAPES[name]
    return n_rows, n_features, output_units(task, n_classes)


def largest_hidden_layers(spec: JobSpec) -> tuple[int, ...]:
    """The widest and deepest hidden layers a trial of the job may have."""
    space = spec.search_space
    if space.n_layers and space.layer_width:
        return (max(space.layer_width.choices),) * space.n_layers.high
    return tuple(spec.model.hidden_layers)


def largest_batch_size(spec: JobSpec) -> int:
    """The largest batch size a trial of the job may draw."""
    dim = spec.search_space.batch_size
    return int(dim.value) if isinstance(dim, Fixed) else max(dim.choices)


def largest_trial_memory(spec: JobSpec, n_rows: int, n_features: int, n_outputs: int
                         ) -> MemoryEstimate:
    """The peak memory of the job's most demanding trial on a dataset of this shape: the
    largest network and batch, with the optimizer and activation that take the most."""
    space = spec.search_space
    optimizers = space.optimizer.choices if space.optimizer else [spec.model.optimizer]
    activations = space.activation.choices if space.activation else [spec.model.activation]
    drop = space.dropout
    dropout = (drop.value if isinstance(drop, Fixed) else drop.high) > 0
    hidden = largest_hidden_layers(spec)
    batch = largest_batch_size(spec)
    return max((estimate_trial_memory(n_features, n_outputs, n_rows, hidden, batch,
                                      optimizer, activation, dropout)
                for optimizer, activation in product(optimizers, activations)),
               key=lambda e: e.total)


def memory_field(spec: JobSpec, estimate: MemoryEstimate) -> str:
    """The spec field to change to bring the estimate down: what drives its largest part."""
    part = estimate.largest_part()
    if part in ("dataset", "loading"):
        return "dataset"
    if part == "activations":
        return "search_space.batch_size"
    searched = spec.search_space.n_layers is not None
    return "search_space.layer_width" if searched else "model.hidden_layers"
