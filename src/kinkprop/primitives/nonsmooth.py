"""Non-smooth primitives: every kink is declared here, with its spec in :mod:`kinkprop.kinks.spec`.

Elementwise kinks (relu, leaky_relu, abs, relu6, hardtanh, clamp, the |.| inside l1_loss) declare a
*smooth* local derivative, valid away from the kinks, plus the kink locations; the policy's value is
written at inputs exactly on a kink (``+0.0`` and ``-0.0`` alike). VJP = ``g * d`` and JVP = ``t * d``
share that one derivative, so forward and reverse mode agree at kinks.

Ties (maximum, minimum, max / min reductions) share the gradient among the tied inputs by the rule
in force: ``"split"`` equal shares, ``"first"`` / ``"last"`` all to one input in row-major order.

Compositions that would change a rule (relu written as ``maximum(x, 0)``, which PyTorch gives 0.5 at
0) are different primitives here on purpose: each kink follows its own record.
"""

from __future__ import annotations

import numpy as np

from ..kinks.spec import DIRECTIONAL, SPECS, _is_replace
from ..tensor import Tensor, as_tensor, check_broadcast, lift_pair
from .core import apply, choose, lex_first_nonzero, register, tangent, unbroadcast


class UnresolvedKinkError(RuntimeError):
    """A ``"directional"`` choice reached a rule before the tangent sweep resolved it."""


def _check_resolved(name, choice):
    if isinstance(choice, str) and choice == DIRECTIONAL:
        raise UnresolvedKinkError(
            f"{name}: the directional policy must be resolved by a tangent sweep before backward "
            "(call loss.backward(), which does so, or kp.directional.resolve(loss))"
        )


# -- elementwise kinks -------------------------------------------------------------------------


def _elementwise_kink(name, kink, f, smooth_d, locations, exact=False):
    """Register an elementwise non-smooth primitive. ``exact``: f(x) is x, -x or a constant every
    format holds, and ``smooth_d`` is -1, 0 or 1 (see :class:`Primitive`'s ``exact_forward`` and
    ``exact_vjp``: off the kinks, neither direction has anything to round).

    ``f(x, **p)`` the function; ``smooth_d(x, **p)`` its derivative off the kinks (a fresh writable
    array; its value *at* a kink is irrelevant, the policy overwrites it); ``locations(**p)`` the
    kink positions in spec order (``None`` for an absent bound).
    """

    def forward(x, **p):
        p = _Params(p)
        # count the hits once, in the pass that computes the output's inputs anyway: the backward
        # rule and the census skip the kink masks entirely when there are none (the usual case)
        p.hits = sum(int(np.count_nonzero(x == loc)) for loc in locations(**p) if loc is not None)
        return f(x, **p), (x, p)

    def local(res, choice):
        x, p = res
        d = np.asarray(smooth_d(x, **p))  # a 0-d input gives a NumPy scalar, not an array
        if _is_replace(choice):
            choice = choice[1]  # the forward tangent of the replace arm uses alpha as slope
        if getattr(p, "hits", None) == 0:
            return d  # may be boolean (relu): g * d then costs one pass
        if d.dtype == bool:
            d = d.astype(x.dtype)
        values = choice
        if SPECS[kink].kind == "value" or isinstance(choice, str):
            values = (choice,) * len(SPECS[kink].kinks)
        done = None
        for loc, v in zip(locations(**p), values):
            if loc is None:
                continue
            hit = x == loc
            if hit.any():
                _check_resolved(name, v)
                if done is not None and (hit & done).any():
                    # coinciding kinks (clamp with min = max) compose as min(max(x, lo), hi)
                    # does: their values multiply
                    v = np.where(done, d * v, v)
                np.copyto(d, v, where=hit, casting="unsafe")
                done = hit if done is None else done | hit
        return d

    def vjp(g, res, needs, choice):
        ct = g * local(res, choice)
        if _is_replace(choice):  # comparison arm: the cotangent at the kink is alpha, not g*alpha
            np.copyto(ct, choice[1], where=kink_mask(res), casting="unsafe")
        return (ct,)

    def jvp(ts, res, choice):
        return ts[0] * local(res, choice)

    def count(res):
        x, p = res
        if getattr(p, "hits", None) is not None:
            return p.hits
        return int(np.count_nonzero(kink_mask(res)))

    def kink_mask(res):
        x, p = res
        mask = np.zeros(x.shape, bool)
        for loc in locations(**p):
            if loc is not None:
                mask |= x == loc
        return mask

    def select(ts_dirs, res):
        """Directional: the one-sided derivative on the side the tangent points to.

        Only the elements on a kink are looked at: one pass finds them, the rest works on those
        alone. The rules read the choice nowhere else, so it holds the left derivative there."""
        x, p = res
        out, unresolved = [], np.zeros(x.shape, bool)
        for (left, right), loc in zip(SPECS[kink].one_sided(p.get("slope")), locations(**p)):
            out.append(np.full(x.shape, left, x.dtype))
            at = np.empty(0, np.intp) if loc is None else np.flatnonzero(x == loc)
            if at.size:
                t = lex_first_nonzero(ts_dirs, lambda ts, at=at: _flat_tangent(ts, at))
                out[-1].flat[at] = np.where(t > 0, right, left)
                unresolved.flat[at] |= t == 0
        return (out[0] if SPECS[kink].kind == "value" else tuple(out)), unresolved

    def demand(res, need):
        """The JVP reads the input tangent where the local derivative can be nonzero: off the
        kinks where ``smooth_d`` is nonzero, and at every kink (the selected piece decides)."""
        x, p = res
        return need & ((np.asarray(smooth_d(x, **p)) != 0) | kink_mask(res))

    return register(name, forward, vjp, jvp, kink=kink, kink_mask=kink_mask, select=select,
                    count=count, select_reads=kink_mask, demand=demand, exact_forward=exact,
                    exact_vjp=_no_hits if exact else None)


