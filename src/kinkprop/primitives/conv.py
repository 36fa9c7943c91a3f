"""Convolution and pooling in NCHW, as in PyTorch: conv2d (weights (out, in, kh, kw)), avg_pool2d
(padding counted in the average, PyTorch's default) and max_pool2d (padding never wins).

Windows are visited by kernel offset (kh * kw strided slices), never by a Python loop over output
positions, and scatters back (col2im, pooling VJPs) add whole slices, with no ``np.add.at``.
"""

from __future__ import annotations

import weakref

import numpy as np

from ..kinks.spec import DIRECTIONAL
from ..tensor import Tensor, as_tensor
from .core import apply, choose, register
from .linalg import with_bias
from .nonsmooth import _check_resolved


def _pair(v, name) -> tuple[int, int]:
    # a float (kernel_size=1.5) must reach the integer check, not fail in tuple() unexplained
    a, b = (v, v) if isinstance(v, (int, float, np.integer, np.floating)) else tuple(v)
    if int(a) != a or int(b) != b:
        raise ValueError(f"{name} must be integers, got {v!r}")
    return int(a), int(b)


class _Geometry:
    """Kernel, stride, padding and the output size of a 2-D window op on an input shape."""

    #: conv2d's column order for this call (see ``_batch_last``); pooling does not read it
    batch_last = False

    def __init__(self, shape, kernel, stride, padding, name):
        if len(shape) != 4:
            raise ValueError(f"{name}: input must be NCHW (4-D), got shape {shape}")
        self.kh, self.kw = kernel
        self.sh, self.sw = stride
        self.ph, self.pw = padding
        n, c, h, w = shape
        self.shape = shape
        self.hp, self.wp = h + 2 * self.ph, w + 2 * self.pw
        self.oh = (self.hp - self.kh) // self.sh + 1
        self.ow = (self.wp - self.kw) // self.sw + 1
        if min(self.kh, self.kw, self.sh, self.sw) < 1 or min(self.ph, self.pw) < 0:
            raise ValueError(f"{name}: kernel and stride must be >= 1 and padding >= 0")
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"{name}: kernel {kernel} with padding {padding} does not fit "
                             f"input of spatial size {(h, w)}")

    def pad(self, x, value=0.0):
        """``x`` with ``value`` around each image (a new C-ordered array), or ``x`` itself when
        there is no padding: ``np.pad(..., constant_values=value)`` at ~half its cost (0.08 ->
        0.035 ms on LeNet's first conv)."""
        if not (self.ph or self.pw):
            return x
        if np.dtype(x.dtype).kind in "iub" and not np.isfinite(value):
            raise ValueError(f"cannot pad {x.dtype} with {value}")  # (np.full would cast it)
        xp = np.full(x.shape[:2] + (self.hp, self.wp), value, dtype=x.dtype)
        self.unpad(xp)[...] = x
        return xp

    def unpad(self, xp):
        return xp[:, :, self.ph:self.ph + self.shape[2], self.pw:self.pw + self.shape[3]]

    def offsets(self):
        """(k, slice) for each kernel offset: the strided slice of the padded input it reads."""
        k = 0
        for i in range(self.kh):
            for j in range(self.kw):
                yield k, (slice(None), slice(None),
                          slice(i, i + self.sh * (self.oh - 1) + 1, self.sh),
                          slice(j, j + self.sw * (self.ow - 1) + 1, self.sw))
                k += 1

    @property
    def size(self):
        return self.kh * self.kw


# -- conv2d ------------------------------------------------------------------------------------
#
# conv2d is im2col + GEMM: the windows as the columns of a (C * kh * kw, M) matrix, one per output
# position, and the weights (O, C * kh * kw) times it. The M positions come in one of two orders:
#
# * image-major, (N, OH, OW): im2col copies runs of OW values per kernel offset and the (O, M)
#   product goes back to NCHW as O blocks of OH * OW values -- cheap when the image is wide;
# * batch-last, (OH, OW, N): the input is first transposed to (C, HP, WP, N), and each kernel
#   offset then copies runs of OW * N values -- several times faster for narrow outputs (OW = 10
#   on LeNet's second conv, where image-major copies cost more than the GEMM), at the price of
#   transposing the input and the output.
#
# ``_batch_last`` picks one per call; the saved columns, the VJP and the JVP follow it.


