"""The primitive record and the one function that applies a primitive to tensors.

A :class:`Primitive` is one record: its forward, its VJP and its JVP side by side, and for
non-smooth primitives the name of its kink spec and its directional piece selector.

Rule signatures (``res`` is whatever the forward chose to save, computed once):

``forward(*arrays, **params) -> (ans, res)``
``vjp(g, res, needs, choice) -> tuple`` one cotangent per input (``None`` where ``needs`` is False)
``jvp(ts, res, choice) -> t`` tangent of the output; entries of ``ts`` may be ``None`` (zero)
``kink_mask(res) -> mask`` (non-smooth only) the output elements whose value sits exactly on a kink:
    an input at a kink (elementwise), tied inputs (maximum), a tied group or window (reductions,
    max-pool; reductions give the keepdims shape). ``hits(res)`` counts them (through ``count(res)``
    where a record counts more cheaply, e.g. in its forward pass).
``select(ts_dirs, res) -> (choice, unresolved)`` (non-smooth only) the directional policy: the choice
    that picks the pieces active along the directions, compared lexicographically (``ts_dirs`` holds
    one list of input tangents per direction), and a mask of kink elements still tied after all.

Optional rules that let the directional sweep compute only the tangent elements its selections
read (see :func:`kinkprop.tape.tangent_needs`); ``need`` is a boolean mask over the output:

``select_reads(res) -> mask`` the elements of input 0 whose tangent ``select`` reads
``demand(res, need) -> mask`` the elements of input 0 whose tangent the JVP reads to get the output
    tangent right where ``need`` is set (elements whose local derivative is 0 may be left out)
``jvp_at(ts, res, choice, need) -> t`` the output tangent, right where ``need`` is set (zeros
    elsewhere), in work proportional to the set elements

Arrays reaching the rules are in compute precision (see :mod:`kinkprop.precision`), except in the
forward of a primitive that only moves elements (``moves``), which sees float16 arrays as they are.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import tape
from ..kinks.policy import current_policy
from ..kinks.spec import SPECS, KinkSpec
from ..precision import ROUND_TRIP_EXACT, _Emulation, float32, result_dtype, round_to_half, to_storage
from ..storage import CARRIED, rounded


@dataclass(frozen=True, eq=False)
class Primitive:
    name: str
    forward: Callable[..., tuple[np.ndarray, Any]]
    vjp: Callable[..., tuple]
    jvp: Callable[..., np.ndarray]
    kink: KinkSpec | None = None
    kink_mask: Callable | None = None
    select: Callable | None = None
    count: Callable | None = None
    #: the forward only moves or copies elements (reshape, transpose, indexing, ...): applied to
    #: float16 arrays as they are, it gives the round trip's bits, and views stay views of the
    #: inputs' arrays (see ``apply``)
    moves: bool = False
    select_reads: Callable | None = None
    demand: Callable | None = None
    jvp_at: Callable | None = None
    #: every output element of the forward is an input element, its negative or a constant
    #: every format holds (relu, abs, relu6), in a new array: float16 values in give float16
    #: values out, so ``apply`` has nothing to round
    exact_forward: bool = False
    #: ``exact_vjp(res, choice)``: whether this call's VJP only moves, negates or zeroes elements
    #: of the incoming cotangent (relu off its kink): float16 values stay float16 values, so
    #: ``tape.backward`` has nothing to round
    exact_vjp: Callable | None = None

    def hits(self, res) -> int:
        """How many output elements sit exactly on a kink (see ``kink_mask``)."""
        if self.count is not None:
            return self.count(res)
        return int(np.count_nonzero(self.kink_mask(res)))

    def __repr__(self):
        return f"<primitive {self.name}>"


#: Every primitive, by name.
PRIMITIVES: dict[str, Primitive] = {}


def register(name, forward, vjp, jvp, kink: str | None = None, kink_mask=None, select=None,
             count=None, moves: bool = False, select_reads=None, demand=None,
             jvp_at=None, exact_forward: bool = False, exact_vjp=None) -> Primitive:
    prim = Primitive(name, forward, vjp, jvp, SPECS[kink] if kink else None, kink_mask, select,
                     count, moves, select_reads, demand, jvp_at, exact_forward, exact_vjp)
    PRIMITIVES[name] = prim
    return prim


# -- sites: where a non-smooth primitive sits (module path inside kp.nn) -----------------------

_site: contextvars.ContextVar[str | None] = contextvars.ContextVar("kinkprop_site", default=None)


@contextlib.contextmanager
def site(name: str | None):
    """Name the non-smooth primitives applied in this scope (``kp.nn`` uses module paths)."""
    token = _site.set(name)
    try:
        yield
    finally:
        _site.reset(token)


def current_site() -> str | None:
    return _site.get()


# -- choosing the kink value -------------------------------------------------------------------


def choose(kink: str, explicit=None, slope: float | None = None):
    """The choice for primitive ``kink``: the per-call value if given, else the policy in force."""
    spec = SPECS[kink]
    value = current_policy()[kink] if explicit is None else spec.validate(explicit)
    return spec.resolve(value, slope)


# -- applying ----------------------------------------------------------------------------------


def apply(prim: Primitive, tensors: tuple, params: dict | None = None, choice=None):
    """Run ``prim`` forward on ``tensors`` and record a node when gradients are needed."""
    from ..tensor import Tensor

    dtype = result_dtype(*(t.dtype for t in tensors))
    same = _Emulation.round is None and all(t.dtype == dtype for t in tensors)
    if prim.moves and same and dtype in ROUND_TRIP_EXACT:
        # float16 arrays as they are: the same bits as the round trip, and views of them stay
        # views (a transposed weight sees the optimizer's steps, as in float32)
        ans, res = prim.forward(*(t.data for t in tensors), **(params or {}))
        out = Tensor._wrap(np.asarray(ans))  # (x[1] of a vector: a 0-d array, not a scalar)
    else:
        ans, res = prim.forward(*(t._compute() for t in tensors), **(params or {}))
        if _Emulation.round is not None:
            ans = _Emulation.round(ans)
        if dtype in CARRIED and ans.dtype == float32:
            # float16 values stay float32 images (kinkprop.storage)
            if prim.exact_forward and same:
                image = np.asarray(ans)
            elif prim.kink is not None and tape.Hooks.on_kink:
                image = round_to_half(ans)  # the hooks below see ans as the primitive left it
            else:
                image = rounded(ans)  # in place when the primitive kept no reference to it
            out = Tensor._carrying(image, dtype)
        else:
            out = Tensor._wrap(to_storage(ans, dtype))
    node = None
    if tape.is_grad_enabled() and any(t.requires_grad for t in tensors):
        parents = tuple(t if t.requires_grad else None for t in tensors)
        node = tape.Node(prim, parents, res, choice, _site.get() if prim.kink else None)
        out._node = node
        out._requires_grad = True
    if prim.kink is not None and tape.Hooks.on_kink:
        for hook in tape.Hooks.on_kink:
            hook(prim, _site.get(), res, ans, node)
    if tape.Hooks.on_apply:
        for hook in tape.Hooks.on_apply:
            hook(prim, tensors, out, res)
    return out


# -- helpers shared by the rules ---------------------------------------------------------------


def unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum ``g`` over the axes along which an input of ``shape`` was broadcast."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g


def lex_first_nonzero(ts_dirs, key) -> np.ndarray:
    """Lexicographic tangent: per element, the first non-zero of ``key(ts)`` over the directions."""
    out = None
    for ts in ts_dirs:
        k = key(ts)
        out = k if out is None else np.where(out != 0, out, k)
    return out


def tangent(ts, i, like):
    """Input ``i``'s tangent, zeros where it is ``None`` (a constant input)."""
    return np.zeros_like(like) if ts[i] is None else ts[i]
