"""Taylor-remainder audit: does f(θ + h·d) ≈ f(θ) + h·⟨∇f(θ), d⟩ hold, and where does it fail?

Backpropagation rests on the first-order property. For a smooth f the remainder

    r(h) = |f(θ + h·d) − f(θ) − h·⟨∇f(θ), d⟩|

shrinks like h² (slope 2 on a log–log plot). Along a segment that crosses a kink, f has a corner
and the remainder shrinks only like h (slope 1) once h is past the crossing. The audit measures
r(h) on a log grid of step sizes, for several unit directions d (random directions over all
parameters, and the normalised gradient), and counts the kink crossings on each segment:

    result = taylor_audit(model, x, y, precision="fp64,fp32")
    print(result.table())
    result.plot("audit.png")

Conventions, stated once:

* **Crossings** compare each non-smooth site's *piece signature* at θ and at θ + h·d (captured
  through :attr:`kinkprop.tape.Hooks.on_kink`): for elementwise kinks the sign of ``x - loc`` at
  each kink location (relu: the sign of the input, 0 counting as its own piece), for
  ``maximum`` / ``minimum`` the sign of ``a - b``, for max / min reductions and max-pooling the set
  of winning elements of each group or window. ``crossings`` counts output elements (groups,
  windows) whose piece differs between the two endpoints; ``sites_crossed`` the sites with any
  change; ``from_kink`` those of the crossings that sat exactly on a kink (or a tie) at θ, where
  the gradient used the policy's value: if that is not the one-sided derivative along d, the
  remainder is first order from the smallest h on. An element that leaves its piece and comes
  back within the segment is not seen: the count is a lower bound, exact whenever each
  pre-activation is monotone along the segment (a single layer, or small h).
* **Precision**: f and ∇f are both evaluated in the audited format (the model converted to it, the
  batch cast to it, float8 inside its emulation scope). The step actually taken is the rounded one,
  ``Δ = round(θ + h·d) − θ``, and the linear term is ``⟨∇f(θ), Δ⟩`` (both in float64): parameter
  rounding would otherwise show up as a spurious slope-1 remainder. ``step`` in each row is ‖Δ‖.
* **Rounding floor**: rows with ``r < floor_factor · eps · |f(θ)|`` (eps the format's machine
  epsilon) are flagged ``at_floor`` and left out of the slope fits, as are rows with r = 0.
* **Slopes**: least-squares fits of log r against log h, separately over the h whose segment
  crosses no kink (``slope_smooth``, about 2) and those that cross (``slope_crossing``, about 1
  just past a single crossing; once many kinks are crossed it drifts back towards 2, since a
  dense set of small corners averages into curvature). ``None`` with fewer than two points.
* **Batch-norm** models are audited in eval mode: normalisation uses the running statistics, so
  f is a fixed function of θ, the same at every one of the audit's evaluations (train mode would
  update the running statistics at each). The model passed in is not modified (the audit works
  on a copy).

:func:`audit_loss` audits any scalar function of a list of parameter tensors.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import tape
from ..precision import PRECISIONS, as_dtype, training_format
from ..textable import text_table

#: The default step sizes: 15 points from 1e-8 to 1e-1.
DEFAULT_HS = np.logspace(-8, -1, 15)

KINDS = ("random", "gradient", "given")


# -- piece signatures ------------------------------------------------------------------------


def _sign(a) -> np.ndarray:
    return np.sign(a).astype(np.int8)


def _elementwise_sig(prim, res):
    from ..primitives.nonsmooth import _LOCATIONS

    x, p = res
    locs = [loc for loc in _LOCATIONS[prim.kink.name](**p) if loc is not None]
    if not locs:
        return np.zeros((*x.shape, 0), np.int8)
    return np.stack([_sign(x - loc) for loc in locs], axis=-1)


def _pairwise_sig(res):
    a, b = res
    return _sign(np.broadcast_to(a - b, np.broadcast_shapes(a.shape, b.shape)))[..., None]


def _clamp_tensor_sig(res):
    x, lo, hi = res
    shape = np.broadcast_shapes(x.shape, lo.shape, hi.shape)
    return np.stack([np.broadcast_to(_sign(x - lo), shape), np.broadcast_to(_sign(x - hi), shape)],
                    axis=-1)


def _reduction_sig(res):
    x, ans_k, axis, _ = res
    winners = x == ans_k
    if axis is None:
        return winners.reshape(1, -1)
    return np.moveaxis(winners, axis, -1)


def _max_pool_sig(res):
    xp, best, _, geo = res
    return np.stack([xp[sl] == best for _, sl in geo.offsets()], axis=-1)


_SIGNATURES: dict[str, Callable] = {
    "maximum": lambda prim, res: _pairwise_sig(res),
    "minimum": lambda prim, res: _pairwise_sig(res),
    "clamp_tensor": lambda prim, res: _clamp_tensor_sig(res),
    "max": lambda prim, res: _reduction_sig(res),
    "min": lambda prim, res: _reduction_sig(res),
    "max_axis": lambda prim, res: _reduction_sig(res),
    "min_axis": lambda prim, res: _reduction_sig(res),
    "max_pool2d": lambda prim, res: _max_pool_sig(res),
}


def piece_signature(prim, res) -> np.ndarray:
    """The active piece of each output element of a non-smooth primitive, from its residuals.

    An array shaped ``(*elements, m)``: an element changed piece when any of its ``m`` entries
    changed (see the module docstring for what each kind compares).
    """
    rule = _SIGNATURES.get(prim.name)
    if rule is not None:
        return rule(prim, res)
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict):
        return _elementwise_sig(prim, res)
    raise NotImplementedError(f"taylor audit: no piece signature for primitive {prim.name!r}; "
                              "add one to kinkprop.diagnostics.taylor._SIGNATURES")


class _Pieces:
    """An ``on_kink`` hook: the piece signature of every non-smooth call, keyed by site."""

    def __init__(self):
        self.sigs: dict[str, np.ndarray] = {}
        self._calls: dict[str, int] = defaultdict(int)

    def on_kink(self, prim, site, res, ans, node):
        base = f"{site}:{prim.kink.name}" if site is not None else prim.kink.name
        k = self._calls[base]
        self._calls[base] = k + 1
        key = f"{base}#{k}" if (k or site is None) else base
        self.sigs[key] = piece_signature(prim, res)

    def __enter__(self):
        tape.Hooks.on_kink.append(self.on_kink)
        return self

    def __exit__(self, *exc):
        tape.Hooks.on_kink.remove(self.on_kink)


def count_crossings(before: dict[str, np.ndarray], after: dict[str, np.ndarray]
                    ) -> dict[str, tuple[int, int]]:
    """Per site, ``(changed, from_kink)``: the elements whose piece differs between two signature
    sets, and how many of those sat exactly on a kink in ``before`` (an input at a kink location,
    or a tie: a group or window with several winners)."""
    if before.keys() != after.keys():
        raise RuntimeError("taylor audit: the perturbed evaluation ran different non-smooth sites "
                           f"({sorted(before)} vs {sorted(after)}); f must be a fixed program")
    out = {}
    for key, a in before.items():
        b = after[key]
        if a.shape != b.shape:
            raise RuntimeError(f"taylor audit: site {key} changed shape {a.shape} -> {b.shape}")
        changed = (a != b).any(axis=-1)
        on_kink = a.sum(axis=-1) > 1 if a.dtype == bool else (a == 0).any(axis=-1)
        out[key] = (int(np.count_nonzero(changed)), int(np.count_nonzero(changed & on_kink)))
    return out


# -- the result --------------------------------------------------------------------------------


@dataclass
class AuditResult:
    """Rows per (precision, direction, h), fitted slopes per (precision, direction), and facts.

    ``rows``: dicts with ``precision``, ``direction`` (index), ``kind`` (``"random"``,
    ``"gradient"`` or ``"given"``), ``h``, ``step`` (‖Δ‖, the step actually taken), ``f0``,
    ``f``, ``linear`` (⟨∇f, Δ⟩), ``remainder``, ``floor``, ``at_floor``, ``crossings``
    (elements that changed piece), ``sites_crossed``, ``from_kink`` (of the crossings, those that
    sat exactly on a kink or tie at θ: the policy's value, not a one-sided derivative, entered the
    gradient there) and ``crossed`` (``site=count;...``).

    ``slopes``: dicts with ``precision``, ``direction``, ``kind``, ``grad_dot`` (⟨∇f, d⟩),
    ``slope_smooth`` / ``n_smooth`` (fit over rows without crossings), ``slope_crossing`` /
    ``n_crossing`` (over rows with crossings), ``first_crossing_h`` (smallest h that crossed)
    ``max_crossings`` and ``max_from_kink``. Slopes are ``None`` with fewer than two points
    above the floor.
    """

    rows: list[dict] = field(default_factory=list)
    slopes: list[dict] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def precisions(self) -> list[str]:
        return list(dict.fromkeys(r["precision"] for r in self.slopes))

    def summary(self) -> list[dict]:
        """Per precision: the median slopes over directions and how many directions had a fit."""
        out = []
        for prec in self.precisions:
            s = [r for r in self.slopes if r["precision"] == prec]
            smooth = [r["slope_smooth"] for r in s if r["slope_smooth"] is not None]
            cross = [r["slope_crossing"] for r in s if r["slope_crossing"] is not None]
            floor = next(r["floor"] for r in self.rows if r["precision"] == prec)
            out.append({"precision": prec, "directions": len(s),
                        "median_slope_smooth": float(np.median(smooth)) if smooth else None,
                        "fitted_smooth": len(smooth),
                        "median_slope_crossing": float(np.median(cross)) if cross else None,
                        "fitted_crossing": len(cross), "floor": floor})
        return out

    def to_json(self) -> dict:
        return {"meta": self.meta, "summary": self.summary(), "slopes": self.slopes,
                "rows": self.rows}

    def table(self, detail: bool = False) -> str:
        """The slope table per (precision, direction) and a summary line per precision; with
        ``detail``, also the remainder per h and direction (``*`` marks a segment that crossed a
        kink, ``~`` a remainder at the rounding floor)."""
        head = ["precision", "dir", "kind", "|<g,d>|", "slope no-cross", "slope cross",
                "first h crossed", "crossings @hmax", "sites @hmax", "from kink"]
        body = []
        for s in self.slopes:
            last = [r for r in self.rows if r["precision"] == s["precision"]
                    and r["direction"] == s["direction"]][-1]
            body.append([s["precision"], s["direction"], s["kind"], f"{abs(s['grad_dot']):.3g}",
                         _fmt_slope(s["slope_smooth"], s["n_smooth"]),
                         _fmt_slope(s["slope_crossing"], s["n_crossing"]),
                         "-" if s["first_crossing_h"] is None else f"{s['first_crossing_h']:.2g}",
                         last["crossings"], last["sites_crossed"], s["max_from_kink"]])
        lines = [_grid(head, body), ""]
        for m in self.summary():
            lines.append(
                f"{m['precision']}: median slope {_fmt(m['median_slope_smooth'])} without "
                f"crossings ({m['fitted_smooth']}/{m['directions']} directions fitted), "
                f"{_fmt(m['median_slope_crossing'])} with crossings "
                f"({m['fitted_crossing']}/{m['directions']}); rounding floor {m['floor']:.2g}")
        if detail:
            for prec in self.precisions:
                rows = [r for r in self.rows if r["precision"] == prec]
                dirs = list(dict.fromkeys((r["direction"], r["kind"]) for r in rows))
                hs = list(dict.fromkeys(r["h"] for r in rows))
                cell = {(r["direction"], r["h"]): r for r in rows}
                head2 = ["h"] + [f"{prec} d{d} {k[:4]}" for d, k in dirs]
                body2 = []
                for h in hs:
                    line = [f"{h:.2g}"]
                    for d, _ in dirs:
                        r = cell[(d, h)]
                        mark = ("~" if r["at_floor"] else "") + (
                            f"*{r['crossings']}" if r["crossings"] else "")
                        line.append(f"{r['remainder']:.3g}{mark}")
                    body2.append(line)
                lines += ["", _grid(head2, body2)]
            lines.append("(* n: n elements changed piece; ~: at the rounding floor)")
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Log–log plot of the remainder against h, one panel per precision: one line per
        direction, filled markers where the segment crossed a kink, hollow where it did not,
        grey at the rounding floor; reference slopes 1 and 2 and the floor dashed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        precs = self.precisions
        fig, axes = plt.subplots(1, len(precs), figsize=(5.2 * len(precs), 4.4), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, prec in zip(axes[0], precs):
            rows = [r for r in self.rows if r["precision"] == prec and r["remainder"] > 0]
            dirs = list(dict.fromkeys((r["direction"], r["kind"]) for r in rows))
            for i, (d, kind) in enumerate(dirs):
                c = colors[i % len(colors)]
                rs = [r for r in rows if r["direction"] == d]
                ax.plot([r["h"] for r in rs], [r["remainder"] for r in rs], color=c, lw=1,
                        alpha=0.7, label=f"d{d} ({kind})")
                for r in rs:
                    face = "0.6" if r["at_floor"] else (c if r["crossings"] else "none")
                    ax.plot(r["h"], r["remainder"], marker="o" if r["crossings"] else "s", ms=5,
                            mfc=face, mec="0.6" if r["at_floor"] else c, ls="none")
            allr = [r for r in self.rows if r["precision"] == prec]
            floor = allr[0]["floor"] if allr else None
            if floor:
                ax.axhline(floor, color="0.5", ls="--", lw=1, label="rounding floor")
            hs = np.array(sorted({r["h"] for r in allr}))
            top = [r["remainder"] for r in rows if r["h"] == hs[-1]]
            lo = min((r["remainder"] for r in rows), default=1e-300)
            hi = max((r["remainder"] for r in rows), default=1.0)
            if top:  # reference slopes through the median remainder at the largest h
                r0 = float(np.median(top))
                for k, ls in ((1, ":"), (2, "-.")):
                    ax.plot(hs, r0 * (hs / hs[-1]) ** k, color="k", ls=ls, lw=1,
                            label=f"slope {k}")
            ax.set_ylim(max(lo / 3, 1e-300), max(hi, floor or 0) * 3)
            ax.plot([], [], "o", color="k", label="kink crossed")
            ax.plot([], [], "s", mfc="none", color="k", label="no crossing")
            ax.plot([], [], "s", color="0.6", label="at the rounding floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("step size h")
            ax.set_ylabel("|f(θ+hd) − f(θ) − ⟨∇f, Δ⟩|")
            ax.set_title(f"{prec}: Taylor remainder")
            ax.legend(fontsize=7, loc="upper left")
        title = self.meta.get("title")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_slope(v, n) -> str:
    return "-" if v is None else f"{v:.2f} ({n})"


def _grid(head, rows) -> str:
    return text_table(head, rows)


def fit_slope(hs, rs) -> float | None:
    """Least-squares slope of log r against log h; ``None`` with fewer than two points."""
    hs, rs = np.asarray(hs, float), np.asarray(rs, float)
    if len(hs) < 2 or len(set(hs.tolist())) < 2:
        return None
    return float(np.polyfit(np.log(hs), np.log(rs), 1)[0])


# -- the audit ---------------------------------------------------------------------------------


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def _eps(precision, params) -> float:
    dtype = as_dtype(precision) if precision is not None else params[0].dtype
    import ml_dtypes

    return float(ml_dtypes.finfo(dtype).eps)


def _value(loss) -> float:
    return float(np.asarray(loss.data, np.float64))


def _unit(d: np.ndarray, what: str) -> np.ndarray:
    n = float(np.linalg.norm(d))
    if not (n > 0 and math.isfinite(n)):
        raise ValueError(f"taylor audit: {what} has norm {n}; cannot normalise it")
    return d / n


def random_directions(sizes: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` unit directions in R^sizes, Gaussian then normalised, from ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return [_unit(rng.standard_normal(sizes), "a random direction") for _ in range(n)]


def audit_loss(loss_fn: Callable, params: Sequence, *, directions=None, n_random: int = 4,
               hs=DEFAULT_HS, seed: int = 0, gradient: bool = True, precision: str | None = None,
               floor_factor: float = 100.0) -> AuditResult:
    """Taylor-remainder audit of ``loss_fn()``, a scalar tensor computed from ``params``.

    ``params``: the tensors (requiring grad) that θ is made of; their ``.data`` is replaced during
    the audit and restored afterwards, and their ``.grad`` is left as it was. ``directions``: flat
    arrays over all parameters (concatenated in order), normalised to unit length and labelled
    ``"given"``; when ``None``, ``n_random`` Gaussian directions from ``seed``. ``gradient`` adds
    the normalised gradient direction. f and ∇f are evaluated in the parameters' own format; set
    any precision scope (float8 emulation) around the call and name it in ``precision`` (which
    also sets the rounding floor's eps). See the module docstring for the conventions.
    """
    params = list(params)
    if not params:
        raise ValueError("taylor audit: no parameters")
    hs = np.asarray(hs, np.float64).ravel()
    if hs.size == 0 or not np.all(hs > 0) or not np.all(np.isfinite(hs)):
        raise ValueError(f"taylor audit: step sizes must be positive and finite, got {hs}")
    size = sum(p.data.size for p in params)
    if directions is None:
        dirs = [("random", d) for d in random_directions(size, n_random, seed)]
    else:
        dirs = []
        for i, d in enumerate(directions):
            d = _flat(d) if isinstance(d, (list, tuple)) else np.asarray(d, np.float64).ravel()
            if d.size != size:
                raise ValueError(f"taylor audit: direction {i} has {d.size} entries, the "
                                 f"parameters {size}")
            dirs.append(("given", _unit(d, f"direction {i}")))
    label = precision if precision is not None else str(params[0].dtype)
    theta = [p.data for p in params]
    theta64 = [t.astype(np.float64) for t in theta]
    grads_before = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        with tape.enable_grad(), _Pieces() as pieces:
            loss = loss_fn()
            f0 = _value(loss)
            loss.backward()
        base = pieces.sigs
        if not math.isfinite(f0):
            raise ValueError(f"taylor audit: f(θ) = {f0} in {label}; nothing to audit")
        g = _flat([np.zeros(p.shape) if p.grad is None else p.grad for p in params])
        g_norm = float(np.linalg.norm(g))
        result = AuditResult(meta={"f0": f0, "grad_norm": g_norm, "parameters": size,
                                   "hs": hs.tolist()})
        if gradient and g_norm > 0 and math.isfinite(g_norm):
            dirs.append(("gradient", g / g_norm))
        elif gradient:  # a dead network: report it instead of failing the whole audit
            result.meta["skipped"] = f"gradient direction ({label}: gradient norm {g_norm})"
        floor = floor_factor * _eps(precision, params) * abs(f0)
        offsets = np.cumsum([0] + [p.data.size for p in params])
        for index, (kind, d) in enumerate(dirs):
            rows = []
            for h in hs:
                step = []
                for p, t, t64, a, b in zip(params, theta, theta64, offsets[:-1], offsets[1:]):
                    p.data = (t64 + h * d[a:b].reshape(t.shape)).astype(t.dtype)
                    step.append(p.data.astype(np.float64) - t64)
                with tape.no_grad(), _Pieces() as pieces:
                    f = _value(loss_fn())
                delta = _flat(step)
                linear = float(g @ delta)
                r = abs(f - f0 - linear)
                per_site = count_crossings(base, pieces.sigs)
                crossed = {k: v for k, (v, _) in per_site.items() if v}
                rows.append({"precision": label, "direction": index, "kind": kind,
                             "h": float(h), "step": float(np.linalg.norm(delta)), "f0": f0,
                             "f": f, "linear": linear, "remainder": r, "floor": floor,
                             "at_floor": bool(r < floor or r == 0),
                             "crossings": sum(crossed.values()), "sites_crossed": len(crossed),
                             "from_kink": sum(k for _, k in per_site.values()),
                             "crossed": ";".join(f"{k}={v}" for k, v in crossed.items())})
            for p, t in zip(params, theta):
                p.data = t
            result.rows += rows
            result.slopes.append(_slopes(label, index, kind, float(g @ d), rows))
    finally:
        for p, t, gb in zip(params, theta, grads_before):
            p.data = t
            p.grad = gb
    return result


def _slopes(label, index, kind, grad_dot, rows) -> dict:
    ok = [r for r in rows if not r["at_floor"] and math.isfinite(r["remainder"])]
    smooth = [r for r in ok if r["crossings"] == 0]
    cross = [r for r in ok if r["crossings"] > 0]
    crossed_hs = [r["h"] for r in rows if r["crossings"] > 0]
    return {"precision": label, "direction": index, "kind": kind, "grad_dot": grad_dot,
            "slope_smooth": fit_slope([r["h"] for r in smooth], [r["remainder"] for r in smooth]),
            "n_smooth": len(smooth),
            "slope_crossing": fit_slope([r["h"] for r in cross], [r["remainder"] for r in cross]),
            "n_crossing": len(cross),
            "first_crossing_h": min(crossed_hs) if crossed_hs else None,
            "max_crossings": max((r["crossings"] for r in rows), default=0),
            "max_from_kink": max((r["from_kink"] for r in rows), default=0)}


def parse_precisions(precision) -> list[str]:
    """``"fp64,fp32"`` or a sequence of names -> a list of known precision names."""
    names = ([p.strip() for p in precision.split(",") if p.strip()]
             if isinstance(precision, str) else [str(p) for p in precision])
    bad = [p for p in names if p not in PRECISIONS]
    if bad or not names:
        raise ValueError(f"unknown precision(s) {bad or names}; valid: {', '.join(PRECISIONS)}")
    return names


def taylor_audit(model, x, y, precision="fp64", n_random: int = 4, hs=DEFAULT_HS, seed: int = 0,
                 *, directions=None, loss: Callable | None = None, kink_policy=None,
                 floor_factor: float = 100.0) -> AuditResult:
    """Taylor-remainder audit of ``loss(model(x), y)`` (cross-entropy by default) at the model's
    current parameters θ.

    ``precision``: a name (``"fp64"``) or several (``"fp64,fp32,bf16"`` or a list); per precision
    the model is copied and converted to that format (float8 in its emulation scope), ``x`` cast
    to it, and f and ∇f evaluated there. The copy runs in eval mode (batch-norm uses its running
    statistics, so f is a fixed function of θ); ``model`` itself is not modified.

    Directions: ``n_random`` Gaussian unit directions over all parameters, drawn from
    ``default_rng(seed)`` once in float64 and shared by every precision, plus the normalised
    gradient of each precision (or ``directions``: flat arrays, labelled ``"given"``). ``hs``: the
    step sizes (default 15 points on a log grid from 1e-8 to 1e-1). ``kink_policy``: a policy (or
    preset / CLI string) for the gradient at exact kink hits; ``None`` keeps the one in force.

    Returns an :class:`AuditResult`: ``.rows`` per (precision, direction, h), ``.slopes`` per
    (precision, direction), ``.table()``, ``.plot(path)``. See the module docstring.
    """
    from ..kinks.policy import Policy, parse_policy
    from ..kinks.policy import kink_policy as policy_scope
    from ..primitives import cross_entropy
    from ..tensor import Tensor

    names = parse_precisions(precision)
    if isinstance(kink_policy, str):
        kink_policy = parse_policy(kink_policy)
    elif kink_policy is not None and not isinstance(kink_policy, Policy):
        raise TypeError(f"kink_policy must be a Policy or a string, got {kink_policy!r}")
    loss = loss or cross_entropy
    size = sum(p.data.size for p in model.parameters())
    given = directions
    if given is None:
        given = random_directions(size, n_random, seed)
    x = x.data if isinstance(x, Tensor) else np.asarray(x)
    result = AuditResult(meta={"precisions": names, "n_random": n_random, "seed": seed,
                               "hs": np.asarray(hs, float).ravel().tolist(), "parameters": size,
                               "batch": int(len(x)), "floor_factor": floor_factor,
                               "mode": "eval", "f0": {}, "grad_norm": {}})
    for name in names:
        dtype, scope = training_format(name)
        m = copy.deepcopy(model).to(dtype).eval()
        xt = Tensor(x.astype(dtype))
        with scope, policy_scope(kink_policy) as policy:
            r = audit_loss(lambda m=m, xt=xt: loss(m(xt), y), m.parameters(),
                           directions=given, hs=hs, precision=name, floor_factor=floor_factor)
        result.meta["kink_policy"] = policy.label
        if directions is None:  # the shared random directions, not user-given ones
            for row in [*r.rows, *r.slopes]:
                if row["kind"] == "given":
                    row["kind"] = "random"
        result.rows += r.rows
        result.slopes += r.slopes
        result.meta["f0"][name] = r.meta["f0"]
        result.meta["grad_norm"][name] = r.meta["grad_norm"]
        if "skipped" in r.meta:
            result.meta.setdefault("skipped", []).append(r.meta["skipped"])
    return result

