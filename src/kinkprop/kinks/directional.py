"""The directional policy: a true generalized (Clarke) gradient at every kink.

Method (Kakade & Lee 2018, with lexicographic tie-breaking after Nesterov 2005 and Khan & Barton
2015). When a forward pass under ``kink_policy("directional")`` hit a kink, ``backward()`` first:

1. draws a direction ``d`` over the differentiated inputs (every leaf that requires grad) from a
   seeded generator, or takes the directions given in :func:`directional_options`;
2. sweeps the recorded tape forward with tangents along ``d`` (each primitive's JVP, with the primal
   values saved in the forward pass);
3. at each kink site selects the piece active on ``theta + t d`` as ``t -> 0+``: the sign of the
   tangent for elementwise kinks, the largest tangent among tied inputs for maximum, max reductions
   and max-pool windows. Later sites see the choices made upstream. Where the tangent is exactly 0
   at a kink, the next direction decides (lexicographic order), up to ``max_directions``;
4. runs the backward sweep through the selected pieces.

The result is ``lim_{t -> 0+} grad f(theta + t d)``: an element of the Bouligand, hence Clarke,
subdifferential. Elements still tied after every direction are *unresolved*: they are reported in
:data:`last_report` and with a warning, and take the ``fallback`` preset's value there.

On a forward pass with no kink hit there is no tangent sweep, and the gradient is bitwise the one
any other policy gives.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass, field

import numpy as np

from .. import tape
from .policy import Policy
from .spec import DIRECTIONAL


@dataclass
class DirectionalOptions:
    """``seed`` seeds the generator of random directions (drawn fresh each step from it);
    ``directions`` (a list of lists of arrays, one array per differentiated leaf in tape order, or
    of dicts keyed by leaf) overrides the random draw; ``max_directions`` bounds the lexicographic
    refinement; ``fallback`` names the preset whose value unresolved elements take."""

    seed: int | None = 0
    max_directions: int = 3
    directions: list | None = None
    fallback: str = "pytorch"
    rng: np.random.Generator | None = field(default=None, repr=False)

    def generator(self) -> np.random.Generator:
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)
        return self.rng


_options: contextvars.ContextVar[DirectionalOptions] = contextvars.ContextVar(
    "kinkprop_directional", default=DirectionalOptions())


@contextlib.contextmanager
def directional_options(**kwargs):
    """Scope for :class:`DirectionalOptions` (seed, directions, max_directions, fallback)."""
    opts = DirectionalOptions(**kwargs)
    if opts.max_directions < 1:
        raise ValueError("max_directions must be >= 1")
    token = _options.set(opts)
    try:
        yield opts
    finally:
        _options.reset(token)


@dataclass
class Report:
    """What the last resolution did: kink elements hit, resolved, unresolved, directions used."""

    sites: int = 0
    kinks: int = 0
    resolved: int = 0
    unresolved: int = 0
    directions: int = 0
    swept: bool = False
    unresolved_sites: list = field(default_factory=list)


#: The report of the most recent resolution in this process.
last_report = Report()


def _is_directional(choice) -> bool:
    if isinstance(choice, str):
        return choice == DIRECTIONAL
    return isinstance(choice, tuple) and any(isinstance(c, str) and c == DIRECTIONAL
                                             for c in choice)


def _directional_nodes(root):
    return [t._node for t in tape.toposort(root)
            if t._node is not None and t._node.choice is not None
            and _is_directional(t._node.choice) and not t._node.released]


def resolve_if_needed(root) -> Report | None:
    """Resolve the directional kink nodes recorded under ``root`` (called by ``backward``)."""
    nodes = _directional_nodes(root)
    if not nodes:
        return None
    return resolve(root, nodes)


def resolve(root, nodes=None) -> Report:
    """Select, at every directional kink node under ``root``, the piece active along a direction."""
    global last_report
    opts = _options.get()
    nodes = _directional_nodes(root) if nodes is None else nodes
    fallback = Policy.from_preset(opts.fallback)
    report = Report(sites=len(nodes))
    hit_nodes = []
    for node in nodes:
        n = node.prim.hits(node.res)
        report.kinks += n
        if n:
            hit_nodes.append(node)
        else:  # nothing on a kink: any value gives the same result; use the fallback's
            node.choice = _fallback(node, fallback)
    if not hit_nodes:
        last_report = report
        return report

    leaves = [t for t in tape.toposort(root) if t._node is None and t.requires_grad]
    directions = _directions(opts, leaves)
    report.directions = len(directions)
    report.swept = True
    pending = {id(n) for n in hit_nodes}

    def on_kink(node, ts_dirs):
        if id(node) not in pending:
            return node.choice
        choice, unresolved = node.prim.select(ts_dirs, node.res)
        k = int(np.count_nonzero(unresolved))
        if k:
            report.unresolved += k
            report.unresolved_sites.append((node.site or node.prim.name, k))
            choice = _patch_unresolved(node, choice, unresolved, fallback)
        return choice

    tape.forward_sweep(root, [{id(t): d for t, d in zip(leaves, ds)} for ds in directions],
                       on_kink=on_kink)
    report.resolved = report.kinks - report.unresolved
    if report.unresolved:
        warnings.warn(
            f"directional policy: {report.unresolved} kink element(s) still tied after "
            f"{len(directions)} direction(s) at {report.unresolved_sites}; they take the "
            f"{opts.fallback!r} preset's value (raise max_directions to refine)", stacklevel=3)
    last_report = report
    return report


def _fallback(node, fallback: Policy):
    spec = node.prim.kink
    return spec.resolve(fallback[spec.name])


def _patch_unresolved(node, choice, unresolved, fallback):
    """Unresolved elements of an elementwise kink take the fallback value; for ties the selector
    already split the gradient equally among the remaining tied inputs (reported, not hidden)."""
    spec = node.prim.kink
    if spec.kind == "ties":
        return choice
    value = _fallback(node, fallback)
    if spec.kind == "value":
        return np.where(unresolved, value, choice)
    return tuple(np.where(unresolved, v, c) for v, c in zip(value, choice))


def _directions(opts: DirectionalOptions, leaves) -> list[list[np.ndarray]]:
    if opts.directions is not None:
        dirs = []
        for d in opts.directions[:opts.max_directions]:
            if isinstance(d, dict):
                d = [d[leaf] if leaf in d else d[id(leaf)] for leaf in leaves]
            if len(d) != len(leaves):
                raise ValueError(f"a direction needs one array per differentiated input "
                                 f"({len(leaves)}), got {len(d)}")
            dirs.append([np.asarray(a, dtype=np.float64).reshape(leaf.shape).astype(
                leaf.dtype if leaf.dtype.itemsize >= 4 else np.float32)
                for a, leaf in zip(d, leaves)])
        return dirs
    rng = opts.generator()
    return [[rng.standard_normal(leaf.shape).astype(leaf.dtype if leaf.dtype.itemsize >= 4
                                                     else np.float32) for leaf in leaves]
            for _ in range(opts.max_directions)]
