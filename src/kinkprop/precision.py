"""Storage formats and the rounding contract.

kinkprop distinguishes the *storage* format of an array (what ``Tensor.data`` holds and what flows
between primitives, forward and backward) from the *compute* format (what arithmetic inside a
primitive uses):

* ``float64`` and ``float32`` compute in themselves.
* ``float16``, ``bfloat16``, ``float8_e4m3fn`` and ``float8_e5m2`` compute in ``float32``: every
  primitive upcasts its inputs to float32, computes (matmul and conv2d accumulate in float32, as GPU
  tensor cores do), and rounds its result to the storage format with round-to-nearest-even.
  Cotangents follow the same rule: each VJP computes in float32 and rounds the cotangent it returns
  to the storage format of the input it belongs to. (A primitive that only moves elements, such
  as reshape, has nothing to round.)

Between primitives, a float16 value that the engine computed travels as float32 numbers already
rounded to float16 (:func:`round_to_half`), packed into float16 only when ``Tensor.data`` or
``.grad`` is read: see :mod:`kinkprop.storage`.

NumPy's own float16 matmul has no BLAS kernel (about 0.8 GFLOP/s), so it is never called.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np

float64 = np.dtype(np.float64)
float32 = np.dtype(np.float32)
float16 = np.dtype(np.float16)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float8_e4m3 = np.dtype(ml_dtypes.float8_e4m3fn)
float8_e5m2 = np.dtype(ml_dtypes.float8_e5m2)

#: Short names accepted wherever a precision is named (CLI, configs, ``kp.tensor(dtype=...)``).
PRECISIONS: dict[str, np.dtype] = {
    "fp64": float64,
    "fp32": float32,
    "fp16": float16,
    "bf16": bfloat16,
    "fp8-e4m3": float8_e4m3,
    "fp8-e5m2": float8_e5m2,
}
_ALIASES = {
    "float64": float64, "double": float64, "float32": float32, "float": float32,
    "float16": float16, "half": float16, "bfloat16": bfloat16,
    "float8_e4m3fn": float8_e4m3, "float8_e4m3": float8_e4m3, "float8_e5m2": float8_e5m2,
}

#: Formats stored below float32: their arithmetic runs in float32.
LOW_PRECISION = frozenset({float16, bfloat16, float8_e4m3, float8_e5m2})
#: Formats whose round trip through float32 returns every bit pattern unchanged (NaN payloads
#: included), so primitives that only move elements may skip it; bfloat16's quiets signaling NaNs.
ROUND_TRIP_EXACT = frozenset({float16})
FLOAT_DTYPES = frozenset({float64, float32}) | LOW_PRECISION


def as_dtype(spec) -> np.dtype:
    """Turn a precision name (``"fp16"``, ``"bfloat16"``) or dtype-like into a NumPy dtype."""
    if isinstance(spec, str):
        key = spec.lower()
        if key in PRECISIONS:
            return PRECISIONS[key]
        if key in _ALIASES:
            return _ALIASES[key]
        raise ValueError(
            f"unknown precision {spec!r}; valid: {', '.join(PRECISIONS)} "
            f"(or {', '.join(sorted(_ALIASES))})"
        )
    return np.dtype(spec)


def is_float(dtype: np.dtype) -> bool:
    return np.dtype(dtype) in FLOAT_DTYPES


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The format a primitive computes in for arrays stored as ``dtype``."""
    return float32 if dtype in LOW_PRECISION else dtype


def to_compute(a: np.ndarray) -> np.ndarray:
    """Upcast a low-precision array to float32 (exact); other arrays pass through untouched."""
    if a.dtype == float16:
        return half_to_float(a)
    return a.astype(float32) if a.dtype in LOW_PRECISION else a


