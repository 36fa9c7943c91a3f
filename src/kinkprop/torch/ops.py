"""The rerouted kink ops: torch functions -> custom autograd Functions applying the policy.

Each rerouted op computes its value with torch's own kernel and its derivative from the policy in
force at forward time, read from kinkprop's registry (:mod:`kinkprop.kinks.spec` /
:mod:`kinkprop.kinks.presets`); the chosen value multiplies the incoming gradient. The rules mirror
the NumPy engine's (:mod:`kinkprop.primitives.nonsmooth`, :mod:`kinkprop.primitives.conv`) line by
line, so both engines give the same gradients (in float64, bitwise for the elementwise kinks and
the max-pool rules, to rounding for reductions):

===============================================  ============  ======================================
torch call                                       policy key    note
===============================================  ============  ======================================
F.relu, torch.relu, Tensor.relu (and ``_``)      relu          nn.ReLU calls F.relu
F.leaky_relu (and ``_``)                         leaky_relu    nn.LeakyReLU
torch.abs / absolute, Tensor.abs, ``abs(x)``     abs
F.relu6                                          relu6
F.hardswish (nn.Hardswish, in place)             hardswish
F.hardtanh (and ``_``)                           hardtanh      ``(0, 6)`` bounds -> relu6: nn.ReLU6
                                                               calls F.hardtanh(x, 0, 6)
torch.clamp / clip / clamp_min / clamp_max       clamp         scalar or tensor bounds (a bound gets
(and ``_``, Tensor methods)                                    ``1 -`` x's share, as the NumPy rule)
torch.maximum / minimum, torch.max(a, b)         maximum /
                                                 minimum
torch.max(x), torch.amax(x, dims)                max / min     amax along dims too: torch shares its
                                                               ties, so it uses the reduction key
torch.max(x, dim) (values; indices are torch's)  max_axis /
                                                 min_axis
F.max_pool2d (nn.MaxPool2d),                     max_pool2d    dilation and ceil_mode supported;
F.max_pool2d_with_indices, torch.max_pool2d                    indices returned are torch's
F.l1_loss                                        l1_loss       |input - target| then the reduction
===============================================  ============  ======================================

Where the policy's rule *is* torch's definition (relu with 0 at 0: torch differentiates relu
through its output, ``threshold_backward``; max-pool ``"first"``: torch routes the gradient to the
argmax index, the first maximum in row-major order) the native op runs, with no extra cost. Inputs
that need no gradient (and carry no tangent) run natively too. A NaN input is on no kink: relu's
derivative there is 0, as the NumPy engine's ``x > 0`` (torch's own passes the gradient).

In the directional policy's pass F.batch_norm with batch statistics is rerouted too (its tangent
from native kernels, :func:`batch_norm_tangent`; the forward and backward are torch's).
On a CPU the directional max-pool handles its (rare) tied windows by index and the directional
relu skips sites without a kink (reading a count costs no device sync there;
:data:`SPARSE_ON_CPU`), with the results of the branch-free rules.

Weights and local derivatives are computed in the input's dtype; for 16-bit inputs in float32
unless every value they hold is exact in 16 bits (then ``g * d``, computed in float32 by torch and
rounded once, is what float32 weights would give): the NumPy engine's precision contract. Each
gradient is rounded once to its input's dtype.
Backward rules are written with differentiable ops (``g * d``), so ``create_graph=True`` works (the
second derivative of a piecewise-linear op is 0 almost everywhere).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from ..kinks.spec import DIRECTIONAL, SPECS
from . import _scope

# -- helpers -----------------------------------------------------------------------------------

#: Returned by an op when torch's own function gives the policy's result: the handler calls it.
NATIVE = object()


class Done:
    """Returned by an op that already ran torch's own function: ``value`` is its result."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


_choices: dict = {}


def choice(policy, key: str, slope: float | None = None):
    """The numeric choice for ``key`` under ``policy`` (cached; the registry resolves it)."""
    k = (id(policy), key, slope)
    hit = _choices.get(k)
    if hit is not None and hit[0] is policy:
        return hit[1]
    if len(_choices) > 4096:
        _choices.clear()
    value = SPECS[key].resolve(policy[key], slope)
    _choices[k] = (policy, value)
    return value


_HALF = (torch.float16, torch.bfloat16)
_exact: dict = {}


def _wdtype(dtype: torch.dtype, values=None) -> torch.dtype:
    """The dtype weights and local derivatives are computed in: the input's, or float32 for a
    16-bit input unless every value that can appear (``values``) is exact in it -- then
    ``g * d`` in 16 bits rounds once, as the float32 product rounded would."""
    if dtype not in _HALF:
        return dtype
    if values is None:
        return torch.float32
    for v in values:
        key = (dtype, v)
        ok = _exact.get(key)
        if ok is None:
            ok = _exact[key] = float(torch.tensor(v, dtype=dtype)) == v
        if not ok:
            return torch.float32
    return dtype


def _flat_values(value, slope, key):
    """Every number a local derivative of ``key`` can hold under ``value``."""
    out = [0.0, 1.0]
    if slope is not None:
        out.append(slope)
    if key == "abs" or key == "l1_loss":
        out.append(-1.0)
    for v in (value if isinstance(value, tuple) else (value,)):
        if isinstance(v, float):
            out.append(v)
    return out


def _scale(g, d):
    out = g * d
    return out if out.dtype == g.dtype else out.to(g.dtype)


def _needs_grad(*xs) -> bool:
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                       for x in xs):
        return True
    return fwAD._current_level >= 0 and any(
        isinstance(x, torch.Tensor) and fwAD.unpack_dual(x).tangent is not None for x in xs)


def _tangent(fr, x):
    """x's tangent in the directional pass (None: zero). Without a driver the caller must have
    made dual tensors itself."""
    if not isinstance(x, torch.Tensor):
        return None
    t = fwAD.unpack_dual(x).tangent if fwAD._current_level >= 0 else None
    if t is None and fr.directional is None and x.requires_grad:
        raise RuntimeError(
            "kinkprop.torch: the directional policy needs tangents; enter it with "
            "kink_policy('directional', model=model), patch(model, 'directional'), or use "
            "kinkprop.torch.directional_grad(f, params)")
    return t


def _record(fr, prim, hits, unresolved):
    if fr.directional is not None:
        fr.directional.record(prim, hits, unresolved)


def _zero_count(x):
    return torch.zeros((), dtype=torch.int64, device=x.device)


def _count(mask):
    return torch.count_nonzero(mask)


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def _bits(x):
    it = _INT_OF.get(x.dtype)
    return x.view(it) if it is not None else x


def _zeros(x):
    """How many elements of x are +0.0 or -0.0, counted on the bit pattern with the sign bit
    shifted out: integer kernels, several times faster on CPUs than counting floats."""
    return x.numel() - torch.count_nonzero(_bits(x) << 1)


def zero_counts(x):
    """``[nonzero(x), nonzero(bits of x)]`` (counted on bit patterns, see :func:`_zeros`). With
    ``n`` elements, ``n - c[1]`` are ``+0.0`` and ``c[1] - c[0]`` are ``-0.0`` (its bit pattern is
    the sign bit alone). Both are linear, so they accumulate and all-reduce."""
    bits = _bits(x)
    return torch.stack([torch.count_nonzero(bits << 1), torch.count_nonzero(bits)])


