"""Where a tensor's values live: its array in the storage format and, for float16, an exact
float32 image of it.

float16 arithmetic runs in float32 (:mod:`kinkprop.precision`), and NumPy has no fast float16
cast: packing every primitive's result into float16 and unpacking it for the next primitive cost
more than half a float32 step on an MLP. So a float16 value that the engine computes (a
primitive's output, a cotangent reaching a leaf's ``.grad``, an optimizer's update) is kept as a
float32 *image*: the same numbers, each already rounded to float16 (exactly as the cast rounds),
and packed into its float16 array only when that array is asked for.

The float16 array stays the truth wherever code outside the engine can reach it:

* Handing the array out (``Tensor.data``, ``.grad``, ``.numpy()``) packs it and drops the image:
  whoever holds the array may write into it.
* An image is made from the array (for parameters, read every step), or a new value kept as an
  image only, while nothing but this record holds the array (CPython's reference count; a view
  holds its base array too, so a transposed weight keeps its weight's updates in place).
  Otherwise a new value is packed into the array in place, as it always was, so that arrays held
  elsewhere see every optimizer step.
* Images are never written once made (they are read-only): residuals saved for a backward pass
  stay valid when the value changes.

What the reference count cannot see: a weak reference to the array, or a raw pointer to its
memory kept without a reference (``ctypes``, ``__array_interface__``). Through those, values
may be stale and writes lost while the tensor holds an image; read ``.data`` again instead (it
packs and drops the image).

Other formats keep the array as the only copy (bfloat16's casts are compiled, in ml_dtypes).
"""

from __future__ import annotations

import sys

import numpy as np

from .precision import ROUND_TRIP_EXACT, float16, float_to_half, half_to_float, round_to_half, to_compute

#: storage formats whose values a tensor may keep as a float32 image: only formats whose round
#: trip through float32 keeps every bit pattern (NaN payloads too), so that an image loses nothing
CARRIED = frozenset({float16}) & ROUND_TRIP_EXACT

_getrefcount = getattr(sys, "getrefcount", None)


class Stored:
    """A value in a storage format: ``array()`` for code outside the engine, ``compute()`` for
    primitives and optimizers, ``assign()`` for an update computed in float32."""

    __slots__ = ("_array", "_image", "_packed", "dtype")

    def __init__(self, array: np.ndarray):
        self._array = array
        self._image = None  # None, or the current value as a read-only float32 array
        self._packed = True  # whether _array holds the current value
        self.dtype = array.dtype

    @classmethod
    def of_image(cls, image: np.ndarray, dtype: np.dtype) -> Stored:
        """A value of the carried format ``dtype`` given as float32 values of that format."""
        s = cls.__new__(cls)
        s._array, s._packed, s.dtype = None, False, dtype
        s._image = _frozen(image)
        return s

    @property
    def shape(self) -> tuple:
        return (self._array if self._image is None else self._image).shape

    def array(self) -> np.ndarray:
        """The array in the storage format, packed if it is behind; from now on it is the truth
        (the caller may write into it), so the image is dropped."""
        image = self._image
        if image is not None:
            if not self._packed:
                if self._array is None:
                    self._array = float_to_half(image)
                else:
                    float_to_half(image, self._array)
                self._packed = True
            self._image = None
        return self._array

    def compute(self, keep: bool = True) -> np.ndarray:
        """The value in the compute format (float32 for low precision). Do not write into it.
        ``keep``: keep a float16 array's upcast as the image (while nothing else holds the
        array), for values read again and again (parameters), at twice the memory."""
        image = self._image
        if image is not None:
            return image
        if self.dtype not in CARRIED:
            return to_compute(self._array)
        image = _frozen(half_to_float(self._array))
        if keep and self._sole_owner():  # nothing else can write the array: the image stays right
            self._image = image
        return image

    def assign(self, image: np.ndarray) -> None:
        """Set the value to ``image``: float32 values of this (carried) format, in an array that
        nothing else will write."""
        if self._sole_owner():
            self._image, self._packed = _frozen(image), False
        else:  # the array is held elsewhere: update it in place, and it stays the truth
            float_to_half(image, self._array)
            self._image, self._packed = None, True

    def _sole_owner(self) -> bool:
        """Whether this record holds the only reference to an array that owns its memory."""
        return self._array is None or (
            _getrefcount is not None and self._array.base is None and self._refs() <= _SOLE_REFS)

    def _refs(self) -> int:
        a = self._array
        return _getrefcount(a)


def rounded(a: np.ndarray) -> np.ndarray:
    """float16's values of ``a``, a float32 result that the engine has just computed (a
    primitive's output, a cotangent, a sum), as float32: rounded in ``a``'s own memory when
    only the caller's one name holds it (fewer bytes through the caches), else into a new array.
    Call it with a local variable that the caller drops or rebinds to the result."""
    if (_getrefcount is not None and type(a) is np.ndarray and a.base is None
            and a.flags.writeable and _getrefcount(a) <= _FRESH_REFS):
        return round_to_half(a, a)
    return round_to_half(a)


def rounded_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` for two float32 images of float16 values (cotangents, gradients), as float16's
    ``a += b`` rounds: the float32 sum rounded to float16, in the sum's own memory. float32 has
    24 >= 2 * 11 + 2 significand bits, so rounding twice gives float16's correctly rounded sum."""
    total = a + b
    return rounded(total)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _untraced(count):
    """``count()`` with no trace or profile function: one that reads a frame's locals (a debugger
    stepping through the import) holds references the thresholds must not include, or arrays
    that something else holds would pass for sole-owned once it stops."""
    trace, profile = sys.gettrace(), sys.getprofile()
    sys.settrace(None)
    sys.setprofile(None)
    try:
        return count()
    finally:
        sys.setprofile(profile)
        sys.settrace(trace)


def _sole_refs() -> int:
    """What :meth:`Stored._refs` counts for an array that only its record holds (the record's
    slot, the method's local name, the call's argument: 3 on CPython 3.11 to 3.13)."""
    probe = Stored(np.empty(1, float16))
    return probe._refs() if _getrefcount is not None else 0


_SOLE_REFS = _untraced(_sole_refs)


def _refs_of_argument(a) -> int:
    return _getrefcount(a)


def _fresh_refs() -> int:
    """What :func:`rounded` counts for an array that only its caller's one local name holds
    (that name, the argument, the call's argument: 3 on CPython 3.11 to 3.13)."""
    if _getrefcount is None:
        return 0
    a = np.empty(1, np.float32)
    return _refs_of_argument(a)


_FRESH_REFS = _untraced(_fresh_refs)
