"""Disagreement detector: does a kink policy's gradient look like a generalized gradient?

:func:`check_generalized` computes, at one point, the gradient under a kink policy (the one in force,
or the one given) and the directional one (:mod:`kinkprop.kinks.directional`: ``lim_{t->0+} grad
f(theta + t d)`` for a random ``d``, a Bouligand element with probability 1). Where the two differ it
names the kink sites whose choices differ and the size of the difference.

What it claims, and what it does not:

* A difference is a warning sign, not a proof. The Clarke subdifferential is the convex hull of the
  Bouligand one and may hold both gradients; deciding membership is NP-hard for ReLU networks
  (Bolte, Boustany, Pauwels, Pesquet-Popescu, ICLR 2023). Agreement proves nothing either: it is
  one direction's Bouligand element.
* With ``n_samples > 0`` (small networks) it samples Bouligand gradients: ordinary gradients at
  ``theta + t d`` for small ``t`` over many random ``d``, each kept only where no kink is hit at the
  sampled point (checked with every primitive's ``hits()``), so that the gradient there is an
  ordinary one. It reports whether the policy's gradient is among them, and whether it lies in their
  convex hull. Among them or in the hull: a generalized (Clarke) gradient, up to the tolerance and
  the ``O(t)`` drift of the sampled gradients. Neither: it was not found, which more samples might
  change.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import autodiff, tape
from ..kinks import directional
from ..kinks.policy import Policy, current_policy, kink_policy, make_policy, parse_policy
from .gradcheck import prepare_args


@dataclass
class SiteDifference:
    """A kink site whose choice differs between the policy and the directional resolution."""

    name: str  # as in the directional report: ``site:primitive`` or ``primitive#k``
    primitive: str
    kinks: int  # kink elements hit there (a tied group counts once)
    differing: int  # input elements whose local derivative differs between the two choices


@dataclass
class GeneralizedCheck:
    """The result of :func:`check_generalized`; ``print`` it for a summary."""

    policy: str
    argnums: tuple[int, ...]
    kinks: int  # kink elements hit at the point, at every site whatever its policy
    sites_hit: int
    grad_policy: list[np.ndarray]
    grad_directional: list[np.ndarray]
    difference: float  # norm of (policy - directional), over every differentiated argument
    relative: float  # difference / max(norm of the directional gradient, tiny)
    differs: bool
    sites: list[SiteDifference] | None  # None: the two traces did not match site by site
    directional_report: directional.Report | None
    rtol: float
    atol: float
    n_samples: int = 0
    t: float = 0.0
    samples_used: int = 0
    samples_on_kink: int = 0  # sampled points that hit a kink: discarded
    bouligand: list[np.ndarray] = field(default_factory=list)  # distinct sampled gradients (flat)
    bouligand_counts: list[int] = field(default_factory=list)
    policy_among: bool | None = None
    policy_distance: float | None = None  # to the nearest sampled gradient
    policy_in_hull: bool | None = None
    hull_distance: float | None = None  # to the convex hull of the sampled gradients
    directional_among: bool | None = None

    @property
    def warning_sign(self) -> bool:
        """The policy's gradient differs from the directional one and no sample vouches for it."""
        if not self.differs:
            return False
        return not (self.policy_among or self.policy_in_hull)

    def __str__(self) -> str:
        lines = [(f"check_generalized, policy {self.policy!r}: {self.kinks} kink element(s) "
                  f"hit at {self.sites_hit} site(s)")]
        if not self.kinks:
            lines.append("  no kink hit: every policy gives the ordinary gradient")
        verdict = "DIFFER" if self.differs else "agree"
        lines.append(f"  policy vs directional gradient: {verdict}, |difference| = "
                     f"{self.difference:.6g} (relative {self.relative:.3g})")
        if self.differs:
            if self.sites is None:
                lines.append("  (the policy's and the directional traces differ in structure; "
                             "sites not compared)")
            elif self.sites:
                lines.append("  sites whose choices differ: " + ", ".join(
                    f"{s.name} ({s.differing} element(s), {s.kinks} kink(s) hit)"
                    for s in self.sites))
            else:
                lines.append("  no site's choice differs (the difference comes from elsewhere)")
        rep = self.directional_report
        if rep is not None and rep.unresolved:
            lines.append(f"  directional: {rep.unresolved} kink element(s) unresolved at "
                         f"{rep.unresolved_sites}")
        if self.n_samples:
            lines.append(f"  sampled {self.n_samples} point(s) theta + t d (t = {self.t:g}): "
                         f"{self.samples_used} used, {self.samples_on_kink} discarded on a kink; "
                         f"{len(self.bouligand)} distinct Bouligand gradient(s)")
            if self.n_samples and not self.samples_used:
                lines.append("  every sampled point hit a kink: some kink does not move with the "
                             "differentiated inputs (e.g. relu of a constant); sampling cannot "
                             "vouch here")
            if self.samples_used:
                lines.append(
                    f"  policy gradient: {'among them' if self.policy_among else 'NOT among them'}"
                    f" (nearest at {self.policy_distance:.3g}), "
                    + ("in their convex hull" if self.policy_in_hull else
                       f"NOT in their convex hull (distance {self.hull_distance:.3g})"))
                lines.append("  directional gradient: "
                             + ("among them" if self.directional_among else "NOT among them"))
        if self.differs:
            if self.policy_among or self.policy_in_hull:
                lines.append("  the policy's gradient is a generalized gradient (up to the "
                             "tolerance): the difference is a different Clarke element")
            else:
                lines.append("  a difference is a warning sign, not a proof: the Clarke "
                             "subdifferential may contain both (deciding membership is NP-hard)")
        return "\n".join(lines)


