"""Hidden-layer activations on preallocated buffers: values and derivatives, in place.

The network's hot path calls these once per hidden layer and step, on its workspace's
buffers (see trainer.workspace); nothing here allocates except gelu's derivative.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.vocab import Activation

LEAKY_SLOPE = 0.01  # leaky_relu's slope for negative inputs
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def activate(act: str, z: np.ndarray, a: np.ndarray) -> None:
    """a = activation(z) for the activations other than relu (MLP does relu in place)."""
    if act == Activation.LEAKY_RELU:
        np.multiply(z, LEAKY_SLOPE, out=a)
        np.maximum(z, a, out=a)
    elif act == Activation.TANH:
        np.tanh(z, out=a)
    elif act == Activation.SIGMOID:
        sigmoid(z, a)
    else:  # gelu, tanh approximation: 0.5 z (1 + tanh(c (z + a z^3)))
        np.multiply(z, z, out=a)
        a *= _GELU_A
        a += 1.0
        a *= z
        a *= _GELU_C
        np.tanh(a, out=a)
        a += 1.0
        a *= z
        a *= 0.5


def activation_grad(act: str, z: np.ndarray, a: np.ndarray, d: np.ndarray, ws) -> None:
    """d *= activation'(z), in place; a is the layer's output after dropout."""
    w = z.shape[0]
    if act == Activation.RELU:
        # z was overwritten by a = relu(z) * mask. Where the mask kept a unit, a > 0
        # iff z > 0; dropped units already have d == 0 from the mask.
        tb = ws.tb[:w]
        np.greater(a, 0, out=tb)
        np.multiply(d, tb, out=d)
        return
    t = ws.tf[:w]
    if act == Activation.LEAKY_RELU:
        tb = ws.tb[:w]
        np.greater(z, 0, out=tb)
        np.multiply(tb, 1.0 - LEAKY_SLOPE, out=t)
        t += LEAKY_SLOPE
    elif act == Activation.TANH:
        np.tanh(z, out=t)
        np.multiply(t, t, out=t)
        np.subtract(1.0, t, out=t)
    elif act == Activation.SIGMOID:
        sigmoid(z, t)
        t2 = ws.tf2[:w]
        np.subtract(1.0, t, out=t2)
        t *= t2
    else:  # gelu: 0.5(1+tanh u) + 0.5 z (1 - tanh(u)^2) c (1 + 3a z^2), u = c(z + a z^3)
        t2 = ws.tf2[:w]
        np.multiply(z, z, out=t2)  # z^2
        np.multiply(t2, _GELU_A, out=t)
        t += 1.0
        t *= z
        t *= _GELU_C
        np.tanh(t, out=t)  # tanh(u)
        t2 *= 3.0 * _GELU_A
        t2 += 1.0
        t2 *= _GELU_C
        t2 *= z  # c z (1 + 3a z^2)
        sech2 = np.multiply(t, t)  # small allocation; gelu is off the hot path
        np.subtract(1.0, sech2, out=sech2)
        t2 *= sech2
        t += 1.0
        t += t2
        t *= 0.5
    d *= t


def sigmoid(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function: 0.5 * (1 + tanh(z / 2))."""
    np.multiply(z, 0.5, out=out)
    np.tanh(out, out=out)
    out *= 0.5
    out += 0.5
    return out