def _sum_to(g, shape, dtype):
    if g.shape != shape:
        g = g.sum_to_size(shape) if len(shape) else g.sum()
    return g if g.dtype == dtype else g.to(dtype)


def _bind(args, kwargs, names, defaults):
    """Positional + keyword arguments -> values in ``names`` order (``defaults`` for the rest)."""
    out = list(args[:len(names)])
    for name in names[len(out):]:
        out.append(kwargs.get(name, defaults.get(name)))
    return out


# -- autograd Functions ------------------------------------------------------------------------


class _Scale(torch.autograd.Function):
    """y = native(x); dy/dx = d, the local derivative with the policy's values at the kinks."""

    @staticmethod
    def forward(ctx, x, d, native, params):
        ctx.save_for_backward(d)
        if fwAD._current_level >= 0:  # for jvp
            ctx.d = d
        return native(x, *params)

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        return _scale(g, d), None, None, None

    @staticmethod
    def jvp(ctx, t, *_):
        return _scale(t, ctx.d)


class _ScaleInplace(torch.autograd.Function):
    """:class:`_Scale` in place (``ctx.mark_dirty``): x is overwritten by native_(x)."""

    @staticmethod
    def forward(ctx, x, d, native_, params):
        ctx.save_for_backward(d)
        if fwAD._current_level >= 0:  # for jvp
            ctx.d = d
        native_(x, *params)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        return _scale(g, d), None, None, None

    @staticmethod
    def jvp(ctx, t, *_):
        return t.mul_(ctx.d)


class _Weighted(torch.autograd.Function):
    """y = native(*inputs) with dy = sum_i w_i * dx_i (maximum, minimum, clamp with tensor
    bounds); each input's gradient is summed over the axes it was broadcast along."""

    @staticmethod
    def forward(ctx, native, weights, *inputs):
        ctx.weights = weights
        ctx.meta = [(a.shape, a.dtype) for a in inputs]
        return native(*inputs)

    @staticmethod
    def backward(ctx, g):
        grads = []
        for i, (w, (shape, dtype)) in enumerate(zip(ctx.weights, ctx.meta)):
            grads.append(_sum_to(g * w, shape, dtype) if ctx.needs_input_grad[2 + i] else None)
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx, _n, _w, *ts):
        out = None
        for t, w in zip(ts, ctx.weights):
            if t is not None:
                out = t * w if out is None else out + t * w
        shape = torch.broadcast_shapes(*(s for s, _ in ctx.meta))
        dtype = functools.reduce(torch.promote_types, (d for _, d in ctx.meta))
        if out is None:
            return torch.zeros(shape, dtype=dtype, device=ctx.weights[0].device)
        return out.expand(shape).to(dtype)


class _Reduce(torch.autograd.Function):
    """Max / min over ``dims``: the gradient goes to the winners by weights ``w``, or for the
    ``"split"`` rule, ``hit * (g / count)`` (divided, as torch and the NumPy engine do)."""

    @staticmethod
    def forward(ctx, x, ans, dims, keepdim, w, hit, count):
        ctx.dims, ctx.keepdim, ctx.x_shape = dims, keepdim, x.shape
        ctx.w, ctx.hit, ctx.count = w, hit, count
        return ans

    @staticmethod
    def _keep(ctx, g):
        if ctx.keepdim:
            return g
        if not ctx.dims:
            return g.reshape((1,) * len(ctx.x_shape)) if len(ctx.x_shape) else g
        for dim in sorted(ctx.dims):
            g = g.unsqueeze(dim)
        return g

    @staticmethod
    def backward(ctx, g):
        g_k = _Reduce._keep(ctx, g)
        if ctx.w is None:
            gx = ctx.hit * (g_k / ctx.count)
        else:
            gx = g_k * ctx.w
        return gx.to(g.dtype), None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, t, *_):
        wt = ctx.hit * (t / ctx.count) if ctx.w is None else t * ctx.w
        dims = ctx.dims or tuple(range(t.dim()))
        return wt.sum(dim=dims, keepdim=ctx.keepdim).to(t.dtype) if dims else wt.to(t.dtype)


class _MaxPool(torch.autograd.Function):
    """2-D max-pooling with per-offset window weights ``w_k = masks[k] * scale`` (``"split"``:
    the maxima and 1 / their count; ``"last"`` and directional: one-hot or shared masks, no
    scale). ``masks[k]`` covers the windows whose offset ``k`` falls inside the input
    (:attr:`PoolGeometry.pairs`).

    The backward adds each kernel offset's share ``masks[k] * (g * scale)`` in reverse offset
    order, as the NumPy engine and torch's CPU kernel do, so overlapping windows round alike (and
    ``g * (1 / count)`` rounds as the NumPy engine's ``g * w``)."""

    @staticmethod
    def forward(ctx, x, out, geo, masks, scale):
        ctx.geo, ctx.masks, ctx.scale = geo, masks, scale
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        dtype = _wdtype(g.dtype)
        gs = g.to(dtype) if ctx.scale is None else g * ctx.scale
        dx = torch.zeros(ctx.x_shape, dtype=dtype, device=g.device)
        for pair, m in reversed(list(zip(ctx.geo.pairs, ctx.masks))):
            if pair is not None:
                dx[pair[0]].addcmul_(m, gs[pair[1]])
        return dx.to(ctx.x_dtype), None, None, None, None

    @staticmethod
    def jvp(ctx, t, *_):
        out = torch.zeros(ctx.geo.out_shape, dtype=_wdtype(t.dtype), device=t.device)
        for pair, m in zip(ctx.geo.pairs, ctx.masks):
            if pair is not None:
                i, o = pair
                w = m if ctx.scale is None else m * ctx.scale[o]  # rounds as the NumPy JVP
                out[o].addcmul_(t[i], w)
        return out.to(t.dtype)


# -- elementwise kinks -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Elementwise:
    key: str  # the registry's name
    native: object  # (x, *params) -> y, out of place
    native_: object  # (x, *params) -> x, in place
    smooth: object  # (x, *params, dtype) -> the derivative off the kinks (a fresh tensor)
    locations: object  # (*params) -> kink positions in spec order (None: absent)


def _between(x, lo, hi, dtype):
    m = None
    if lo is not None:
        m = x > lo
    if hi is not None:
        m = x < hi if m is None else m & (x < hi)
    return torch.ones_like(x, dtype=dtype) if m is None else m.to(dtype)


def _leaky_smooth(x, slope, dtype):
    return torch.full_like(x, slope, dtype=dtype).masked_fill_(x > 0, 1.0)


def _clamp_locations(lo, hi):
    # min > max: the output is the constant max, no kink to write (as torch, 0 everywhere)
    return (None, None) if lo is not None and hi is not None and lo > hi else (lo, hi)


_RELU = _Elementwise("relu", lambda x: torch.relu(x), lambda x: torch.relu_(x),
                     lambda x, dt: (x > 0).to(dt), lambda: (0.0,))
_LEAKY = _Elementwise("leaky_relu", lambda x, s: F.leaky_relu(x, s),
                      lambda x, s: torch._C._nn.leaky_relu_(x, s), _leaky_smooth,
                      lambda s: (0.0,))