def check_generalized(f: Callable, *args, policy: str | Policy | None = None, n_samples: int = 0,
                      seed: int = 0, argnums: int | Sequence[int] | None = None,
                      t: float = 1e-7, rtol: float = 1e-5, atol: float = 1e-9
                      ) -> GeneralizedCheck:
    """Compare the kink ``policy``'s gradient of scalar ``f`` at ``args`` with the directional one.

    ``f`` is a function of tensors returning a scalar :class:`~kinkprop.Tensor` (as for
    ``kp.grad``). The differentiated arguments (``argnums``; by default every floating-point one) are
    cast to float64; the others are passed as constants. ``policy``: a preset name, a policy string
    such as ``"pytorch,relu=1"``, a :class:`~kinkprop.kinks.Policy`, or ``None`` for the policy in
    force. ``seed`` seeds the directional direction and the samples.

    Two gradients count as equal when ``|a - b| <= atol + rtol * max(|a|, |b|)`` (Euclidean norms
    over all differentiated arguments). ``n_samples > 0`` also samples Bouligand gradients at
    ``theta + t d`` (see the module docstring); ``t`` should be small against the distance to the
    kinks not hit at ``theta``. Returns a :class:`GeneralizedCheck`; ``.warning_sign`` is true when
    the gradients differ and no sample vouches for the policy's.
    """
    if n_samples < 0:
        raise ValueError(f"check_generalized: n_samples must be >= 0, got {n_samples}")
    if not t > 0:
        raise ValueError(f"check_generalized: t must be positive, got {t}")
    pol = _policy(policy)
    arrays, nums = prepare_args(args, argnums, "check_generalized")
    saved_report = directional.last_report
    try:
        base = _trace(f, arrays, nums, pol, seed)
        if base.kinks:
            dirn = _trace(f, arrays, nums, Policy.from_preset(directional.DIRECTIONAL), seed)
        else:  # no kink hit: the directional policy would run no sweep and give the same bits
            dirn = base
        gp, gd = _flat(base.grads), _flat(dirn.grads)
        diff = float(np.linalg.norm(gp - gd))
        scale = max(float(np.linalg.norm(gp)), float(np.linalg.norm(gd)))
        check = GeneralizedCheck(
            policy=pol.label, argnums=nums, kinks=base.kinks, sites_hit=base.sites_hit,
            grad_policy=base.grads, grad_directional=dirn.grads, difference=diff,
            relative=diff / max(float(np.linalg.norm(gd)), np.finfo(np.float64).tiny),
            differs=not _close(diff, scale, rtol, atol),
            sites=_site_differences(base, dirn, seed) if base.kinks else [],
            directional_report=dirn.report if base.kinks else None, rtol=rtol, atol=atol)
        if n_samples:
            _sample(check, f, arrays, nums, n_samples, seed, t, gp, gd)
    finally:
        directional.last_report = saved_report
    return check


