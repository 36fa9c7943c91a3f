"""matmul, batched and broadcasting as ``numpy.matmul``; low-precision inputs are multiplied in
float32 (see :mod:`kinkprop.precision`), so NumPy's BLAS-less float16 matmul is never called."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor, as_tensor, lift_pair
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
        if b2.ndim == 2 and a2.ndim == 2 and b2.flags.f_contiguous and not b2.flags.c_contiguous:
            gb = (g2.T @ a2).T  # b is a transposed view (x @ W.T): keep W's own layout
        else:
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


def _linear_fwd(x, w, *b):
    ans = x @ w.T
    if b:
        ans += b[0]
    return ans, (x, w, bool(b))


def _linear_vjp(g, res, needs, c):
    x, w, has_b = res
    g2 = g.reshape(-1, g.shape[-1])
    gx = (g @ w) if needs[0] else None
    # (out, in) computed directly in the weight's own row-major layout: no transposed copy later
    gw = (g2.T @ x.reshape(-1, x.shape[-1])) if needs[1] else None
    gb = g2.sum(axis=0) if has_b and needs[2] else None
    return (gx, gw, gb)[:2 + has_b]


def _linear_jvp(ts, res, c):
    x, w, has_b = res
    out = 0.0
    if ts[0] is not None:
        out = ts[0] @ w.T
    if ts[1] is not None:
        out = out + x @ ts[1].T
    if has_b and ts[2] is not None:
        out = out + ts[2]
    return np.broadcast_to(out, (*x.shape[:-1], w.shape[0]))


_linear = register("linear", _linear_fwd, _linear_vjp, _linear_jvp)


def linear(x, weight, bias=None) -> Tensor:
    """x @ weight.T + bias, with weight shaped (out, in) as in PyTorch; one fused primitive."""
    x = as_tensor(x)
    weight = as_tensor(weight, like=x)
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input {x.shape} does not match weight {weight.shape} "
                         "(weight must be (out, in) with in = input.shape[-1])")
    return apply(_linear, with_bias("linear", x, weight, bias))


def with_bias(op: str, x: Tensor, weight: Tensor, bias) -> tuple[Tensor, ...]:
    """``(x, weight)``, plus the bias as a tensor of shape ``(out,)`` when one is given."""
    if bias is None:
        return (x, weight)
    bias = as_tensor(bias, like=x)
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {bias.shape}")
    return (x, weight, bias)
