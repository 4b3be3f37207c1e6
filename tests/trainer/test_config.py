"""TrainConfig validation: every bad value is rejected with a message naming the field."""

import dataclasses

import numpy as np
import pytest

from trainer import TrainConfig


def test_defaults():
    cfg = TrainConfig()
    assert cfg.hidden_layers == (128, 64) and cfg.optimizer == "adam"
    assert cfg.batch_size == 64 and cfg.monitor_mode == "min"
    assert TrainConfig(monitor="val_accuracy").monitor_mode == "max"
    assert TrainConfig(monitor="val_r2").monitor_mode == "max"
    assert TrainConfig(monitor="val_rmse").monitor_mode == "min"


def test_frozen_and_lists_become_tuples():
    cfg = TrainConfig(hidden_layers=[32, 16])
    assert cfg.hidden_layers == (32, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0  # type: ignore[misc]
    assert TrainConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_layers", (0,)),
        ("hidden_layers", 64),
        ("hidden_layers", (32.5,)),
        ("activation", "swish"),
        ("optimizer", "lbfgs"),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("batch_size", 0),
        ("batch_size", "half"),
        ("batch_size", 3.0),
        ("momentum", 1.0),
        ("beta1", -0.1),
        ("beta2", 1.0),
        ("eps", 0.0),
        ("dropout", 1.0),
        ("weight_decay", -1e-4),
        ("l1", -1.0),
        ("l2", float("inf")),
        ("grad_clip", 0.0),
        ("input_noise", -0.1),
        ("init", "orthogonal"),
        ("schedule", "linear"),
        ("gamma", 0.0),
        ("t_mult", 0.5),
        ("warmup_epochs", -1),
        ("max_epochs", 0),
        ("patience", 0),
        ("min_delta", -0.1),
        ("monitor", "train_loss"),
        ("seed", -1),
        ("dtype", "float16"),
        ("restore_best", "yes"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_valid_edge_values():
    TrainConfig(
        batch_size="full",
        dropout=0.0,
        momentum=0.0,
        hidden_layers=(),
        patience=1,
        grad_clip=1.0,
        dtype="float64",
        warmup_epochs=0.5,
    )


def test_adam_defaults_are_the_textbook_constants():
    cfg = TrainConfig()
    assert (cfg.beta1, cfg.beta2, cfg.eps) == (0.9, 0.999, 1e-8)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_default_adam_steps_like_the_textbook_update(name):
    """Kingma & Ba (2015), Algorithm 1, with beta1=0.9, beta2=0.999, eps=1e-8.

    The first step alone is ~lr*sign(g) whatever the betas, so take several steps with
    gradients that change scale (the betas then matter) and some ~1e-8 (eps then matters).
    """
    from trainer.optimizers import make_optimizer

    lr = 1e-2
    opt = make_optimizer(TrainConfig(optimizer=name, learning_rate=lr))
    assert (opt.beta1, opt.beta2, opt.eps) == (0.9, 0.999, 1e-8)
    rng = np.random.default_rng(0)
    p = rng.standard_normal(50)
    ref = p.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    b1, b2, eps = 0.9, 0.999, 1e-8
    scales = np.where(np.arange(50) % 5 == 0, 1e-8, 1.0)
    for t, step_scale in enumerate([1.0, 10.0, 0.1, 3.0, 0.01], start=1):
        g = rng.standard_normal(50) * scales * step_scale
        opt.step([p], [g.copy()])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        ref -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-15, err_msg=f"step {t}")