def _no_hits(res, choice) -> bool:
    """No element on a kink: the VJP multiplies by ``smooth_d`` alone (see ``_elementwise_kink``)."""
    return getattr(res[1], "hits", None) == 0


def _flat_tangent(ts, at):
    """Input 0's tangent at the flat (C-order) positions ``at``; zeros for a constant input."""
    return np.zeros(at.shape) if ts[0] is None else np.asarray(ts[0]).flat[at]


class _Params(dict):
    """Call parameters of an elementwise kink, plus ``hits`` counted in the forward pass."""

    hits: int | None = None


def _between(x, lo, hi):
    d = np.ones_like(x)
    if lo is not None:
        d *= x > lo
    if hi is not None:
        d *= x < hi
    return d


_LOCATIONS = {
    "relu": lambda: (0.0,),
    "leaky_relu": lambda slope: (0.0,),
    "abs": lambda: (0.0,),
    "l1_loss": lambda: (0.0,),
    "relu6": lambda: (0.0, 6.0),
    "hardtanh": lambda lo, hi: (lo, hi),
    "hardswish": lambda: (-3.0, 3.0),
    # min > max: the output is the constant max, no kink to write (as PyTorch, 0 everywhere)
    "clamp": lambda lo, hi: (None, None) if None not in (lo, hi) and lo > hi else (lo, hi),
}

_relu = _elementwise_kink(
    # against an array of zeros: NumPy 2.4's maximum with a scalar 0 runs a ~3x slower loop (same
    # bits, -0 and NaN included), and the zeros cost less than the difference
    "relu", "relu", lambda x: np.maximum(x, np.zeros_like(x)), lambda x: x > 0,
    _LOCATIONS["relu"], exact=True)
_leaky_relu = _elementwise_kink(
    "leaky_relu", "leaky_relu", lambda x, slope: np.where(x > 0, x, slope * x),
    lambda x, slope: np.where(x > 0, 1.0, slope).astype(x.dtype), _LOCATIONS["leaky_relu"])
