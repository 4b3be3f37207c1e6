"""A trained MLP as an ONNX model that takes RAW feature rows, and a runner for such models.

The graph standardises its input with the training split's statistics ((x - mean) / std,
as trainer.datasets does), runs the network in inference mode (no dropout, no input noise)
and ends in the task's head:

- "multiclass": `predictions` = argmax of the logits; `probabilities` = softmax, [N, k].
- "binary": the trainer's single sigmoid unit; `predictions` = logit > 0 (as MLP.predict)
  and `probabilities` = [sigmoid(-z), sigmoid(z)], two columns like any classifier.
- "regression": `predictions` [N] in the target's units (the trainer does not scale
  targets; target_mean/target_std undo a scaling the caller applied, if any).

Classification predictions are int64 class ids, or the dataset's own labels (Dataset.classes)
when those are not 0..k-1: int64 for integer labels, float64 or strings otherwise.
The graph is float32 (float64 networks are cast) at opset 17, so any recent runtime loads it;
gelu is the trainer's tanh approximation, written out in elementary ops.

`onnx` and `onnxruntime` are imported inside the functions: the trainer itself needs only
numpy.
"""

from __future__ import annotations

import json
import math
from importlib import metadata
from typing import Any

import numpy as np

from trainer.activations import _GELU_A, _GELU_C, LEAKY_SLOPE  # the very constants it trains with
from trainer.network import MLP
from trainer.vocab import Activation, Task

OPSET = 17
INPUT_NAME = "features"
BATCH_DIM = "N"  # the input's first dimension: any number of rows
_F32_MAX = float(np.finfo(np.float32).max)  # larger raw values would become inf in the graph


class _Graph:
    """Nodes and constants of the graph being built, with unique value names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0
        self._scalars: dict[str, float] = {}

    def scalar(self, name: str, value: float) -> str:
        """A float32 scalar constant, added on first use."""
        if name not in self._scalars:
            self._scalars[name] = value
            self.const(name, np.float32(value))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        from onnx import helper

        self._count += 1
        out = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _gelu(g: _Graph, z: str) -> str:
    """0.5 z (1 + tanh(c (z + a z^3))): trainer.activations' tanh approximation, exactly."""
    z3 = g.op("Mul", [g.op("Mul", [z, z]), z])
    inner = g.op("Add", [z, g.op("Mul", [z3, g.scalar("gelu_a", _GELU_A)])])
    t = g.op("Tanh", [g.op("Mul", [inner, g.scalar("gelu_c", _GELU_C)])])
    half_z = g.op("Mul", [z, g.scalar("half", 0.5)])
    return g.op("Mul", [half_z, g.op("Add", [t, g.scalar("one", 1.0)])])


# One builder per trainer activation (tests check that every Activation has one).
ACTIVATION_OPS = {
    Activation.RELU: lambda g, z: g.op("Relu", [z]),
    Activation.LEAKY_RELU: lambda g, z: g.op("LeakyRelu", [z], alpha=LEAKY_SLOPE),
    Activation.TANH: lambda g, z: g.op("Tanh", [z]),
    Activation.SIGMOID: lambda g, z: g.op("Sigmoid", [z]),
    Activation.GELU: _gelu,
}


def to_onnx(
    network: MLP,
    *,
    feature_mean,
    feature_std,
    task: str,
    class_labels=None,
    target_mean: float | None = None,
    target_std: float | None = None,
) -> bytes:
    """The serialized ONNX model of `network` for raw rows (see the module docstring).

    feature_mean/feature_std are the Dataset's; class_labels its `classes`.
    """
    import onnx
    from onnx import TensorProto, helper

    task = _checked_task(network, task)
    n_features = network.sizes[0]
    mean, std = _checked_scaling(feature_mean, feature_std, n_features)
    labels = _checked_labels(network, task, class_labels)
    _check_target_scaling(task, target_mean, target_std)
    doc = _doc(network, task, labels)
    g = _Graph()
    g.const("feature_mean", mean)
    g.const("feature_std", std)
    h = g.op("Div", [g.op("Sub", [INPUT_NAME, "feature_mean"]), "feature_std"], "scaled")
    z = _hidden_and_output(g, network, h)
    outputs = _head(g, task, z, labels, target_mean, target_std)
    graph = helper.make_graph(
        g.nodes,
        "hptune_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, n_features])],
        [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in outputs],
        g.initializers,
        doc_string=doc,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="hptune",
        producer_version=_version(),
        doc_string=doc,
    )
    model.ir_version = min(model.ir_version, 8)  # opset 17's IR: older runtimes load it
    helper.set_model_props(model, _metadata(network, task, labels))
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _hidden_and_output(g: _Graph, network: MLP, h: str) -> str:
    """Hidden layers (activation after each) and the output layer; returns the output's name."""
    activate = ACTIVATION_OPS.get(network.activation)
    if activate is None:
        raise ValueError(f"no ONNX export for activation {network.activation!r}")
    last = len(network.weights) - 1
    for i, (w, b) in enumerate(zip(network.weights, network.biases, strict=True)):
        w_name = g.const(f"layer{i}_weight", np.asarray(w, np.float32))
        b_name = g.const(f"layer{i}_bias", np.asarray(b, np.float32))
        z = g.op("Add", [g.op("MatMul", [h, w_name]), b_name], "logits" if i == last else None)
        h = z if i == last else activate(g, z)
    return h


