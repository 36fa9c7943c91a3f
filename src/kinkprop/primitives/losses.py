"""Losses, each a mean over the batch as PyTorch's defaults.

``cross_entropy`` is one fused primitive (log-softmax + negative log-likelihood); ``mse_loss`` is a
composition of smooth primitives; ``l1_loss`` uses its own |.| record (policy key ``l1_loss``, since
frameworks treat it apart from ``abs``); ``hinge_loss`` is ``mean(relu(margin - y * s))`` and so
follows the relu policy.
"""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor, as_tensor
from .core import apply, choose, register
from .elementwise import mul, sub
from .nonsmooth import _l1, relu
from .reductions import mean


def _ce_fwd(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    logp = z - lse
    n = logits.shape[0]
    loss = -logp[np.arange(n), labels].mean()
    return np.asarray(loss, dtype=logits.dtype), (logp, labels)


def _ce_delta(res):
    """d loss / d logits without the incoming scalar: (softmax - onehot) / n."""
    logp, labels = res
    n = logp.shape[0]
    d = np.exp(logp)
    d[np.arange(n), labels] -= 1.0
    d /= n
    return d


_cross_entropy = register(
    "cross_entropy", _ce_fwd,
    lambda g, res, needs, c: (_ce_delta(res) * g,),
    lambda ts, res, c: np.asarray((_ce_delta(res) * ts[0]).sum(), dtype=ts[0].dtype),
)


def cross_entropy(logits, labels) -> Tensor:
    """Mean over the batch of -log softmax(logits)[label]; ``logits`` (N, C), integer labels (N,)."""
    logits = as_tensor(logits)
    labels = labels.data if isinstance(labels, Tensor) else np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, C), got shape {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy: labels must have shape ({logits.shape[0]},), got "
                         f"{labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"cross_entropy: labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"cross_entropy: labels must lie in [0, {logits.shape[1]}), got "
                         f"[{labels.min()}, {labels.max()}]")
    return apply(_cross_entropy, (logits,), {"labels": labels.astype(np.intp)})


def _same_shape(name, a, b):
    if a.shape != b.shape:
        raise ValueError(f"{name}: input {a.shape} and target {b.shape} must have the same shape")


def mse_loss(input, target) -> Tensor:  # noqa: A002 - mirrors torch
    """mean((input - target)**2)."""
    input, target = as_tensor(input), as_tensor(target, like=as_tensor(input))
    _same_shape("mse_loss", input, target)
    d = sub(input, target)
    return mean(mul(d, d))


def l1_loss(input, target, at_kink=None) -> Tensor:  # noqa: A002
    """mean|input - target|. Where input = target the derivative of |.| is ``at_kink``: PyTorch and
    TensorFlow 0, JAX (through abs) 1."""
    input = as_tensor(input)
    target = as_tensor(target, like=input)
    _same_shape("l1_loss", input, target)
    return mean(apply(_l1, (sub(input, target),), choice=choose("l1_loss", at_kink)))


def hinge_loss(scores, labels, margin: float = 1.0, at_kink=None) -> Tensor:
    """mean(relu(margin - labels * scores)) for labels in {-1, +1}; the kink follows relu's rule."""
    scores = as_tensor(scores)
    labels = as_tensor(labels, like=scores)
    _same_shape("hinge_loss", scores, labels)
    return mean(relu(sub(margin, mul(labels, scores)), at_kink=at_kink))