_abs = _elementwise_kink("abs", "abs", np.abs, np.sign, _LOCATIONS["abs"], exact=True)
_l1 = _elementwise_kink("l1_abs", "l1_loss", np.abs, np.sign, _LOCATIONS["l1_loss"], exact=True)
_relu6 = _elementwise_kink(
    "relu6", "relu6", lambda x: np.clip(x, 0.0, 6.0), lambda x: _between(x, 0.0, 6.0),
    _LOCATIONS["relu6"], exact=True)
_hardtanh = _elementwise_kink(
    "hardtanh", "hardtanh", lambda x, lo, hi: np.clip(x, lo, hi), _between,
    _LOCATIONS["hardtanh"])


def _hardswish_d(x):
    """(2x + 3) / 6 on (-3, 3), 0 below, 1 above (as x / 3 + 1/2, PyTorch's formula)."""
    return np.where(x < -3.0, 0.0, np.where(x > 3.0, 1.0, x / 3.0 + 0.5)).astype(x.dtype)


_hardswish = _elementwise_kink(
    "hardswish", "hardswish", lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0, _hardswish_d,
    _LOCATIONS["hardswish"])
_clamp = _elementwise_kink(
    "clamp", "clamp", lambda x, lo, hi: np.clip(x, lo, hi), _between, _LOCATIONS["clamp"])


def relu(x, at_kink=None) -> Tensor:
    """max(x, 0). Derivative 1 for x > 0, 0 for x < 0, and ``at_kink`` at x = 0 (+0.0 or -0.0).

    ``at_kink``: a number (PyTorch, JAX and TensorFlow all use 0; the Clarke interval is [0, 1]),
    ``"left"`` (0), ``"right"`` (1) or ``"directional"``; ``None`` takes the policy in force.
    """
    return apply(_relu, (as_tensor(x),), choice=choose("relu", at_kink))


def leaky_relu(x, slope: float = 0.01, at_kink=None) -> Tensor:
    """x for x > 0, else slope * x. At 0 the derivative is ``at_kink``: PyTorch and TensorFlow use
    ``"left"`` (the slope), JAX ``"right"`` (1)."""
    slope = float(slope)
    return apply(_leaky_relu, (as_tensor(x),), {"slope": slope},
                 choice=choose("leaky_relu", at_kink, slope=slope))


def abs(x, at_kink=None) -> Tensor:  # noqa: A001 - mirrors numpy / torch
    """|x|. At 0 the derivative is ``at_kink`` (PyTorch / TensorFlow 0, JAX 1; Clarke [-1, 1])."""
    return apply(_abs, (as_tensor(x),), choice=choose("abs", at_kink))


def relu6(x, at_kink=None) -> Tensor:
    """min(max(x, 0), 6). ``at_kink = (at 0, at 6)``; every preset uses (0, 0)."""
    return apply(_relu6, (as_tensor(x),), choice=choose("relu6", at_kink))


def hardtanh(x, min_val: float = -1.0, max_val: float = 1.0, at_kink=None) -> Tensor:
    """min(max(x, min_val), max_val). ``at_kink = (at min_val, at max_val)``: PyTorch (0, 0), JAX
    and TensorFlow (1, 1)."""
    if min_val > max_val:
        raise ValueError(f"hardtanh: min_val {min_val} must not exceed max_val {max_val}")
    return apply(_hardtanh, (as_tensor(x),), {"lo": float(min_val), "hi": float(max_val)},
                 choice=choose("hardtanh", at_kink))


def hardswish(x, at_kink=None) -> Tensor:
    """x * relu6(x + 3) / 6, with kinks at -3 (one-sided derivatives 0 and -1/2) and 3 (3/2 and 1).
    ``at_kink = (at -3, at 3)``: PyTorch and JAX use (0, 1), the derivative of the outer pieces."""
    return apply(_hardswish, (as_tensor(x),), choice=choose("hardswish", at_kink))