# -- tracing -----------------------------------------------------------------------------------


@dataclass
class _Trace:
    kink_nodes: list  # (output tensor, node) of every non-smooth node, in forward order
    hits: list[int]
    grads: list[np.ndarray]
    report: directional.Report | None

    @property
    def kinks(self) -> int:
        return sum(self.hits)

    @property
    def sites_hit(self) -> int:
        return sum(1 for h in self.hits if h)


def _policy(policy) -> Policy:
    if policy is None:
        return current_policy()
    if isinstance(policy, str) and ("=" in policy or "," in policy):
        return parse_policy(policy)
    return make_policy(policy)


def _trace(f, arrays, nums, pol: Policy, seed, skip_on_kink=False) -> _Trace | None:
    """Record ``f`` under ``pol`` and take its gradient (the graph kept for the site comparison).
    With ``skip_on_kink``, return None without a backward pass when a kink is hit."""
    with kink_policy(pol):
        inputs, out = autodiff._trace(f, arrays, nums)
    if out.data.size != 1:
        raise ValueError(f"check_generalized: f must return a scalar, got shape {out.shape}")
    if out.dtype != np.float64:
        raise TypeError(f"check_generalized: f returned {out.dtype} on float64 inputs")
    wrt = [inputs[i] for i in nums]
    kink_nodes = [(t, t._node) for t in reversed(tape.toposort(out))
                  if t._node is not None and t._node.prim.kink is not None]
    hits = [node.prim.hits(node.res) for _, node in kink_nodes]
    if skip_on_kink and any(hits):
        return None
    if not out.requires_grad:
        return _Trace(kink_nodes, hits, [np.zeros_like(w.data) for w in wrt], None)
    # a directional choice (the directional trace, or a policy that uses it) resolves with ``seed``
    with directional.directional_options(seed=seed), warnings.catch_warnings():
        warnings.simplefilter("ignore", directional.UnresolvedKinkWarning)
        report = directional.resolve_if_needed(out, leaves=wrt)
    found = tape.backward(out, np.ones_like(out.data), retain_graph=True, inputs=wrt)
    grads = [np.broadcast_to(found[id(w)], w.shape).copy() if id(w) in found
             else np.zeros_like(w.data) for w in wrt]
    return _Trace(kink_nodes, hits, grads, report)


def _flat(grads) -> np.ndarray:
    return np.concatenate([np.ravel(g) for g in grads]) if grads else np.zeros(0)


def _close(diff, scale, rtol, atol) -> bool:
    return bool(diff <= atol + rtol * scale)


# -- which sites differ ------------------------------------------------------------------------


def _site_differences(base: _Trace, dirn: _Trace, seed) -> list[SiteDifference] | None:
    """Per kink site hit, the input elements whose local derivative differs between the two
    choices: both VJPs applied to one random cotangent, compared element by element."""
    if len(base.kink_nodes) != len(dirn.kink_nodes) or any(
            a.prim is not b.prim for (_, a), (_, b) in zip(base.kink_nodes, dirn.kink_nodes)):
        return None
    names = directional.site_names([node for _, node in base.kink_nodes])
    rng = np.random.default_rng([seed, 2])
    out = []
    for (t, a), (_, b), h in zip(base.kink_nodes, dirn.kink_nodes, base.hits):
        if not h:
            continue
        g = rng.standard_normal(t.shape)
        needs = tuple(p is not None for p in a.parents)
        cts_a = a.prim.vjp(g, a.res, needs, a.choice)
        cts_b = b.prim.vjp(g, b.res, needs, b.choice)
        differing = 0
        for ca, cb in zip(cts_a, cts_b):
            if ca is None or cb is None:
                continue
            ca, cb = np.asarray(ca, np.float64), np.asarray(cb, np.float64)
            tol = 1e-12 * (1.0 + np.abs(ca) + np.abs(cb))
            differing += int(np.count_nonzero(np.abs(ca - cb) > tol))
        if differing:
            out.append(SiteDifference(names[id(a)], a.prim.name, h, differing))
    return out


