"""Functional transformations on NumPy arrays: grad, value_and_grad, vjp, jvp.

Each takes a function of tensors (``f(*tensors) -> Tensor``) and returns a function of NumPy arrays
that returns NumPy arrays. They record a tape for one call and sweep it; the kink policy in force
when the returned function runs is the one recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import tape
from .kinks import directional
from .precision import is_float
from .tensor import Tensor


def _argnums(argnums, n) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for i in nums:
        if not -n <= i < n:
            raise ValueError(f"argnums {argnums} out of range for {n} arguments")
    return tuple(i % n for i in nums)


def _trace(f, args, argnums):
    inputs = []
    for i, a in enumerate(args):
        arr = a.data if isinstance(a, Tensor) else np.asarray(a)
        if i in argnums:
            if not is_float(arr.dtype):
                arr = arr.astype(np.float64) if arr.dtype.kind in "iub" else arr
            inputs.append(Tensor(arr, requires_grad=True))
        else:
            inputs.append(Tensor._wrap(arr))
    with tape.enable_grad():
        out = f(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"the function must return a kp.Tensor, got {type(out).__name__}")
    return inputs, out


def _cotangents(out, inputs, argnums, g, retain):
    wrt = [inputs[i] for i in argnums]
    if not out.requires_grad:
        return [np.zeros_like(t.data) for t in wrt]
    directional.resolve_if_needed(out, leaves=wrt)
    found = tape.backward(out, g, retain_graph=retain, inputs=wrt)
    return [np.broadcast_to(found[id(t)], t.shape).copy() if id(t) in found
            else np.zeros_like(t.data) for t in wrt]


def value_and_grad(f: Callable, argnums: int | Sequence[int] = 0) -> Callable:
    """``(value, gradient)`` of a scalar-valued ``f``; a tuple of gradients for several argnums."""

    def wrapped(*args):
        nums = _argnums(argnums, len(args))
        inputs, out = _trace(f, args, nums)
        if out.data.size != 1:
            raise ValueError(f"grad needs a scalar output, got shape {out.shape}; use kp.vjp")
        grads = _cotangents(out, inputs, nums, np.ones_like(out.data), retain=False)
        return out.data, (grads[0] if isinstance(argnums, int) else tuple(grads))

    return wrapped


def grad(f: Callable, argnums: int | Sequence[int] = 0) -> Callable:
    """Gradient of a scalar-valued ``f`` with respect to argument(s) ``argnums``."""
    vg = value_and_grad(f, argnums)
    return lambda *args: vg(*args)[1]


def vjp(f: Callable, *primals):
    """``(f(*primals), vjp_fn)``; ``vjp_fn(g)`` returns one cotangent per primal (reusable)."""
    nums = tuple(range(len(primals)))
    inputs, out = _trace(f, primals, nums)

    def vjp_fn(g):
        g = np.asarray(g)
        if g.shape != out.shape:
            raise ValueError(f"vjp: cotangent has shape {g.shape}, output has {out.shape}")
        return tuple(_cotangents(out, inputs, nums, g.astype(out.dtype), retain=True))

    return out.data, vjp_fn


def jvp(f: Callable, primals: Sequence, tangents: Sequence):
    """``(f(*primals), J t)``: forward mode along ``tangents`` (one per primal) over the tape."""
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    nums = tuple(range(len(primals)))
    inputs, out = _trace(f, primals, nums)
    ts = {}
    for t_in, tan in zip(inputs, tangents):
        tan = np.asarray(tan)
        if tan.shape != t_in.shape:
            raise ValueError(f"jvp: tangent shape {tan.shape} differs from primal {t_in.shape}")
        ts[id(t_in)] = tan.astype(t_in.dtype)
    if not out.requires_grad:
        return out.data, np.zeros_like(out.data)
    directional.resolve_if_needed(out, leaves=inputs)
    res = tape.forward_sweep(out, [ts])[0]
    t_out = res.get(id(out))
    return out.data, (np.zeros_like(out.data) if t_out is None else
                      np.broadcast_to(t_out, out.shape).copy())