def to_storage(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round ``a`` to the storage format ``dtype`` (round to nearest even); no copy if it already is."""
    a = np.asarray(a)
    if a.dtype == dtype:
        return a
    if dtype == float16 and a.dtype == float32:
        return float_to_half(a)
    return a.astype(dtype)


# -- float16 casts ---------------------------------------------------------------------------------
#
# NumPy's float16 casts are scalar loops: about 1.6 ns an element up and 2.7 ns down, and 60 ns for
# results that are float16 subnormals (weight gradients often are), where the cast raises the
# underflow flag element by element. The two casts below return, bit for bit, what ``astype``
# returns (tests/test_precision.py checks every float16 pattern, and every float32 one when asked),
# in a few vectorised passes of int32 and float32 arithmetic: about 0.5 ns an element up and 1.1 ns
# down, whatever the values. Results keep the input's memory layout (C or Fortran order), as
# ``astype`` does.

_TWO_112 = np.float32(2.0 ** 112)
_TWO_M112 = np.float32(2.0 ** -112)
#: sign, exponent and fraction bits of a float16 shifted left by 13 (the sign extension dropped)
_HALF_BITS = np.int32(-0x70002000)  # 0x8FFFE000
_EXP_MASK = np.int32(0x7F800000)
#: elements per chunk of the float32 -> float16 cast; sizes below which the casts call NumPy's
#: (whose float16 loops take up to 8 ns an element up and 65 ns down, for subnormals)
_CHUNK, _SMALL_UP, _SMALL_DOWN = 1 << 17, 1024, 256
#: below this size round_to_half takes astype's two casts: its own passes cost ~12 us whatever
#: the size, astype's ~10 ns an element, or ~80 for float16 subnormal results (gradients and
#: biases near zero often give them: 512 such elements take 41 us by astype, 17 its own way)
_SMALL_GRID = 256
#: float32 exponent field of 2**-14, float16's smallest normal: below it float16 spacing is 2**-24
#: (a block, not a scalar: NumPy's maximum against a scalar is not vectorised)
_MIN_EXP = np.full(_CHUNK, 113 << 23, np.int32)
_MIN_EXP.flags.writeable = False
#: 2**e -> 1.5 * 2**(e + 13), whose spacing (ulp) is float16's spacing at 2**e
_TO_RIGHT_SHIFTER = np.int32(0x06C00000)
#: exponent field of 2**15: from there up (overflow, inf, NaN) elements take ``astype``
_LARGE_EXP = 142 << 23
#: exponent field of 2**-25: an element at or below it may round to zero, whose sign is x's
_TINY_EXP = 102 << 23
_SIGN_BIT, _U3, _U16 = np.uint32(0x80000000), np.uint32(3), np.uint32(16)
_SIGN_BIT32 = np.int32(-0x80000000)


def half_to_float(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 -> float32, exactly as ``h.astype(np.float32)`` (into ``out`` when given)."""
    # a few ufunc calls cost more than NumPy's loop on a few elements
    return _cast(h, out, float16, float32, lambda h: h.size < _SMALL_UP, np.copyto,
                 _half_to_float)


def _cast(x, out, x_dtype, out_dtype, numpy_first, by_numpy, by_passes) -> np.ndarray:
    """What the casts share: ``out`` made like ``x`` (its C or Fortran order, as ``astype``
    keeps), the dtypes checked, a strided ``x`` through a contiguous copy; then
    ``by_numpy(out, x)`` where ``numpy_first(x)`` says NumPy's own loop is the one to take, else
    ``by_passes`` on flat views of the two."""
    x = np.asarray(x)
    if out is None:
        out = np.empty_like(x, dtype=out_dtype)
    _check_dtypes(x, x_dtype, out, out_dtype)
    pair = _flat_pair(x, out)
    if pair is None:  # strided: convert a contiguous copy
        np.copyto(out, _cast(np.ascontiguousarray(x), None, x_dtype, out_dtype, numpy_first,
                             by_numpy, by_passes))
    elif numpy_first(x):
        by_numpy(out, x)
    else:
        by_passes(*pair)
    return out


def _by_chunks(chunk, x: np.ndarray, out: np.ndarray, *work: np.ndarray) -> None:
    """``chunk(x, out, *work)`` on 1-D ``x`` and ``out`` a chunk at a time, with the per-thread
    work arrays cut to size: chunks stay in cache, and fresh temporaries this large would cost
    page faults."""
    for i in range(0, x.size, _CHUNK):
        j = min(i + _CHUNK, x.size)
        chunk(x[i:j], out[i:j], *(w[:j - i] for w in work))


def _half_to_float(h: np.ndarray, out: np.ndarray) -> None:
    # The float16 bits shifted left by 13 are a float32 2**-112 times the value (float16
    # subnormals become float32 subnormals): one exact multiplication rebiases the exponent.
    w = out.view(np.int32)
    np.copyto(w, h.view(np.int16))  # sign-extended: the sign lands in bit 31 after the shift
    np.left_shift(w, 13, out=w)
    np.bitwise_and(w, _HALF_BITS, out=w)
    np.multiply(out, _TWO_112, out=out)
    # inf and NaN (exponent bits all ones) are the largest patterns: negative ones as uint16,
    # positive ones as int16; they land at 65536 and up, where they get float32's all-ones exponent
    # (the NaN payload is kept)
    if h.view(np.uint16).max() >= 0xFC00 or h.view(np.int16).max() >= 0x7C00:
        w[np.abs(out) >= 65536] |= _EXP_MASK


def float_to_half(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> float16 rounded to nearest even, exactly as ``x.astype(np.float16)``: the same
    bits, and the same overflow warnings or errors (``np.errstate``), into ``out`` when given."""
    return _cast(x, out, float32, float16, _astype_first, _astype_into, _float_to_half)


def _astype_first(x: np.ndarray) -> bool:
    """astype reports float16 subnormals as underflow; on a few elements its loop is quicker."""
    return x.size < _SMALL_DOWN or np.geterr()["under"] != "ignore"


def _astype_into(out: np.ndarray, x: np.ndarray) -> None:
    np.copyto(out, x, casting="same_kind")


def _float_to_half(x: np.ndarray, out: np.ndarray) -> None:
    _by_chunks(_round_chunk, x, out.view(np.uint16), *_work_arrays())


def _round_chunk(x: np.ndarray, out: np.ndarray, e: np.ndarray, y: np.ndarray,
                 s: np.ndarray) -> None:
    """Round the float32 chunk ``x`` into the float16 bits ``out``; ``e``, ``y``, ``s`` are work."""
    large = _grid_chunk(x, y, e, s)  # y: x rounded to float16's values, with x's sign
    if large is not None:  # float16 values already (inf, NaN, or finite from 2**15 up)
        kept = y[large].astype(float16).view(np.uint16)
    y *= _TWO_M112  # exact, and its bits 13..27 are those of the float16 magnitude
    # t = sign << 31 | (y's bits << 3), whose top half is the float16 (bits 28..30 of y are zero)
    t, yu = e.view(np.uint32), y.view(np.uint32)
    np.bitwise_and(yu, _SIGN_BIT, out=t)
    np.left_shift(yu, _U3, out=yu)
    t |= yu
    np.right_shift(t, _U16, out=out, casting="unsafe")
    if large is not None:
        out[large] = kept


def round_to_half(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> float32 rounded to float16's values: bit for bit
    ``x.astype(np.float16).astype(np.float32)`` (the same warnings too), without packing. The
    result is a fresh array, or ``out``: ``x`` itself to round in place (fewer bytes through
    the caches than a second array), or an array that does not overlap ``x``.

    A float16 tensor that kinkprop computes keeps its values this way (:mod:`kinkprop.storage`):
    about 7 passes an element against ~15 for the cast down and back up."""
    if out is not None and out is not x and np.may_share_memory(x, out):
        raise ValueError("round_to_half: out overlaps the input; pass x itself (in place), "
                         "a separate array, or none")
    if (type(x) is np.ndarray and x.dtype == float32 and x.flags.c_contiguous
            and (out is None or out is x) and _SMALL_GRID <= x.size <= _CHUNK
            and np.geterr()["under"] == "ignore"):  # one chunk, the usual case: straight there
        y = x if out is x else np.empty_like(x)
        e, _, s = _work_arrays()
        _grid_chunk(x.reshape(-1), y.reshape(-1), e[:x.size], s[:x.size])
        return y
    return _cast(x, out, float32, float32,
                 lambda x: x.size < _SMALL_GRID or np.geterr()["under"] != "ignore",
                 lambda out, x: np.copyto(out, x.astype(float16)),
                 lambda x, y: _by_chunks(_grid_chunk, x, y, *_work_arrays()[::2]))


def _grid_chunk(x: np.ndarray, y: np.ndarray, e: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """Round the float32 chunk ``x`` to float16's values into ``y``, which may be ``x`` itself;
    ``e`` and ``s`` are work. Returns the mask of the elements that overflow or are inf or NaN
    (done by ``astype``), or None."""
    np.bitwise_and(x.view(np.int32), _EXP_MASK, out=e)
    large = None
    if e.max() >= _LARGE_EXP:  # rare: overflow, inf or NaN: astype below, zeros meanwhile
        large = e >= _LARGE_EXP
        kept = x[large].astype(float16)
        x = np.where(large, np.float32(0), x)  # a copy: y may be the input
        np.bitwise_and(x.view(np.int32), _EXP_MASK, out=e)
    # x + c - c below is +0 where x rounds to zero: there, and harmlessly elsewhere, put x's
    # sign back (-0 stays -0), kept before y (maybe x) is written
    signs = e.min() <= _TINY_EXP
    if signs:
        np.bitwise_and(x.view(np.int32), _SIGN_BIT32, out=s)
    np.maximum(e, _MIN_EXP[:e.size], out=e)
    e += _TO_RIGHT_SHIFTER
    c = e.view(np.float32)
    # adding c = 1.5 * 2**(exponent + 13) rounds x to float16's spacing, to nearest even (the
    # float32 addition does it), and subtracting it again leaves the rounded x, exactly
    np.add(x, c, out=y)
    y -= c
    if signs:
        yi = y.view(np.int32)
        yi |= s
    if large is not None:
        y[large] = kept
    return large


_work = threading.local()


def _work_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's three work arrays (one chunk each: int32, float32, int32) for the chunked
    casts."""
    if getattr(_work, "e", None) is None:
        _work.e, _work.y = np.empty(_CHUNK, np.int32), np.empty(_CHUNK, np.float32)
        _work.s = np.empty(_CHUNK, np.int32)
    return _work.e, _work.y, _work.s


def _check_dtypes(a: np.ndarray, a_dtype: np.dtype, out: np.ndarray, out_dtype: np.dtype) -> None:
    if a.dtype != a_dtype or out.dtype != out_dtype:
        raise TypeError(f"expected {a_dtype} into {out_dtype}, got {a.dtype} into {out.dtype}")


def _flat_pair(a: np.ndarray, out: np.ndarray):
    """1-D views of ``a`` and ``out`` listing their elements in the same order, or None."""
    if a.shape != out.shape:
        raise ValueError(f"out has shape {out.shape}, expected {a.shape}")
    if a.flags.c_contiguous and out.flags.c_contiguous:
        return a.reshape(-1), out.reshape(-1)
    if a.flags.f_contiguous and out.flags.f_contiguous:
        return a.T.reshape(-1), out.T.reshape(-1)
    return None


def result_dtype(*dtypes: np.dtype) -> np.dtype:
    """Promotion for float storage formats: the widest format wins; mixed 16-bit formats give float32."""
    floats = [d for d in dtypes if d in FLOAT_DTYPES]
    if not floats:
        return np.result_type(*dtypes)
    if float64 in floats:
        return float64
    if float32 in floats:
        return float32
    unique = set(floats)
    return floats[0] if len(unique) == 1 else float32


def unit_roundoff(dtype: np.dtype) -> float:
    """u = 2**-p for a format with p significand bits (including the implicit bit)."""
    dtype = np.dtype(dtype)
    return float(ml_dtypes.finfo(dtype).eps) / 2 if dtype in LOW_PRECISION else float(
        np.finfo(dtype).eps) / 2


# -- float8 with per-tensor scaling ---------------------------------------------------------------
#
# float8 formats hold too few exponents for raw activations and gradients (e4m3: normal range
# 2**-6 .. 448). kinkprop emulates them as training recipes do, with a per-tensor scale: inside
# ``emulate_float8(fmt)``, every primitive's output and every cotangent (arrays stay float32) is
# multiplied by a power of two s chosen so that its largest magnitude lands just below the format's
# maximum, rounded to the float8 grid (nearest even, saturating), and divided by s again. Parameters
# (master weights) and optimizer state stay float32; matmul and conv2d accumulate in float32.

FLOAT8 = frozenset({float8_e4m3, float8_e5m2})


class _Emulation:
    round = None  # callable(array) -> array on the scaled float8 grid, or None


def scaled_round(a: np.ndarray, fmt: np.dtype) -> np.ndarray:
    """Round ``a`` to the float8 format ``fmt`` with a per-tensor power-of-two scale."""
    a = np.asarray(a)
    if a.dtype.kind != "f" or a.size == 0:
        return a
    amax = float(np.max(np.abs(a)))
    if amax == 0.0 or not np.isfinite(amax):
        return a
    fmax = float(ml_dtypes.finfo(fmt).max)
    scale = 2.0 ** np.floor(np.log2(fmax / amax))
    return ((a * scale).astype(fmt).astype(a.dtype) / scale).astype(a.dtype)


class emulate_float8:
    """Scope in which primitive outputs and cotangents are rounded to a scaled float8 grid."""

    def __init__(self, fmt):
        self.fmt = as_dtype(fmt)
        if self.fmt not in FLOAT8:
            raise ValueError(f"emulate_float8 takes fp8-e4m3 or fp8-e5m2, got {fmt!r}")

    def __enter__(self):
        self._prev = _Emulation.round
        fmt = self.fmt
        _Emulation.round = lambda a: scaled_round(a, fmt)
        return self

    def __exit__(self, *exc):
        _Emulation.round = self._prev


def training_format(name: str):
    """(parameter dtype, scope) for a precision name: float8 trains float32 parameters inside
    :class:`emulate_float8`; other formats store everything in themselves."""
    import contextlib

    dtype = as_dtype(name)
    if dtype in FLOAT8:
        return float32, emulate_float8(dtype)
    return dtype, contextlib.nullcontext()
