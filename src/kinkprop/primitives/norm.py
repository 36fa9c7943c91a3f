"""Batch normalisation as one primitive, in training mode (the batch's own statistics).

Channels are axis 1; the statistics run over every other axis. With ``xhat = (x - mean) * r`` and
``r = 1 / sqrt(var + eps)`` (biased variance, as PyTorch normalises in training):

    y      = xhat * w + b
    VJP    dx = w r (g - mean(g) - xhat mean(g xhat)),  dw = sum(g xhat),  db = sum(g)
    JVP    t_y = w r (t_c - xhat mean(xhat t_c)) + t_w xhat + t_b,  t_c = t_x - mean(t_x)

As one record, forward and backward make five passes over the activations each, where the same
function composed of mean / sub / mul / div / add primitives made some twenty (each VJP broadcasts
and sums temporaries of its own): the convnet's batch-norm layers went from ~40 to ~25 ms a step.
Like every primitive, it computes in float32 for 16-bit formats and rounds its output once;
:class:`kinkprop.nn.BatchNorm2d` uses it for float32 and float64 only (see there).
"""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor, as_tensor
from .core import apply, register


def _per_channel(v, ndim):
    """A (C,) array shaped to broadcast against (N, C, ...)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _rows(a):
    """(N, C, ...) as (N, C, K): per-channel reductions over axes 0 and 2."""
    return a.reshape(a.shape[0], a.shape[1], int(np.prod(a.shape[2:])))  # (not -1: N may be 0)


def _channel_sum(a):
    return _rows(a).sum(axis=2).sum(axis=0)


def _channel_dot(a, b):
    """sum over everything but channels of a * b, without the product's temporary."""
    return np.einsum("nck,nck->c", _rows(a), _rows(b))


# The residuals are the centred input xc and r (not xhat = xc r): every use of xhat below folds r
# into a per-channel coefficient, which saves a pass over the activations each way.


def _bn_fwd(x, *wb, eps, stats):
    n = x.size // x.shape[1]
    mean = _channel_sum(x) / n
    xc = x - _per_channel(mean, x.ndim)
    var = _channel_dot(xc, xc) / n
    r = np.reciprocal(np.sqrt(var + np.asarray(eps, var.dtype)))
    if stats is not None:
        stats["mean"], stats["var"] = mean, var
    w = wb[0] if wb else None
    y = np.multiply(xc, _per_channel(r if w is None else r * w, x.ndim))
    if wb:
        y += _per_channel(wb[1], x.ndim)
    return y, (xc, r, w)


def _bn_vjp(g, res, needs, c):
    xc, r, w = res
    n = xc.size // xc.shape[1]
    gb = _channel_sum(g)
    gw = _channel_dot(g, xc) * r  # sum(g xhat)
    gx = None
    if needs[0]:
        a = r if w is None else r * w
        # w r (g - mean(g) - xhat mean(g xhat)), xhat = xc r
        gx = np.multiply(g, _per_channel(a, g.ndim))
        gx -= xc * _per_channel(a * r * gw / n, g.ndim)
        gx -= _per_channel(a * gb / n, g.ndim)
    return (gx, gw, gb)[:len(needs)]


def _bn_jvp(ts, res, c):
    xc, r, w = res
    n, ndim = xc.size // xc.shape[1], xc.ndim
    out = None
    if ts[0] is not None:
        # w r (t_c - xhat mean(xhat t_c)), t_c = t_x - mean(t_x)
        tc = ts[0] - _per_channel(_channel_sum(ts[0]) / n, ndim)
        m = _channel_dot(xc, tc) * r * r / n  # mean(xhat t_c), over xc
        tc -= xc * _per_channel(m, ndim)
        tc *= _per_channel(r if w is None else r * w, ndim)
        out = tc
    if len(ts) > 1 and ts[1] is not None:
        term = xc * _per_channel(r * ts[1], ndim)
        out = term if out is None else out + term
    if len(ts) > 2 and ts[2] is not None:
        term = _per_channel(ts[2], ndim)
        out = np.broadcast_to(term, xc.shape).copy() if out is None else out + term
    return np.zeros_like(xc) if out is None else out


_batch_norm = register("batch_norm", _bn_fwd, _bn_vjp, _bn_jvp)


def batch_norm(x, weight=None, bias=None, eps: float = 1e-5, stats: dict | None = None) -> Tensor:
    """Batch normalisation in training mode, as PyTorch's: over every axis but 1 (channels),
    ``(x - mean) / sqrt(var + eps) * weight + bias`` with the batch's mean and biased variance.
    ``weight`` and ``bias`` are (C,) (both or neither). ``stats``, a dict if given, receives the
    batch's ``mean`` and biased ``var`` per channel, for running statistics. One value per channel
    (a last batch of one) normalises to 0, so the output is ``bias`` and the input's gradient 0,
    where PyTorch raises: a training loop that keeps short last batches runs on."""
    x = as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"batch_norm: input must be (N, C, ...), got shape {x.shape}")
    if (weight is None) != (bias is None):
        raise ValueError("batch_norm: give weight and bias both, or neither")
    args = (x,)
    if weight is not None:
        weight, bias = as_tensor(weight, like=x), as_tensor(bias, like=x)
        if weight.shape != (x.shape[1],) or bias.shape != (x.shape[1],):
            raise ValueError(f"batch_norm: weight {weight.shape} and bias {bias.shape} must be "
                             f"({x.shape[1]},), one per channel of input {x.shape}")
        args = (x, weight, bias)
    return apply(_batch_norm, args, {"eps": float(eps), "stats": stats})
