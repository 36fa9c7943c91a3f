"""The tape: recording primitive applications, and the reverse and forward sweeps over it.

Each primitive application that involves a tensor requiring gradients creates one :class:`Node` on
its output tensor. The node holds the primitive, its parent tensors, the residuals its rules need
(computed once, in the forward pass), and the kink choice in force at forward time.

Sweeps visit nodes in an iterative topological order (no recursion limit, deterministic: parents in
argument order). The reverse sweep pops each node's pending cotangent and releases the node's
residuals as soon as it is done, unless ``retain_graph=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .precision import _Emulation, float32, float_to_half, to_compute, to_storage
from .storage import CARRIED, rounded, rounded_sum

if TYPE_CHECKING:
    from .primitives.core import Primitive
    from .tensor import Tensor


class _GradMode:
    enabled = True


def is_grad_enabled() -> bool:
    return _GradMode.enabled


@contextlib.contextmanager
def no_grad():
    """Scope in which nothing is recorded: results never require gradients."""
    prev, _GradMode.enabled = _GradMode.enabled, False
    try:
        yield
    finally:
        _GradMode.enabled = prev


@contextlib.contextmanager
def enable_grad():
    prev, _GradMode.enabled = _GradMode.enabled, True
    try:
        yield
    finally:
        _GradMode.enabled = prev


class Node:
    """One recorded primitive application (the ``grad_fn`` of its output tensor)."""

    __slots__ = ("prim", "parents", "res", "choice", "site", "released", "__weakref__")

    def __init__(self, prim: Primitive, parents: tuple, res: Any, choice: Any, site: str | None):
        self.prim = prim
        self.parents = parents  # Tensor for each input that requires grad, None otherwise
        self.res = res
        self.choice = choice  # kink choice in force at forward time (None for smooth primitives)
        self.site = site
        self.released = False

    def __repr__(self):
        return f"<Node {self.prim.name}{' @' + self.site if self.site else ''}>"


class Hooks:
    """Diagnostics attach here (census, timers); primitives stay clean.

    ``on_kink(prim, site, res, ans, node)`` runs after each non-smooth primitive's forward (``res``
    its residuals, ``ans`` its output in compute precision, ``node`` None when nothing is
    recorded). ``on_kink_backward(node, g)`` runs before a non-smooth node's VJP.
    ``on_apply(prim, tensors, out, res)`` runs after every primitive (costly: opt-in diagnostics).
    """

    on_kink: list[Callable] = []
    on_kink_backward: list[Callable] = []
    on_apply: list[Callable] = []


# -- topological order -------------------------------------------------------------------------


def toposort(root: Tensor) -> list[Tensor]:
    """Tensors reachable from ``root`` through nodes, root first, each after all its consumers."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
            continue
        # mark on expansion, not on push: a tensor pushed earlier by one consumer but reached again
        # through a deeper path must finish (post-order) before that deeper consumer does
        if id(t) in seen:
            continue
        seen.add(id(t))
        stack.append((t, True))
        node = t._node
        if node is None:
            continue
        for p in reversed(node.parents):
            if p is not None and id(p) not in seen:
                stack.append((p, False))
    order.reverse()
    return order


# -- reverse sweep -----------------------------------------------------------------------------