_ABS = _Elementwise("abs", lambda x: torch.abs(x), lambda x: torch.abs_(x),
                    lambda x, dt: torch.sign(x).to(dt), lambda: (0.0,))
_L1 = _Elementwise("l1_loss", lambda x: torch.abs(x), lambda x: torch.abs_(x),
                   lambda x, dt: torch.sign(x).to(dt), lambda: (0.0,))
_RELU6 = _Elementwise("relu6", lambda x: F.hardtanh(x, 0.0, 6.0),
                      lambda x: torch._C._nn.hardtanh_(x, 0.0, 6.0),
                      lambda x, dt: _between(x, 0.0, 6.0, dt), lambda: (0.0, 6.0))
_HARDTANH = _Elementwise("hardtanh", lambda x, lo, hi: F.hardtanh(x, lo, hi),
                         lambda x, lo, hi: torch._C._nn.hardtanh_(x, lo, hi), _between,
                         lambda lo, hi: (lo, hi))


def _hardswish_smooth(x, dtype):
    # x / 3 + 1/2 on (-3, 3), as torch's hardswish_backward writes it
    return torch.where(x < -3.0, 0.0, torch.where(x > 3.0, 1.0, x / 3.0 + 0.5)).to(dtype)


_HARDSWISH = _Elementwise("hardswish", lambda x: F.hardswish(x),
                          lambda x: torch._C._nn.hardswish_(x), _hardswish_smooth,
                          lambda: (-3.0, 3.0))
_CLAMP = _Elementwise("clamp", lambda x, lo, hi: torch.clamp(x, lo, hi),
                      lambda x, lo, hi: torch.clamp_(x, lo, hi), _between, _clamp_locations)


def _census_elementwise(census, key, x, locs):
    if locs == (0.0,):
        counts = zero_counts(x)  # converted to +0 / -0 when read
    else:
        counts = torch.stack([_zero_count(x) if loc is None else _count(x == loc)
                              for loc in locs])
    census.add(key, counts, x.numel())


def _local(x, ew, params, locs, values, dtype):
    """The local derivative: ``ew.smooth`` with ``values`` written where x is on a kink."""
    if ew.key == "relu" and not isinstance(values[0], torch.Tensor):
        return _relu_local(x, values[0], dtype)
    d = ew.smooth(x, *params, dtype)
    done = None
    coincide = len(locs) == 2 and locs[0] is not None and locs[0] == locs[1]
    for loc, v in zip(locs, values):
        if loc is None:
            continue
        hit = x == loc
        if done is not None and coincide:
            # coinciding kinks (clamp with min = max) compose as min(max(x, lo), hi) does:
            # their values multiply
            v = torch.where(done, d * v, v)
        d = torch.where(hit, v, d) if isinstance(v, torch.Tensor) else d.masked_fill(hit, v)
        done = hit if done is None else done | hit
    return d


def _relu_local(x, v, dtype):
    """relu's derivative with ``v`` at 0: 1 where x > 0, ``v`` where x = 0 (+0.0 or -0.0), 0
    elsewhere (NaN too, as the NumPy engine's ``x > 0``). Each comparison is written straight
    into a ``dtype`` tensor (``out=``): one vectorised pass, where a boolean mask and its cast cost
    several times more on CPUs. ``v = 1`` (the common non-torch choice) is the single ``x >= 0``."""
    d = torch.empty(x.shape, dtype=dtype, device=x.device)
    if v == 1.0:
        return torch.ge(x, 0, out=d)
    torch.gt(x, 0, out=d)
    if v:  # + v where x = 0: exact, v is representable in dtype (see _wdtype)
        d.add_(torch.eq(x, 0, out=torch.empty_like(d)), alpha=v)
    return d


#: Kinks are rare: on the CPU (where reading their number costs no device sync) the directional
#: max-pool handles its tied windows by index (see :func:`_pool_by_index`) instead of comparing
#: tangents over every window, and the directional relu skips the tangent's comparisons at sites
#: without a kink; elsewhere they run branch-free.
SPARSE_ON_CPU = True
#: The max-pool rules handled by index on the CPU. ``"split"`` and ``"last"`` give bitwise the same
#: by index, but with the many tied windows of a relu -> max-pool (all-zero windows) their dense
#: weights cost less.
BY_INDEX_RULES = {DIRECTIONAL}


def _relu_directional(fr, x, xd, dtype):
    """relu's derivative along the tangent t: 1 where x > 0, or x = 0 and t > 0; 0 where x < 0
    (or NaN), or x = 0 and t < 0; the fallback value where x = 0 and t is 0 or NaN (unresolved).
    """
    t = _tangent(fr, x)
    fb = SPECS["relu"].resolve(_fallback(fr)["relu"])
    d = torch.gt(xd, 0, out=torch.empty(xd.shape, dtype=dtype, device=xd.device))
    hits = _zeros(xd)
    if SPARSE_ON_CPU and xd.device.type == "cpu" and not int(hits):
        _record(fr, "relu", hits, hits)  # no kink here (read for free on a CPU): x > 0 is all
        return d
    kink = torch.eq(xd, 0, out=torch.empty_like(d))
    if t is None:
        d.add_(kink, alpha=fb)
        _record(fr, "relu", hits, hits)
        return d
    pos = torch.gt(t, 0, out=torch.empty_like(d))
    moves = torch.gt(t.abs(), 0, out=torch.empty_like(d))  # 0 where t is 0 or NaN
    tied = torch.addcmul(kink, kink, moves, value=-1.0)
    d.addcmul_(kink, pos)
    if fb:
        d.add_(tied, alpha=fb)
    _record(fr, "relu", hits, _count(tied))
    return d


def _directional_values(fr, x, xd, ew, params, locs, slope, dtype):
    """Per-element values at each kink: the one-sided derivative on the side the tangent points
    to; where the tangent is 0 (or absent) the fallback preset's value, reported unresolved."""
    spec = SPECS[ew.key]
    t = _tangent(fr, x)
    fb = spec.resolve(_fallback(fr)[ew.key], slope)
    fb = (fb,) if spec.kind == "value" else fb
    values, hits, unresolved = [], [], None
    for (left, right), loc, f in zip(spec.one_sided(slope), locs, fb):
        if loc is None:
            values.append(f)
            continue
        hit = xd == loc
        hits.append(_count(hit))
        if t is None:
            values.append(f)
            un = hit
        else:
            zero = t == 0
            v = torch.full(t.shape, left, dtype=dtype, device=t.device)
            values.append(v.masked_fill_(t > 0, right).masked_fill_(zero, f))
            un = hit & zero
        unresolved = un if unresolved is None else unresolved | un
    _record(fr, ew.key, torch.stack(hits).sum() if hits else _zero_count(xd),
            _zero_count(xd) if unresolved is None else _count(unresolved))
    return tuple(values)


def _fallback(fr):
    return fr.directional.fallback if fr.directional is not None else _DEFAULT_FALLBACK()


@functools.lru_cache(maxsize=1)
def _DEFAULT_FALLBACK():
    from ..kinks.policy import Policy

    return Policy.from_preset("pytorch")


