"""The directional policy: a true generalized (Clarke) gradient at every kink.

Method (Kakade & Lee 2018, with lexicographic tie-breaking after Nesterov 2005 and Khan & Barton
2015). When a forward pass under ``kink_policy("directional")`` hit a kink, ``backward()`` first:

1. draws a direction ``d`` over the differentiated inputs from a seeded generator, or takes the
   directions given in :func:`directional_options`. The differentiated inputs are ``kp.grad``'s
   ``argnums`` in order, or, for ``loss.backward()``, every leaf tensor that requires grad; a random
   ``d`` is drawn only over those that some kink site hit depends on (the other components could
   not change any choice);
2. sweeps the recorded tape forward with tangents along ``d`` (each primitive's JVP, with the primal
   values saved in the forward pass), up to the last kink site hit and no further;
3. at each kink site selects the piece active on ``theta + t d`` as ``t -> 0+``: the sign of the
   tangent for elementwise kinks, the largest tangent among tied inputs for maximum, max reductions
   and max-pool windows. Later sites see the choices made upstream. Where the tangent is exactly 0
   at a kink, the next direction decides (lexicographic order), up to ``max_directions``: a second
   sweep carries every direction at once, and only runs when the first left a kink tied;
4. runs the backward sweep through the selected pieces.

The result is ``lim_{t -> 0+} grad f(theta + t d)``: an element of the Bouligand, hence Clarke,
subdifferential. Elements still tied after every direction are *unresolved*: they are listed in
:data:`last_report` and announced with an :class:`UnresolvedKinkWarning`, never silently guessed.
They take the ``fallback`` preset's value at an elementwise kink and an equal split among the inputs
still tied. (With random directions an element stays tied only if its pieces agree to first order
along a random direction, which almost surely means they have the same gradient, so the value
there does not change the result; with explicit directions it may.)

On a forward pass with no kink hit there is no tangent sweep, and the gradient is bitwise the one
any other policy gives.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from .. import tape
from .policy import Policy
from .presets import PRESETS
from .spec import DIRECTIONAL


class UnresolvedKinkWarning(UserWarning):
    """Kink elements still tied after every direction (see :data:`last_report`)."""


@dataclass
class DirectionalOptions:
    """``seed`` seeds the generator of random directions (drawn fresh each step from it);
    ``directions`` (a list of directions; each a list of arrays, one per differentiated input in
    order, or a dict keyed by input tensor; with one input an array alone will do) overrides the
    random draw; ``max_directions`` bounds the lexicographic refinement; ``fallback`` names the
    preset whose value unresolved elementwise kinks take.

    The refinement sweep (all directions at once) runs only on steps where the first direction
    left a kink tied. With random directions such a tie almost surely joins pieces with the same
    gradient (relu zeros tied in a max-pool window, ``maximum(x, x)``), which further random
    directions cannot split either: ``max_directions=1`` then gives the same gradient for about
    half the cost of such a step.

    ``refine``: with random directions, whether to run that refinement sweep at all. By default
    (False) a random direction's ties are settled in one sweep: pieces tied along a random d agree
    to first order along d, which with probability 1 means their gradients are equal, so no choice
    among them can change the result (Kakade & Lee's guarantee needs one random direction). They
    are reported as ``immaterial``, not unresolved. Given directions are always refined up to
    ``max_directions``."""

    seed: int | None = 0
    max_directions: int = 3
    directions: list | None = None
    fallback: str = "pytorch"
    refine: bool = False
    rng: np.random.Generator | None = field(default=None, repr=False)

    def generator(self) -> np.random.Generator:
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)
        return self.rng


#: Options outside any ``directional_options`` scope (one generator for the whole process).
_DEFAULT = DirectionalOptions()
_options: contextvars.ContextVar[DirectionalOptions | None] = contextvars.ContextVar(
    "kinkprop_directional", default=None)


@contextlib.contextmanager
def directional_options(**kwargs):
    """Scope for :class:`DirectionalOptions` (seed, directions, max_directions, fallback).

    Every step resolved in the scope draws its directions from one generator seeded by ``seed``, so
    a run is reproducible; explicit ``directions`` replace the draw (at most ``max_directions`` of
    them are used).
    """
    opts = DirectionalOptions(**kwargs)
    if opts.max_directions < 1:
        raise ValueError("max_directions must be >= 1")
    if opts.fallback not in PRESETS:
        raise ValueError(f"fallback must name a preset ({', '.join(PRESETS)}), got "
                         f"{opts.fallback!r}")
    token = _options.set(opts)
    try:
        yield opts
    finally:
        _options.reset(token)


@contextlib.contextmanager
def own_directions(rng: np.random.Generator):
    """The options in force, with random directions drawn from ``rng``: what a training run uses,
    so that its directions follow its own seed, not what ran before it in the process. The rest
    (given directions, ``max_directions``, ``refine``, ``fallback``) stays as the enclosing scope
    set it."""
    opts = replace(current_options(), rng=rng)
    token = _options.set(opts)
    try:
        yield opts
    finally:
        _options.reset(token)


def current_options() -> DirectionalOptions:
    """The options in force (those of the innermost ``directional_options`` scope)."""
    opts = _options.get()
    return _DEFAULT if opts is None else opts


# -- the report --------------------------------------------------------------------------------


@dataclass
class SiteReport:
    """One directional kink site that the forward pass hit."""

    name: str  # the site (module path) and primitive, or the primitive and its occurrence number
    primitive: str
    kinks: int  # kink elements hit (a tied group counts once)
    decided: list[int]  # how many of them direction 1, 2, ... decided
    unresolved: int
    immaterial: int = 0  # tied along a random direction: the choice cannot matter (a.s.)

    @property
    def resolved(self) -> int:
        return self.kinks - self.unresolved


@dataclass
class Report:
    """What one resolution did (see :data:`last_report`).

    ``sites`` directional sites recorded, ``sites_hit`` of them with a kink element hit; ``kinks``
    elements hit in all (a tied group counts once), ``resolved`` and ``unresolved`` of them;
    ``directions`` swept (0: no kink hit, so no sweep ran); ``by_direction`` kink elements that
    direction 1, 2, ... decided; ``details`` one :class:`SiteReport` per site hit, in forward
    order; ``unresolved_sites`` the ``(name, count)`` of those left tied.
    """

    sites: int = 0
    kinks: int = 0
    resolved: int = 0
    unresolved: int = 0
    directions: int = 0
    swept: bool = False
    unresolved_sites: list = field(default_factory=list)
    sites_hit: int = 0
    by_direction: list = field(default_factory=list)
    details: list = field(default_factory=list)
    explicit: bool = False  # directions given by the user rather than drawn
    immaterial: int = 0  # tied along a random direction: no choice changes the result (a.s.)

    def __str__(self) -> str:
        if not self.swept:
            return (f"directional: no kink hit at {self.sites} site(s); no tangent sweep, the "
                    "ordinary gradient")
        source = "given" if self.explicit else "random"
        by = ", ".join(f"{n} by direction {i + 1}" for i, n in enumerate(self.by_direction) if n)
        lines = [(f"directional: {self.kinks} kink element(s) hit at {self.sites_hit} of "
                  f"{self.sites} site(s); {self.resolved} resolved ({by or 'none'}"
                  + (f", {self.immaterial} tied along the random direction: immaterial"
                     if self.immaterial else "")
                  + f"), {self.unresolved} unresolved; {self.directions} {source} direction(s) "
                  "swept")]
        for s in self.details:
            lines.append(f"  {s.name}: {s.kinks} hit, {s.resolved} resolved"
                         + (f" ({s.immaterial} immaterial)" if s.immaterial else "")
                         + (f", {s.unresolved} UNRESOLVED" if s.unresolved else ""))
        return "\n".join(lines)


#: The report of the most recent resolution in this process (read it as
#: ``kinkprop.kinks.directional.last_report``; ``print`` it for a summary).
last_report = Report()


# -- finding the directional sites -------------------------------------------------------------


def _is_directional(choice) -> bool:
    if isinstance(choice, str):
        return choice == DIRECTIONAL
    return isinstance(choice, tuple) and any(isinstance(c, str) and c == DIRECTIONAL
                                             for c in choice)


def _directional_nodes(order):
    """Unresolved directional nodes, in forward order (``order`` is a toposort, root first)."""
    return [t._node for t in reversed(order)
            if t._node is not None and t._node.choice is not None
            and _is_directional(t._node.choice) and not t._node.released]


def site_names(nodes) -> dict[int, str]:
    """A readable name for each kink node: ``site:primitive`` inside a named site (``kp.nn``;
    ``#k`` appended when a site is applied again), else ``primitive#k`` for the k-th application
    of that primitive in forward order."""
    names, seen = {}, {}
    for node in nodes:
        base = f"{node.site}:{node.prim.name}" if node.site else node.prim.name
        k = seen.get(base, 0)
        seen[base] = k + 1
        names[id(node)] = f"{base}#{k}" if k or not node.site else base
    return names


def resolve_if_needed(root, leaves=None) -> Report | None:
    """Resolve the directional kink nodes recorded under ``root`` (called by ``backward`` and by
    :mod:`kinkprop.autodiff`, which passes its differentiated inputs as ``leaves``)."""
    order = tape.toposort(root)
    nodes = _directional_nodes(order)
    if not nodes:
        return None
    return resolve(root, nodes, leaves=leaves, order=order)


# -- resolution --------------------------------------------------------------------------------


def resolve(root, nodes=None, leaves=None, order=None) -> Report:
    """Select, at every directional kink node under ``root``, the piece active along a direction.

    ``leaves`` are the differentiated inputs the directions live on (default: every leaf under
    ``root`` that requires grad, in the order a depth-first walk from ``root`` meets them,
    arguments left to right); other leaves stay still. Sets :data:`last_report` and returns it.
    """
    global last_report
    opts = current_options()
    order = tape.toposort(root) if order is None else order
    nodes = _directional_nodes(order) if nodes is None else nodes
    fallback = Policy.from_preset(opts.fallback)
    names = site_names(nodes)
    report = Report(sites=len(nodes))
    hit: dict[int, int] = {}
    for node in nodes:
        n = node.prim.hits(node.res)
        if n:
            hit[id(node)] = n
        else:  # nothing on a kink: every value gives the same result; take the fallback's
            node.choice = _fallback(node, fallback)
    report.kinks = sum(hit.values())
    report.sites_hit = len(hit)
    if not hit:
        last_report = report
        return report

    if leaves is None:
        leaves = [t for t in reversed(order) if t._node is None and t.requires_grad]
    hit_nodes = [node for node in nodes if id(node) in hit]
    # the sweep visits the hit nodes and what they depend on, nothing after the last of them
    plan = tape.tangent_plan(hit_nodes)
    source = _Directions(opts, leaves, reach=_read_by(order, plan[0]))
    report.explicit = opts.directions is not None

    # first sweep with one direction; a second with all of them only if a kink stayed tied
    n_dirs = 1
    while True:
        dirs = source.take(n_dirs)
        stats = _sweep(root, source.leaves, dirs, hit_nodes, plan, fallback)
        left = sum(s[1] for s in stats.values())
        more = min(opts.max_directions, source.available(opts.max_directions))
        if left == 0 or len(dirs) >= more or not (report.explicit or opts.refine):
            break
        n_dirs = more

    report.directions = len(dirs)
    report.swept = True
    report.by_direction = [0] * len(dirs)
    for node in hit_nodes:
        counts, unresolved = stats[id(node)]
        decided, prev = [], hit[id(node)]
        for c in counts:
            decided.append(prev - c)
            prev = c
        for i, k in enumerate(decided):
            report.by_direction[i] += k
        report.details.append(SiteReport(names[id(node)], node.prim.name, hit[id(node)], decided,
                                         unresolved))
        if unresolved:
            report.unresolved_sites.append((names[id(node)], unresolved))
    report.unresolved = sum(s.unresolved for s in report.details)
    if report.unresolved and not (report.explicit or opts.refine):
        # tied along one random direction: immaterial with probability 1 (see DirectionalOptions)
        report.immaterial, report.unresolved = report.unresolved, 0
        report.unresolved_sites = []
        for s in report.details:
            s.immaterial, s.unresolved = s.unresolved, 0
    report.resolved = report.kinks - report.unresolved
    if report.unresolved:
        source_txt = "given" if report.explicit else "random"
        # no counts in the text: Python then shows it once per call site, not at every step
        sites = ", ".join(dict.fromkeys(name for name, _ in report.unresolved_sites))
        warnings.warn(
            f"directional policy: kink elements still tied after {len(dirs)} {source_txt} "
            f"direction(s) at {sites} (counts in kinkprop.kinks.directional.last_report); "
            f"elementwise kinks there take the {opts.fallback!r} preset's value and ties split "
            "equally. With random directions the tied pieces agree to first order, so almost "
            "surely this does not change the gradient; with given ones, give more directions",
            UnresolvedKinkWarning, stacklevel=_user_stacklevel())
    last_report = report
    return report


def _sweep(root, leaves, dirs, hit_nodes, plan, fallback) -> dict[int, tuple[list[int], int]]:
    """One tangent sweep along ``dirs`` over the nodes of ``plan`` (:func:`tape.tangent_plan` of
    ``hit_nodes``); selects at the hit nodes. Returns, per node, the count of elements still tied
    after each prefix of the directions, and the final count."""
    pending = {id(n) for n in hit_nodes}
    stats: dict[int, tuple[list[int], int]] = {}

    def on_kink(node, ts_dirs):
        if id(node) not in pending:
            return node.choice
        return _select(node, ts_dirs, stats, fallback)

    tangents = [{id(t): d for t, d in zip(leaves, ds)} for ds in dirs]
    only, readers = plan
    tape.forward_sweep(root, tangents, on_kink=on_kink, only=only, readers=readers, sites=pending)
    for node in hit_nodes:  # no tangent reached it (it depends on no differentiated input)
        if id(node) not in stats:
            zeros = [None if p is None else np.zeros(p.shape) for p in node.parents]
            node.choice = _select(node, [zeros] * len(dirs), stats, fallback)
    return stats


def _read_by(order, only) -> set[int]:
    """Ids of the tensors that the nodes with ids in ``only`` read."""
    return {id(p) for t in order if t._node is not None and id(t._node) in only
            for p in t._node.parents if p is not None}


def _select(node, ts_dirs, stats, fallback):
    """The node's choice along the directions; records how many elements each prefix left tied
    (later directions are consulted only while some element is still tied)."""
    counts = []
    for k in range(1, len(ts_dirs) + 1):
        choice, unresolved = node.prim.select(ts_dirs[:k], node.res)
        counts.append(int(np.count_nonzero(unresolved)))
        if not counts[-1]:
            break
    counts += [0] * (len(ts_dirs) - len(counts))
    stats[id(node)] = (counts, counts[-1])
    if counts[-1]:
        choice = _patch_unresolved(node, choice, unresolved, fallback)
    return choice


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_stacklevel() -> int:
    """``stacklevel`` for a warning raised by the caller: the first frame outside kinkprop."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def _slope(node):
    res = node.res
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict):
        return res[1].get("slope")
    return None


def _fallback(node, fallback: Policy):
    spec = node.prim.kink
    return spec.resolve(fallback[spec.name], _slope(node))


def _patch_unresolved(node, choice, unresolved, fallback):
    """Unresolved elements of an elementwise kink take the fallback value; for ties the selector
    already split the gradient equally among the inputs still tied (reported, not hidden)."""
    spec = node.prim.kink
    if spec.kind == "ties":
        return choice
    value = _fallback(node, fallback)
    if spec.kind == "value":
        return np.where(unresolved, value, choice)
    return tuple(np.where(unresolved, v, c) for v, c in zip(value, choice))


# -- directions --------------------------------------------------------------------------------


class _Directions:
    """Directions over :attr:`leaves`: the given ones (over every leaf), or random ones drawn
    (lazily) from the options' generator over the leaves with ids in ``reach`` only: the sweep
    reads no other, so their components could not change any choice."""

    def __init__(self, opts: DirectionalOptions, leaves, reach=None):
        self.opts = opts
        self.drawn: list[list[np.ndarray]] = []
        self.given = None if opts.directions is None else list(opts.directions)
        if self.given is not None and not self.given:
            raise ValueError("directional_options: directions is empty")
        if self.given is None and reach is not None:
            leaves = [leaf for leaf in leaves if id(leaf) in reach]
        self.leaves = leaves

    def available(self, n: int) -> int:
        return n if self.given is None else min(n, len(self.given))

    def take(self, n: int) -> list[list[np.ndarray]]:
        if self.given is not None:
            return [self._convert(d) for d in self.given[:n]]
        rng = self.opts.generator()
        while len(self.drawn) < n:
            self.drawn.append([rng.standard_normal(leaf.shape).astype(_tangent_dtype(leaf))
                               for leaf in self.leaves])
        return self.drawn[:n]

    def _convert(self, d) -> list[np.ndarray]:
        leaves = self.leaves
        if isinstance(d, dict):
            by_id = {id(k) if not isinstance(k, int) else k: v for k, v in d.items()}
            unknown = set(by_id) - {id(leaf) for leaf in leaves}
            if unknown:
                raise ValueError("a direction names a tensor that is not a differentiated input")
            d = [by_id.get(id(leaf), np.zeros(leaf.shape)) for leaf in leaves]
        elif not isinstance(d, (list, tuple)):
            d = [d]  # one input: the array alone
        if len(d) != len(leaves):
            raise ValueError(f"a direction needs one array per differentiated input "
                             f"({len(leaves)}), got {len(d)}")
        out = []
        for a, leaf in zip(d, leaves):
            a = np.asarray(a.data if hasattr(a, "_node") else a, dtype=np.float64)
            if a.size != leaf.size:
                raise ValueError(f"a direction's array has shape {a.shape}, its input has "
                                 f"{leaf.shape}")
            out.append(a.reshape(leaf.shape).astype(_tangent_dtype(leaf)))
        return out


def _tangent_dtype(leaf):
    return leaf.dtype if leaf.dtype.itemsize >= 4 else np.float32