# -- sampled Bouligand gradients ---------------------------------------------------------------


def _sample(check: GeneralizedCheck, f, arrays, nums, n_samples, seed, t, gp, gd):
    rng = np.random.default_rng([seed, 1])
    reps: list[np.ndarray] = []
    counts: list[int] = []
    used = on_kink = 0
    pytorch = Policy.from_preset("pytorch")  # any preset: off the kinks they all agree
    for _ in range(n_samples):
        moved = list(arrays)
        for i in nums:
            moved[i] = arrays[i] + t * rng.standard_normal(arrays[i].shape)
        tr = _trace(f, moved, nums, pytorch, seed, skip_on_kink=True)
        if tr is None:
            on_kink += 1
            continue
        used += 1
        g = _flat(tr.grads)
        for k, r in enumerate(reps):
            if _close(float(np.linalg.norm(g - r)), max(float(np.linalg.norm(g)),
                                                        float(np.linalg.norm(r))),
                      check.rtol, check.atol):
                counts[k] += 1
                break
        else:
            reps.append(g)
            counts.append(1)
    check.n_samples, check.t = n_samples, t
    check.samples_used, check.samples_on_kink = used, on_kink
    check.bouligand, check.bouligand_counts = reps, counts
    if not reps:
        return
    check.policy_distance, check.policy_among = _nearest(gp, reps, check.rtol, check.atol)
    check.directional_among = _nearest(gd, reps, check.rtol, check.atol)[1]
    check.hull_distance = hull_distance(gp, reps)
    scale = max(float(np.linalg.norm(gp)), max(float(np.linalg.norm(r)) for r in reps))
    check.policy_in_hull = _close(check.hull_distance, scale, check.rtol, check.atol)


def _nearest(g, reps, rtol, atol) -> tuple[float, bool]:
    dists = [float(np.linalg.norm(g - r)) for r in reps]
    k = int(np.argmin(dists))
    scale = max(float(np.linalg.norm(g)), float(np.linalg.norm(reps[k])))
    return dists[k], _close(dists[k], scale, rtol, atol)


def hull_distance(g: np.ndarray, points: Sequence[np.ndarray]) -> float:
    """Euclidean distance from ``g`` to the convex hull of ``points`` (all flat, same length).

    Solves min ||P w - g|| over the simplex with non-negative least squares, the constraint
    sum(w) = 1 enforced by a heavily weighted extra row, then measures at the normalised weights.
    """
    P = np.stack([np.asarray(p, np.float64) for p in points], axis=1)
    g = np.asarray(g, np.float64)
    rho = 1e3 * max(1.0, float(np.abs(P).max(initial=0.0)), float(np.abs(g).max(initial=0.0)))
    A = np.vstack([P, np.full((1, P.shape[1]), rho)])
    b = np.concatenate([g, [rho]])
    w = nnls(A, b)
    if w.sum() <= 0:
        w = np.full(P.shape[1], 1.0 / P.shape[1])
    w = w / w.sum()
    return float(np.linalg.norm(P @ w - g))


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares, argmin_{x >= 0} ||A x - b|| (Lawson & Hanson 1974)."""
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, bool)
    tol = 10 * np.finfo(np.float64).eps * np.linalg.norm(A, 1) * max(m, n)
    max_iter = 3 * n if max_iter is None else max_iter
    w = A.T @ (b - A @ x)
    for _ in range(max_iter):
        if passive.all() or w[~passive].max() <= tol:
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                break
            neg = passive & (z <= tol)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
            if not passive.any():
                z = x
                break
        x = z
        w = A.T @ (b - A @ x)
    return x