def elementwise(ew, x, params=(), inplace=False, slope=None, count=True):
    """Apply elementwise kink op ``ew`` to ``x`` under the frame in force; :data:`NATIVE` where
    torch's own op gives the policy's result."""
    fr = _scope.frame()
    locs = ew.locations(*params)
    if fr.census is not None and count:
        with torch.no_grad():
            _census_elementwise(fr.census, ew.key, x.detach(), locs)
    policy = fr.policy
    if policy is None or not x.is_floating_point() or not _needs_grad(x):
        return NATIVE
    value = choice(policy, ew.key, slope)
    if (ew.key == "relu" and value == 0.0) or (ew.key == "hardswish" and value == (0.0, 1.0)):
        # torch's own rule: relu is differentiated through its output (0 at 0); hardswish_backward
        # takes the outer pieces' derivatives at -3 and 3
        return NATIVE
    if value == DIRECTIONAL:
        fb = SPECS[ew.key].resolve(_fallback(fr)[ew.key], slope)
        dtype = _wdtype(x.dtype, _flat_values(fb, slope, ew.key))
    else:
        dtype = _wdtype(x.dtype, _flat_values(value, slope, ew.key))
    xd = x.detach()
    with torch.no_grad():
        if value == DIRECTIONAL and ew.key == "relu":
            d = _relu_directional(fr, x, xd, dtype)
        else:
            if value == DIRECTIONAL:
                values = _directional_values(fr, x, xd, ew, params, locs, slope, dtype)
            else:
                values = (value,) if SPECS[ew.key].kind == "value" else value
            d = _local(xd, ew, params, locs, values, dtype)
    if inplace:
        return _ScaleInplace.apply(x, d, ew.native_, params)
    return _Scale.apply(x, d, ew.native, params)


# -- ties between inputs -----------------------------------------------------------------------


def _shares(rule):
    return {"split": (0.5, 0.5), "first": (1.0, 0.0), "last": (0.0, 1.0)}[rule]


def pairwise(key, a, b):
    """maximum / minimum of two tensors under the frame in force (or :data:`NATIVE`)."""
    fr = _scope.frame()
    ad, bd = a.detach(), b.detach()
    if fr.census is not None:
        with torch.no_grad():
            tie = ad == bd
            fr.census.add(key, torch.stack([_count(tie), _zero_count(tie)]), tie.numel())
    policy = fr.policy
    if (policy is None or not _needs_grad(a, b)
            or not (a.is_floating_point() or b.is_floating_point())):
        return NATIVE
    rule = choice(policy, key)
    wins = torch.gt if key == "maximum" else torch.lt
    dtype = _wdtype(torch.result_type(a, b), (0.0, 0.5, 1.0))
    with torch.no_grad():
        tie = ad == bd
        w_ab, w_ba = wins(ad, bd).to(dtype), wins(bd, ad).to(dtype)
        if rule == DIRECTIONAL:
            ta, tb = _tangent(fr, a), _tangent(fr, b)
            diff = torch.zeros(tie.shape, dtype=dtype, device=tie.device)
            if ta is not None:
                diff = diff + ta
            if tb is not None:
                diff = diff - tb
            # still tied along the direction: an equal split (reported as unresolved)
            sa = torch.where(diff == 0, 0.5, wins(diff, -diff).to(dtype)).to(dtype)
            _record(fr, key, _count(tie), _count(tie & (diff == 0)))
            sb = 1.0 - sa
        else:
            sa, sb = _shares(rule)
        wa = w_ab + sa * tie
        wb = w_ba + sb * tie
    native = torch.maximum if key == "maximum" else torch.minimum
    return _Weighted.apply(native, (wa, wb), a, b)


def clamp_tensor(x, lo, hi):
    """clamp with a tensor bound (or :data:`NATIVE`). Weights of (x, lo, hi) compose as
    min(max(x, lo), hi) does: max(x, lo) gives x the share ``a`` (``at_low`` where x = lo), then
    min(., hi) gives that the share ``b`` (``at_high`` where it equals hi) and hi the rest; an
    absent or scalar bound is a constant."""
    fr = _scope.frame()
    lo_t = lo if isinstance(lo, torch.Tensor) else None
    hi_t = hi if isinstance(hi, torch.Tensor) else None

    def const(v, default):
        return torch.full((), default if v is None else float(v), dtype=x.dtype, device=x.device)

    lo_v = lo_t if lo_t is not None else const(lo, -math.inf)
    hi_v = hi_t if hi_t is not None else const(hi, math.inf)
    xd, lod, hid = x.detach(), lo_v.detach(), hi_v.detach()
    if fr.census is not None:
        with torch.no_grad():
            shape = torch.broadcast_shapes(xd.shape, lod.shape, hid.shape)
            fr.census.add("clamp", torch.stack([_count(xd == lod), _count(xd == hid)]),
                          math.prod(shape))
    policy = fr.policy
    if policy is None or not x.is_floating_point() or not _needs_grad(x, lo_t, hi_t):
        return NATIVE
    value = choice(policy, "clamp")
    dtype = _wdtype(x.dtype)
    with torch.no_grad():
        m = torch.maximum(xd, lod)
        at_lo, at_hi = xd == lod, m == hid
        if value == DIRECTIONAL:
            tx, tl, th = _tangent(fr, x), _tangent(fr, lo_t), _tangent(fr, hi_t)
            zero = torch.zeros((), dtype=dtype, device=x.device)
            tx = zero if tx is None else tx
            d_lo = tx - (zero if tl is None else tl)
            d_hi = tx - (zero if th is None else th)
            # x's share at a bound: 1 where x moves inward relative to it, 0 where it moves out
            unresolved = (at_lo & (d_lo == 0)) | ((xd == hid) & (d_hi == 0))
            fb_lo, fb_hi = SPECS["clamp"].resolve(_fallback(fr)["clamp"])
            v_lo = (d_lo > 0).to(dtype).masked_fill(unresolved, fb_lo)
            v_hi = (d_hi < 0).to(dtype).masked_fill(unresolved, fb_hi)
            _record(fr, "clamp", _count(at_lo | (xd == hid)), _count(unresolved))
        else:
            v_lo, v_hi = value
        a = (xd > lod).to(dtype) + v_lo * at_lo
        b = (m < hid).to(dtype) + v_hi * at_hi
        weights = (a * b, (1.0 - a) * b, 1.0 - b)
    return _Weighted.apply(torch.clamp, weights, x, lo_v, hi_v)


# -- reductions --------------------------------------------------------------------------------


def _dims(x, dim):
    if dim is None:
        return ()
    if isinstance(dim, int):
        dim = (dim,)
    return tuple(sorted({d % max(x.dim(), 1) for d in dim}))


