"""Tensor: a NumPy array, an optional gradient, and the tape node that produced it.

Operators delegate to primitives (:mod:`kinkprop.primitives`). Comparisons return tensors that are
not differentiable. Gradients accumulate into ``.grad`` of leaf tensors, as in PyTorch.

Dtypes: ``kp.tensor`` keeps the dtype of a NumPy array it is given (as ``torch.tensor`` does) and
makes Python floats float32; integers and bools stay integer / bool and cannot require gradients.
A Python scalar in a binary operation takes the dtype of the tensor it meets.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import tape
from .precision import as_dtype, float32, is_float
from .storage import CARRIED, Stored, rounded_sum


class Tensor:
    __slots__ = ("_value", "_grad", "_requires_grad", "_node", "name", "__weakref__")
    __array_priority__ = 100  # ndarray <op> Tensor defers to Tensor's reflected operators

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        arr = _to_array(data, dtype)
        if requires_grad and not is_float(arr.dtype):
            raise TypeError(
                f"only floating-point tensors can require grad, got dtype {arr.dtype}; "
                "pass dtype='float32' (or another float format)"
            )
        self._value = Stored(arr)
        self._grad: Stored | None = None
        self._requires_grad = bool(requires_grad)
        self._node = None
        self.name = None

    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if value and not is_float(self.dtype):
            raise TypeError(f"only floating-point tensors can require grad, got dtype "
                            f"{self.dtype}; convert with .astype('float32') first")
        if not value and self._node is not None:
            raise RuntimeError("requires_grad can only be turned off on a leaf; use .detach()")
        self._requires_grad = bool(value)

    @classmethod
    def _wrap(cls, arr: np.ndarray) -> Tensor:
        return cls._of(Stored(arr))

    @classmethod
    def _carrying(cls, image: np.ndarray, dtype: np.dtype) -> Tensor:
        """A tensor of the carried format ``dtype`` (float16) whose values ``image`` holds as
        float32 (see :mod:`kinkprop.storage`)."""
        return cls._of(Stored.of_image(image, dtype))

    @classmethod
    def _of(cls, value: Stored) -> Tensor:
        t = cls.__new__(cls)
        t._value = value
        t._grad = None
        t._requires_grad = False
        t._node = None
        t.name = None
        return t

    # -- values ------------------------------------------------------------------------------
    @property
    def data(self) -> np.ndarray:
        """The values, as an array in the tensor's format (float16 ones are packed on demand:
        :mod:`kinkprop.storage`). Writes into it are the tensor's new values."""
        return self._value.array()

    @data.setter
    def data(self, arr) -> None:
        self._value = Stored(np.asarray(arr))

    @property
    def grad(self) -> np.ndarray | None:
        """The accumulated gradient, in the tensor's format, or None."""
        return None if self._grad is None else self._grad.array()

    @grad.setter
    def grad(self, g) -> None:
        self._grad = None if g is None else Stored(np.asarray(g))

    def _compute(self) -> np.ndarray:
        """The values in the compute format (float32 for 16- and 8-bit formats); read only. A
        float16 leaf that requires grad (a parameter: read every step) keeps its upcast."""
        return self._value.compute(keep=self._requires_grad and self._node is None)

    def _grad_compute(self) -> np.ndarray | None:
        return None if self._grad is None else self._grad.compute()

    def _assign(self, image: np.ndarray) -> None:
        """New values for a float16 tensor, as float32 values already rounded to float16."""
        self._value.assign(image)

    # -- array facts -------------------------------------------------------------------------
    shape = property(lambda self: self._value.shape)
    dtype = property(lambda self: self._value.dtype)
    ndim = property(lambda self: len(self._value.shape))
    size = property(lambda self: math.prod(self._value.shape))
    grad_fn = property(lambda self: self._node)
    is_leaf = property(lambda self: self._node is None)

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def item(self) -> float:
        return self.data.item()

    def numpy(self) -> np.ndarray:
        """The underlying array (shared, not copied)."""
        return self.data

    def detach(self) -> Tensor:
        """The same values (sharing the array: writes into either's ``.data`` show in both),
        outside the graph."""
        return Tensor._wrap(self.data)

    def __repr__(self):
        extra = ", requires_grad=True" if self.requires_grad else ""
        body = np.array2string(self.data.astype(np.float64) if self.dtype.kind == "V" or
                               self.dtype.name in {"bfloat16"} else self.data, separator=", ")
        return f"tensor({body}, dtype={self.dtype}{extra})"

    # -- gradients ---------------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` is required unless self is a scalar (it is the cotangent of self). The graph's
        saved arrays are released as the sweep proceeds; pass ``retain_graph=True`` to backward
        through the same graph again. A directional kink policy in force at forward time resolves
        its kinks here first (see :mod:`kinkprop.kinks.directional`).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad; create inputs "
                               "with requires_grad=True")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without grad needs a scalar, got shape "
                                   f"{self.shape}; pass grad= with the same shape")
            g = np.ones(self.shape, dtype=self.dtype)
        else:
            g = np.asarray(grad.data if isinstance(grad, Tensor) else grad)
            if g.shape != self.shape:
                raise ValueError(f"backward(): grad has shape {g.shape}, tensor has {self.shape}")
            g = g.astype(self.dtype, copy=False)
        from .kinks import directional

        directional.resolve_if_needed(self)
        tape.backward(self, g, retain_graph=retain_graph)

    def _accumulate(self, g: np.ndarray) -> None:
        """Add the cotangent ``g`` into ``.grad``: an array in the tensor's format, or, for a
        float16 tensor, an image (float32 values of float16, never written) from the sweep."""
        if g.shape != self.shape:  # a broadcast view reaching a leaf
            g = np.broadcast_to(g, self.shape)
        if self.dtype in CARRIED and g.dtype == float32 and (
                self._grad is None or self._grad.dtype == self.dtype):
            if self._grad is None:
                self._grad = Stored.of_image(g, self.dtype)
            else:
                self._grad.assign(rounded_sum(self._grad.compute(), g))
        elif self._grad is None:
            self.grad = np.array(g, dtype=self.dtype, copy=True)
        else:
            grad = self._grad.array()
            grad += g

    def zero_grad(self) -> None:
        self.grad = None

    # -- operators ---------------------------------------------------------------------------
    def __add__(self, o): return _ops.add(self, o)
    def __radd__(self, o): return _ops.add(o, self)
    def __sub__(self, o): return _ops.sub(self, o)
    def __rsub__(self, o): return _ops.sub(o, self)
    def __mul__(self, o): return _ops.mul(self, o)
    def __rmul__(self, o): return _ops.mul(o, self)
    def __truediv__(self, o): return _ops.div(self, o)
    def __rtruediv__(self, o): return _ops.div(o, self)
    def __pow__(self, o): return _ops.pow(self, o)
    def __rpow__(self, o): return _ops.pow(o, self)
    def __matmul__(self, o): return _ops.matmul(self, o)
    def __rmatmul__(self, o): return _ops.matmul(o, self)
    def __neg__(self): return _ops.neg(self)
    def __pos__(self): return self
    def __abs__(self): return _ops.abs(self)
    def __getitem__(self, index): return _ops.getitem(self, index)

    def _compare(self, o, op):
        other = o.data if isinstance(o, Tensor) else o
        return Tensor._wrap(op(self.data, other))

    def __lt__(self, o): return self._compare(o, np.less)
    def __le__(self, o): return self._compare(o, np.less_equal)
    def __gt__(self, o): return self._compare(o, np.greater)
    def __ge__(self, o): return self._compare(o, np.greater_equal)
    def __eq__(self, o): return self._compare(o, np.equal)  # noqa: D105 - elementwise, as torch
    def __ne__(self, o): return self._compare(o, np.not_equal)
    __hash__ = object.__hash__

    def __bool__(self):
        if self.data.size != 1:
            raise ValueError(f"truth value of a tensor of shape {self.shape} is ambiguous")
        return bool(self.data)

    # -- methods mirroring the functions -----------------------------------------------------
    @property
    def T(self): return _ops.transpose(self)
    def sum(self, axis=None, keepdims=False): return _ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return _ops.mean(self, axis, keepdims)
    def var(self, axis=None, keepdims=False, ddof=0): return _ops.var(self, axis, keepdims, ddof)
    def max(self, axis=None, keepdims=False, ties=None):
        return _ops.max(self, axis, keepdims, ties)
    def min(self, axis=None, keepdims=False, ties=None):
        return _ops.min(self, axis, keepdims, ties)
    def reshape(self, *shape): return _ops.reshape(self, *shape)
    def transpose(self, *axes): return _ops.transpose(self, *axes)
    permute = transpose
    def flatten(self, start_dim=0): return _ops.flatten(self, start_dim)
    def relu(self, at_kink=None): return _ops.relu(self, at_kink)
    def exp(self): return _ops.exp(self)
    def log(self): return _ops.log(self)
    def tanh(self): return _ops.tanh(self)
    def sigmoid(self): return _ops.sigmoid(self)
    def sqrt(self): return _ops.sqrt(self)
    def abs(self, at_kink=None): return _ops.abs(self, at_kink)
    def clamp(self, min=None, max=None, at_kink=None): return _ops.clamp(self, min, max, at_kink)  # noqa: A002

    def astype(self, dtype) -> Tensor:
        """A non-differentiable copy in another format (use ``kp.cast`` to differentiate)."""
        return Tensor._wrap(self.data.astype(as_dtype(dtype)))


