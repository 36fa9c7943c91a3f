"""Every primitive against float64 finite differences (both modes), and the adjoint identity.

Layer 1 of the test plan (see STYLE.md): in smooth regions only. Inputs of non-smooth primitives
are drawn on staggered grids so that every input sits at least 0.15 from every kink (and tied inputs
of maximum / max / max_pool2d differ by at least 0.14), while the finite-difference step is
``1e-6 * N(0, 1)``; a hook asserts that no kink was hit. The adjoint identity ``<v, J u> = <J^T v, u>``
is checked everywhere, including inputs exactly on kinks (a hook asserts they were hit) under
several policies, since JVP and VJP must apply the same recorded kink choice.

Pinned values at kinks live in other test files.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

import kinkprop as kp
from kinkprop import tape
from kinkprop.diagnostics import check_adjoint, check_grad

SEEDS = range(3)

# -- data ------------------------------------------------------------------------------------


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(name.encode()), seed])


def _shape(rng, ndim=(1, 3), size=(1, 4)) -> tuple[int, ...]:
    nd = int(rng.integers(ndim[0], ndim[1] + 1))
    return tuple(int(n) for n in rng.integers(size[0], size[1] + 1, nd))


def _bshapes(rng, k=2, ndim=(1, 3)) -> list[tuple[int, ...]]:
    """``k`` shapes that broadcast together: leading axes dropped, some axes set to 1."""
    full = _shape(rng, ndim, (2, 4))
    out = []
    for _ in range(k):
        drop = int(rng.integers(0, len(full) + 1)) if rng.random() < 0.4 else 0
        out.append(tuple(1 if rng.random() < 0.3 else n for n in full[drop:]))
    return out


def _normal(rng, shape, scale=1.0):
    return np.asarray(scale * rng.standard_normal(shape))


# Staggered grids keep non-smooth inputs off their kinks. Kinks sit on the grid 0.5 Z (0, 6, and
# the bounds used below); "off" values are 0.5 k + 0.25 +- 0.05, at least 0.2 from any grid point
# and 0.15 from any other noisy value on the other grid.
STEP = 0.5


def _on(rng, shape, k=(-4, 4)):
    """Values on the kink grid (with +-0.05 noise unless exact)."""
    return np.asarray(STEP * rng.integers(k[0], k[1] + 1, shape) + rng.uniform(-0.05, 0.05, shape))


def _off(rng, shape, k=(-4, 4)):
    """Values between kink-grid points: 0.5 k + 0.25 +- 0.05."""
    return np.asarray(STEP * rng.integers(k[0], k[1] + 1, shape) + 0.25
                      + rng.uniform(-0.05, 0.05, shape))


def _distinct(rng, shape, spacing=0.2):
    """All-distinct values, gaps at least spacing - 0.06 (no ties in any max)."""
    n = int(np.prod(shape))
    return (spacing * rng.permutation(n) - spacing * n / 2
            + rng.uniform(-0.03, 0.03, n)).reshape(shape)


def _put(rng, x, value, frac=0.4):
    """Set a random fraction (at least one element) of ``x`` to ``value`` (broadcast), in place."""
    mask = rng.random(x.shape) < frac
    mask.flat[int(rng.integers(mask.size))] = True
    x[mask] = np.broadcast_to(value, x.shape)[mask]
    return x


# -- cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``build(rng) -> (f, args)`` draws inputs in the smooth region; ``kink(rng)`` on kinks."""

    name: str
    build: Callable
    kink: Callable | None = None
    argnums: int | tuple | None = None

    @property
    def nonsmooth(self) -> bool:
        return self.kink is not None


CASES: list[Case] = []


def case(name, build, kink=None, argnums=None):
    CASES.append(Case(name, build, kink, argnums))