def backward(root: Tensor, g: np.ndarray, retain_graph: bool = False,
             inputs: list[Tensor] | None = None) -> dict[int, np.ndarray] | None:
    """Propagate cotangent ``g`` from ``root``.

    With ``inputs=None`` gradients accumulate into the ``.grad`` of leaf tensors that require grad.
    With ``inputs`` given, their cotangents are returned (keyed by ``id``) and ``.grad`` is untouched.
    """
    order = toposort(root)
    if root.dtype in CARRIED:  # below, a float16 tensor's cotangent is float32 on float16's grid
        g = to_compute(to_storage(np.asarray(g), root.dtype))
    pending: dict[int, np.ndarray] = {id(root): g}
    wanted = None if inputs is None else {id(t) for t in inputs}
    found: dict[int, np.ndarray] = {}
    for t in order:
        g = pending.pop(id(t), None)
        if g is None:
            continue
        if wanted is not None and id(t) in wanted:
            found[id(t)] = _in_format(g, t.dtype)
        node = t._node
        if node is None:
            if wanted is None and t.requires_grad:
                t._accumulate(g)
            continue
        if node.released:
            raise RuntimeError(
                f"backward through {node.prim.name} a second time, but its saved arrays were "
                "released after the first backward; pass retain_graph=True to the first "
                ".backward() to keep them"
            )
        for hook in Hooks.on_kink_backward if node.choice is not None else ():
            hook(node, g)
        needs = tuple(p is not None for p in node.parents)
        g = to_compute(g)
        cts = list(node.prim.vjp(g, node.res, needs, node.choice))
        for k in range(min(len(cts), len(node.parents))):
            # taken out of the list: a cotangent that only this loop holds is rounded in place
            p, ct, cts[k] = node.parents[k], cts[k], None
            if p is None or ct is None:
                continue
            if _Emulation.round is not None:
                ct = _Emulation.round(ct)
            prev = pending.get(id(p))
            if p.dtype in CARRIED:
                # float16 cotangents stay float32 images (kinkprop.storage), rounded once; a VJP
                # that passes a float16 node's cotangent on has nothing to round
                if ct.dtype != float32:
                    ct = to_compute(to_storage(ct, p.dtype))
                elif not (t.dtype in CARRIED and _passes_on(node, ct, g)):
                    ct = rounded(ct)
                if prev is not None:
                    ct = rounded_sum(prev, ct)
                pending[id(p)] = ct
            else:
                ct = to_storage(ct, p.dtype)
                pending[id(p)] = ct if prev is None else prev + ct
        if not retain_graph:
            node.res = None
            node.released = True
    return found if wanted is not None else None


def _passes_on(node, ct: np.ndarray, g: np.ndarray) -> bool:
    """Whether the cotangent ``ct`` that ``node``'s VJP returned holds elements of its incoming
    ``g`` only (as it is, or moved, negated or zeroed: ``Primitive.exact_vjp``)."""
    if _Emulation.round is not None:  # the scaled float8 rounding may have moved it
        return False
    return ct is g or (node.prim.exact_vjp is not None
                       and node.prim.exact_vjp(node.res, node.choice))


