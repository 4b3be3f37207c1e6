"""Weight initialisation (He / Xavier / auto) and Gaussian input-noise augmentation."""

import math

import numpy as np
import pytest

from trainer import MLP, TrainConfig, fit
from trainer.fit import build_network, make_rngs

# A wide first layer (fan_in 1000, fan_out 3000) makes He and Xavier easy to tell apart
# (std 0.0447 vs 0.0224) and the empirical std exact to ~0.05%; the output layer
# (3000 x 10, 30k draws) still pins its std to ~0.4%.
N_IN, WIDTH, N_OUT = 1000, 3000, 10


def _he(fan_in, fan_out):
    return math.sqrt(2.0 / fan_in)


def _xavier(fan_in, fan_out):  # Glorot & Bengio (2010), normal variant
    return math.sqrt(2.0 / (fan_in + fan_out))


def _check_layers(net, formula):
    assert len(net.weights) == 2
    for w, b in zip(net.weights, net.biases, strict=True):
        fan_in, fan_out = w.shape
        values = w.astype(np.float64).ravel()
        expected = formula(fan_in, fan_out)
        assert values.std() == pytest.approx(expected, rel=0.02), (w.shape, values.std())
        assert abs(values.mean()) < 5 * expected / math.sqrt(values.size)
        # Normal, not uniform: ~68.3% of draws within one std (uniform would give 57.7%).
        assert np.mean(np.abs(values) < expected) == pytest.approx(0.6827, abs=0.01)
        np.testing.assert_array_equal(b, 0.0)


@pytest.mark.parametrize(
    "init,activation,formula",
    [
        ("he", "relu", _he),
        ("he", "tanh", _he),  # an explicit choice overrides the activation's default
        ("xavier", "relu", _xavier),
        ("xavier", "sigmoid", _xavier),
        ("auto", "relu", _he),
        ("auto", "leaky_relu", _he),
        ("auto", "gelu", _he),
        ("auto", "tanh", _xavier),
        ("auto", "sigmoid", _xavier),
    ],
)
def test_init_std_matches_textbook_formula(init, activation, formula):
    net = MLP(N_IN, (WIDTH,), N_OUT, activation=activation, init=init, rng=0)
    _check_layers(net, formula)


def test_initialize_redraws_weights_and_zeroes_biases():
    net = MLP(N_IN, (WIDTH,), N_OUT, init="he", rng=0)
    net.params[...] = 7.0  # biases too
    net.initialize("xavier", rng=1)
    _check_layers(net, _xavier)
    with pytest.raises(ValueError, match="init"):
        net.initialize("orthogonal")


def test_init_is_seeded():
    a = MLP(20, (30,), 3, rng=4).params
    b = MLP(20, (30,), 3, rng=np.random.default_rng(4)).params
    c = MLP(20, (30,), 3, rng=5).params
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("init,formula", [("auto", _he), ("xavier", _xavier)])
def test_config_init_reaches_the_network(init, formula):
    from trainer import from_arrays

    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, N_IN)).astype(np.float32)
    data = from_arrays(X, np.arange(20) % 2)
    cfg = TrainConfig(hidden_layers=(WIDTH,), activation="relu", init=init)
    net = build_network(cfg, data)
    assert [w.shape for w in net.weights] == [(N_IN, WIDTH), (WIDTH, 1)]
    w = net.weights[0].astype(np.float64)
    assert w.std() == pytest.approx(formula(N_IN, WIDTH), rel=0.02)
    np.testing.assert_array_equal(net.biases[0], 0.0)


# ---------------------------------------------------------------------- input noise


def _noisy_config(**overrides):
    return TrainConfig(
        **{
            "hidden_layers": (32,),
            "optimizer": "adam",
            "learning_rate": 3e-3,
            "batch_size": 64,
            "max_epochs": 3,
            "input_noise": 0.5,
            "restore_best": False,
            "seed": 3,
            **overrides,
        }
    )


def test_validation_and_test_metrics_use_clean_inputs(digits):
    result = fit(_noisy_config(), digits)
    net = result.network
    val = net.evaluate(digits.X_val, digits.y_val)
    last = result.history[-1]
    assert val["loss"] == last["val_loss"]
    assert val["accuracy"] == last["val_accuracy"]
    test = net.evaluate(digits.X_test, digits.y_test)
    assert result.test_metrics == {"accuracy": test["accuracy"], "loss": test["loss"]}


def test_caller_arrays_are_not_modified(digits):
    before = {
        k: getattr(digits, k).copy()
        for k in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")
    }
    fit(_noisy_config(max_epochs=2), digits)
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(digits, k), v, err_msg=k)


def test_noise_changes_training(digits):
    noisy = fit(_noisy_config(), digits)
    clean = fit(_noisy_config(input_noise=0.0), digits)
    assert noisy.history[0]["train_loss"] != clean.history[0]["train_loss"]
    assert not np.array_equal(noisy.network.params, clean.network.params)
    # Heavy noise on standardised inputs makes the training batches harder to fit.
    assert noisy.history[-1]["train_loss"] > clean.history[-1]["train_loss"]


def test_noise_is_gaussian_with_the_configured_std(digits):
    """One full-batch SGD step equals a manual step on X + input_noise * N(0, 1).

    fit's random streams are make_rngs(seed) (documented for replay): per epoch one
    permutation from `shuffle`, then the noise from `noise` for the (single) block.
    """
    sigma, lr = 0.3, 0.1
    cfg = _noisy_config(
        optimizer="sgd",
        learning_rate=lr,
        batch_size="full",
        max_epochs=1,
        input_noise=sigma,
        dtype="float64",
    )
    result = fit(cfg, digits)

    rngs = make_rngs(cfg.seed)
    net = build_network(cfg, digits, rngs.init)
    perm = rngs.shuffle.permutation(len(digits.X_train))
    X = digits.X_train[perm].astype(np.float64)
    X += sigma * rngs.noise.standard_normal(X.shape, dtype=np.float64)
    loss = net.loss_and_grad(X, digits.y_train[perm])
    net.params -= lr * net.grad
    assert result.history[0]["train_loss"] == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(result.network.params, net.params, rtol=1e-10, atol=1e-12)
    # The same replay without the noise does not match (the check above is not vacuous).
    clean_loss = build_network(cfg, digits).loss(digits.X_train[perm], digits.y_train[perm])
    assert abs(clean_loss - loss) > 1e-3 * loss