def clamp(x, min=None, max=None, at_kink=None) -> Tensor:  # noqa: A002 - mirrors torch.clamp
    """min(max(x, min), max) with scalar or tensor bounds (either may be None).

    ``at_kink = (at min, at max)`` is x's derivative when x equals a bound: PyTorch 2.13 (1, 1),
    PyTorch 2.14 (0, 0), JAX (0.5, 0.5), TensorFlow (1, 1). With tensor bounds, a bound gets the
    rest, ``1 - at_kink``, where x equals it, and 1 where it is the active piece.
    """
    if min is None and max is None:
        raise ValueError("clamp: give at least one of min and max")
    choice = choose("clamp", at_kink)
    scalar = all(b is None or isinstance(b, (int, float)) for b in (min, max))
    if scalar:
        lo = None if min is None else float(min)
        hi = None if max is None else float(max)
        return apply(_clamp, (as_tensor(x),), {"lo": lo, "hi": hi}, choice=choice)
    x = as_tensor(x)
    lo = as_tensor(-np.inf if min is None else min, like=x)
    hi = as_tensor(np.inf if max is None else max, like=x)
    check_broadcast("clamp", x, lo, hi)
    return apply(_clamp_tensor, (x, lo, hi), choice=choice)


def _clamp_tensor_fwd(x, lo, hi):
    return np.minimum(np.maximum(x, lo), hi), (x, lo, hi)


def _clamp_tensor_weights(res, choice):
    """Weights of (x, lo, hi), composed as the forward computes min(max(x, lo), hi): max(x, lo)
    gives x the share ``a`` (``at_low`` where x = lo), then min(., hi) gives that the share ``b``
    (``at_high`` where it equals hi) and hi the rest. So x = lo = hi gives x at_low * at_high
    (never their sum), and lo > hi (the output is hi) sends everything to hi, as PyTorch does."""
    x, lo, hi = res
    v_lo, v_hi = (choice, choice) if isinstance(choice, str) else choice
    m = np.maximum(x, lo)
    at_lo, at_hi = x == lo, m == hi
    if at_lo.any() or at_hi.any():
        _check_resolved("clamp", v_lo)
    a = (x > lo) + v_lo * at_lo
    b = (m < hi) + v_hi * at_hi
    return a * b, (1.0 - a) * b, 1.0 - b


def _clamp_tensor_vjp(g, res, needs, choice):
    ws = _clamp_tensor_weights(res, choice)
    return tuple(unbroadcast(g * w, a.shape) if n else None for w, a, n in zip(ws, res, needs))


def _clamp_tensor_jvp(ts, res, choice):
    ws = _clamp_tensor_weights(res, choice)
    shape = np.broadcast_shapes(*(a.shape for a in res))
    out = sum(t * w for t, w in zip(ts, ws) if t is not None)
    return np.broadcast_to(out, shape)


def _clamp_tensor_select(ts_dirs, res):
    x, lo, hi = res
    # x's share at a bound is 1 where x moves inward relative to the bound, 0 where it moves out
    d_lo = lex_first_nonzero(ts_dirs, lambda ts: tangent(ts, 0, x) - tangent(ts, 1, lo))
    d_hi = lex_first_nonzero(ts_dirs, lambda ts: tangent(ts, 0, x) - tangent(ts, 2, hi))
    v_lo = np.where(d_lo > 0, 1.0, 0.0)
    v_hi = np.where(d_hi < 0, 1.0, 0.0)
    unresolved = ((x == lo) & (d_lo == 0)) | ((x == hi) & (d_hi == 0))
    return (v_lo, v_hi), unresolved


def _clamp_tensor_mask(res):
    x, lo, hi = res
    return np.broadcast_to((x == lo) | (x == hi), np.broadcast_shapes(x.shape, lo.shape, hi.shape))


_clamp_tensor = register("clamp_tensor", _clamp_tensor_fwd, _clamp_tensor_vjp, _clamp_tensor_jvp,
                         kink="clamp", kink_mask=_clamp_tensor_mask, select=_clamp_tensor_select)