# smooth elementwise, unary
for _name, _domain in [
    ("neg", lambda r, s: _normal(r, s, 2)),
    ("exp", lambda r, s: _normal(r, s)),
    ("log", lambda r, s: r.uniform(0.3, 3.0, s)),
    ("log1p", lambda r, s: r.uniform(-0.7, 3.0, s)),
    ("sqrt", lambda r, s: r.uniform(0.2, 3.0, s)),
    ("tanh", lambda r, s: _normal(r, s, 2)),
    ("sigmoid", lambda r, s: _normal(r, s, 2)),
    ("softplus", lambda r, s: _normal(r, s, 2)),
]:
    case(_name, lambda r, n=_name, d=_domain: (getattr(kp, n), [d(r, _shape(r))]))


# smooth elementwise, binary with broadcasting
def _binary(op, da=_normal, db=_normal):
    def build(r):
        sa, sb = _bshapes(r)
        return op, [da(r, sa), db(r, sb)]

    return build


def _away_from_zero(r, s):
    return r.choice([-1.0, 1.0], s) * r.uniform(0.5, 2.0, s)


def _positive(r, s):
    return r.uniform(0.5, 2.0, s)


case("add", _binary(kp.add))
case("sub", _binary(kp.sub))
case("mul", _binary(kp.mul))
case("div", _binary(kp.div, db=_away_from_zero))
case("pow[tensor_exponent]", _binary(kp.pow, da=_positive))
def _pow_scalar_exponent(r):
    e = float(r.choice([2.0, 0.5, -1.5, 3.7]))
    return (lambda a: kp.pow(a, e)), [_positive(r, _shape(r))]


case("pow[scalar_exponent]", _pow_scalar_exponent)
case("pow[int_exponent_negative_base]", lambda r: (lambda a: kp.pow(a, 3),
                                                   [_away_from_zero(r, _shape(r))]))
case("pow[scalar_base]", lambda r: (lambda b: kp.pow(2.5, b), [_normal(r, _shape(r))]))
case("operators", lambda r: (
    lambda a, b: (2.0 - a) * b / (abs(b) + 1.0) + (-a) ** 2 - 1.5 * b + (a @ b.T).sum(),
    [_normal(r, (3, 4)), r.uniform(0.5, 2.0, (3, 4))]))


def _where(r):
    sc, sa, sb = _bshapes(r, 3)
    cond = r.random(sc) < 0.5
    return (lambda c, a, b: kp.where(c, a, b)), [cond, _normal(r, sa), _normal(r, sb)]


case("where", _where)


# matmul: 1-D, 2-D, batched, broadcasting batch dims
def _matmul(kind):
    def build(r):
        m, k, n = (int(x) for x in r.integers(1, 5, 3))
        b1, b2 = (int(x) for x in r.integers(2, 4, 2))
        sa, sb = {
            "1d@1d": ((k,), (k,)),
            "1d@2d": ((k,), (k, n)),
            "2d@1d": ((m, k), (k,)),
            "2d@2d": ((m, k), (k, n)),
            "batched": ((b1, m, k), (b1, k, n)),
            "broadcast_batch": ((b2, 1, m, k), (b1, k, n)),
            "1d@batched": ((k,), (b1, k, n)),
            "batched@1d": ((b1, b2, m, k), (k,)),
            "2d@batched": ((m, k), (b1, k, n)),
        }[kind]
        return kp.matmul, [_normal(r, sa), _normal(r, sb)]

    return build


for _kind in ["1d@1d", "1d@2d", "2d@1d", "2d@2d", "batched", "broadcast_batch", "1d@batched",
              "batched@1d", "2d@batched"]:
    case(f"matmul[{_kind}]", _matmul(_kind))


def _linear(bias, batch):
    def build(r):
        i, o = (int(x) for x in r.integers(1, 5, 2))
        x = _normal(r, (*batch, i))
        args = [x, _normal(r, (o, i))] + ([_normal(r, (o,))] if bias else [])
        return kp.linear, args

    return build


case("linear[bias]", _linear(True, (3,)))
case("linear[no_bias_batched]", _linear(False, (2, 3)))
case("linear[1d]", _linear(True, ()))