def _head(g: _Graph, task: Task, z: str, labels, target_mean, target_std):
    """Nodes from the output layer `z` [N, k] to the outputs; returns (name, type, shape)s."""
    from onnx import TensorProto

    if task == Task.REGRESSION:
        y = g.op("Reshape", [z, g.const("flat_shape", np.array([-1], np.int64))])
        if target_std is not None:
            y = g.op("Mul", [y, g.scalar("target_std", target_std)])
        if target_mean is not None:
            y = g.op("Add", [y, g.scalar("target_mean", target_mean)])
        g.op("Identity", [y], "predictions")
        return [("predictions", TensorProto.FLOAT, [BATCH_DIM])]
    if task == Task.MULTICLASS:
        g.op("Softmax", [z], "probabilities", axis=-1)
        ids = g.op("ArgMax", [z], axis=1, keepdims=0, select_last_index=0)
    else:
        # The trainer's binary network has one sigmoid unit (z is [N, 1]); sigmoid(-z) keeps
        # P(class 0) accurate where 1 - sigmoid(z) would round to 0.
        g.op("Concat", [g.op("Sigmoid", [g.op("Neg", [z])]), g.op("Sigmoid", [z])],
             "probabilities", axis=1)
        flat = g.op("Reshape", [z, g.const("flat_shape", np.array([-1], np.int64))])
        positive = g.op("Greater", [flat, g.scalar("zero", 0.0)])
        ids = g.op("Cast", [positive], to=TensorProto.INT64)
    n_classes = len(labels)
    if labels_are_ids(labels):
        g.op("Identity", [ids], "predictions")
        label_type = TensorProto.INT64
    else:
        g.const("class_labels", labels)
        g.op("Gather", ["class_labels", ids], "predictions", axis=0)
        label_type = _tensor_type(labels)
    return [
        ("predictions", label_type, [BATCH_DIM]),
        ("probabilities", TensorProto.FLOAT, [BATCH_DIM, n_classes]),
    ]


def _checked_task(network: MLP, task: str) -> Task:
    if task not in tuple(Task):
        raise ValueError(f"task must be one of {', '.join(Task)}; got {task!r}")
    if task != network.task:
        raise ValueError(f"task {task!r} does not match the network's task {network.task!r}")
    return Task(task)


def _checked_scaling(feature_mean, feature_std, n_features: int):
    """(mean, std) as float32 vectors of length n_features, or ValueError."""
    mean = np.asarray(feature_mean, np.float64).reshape(-1)
    std = np.asarray(feature_std, np.float64).reshape(-1)
    for name, v in (("feature_mean", mean), ("feature_std", std)):
        if v.shape != (n_features,):
            raise ValueError(f"{name} must have {n_features} values (one per feature), "
                             f"got {v.size}")
        if not np.isfinite(v).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if (std <= 0).any():
        raise ValueError("feature_std must be positive")
    return mean.astype(np.float32), std.astype(np.float32)


def _check_target_scaling(task: Task, target_mean, target_std) -> None:
    if task != Task.REGRESSION and (target_mean is not None or target_std is not None):
        raise ValueError("target_mean/target_std are for regression models")
    for name, v in (("target_mean", target_mean), ("target_std", target_std)):
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    if target_std is not None and target_std == 0:
        raise ValueError("target_std must not be 0")


def _checked_labels(network: MLP, task: Task, class_labels) -> np.ndarray | None:
    """The class labels as an array of n_classes values (0..k-1 when None); None for regression."""
    if task == Task.REGRESSION:
        if class_labels is not None:
            raise ValueError("class_labels is for classification; this is a regression model")
        return None
    n_classes = network.sizes[-1] if task == Task.MULTICLASS else 2
    if class_labels is None:
        return np.arange(n_classes, dtype=np.int64)
    labels = label_array(class_labels)
    if len(labels) != n_classes:
        raise ValueError(f"class_labels must have {n_classes} values, got {len(labels)}")
    return labels


