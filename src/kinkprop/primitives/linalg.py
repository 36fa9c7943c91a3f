"""matmul, batched and broadcasting as ``numpy.matmul``; low-precision inputs are multiplied in
float32 (see :mod:`kinkprop.precision`), so NumPy's BLAS-less float16 matmul is never called."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor, lift_pair
from .core import apply, register, unbroadcast


def _matmul_fwd(a, b):
    return np.matmul(a, b), (a, b)


def _swap(x):
    return np.swapaxes(x, -1, -2)


def _matmul_vjp(g, res, needs, c):
    a, b = res
    # promote 1-D operands the way matmul does, so one rule covers every case
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    g2 = g
    if b.ndim == 1:
        g2 = g2[..., None]
    if a.ndim == 1:
        g2 = np.expand_dims(g2, -2)
    ga = gb = None
    if needs[0]:
        ga = g2 @ _swap(b2)
        ga = unbroadcast(ga, a2.shape).reshape(a.shape)
    if needs[1]:
        gb = unbroadcast(_swap(a2) @ g2, b2.shape)
        gb = gb.reshape(b.shape)
    return ga, gb


def _matmul_jvp(ts, res, c):
    a, b = res
    out = 0.0
    if ts[0] is not None:
        out = np.matmul(ts[0], b)
    if ts[1] is not None:
        out = out + np.matmul(a, ts[1])
    return out


_matmul = register("matmul", _matmul_fwd, _matmul_vjp, _matmul_jvp)


def matmul(a, b) -> Tensor:
    """a @ b with NumPy's batching and broadcasting rules."""
    a, b = lift_pair(a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must be at least 1-D, got {a.shape} and {b.shape}")
    ka = a.shape[-1]
    kb = b.shape[-2] if b.ndim > 1 else b.shape[0]
    if ka != kb:
        raise ValueError(f"matmul: inner dimensions differ: {a.shape} @ {b.shape} ({ka} != {kb})")
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dimensions of {a.shape} and {b.shape} do not broadcast"
                         ) from None
    return apply(_matmul, (a, b))


def linear(x, weight, bias=None) -> Tensor:
    """x @ weight.T + bias, with weight shaped (out, in) as in PyTorch."""
    from .shape import transpose

    y = matmul(x, transpose(weight))
    return y if bias is None else y + bias