# reductions over axis None / int / tuple, with and without keepdims
def _axis(r, ndim, kind):
    if kind == "None":
        return None
    if kind == "int":
        return int(r.integers(-ndim, ndim))
    k = int(r.integers(1, ndim + 1))
    return tuple(int(a) - (ndim if r.random() < 0.5 else 0)
                 for a in r.choice(ndim, k, replace=False))


def _reduction(op, kind, keepdims, domain=_normal, **kw):
    def build(r):
        shape = _shape(r, (1, 3), (2, 4))
        axis = _axis(r, len(shape), kind)
        return (lambda x: op(x, axis=axis, keepdims=keepdims, **kw)), [domain(r, shape)]

    return build


for _op in ["sum", "mean", "var", "logsumexp"]:
    for _kind in ["None", "int", "tuple"]:
        for _keep in [False, True]:
            case(f"{_op}[axis={_kind},keepdims={_keep}]",
                 _reduction(getattr(kp, _op), _kind, _keep))
case("var[ddof=1]", _reduction(kp.var, "int", False, ddof=1))
case("tensor_methods", lambda r: (lambda x: x.sum(axis=0) + x.mean(axis=0, keepdims=True)
                                  + x.var(axis=0), [_normal(r, (3, 2))]))


def _softmax_like(op):
    def build(r):
        shape = _shape(r, (1, 3), (2, 4))
        axis = int(r.integers(-len(shape), len(shape)))
        return (lambda x: op(x, axis=axis)), [_normal(r, shape, 2)]

    return build


case("softmax", _softmax_like(kp.softmax))
case("log_softmax", _softmax_like(kp.log_softmax))


# shape primitives
def _reshape(r):
    shape = _shape(r, (1, 3), (1, 4))
    size = int(np.prod(shape))
    options = [(size,), (-1,), shape[::-1], (1, size, 1), (-1, shape[-1])]
    new = options[int(r.integers(len(options)))]
    return (lambda x: kp.reshape(x, tuple(new))), [_normal(r, shape)]


def _transpose(r):
    shape = _shape(r, (1, 4), (1, 4))
    axes = tuple(int(a) for a in r.permutation(len(shape)))
    return (lambda x: kp.transpose(x, axes)), [_normal(r, shape)]


def _permute(r):
    shape = _shape(r, (2, 4), (1, 4))
    axes = [int(a) - len(shape) for a in r.permutation(len(shape))]  # negative axes
    return (lambda x: x.permute(*axes)), [_normal(r, shape)]


def _swapaxes(r):
    shape = _shape(r, (2, 3), (1, 4))
    a, b = (int(x) for x in r.choice(len(shape), 2, replace=False))
    return (lambda x: kp.swapaxes(x, a, b) + x.T.T.transpose(*range(len(shape))).sum()), \
        [_normal(r, shape)]


def _broadcast_to(r):
    small, full = _bshapes(r, 2)
    full = np.broadcast_shapes(small, full)
    full = (int(r.integers(1, 4)),) + full  # and a new leading axis
    return (lambda x: kp.broadcast_to(x, full)), [_normal(r, small)]


def _expand_squeeze(r):
    shape = _shape(r, (1, 3), (1, 4))
    axis = int(r.integers(-len(shape) - 1, len(shape) + 1))
    return (lambda x: kp.squeeze(kp.expand_dims(x, axis) * 2.0, axis) + kp.unsqueeze(x, axis).sum()
            ), [_normal(r, shape)]


def _squeeze_all(r):
    shape = tuple(int(n) for n in r.choice([1, 2, 3], int(r.integers(1, 5))))
    return (lambda x: kp.squeeze(x) * kp.flatten(x).sum()), [_normal(r, shape)]


def _concatenate(r):
    base = list(_shape(r, (1, 3), (1, 4)))
    axis = int(r.integers(-len(base), len(base)))
    shapes = []
    for _ in range(int(r.integers(2, 4))):
        s = list(base)
        s[axis] = int(r.integers(1, 4))
        shapes.append(tuple(s))
    return (lambda *xs: kp.concatenate(xs, axis=axis)), [_normal(r, s) for s in shapes]