# -- ties between two inputs -------------------------------------------------------------------


def _tie_shares(choice, tie):
    if isinstance(choice, str) and choice == "directional":
        if tie.any():
            _check_resolved("maximum/minimum", choice)
        return 0.5, 0.5
    if isinstance(choice, tuple):  # resolved directionally: per-element shares
        return choice
    return {"split": (0.5, 0.5), "first": (1.0, 0.0), "last": (0.0, 1.0)}[choice]


def _pairwise(name, kink, f, wins):
    def forward(a, b):
        return f(a, b), (a, b)

    def weights(res, choice):
        a, b = res
        tie = a == b
        sa, sb = _tie_shares(choice, tie)
        return wins(a, b) + sa * tie, wins(b, a) + sb * tie

    def vjp(g, res, needs, choice):
        wa, wb = weights(res, choice)
        a, b = res
        return (unbroadcast(g * wa, a.shape) if needs[0] else None,
                unbroadcast(g * wb, b.shape) if needs[1] else None)

    def jvp(ts, res, choice):
        wa, wb = weights(res, choice)
        out = sum(t * w for t, w in zip(ts, (wa, wb)) if t is not None)
        return np.broadcast_to(out, np.broadcast_shapes(res[0].shape, res[1].shape))

    def kink_mask(res):
        a, b = res
        return np.broadcast_to(a == b, np.broadcast_shapes(a.shape, b.shape))

    def select(ts_dirs, res):
        a, b = res
        shape = np.broadcast_shapes(a.shape, b.shape)
        diff = lex_first_nonzero(ts_dirs, lambda ts: np.broadcast_to(
            tangent(ts, 0, a) - tangent(ts, 1, b), shape))
        # still tied along every direction: an equal split (reported as unresolved)
        sa = np.where(diff == 0, 0.5, wins(diff, -diff)).astype(a.dtype)
        return (sa, 1.0 - sa), (a == b) & (diff == 0)

    return register(name, forward, vjp, jvp, kink=kink, kink_mask=kink_mask, select=select)


_maximum = _pairwise("maximum", "maximum", np.maximum, lambda a, b: a > b)
_minimum = _pairwise("minimum", "minimum", np.minimum, lambda a, b: a < b)


def maximum(a, b, ties=None) -> Tensor:
    """Elementwise max(a, b). Where a = b the gradient is shared by ``ties``: ``"split"`` (PyTorch,
    JAX: 1/2 each), ``"first"`` (TensorFlow: all to a), ``"last"`` or ``"directional"``.

    Note ``maximum(x, 0)`` is not ``relu(x)``: at 0 it follows this tie rule (PyTorch: 0.5).
    """
    return apply(_maximum, lift_pair(a, b, "maximum"), choice=choose("maximum", ties))


def minimum(a, b, ties=None) -> Tensor:
    """Elementwise min(a, b); ties as in :func:`maximum`."""
    return apply(_minimum, lift_pair(a, b, "minimum"), choice=choose("minimum", ties))


# -- max / min reductions ----------------------------------------------------------------------


def _reduction_weights(x, ans_k, axis, rule):
    """Share of the gradient each element gets: a weight array shaped like x."""
    if isinstance(rule, np.ndarray):  # resolved directionally
        return rule
    hit = x == ans_k
    if rule == "split":
        return hit / hit.sum(axis=axis, keepdims=True)
    if rule == DIRECTIONAL:
        count = hit.sum(axis=axis, keepdims=True)
        if (count > 1).any():
            _check_resolved("max/min", rule)
        return hit / count
    w = np.zeros(x.shape, x.dtype)
    if axis is None:
        flat = hit.ravel()
        i = int(np.argmax(flat)) if rule == "first" else flat.size - 1 - int(np.argmax(flat[::-1]))
        w.flat[i] = 1.0
        return w
    if rule == "first":
        idx = np.argmax(hit, axis=axis)
    else:
        idx = hit.shape[axis] - 1 - np.argmax(np.flip(hit, axis=axis), axis=axis)
    np.put_along_axis(w, np.expand_dims(idx, axis), 1.0, axis=axis)
    return w


