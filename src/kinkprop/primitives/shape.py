"""Shape primitives: linear maps that move, copy or select elements. Their JVP is the forward map
applied to the tangent; their VJP its transpose."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor, as_tensor
from .core import apply, register


def _linear(name, f, transpose):
    """Register a primitive linear in its single input: ``f(x, **p)`` and ``transpose(g, res)``."""

    def forward(x, **p):
        return f(x, **p), (x.shape, p)

    return register(
        name,
        forward,
        lambda g, res, needs, c: (transpose(g, *res),),
        lambda ts, res, c: f(ts[0], **res[1]),
        moves=True,
    )


_reshape = _linear("reshape", lambda x, shape: np.reshape(x, shape),
                   lambda g, shape, p: np.reshape(g, shape))
_transpose = _linear("transpose", lambda x, axes: np.transpose(x, axes),
                     lambda g, shape, p: np.transpose(g, np.argsort(p["axes"])))
_broadcast_to = _linear("broadcast_to", lambda x, shape: np.broadcast_to(x, shape),
                        lambda g, shape, p: _sum_to(g, shape))
_pad = _linear(
    "pad", lambda x, width: np.pad(x, width),
    lambda g, shape, p: g[tuple(slice(lo, lo + n) for (lo, _), n in zip(p["width"], shape))])


def _sum_to(g, shape):
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def _getitem_T(g, shape, p):
    out = np.zeros(shape, dtype=g.dtype)
    if p["basic"]:
        out[p["index"]] = g
    else:
        np.add.at(out, p["index"], g)  # repeated integer indices accumulate
    return out


_getitem = _linear("getitem", lambda x, index, basic: x[index], _getitem_T)


def reshape(x, *shape) -> Tensor:
    """Reshape (``-1`` infers one dimension)."""
    x = as_tensor(x)
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    shape = tuple(int(n) for n in shape)
    known = int(np.prod([n for n in shape if n != -1]))
    free = shape.count(-1)
    size = x.size
    if free > 1 or (free == 0 and known != size) or (free == 1 and (known == 0 or size % known)):
        raise ValueError(f"reshape: cannot reshape {x.shape} into {shape}")
    return apply(_reshape, (x,), {"shape": shape})


def transpose(x, *axes) -> Tensor:
    """Permute axes (reverse them when none are given); ``permute`` is the same."""
    x = as_tensor(x)
    axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    axes = tuple(range(x.ndim))[::-1] if not axes else tuple(int(a) % x.ndim for a in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(f"transpose: axes {axes} are not a permutation for shape {x.shape}")
    return apply(_transpose, (x,), {"axes": axes})


permute = transpose


def swapaxes(x, a: int, b: int) -> Tensor:
    x = as_tensor(x)
    axes = list(range(x.ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return transpose(x, axes)


def broadcast_to(x, shape) -> Tensor:
    """Broadcast to ``shape``; the VJP sums over the broadcast axes."""
    x = as_tensor(x)
    try:
        np.broadcast_shapes(x.shape, tuple(shape))
    except ValueError:
        raise ValueError(f"broadcast_to: cannot broadcast {x.shape} to {tuple(shape)}") from None
    return apply(_broadcast_to, (x,), {"shape": tuple(shape)})


def expand_dims(x, axis: int) -> Tensor:
    x = as_tensor(x)
    shape = list(x.shape)
    shape.insert(axis % (x.ndim + 1), 1)
    return reshape(x, tuple(shape))


unsqueeze = expand_dims


def squeeze(x, axis=None) -> Tensor:
    x = as_tensor(x)
    if axis is None:
        shape = tuple(n for n in x.shape if n != 1)
    else:
        axis = axis % x.ndim
        if x.shape[axis] != 1:
            raise ValueError(f"squeeze: axis {axis} of shape {x.shape} is not 1")
        shape = x.shape[:axis] + x.shape[axis + 1:]
    return reshape(x, shape)


def flatten(x, start_dim: int = 0) -> Tensor:
    x = as_tensor(x)
    return reshape(x, x.shape[:start_dim] + (-1,))


def pad(x, width) -> Tensor:
    """Zero padding; ``width`` as in ``numpy.pad``: one ``(before, after)`` pair per axis."""
    x = as_tensor(x)
    width = tuple((int(a), int(b)) for a, b in np.broadcast_to(np.asarray(width), (x.ndim, 2)))
    return apply(_pad, (x,), {"width": width})


def _is_basic(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (slice, int, np.integer, type(None), type(Ellipsis))) for i in items)


def getitem(x, index) -> Tensor:
    """x[index] for slices, integers, integer arrays and boolean masks (not differentiated)."""
    x = as_tensor(x)
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    elif isinstance(index, list):
        index = np.asarray(index)
    try:
        x.data[index]
    except IndexError as e:
        raise IndexError(f"getitem: {e} (tensor of shape {x.shape})") from None
    return apply(_getitem, (x,), {"index": index, "basic": _is_basic(index)})


# -- several inputs ----------------------------------------------------------------------------


def _split_back(g, res):
    axis, sizes = res
    return np.split(g, np.cumsum(sizes)[:-1], axis=axis)


def _concat_jvp(ts, res, c):
    axis, sizes, shapes = res
    parts = [np.zeros(s) if t is None else t for t, s in zip(ts, shapes)]
    return np.concatenate(parts, axis=axis)


def _concat_fwd(*xs, axis):
    return np.concatenate(xs, axis=axis), (axis, [x.shape[axis] for x in xs], [x.shape for x in xs])


_concatenate = register(
    "concatenate", _concat_fwd,
    lambda g, res, needs, c: tuple(_split_back(g, res[:2])),
    _concat_jvp,
    moves=True,
)


def concatenate(xs, axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    xs = _lift_all(xs)
    nd = xs[0].ndim
    ok = nd > 0 and -nd <= axis < nd and all(
        x.ndim == nd and all(a == b for i, (a, b) in enumerate(zip(x.shape, xs[0].shape))
                             if i != axis % nd) for x in xs)
    if not ok:
        raise ValueError(f"concatenate: shapes {[x.shape for x in xs]} do not match off axis {axis}")
    return apply(_concatenate, xs, {"axis": axis % xs[0].ndim})


cat = concatenate


def stack(xs, axis: int = 0) -> Tensor:
    """Join tensors along a new axis."""
    xs = _lift_all(xs)
    if len({x.shape for x in xs}) != 1:
        raise ValueError(f"stack: all shapes must be equal, got {[x.shape for x in xs]}")
    axis = axis % (xs[0].ndim + 1)
    return concatenate([expand_dims(x, axis) for x in xs], axis=axis)


def _lift_all(xs):
    xs = list(xs)
    if not xs:
        raise ValueError("need at least one tensor")
    tensors = [x for x in xs if isinstance(x, Tensor)]
    like = tensors[0] if tensors else None
    return tuple(as_tensor(x, like=like) for x in xs)