def _to_array(data, dtype) -> np.ndarray:
    if isinstance(data, Tensor):
        data = data.data
    if dtype is not None:
        return np.asarray(data).astype(as_dtype(dtype), copy=False)
    if isinstance(data, np.ndarray):
        return data
    if isinstance(data, np.generic):  # a NumPy scalar keeps its dtype, as an array would
        return np.asarray(data)
    arr = np.asarray(data)
    if arr.dtype == np.float64:  # Python floats: float32, the default for float data
        arr = arr.astype(np.float32)
    return arr


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """A new leaf tensor. NumPy arrays keep their dtype; Python floats become float32."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """``x`` itself if it is a Tensor; else a constant tensor (scalars take ``like``'s dtype)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, numbers.Number) and like is not None and is_float(like.dtype):
        return Tensor._wrap(np.asarray(x, dtype=like.dtype))
    if isinstance(x, np.ndarray):
        return Tensor._wrap(x)
    return Tensor._wrap(_to_array(x, None))


def check_broadcast(op: str, *tensors: Tensor) -> None:
    """Raise a ValueError naming ``op`` and every shape when the operands do not broadcast."""
    try:
        np.broadcast_shapes(*(t.shape for t in tensors))
    except ValueError:
        shapes = " and ".join(str(t.shape) for t in tensors)
        raise ValueError(f"{op}: shapes {shapes} do not broadcast") from None


def lift_pair(a, b, op: str | None = None) -> tuple[Tensor, Tensor]:
    """Two operands as tensors, a Python scalar adopting the other operand's dtype. With ``op``,
    shapes that do not broadcast raise an error naming it (NumPy's own names no operation)."""
    if isinstance(a, Tensor):
        b = as_tensor(b, like=a)
    else:
        b = as_tensor(b)
        a = as_tensor(a, like=b)
    if op is not None and a.shape != b.shape:
        check_broadcast(op, a, b)
    return a, b


from . import primitives as _ops  # noqa: E402  (primitives import Tensor from this module)