def _in_format(g: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A cotangent handed out of the sweep, in its tensor's format (images packed)."""
    return float_to_half(g) if dtype in CARRIED and g.dtype == float32 else g


# -- forward (tangent) sweep -------------------------------------------------------------------


def tangent_plan(nodes) -> tuple[set[int], dict[int, int]]:
    """``(only, readers)`` for a :func:`forward_sweep` that has to reach ``nodes`` and no further:
    the ids of ``nodes`` and of every node they depend on, and, keyed by the ``id`` of its output
    tensor, how many of them read the output of each one that another of them reads."""
    seen: set[int] = set()
    readers: dict[int, int] = {}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for p in _recorded_parents(node):
            readers[id(p)] = readers.get(id(p), 0) + 1
            stack.append(p._node)
    return seen, readers


def _recorded_parents(node) -> list[Tensor]:
    """The distinct parents of ``node`` that are outputs of recorded nodes (not leaves)."""
    return list({id(p): p for p in node.parents if p is not None and p._node is not None}.values())


#: a JVP runs on the elements its readers need (``jvp_at``) when they are at most this fraction
_SPARSE_JVP = 1 / 64
_NOTHING = object()  # in tangent_needs: no element of the tangent is needed


def tangent_needs(order, only: set[int] | None, sites: set[int]) -> dict[int, np.ndarray | None]:
    """Which tangent elements a selection sweep needs: per tensor (by ``id``) that a node of
    ``only`` (every node, if None) reads, a boolean mask, or None for every element.

    What a selection at a node of ``sites`` reads (``select_reads``) is needed; so is, going back
    through the tape (``order`` as :func:`toposort` gives it, outputs first), whatever each node's
    JVP reads to get its own needed elements right (``demand``; all of them by default). Sparse
    needs start at the last sites: there LeNet's second max-pool reads the tangents of its tied
    windows, nearly all relu zeros of negative inputs, whose tangents are zero whatever comes in,
    so that the convolution before it has ~50 of its 200k outputs to compute.

    Elements left out are computed as zeros, never read by a selection. Two caveats: a sparse JVP
    (``jvp_at``) may round differently from the dense one, so tangents equal to the last bits may
    pick another winner; and where a dense tangent would be inf or NaN, an element whose local
    derivative is 0 gets 0 instead of NaN."""
    needs: dict[int, Any] = {}
    for t in order:
        node = t._node
        if node is None or (only is not None and id(node) not in only):
            continue
        out = needs.get(id(t), _NOTHING)
        site = id(node) in sites
        if out is _NOTHING and not site:
            continue
        _check_kept(node)  # the rules below read the saved arrays
        for i, p in enumerate(node.parents):
            if p is None or p._node is None:
                continue  # a leaf: its tangent is given
            need = out
            if out is not _NOTHING and out is not None:
                need = node.prim.demand(node.res, out) if i == 0 and node.prim.demand else None
            if site and need is not None:  # (None: every element is needed already)
                reads = node.prim.select_reads if i == 0 else None
                need = _union(need, None if reads is None else reads(node.res))
            if need is not _NOTHING:
                needs[id(p)] = _union(needs.get(id(p), _NOTHING), need)
    return {k: v for k, v in needs.items() if v is not _NOTHING}


def _check_kept(node) -> None:
    if node.released:
        raise RuntimeError(
            "forward sweep over a released graph; record it again or pass retain_graph=True"
        )


def _union(a, b):
    if a is _NOTHING:
        return b
    if b is _NOTHING:
        return a
    if a is None or b is None:
        return None
    return a | b


def forward_sweep(root: Tensor, tangents: list[dict[int, np.ndarray]],
                  on_kink: Callable | None = None, only: set[int] | None = None,
                  readers: dict[int, int] | None = None,
                  sites: set[int] | None = None) -> list[dict[int, np.ndarray]]:
    """Push tangents through the recorded tape to ``root``, for one or several directions at once.

    ``tangents`` holds, per direction, the tangents of input tensors keyed by ``id``. Each node's
    JVP runs with the primal residuals saved in the forward pass. Before a non-smooth node's JVP,
    ``on_kink(node, ts_dirs)`` may replace ``node.choice`` (the directional policy selects pieces
    there, seeing every direction's input tangents). ``only`` restricts the sweep to the nodes
    with those ids (e.g. :func:`tangent_plan`'s first element). Returns, per
    direction, the tangent of every tensor reached.

    With ``readers`` (from :func:`tangent_plan`, for the sweeps that want the choices made in
    ``on_kink`` and not the tangents), a node whose output no node reads runs no JVP, and each
    tangent is dropped once its last reader has run, so that the sweep holds at most the tangents
    still to be read; the result then holds little more than the input tangents. With ``sites``
    too (the ids of the nodes whose ``on_kink`` reads tangents), a JVP whose output few of its
    readers' elements need computes only those (see :func:`tangent_needs`): tangents are then
    right only where a selection reads them.
    """
    order = toposort(root)
    outs = [dict(t) for t in tangents]
    left = None if readers is None else dict(readers)  # reads still to come, per tensor
    needs = {} if sites is None or readers is None else tangent_needs(order, only, sites)
    for t in reversed(order):
        node = t._node
        if node is None or id(t) in outs[0] or (only is not None and id(node) not in only):
            continue
        _check_kept(node)
        ts_dirs = [[None if p is None else out.get(id(p)) for p in node.parents] for out in outs]
        if all(x is None for x in ts_dirs[0]):
            continue
        ts_dirs = [[None if x is None else to_compute(x) for x in ts] for ts in ts_dirs]
        if on_kink is not None and node.choice is not None:
            node.choice = on_kink(node, ts_dirs)
        if readers is not None:
            _drop_read(outs, node, left)
            if id(t) not in readers:
                continue  # nothing reads this tangent (a last kink site): no JVP
        need = needs.get(id(t))
        sparse = (need is not None and node.prim.jvp_at is not None
                  and np.count_nonzero(need) <= _SPARSE_JVP * need.size)
        for out, ts in zip(outs, ts_dirs):
            t_out = (node.prim.jvp_at(ts, node.res, node.choice, need) if sparse
                     else node.prim.jvp(ts, node.res, node.choice))
            out[id(t)] = to_storage(t_out, t.dtype)
    return outs


def _drop_read(outs, node, left) -> None:
    """Count ``node``'s read of each parent's tangent; drop those that no reader still needs."""
    for p in _recorded_parents(node):
        left[id(p)] -= 1
        if not left[id(p)]:
            for out in outs:
                out.pop(id(p), None)
