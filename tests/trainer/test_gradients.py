"""Backpropagation against central finite differences, in float64."""

import itertools

import numpy as np
import pytest

from trainer.network import MLP
from trainer.optimizers import SGD

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")
TASKS = ("multiclass", "binary", "regression")
REGULARISERS = ("none", "l1", "l2", "weight_decay")
N, D, HIDDEN, K = 7, 4, (5, 3), 3


def _problem(task: str, activation: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_out = K if task == "multiclass" else 1
    net = MLP(D, HIDDEN, n_out, task=task, activation=activation, dtype="float64", rng=seed)
    # Non-zero biases so that every parameter matters, away from relu kinks at 0.
    biases = ~net.weight_mask()
    net.params[biases] = rng.normal(0, 0.3, int(biases.sum()))
    X = rng.normal(size=(N, D))
    if task == "multiclass":
        y = rng.integers(0, K, N)
    elif task == "binary":
        y = rng.integers(0, 2, N).astype(np.float64)
    else:
        y = rng.normal(size=N)
    return net, X, y


def _masks(rng, p=0.4):
    return [(rng.random((N, w)) >= p) / (1 - p) for w in HIDDEN]


def _numeric_grad(f, params, eps=1e-6):
    g = np.zeros_like(params)
    for i in range(params.size):
        old = params[i]
        params[i] = old + eps
        up = f()
        params[i] = old - eps
        down = f()
        params[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize(
    "activation,task,reg,dropout",
    list(itertools.product(ACTIVATIONS, TASKS, REGULARISERS, (False, True))),
)
def test_backprop_matches_finite_differences(activation, task, reg, dropout):
    net, X, y = _problem(task, activation)
    masks = _masks(np.random.default_rng(1)) if dropout else None
    l1 = 0.01 if reg == "l1" else 0.0
    l2 = 0.02 if reg == "l2" else 0.0
    wd = 0.05 if reg == "weight_decay" else 0.0
    is_weight = net.weight_mask()
    assert is_weight.sum() == net.n_weights == D * 5 + 5 * 3 + 3 * net.sizes[-1]

    def objective():
        # Coupled weight decay is the gradient of 0.5 * wd * sum(W**2), weights only.
        w = net.params[is_weight]
        return net.loss(X, y, masks, l1, l2) + 0.5 * wd * float(w @ w)

    numeric = _numeric_grad(objective, net.params)
    data_loss = net.loss_and_grad(X, y, masks, l1, l2)
    assert data_loss + net.penalty(l1, l2) == pytest.approx(net.loss(X, y, masks, l1, l2))
    # Let the optimizer add its coupled decay: with SGD at lr=1 the update *is* the gradient.
    before = net.params.copy()
    SGD(1.0, weight_decay=wd, decay=[net.decay_slices]).step([net.params], [net.grad])
    analytic = before - net.params
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)
    # Biases are never decayed or penalised: their gradient is the data gradient alone.
    if reg != "none":
        net.params[:] = before
        net.loss_and_grad(X, y, masks)
        np.testing.assert_allclose(
            analytic[~is_weight], net.grad[~is_weight], rtol=1e-12, atol=1e-15
        )


def test_dropout_mask_changes_the_loss_and_zeroes_units():
    net, X, y = _problem("multiclass", "relu")
    masks = [np.ones((N, w)) for w in HIDDEN]
    assert net.loss(X, y, masks) == pytest.approx(net.loss(X, y))
    masks[0][:, :] = 0.0  # drop every unit of the first hidden layer
    net.loss_and_grad(X, y, masks)
    assert np.all(net.grad_weights[0] == 0) and np.all(net.grad_biases[0] == 0)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    net, X, y = _problem("multiclass", "relu")
    net.weights[-1][...] *= 1e6
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        loss = net.loss_and_grad(X, y)
    assert np.isfinite(loss) and np.all(np.isfinite(net.grad))


@pytest.mark.parametrize("hidden", [(5,), (5, 3), (6, 4, 3), (40, 3, 2)])
@pytest.mark.parametrize("rows", [2, 7, 300])
def test_relu_dropout_fast_path_matches_general_backward(hidden, rows):
    """The training loop's ReLU path (mask scale only, deferred factors) is exact."""
    rng = np.random.default_rng(3)
    net = MLP(D, hidden, K, activation="relu", dtype="float64", rng=0)
    X = net.augment(rng.normal(size=(rows, D)))
    y = rng.integers(0, K, rows)
    p = 0.3
    scale = 1 / (1 - p)
    masks_t = [np.ascontiguousarray((rng.random((w, rows)) >= p) * scale) for w in hidden]
    # Without mask_scale, masked batches take the general backward pass (which the finite
    # difference test checks, as it does the ReLU path without masks).
    reference_loss = net.step_grad(X.T, y, masks_t, l1=0.01)
    reference = net.grad.copy()
    net.grad[:] = np.nan
    assert net.step_grad(X.T, y, masks_t, l1=0.01, mask_scale=scale) == reference_loss
    np.testing.assert_allclose(net.grad, reference, rtol=1e-12, atol=1e-15)