def _stack(r):
    shape = _shape(r, (1, 3), (1, 4))
    axis = int(r.integers(-len(shape) - 1, len(shape) + 1))
    k = int(r.integers(2, 4))
    return (lambda *xs: kp.stack(xs, axis=axis)), [_normal(r, shape) for _ in range(k)]


def _pad(r):
    shape = _shape(r, (1, 3), (1, 4))
    width = [tuple(int(w) for w in r.integers(0, 3, 2)) for _ in shape]
    return (lambda x: kp.pad(x, width)), [_normal(r, shape)]


case("reshape", _reshape)
case("transpose", _transpose)
case("permute", _permute)
case("swapaxes", _swapaxes)
case("broadcast_to", _broadcast_to)
case("expand_dims_squeeze", _expand_squeeze)
case("squeeze_all_flatten", _squeeze_all)
case("concatenate", _concatenate)
case("cat_constant", lambda r: ((lambda x: kp.cat([x, np.ones((2, 3)), x], axis=0)),
                                [_normal(r, (1, 3))]))
case("stack", _stack)
case("pad", _pad)


# getitem: slices, integers, integer arrays with repeats, boolean masks, mixed
def _getitem(kind):
    def build(r):
        shape = _shape(r, (2, 3), (2, 5))
        n0 = shape[0]
        reps = r.integers(0, n0, int(r.integers(2, 7)))
        reps[-1] = reps[0]  # at least one repeat
        index = {
            "slices": (slice(int(r.integers(0, n0)), None), slice(None, None, 2)),
            "negative_step": slice(None, None, -1),
            "int": (int(r.integers(-n0, n0)),),
            "int_array_repeats": reps,
            "int_list": [int(i) for i in reps],
            "tuple_arrays_repeats": (reps, r.integers(0, shape[1], reps.size)),
            "mixed_slice_array": (slice(None), r.integers(0, shape[1], 5)),
            "bool_mask": _mask(r, shape),
            "bool_rows": _mask(r, (n0,)),
            "none_ellipsis": (None, Ellipsis, int(r.integers(0, shape[-1]))),
        }[kind]
        return (lambda x: kp.getitem(x, index) * 1.5), [_normal(r, shape)]

    return build


def _mask(r, shape):
    m = r.random(shape) < 0.5
    m.flat[int(r.integers(m.size))] = True
    return m


for _kind in ["slices", "negative_step", "int", "int_array_repeats", "int_list",
              "tuple_arrays_repeats", "mixed_slice_array", "bool_mask", "bool_rows",
              "none_ellipsis"]:
    case(f"getitem[{_kind}]", _getitem(_kind))
case("getitem[operator]", lambda r: ((lambda x: x[1:, [0, 0, 1]] + x[0, 0]), [_normal(r, (3, 2))]))


# conv2d and pooling
def _conv2d(bias, stride, padding):
    def build(r):
        n, c, o = int(r.integers(1, 3)), int(r.integers(1, 4)), int(r.integers(1, 4))
        kh, kw = (int(k) for k in r.integers(1, 4, 2))
        h, w = kh + int(r.integers(0, 4)), kw + int(r.integers(1, 4))  # non-square
        args = [_normal(r, (n, c, h, w)), _normal(r, (o, c, kh, kw))]
        if bias:
            args.append(_normal(r, (o,)))
        return (lambda x, wt, *b: kp.conv2d(x, wt, b[0] if b else None, stride=stride,
                                            padding=padding)), args

    return build


for _bias, _stride, _padding in [(True, 1, 0), (False, 1, 0), (True, 2, 1), (False, (1, 2), (1, 0)),
                                 (True, (2, 1), (0, 2))]:
    case(f"conv2d[bias={_bias},stride={_stride},padding={_padding}]",
         _conv2d(_bias, _stride, _padding))


