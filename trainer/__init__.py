"""hptune's NumPy neural-network trainer: datasets, a configurable MLP and its training loop.

Imports only numpy and the standard library (scikit-learn is imported lazily, and only to
read the datasets bundled with it).

    from trainer import TrainConfig, fit, load_dataset

    data = load_dataset("mnist1d", seed=0)  # or digits, breast_cancer, wine, iris, regression
    config = TrainConfig(hidden_layers=(256, 256), optimizer="adamw", learning_rate=1e-3,
                         batch_size=128, dropout=0.2, weight_decay=1e-4, max_epochs=20)
    result = fit(config, data, on_epoch=lambda epoch, metrics: False)  # True stops: "pruned"
    result.history, result.best_epoch, result.stop_reason, result.test_metrics

Modules: config (TrainConfig), datasets (Dataset, load_dataset, from_arrays; mnist1d
generates MNIST-1D), network (MLP: forward/backward; its activations, losses and workspace
buffers in the modules of those names), optimizers (step(params, grads) update rules),
schedules (pure lr(step) functions), fit (the loop, TrainResult), checkpoint (Checkpoint:
a fit's whole state after an epoch, to_bytes/from_bytes as .npz with a JSON header, never
pickle; fit(..., checkpoint_when=, on_checkpoint=) takes them, fit(..., resume=) goes on
from one bit-identically), vocab (the names above as StrEnums: Task, Activation, Optimizer,
Schedule, Metric and its Direction, StopReason),
onnx_export (to_onnx: a trained MLP as ONNX that takes raw rows, the input standardisation
inside the graph; OnnxModel runs one under onnxruntime; onnx and onnxruntime are imported
only when these are called).

    model = OnnxModel(to_onnx(result.network, feature_mean=data.feature_mean,
                              feature_std=data.feature_std, task=data.task,
                              class_labels=data.classes))
    predictions, probabilities = model.predict(raw_rows)  # probabilities None for regression

The trainer does not limit BLAS threads; callers that run several trainings at once (the
service's workers) pin them, e.g. with threadpoolctl.
"""

from trainer.checkpoint import Checkpoint
from trainer.config import TrainConfig
from trainer.datasets import DATASETS, Dataset, from_arrays, load_dataset
from trainer.fit import TrainResult, fit
from trainer.network import MLP
from trainer.onnx_export import OnnxModel, to_onnx
from trainer.vocab import (
    STOP_REASONS,
    Activation,
    Direction,
    Metric,
    Optimizer,
    Schedule,
    StopReason,
    Task,
)

__all__ = [
    "DATASETS",
    "MLP",
    "STOP_REASONS",
    "Activation",
    "Checkpoint",
    "Dataset",
    "Direction",
    "Metric",
    "OnnxModel",
    "Optimizer",
    "Schedule",
    "StopReason",
    "Task",
    "TrainConfig",
    "TrainResult",
    "fit",
    "from_arrays",
    "load_dataset",
    "to_onnx",
]