def _batch_last(geo, weight_shape) -> bool:
    """Batch-last order for narrow outputs (OW < 16) whose columns outweigh the output
    (C * kh * kw > 2 * O): there the im2col copies, which it speeds up, dominate the transposes
    it adds. LeNet's second conv (OW 10, 150 vs 16) takes it, its first (OW 28) does not."""
    o, c = weight_shape[:2]
    return geo.ow < 16 and c * geo.size > 2 * o


def _im2col_t(xp, geo):
    """Windows as a (C * kh * kw, N * OH * OW) matrix, filled one kernel offset at a time."""
    n, c = xp.shape[:2]
    cols = np.empty((c, geo.kh, geo.kw, n, geo.oh, geo.ow), dtype=xp.dtype)
    xc = xp.transpose(1, 0, 2, 3)
    for k, sl in geo.offsets():
        cols[:, k // geo.kw, k % geo.kw] = xc[sl]
    return cols.reshape(c * geo.size, n * geo.oh * geo.ow)


#: images transposed at a time by :func:`_to_batch_last`
_TRANSPOSE_ROWS = 8


def _to_batch_last(a):
    """``a`` (N, ...) as a contiguous (..., N) copy. A few images at a time: NCHW images often
    lie a power of two apart (16 * 8 * 8 floats = 4 KB), and a whole-batch transpose then reads
    addresses that share cache sets; 8 rows at a time is ~4x faster on LeNet's gradients."""
    n = a.shape[0]
    rows = a.reshape(n, int(np.prod(a.shape[1:])))  # (not -1: n may be 0)
    out = np.empty((rows.shape[1], n), a.dtype)
    for s in range(0, n, _TRANSPOSE_ROWS):
        out[:, s:s + _TRANSPOSE_ROWS] = rows[s:s + _TRANSPOSE_ROWS].T
    return out.reshape(a.shape[1:] + (n,))


def _columns(x, geo):
    """The windows of ``x`` (NCHW) as (C * kh * kw, M) columns in the call's position order."""
    if geo.batch_last:
        return _cols_batch_last(_to_batch_last(geo.pad(x)), geo, 0, geo.oh)
    return _im2col_t(geo.pad(x), geo)


def conv_rows_to_nchw(m, geo, contiguous=True):
    """An (O, M) matrix over conv2d's output positions (in the call's order) as (N, O, OH, OW)."""
    o, n = m.shape[0], geo.shape[0]
    if geo.batch_last:
        return np.ascontiguousarray(m.reshape(o, geo.oh, geo.ow, n).transpose(3, 0, 1, 2))
    out = m.reshape(o, n, geo.oh, geo.ow).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(out) if contiguous else out


def _nchw_to_rows(g, geo):
    """(N, O, OH, OW) as an (O, M) matrix over the output positions in the call's order."""
    o = g.shape[1]
    if geo.batch_last:
        return _to_batch_last(g).reshape(o, -1)
    return g.transpose(1, 0, 2, 3).reshape(o, -1)


def _conv_fwd(x, w, *b, geo):
    cols = _columns(x, geo)
    ans = conv_rows_to_nchw(_few_rows_matmul(w.reshape(w.shape[0], -1), cols), geo)
    if b:
        ans += b[0][None, :, None, None]
    return ans, (cols, w, geo)


def _conv_vjp(g, res, needs, c):
    cols, w, geo = res
    o = w.shape[0]
    g_rows = _nchw_to_rows(g, geo)  # (O, M)
    gx = gw = gb = None
    if needs[0]:
        gx = _col2im(w.reshape(o, -1).T, g_rows, geo)
    if needs[1]:
        gw = _few_rows_gram(g_rows, cols).reshape(w.shape)
    if len(needs) > 2 and needs[2]:
        gb = g_rows.sum(axis=1)
    return (gx, gw, gb)[:len(needs)]


def _col2im(wt, g_rows, geo):
    """The input gradient: ``wt @ g_rows`` (the columns' gradients) added back into the windows
    they came from, one kernel offset at a time, and returned as NCHW."""
    n, c = geo.shape[:2]
    if not geo.batch_last:
        dcols = (wt @ g_rows).reshape(c, geo.kh, geo.kw, n, geo.oh, geo.ow)
        dxp = np.zeros((c, n, geo.hp, geo.wp), dtype=g_rows.dtype)
        for k, sl in geo.offsets():
            dxp[sl] += dcols[:, k // geo.kw, k % geo.kw]
        return np.ascontiguousarray(geo.unpad(dxp.transpose(1, 0, 2, 3)))
    # batch-last: a few output rows at a time, each block's column gradients added back while
    # they are still in cache (runs of OW * N values)
    dxp = np.zeros((c, geo.hp, geo.wp, n), dtype=g_rows.dtype)
    row = geo.ow * n
    step = max(1, _JVP_BLOCK_BYTES // max(1, wt.shape[0] * row * g_rows.dtype.itemsize))
    for a in range(0, geo.oh, step):
        b = min(a + step, geo.oh)
        dcols = (wt @ g_rows[:, a * row:b * row]).reshape(c, geo.kh, geo.kw, b - a, geo.ow, n)
        for i in range(geo.kh):
            for j in range(geo.kw):
                dxp[:, a * geo.sh + i:(b - 1) * geo.sh + i + 1:geo.sh,
                    j:j + geo.sw * (geo.ow - 1) + 1:geo.sw] += dcols[:, i, j]
    dx = dxp[:, geo.ph:geo.ph + geo.shape[2], geo.pw:geo.pw + geo.shape[3]]
    return np.ascontiguousarray(dx.transpose(3, 0, 1, 2))


def _conv_jvp(ts, res, c):
    """conv(t_x, w) + conv(x, t_w) + t_b. The terms are summed in place as (O, M) matrices (the
    t_w term reuses the forward's saved columns) and go to NCHW once."""
    cols, w, geo = res
    o = w.shape[0]
    out = None
    if ts[1] is not None:
        out = _few_rows_matmul(ts[1].reshape(o, -1), cols)
    if ts[0] is not None:
        out = _add_conv(out, ts[0], w, geo)
    if len(ts) > 2 and ts[2] is not None:
        if out is None:  # only the bias moves
            out = np.zeros((o, cols.shape[1]), dtype=ts[2].dtype)
        out = _add_term(out, ts[2][:, None])
    return conv_rows_to_nchw(out, geo, contiguous=False)


#: bytes of tangent columns built at a time by the JVP (a block that stays in cache)
_JVP_BLOCK_BYTES = 2 << 20
#: bytes of ``b`` per block in :func:`_few_rows_matmul`
_GEMM_BLOCK_BYTES = 512 << 10


def _few_rows_matmul(a, b):
    """``a @ b`` for an ``a`` with few rows (output channels) and a long ``b`` (the columns).
    OpenBLAS runs it ~1.5-2x faster in blocks of ``b``'s columns of about 512 KB (LeNet's first
    conv, 6 rows by 25, forward and JVP); from 16 rows on blocking gains nothing, and the product
    is left whole."""
    if a.shape[0] >= 16:
        return a @ b
    out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    step = max(1, _GEMM_BLOCK_BYTES // max(1, b.shape[0] * b.dtype.itemsize))
    for j in range(0, b.shape[1], step):
        np.matmul(a, b[:, j:j + step], out=out[:, j:j + step])
    return out


def _few_rows_gram(g, cols):
    """The weight gradient ``g @ cols.T``: (O, M) times (M, C * kh * kw), a long inner dimension.
    Computed as ``(cols @ g.T).T``, the orientation OpenBLAS runs ~1.5x faster; for few output
    channels (< 16) summed over blocks of ~512 KB of ``cols`` (LeNet's first conv: ~2x faster
    than whole)."""
    if g.shape[0] >= 16 or cols.shape[1] == 0:
        return (cols @ g.T).T
    step = max(1, _GEMM_BLOCK_BYTES // max(1, cols.shape[0] * cols.dtype.itemsize))
    acc = part = None
    for j in range(0, cols.shape[1], step):
        part = np.matmul(cols[:, j:j + step], g[:, j:j + step].T, out=part)
        if acc is None:
            acc = part.copy()
        else:
            acc += part
    return acc.T


def _add_conv(out, t, w, geo):
    """``out`` (an (O, M) matrix of its own over the call's output positions, or None) plus
    conv(t, w) in that layout.

    The columns are built batch-last (see the note above ``_batch_last``) whatever the call's
    order, a few output rows at a time, each block multiplied while it is still in cache."""
    o, n = w.shape[0], geo.shape[0]
    wm = w.reshape(o, -1)
    tt = _to_batch_last(geo.pad(t))
    conv = np.empty((o, geo.oh, geo.ow, n), np.result_type(wm, tt))
    step = max(1, _JVP_BLOCK_BYTES // max(1, wm.shape[1] * geo.ow * n * tt.dtype.itemsize))
    for a in range(0, geo.oh, step):
        rows = conv[:, a:a + step]
        np.matmul(wm, _cols_batch_last(tt, geo, a, a + rows.shape[1]), out=rows.reshape(o, -1))
    if geo.batch_last:
        return conv.reshape(o, -1) if out is None else _add_term(out, conv.reshape(o, -1))
    if out is None:
        out = np.zeros((o, n * geo.oh * geo.ow), conv.dtype)
    elif np.result_type(out, conv) != out.dtype:
        out = out.astype(np.result_type(out, conv))
    out.reshape(o, n, geo.oh, geo.ow)[...] += conv.transpose(0, 3, 1, 2)
    return out


def _cols_batch_last(tt, geo, a, b):
    """im2col of output rows ``a:b`` from a batch-last padded input ``tt`` (C, HP, WP, N):
    a (C * kh * kw, (b - a) * OW * N) matrix, rows in the weights' (c, i, j) order."""
    c, n = tt.shape[0], tt.shape[3]
    cols = np.empty((c, geo.kh, geo.kw, b - a, geo.ow, n), tt.dtype)
    for i in range(geo.kh):
        for j in range(geo.kw):
            cols[:, i, j] = tt[:, a * geo.sh + i:(b - 1) * geo.sh + i + 1:geo.sh,
                               j:j + geo.sw * (geo.ow - 1) + 1:geo.sw]
    return cols.reshape(c * geo.size, (b - a) * geo.ow * n)


def _add_term(out, term):
    """``out + term``, in place where that keeps the promoted dtype (``out`` is a fresh array)."""
    if np.result_type(out, term) != out.dtype:
        return out + term
    out += term
    return out


def _conv_jvp_at(ts, res, choice, need):
    """The JVP at the output elements set in ``need`` (zeros elsewhere): each one a dot product
    of its window (gathered from the saved columns and from the input tangent) with a row of the
    weights, so the work is proportional to the elements asked for."""
    cols, w, geo = res
    # (np.nonzero on the 4-D mask is ~20x slower than on its flat view)
    n_, o_, y, x = np.unravel_index(np.flatnonzero(need), need.shape)
    wm = w.reshape(w.shape[0], -1)
    vals = np.zeros(n_.size, np.result_type(cols, *(t for t in ts if t is not None)))
    if ts[1] is not None:  # conv(x, t_w): the saved columns at these positions
        pos = ((y * geo.ow + x) * geo.shape[0] + n_ if geo.batch_last
               else (n_ * geo.oh + y) * geo.ow + x)
        vals += np.einsum("ek,ke->e", ts[1].reshape(wm.shape)[o_], cols[:, pos])
    if ts[0] is not None:  # conv(t_x, w): the windows of the padded tangent
        tp = geo.pad(ts[0])
        i, j = np.divmod(np.arange(geo.size), geo.kw)  # kernel offsets, row-major
        top = (y * geo.sh)[:, None, None] + i[None, None, :]
        left = (x * geo.sw)[:, None, None] + j[None, None, :]
        chan = np.arange(tp.shape[1])[None, :, None]
        windows = tp[n_[:, None, None], chan, top, left].reshape(n_.size, wm.shape[1])  # (c,i,j)
        vals += np.einsum("ek,ek->e", wm[o_], windows)
    if len(ts) > 2 and ts[2] is not None:
        vals += ts[2][o_]
    out = np.zeros(need.shape, vals.dtype)
    out[n_, o_, y, x] = vals
    return out


_conv2d = register("conv2d", _conv_fwd, _conv_vjp, _conv_jvp, jvp_at=_conv_jvp_at)


def conv2d(x, weight, bias=None, stride=1, padding=0) -> Tensor:
    """2-D cross-correlation in NCHW with weights (out, in, kh, kw) and bias (out,), as PyTorch."""
    x = as_tensor(x)
    weight = as_tensor(weight, like=x)
    if weight.ndim != 4:
        raise ValueError(f"conv2d: weight must be (out, in, kh, kw), got shape {weight.shape}")
    if x.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d: input {x.shape} does not match weight {weight.shape} "
                         "(input must be NCHW with C = weight.shape[1])")
    if weight.shape[0] == 0:
        raise ValueError(f"conv2d: weight {weight.shape} has no output channel")
    geo = _Geometry(x.shape, weight.shape[2:], _pair(stride, "stride"),
                    _pair(padding, "padding"), "conv2d")
    geo.batch_last = _batch_last(geo, weight.shape)
    return apply(_conv2d, with_bias("conv2d", x, weight, bias), {"geo": geo})


# -- avg_pool2d --------------------------------------------------------------------------------


def _avg(x, geo):
    xp = geo.pad(x)
    out = np.zeros((geo.shape[0], geo.shape[1], geo.oh, geo.ow), dtype=x.dtype)
    for _, sl in geo.offsets():
        out += xp[sl]
    out /= geo.size
    return out


def _avg_vjp(g, res, needs, c):
    geo = res
    dxp = np.zeros((geo.shape[0], geo.shape[1], geo.hp, geo.wp), dtype=g.dtype)
    share = g / geo.size
    for _, sl in geo.offsets():
        dxp[sl] += share
    return (geo.unpad(dxp),)


_avg_pool2d = register("avg_pool2d", lambda x, geo: (_avg(x, geo), geo), _avg_vjp,
                       lambda ts, geo, c: _avg(ts[0], geo))


def avg_pool2d(x, kernel_size, stride=None, padding=0) -> Tensor:
    """Mean over each window (NCHW); zero padding counts in the mean (count_include_pad=True)."""
    x = as_tensor(x)
    kernel = _pair(kernel_size, "kernel_size")
    geo = _Geometry(x.shape, kernel, kernel if stride is None else _pair(stride, "stride"),
                    _pair(padding, "padding"), "avg_pool2d")
    return apply(_avg_pool2d, (x,), {"geo": geo})


# -- max_pool2d --------------------------------------------------------------------------------


def _tiles(geo) -> bool:
    """Windows tile the input (stride = kernel, no padding): each element in one window."""
    return (geo.sh, geo.sw) == (geo.kh, geo.kw) and not (geo.ph or geo.pw)


def _lowest(dtype):
    """The value padding takes in a max, one no element is below: -inf, an integer type's
    minimum (the max is then right; integer tensors carry no gradient, so a tie with padding at
    that minimum decides nothing) or False."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return np.iinfo(dtype).min
    return False if dtype.kind == "b" else -np.inf


def _max_pool_fwd(x, geo):
    xp = geo.pad(x, _lowest(x.dtype))
    best = None
    if _tiles(geo):  # fast path: a chain of maxima; the first winner is found in backward
        for _, sl in geo.offsets():
            best = xp[sl].copy() if best is None else np.maximum(best, xp[sl], out=best)
        return best, (xp, best, None, geo)
    first = np.zeros((geo.shape[0], geo.shape[1], geo.oh, geo.ow), dtype=np.int16)
    for k, sl in geo.offsets():
        s = xp[sl]
        if best is None:
            best = s.copy()
            continue
        better = s > best  # strict: the first (row-major) maximum keeps its index
        np.copyto(best, s, where=better)
        np.copyto(first, k, where=better)
    return best, (xp, best, first, geo)


def _pool_hits(res) -> np.ndarray:
    """Per kernel offset, the windows whose maximum that offset attains, as one (K, ...) array;
    computed once per node and shared by the VJP and the census. The directional selection
    takes it over (see :func:`_max_pool_select`); a later caller computes it again."""
    xp, best, first, geo = res
    if getattr(geo, "hits", None) is None:
        geo.hits = np.empty((geo.size,) + best.shape, bool)
        for k, sl in geo.offsets():
            np.equal(xp[sl], best, out=geo.hits[k])
    return geo.hits


def _pool_weights(res, choice):
    """Per-offset weights: a list of K arrays shaped like the output (or None for all-zero)."""
    xp, best, first, geo = res
    if isinstance(choice, _Winners):  # resolved directionally
        share = choice.share(xp.dtype)
        return [w * share for w in choice.mask]
    if choice == "first" and first is not None:
        return [first == k for k, _ in geo.offsets()]
    hits = _pool_hits(res)
    if choice == "first":  # the first tied offset in row-major order
        return list(_first_hits(hits))
    if choice == DIRECTIONAL and (sum(hits) > 1).any():
        _check_resolved("max_pool2d", choice)
    if choice in ("split", DIRECTIONAL):
        count = np.sum(hits, axis=0)
        return [h / count for h in hits]
    # "last": the final tied offset in row-major order
    return list(_first_hits(hits[::-1]))[::-1]


def _first_hits(hits):
    """Each offset's hits (an iterable of masks, in offset order) less those an earlier offset
    already had: ties go to the first. The masks given are not modified."""
    taken = None
    for h in hits:
        if taken is None:
            taken = h.copy()
        else:
            h = h & ~taken
            taken |= h
        yield h


def _max_pool_vjp(g, res, needs, choice):
    xp, best, first, geo = res
    if _tiles(geo) and choice == "first":
        return (_first_winner_vjp(g, res),)
    dxp = np.zeros(xp.shape, dtype=g.dtype)
    if _tiles(geo):  # disjoint windows: write each offset's share in place
        for (_, sl), w in zip(geo.offsets(), _pool_weights(res, choice)):
            np.multiply(g, w, out=dxp[sl])
        return (dxp,)
    # offsets in reverse: each input element then sums its windows' shares in row-major window
    # order, as PyTorch's CPU kernel does, so overlapping windows round the same way
    for (_, sl), w in reversed(list(zip(geo.offsets(), _pool_weights(res, choice)))):
        dxp[sl] += g * w
    return (geo.unpad(dxp),)


#: bytes of pooled output per block in :func:`_first_winner_vjp`
_VJP_BLOCK_BYTES = 256 << 10


def _first_winner_vjp(g, res):
    """The VJP of tiling windows (stride = kernel, no padding) with ties to the first maximum in
    row-major order (PyTorch's, JAX's and TensorFlow's rule): each offset in turn takes the
    gradient where it attains the maximum and no earlier offset did. A few images at a time, so
    that the masks and the gradient's slices stay in cache: 1.5x faster than whole on the
    convnet's first pool (128 x 32 x 28 x 28)."""
    xp, best, first, geo = res
    covered = xp.shape[2] == geo.oh * geo.kh and xp.shape[3] == geo.ow * geo.kw
    dxp = (np.empty if covered else np.zeros)(xp.shape, dtype=g.dtype)
    hits = getattr(geo, "hits", None)  # the census's, when it counted this node's ties
    step = max(1, _VJP_BLOCK_BYTES // max(1, best.nbytes // max(1, best.shape[0])))
    for a in range(0, xp.shape[0], step):
        block = slice(a, a + step)
        x, top, gb, d = xp[block], best[block], g[block], dxp[block]
        offsets = [sl for _, sl in geo.offsets()]
        block_hits = (np.equal(x[sl], top) for sl in offsets) if hits is None else hits[:, block]
        for sl, h in zip(offsets, _first_hits(block_hits)):
            np.multiply(gb, h, out=d[sl])
    return dxp


def _max_pool_jvp(ts, res, choice):
    xp, best, first, geo = res
    if isinstance(choice, _Winners):
        out = choice.take_tangent(ts[0])
        if out is None:
            tp = geo.pad(ts[0])
            out = _winners_tangent((tp[sl] for _, sl in geo.offsets()), choice.mask,
                                   choice.share(tp.dtype))
        return out
    tp = geo.pad(ts[0])
    out = np.zeros(best.shape, dtype=tp.dtype)
    for (_, sl), w in zip(geo.offsets(), _pool_weights(res, choice)):
        out += tp[sl] * w
    return out


class _Winners:
    """A directional max-pool choice: ``mask`` (K, ...) flags each window's winning offsets,
    which share its gradient equally (see :meth:`share`). A bit per offset, not a float weight,
    keeps the memory held until backward small.

    The selection may leave the output tangent along its one direction (it has that tangent's
    window-major copy at hand, which the JVP would have to gather again); the JVP takes it, once,
    if its input tangent is that direction's."""

    __slots__ = ("mask", "_kept")

    def __init__(self, mask):
        self.mask = mask
        self._kept = None

    def share(self, dtype):
        """1 / the count of winners, per window: ``w * share`` is ``w / count`` exactly (w is 0
        or 1), with one division per window."""
        return np.reciprocal(self.mask.sum(axis=0, dtype=dtype))

    def keep_tangent(self, t_in, t_out):
        # kept only while t_in lives: at a site whose JVP never runs (the last one on its path)
        # it goes with the sweep, rather than being held through backward
        box = [t_out]
        try:
            self._kept = (weakref.ref(t_in, lambda _, box=box: box.clear()), box)
        except TypeError:  # not an ndarray: the JVP computes it
            self._kept = None

    def take_tangent(self, t_in):
        kept, self._kept = self._kept, None
        if kept is None or kept[0]() is not t_in or not kept[1]:
            return None
        return kept[1][0]


def _max_pool_select(ts_dirs, res):
    """Directional: among each window's tied maxima the largest tangent wins, direction by
    direction (lexicographic).

    Returns the :class:`_Winners` choice and a flag per window left tied (as hits() counts).
    Works on window-major stacks (one contiguous copy of the tangent per kernel offset): every
    later pass then runs over contiguous memory, several times faster than over strided views.
    A few images at a time, so that the copies stay small (the sweep's peak memory is here).

    The winners are the node's hits, narrowed in place (the cache is dropped: a later caller
    computes the hits again). Why not a copy: the choice, held until backward, then lives in
    memory allocated before the sweep, below its scratch, and the scratch goes back to the heap
    in one piece. A choice left on top of the heap had backward's gradients allocated in the
    holes under it, and glibc then trimmed and re-faulted ~15 MB at every LeNet step (+0.4x)."""
    xp, best, first, geo = res
    winners = _pool_hits(res)
    geo.hits = None
    count = np.empty(best.shape, xp.dtype)
    # one direction, the usual: its output tangent comes almost free here, for the JVP to take
    kept = np.empty(best.shape, xp.dtype) if len(ts_dirs) == 1 else None
    tps = [geo.pad(ts[0]) for ts in ts_dirs]
    step = max(1, _SELECT_BLOCK_BYTES // max(1, winners[:, :1].size * xp.dtype.itemsize))
    for a in range(0, best.shape[0], step):
        block = slice(a, a + step)
        w = winners[:, block]
        for tp in tps:
            t = _by_offset(tp[block], geo, w.shape)
            _narrow_to_top_tangents(w, t)
        w.sum(axis=0, dtype=xp.dtype, out=count[block])
        if kept is not None:
            kept[block] = _winners_tangent(t, w, np.reciprocal(count[block]))
    choice = _Winners(winners)
    if kept is not None:
        choice.keep_tangent(ts_dirs[0][0], kept)
    return choice, count > 1


#: bytes of window-major tangent copies the selection makes at a time
_SELECT_BLOCK_BYTES = 1 << 20


def _by_offset(tp, geo, shape):
    """The padded ``tp`` read through each kernel offset's window: a contiguous (K, ...) copy."""
    t = np.empty(shape, tp.dtype)
    for k, sl in geo.offsets():
        t[k] = tp[sl]
    return t


def _winners_tangent(terms, mask, share):
    """The output tangent from each offset's input tangent (``terms``, in offset order): the sum
    over the window's winners (``mask``), times ``share``. The selection and the JVP both use it,
    so a tangent the selection keeps is the one the JVP would compute, bit for bit."""
    out = np.zeros(share.shape, share.dtype)
    for t, w in zip(terms, mask):
        out += t * w
    out *= share
    return out


def _narrow_to_top_tangents(winners, t):
    """Narrow the (K, ...) ``winners`` in place to the offsets whose tangent (``t``, stacked
    alike) is the largest among the window's winners."""
    top = _where_or_minus_inf(winners[0], t[0])
    for w, tk in zip(winners[1:], t[1:]):
        np.maximum(top, _where_or_minus_inf(w, tk), out=top)
    winners &= t == top


def _where_or_minus_inf(mask, t):
    """``np.where(mask, t, -inf)`` bit for bit, by integer masks: np.where branches per element,
    several times slower on the irregular masks of tied windows."""
    ints = np.dtype(f"i{t.dtype.itemsize}")
    drop = mask.astype(ints)
    drop -= 1  # 0 where mask, -1 (every bit set) elsewhere
    out = t.view(ints) & ~drop
    out |= drop & np.array(-np.inf, t.dtype).view(ints)
    return out.view(t.dtype)


def _max_pool_mask(res):
    """Windows whose maximum is tied (computed once per node: the directional policy and the
    census both ask, and it depends on the forward's values only; callers only read it). The hits
    are counted as bytes (a bool array viewed as uint8 adds without a cast, ~5x faster than into
    int16), in uint16 for kernels of 256 offsets or more."""
    geo = res[3]
    if getattr(geo, "tied", None) is not None:
        return geo.tied
    hits = _pool_hits(res)
    if len(hits) == 1:
        geo.tied = np.zeros(hits.shape[1:], bool)
        return geo.tied
    counts = hits.view(np.uint8) if len(hits) < 256 else hits.astype(np.uint16)
    count = counts[0] + counts[1]
    for c in counts[2:]:
        count += c
    geo.tied = count > 1
    return geo.tied


def _max_pool_select_reads(res):
    """The selection compares the tangents of each tied window's maxima: those input elements."""
    xp, best, first, geo = res
    tied = _max_pool_mask(res)
    reads = np.zeros(xp.shape, bool)
    for (_, sl), h in zip(geo.offsets(), _pool_hits(res)):
        reads[sl] |= h & tied
    return geo.unpad(reads)


def _max_pool_demand(res, need):
    """Every element of the windows whose output tangent is needed."""
    xp, best, first, geo = res
    reads = np.zeros(xp.shape, bool)
    for _, sl in geo.offsets():
        reads[sl] |= need
    return geo.unpad(reads)


_max_pool2d = register("max_pool2d", _max_pool_fwd, _max_pool_vjp, _max_pool_jvp,
                       kink="max_pool2d", kink_mask=_max_pool_mask, select=_max_pool_select,
                       select_reads=_max_pool_select_reads, demand=_max_pool_demand)


def max_pool2d(x, kernel_size, stride=None, padding=0, ties=None) -> Tensor:
    """Max over each window (NCHW; stride defaults to the kernel size; padding never wins).

    Ties within a window share the gradient by ``ties``: ``"first"`` (row-major; PyTorch, JAX and
    TensorFlow), ``"last"``, ``"split"`` or ``"directional"``.
    """
    x = as_tensor(x)
    kernel = _pair(kernel_size, "kernel_size")
    geo = _Geometry(x.shape, kernel, kernel if stride is None else _pair(stride, "stride"),
                    _pair(padding, "padding"), "max_pool2d")
    if geo.ph * 2 > geo.kh or geo.pw * 2 > geo.kw:
        raise ValueError(f"max_pool2d: padding {padding} must be at most half the kernel {kernel}")
    if geo.size > np.iinfo(np.int16).max:
        raise ValueError(f"max_pool2d: kernel {kernel} too large")
    return apply(_max_pool2d, (x,), {"geo": geo}, choice=choose("max_pool2d", ties))

