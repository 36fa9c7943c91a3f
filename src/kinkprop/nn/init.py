"""Initialisers, each drawing from an explicit ``numpy.random.Generator`` (same seed, same net).

They fill a tensor's ``.data`` in place and return it. Fan-in / fan-out follow PyTorch: for a weight
of shape (out, in, *kernel), fan_in = in * prod(kernel), fan_out = out * prod(kernel).
"""

from __future__ import annotations

import math

import numpy as np

from ..tensor import Tensor


def fans(shape: tuple) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"fan in/out need at least 2 dimensions, got shape {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _fill(t: Tensor, values: np.ndarray) -> Tensor:
    t.data[...] = values.astype(t.dtype)
    return t


def uniform_(t: Tensor, rng: np.random.Generator, low: float = 0.0, high: float = 1.0) -> Tensor:
    return _fill(t, rng.uniform(low, high, t.shape))


def normal_(t: Tensor, rng: np.random.Generator, mean: float = 0.0, std: float = 1.0) -> Tensor:
    return _fill(t, rng.normal(mean, std, t.shape))


def _gain(nonlinearity: str, a: float = 0.0) -> float:
    gains = {"linear": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3, "relu": math.sqrt(2.0),
             "leaky_relu": math.sqrt(2.0 / (1 + a * a))}
    if nonlinearity not in gains:
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; valid: {', '.join(gains)}")
    return gains[nonlinearity]


def kaiming_uniform_(t, rng, a: float = 0.0, mode: str = "fan_in", nonlinearity="leaky_relu"):
    fan = fans(t.shape)[0 if mode == "fan_in" else 1]
    bound = math.sqrt(3.0) * _gain(nonlinearity, a) / math.sqrt(fan)
    return uniform_(t, rng, -bound, bound)


def kaiming_normal_(t, rng, a: float = 0.0, mode: str = "fan_in", nonlinearity="leaky_relu"):
    fan = fans(t.shape)[0 if mode == "fan_in" else 1]
    return normal_(t, rng, 0.0, _gain(nonlinearity, a) / math.sqrt(fan))


def xavier_uniform_(t, rng, gain: float = 1.0):
    fan_in, fan_out = fans(t.shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(t, rng, -bound, bound)


def xavier_normal_(t, rng, gain: float = 1.0):
    fan_in, fan_out = fans(t.shape)
    return normal_(t, rng, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


def torch_default_(weight: Tensor, bias: Tensor | None, rng: np.random.Generator) -> None:
    """PyTorch's default for Linear and Conv2d: kaiming_uniform(a=sqrt(5)) on the weight, i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    kaiming_uniform_(weight, rng, a=math.sqrt(5.0))
    if bias is not None:
        bound = 1.0 / math.sqrt(fans(weight.shape)[0])
        uniform_(bias, rng, -bound, bound)