def label_array(class_labels) -> np.ndarray:
    """Class labels as an exported graph holds them: int64 (whole numbers), float64 or
    strings."""
    labels = np.asarray(class_labels).reshape(-1)
    if labels.dtype.kind in "biu":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        if np.isfinite(labels).all() and (labels == np.round(labels)).all():
            return labels.astype(np.int64)
        return labels.astype(np.float64)
    return np.array([str(v) for v in labels], dtype=object)


def labels_are_ids(labels: np.ndarray) -> bool:
    """Whether the labels are the class ids 0..k-1 themselves (no Gather needed)."""
    return labels.dtype == np.int64 and bool((labels == np.arange(len(labels))).all())




def _tensor_type(labels: np.ndarray) -> int:
    from onnx import TensorProto

    if labels.dtype == np.int64:
        return TensorProto.INT64
    return TensorProto.DOUBLE if labels.dtype == np.float64 else TensorProto.STRING


def _version() -> str:
    try:
        return metadata.version("hptune")
    except metadata.PackageNotFoundError:
        return "unknown"


def _metadata(network: MLP, task: Task, labels: np.ndarray | None) -> dict[str, str]:
    props = {
        "task": str(task),
        "n_features": str(network.sizes[0]),
        "hidden_layers": json.dumps(list(network.sizes[1:-1])),
        "activation": str(network.activation),
        "input_scaling": "standardised in graph: (x - feature_mean) / feature_std",
        "hptune_version": _version(),
    }
    if labels is not None:
        props["n_classes"] = str(len(labels))
        props["class_labels"] = json.dumps([v.item() if hasattr(v, "item") else v
                                            for v in labels])
    return props


def _doc(network: MLP, task: Task, labels: np.ndarray | None) -> str:
    layers = "-".join(str(s) for s in network.sizes)
    head = {
        Task.MULTICLASS: "predictions [N] (class), probabilities [N, k] (softmax)",
        Task.BINARY: "predictions [N] (class), probabilities [N, 2] (sigmoid unit)",
        Task.REGRESSION: "predictions [N] float32 in the target's units",
    }[task]
    return (f"hptune {task} MLP {layers}, {network.activation} hidden activations. "
            f"Input '{INPUT_NAME}': raw float32 feature rows [N, {network.sizes[0]}], "
            f"standardised inside the graph. Outputs: {head}.")


# ---------------------------------------------------------------------- running


class OnnxModel:
    """An exported model loaded once into an onnxruntime session (CPU, one thread).

    Reuse one per model: `predict` is cheap and the session is safe to share across
    threads.
    """

    def __init__(self, model_bytes: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
        (inp,) = self._session.get_inputs()
        self.input_name: str = inp.name
        self.n_features = int(inp.shape[1])
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self.task: str | None = self.metadata.get("task")

    def predict(self, rows) -> tuple[np.ndarray, np.ndarray | None]:
        """(predictions, probabilities or None) for raw feature rows (rows, n_features)."""
        X = checked_rows(rows, self.n_features)
        outs = dict(zip(self.output_names, self._session.run(None, {self.input_name: X}),
                        strict=True))
        return outs["predictions"], outs.get("probabilities")


def checked_rows(rows, n_features: int) -> np.ndarray:
    """rows as a C-ordered float32 (rows, n_features) array, or ValueError saying why not."""
    try:
        X = np.asarray(rows)
    except ValueError:  # ragged nested lists
        raise ValueError("rows must be a 2-D array: every row the same length") from None
    if X.dtype.kind not in "biuf":
        raise ValueError(f"rows must be numeric, got {X.dtype}")
    if X.ndim != 2:
        raise ValueError(f"rows must be 2-D (rows, features), got shape {X.shape}")
    if X.shape[1] != n_features:
        raise ValueError(f"rows have {X.shape[1]} features; the model expects {n_features}")
    with np.errstate(invalid="ignore"):  # NaN compares False: caught by isfinite
        bad = ~np.isfinite(X).all(axis=1) | (np.abs(X) > _F32_MAX).any(axis=1)
    if bad.any():
        raise ValueError(f"row {int(np.argmax(bad))} has a NaN or infinite value "
                         f"(or one beyond float32's range, ±{_F32_MAX:.3g})")
    return np.ascontiguousarray(X, dtype=np.float32)


def predict_onnx(model_bytes: bytes, rows) -> tuple[np.ndarray, np.ndarray | None]:
    """One-off (predictions, probabilities or None); keep an OnnxModel to predict repeatedly."""
    return OnnxModel(model_bytes).predict(rows)