def reduction(key, x, dims, keepdim):
    """max / min over ``dims`` (``()``: every dim) under the frame in force: the values, or
    :data:`NATIVE`."""
    fr = _scope.frame()
    is_max = key in ("max", "max_axis")
    ext = torch.amax if is_max else torch.amin
    all_dims = dims or tuple(range(x.dim()))
    xd = x.detach()
    if fr.census is not None:
        with torch.no_grad():
            hit = xd == (ext(xd, all_dims, keepdim=True) if all_dims else xd)
            groups = hit.sum(all_dims) if all_dims else hit.to(torch.int64)
            fr.census.add(key, torch.stack([_count(groups > 1), _zero_count(groups)]),
                          groups.numel())
    policy = fr.policy
    if policy is None or not x.is_floating_point() or not _needs_grad(x):
        return NATIVE
    rule = choice(policy, key)
    dtype = _wdtype(x.dtype)
    with torch.no_grad():
        ans_k = ext(xd, all_dims, keepdim=True) if all_dims else xd.clone()
        hit = xd == ans_k
        w = count = None
        if rule == "split":
            count = hit.sum(all_dims, keepdim=True).to(dtype) if all_dims else hit.to(dtype)
        elif rule == DIRECTIONAL:
            t = _tangent(fr, x)
            winners = hit
            if t is not None and all_dims:
                # among the tied winners the largest tangent wins (for min the smallest)
                tt = torch.where(winners, t if is_max else -t, -math.inf)
                winners = winners & (tt == tt.amax(all_dims, keepdim=True))
            cnt = winners.sum(all_dims, keepdim=True) if all_dims else winners.to(torch.int64)
            w = winners.to(dtype) / cnt
            groups = hit.sum(all_dims) if all_dims else hit.to(torch.int64)
            _record(fr, key, _count(groups > 1), _count(cnt > 1))
        else:
            w = _one_hot(hit, all_dims, rule == "first").to(dtype)
        ans = ans_k if keepdim or not all_dims else ans_k.reshape(
            [n for i, n in enumerate(xd.shape) if i not in all_dims])
    return _Reduce.apply(x, ans, all_dims, keepdim, w, hit, count)


def _one_hot(hit, dims, first: bool):
    """All of each group's gradient to its first (or last) winner in row-major order."""
    rest = [i for i in range(hit.dim()) if i not in dims]
    perm = rest + list(dims)
    h = hit.permute(perm)
    flat = h.reshape(*h.shape[:len(rest)], -1).to(torch.uint8)
    if first:
        idx = flat.argmax(-1, keepdim=True)
    else:
        idx = flat.shape[-1] - 1 - flat.flip(-1).argmax(-1, keepdim=True)
    one = torch.zeros_like(flat).scatter_(-1, idx, 1).reshape(h.shape).bool()
    return one.permute([perm.index(i) for i in range(hit.dim())])


# -- max-pooling -------------------------------------------------------------------------------


def _pair(v):
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) else None
    return int(v), int(v)


