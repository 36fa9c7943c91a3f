"""The kink census: how often does a computation land exactly on a kink, where, and does it matter?

    with kp.census() as c:          # level "exact" (default) or "ambiguous"
        loss = model(x); loss.backward()
        c.step()                    # close a step (the trainer does this after each backward)
    print(c.table())

Per *site* — a non-smooth primitive named by the module path it runs in (``features.3:relu``) or,
outside ``kp.nn``, by primitive and call order within the step (``relu#0``) — it counts, per step
and in total:

``evaluated``   output elements computed (for ties: groups or windows);
``hits``        exact kink hits: an input exactly on a kink (relu at +0.0 or -0.0, clamp at a
                bound), tied inputs (maximum), a tied group or window (max / min, max-pool);
``plus_zero`` / ``minus_zero``  elementwise hits at a kink at 0, told apart by sign bit;
``tie_zero`` / ``tie_nonzero``  tie hits whose tied value is 0 / is not 0;
``effective``   hits where the chosen value changes the gradient: the incoming cotangent is
                non-zero there and the one-sided derivatives differ (known after backward);
``ambiguous``   (level ``"ambiguous"``) elementwise inputs within the rounding-error bound of the
                kink: for z = W x (+ b) produced by matmul / conv2d (and a bias add),
                ``|z - kink| <= gamma_n * (|W| |x| + |b|)`` with ``gamma_n = n u / (1 - n u)``,
                n the inner dimension (+1 with a bias add) and u the unit roundoff of the format
                the sum accumulates in (float32 for 16-bit and 8-bit storage). Inputs from other
                producers are not bounded and not counted. This costs an extra product per layer.

The census only reads: results are bitwise identical with and without it.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, fields

import numpy as np

from .. import tape
from ..precision import LOW_PRECISION, unit_roundoff
from ..textable import text_table

LEVELS = ("exact", "ambiguous")


@dataclass
class Counts:
    primitive: str = ""
    calls: int = 0
    evaluated: int = 0
    hits: int = 0
    plus_zero: int = 0
    minus_zero: int = 0
    tie_zero: int = 0
    tie_nonzero: int = 0
    effective: int = 0
    ambiguous: int = 0

    def add(self, other: Counts) -> None:
        for f in fields(self):
            if f.name != "primitive":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def rate(self) -> float:
        return self.hits / self.evaluated if self.evaluated else 0.0


COUNTERS = [f.name for f in fields(Counts) if f.name != "primitive"]


class Census:
    """Collects kink counts while active (see the module docstring)."""

    def __init__(self, level: str = "exact"):
        if level not in LEVELS:
            raise ValueError(f"unknown census level {level!r}; valid: {', '.join(LEVELS)}")
        self.level = level
        self.steps: list[dict[str, Counts]] = []
        self.current: dict[str, Counts] = defaultdict(Counts)
        self._order: dict[str, int] = defaultdict(int)
        self._pending: dict[int, tuple[str, np.ndarray]] = {}  # node id -> (site, kink mask)
        self._bounds: dict[int, tuple] = {}  # tensor id -> (tensor, bound, n) for "ambiguous"

    # -- hooks -------------------------------------------------------------------------------
    def _site(self, prim, site) -> str:
        if site is not None:
            return f"{site}:{prim.kink.name}"
        k = self._order[prim.kink.name]
        self._order[prim.kink.name] = k + 1
        return f"{prim.kink.name}#{k}"

    def on_kink(self, prim, site, res, ans, node):
        key = self._site(prim, site)
        c = self.current[key]
        c.primitive = prim.kink.name
        c.calls += 1
        c.evaluated += ans.size
        if prim.count is None:  # hits() would build the mask and drop it: build it once
            mask = prim.kink_mask(res)
            n = int(np.count_nonzero(mask))
        else:
            n, mask = prim.hits(res), None
        if n:
            mask = prim.kink_mask(res) if mask is None else mask
            c.hits += n
            # masks combined and counted, never gathered: x[mask] costs ~25x more
            if prim.kink.kind == "ties":
                at_zero = int(np.count_nonzero((np.reshape(ans, mask.shape) == 0) & mask))
                c.tie_zero += at_zero
                c.tie_nonzero += n - at_zero
            else:
                x = np.broadcast_to(res[0], mask.shape)
                zero = (x == 0) & mask
                minus = int(np.count_nonzero(zero & np.signbit(x)))
                c.minus_zero += minus
                c.plus_zero += int(np.count_nonzero(zero)) - minus
            if node is not None and _sides_differ(prim, res):
                self._pending[id(node)] = (key, mask)
        if (self.level == "ambiguous" and node is not None and len(res) == 2
                and isinstance(res[1], dict)):  # elementwise records: res = (x, params)
            c.ambiguous += self._ambiguous(prim, res, node)

    def on_kink_backward(self, node, g):
        entry = self._pending.pop(id(node), None)
        if entry is None:
            return
        key, mask = entry
        g = np.reshape(g, mask.shape) if g.size == mask.size else np.broadcast_to(g, mask.shape)
        self.current[key].effective += int(np.count_nonzero((g != 0) & mask))

    # -- ambiguous level: rounding-error bounds of matmul / conv2d outputs ---------------------
    def on_apply(self, prim, tensors, out, res):
        name = prim.name
        if name == "matmul":
            a, b = (np.abs(t._compute().astype(np.float64)) for t in tensors)
            self._bounds[id(out)] = (out, a @ b, tensors[0].shape[-1])
        elif name == "linear":
            x, w = (np.abs(t._compute().astype(np.float64)) for t in tensors[:2])
            bound = x @ w.T
            if len(tensors) > 2:
                bound = bound + np.abs(tensors[2]._compute().astype(np.float64))
            self._bounds[id(out)] = (out, bound, w.shape[1] + (len(tensors) > 2))
        elif name == "conv2d":
            from ..primitives.conv import conv_rows_to_nchw  # conv imports kinks: import here

            cols, w, geo = res
            bound = np.abs(w.reshape(w.shape[0], -1)).astype(np.float64) @ np.abs(cols)
            bound = conv_rows_to_nchw(bound, geo, contiguous=False)
            if len(tensors) > 2:
                bound = bound + np.abs(tensors[2]._compute().astype(np.float64))[None, :, None, None]
            self._bounds[id(out)] = (out, bound, w[0].size + (len(tensors) > 2))
        elif name in ("add", "sub"):
            known = [self._bounds.get(id(t)) for t in tensors]
            if any(k is not None and k[0] is t for k, t in zip(known, tensors)):
                bound, n = 0.0, 0
                for k, t in zip(known, tensors):
                    if k is not None and k[0] is t:
                        bound, n = bound + k[1], max(n, k[2])
                    else:
                        bound = bound + np.abs(t._compute().astype(np.float64))
                self._bounds[id(out)] = (out, bound, n + 1)

    def _ambiguous(self, prim, res, node) -> int:
        parent = node.parents[0]
        entry = None if parent is None else self._bounds.get(id(parent))
        if entry is None or entry[0] is not parent:
            return 0
        _, bound, n = entry
        dtype = parent.dtype
        u = unit_roundoff(np.float32 if dtype in LOW_PRECISION else dtype)
        gamma = n * u / (1 - n * u)
        x, p = res
        near = np.zeros(x.shape, bool)
        for loc in _locations(prim, p):
            near |= np.abs(x.astype(np.float64) - loc) <= gamma * bound
        return int(np.count_nonzero(near))

    # -- steps and results ---------------------------------------------------------------------
    def step(self) -> dict[str, Counts]:
        """Close the current step; returns its counts."""
        done = dict(self.current)
        self.steps.append(done)
        self.current = defaultdict(Counts)
        self._order.clear()
        self._pending.clear()
        self._bounds.clear()
        return done

    def totals(self) -> dict[str, Counts]:
        """Counts summed over every closed step and the open one."""
        out: dict[str, Counts] = {}
        for step in [*self.steps, self.current]:
            for key, c in step.items():
                if key not in out:
                    out[key] = Counts(primitive=c.primitive)
                out[key].add(c)
        return out

    def total_hits(self) -> int:
        return sum(c.hits for c in self.totals().values())

    def records(self) -> list[dict]:
        """One row per (step, site), for CSV or a database."""
        return [{"step": i, "site": key, **asdict(c)}
                for i, step in enumerate(self.steps) for key, c in step.items()]

    def to_json(self) -> dict:
        return {"level": self.level, "steps": len(self.steps),
                "totals": {k: asdict(c) for k, c in self.totals().items()}}

    def table(self) -> str:
        cols = ["site", "calls", "evaluated", "hits", "+0", "-0", "tie@0", "tie@!0", "effective"]
        if self.level == "ambiguous":
            cols.append("ambiguous")
        cols.append("hit rate")
        rows = []
        for key, c in self.totals().items():
            row = [key, c.calls, c.evaluated, c.hits, c.plus_zero, c.minus_zero, c.tie_zero,
                   c.tie_nonzero, c.effective]
            if self.level == "ambiguous":
                row.append(c.ambiguous)
            row.append(f"{c.rate:.3g}")
            rows.append([str(v) for v in row])
        return text_table(cols, rows, align="first-left")

    def __repr__(self):
        return f"Census(level={self.level!r}, steps={len(self.steps)}, hits={self.total_hits()})"

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def _sides_differ(prim, res) -> bool:
    if prim.kink.kind == "ties":
        return True
    p = res[1] if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict) else {}
    return any(left != right for left, right in prim.kink.one_sided(p.get("slope")))


def _locations(prim, p):
    from ..primitives.nonsmooth import _LOCATIONS

    return [loc for loc in _LOCATIONS[prim.kink.name](**p) if loc is not None]


@contextlib.contextmanager
def census(level: str = "exact"):
    """Count kink hits while active; yields the :class:`Census` (see the module docstring)."""
    c = Census(level)
    hooks = [(tape.Hooks.on_kink, c.on_kink), (tape.Hooks.on_kink_backward, c.on_kink_backward)]
    if level == "ambiguous":
        hooks.append((tape.Hooks.on_apply, c.on_apply))
    for table, fn in hooks:
        table.append(fn)
    try:
        yield c
    finally:
        for table, fn in hooks:
            table.remove(fn)
