"""Each optimizer's first steps against the textbook update, written out by hand."""

import math

import numpy as np
import pytest

from trainer.config import TrainConfig
from trainer.optimizers import (
    SGD,
    Adagrad,
    Adam,
    AdamW,
    Momentum,
    Nesterov,
    RMSprop,
    make_optimizer,
)

W0 = np.array([[0.5, -1.0, 2.0], [0.25, 0.0, -0.75]])
B0 = np.array([0.1, -0.2, 0.3])
GRADS = [  # three steps of (dW, db)
    (np.array([[0.1, -0.2, 0.3], [0.4, -0.5, 0.6]]), np.array([1.0, -1.0, 0.5])),
    (np.array([[-0.3, 0.2, 0.1], [0.0, 0.5, -0.6]]), np.array([0.5, 0.25, -0.5])),
    (np.array([[0.2, 0.2, -0.4], [0.3, -0.1, 0.2]]), np.array([-1.0, 0.5, 0.0])),
]
LR, WD = 0.1, 0.05


def _run(opt):
    w, b = W0.copy(), B0.copy()
    out = []
    for gw, gb in GRADS:
        opt.step([w, b], [gw.copy(), gb.copy()])
        out.append((w.copy(), b.copy()))
    return out


def _expected(update, decoupled=False, wd=WD):
    """Apply `update(p, g, state, t)` by hand per array; coupled decay adds wd*W to g."""
    params = [W0.copy(), B0.copy()]
    states = [{}, {}]
    out = []
    for t, grads in enumerate(GRADS, start=1):
        for i, g in enumerate(grads):
            p = params[i]
            is_weight = i == 0
            if is_weight and decoupled:
                p = p - LR * wd * p
            elif is_weight:
                g = g + wd * p
            params[i] = update(p, g, states[i], t)
        out.append((params[0].copy(), params[1].copy()))
    return out


def _check(actual, expected):
    for (aw, ab), (ew, eb) in zip(actual, expected, strict=True):
        np.testing.assert_allclose(aw, ew, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ab, eb, rtol=1e-12, atol=1e-14)


def test_sgd():
    _check(_run(SGD(LR, weight_decay=WD)), _expected(lambda p, g, s, t: p - LR * g))


def test_momentum():
    def upd(p, g, s, t):
        s["v"] = 0.9 * s.get("v", 0.0) + g
        return p - LR * s["v"]

    _check(_run(Momentum(LR, 0.9, weight_decay=WD)), _expected(upd))


def test_nesterov():
    def upd(p, g, s, t):
        s["v"] = 0.9 * s.get("v", 0.0) + g
        return p - LR * (g + 0.9 * s["v"])

    _check(_run(Nesterov(LR, 0.9, weight_decay=WD)), _expected(upd))


def _adam_update(b1=0.9, b2=0.999, eps=1e-8):
    def upd(p, g, s, t):
        s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
        m_hat = s["m"] / (1 - b1**t)
        v_hat = s["v"] / (1 - b2**t)
        return p - LR * m_hat / (np.sqrt(v_hat) + eps)

    return upd


def test_adam_coupled_weight_decay():
    _check(_run(Adam(LR, 0.9, 0.999, 1e-8, weight_decay=WD)), _expected(_adam_update()))


def test_adam_other_betas():
    upd = _adam_update(0.8, 0.99, 1e-3)
    _check(_run(Adam(LR, 0.8, 0.99, 1e-3, weight_decay=WD)), _expected(upd))


def test_adamw_decouples_weight_decay():
    _check(
        _run(AdamW(LR, 0.9, 0.999, 1e-8, weight_decay=WD)),
        _expected(_adam_update(), decoupled=True),
    )


def test_rmsprop():
    def upd(p, g, s, t):
        s["v"] = 0.9 * s.get("v", 0.0) + 0.1 * g * g
        return p - LR * g / (np.sqrt(s["v"]) + 1e-8)

    _check(_run(RMSprop(LR, 0.9, 1e-8, weight_decay=WD)), _expected(upd))


def test_adagrad():
    def upd(p, g, s, t):
        s["s"] = s.get("s", 0.0) + g * g
        return p - LR * g / (np.sqrt(s["s"]) + 1e-8)

    _check(_run(Adagrad(LR, 1e-8, weight_decay=WD)), _expected(upd))


def test_first_adam_step_moves_each_weight_by_lr():
    # With bias correction, step 1 is lr * g/|g| (up to eps) whatever the gradient scale.
    w, b = W0.copy(), B0.copy()
    Adam(LR).step([w, b], [GRADS[0][0] * 1e-3, GRADS[0][1] * 1e3])
    np.testing.assert_allclose(W0 - w, LR * np.sign(GRADS[0][0]), rtol=1e-4)
    np.testing.assert_allclose(B0 - b, LR * np.sign(GRADS[0][1]), rtol=1e-7)


def test_decay_slice_of_a_flat_buffer_matches_separate_arrays():
    flat = np.concatenate([W0.ravel(), B0])
    opt = AdamW(LR, weight_decay=WD, decay=[slice(0, W0.size)])
    for gw, gb in GRADS:
        opt.step([flat], [np.concatenate([gw.ravel(), gb])])
    w, b = _run(AdamW(LR, weight_decay=WD))[-1]
    np.testing.assert_allclose(flat, np.concatenate([w.ravel(), b]), rtol=1e-12)


def test_lr_can_change_between_steps():
    w = np.array([1.0])
    opt = SGD(0.5)
    opt.step([w], [np.array([1.0])])
    opt.lr = 0.25
    opt.step([w], [np.array([1.0])])
    assert w[0] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "name,cls",
    [
        ("sgd", SGD),
        ("momentum", Momentum),
        ("nesterov", Nesterov),
        ("adam", Adam),
        ("adamw", AdamW),
        ("rmsprop", RMSprop),
        ("adagrad", Adagrad),
    ],
)
def test_make_optimizer(name, cls):
    opt = make_optimizer(TrainConfig(optimizer=name, learning_rate=0.3, weight_decay=0.01))
    assert type(opt) is cls
    assert opt.lr == 0.3 and opt.weight_decay == 0.01
    assert math.isfinite(opt.lr)
