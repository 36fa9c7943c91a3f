"""Smooth elementwise primitives: arithmetic and the usual unary functions.

Unary primitives declare one local derivative ``d(x, ans)``; their VJP is ``g * d`` and their JVP
``t * d``, so the two modes agree by construction.
"""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor, as_tensor, lift_pair
from .core import apply, register, unbroadcast


def _unary(name, f, d):
    """Register a smooth unary primitive from its function and local derivative ``d(x, ans)``."""

    def forward(x):
        ans = f(x)
        return ans, (x, ans)

    def vjp(g, res, needs, choice):
        return (g * d(*res),)

    def jvp(ts, res, choice):
        return ts[0] * d(*res)

    prim = register(name, forward, vjp, jvp)

    def op(x) -> Tensor:
        return apply(prim, (as_tensor(x),))

    op.__name__ = name
    return op


def _sigmoid(x):
    # 0.5 * (1 + tanh(x / 2)) is exact in the tails, unlike 1 / (1 + exp(-x)) for large -x
    return 0.5 * (1.0 + np.tanh(0.5 * x))


neg = _unary("neg", np.negative, lambda x, ans: -np.ones_like(x))
exp = _unary("exp", np.exp, lambda x, ans: ans)
log = _unary("log", np.log, lambda x, ans: 1.0 / x)
log1p = _unary("log1p", np.log1p, lambda x, ans: 1.0 / (1.0 + x))
sqrt = _unary("sqrt", np.sqrt, lambda x, ans: 0.5 / ans)
tanh = _unary("tanh", np.tanh, lambda x, ans: 1.0 - ans * ans)
sigmoid = _unary("sigmoid", _sigmoid, lambda x, ans: ans * (1.0 - ans))
softplus = _unary("softplus", lambda x: np.logaddexp(0.0, x), lambda x, ans: _sigmoid(x))
neg.__doc__ = "-x."
exp.__doc__ = "e**x."
log.__doc__ = "Natural logarithm."
log1p.__doc__ = "log(1 + x), accurate for small x."
sqrt.__doc__ = "Square root; the derivative at 0 is +inf (no kink policy: not Lipschitz there)."
tanh.__doc__ = "Hyperbolic tangent."
sigmoid.__doc__ = "1 / (1 + e**-x), computed as (1 + tanh(x / 2)) / 2."
softplus.__doc__ = "log(1 + e**x), computed as logaddexp(0, x)."


def _binary(name, f, da, db):
    """Register a broadcasting binary primitive from ``f`` and partials ``da(a, b, ans)``, ``db``."""

    def forward(a, b):
        ans = f(a, b)
        return ans, (a, b, ans)

    def vjp(g, res, needs, choice):
        a, b, ans = res
        ga = unbroadcast(g * da(a, b, ans), a.shape) if needs[0] else None
        gb = unbroadcast(g * db(a, b, ans), b.shape) if needs[1] else None
        return ga, gb

    def jvp(ts, res, choice):
        a, b, ans = res
        ta, tb = ts
        out = 0.0 if ta is None else ta * da(a, b, ans)
        out = out if tb is None else out + tb * db(a, b, ans)
        return np.broadcast_to(out, ans.shape)

    return register(name, forward, vjp, jvp)


def _ones(a, b, ans):
    return 1.0


_add = register(
    "add",
    lambda a, b: (a + b, (a.shape, b.shape)),
    lambda g, res, needs, c: (unbroadcast(g, res[0]) if needs[0] else None,
                              unbroadcast(g, res[1]) if needs[1] else None),
    lambda ts, res, c: _sum_tangents(ts[0], ts[1], res),
)
_sub = register(
    "sub",
    lambda a, b: (a - b, (a.shape, b.shape)),
    lambda g, res, needs, c: (unbroadcast(g, res[0]) if needs[0] else None,
                              unbroadcast(-g, res[1]) if needs[1] else None),
    lambda ts, res, c: _sum_tangents(ts[0], None if ts[1] is None else -ts[1], res),
)


def _sum_tangents(ta, tb, shapes):
    shape = np.broadcast_shapes(*shapes)
    out = ta if tb is None else (tb if ta is None else ta + tb)
    return np.broadcast_to(out, shape)


_mul = register(
    "mul",
    lambda a, b: (a * b, (a, b)),
    lambda g, res, needs, c: (unbroadcast(g * res[1], res[0].shape) if needs[0] else None,
                              unbroadcast(g * res[0], res[1].shape) if needs[1] else None),
    lambda ts, res, c: _sum_tangents(None if ts[0] is None else ts[0] * res[1],
                                     None if ts[1] is None else res[0] * ts[1],
                                     (res[0].shape, res[1].shape)),
)
_div = _binary("div", np.divide, lambda a, b, ans: 1.0 / b, lambda a, b, ans: -ans / b)
_pow = _binary(
    "pow", np.power,
    lambda a, b, ans: b * np.power(a, b - 1.0),
    # d/db a**b = a**b log a, taken as 0 where a**b = 0 (a = 0, b > 0) as PyTorch does
    lambda a, b, ans: np.where(ans == 0, 0.0, ans * np.log(np.where(ans == 0, 1.0, a))),
)


def add(a, b) -> Tensor:
    """a + b, broadcasting."""
    return apply(_add, lift_pair(a, b, "add"))


def sub(a, b) -> Tensor:
    """a - b, broadcasting."""
    return apply(_sub, lift_pair(a, b, "sub"))


def mul(a, b) -> Tensor:
    """a * b, broadcasting."""
    return apply(_mul, lift_pair(a, b, "mul"))


def div(a, b) -> Tensor:
    """a / b, broadcasting."""
    return apply(_div, lift_pair(a, b, "div"))


def pow(a, b) -> Tensor:  # noqa: A001 - mirrors torch.pow
    """a ** b, broadcasting; the derivative in b is a**b log a (0 where a**b = 0)."""
    return apply(_pow, lift_pair(a, b, "pow"))


def _where_fwd(a, b, cond):
    return np.where(cond, a, b), (cond, a.shape, b.shape)


def _where_vjp(g, res, needs, choice):
    cond, sa, sb = res
    zero = np.zeros((), g.dtype)
    return (unbroadcast(np.where(cond, g, zero), sa) if needs[0] else None,
            unbroadcast(np.where(cond, zero, g), sb) if needs[1] else None)


def _where_jvp(ts, res, choice):
    cond, sa, sb = res
    shape = np.broadcast_shapes(cond.shape, sa, sb)
    ta = 0.0 if ts[0] is None else ts[0]
    tb = 0.0 if ts[1] is None else ts[1]
    return np.broadcast_to(np.where(cond, ta, tb), shape)


_where = register("where", _where_fwd, _where_vjp, _where_jvp)


def where(cond, a, b) -> Tensor:
    """Select ``a`` where ``cond`` is true, else ``b``; ``cond`` is not differentiated.

    Gradients go only to the selected input; ``where`` has no kink policy because the condition is
    data, not a function of the inputs (a ``where`` on a comparison of its own inputs is a kink that
    this primitive does not see: use relu / maximum / clamp for those).
    """
    cond = cond.data if isinstance(cond, Tensor) else np.asarray(cond)
    a, b = lift_pair(a, b, "where")
    return apply(_where, (a, b), {"cond": cond.astype(bool)})
