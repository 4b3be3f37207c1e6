"""ONNX export: the exported graph on RAW rows matches the trainer on standardised rows.

Every dataset kind (multiclass digits, binary breast_cancer, regression) is trained with
every hidden activation, exported, and run under onnxruntime on the test split's raw rows
(rebuilt as X_test * feature_std + feature_mean); the trainer's own forward pass on the
standardised split is the reference.
"""

import subprocess
import sys

import numpy as np
import onnx
import pytest

from trainer import (
    Activation,
    OnnxModel,
    Task,
    TrainConfig,
    fit,
    from_arrays,
    load_dataset,
    to_onnx,
)
from trainer.activations import activate
from trainer.network import MLP
from trainer.onnx_export import ACTIVATION_OPS, INPUT_NAME, predict_onnx

DATASETS = ("digits", "breast_cancer", "regression")
PROB_TOL = 1e-5  # max absolute difference of probabilities
REG_RTOL = 1e-4  # regression: relative to the scale of the predictions


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))


def _raw(data, X):
    """Raw feature rows behind standardised rows X."""
    return X.astype(np.float64) * data.feature_std + data.feature_mean


def _train(data, activation, epochs=3, hidden=(32, 16)):
    # Dropout and input noise on: the export must leave both out (inference mode).
    config = TrainConfig(hidden_layers=hidden, activation=activation, learning_rate=3e-3,
                         batch_size=32, dropout=0.2, input_noise=0.05, max_epochs=epochs, seed=1)
    return fit(config, data).network


def _export(net, data, **kw):
    return to_onnx(net, feature_mean=data.feature_mean, feature_std=data.feature_std,
                   task=data.task, class_labels=data.classes, **kw)


@pytest.fixture(scope="module")
def datasets():
    return {name: load_dataset(name, seed=0) for name in DATASETS}


@pytest.fixture(scope="module")
def trained(datasets):
    """(dataset, activation) -> (network, exported bytes), built on first use."""
    cache = {}

    def get(name, activation):
        if (name, activation) not in cache:
            net = _train(datasets[name], activation)
            cache[name, activation] = net, _export(net, datasets[name])
        return cache[name, activation]

    return get


def test_every_trainer_activation_has_an_exporter():
    assert set(ACTIVATION_OPS) == set(Activation)


@pytest.mark.parametrize("activation", list(Activation))
@pytest.mark.parametrize("name", DATASETS)
def test_export_matches_trainer_on_raw_rows(datasets, trained, name, activation):
    data = datasets[name]
    net, model_bytes = trained(name, activation)
    model = OnnxModel(model_bytes)
    assert model.n_features == data.n_features
    assert model.task == data.task
    pred, proba = model.predict(_raw(data, data.X_test))
    out = net.forward(data.X_test)  # the trainer on the standardised split
    expected = net.predict(data.X_test)
    if data.task == Task.REGRESSION:
        assert proba is None
        assert pred.shape == (len(data.X_test),) and pred.dtype == np.float32
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(pred, expected, rtol=REG_RTOL, atol=REG_RTOL * scale)
        return
    ref = _softmax(out) if data.task == Task.MULTICLASS else _sigmoid(out[:, 0])
    if data.task == Task.BINARY:
        ref = np.stack([1.0 - ref, ref], axis=1)
    assert proba.shape == (len(data.X_test), data.n_classes) and proba.dtype == np.float32
    assert np.abs(proba - ref).max() < PROB_TOL
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, data.classes[expected])


@pytest.mark.parametrize("activation", list(Activation))
def test_each_activation_is_exported_exactly(activation):
    # A 1-1-1 network whose hidden unit passes x straight in and whose output is the
    # activation's value: compares the exported op with trainer.activations pointwise.
    # (The erf GELU differs from the trainer's tanh form by up to ~5e-4; LeakyRelu with
    # another slope by far more.)
    net = MLP(1, [1], 1, task=Task.REGRESSION, activation=activation)
    net.set_weights([(np.ones((1, 1)), np.zeros(1)), (np.ones((1, 1)), np.zeros(1))])
    model = OnnxModel(to_onnx(net, feature_mean=[0.0], feature_std=[1.0], task="regression"))
    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    expected = np.empty_like(x)
    if activation == Activation.RELU:
        expected = np.maximum(x, 0)
    else:
        activate(activation, x.copy(), expected)
    pred, _ = model.predict(x[:, None])
    np.testing.assert_allclose(pred, net.predict(x[:, None]), rtol=0, atol=2e-6)
    np.testing.assert_allclose(pred, expected, rtol=0, atol=2e-6)