# batch normalisation (training mode), 2-D and 4-D, with and without weight and bias
def _batch_norm(ndim, affine):
    def build(r):
        shape = (int(r.integers(3, 6)), int(r.integers(1, 4))) + (3,) * (ndim - 2)
        args = [_normal(r, shape, 2) + 1.0]
        if affine:
            args += [_normal(r, shape[1:2]), _normal(r, shape[1:2])]
        return (lambda x, *wb: kp.batch_norm(x, *wb, eps=1e-3)), args

    return build


for _ndim, _affine in [(2, True), (4, True), (4, False), (3, True)]:
    case(f"batch_norm[{_ndim}d,affine={_affine}]", _batch_norm(_ndim, _affine))


def _pool_geometry(r):
    kh, kw = (int(k) for k in r.integers(1, 4, 2))
    stride = None if r.random() < 0.4 else (int(r.integers(1, 3)), int(r.integers(1, 3)))
    padding = (int(r.integers(0, kh // 2 + 1)), int(r.integers(0, kw // 2 + 1)))
    shape = (int(r.integers(1, 3)), int(r.integers(1, 3)), kh + int(r.integers(0, 4)),
             kw + int(r.integers(1, 4)))
    return (kh, kw), stride, padding, shape


def _avg_pool(r):
    kernel, stride, padding, shape = _pool_geometry(r)
    return (lambda x: kp.avg_pool2d(x, kernel, stride, padding)), [_normal(r, shape)]


def _max_pool(r):
    kernel, stride, padding, shape = _pool_geometry(r)
    return (lambda x: kp.max_pool2d(x, kernel, stride, padding)), [_distinct(r, shape)]


def _max_pool_kink(r):
    kernel, stride, padding, shape = _pool_geometry(r)
    kernel = (max(kernel[0], 2), kernel[1])  # windows of at least two elements, to tie
    shape = (shape[0], shape[1], shape[2] + 1, shape[3])
    x = r.integers(0, 3, shape).astype(float)  # few values: many tied windows
    x[..., 0, 0] = x[..., 1, 0] = 5.0  # at least one tie (rows 0 and 1 share a window)
    return (lambda x: kp.max_pool2d(x, kernel, stride, padding)), [x]


case("avg_pool2d", _avg_pool)
case("max_pool2d", _max_pool, _max_pool_kink)


# losses
def _cross_entropy(r):
    n, c = int(r.integers(1, 6)), int(r.integers(2, 6))
    return kp.cross_entropy, [_normal(r, (n, c), 2), r.integers(0, c, n)]


def _mse(r):
    shape = _shape(r)
    return kp.mse_loss, [_normal(r, shape), _normal(r, shape)]


case("cross_entropy", _cross_entropy)
case("mse_loss", _mse)


# -- non-smooth primitives, off their kinks (and on them for the adjoint) -----------------------


def _unary_ns(op, kinks, k=(-4, 4)):
    """Smooth-region and on-kink builders for an elementwise kink at the grid points ``kinks``."""

    def build(r):
        return op, [_off(r, _shape(r), k)]

    def kink(r):
        x = _off(r, _shape(r), k)
        for loc in kinks:
            _put(r, x, loc, 0.25)
        return op, [x]

    return build, kink


for _name, _op, _kinks, _k in [
    ("relu", kp.relu, [0.0], (-4, 4)),
    ("relu[-0.0]", kp.relu, [-0.0], (-4, 4)),
    ("leaky_relu", lambda x: kp.leaky_relu(x, 0.2), [0.0], (-4, 4)),
    ("abs", kp.abs, [0.0], (-4, 4)),
    ("relu6", kp.relu6, [0.0, 6.0], (-2, 14)),
    ("hardswish", kp.hardswish, [-3.0, 3.0], (-6, 6)),
    ("hardtanh", lambda x: kp.hardtanh(x, -1.5, 1.0), [-1.5, 1.0], (-5, 4)),
    ("clamp[scalar]", lambda x: kp.clamp(x, -1.0, 1.5), [-1.0, 1.5], (-4, 5)),
    ("clamp[scalar_min_only]", lambda x: kp.clamp(x, min=0.5), [0.5], (-3, 3)),
    ("clamp[scalar_max_only]", lambda x: x.clamp(max=-0.5), [-0.5], (-3, 3)),
    ("tensor_abs_relu_methods", lambda x: abs(x) * 0.5 + x.relu(), [0.0], (-4, 4)),
]:
    case(_name, *_unary_ns(_op, _kinks, _k))


def _clamp_tensor(which):
    """x, min and max as tensors, broadcasting; ``which`` picks the bounds given."""

    def draw(r):
        sx, slo, shi = _bshapes(r, 3)
        x = _off(r, sx, (-6, 6))
        lo = STEP * r.integers(-4, -1, slo) + r.uniform(-0.05, 0.05, slo)  # <= -1
        hi = STEP * r.integers(2, 5, shi) + r.uniform(-0.05, 0.05, shi)  # >= 1
        return x, lo, hi

    def f(x, lo, hi):
        return kp.clamp(x, lo if which != "max" else None, hi if which != "min" else None)

    def build(r):
        return f, list(draw(r))

    def kink(r):
        x, lo, hi = draw(r)
        full = np.broadcast_shapes(x.shape, lo.shape, hi.shape)
        x = np.broadcast_to(x, full).copy()  # x full-shaped, so each element can sit on a bound
        if which != "max":
            _put(r, x, lo, 0.25)
        if which != "min":
            _put(r, x, hi, 0.25)
        return f, [x, lo, hi]

    return build, kink


for _which in ["both", "min", "max"]:
    case(f"clamp[tensor_{_which}]", *_clamp_tensor(_which))


def _pairwise(op):
    def build(r):
        sa, sb = _bshapes(r)
        return op, [_on(r, sa), _off(r, sb)]  # staggered grids: |a - b| >= 0.15

    def kink(r):
        sa, sb = _bshapes(r)
        full = np.broadcast_shapes(sa, sb)
        a, b = _on(r, full), _off(r, sb)
        _put(r, a, b, 0.4)  # ties, some of them against a broadcast b
        return op, [a, b]

    return build, kink


case("maximum", *_pairwise(kp.maximum))
case("minimum", *_pairwise(kp.minimum))
case("maximum[scalar]", lambda r: ((lambda a: kp.maximum(a, 0.0)), [_off(r, _shape(r))]),
     lambda r: ((lambda a: kp.maximum(a, 0.0)), [_put(r, _off(r, _shape(r)), 0.0)]))


def _max_reduction(op, axis_kind, keepdims):
    def pick(r):
        shape = _shape(r, (1, 3), (2, 4))
        axis = None if axis_kind == "None" else int(r.integers(-len(shape), len(shape)))
        return shape, axis, (lambda x: op(x, axis=axis, keepdims=keepdims))

    def build(r):
        shape, _, f = pick(r)
        return f, [_distinct(r, shape)]

    def kink(r):
        shape, axis, f = pick(r)
        x = r.integers(0, 2, shape).astype(float)  # two values: ties in most slices
        extreme = 1.0 if op is kp.max else 0.0
        if axis is None:
            x.flat[0] = x.flat[-1] = extreme
        else:  # one whole slice along the axis tied
            x[tuple(slice(None) if d == axis % x.ndim else 0 for d in range(x.ndim))] = extreme
        return f, [x]

    return build, kink


for _op in ["max", "min"]:
    for _kind in ["None", "int"]:
        for _keep in [False, True]:
            case(f"{_op}[axis={_kind},keepdims={_keep}]",
                 *_max_reduction(getattr(kp, _op), _kind, _keep))


def _l1(r):
    shape = _shape(r)
    return kp.l1_loss, [_off(r, shape), _on(r, shape)]


def _l1_kink(r):
    shape = _shape(r)
    a, b = _off(r, shape), _on(r, shape)
    return kp.l1_loss, [_put(r, a, b), b]


def _hinge(r, on_kink=False):
    shape = _shape(r)
    labels = r.choice([-1.0, 1.0], shape)
    z = _off(r, shape)  # margin - labels * scores
    if on_kink:
        _put(r, z, 0.0)
    return kp.hinge_loss, [labels * (1.0 - z), labels]


case("l1_loss", _l1, _l1_kink)
case("hinge_loss", _hinge, lambda r: _hinge(r, on_kink=True))


# -- compositions: several paths through shared tensors ----------------------------------------


def _net(act, pool):
    def f(x, w, b, w2):
        h = pool(act(kp.conv2d(x, w, b, padding=1)), 2)
        return kp.cross_entropy(kp.linear(kp.flatten(h, 1), w2), np.array([1, 0]))

    def build(r):
        return f, [_normal(r, (2, 1, 4, 4)), _normal(r, (2, 1, 3, 3)), _normal(r, (2,)),
                   _normal(r, (3, 8))]

    return f, build


_, _build_net = _net(kp.tanh, kp.avg_pool2d)
_kinky_net, _ = _net(kp.relu, kp.max_pool2d)


def _kinky_net_kink(r):
    # integer data and weights: exact zeros before the relu, exact ties in the pooling windows
    return _kinky_net, [r.integers(-1, 2, (2, 1, 4, 4)).astype(float),
                        r.integers(-1, 2, (2, 1, 3, 3)).astype(float), np.array([0.0, 1.0]),
                        _normal(r, (3, 8))]


def _diamond(x):
    a = kp.exp(x)
    b = kp.tanh(a)
    return kp.sum((b * a + x) * b)  # x, a and b each reach the output along two paths


# x reaches the output directly and through exp: the tape's topological order must see both
case("composite[shared_input]", lambda r: ((lambda x: kp.sum(kp.exp(x) * x)),
                                           [_normal(r, _shape(r))]))
case("composite[diamond]", lambda r: (_diamond, [_normal(r, _shape(r))]))
case("composite[net]", _build_net)
case("composite[relu_maxpool_net]", lambda r: (_kinky_net, [  # a large bias: relu active
    _normal(r, (2, 1, 4, 4)), _normal(r, (2, 1, 3, 3)), 20.0 + _normal(r, (2,)),
    _normal(r, (3, 8))]), _kinky_net_kink)

NONSMOOTH = [c for c in CASES if c.nonsmooth]

POLICIES = {
    "pytorch": ("pytorch", {}),
    "jax": ("jax", {}),
    "tensorflow": ("tensorflow", {}),
    "relu=0.5,ties=split": ("pytorch", {
        "relu": 0.5, "leaky_relu": 0.5, "abs": 0.5, "relu6": (0.5, 0.5), "hardtanh": (0.5, 0.5),
        "hardswish": (-0.25, 1.25),
        "clamp": (0.5, 0.5), "l1_loss": 0.5,
        **{k: "split" for k in ("maximum", "minimum", "max", "max_axis", "min", "min_axis",
                                "max_pool2d")}}),
    "right,ties=last": ("pytorch", {
        "relu": "right", "leaky_relu": "right", "abs": "right", "relu6": ("right", "left"),
        "hardswish": ("right", "left"), "hardtanh": (1.0, 0.0), "clamp": (0.0, 1.0), "l1_loss": "left",
        **{k: "last" for k in ("maximum", "minimum", "max", "max_axis", "min", "min_axis",
                               "max_pool2d")}}),
}


# -- the hook that says whether kinks were hit -------------------------------------------------


@contextlib.contextmanager
def kink_hits():
    """Count elements on kinks (tied groups once) in recorded non-smooth applications."""
    count = [0]

    def hook(prim, site, arrays, ans, node):
        if node is not None:
            count[0] += prim.hits(node.res)

    tape.Hooks.on_kink.append(hook)
    try:
        yield count
    finally:
        tape.Hooks.on_kink.remove(hook)


def _ids(cases):
    return [c.name for c in cases]


# -- tests ---------------------------------------------------------------------------------------


def test_every_primitive_is_covered():
    """Each primitive registered by kinkprop.primitives appears on the tape of some case here."""
    seen = set()
    for c in CASES:
        f, args = c.build(_rng(c.name, 0))
        arrays = [np.asarray(a) for a in args]
        inputs = [kp.Tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
        out = f(*inputs)
        seen |= {t.grad_fn.prim.name for t in tape.toposort(out) if t.grad_fn is not None}
    registered = {name for name, p in kp.PRIMITIVES.items()
                  if p.forward.__module__.startswith("kinkprop.primitives.")}
    assert registered - seen == set()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_finite_differences(case, seed):
    """float64 central differences against kp.jvp and kp.vjp, off every kink."""
    f, args = case.build(_rng(case.name, seed))
    with kink_hits() as hits:
        check_grad(f, args, argnums=case.argnums, seed=seed)
    assert hits[0] == 0, f"{case.name}: the smooth-region inputs hit {hits[0]} kink(s)"


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_adjoint(case):
    """<v, J u> = <J^T v, u> between forward and reverse mode, off kinks."""
    f, args = case.build(_rng(case.name, 99))
    check_adjoint(f, args, argnums=case.argnums)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("case", NONSMOOTH, ids=_ids(NONSMOOTH))
def test_adjoint_at_kinks(case, policy):
    """The adjoint identity on kinks: both modes apply the one recorded kink choice."""
    preset, overrides = POLICIES[policy]
    for seed in SEEDS:
        f, args = case.kink(_rng(case.name + "@kink", seed))
        with kp.kink_policy(preset, **overrides), kink_hits() as hits:
            check_adjoint(f, args, argnums=case.argnums, seed=seed)
        assert hits[0] > 0, f"{case.name}: the on-kink inputs hit no kink"


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("f, args", [
    (kp.relu, [np.array([-1.0, 0.0, 1.0])]),
    (kp.relu, [np.array([-1.0, -0.0, 0.0, 1.0])]),
    (lambda x: kp.leaky_relu(x, 0.1), [np.array([-1.0, 0.0, 1.0])]),
    (kp.abs, [np.array([-1.0, 0.0, 1.0])]),
    (kp.relu6, [np.array([-1.0, 0.0, 3.0, 6.0, 7.0])]),
    (kp.hardtanh, [np.array([-2.0, -1.0, 0.0, 1.0, 2.0])]),
    (kp.hardswish, [np.array([-4.0, -3.0, 0.0, 3.0, 4.0])]),
    (lambda x: kp.clamp(x, -1.0, 1.0), [np.array([-2.0, -1.0, 0.0, 1.0, 2.0])]),
    (kp.clamp, [np.array([-1.0, 0.0, 1.0]), np.array([-1.0, -1.0, -1.0]), np.array([1.0])]),
    (kp.maximum, [np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])]),
    (kp.minimum, [np.array([[1.0, 2.0], [2.0, 2.0]]), np.array([2.0])]),
    (kp.max, [np.full((2, 3), 4.0)]),
    (lambda x: kp.max(x, axis=1), [np.array([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])]),
    (lambda x: kp.min(x, axis=0, keepdims=True), [np.array([[1.0, 1.0], [1.0, 2.0]])]),
    (lambda x: kp.max_pool2d(x, 2), [np.ones((1, 1, 4, 4))]),
    (lambda x: kp.max_pool2d(x, 3, stride=1, padding=1), [np.ones((1, 2, 3, 3))]),
    (kp.l1_loss, [np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 3.0])]),
    (kp.hinge_loss, [np.array([1.0, -1.0, 0.5]), np.array([1.0, 1.0, -1.0])]),
], ids=["relu", "relu_signed_zero", "leaky_relu", "abs", "relu6", "hardtanh", "hardswish",
        "clamp", "clamp_tensor", "maximum_all_tied", "minimum_broadcast_ties", "max_all_equal",
        "max_axis_ties", "min_axis_keepdims_ties", "max_pool_constant", "max_pool_overlapping",
        "l1_loss", "hinge_loss"])
def test_adjoint_pinned_kinks(f, args, policy):
    preset, overrides = POLICIES[policy]
    with kp.kink_policy(preset, **overrides), kink_hits() as hits:
        check_adjoint(f, args)
    assert hits[0] > 0