def _valid(offset, stride, n_out, n_in):
    """Output positions r in [0, n_out) whose input r * stride + offset is inside [0, n_in):
    (first, last, first input), or None."""
    r0 = max(0, -(offset // stride))  # ceil(-offset / stride)
    r1 = min(n_out - 1, (n_in - 1 - offset) // stride)
    return None if r1 < r0 else (r0, r1, r0 * stride + offset)


class PoolGeometry:
    """A 2-D max-pool's kernel offsets as pairs of strided slices: for offset k (row-major), the
    input elements it reads and the windows (outputs) they belong to. Windows where the offset
    falls in the padding are left out (padding never wins), so no padded copy is made."""

    def __init__(self, shape, kernel, stride, padding, dilation, out_hw):
        kh, kw = kernel
        sh, sw = stride
        ph, pw = padding
        dh, dw = dilation
        oh, ow = out_hw
        h, w = shape[-2:]
        self.k = kh * kw
        self.out_shape = (*shape[:-2], oh, ow)
        self.in_hw, self.stride = (h, w), (sh, sw)
        self.offsets = [(i * dh - ph, j * dw - pw) for i in range(kh) for j in range(kw)]
        self.pairs = []
        for i in range(kh):
            rows = _valid(i * dh - ph, sh, oh, h)
            for j in range(kw):
                cols = _valid(j * dw - pw, sw, ow, w)
                if rows is None or cols is None:
                    self.pairs.append(None)
                    continue
                (r0, r1, h0), (c0, c1, w0) = rows, cols
                self.pairs.append((
                    (..., slice(h0, h0 + sh * (r1 - r0) + 1, sh),
                     slice(w0, w0 + sw * (c1 - c0) + 1, sw)),
                    (..., slice(r0, r1 + 1), slice(c0, c1 + 1))))


def _pool_hits(xd, best, geo, dtype):
    """Per kernel offset, 1.0 where the window's maximum sits there (1 + sign(x - best): float
    arithmetic, cheaper than boolean masks; the result is ``dtype``), and how many maxima each
    window has."""
    best = best.to(dtype)
    xd = xd.to(dtype)  # 16-bit: one cast here, not a mixed-dtype subtraction per offset
    count = torch.zeros(best.shape, dtype=dtype, device=best.device)
    hits = []
    for pair in geo.pairs:
        if pair is None:
            hits.append(None)
            continue
        i, o = pair
        h = torch.sub(xd[i], best[o]).sign_().add_(1.0)  # x <= best
        count[o] += h
        hits.append(h)
    return hits, count


def _pool_count(xd, best, geo, dtype):
    """How many maxima each window has (:func:`_pool_hits` without keeping the hits)."""
    best = best.to(dtype)
    xd = xd.to(dtype)
    count = torch.zeros(best.shape, dtype=dtype, device=best.device)
    for pair in geo.pairs:
        if pair is not None:
            i, o = pair
            count[o] += torch.sub(xd[i], best[o]).sign_().add_(1.0)
    return count


def _pool_by_index(fr, rule, x, xd, best, indices, geo, count, dtype):
    """The split, last and directional rules by index (CPU: reading how many windows are tied
    costs no device sync). Outside tied windows every rule routes the gradient to the unique
    maximum, torch's own index, so torch's kernels do that part; the (rare) tied windows are
    looked at one by one. Returns the indices to route by and the ``fix`` for the tied windows
    (None without one): per tied window the weight of each kernel offset (``wts``, K x T) and the
    inputs they read (``flat``); and for every input that wins in a tied window (``inputs``) its
    gradient rebuilt from scratch: per kernel offset, in reverse order as the dense rule adds
    them (:class:`_MaxPool`), the window it sits in (``windows``) and its weight there
    (``weights``), so the result is bitwise the dense rule's."""
    idx = indices.contiguous()
    tied = torch.nonzero(count.reshape(-1) > 1).squeeze(1)
    unresolved = _zero_count(best)
    n_tied = tied.numel()
    fix = None
    dev = tied.device
    (h, w), (sh, sw) = geo.in_hw, geo.stride
    oh, ow = geo.out_shape[-2:]
    if n_tied:
        plane, rem = tied // (oh * ow), tied % (oh * ow)
        di, dj = (torch.tensor(o, device=dev)[:, None] for o in zip(*geo.offsets))
        rows, cols = rem // ow * sh + di, rem % ow * sw + dj  # (K, T): what each tied window reads
        valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        flat = plane * (h * w) + rows.clamp_(0, h - 1) * w + cols.clamp_(0, w - 1)
        maxima = valid & (torch.take(xd, flat) == torch.take(best, tied))
        some = maxima.any(0)  # a NaN maximum equals nothing: torch's routing stays
        tied, flat, maxima = tied[some], flat[:, some], maxima[:, some]
    if tied.numel():
        k_all = torch.arange(geo.k, device=dev)[:, None]
        if rule == "split":  # weight = hit * (1 / count), as the dense rule's g * scale
            wts = maxima.to(dtype) * maxima.sum(0).to(dtype).reciprocal_()
        elif rule == "last":
            last = geo.k - 1 - maxima.flip(0).to(torch.uint8).argmax(0)
            wts = (k_all == last).to(dtype)
        else:  # directional: among the maxima the largest tangent wins
            t = _tangent(fr, x)
            winners = maxima
            if t is not None:
                tv = torch.take(t, flat).to(dtype).masked_fill_(~maxima, -math.inf)
                winners = maxima & (tv == tv.amax(0))
                winners = torch.where(winners.any(0), winners, maxima)  # (NaN tangents)
            cnt = winners.sum(0)
            wts = winners.to(dtype) / cnt
            unresolved = _count(cnt > 1)
        chosen = (wts > 0).to(torch.uint8).argmax(0)
        idx = idx.clone()
        idx.view(-1)[tied] = flat.gather(0, chosen[None])[0] % (h * w)
        inputs = torch.unique(flat[wts > 0])
        fix = {"tied": tied, "flat": flat, "wts": wts, "inputs": inputs}
        fix["windows"], fix["weights"] = _pool_windows_of(inputs, geo, tied, wts, indices, dtype)
    if rule == DIRECTIONAL:
        _record(fr, "max_pool2d", torch.tensor(n_tied), unresolved)
    return idx, fix


def _pool_windows_of(inputs, geo, tied, wts, indices, dtype):
    """For inputs (flat indices), per kernel offset k: the window where each sits at offset k
    (K x E, flat output indices; any valid one where none) and its weight there: ``wts`` in a
    tied window, 1 in an untied one whose maximum it is (torch's index), else 0."""
    dev = inputs.device
    (h, w), (sh, sw) = geo.in_hw, geo.stride
    oh, ow = geo.out_shape[-2:]
    kh, kw = len({o[0] for o in geo.offsets}), len({o[1] for o in geo.offsets})
    plane, pos = inputs // (h * w), inputs % (h * w)

    def axis(coord, offsets, stride, n_out):
        # window index along one axis: (coord - offset) / stride, where it divides and fits
        lo = -min(offsets)
        q, m = torch.div(coord + lo, stride, rounding_mode="floor"), (coord + lo) % stride
        a = torch.tensor(offsets, device=dev)[:, None] + lo  # >= 0
        r = q - torch.div(a, stride, rounding_mode="floor")
        return (m == a % stride) & (r >= 0) & (r < n_out), r.clamp_(0, n_out - 1)

    row_ok, r = axis(pos // w, [o[0] for o in geo.offsets[::kw]], sh, oh)
    col_ok, c = axis(pos % w, [o[1] for o in geo.offsets[:kw]], sw, ow)
    ok = (row_ok[:, None] & col_ok[None]).reshape(kh * kw, -1)
    windows = (plane * (oh * ow) + (r * ow)[:, None] + c[None]).reshape(kh * kw, -1)
    slot = torch.full((indices.numel(),), tied.numel(), dtype=torch.int64, device=dev)
    slot[tied] = torch.arange(tied.numel(), device=dev)
    at = slot[windows].masked_fill_(~ok, tied.numel())  # wts' column; T: not a tied window
    pad = torch.cat([wts, wts.new_zeros((wts.shape[0], 1))], 1)
    untied = ok & (at == tied.numel()) & (torch.take(indices, windows) == pos)
    return windows, pad.gather(1, at) + untied.to(dtype)


class _PoolIndexed(torch.autograd.Function):
    """Max-pooling routed by ``idx`` (one input per window) through torch's own kernels, with
    the tied windows' ``fix`` from :func:`_pool_by_index`. Backward and JVP in float32 for 16-bit
    inputs (the dense rule's precision), each result rounded once."""

    @staticmethod
    def forward(ctx, x, out, pool, idx, fix):
        ctx.pool, ctx.idx, ctx.fix = pool, idx, fix
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        dtype = _wdtype(g.dtype)
        gd = g.to(dtype).contiguous()
        # the kernel reads only the input's shape: a broadcast scalar, no allocation
        like = torch.zeros((), dtype=dtype, device=g.device).expand(ctx.x_shape)
        dx = torch.ops.aten.max_pool2d_with_indices_backward(gd, like, *ctx.pool, ctx.idx)
        fix = ctx.fix
        if fix is not None:
            # w * g rounded, as the dense rule's addcmul_(hit, g * scale), then summed from
            # +0.0 in reverse offset order
            parts = fix["weights"] * gd.reshape(-1)[fix["windows"]]
            acc = torch.zeros(parts.shape[1:], dtype=dtype, device=g.device)
            for k in reversed(range(parts.shape[0])):
                acc += parts[k]
            dx.view(-1)[fix["inputs"]] = acc
        return dx.to(ctx.x_dtype), None, None, None, None

    @staticmethod
    def jvp(ctx, t, *_):
        idx = ctx.idx
        out = t.reshape(*t.shape[:-2], -1).gather(-1, idx.reshape(*idx.shape[:-2], -1))
        out = out.reshape(idx.shape)
        fix = ctx.fix
        if fix is not None:
            dtype = _wdtype(t.dtype)
            tv = torch.take(t, fix["flat"]).to(dtype)
            wts = fix["wts"]
            acc = torch.zeros(tv.shape[1:], dtype=dtype, device=t.device)
            for k in range(tv.shape[0]):
                acc.addcmul_(tv[k], wts[k])  # the dense rule's op
            out.view(-1)[fix["tied"]] = acc.to(out.dtype)
        return out


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               native=None):
    """Batched (NCHW) max-pooling under the frame in force: ``(out, indices)``, or
    :data:`NATIVE`. Ties in a window follow the policy's rule; indices are torch's. With a
    census and torch's own rule, ``native()`` runs and its output is counted."""
    fr = _scope.frame()
    kernel = _pair(kernel_size)
    stride = kernel if stride is None or _pair(stride) is None else _pair(stride)
    padding, dilation = _pair(padding), _pair(dilation)
    policy = fr.policy
    rule = None if policy is None else choice(policy, "max_pool2d")
    # "first" is torch's own rule: the gradient goes to the argmax index
    own_rule = (rule is None or rule == "first" or not x.is_floating_point()
                or not _needs_grad(x))
    if own_rule:
        if fr.census is None:
            return NATIVE
        result = native()
        best = (result[0] if isinstance(result, tuple) else result).detach()
        with torch.no_grad():
            geo = PoolGeometry(x.shape, kernel, stride, padding, dilation, best.shape[-2:])
            dtype = torch.float32 if x.dtype in _HALF else x.dtype
            count = _pool_count(x.detach(), best.reshape(geo.out_shape), geo, dtype)
            fr.census.add("max_pool2d", torch.stack([_count(count > 1), _zero_count(best)]),
                          best.numel())
        return Done(result)
    xd = x.detach()
    dtype = _wdtype(x.dtype)
    by_index = SPARSE_ON_CPU and xd.device.type == "cpu" and rule in BY_INDEX_RULES
    with torch.no_grad():
        best, indices = F.max_pool2d_with_indices(xd, kernel, stride, padding, dilation,
                                                  ceil_mode)
        geo = PoolGeometry(xd.shape, kernel, stride, padding, dilation, best.shape[-2:])
        if by_index:
            count = _pool_count(xd, best, geo, dtype)
        else:
            hits, count = _pool_hits(xd, best, geo, dtype)
        if fr.census is not None:
            fr.census.add("max_pool2d", torch.stack([_count(count > 1), _zero_count(count)]),
                          best.numel())
        scale = None
        if by_index:
            idx, fix = _pool_by_index(fr, rule, x, xd, best, indices, geo, count, dtype)
        elif rule == "split":
            weights, scale = hits, count.reciprocal_()
        elif rule == "last":
            taken = torch.zeros_like(count)
            weights = [None] * len(hits)
            for k in reversed(range(len(hits))):
                if hits[k] is not None:
                    o = geo.pairs[k][1]
                    weights[k] = hits[k] * (1.0 - taken[o])
                    taken[o] = torch.maximum(taken[o], hits[k])
        else:  # directional: among each window's tied maxima the largest tangent wins
            t = _tangent(fr, x)
            winners = torch.zeros((geo.k, *best.shape), dtype=torch.bool, device=best.device)
            tt = torch.full((geo.k, *best.shape), -math.inf, dtype=dtype, device=best.device)
            for k, (pair, h) in enumerate(zip(geo.pairs, hits)):
                if pair is not None:
                    winners[k][pair[1]] = h > 0
                    if t is not None:
                        tt[k][pair[1]] = t[pair[0]]
            if t is not None:
                tt.masked_fill_(~winners, -math.inf)
                winners &= tt == tt.amax(0, keepdim=True)
            cnt = winners.sum(0)
            shares = winners.to(dtype) / cnt
            weights = [None if pair is None else shares[k][pair[1]]
                       for k, pair in enumerate(geo.pairs)]
            _record(fr, "max_pool2d", _count(count > 1), _count(cnt > 1))
    if by_index:
        pool = (kernel, stride, padding, dilation, ceil_mode)
        return _PoolIndexed.apply(x, best, pool, idx, fix), indices
    return _MaxPool.apply(x, best, geo, weights, scale), indices


# -- handlers: torch signatures -> the ops above -----------------------------------------------

HANDLERS: dict = {}


def _register(funcs, handler):
    for f in funcs:
        HANDLERS[f] = handler


def _run(result, func, args, kwargs):
    return func(*args, **kwargs) if result is NATIVE else result


def _simple(ew, inplace_funcs):
    def handler(func, args, kwargs):
        x, inplace = _bind(args, kwargs, ("input", "inplace"), {"inplace": False})
        if "out" in kwargs or not isinstance(x, torch.Tensor):
            return func(*args, **kwargs)
        inplace = bool(inplace) or func in inplace_funcs
        return _run(elementwise(ew, x, (), inplace), func, args, kwargs)

    return handler


_RELU_INPLACE = {torch.relu_, torch.Tensor.relu_}
_register([F.relu, torch.relu, torch.Tensor.relu, *_RELU_INPLACE],
          _simple(_RELU, _RELU_INPLACE))
_ABS_INPLACE = {torch.abs_, torch.Tensor.abs_, torch.Tensor.absolute_}
_register([torch.abs, torch.Tensor.abs, torch.absolute, torch.Tensor.absolute, *_ABS_INPLACE],
          _simple(_ABS, _ABS_INPLACE))
_RELU6_INPLACE = {torch._C._nn.relu6_} if hasattr(torch._C._nn, "relu6_") else set()
_register([F.relu6, torch._C._nn.relu6, *_RELU6_INPLACE], _simple(_RELU6, _RELU6_INPLACE))
_register([F.hardswish, torch._C._nn.hardswish, torch._C._nn.hardswish_],
          _simple(_HARDSWISH, {torch._C._nn.hardswish_}))


def _leaky_handler(func, args, kwargs):
    x, slope, inplace = _bind(args, kwargs, ("input", "negative_slope", "inplace"),
                              {"negative_slope": 0.01, "inplace": False})
    if "out" in kwargs or not isinstance(x, torch.Tensor):
        return func(*args, **kwargs)
    inplace = bool(inplace) or func is torch._C._nn.leaky_relu_
    slope = float(slope)
    return _run(elementwise(_LEAKY, x, (slope,), inplace, slope=slope), func, args, kwargs)


_register([F.leaky_relu, torch._C._nn.leaky_relu, torch._C._nn.leaky_relu_], _leaky_handler)


def _hardtanh_handler(func, args, kwargs):
    x, lo, hi, inplace = _bind(args, kwargs, ("input", "min_val", "max_val", "inplace"),
                               {"min_val": -1.0, "max_val": 1.0, "inplace": False})
    if "out" in kwargs or not isinstance(x, torch.Tensor) or float(lo) > float(hi):
        return func(*args, **kwargs)  # torch handles (or raises)
    inplace = bool(inplace) or func is torch._C._nn.hardtanh_
    lo, hi = float(lo), float(hi)
    if (lo, hi) == (0.0, 6.0):  # nn.ReLU6 is Hardtanh(0, 6): relu6's rule
        return _run(elementwise(_RELU6, x, (), inplace), func, args, kwargs)
    return _run(elementwise(_HARDTANH, x, (lo, hi), inplace), func, args, kwargs)


_register([F.hardtanh, torch._C._nn.hardtanh, torch._C._nn.hardtanh_], _hardtanh_handler)

_CLAMP_INPLACE = {torch.clamp_, torch.clip_, torch.Tensor.clamp_, torch.Tensor.clip_,
                  torch.clamp_min_, torch.clamp_max_, torch.Tensor.clamp_min_,
                  torch.Tensor.clamp_max_}
_CLAMP_MIN = {torch.clamp_min, torch.clamp_min_, torch.Tensor.clamp_min, torch.Tensor.clamp_min_}
_CLAMP_MAX = {torch.clamp_max, torch.clamp_max_, torch.Tensor.clamp_max, torch.Tensor.clamp_max_}


def _clamp_handler(func, args, kwargs):
    if func in _CLAMP_MIN:
        x, lo = _bind(args, kwargs, ("input", "min"), {})
        hi = None
    elif func in _CLAMP_MAX:
        x, hi = _bind(args, kwargs, ("input", "max"), {})
        lo = None
    else:
        x, lo, hi = _bind(args, kwargs, ("input", "min", "max"), {})
    if "out" in kwargs or not isinstance(x, torch.Tensor) or (lo is None and hi is None):
        return func(*args, **kwargs)  # torch handles (or raises)
    inplace = func in _CLAMP_INPLACE
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        y = clamp_tensor(x, lo, hi)
        if y is NATIVE:
            return func(*args, **kwargs)
        return x.copy_(y) if inplace else y
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    return _run(elementwise(_CLAMP, x, (lo, hi), inplace), func, args, kwargs)


_register([torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip, *_CLAMP_INPLACE,
           *_CLAMP_MIN, *_CLAMP_MAX], _clamp_handler)


def _pairwise_handler(key):
    def handler(func, args, kwargs):
        a, b = _bind(args, kwargs, ("input", "other"), {})
        if "out" in kwargs or not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return func(*args, **kwargs)
        return _run(pairwise(key, a, b), func, args, kwargs)

    return handler


_register([torch.maximum, torch.Tensor.maximum], _pairwise_handler("maximum"))
_register([torch.minimum, torch.Tensor.minimum], _pairwise_handler("minimum"))


def _max_handler(kind):
    """torch.max / torch.min: full reduction, along a dim (values, indices), or of two tensors."""

    def handler(func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        rest = args[1:]
        other = rest[0] if rest else kwargs.get("other")
        dim = rest[0] if rest else kwargs.get("dim")
        if "out" in kwargs or not isinstance(x, torch.Tensor) or isinstance(dim, str):
            return func(*args, **kwargs)
        if isinstance(other, torch.Tensor):
            return _run(pairwise("maximum" if kind == "max" else "minimum", x, other),
                        func, args, kwargs)
        if dim is None:
            return _run(reduction(kind, x, (), False), func, args, kwargs)
        keepdim = bool(rest[1] if len(rest) > 1 else kwargs.get("keepdim", False))
        values = reduction(f"{kind}_axis", x, _dims(x, dim), keepdim)
        if values is NATIVE:
            return func(*args, **kwargs)
        indices = (torch.max if kind == "max" else torch.min)(x.detach(), dim, keepdim).indices
        rtype = torch.return_types.max if kind == "max" else torch.return_types.min
        return rtype((values, indices))

    return handler


_register([torch.max, torch.Tensor.max], _max_handler("max"))
_register([torch.min, torch.Tensor.min], _max_handler("min"))


def _amax_handler(kind):
    def handler(func, args, kwargs):
        x, dim, keepdim = _bind(args, kwargs, ("input", "dim", "keepdim"),
                                {"dim": (), "keepdim": False})
        if "out" in kwargs or not isinstance(x, torch.Tensor):
            return func(*args, **kwargs)
        return _run(reduction(kind, x, _dims(x, dim), bool(keepdim)), func, args, kwargs)

    return handler


_register([torch.amax, torch.Tensor.amax], _amax_handler("max"))
_register([torch.amin, torch.Tensor.amin], _amax_handler("min"))


def _max_pool_handler(func, args, kwargs):
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
             "return_indices")
    defaults = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                "return_indices": func is F.max_pool2d_with_indices}
    x, kernel, stride, padding, dilation, ceil_mode, ret = _bind(args, kwargs, names, defaults)
    if func is torch.max_pool2d:
        ret = False
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        return func(*args, **kwargs)
    unbatched = x.dim() == 3
    result = max_pool2d(x.unsqueeze(0) if unbatched else x, kernel, stride, padding, dilation,
                        bool(ceil_mode), native=lambda: func(*args, **kwargs))
    if result is NATIVE:
        return func(*args, **kwargs)
    if isinstance(result, Done):
        return result.value
    out, indices = result
    if unbatched:
        out, indices = out.squeeze(0), indices.squeeze(0)
    return (out, indices) if ret else out


_register([F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d], _max_pool_handler)


def _l1_handler(func, args, kwargs):
    x, target, size_average, reduce, how = _bind(
        args, kwargs, ("input", "target", "size_average", "reduce", "reduction"),
        {"reduction": "mean"})
    if not (isinstance(x, torch.Tensor) and isinstance(target, torch.Tensor)):
        return func(*args, **kwargs)
    if size_average is not None or reduce is not None:
        how = torch.nn._reduction.legacy_get_string(size_average, reduce)
    fr = _scope.frame()
    if fr.policy is None:
        if fr.census is not None:
            with torch.no_grad():
                _census_elementwise(fr.census, "l1_loss", x.detach() - target.detach(), (0.0,))
        return func(*args, **kwargs)
    # |input - target| with l1_loss's own kink rule, then the reduction (as the NumPy engine)
    diff = x - target
    a = elementwise(_L1, diff)
    if a is NATIVE:
        a = torch.abs(diff)
    if how == "mean":
        return a.mean()
    if how == "sum":
        return a.sum()
    return a


_register([F.l1_loss], _l1_handler)


_BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps")
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _batch_norm_handler(func, args, kwargs):
    """F.batch_norm with batch statistics in the directional pass: torch's own forward on the
    primals (running statistics updated once, torch's backward), and the tangent from
    :func:`batch_norm_tangent`, several times cheaper than torch's forward-mode formula (which
    makes about ten full-size passes, and copies in 16-bit). Everything else passes through."""
    if fwAD._current_level < 0 or _scope.frame().directional is None:
        return func(*args, **kwargs)
    x, rm, rv, w, b, training, momentum, eps = _bind(args, kwargs, _BN_NAMES, _BN_DEFAULTS)
    if (not training or not isinstance(x, torch.Tensor) or not x.is_floating_point()
            or x.dim() < 2 or any(isinstance(v, torch.Tensor) and v.dtype != x.dtype
                                  for v in (w, b))):
        return func(*args, **kwargs)
    duals = [None if v is None else fwAD.unpack_dual(v) for v in (x, w, b)]
    tangents = [None if u is None else u.tangent for u in duals]
    if all(t is None for t in tangents):
        return func(*args, **kwargs)
    xp, wp, bp = (None if u is None else u.primal for u in duals)
    y = func(xp, rm, rv, wp, bp, training, momentum, eps)
    with torch.no_grad():
        ty = batch_norm_tangent(xp.detach(), None if wp is None else wp.detach(), *tangents,
                                float(eps))
    return fwAD.make_dual(y, ty)


def batch_norm_tangent(x, w, tx, tw, tb, eps):
    """The tangent of batch-norm with batch statistics (over every dim but 1): ``J tx + tw x-hat
    + tb`` (None: a zero tangent), x-hat = (x - mean) / sqrt(var + eps). The Jacobian in x, ``J
    = w r (I - (1 + x-hat x-hat^T) / n)`` per channel, is symmetric, so ``J tx`` is torch's own
    batch-norm backward kernel applied to ``tx``; ``tw x-hat + tb`` is batch-norm itself with
    ``tw`` and ``tb`` for weight and bias. Native kernels instead of torch's JVP formula (about ten
    full-size passes, and copies in 16-bit), float32 inside for 16-bit inputs."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if x.dtype in _HALF:
        if tw is None and tb is not None:
            tw = torch.zeros_like(tb)
        affine, mean, invstd = torch.native_batch_norm(x, tw, tb, None, None, True, 0.0, eps)
        if tw is None:
            affine = None  # (x-hat: only the statistics were wanted)
    else:  # torch's CPU kernel takes its statistics several times slower than these passes
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        mean = x.sum(dims) / n
        xh = x - mean.reshape(shape)
        invstd = ((xh * xh).sum(dims) / n).add_(eps).rsqrt_()
        affine = None
        if tw is not None:
            affine = xh.mul_((invstd * tw).reshape(shape))
        if tb is not None:
            affine = tb.reshape(shape).expand(x.shape) if affine is None else affine.add_(
                tb.reshape(shape))
    if tx is None:
        return torch.zeros_like(x) if affine is None else affine.contiguous()
    out = torch.ops.aten.native_batch_norm_backward(
        tx, x, w, None, None, mean, invstd, True, eps, [True, False, False])[0]
    return out if affine is None else out.add_(affine)


_register([F.batch_norm], _batch_norm_handler)


def _backward_handler(func, args, kwargs):
    """Before a backward pass, close the directional pass's dual level: the tangents have done
    their work by then, and torch's backward runs several times slower while dual tensors of an
    open level are alive."""
    driver = _scope.frame().directional
    if driver is not None:
        driver.before_backward()
    return func(*args, **kwargs)


_register([torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad],
          _backward_handler)
