"""Smooth reductions and normalisations: sum, mean, var, logsumexp, softmax, log_softmax."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor, as_tensor
from .core import apply, register


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axis = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    for a in axis:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} out of range for {ndim} dimensions")
    return tuple(sorted(int(a) % ndim for a in axis))


def _keep(g, shape, axes, keepdims):
    """Reshape a reduced cotangent so it broadcasts against the input again."""
    return g if keepdims else np.expand_dims(g, axes)


def _count(shape, axes):
    return int(np.prod([shape[a] for a in axes]))


def _sum_fwd(x, axes, keepdims):
    return np.sum(x, axis=axes, keepdims=keepdims), (x.shape, axes, keepdims)


_sum = register(
    "sum", _sum_fwd,
    lambda g, res, needs, c: (np.broadcast_to(_keep(g, *res), res[0]),),
    lambda ts, res, c: np.sum(ts[0], axis=res[1], keepdims=res[2]),
)


def _mean_fwd(x, axes, keepdims):
    return np.mean(x, axis=axes, keepdims=keepdims), (x.shape, axes, keepdims)


_mean = register(
    "mean", _mean_fwd,
    lambda g, res, needs, c: (np.broadcast_to(_keep(g, *res) / _count(res[0], res[1]), res[0]),),
    lambda ts, res, c: np.mean(ts[0], axis=res[1], keepdims=res[2]),
)


def _var_fwd(x, axes, keepdims, ddof):
    centred = x - x.mean(axis=axes, keepdims=True)
    n = _count(x.shape, axes) - ddof
    ans = np.sum(centred * centred, axis=axes, keepdims=keepdims) / n
    return ans, (centred, axes, keepdims, n)


def _var_vjp(g, res, needs, c):
    centred, axes, keepdims, n = res
    return (_keep(g, centred.shape, axes, keepdims) * (2.0 / n) * centred,)


def _var_jvp(ts, res, c):
    centred, axes, keepdims, n = res
    return np.sum(centred * ts[0], axis=axes, keepdims=keepdims) * (2.0 / n)


_var = register("var", _var_fwd, _var_vjp, _var_jvp)


def sum(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    """Sum over ``axis`` (an int, a tuple, or None for all)."""
    x = as_tensor(x)
    return apply(_sum, (x,), {"axes": _axes(axis, x.ndim), "keepdims": bool(keepdims)})


def mean(x, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis``."""
    x = as_tensor(x)
    return apply(_mean, (x,), {"axes": _axes(axis, x.ndim), "keepdims": bool(keepdims)})


def var(x, axis=None, keepdims: bool = False, ddof: int = 0) -> Tensor:
    """Variance over ``axis`` with NumPy's convention: divides by n - ddof (default ddof=0, the
    biased estimate batch-norm uses; ``torch.var`` defaults to ddof=1)."""
    x = as_tensor(x)
    axes = _axes(axis, x.ndim)
    if _count(x.shape, axes) - ddof <= 0:
        raise ValueError(f"var: {_count(x.shape, axes)} elements with ddof={ddof}")
    return apply(_var, (x,), {"axes": axes, "keepdims": bool(keepdims), "ddof": int(ddof)})


# -- log-sum-exp family --------------------------------------------------------------------------


def _softmax_fwd(x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z, (z, axis)


def _softmax_vjp(g, res, needs, c):
    p, axis = res
    return (p * (g - (g * p).sum(axis=axis, keepdims=True)),)


def _softmax_jvp(ts, res, c):
    p, axis = res
    return p * (ts[0] - (ts[0] * p).sum(axis=axis, keepdims=True))


def _log_softmax_fwd(x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=axis, keepdims=True))
    ans = z - lse
    return ans, (ans, axis)


def _log_softmax_vjp(g, res, needs, c):
    ans, axis = res
    return (g - np.exp(ans) * g.sum(axis=axis, keepdims=True),)


def _log_softmax_jvp(ts, res, c):
    ans, axis = res
    return ts[0] - (np.exp(ans) * ts[0]).sum(axis=axis, keepdims=True)


def _logsumexp_fwd(x, axes, keepdims):
    m = x.max(axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    lse = np.log(np.exp(x - m).sum(axis=axes, keepdims=True)) + m
    p = np.exp(x - lse)
    return (lse if keepdims else np.squeeze(lse, axes)), (p, axes, keepdims)


def _logsumexp_vjp(g, res, needs, c):
    p, axes, keepdims = res
    return (p * _keep(g, p.shape, axes, keepdims),)


def _logsumexp_jvp(ts, res, c):
    p, axes, keepdims = res
    return (p * ts[0]).sum(axis=axes, keepdims=keepdims)


_softmax = register("softmax", _softmax_fwd, _softmax_vjp, _softmax_jvp)
_log_softmax = register("log_softmax", _log_softmax_fwd, _log_softmax_vjp, _log_softmax_jvp)
_logsumexp = register("logsumexp", _logsumexp_fwd, _logsumexp_vjp, _logsumexp_jvp)


def softmax(x, axis: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along ``axis`` (max-shifted for stability)."""
    x = as_tensor(x)
    return apply(_softmax, (x,), {"axis": _axes(axis, x.ndim)[0]})


def log_softmax(x, axis: int = -1) -> Tensor:
    """x - logsumexp(x) along ``axis``."""
    x = as_tensor(x)
    return apply(_log_softmax, (x,), {"axis": _axes(axis, x.ndim)[0]})


def logsumexp(x, axis=None, keepdims: bool = False) -> Tensor:
    """log(sum(exp(x))) over ``axis`` (max-shifted for stability)."""
    x = as_tensor(x)
    return apply(_logsumexp, (x,), {"axes": _axes(axis, x.ndim), "keepdims": bool(keepdims)})