def _split_share(x, ans_k, axis, v):
    """``v`` shared equally among the tied extrema: ``v / k`` to each. Divided, as PyTorch does:
    ``v * (1 / k)`` rounds twice and can differ in the last bit."""
    hit = x == ans_k
    return hit * (v / hit.sum(axis=axis, keepdims=True))


def _is_split(choice):
    return isinstance(choice, str) and choice == "split"


def _reduction(name, reduce):
    def forward(x, axis, keepdims):
        ans_k = reduce(x, axis=axis, keepdims=True)
        ans = ans_k if keepdims else (ans_k.reshape(()) if axis is None else ans_k.squeeze(axis))
        return ans, (x, ans_k, axis, keepdims)

    def vjp(g, res, needs, choice):
        x, ans_k, axis, keepdims = res
        g_k = g if keepdims else np.reshape(g, ans_k.shape)
        if _is_split(choice):
            return (_split_share(x, ans_k, axis, g_k),)
        return (_reduction_weights(x, ans_k, axis, choice) * g_k,)

    def jvp(ts, res, choice):
        x, ans_k, axis, keepdims = res
        wt = (_split_share(x, ans_k, axis, ts[0]) if _is_split(choice) else
              _reduction_weights(x, ans_k, axis, choice) * ts[0])
        out = wt.sum(axis=axis, keepdims=True)
        # the output of a full reduction is 0-d, not ans_k's (1, ..., 1)
        return out if keepdims else out.reshape(() if axis is None else
                                                np.squeeze(ans_k, axis).shape)

    def kink_mask(res):
        x, ans_k, axis, keepdims = res
        return (x == ans_k).sum(axis=axis, keepdims=True) > 1

    def select(ts_dirs, res):
        x, ans_k, axis, keepdims = res
        # among the tied winners, the largest tangent wins (for min: the smallest), direction by
        # direction (lexicographic)
        sign = 1.0 if reduce is np.max else -1.0
        winners = x == ans_k
        for ts in ts_dirs:
            t = np.where(winners, sign * tangent(ts, 0, x), -np.inf)
            winners &= t == t.max(axis=axis, keepdims=True)
        count = winners.sum(axis=axis, keepdims=True)
        return winners / count, count > 1  # one flag per tied group, as hits() counts

    return register(name, forward, vjp, jvp, kink=name, kink_mask=kink_mask, select=select)


_max = _reduction("max", np.max)
_min = _reduction("min", np.min)
_max_axis = _reduction("max_axis", np.max)
_min_axis = _reduction("min_axis", np.min)


def _reduce(x, axis, keepdims, ties, prims, name):
    x = as_tensor(x)
    if axis is not None:
        if not isinstance(axis, (int, np.integer)):
            raise TypeError(f"{name}: axis must be an int or None, got {axis!r}")
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"{name}: axis {axis} out of range for shape {x.shape}")
        axis = int(axis) % x.ndim
    if x.size == 0:
        raise ValueError(f"{name}: empty input of shape {x.shape}")
    prim = prims[axis is not None]
    return apply(prim, (x,), {"axis": axis, "keepdims": bool(keepdims)},
                 choice=choose(prim.kink.name, ties))


def max(x, axis=None, keepdims=False, ties=None) -> Tensor:  # noqa: A001
    """Max over all elements (``axis=None``) or along ``axis``.

    Ties share the gradient by ``ties``. PyTorch: ``split`` for the full max, ``first`` index along
    a dim (``torch.max(x, dim)``); JAX and TensorFlow ``split`` in both cases.
    """
    return _reduce(x, axis, keepdims, ties, (_max, _max_axis), "max")


def min(x, axis=None, keepdims=False, ties=None) -> Tensor:  # noqa: A001
    """Min over all elements or along ``axis``; ties as in :func:`max`."""
    return _reduce(x, axis, keepdims, ties, (_min, _min_axis), "min")