def test_scaling_is_inside_the_graph(datasets, trained):
    # The same network exported with the wrong statistics predicts something else: the
    # comparison above would notice a graph that ignored feature_mean/feature_std.
    data = datasets["regression"]
    net, model_bytes = trained("regression", Activation.RELU)
    raw = _raw(data, data.X_test)
    right, _ = predict_onnx(model_bytes, raw)
    wrong, _ = predict_onnx(to_onnx(net, feature_mean=np.zeros(data.n_features),
                                    feature_std=np.ones(data.n_features), task="regression"),
                            raw)
    assert np.abs(right - wrong).max() > 1e-2
    shifted, _ = predict_onnx(_export(net, data, target_mean=5.0, target_std=2.0), raw)
    np.testing.assert_allclose(shifted, 2.0 * right + 5.0, rtol=1e-6, atol=1e-5)


def test_labels_are_mapped_back():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 4)) * [1, 10, 100, 0.1] + [0, 5, -50, 1]
    names = np.array(["eel", "cat", "dog"])
    y = names[np.argmax(X[:, :3] * [1, 0.1, 0.01], axis=1)]
    data = from_arrays(X, y, seed=0)
    net = _train(data, Activation.TANH)
    pred, proba = OnnxModel(_export(net, data)).predict(_raw(data, data.X_test))
    assert list(data.classes) == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(pred, data.classes[net.predict(data.X_test)])
    assert proba.shape == (len(data.X_test), 3)

    signs = from_arrays(X, np.where(X[:, 0] > 0, 1, -1), seed=0)  # binary labels -1 / 1
    net = _train(signs, Activation.RELU)
    pred, _ = OnnxModel(_export(net, signs)).predict(_raw(signs, signs.X_test))
    assert pred.dtype == np.int64 and set(np.unique(pred)) <= {-1, 1}
    np.testing.assert_array_equal(pred, np.where(net.predict(signs.X_test) == 1, 1, -1))


def test_model_structure(datasets, trained):
    data = datasets["digits"]
    _, model_bytes = trained("digits", Activation.RELU)
    model = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    assert inp.name == INPUT_NAME
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch, width = inp.type.tensor_type.shape.dim
    assert batch.dim_param and not batch.HasField("dim_value")  # any number of rows
    assert width.dim_value == data.n_features
    assert [o.name for o in model.graph.output] == ["predictions", "probabilities"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["task"] == "multiclass" and props["n_features"] == "64"
    assert props["n_classes"] == "10" and props["hptune_version"]
    assert "raw" in model.doc_string and model.producer_name == "hptune"
    # No training-only ops in an inference graph.
    assert not {n.op_type for n in model.graph.node} & {"Dropout", "RandomNormalLike"}
    runner = OnnxModel(model_bytes)
    for n in (0, 1, 1000):
        rows = np.random.default_rng(n).standard_normal((n, data.n_features)) * 4 + 5
        pred, proba = runner.predict(rows)
        assert pred.shape == (n,) and proba.shape == (n, 10)


def test_rows_are_validated(datasets, trained):
    data = datasets["digits"]
    model = OnnxModel(trained("digits", Activation.RELU)[1])
    good = _raw(data, data.X_test[:3])
    with pytest.raises(ValueError, match=r"(?=.*\b63\b)(?=.*\b64\b)"):
        model.predict(good[:, :63])
    with pytest.raises(ValueError, match=r"(?=.*\b65\b)(?=.*\b64\b)"):
        model.predict(np.hstack([good, good[:, :1]]))
    for bad in (np.nan, np.inf, -np.inf, 1e39):
        rows = good.copy()
        rows[2, 5] = bad
        with pytest.raises(ValueError, match="row 2 has a NaN or infinite"):
            model.predict(rows)
    with pytest.raises(ValueError, match="2-D"):
        model.predict(good[0])
    with pytest.raises(ValueError, match="same length"):
        model.predict([list(good[0]), list(good[1][:10])])
    with pytest.raises(ValueError, match="numeric"):
        model.predict(np.array([["a"] * 64]))
    pred, _ = model.predict(good.tolist())  # plain lists, as a JSON body brings them
    np.testing.assert_array_equal(pred, model.predict(good.astype(np.float32))[0])


def test_export_arguments_are_validated(datasets, trained):
    data = datasets["breast_cancer"]
    net, _ = trained("breast_cancer", Activation.RELU)
    with pytest.raises(ValueError, match="does not match"):
        _export(net, load_dataset("iris"))
    with pytest.raises(ValueError, match="30 values"):
        to_onnx(net, feature_mean=data.feature_mean[:5], feature_std=data.feature_std,
                task="binary")
    with pytest.raises(ValueError, match="positive"):
        to_onnx(net, feature_mean=data.feature_mean, feature_std=data.feature_std * 0,
                task="binary")
    with pytest.raises(ValueError, match="2 values"):
        to_onnx(net, feature_mean=data.feature_mean, feature_std=data.feature_std,
                task="binary", class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="regression"):
        _export(net, data, target_std=2.0)


def test_trainer_import_stays_numpy_only():
    code = ("import sys, trainer; "
            "print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
