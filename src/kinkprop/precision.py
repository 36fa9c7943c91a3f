"""Storage formats and the rounding contract.

kinkprop distinguishes the *storage* format of an array (what ``Tensor.data`` holds and what flows
between primitives, forward and backward) from the *compute* format (what arithmetic inside a
primitive uses):

* ``float64`` and ``float32`` compute in themselves.
* ``float16``, ``bfloat16``, ``float8_e4m3fn`` and ``float8_e5m2`` compute in ``float32``: every
  primitive upcasts its inputs to float32, computes (matmul and conv2d accumulate in float32, as GPU
  tensor cores do), and rounds its result to the storage format with round-to-nearest-even.
  Cotangents follow the same rule: each VJP computes in float32 and rounds the cotangent it returns
  to the storage format of the input it belongs to.

NumPy's own float16 matmul has no BLAS kernel (about 0.8 GFLOP/s), so it is never called.
"""

from __future__ import annotations

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
    return a.astype(float32) if a.dtype in LOW_PRECISION else a


def to_storage(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round ``a`` to the storage format ``dtype`` (round to nearest even); no copy if it already is."""
    a = np.asarray(a)
    return a if a.dtype == dtype else a.astype(dtype)


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
