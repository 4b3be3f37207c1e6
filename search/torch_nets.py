"""The networks of the PyTorch objectives (search.objective_torch) and their ONNX export.

Every function takes the `torch` module from its caller: nothing here imports PyTorch at
import time, so `import search` never needs it.

Networks take standardised feature rows (Dataset.X_*), like the NumPy trainer's:

- `mlp`: Linear -> activation -> Dropout per hidden layer, then a Linear head.
- `cnn`: rows of side*side pixels seen as one-channel images: two 3x3 convolutions (16 and 32
  channels, ReLU), a 2x2 max-pool, then Dropout -> Linear(64) -> ReLU -> Dropout -> head.

The head has n_classes units (2 for binary: softmax over two logits) or one for regression.

`to_onnx` exports a trained network for raw rows, as trainer.onnx_export does for the NumPy
MLP, so the service's GET /model and POST /predict (trainer.OnnxModel) serve it unchanged:
input `features` [N, n_features] float32, standardised inside the graph as its first nodes;
outputs `predictions` [N] (class ids, or the dataset's own labels) and, for classification,
`probabilities` [N, k] (softmax). It uses PyTorch's TorchScript exporter (dynamo=False:
it needs no onnxscript) at opset 17.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from importlib import metadata
from typing import Any

import numpy as np

from trainer import Dataset, Task
from trainer.activations import LEAKY_SLOPE
from trainer.onnx_export import BATCH_DIM, INPUT_NAME, OPSET, label_array, labels_are_ids
from trainer.vocab import Activation

CNN_CHANNELS = (16, 32)
CNN_DENSE = 64
MIN_IMAGE_SIDE = 4  # a "square image" of 2x2 or 3x3 pixels is a table: use torch_mlp


def output_units(data: Dataset) -> int:
    return 1 if data.task == Task.REGRESSION else int(data.n_classes)


def image_side(n_features: int) -> int | None:
    """The side s of square images with n_features = s*s pixels (s >= 4), or None."""
    side = math.isqrt(n_features)
    return side if side * side == n_features and side >= MIN_IMAGE_SIDE else None


def _activation(nn: Any, name: str) -> Any:
    return {
        Activation.RELU: nn.ReLU,
        Activation.LEAKY_RELU: lambda: nn.LeakyReLU(LEAKY_SLOPE),
        Activation.TANH: nn.Tanh,
        Activation.SIGMOID: nn.Sigmoid,
        Activation.GELU: lambda: nn.GELU(approximate="tanh"),
    }[Activation(name)]()


def mlp(torch: Any, n_in: int, n_out: int, hidden: tuple[int, ...], activation: str,
        dropout: float) -> Any:
    nn = torch.nn
    layers: list[Any] = []
    for width in hidden:
        layers += [nn.Linear(n_in, width), _activation(nn, activation), nn.Dropout(dropout)]
        n_in = width
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def cnn(torch: Any, side: int, n_out: int, dropout: float) -> Any:
    nn = torch.nn
    c1, c2 = CNN_CHANNELS
    pooled = side // 2
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(c2 * pooled * pooled, CNN_DENSE), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(CNN_DENSE, n_out),
    )


def _exportable(torch: Any, net: Any, data: Dataset) -> Any:
    """`net` behind input standardisation, ending in the task's outputs."""

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("feature_mean", torch.as_tensor(data.feature_mean,
                                                                 dtype=torch.float32))
            self.register_buffer("feature_std", torch.as_tensor(data.feature_std,
                                                                dtype=torch.float32))

        def forward(self, x):
            z = self.net((x - self.feature_mean) / self.feature_std)
            if data.task == Task.REGRESSION:
                return z.reshape(-1)
            return torch.argmax(z, dim=1), torch.softmax(z, dim=-1)

    return Exported().eval()


def to_onnx(torch: Any, net: Any, data: Dataset, objective: str) -> bytes:
    """The serialized ONNX model of trained `net` for raw rows of `data`'s features."""
    import onnx

    if data.feature_mean is None or data.feature_std is None:
        raise ValueError("the dataset has no feature_mean/feature_std to put in the graph")
    net = net.to("cpu").eval()
    regression = data.task == Task.REGRESSION
    outputs = ["predictions"] if regression else ["predictions", "probabilities"]
    buf = io.BytesIO()
    example = torch.zeros(2, data.n_features, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(_exportable(torch, net, data), (example,), buf, dynamo=False,
                          input_names=[INPUT_NAME], output_names=outputs,
                          opset_version=OPSET,
                          dynamic_axes={name: {0: BATCH_DIM} for name in [INPUT_NAME,
                                                                          *outputs]})
    model = onnx.load_from_string(buf.getvalue())
    labels = None if regression else _labels(data)
    if labels is not None and not labels_are_ids(labels):
        _gather_labels(model, labels)
    model.ir_version = min(model.ir_version, 8)
    model.producer_name = "hptune"
    onnx.helper.set_model_props(model, _metadata(data, objective, labels))
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _labels(data: Dataset) -> np.ndarray:
    """The class labels as the NumPy exporter writes them (trainer.onnx_export.label_array)."""
    if data.classes is None:
        return np.arange(data.n_classes, dtype=np.int64)
    return label_array(data.classes)


def _gather_labels(model: Any, labels: np.ndarray) -> None:
    """Turn the class-id output `predictions` into the dataset's labels (a Gather)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    for node in graph.node:
        node.output[:] = ["class_ids" if o == "predictions" else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(labels, "class_labels"))
    graph.node.append(helper.make_node("Gather", ["class_labels", "class_ids"],
                                       ["predictions"], axis=0))
    elem = (TensorProto.INT64 if labels.dtype == np.int64 else
            TensorProto.DOUBLE if labels.dtype == np.float64 else TensorProto.STRING)
    out = next(o for o in graph.output if o.name == "predictions")
    out.type.tensor_type.elem_type = elem


def _metadata(data: Dataset, objective: str, labels: np.ndarray | None) -> dict[str, str]:
    try:
        version = metadata.version("hptune")
    except metadata.PackageNotFoundError:
        version = "unknown"
    props = {
        "task": str(data.task),
        "n_features": str(data.n_features),
        "objective": objective,
        "input_scaling": "standardised in graph: (x - feature_mean) / feature_std",
        "hptune_version": version,
    }
    if labels is not None:
        props["n_classes"] = str(len(labels))
        props["class_labels"] = json.dumps([v.item() if hasattr(v, "item") else v
                                            for v in labels])
    return props
