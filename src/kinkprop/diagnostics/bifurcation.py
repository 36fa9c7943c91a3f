"""Bifurcation test: does the gradient of this batch change between two kink policies?

The protocol of Bertoin et al. (NeurIPS 2021, section 3), with the correct chain rule (the kink
value multiplies the incoming gradient). A forward pass runs once, under policy A, with the census
on. If it hit no kink, the gradients are identical by construction and no second backward runs.
Otherwise the recorded tape is swept backward twice: once with A's choices, then with every kink
node's choice replaced by policy B's (per-call choices included), and the gradients compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import tape
from ..kinks.census import census
from ..kinks.policy import Policy, kink_policy, make_policy, parse_policy


@dataclass
class Bifurcation:
    differs: bool
    kink_hits: int
    second_backward: bool
    diff_norms: dict[str, float] = field(default_factory=dict)  # parameter -> ||g_A - g_B||
    loss: float = float("nan")

    @property
    def differing(self) -> list[str]:
        return [k for k, v in self.diff_norms.items() if v > 0]

    @property
    def norm(self) -> float:
        return float(np.sqrt(sum(v * v for v in self.diff_norms.values())))


def _policy(p) -> Policy:
    if isinstance(p, Policy):
        return p
    if isinstance(p, dict):
        return make_policy("pytorch", **p)
    return parse_policy(p)


def tape_hits(loss) -> int:
    """Kink elements hit on the tape recorded under ``loss``."""
    return sum(t._node.prim.hits(t._node.res) for t in tape.toposort(loss)
               if t._node is not None and t._node.choice is not None)


def compare_on_tape(loss, params, policy_b, hits: int | None = None) -> Bifurcation:
    """Backward through a recorded ``loss`` with the choices made at forward time (policy A),
    then again with every kink node's choice replaced by ``policy_b``'s; compare.

    Leaves each parameter's ``.grad`` as a plain backward would have (policy A, accumulated onto
    what was there). With no kink hit on the tape, one ordinary backward runs.
    """
    pb = _policy(policy_b)
    named = list(params.items()) if isinstance(params, dict) else list(params)
    hits = tape_hits(loss) if hits is None else hits
    if hits == 0:
        loss.backward()
        return Bifurcation(False, 0, False, {n: 0.0 for n, _ in named}, float(loss.data))
    saved = [p.grad for _, p in named]
    for _, p in named:
        p.grad = None
    try:
        loss.backward(retain_graph=True)
        grads_a = [None if p.grad is None else p.grad.copy() for _, p in named]
        for t in tape.toposort(loss):
            node = t._node
            if node is not None and node.choice is not None:
                spec = node.prim.kink
                slope = node.res[1].get("slope") if isinstance(node.res, tuple) and len(
                    node.res) == 2 and isinstance(node.res[1], dict) else None
                node.choice = spec.resolve(pb[spec.name], slope)
        for _, p in named:
            p.grad = None
        with kink_policy(pb):
            loss.backward()
        norms = {}
        for (name, p), ga in zip(named, grads_a):
            gb = p.grad
            p.grad = ga  # leave policy A's gradient, as a plain backward would
            if ga is None and gb is None:
                norms[name] = 0.0
                continue
            a = np.zeros(p.shape) if ga is None else ga.astype(np.float64)
            b = np.zeros(p.shape) if gb is None else gb.astype(np.float64)
            norms[name] = float(np.linalg.norm(a - b))
        return Bifurcation(any(v > 0 for v in norms.values()), hits, True, norms,
                           float(loss.data))
    finally:
        for (_, p), prev in zip(named, saved):
            if prev is not None:
                p.grad = prev if p.grad is None else prev + p.grad


def bifurcation_test(loss_fn, params, policy_a="pytorch,relu=0", policy_b="pytorch,relu=1"
                     ) -> Bifurcation:
    """Compare the gradients of ``loss_fn()`` under two policies.

    ``params``: a dict name -> Tensor (e.g. ``dict(model.named_parameters())``) or a list of
    (name, Tensor). Policies: a :class:`Policy`, a CLI string (``"jax"``, ``"relu=1"``) or a dict
    of overrides on the pytorch preset. After the call, each parameter's ``.grad`` holds what a
    plain backward under policy A would have accumulated.
    """
    with kink_policy(_policy(policy_a)), census() as c:
        loss = loss_fn()
    return compare_on_tape(loss, params, policy_b, hits=c.total_hits())
