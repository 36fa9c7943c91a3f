"""Gradient checks: finite differences against both modes, and the adjoint identity.

Conventions shared by :func:`check_grad` and :func:`check_adjoint`:

* ``f`` is a function of tensors returning one :class:`~kinkprop.Tensor`, as for ``kp.grad``.
  ``args`` are its arguments (NumPy arrays, numbers or tensors). The differentiated ones
  (``argnums``; by default every floating-point argument) are cast to float64; the others are passed
  as constant tensors, as ``kp.grad`` does (integer labels, masks). ``f`` must return float64 then:
  a check in a lower precision would only measure its rounding.
* Everything is in *inner-product form*, so no Jacobian is ever built. Per differentiated argument
  ``i`` and per direction, ``u`` is a standard normal array shaped like argument ``i`` (the other
  arguments held fixed) and ``v`` a standard normal array shaped like the output (``v = 1`` for a
  scalar output). The quantities compared are

  - numeric:  ``<v, (f(x + eps u) - f(x - eps u)) / (2 eps)>`` (central differences),
  - ``"fwd"``: ``<v, J u>`` from ``kp.jvp``,
  - ``"rev"``: ``<J^T v, u>`` from ``kp.vjp``.

* A comparison passes when ``|a - b| <= atol + rtol * max(|a|, |b|) + noise``, where ``noise`` is
  the rounding floor of the finite difference, ``16 * u64 * sum(|v| (|f(x+eps u)| + |f(x-eps u)|))
  / (2 eps)`` with ``u64`` the float64 unit roundoff (0 in :func:`check_adjoint`, which takes no
  difference quotient).
* The kink policy in force when the check runs is the one both modes record. Finite differences
  are only meaningful where ``f`` is differentiable on ``[x - eps u, x + eps u]``: keep inputs at
  least a few ``eps`` from every kink. :func:`check_adjoint` has no such limit: JVP and VJP share
  the kink choice recorded at forward time, so ``<v, J u> = <J^T v, u>`` must hold *at* kinks too.
  (Under the ``"directional"`` policy each ``kp.jvp`` / ``kp.vjp`` call resolves its own direction;
  fix them with ``kp.directional_options(directions=...)`` before checking the adjoint there.)

A mismatch raises :class:`GradcheckError` listing every failed comparison (argument, direction,
mode, both values); success returns a :class:`GradcheckReport`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import autodiff, tape
from ..precision import is_float
from ..tensor import Tensor

#: float64 unit roundoff.
_U64 = float(np.finfo(np.float64).eps) / 2
#: Safety factor on the finite-difference rounding floor (a few ulps per evaluation of f).
_NOISE_ULPS = 16.0


class GradcheckError(AssertionError):
    """A gradient or adjoint check failed; ``failures`` holds the failed :class:`Comparison` s."""

    def __init__(self, message: str, failures: list[Comparison]):
        super().__init__(message)
        self.failures = failures


@dataclass(frozen=True)
class Comparison:
    """One comparison: ``expected`` (numeric, or ``<v, J u>`` for the adjoint) against ``got``."""

    argnum: int
    direction: int
    mode: str  # "rev" | "fwd" | "adjoint"
    expected: float
    got: float
    tol: float

    @property
    def error(self) -> float:
        return abs(self.expected - self.got)

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)  # NaN fails

    def describe(self, shape: tuple, expected_name: str, got_name: str) -> str:
        return (f"argument {self.argnum} (shape {shape}), direction {self.direction}, "
                f"{self.mode}: {expected_name} = {self.expected:.17g}, {got_name} = "
                f"{self.got:.17g}, |difference| = {self.error:.3g} > tolerance {self.tol:.3g}")


@dataclass
class GradcheckReport:
    """What a passing check compared: one :class:`Comparison` per argument, direction and mode."""

    check: str  # "check_grad" | "check_adjoint"
    argnums: tuple[int, ...]
    modes: tuple[str, ...]
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((c.error for c in self.comparisons), default=0.0)

    @property
    def worst_ratio(self) -> float:
        """Largest ``error / tolerance`` (below 1 on success)."""
        return max((c.error / c.tol if c.tol > 0 else (0.0 if c.error == 0 else np.inf)
                    for c in self.comparisons), default=0.0)

    def __str__(self):
        return (f"{self.check}: {len(self.comparisons)} comparisons over arguments "
                f"{list(self.argnums)} ({', '.join(self.modes)}); max |error| "
                f"{self.max_error:.3g}, worst error/tolerance {self.worst_ratio:.3g}")


# -- shared plumbing ---------------------------------------------------------------------------


def _as_array(a) -> np.ndarray:
    return a.data if isinstance(a, Tensor) else np.asarray(a)


def prepare_args(args, argnums, name: str = "check") -> tuple[list[np.ndarray], tuple[int, ...]]:
    """float64 copies of the differentiated arguments (``argnums``; None: every float argument),
    the others as arrays; errors name the caller."""
    arrays = [_as_array(a) for a in args]
    n = len(arrays)
    if argnums is None:
        nums = tuple(i for i, a in enumerate(arrays) if is_float(a.dtype))
        if not nums:
            raise ValueError(f"{name}: no floating-point argument to differentiate; pass argnums")
    else:
        nums = (argnums,) if isinstance(argnums, (int, np.integer)) else tuple(argnums)
        for i in nums:
            if not -n <= i < n:
                raise ValueError(f"{name}: argnums {argnums} out of range for {n} arguments")
        nums = tuple(sorted({int(i) % n for i in nums}))
    for i in nums:
        if arrays[i].dtype.kind not in "fiub":
            raise TypeError(f"{name}: argument {i} has dtype {arrays[i].dtype}, not a real number")
        arrays[i] = arrays[i].astype(np.float64)
    return arrays, nums


def _restrict(f: Callable, arrays: list[np.ndarray], nums: tuple[int, ...]) -> Callable:
    """``f`` as a function of the differentiated arguments only, the others constant tensors."""
    consts = {i: Tensor._wrap(a) for i, a in enumerate(arrays) if i not in nums}

    def g(*xs):
        it = iter(xs)
        return f(*(consts[i] if i in consts else next(it) for i in range(len(arrays))))

    return g


def _float64_output(out: np.ndarray, who: str) -> np.ndarray:
    if out.dtype != np.float64:
        raise TypeError(f"{who}: f returned {out.dtype} on float64 inputs; the checks run in "
                        "float64 (build constants with the inputs' dtype, e.g. kp.as_tensor(c, "
                        "like=x))")
    return out


def _directions(rng, primals, out_shape, n_directions):
    """Per direction: one u per differentiated argument, and one cotangent v for the output."""
    for k in range(n_directions):
        us = [rng.standard_normal(p.shape) for p in primals]
        v = np.ones(out_shape) if out_shape == () else rng.standard_normal(out_shape)
        yield k, us, v


def _vdot(a, b) -> float:
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


def _raise(check, failures, arrays, names):
    lines = [c.describe(arrays[c.argnum].shape, *names[c.mode]) for c in failures]
    raise GradcheckError(f"{check}: {len(failures)} comparison(s) failed:\n  " + "\n  ".join(lines),
                         failures)


# -- checks ------------------------------------------------------------------------------------


def check_grad(f: Callable, args: Sequence, argnums: int | Sequence[int] | None = None,
               eps: float = 1e-6, rtol: float = 1e-6, atol: float = 1e-8,
               n_directions: int = 3, seed: int = 0,
               modes: Sequence[str] = ("rev", "fwd")) -> GradcheckReport:
    """Compare central differences of ``f`` with its JVP (``"fwd"``) and VJP (``"rev"``).

    For each differentiated argument and each of ``n_directions`` seeded random directions ``u``
    (and cotangents ``v``), checks ``<v, (f(x + eps u) - f(x - eps u)) / (2 eps)>`` against
    ``<v, J u>`` (``kp.jvp``) and ``<J^T v, u>`` (``kp.vjp``), in float64. Valid only where ``f`` is
    smooth within ``eps * |u|`` of the inputs (see the module docstring for the tolerance).

    Returns a :class:`GradcheckReport`; raises :class:`GradcheckError` naming the argument,
    direction, mode and both values of every failed comparison.
    """
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes or any(m not in ("rev", "fwd") for m in modes):
        raise ValueError(f"check_grad: modes must be a non-empty subset of ('rev', 'fwd'), "
                         f"got {modes}")
    if not eps > 0:
        raise ValueError(f"check_grad: eps must be positive, got {eps}")
    arrays, nums = prepare_args(args, argnums)
    g = _restrict(f, arrays, nums)
    primals = [arrays[i] for i in nums]

    def value(xs) -> np.ndarray:
        with tape.no_grad():
            out = g(*(Tensor(x) for x in xs))
        if not isinstance(out, Tensor):
            raise TypeError(f"check_grad: f must return a kp.Tensor, got {type(out).__name__}")
        return _float64_output(out.data, "check_grad")

    out, vjp_fn = autodiff.vjp(g, *primals) if "rev" in modes else (value(primals), None)
    _float64_output(out, "check_grad")
    rng = np.random.default_rng(seed)
    report = GradcheckReport("check_grad", nums, modes)
    for k, us, v in _directions(rng, primals, out.shape, n_directions):
        cts = vjp_fn(v) if vjp_fn is not None else None
        for j, (i, u) in enumerate(zip(nums, us)):
            # np.asarray: x + eps * u is a NumPy scalar for 0-d x, which kp.Tensor would take
            # for a Python float and store as float32
            plus = [np.asarray(x + eps * u) if m == j else x for m, x in enumerate(primals)]
            minus = [np.asarray(x - eps * u) if m == j else x for m, x in enumerate(primals)]
            f_p, f_m = value(plus), value(minus)
            numeric = _vdot(v, f_p - f_m) / (2 * eps)
            noise = _NOISE_ULPS * _U64 * _vdot(np.abs(v), np.abs(f_p) + np.abs(f_m)) / (2 * eps)
            for mode in modes:
                if mode == "rev":
                    analytic = _vdot(cts[j], u)
                else:
                    tangents = [u if m == j else np.zeros_like(x) for m, x in enumerate(primals)]
                    analytic = _vdot(v, autodiff.jvp(g, primals, tangents)[1])
                tol = atol + rtol * max(abs(numeric), abs(analytic)) + noise
                report.comparisons.append(Comparison(i, k, mode, numeric, analytic, tol))
    failures = [c for c in report.comparisons if not c.ok]
    if failures:
        _raise("check_grad", failures, arrays,
               {"rev": ("numeric <v, dF>", "reverse <J^T v, u>"),
                "fwd": ("numeric <v, dF>", "forward <v, J u>")})
    return report


def check_adjoint(f: Callable, args: Sequence, argnums: int | Sequence[int] | None = None,
                  rtol: float = 1e-10, atol: float = 1e-12, n_directions: int = 3,
                  seed: int = 0) -> GradcheckReport:
    """Check the adjoint identity ``<v, J u> = <J^T v, u>`` between ``kp.jvp`` and ``kp.vjp``.

    No finite differences: the two sides differ only by rounding, and the identity holds *at* kinks
    as well, since both modes apply the kink choice recorded at forward time (a VJP and a JVP that
    disagree at a kink fail here). ``u``, ``v``, ``argnums`` and the tolerance are as in
    :func:`check_grad`, with ``noise = 0`` and ``rtol`` relative to ``max(sum |v * J u|,
    sum |J^T v * u|)``, which bounds the rounding of both inner products.

    Returns a :class:`GradcheckReport`; raises :class:`GradcheckError` on a mismatch.
    """
    arrays, nums = prepare_args(args, argnums)
    g = _restrict(f, arrays, nums)
    primals = [arrays[i] for i in nums]
    out, vjp_fn = autodiff.vjp(g, *primals)
    _float64_output(out, "check_adjoint")
    rng = np.random.default_rng(seed)
    report = GradcheckReport("check_adjoint", nums, ("adjoint",))
    for k, us, v in _directions(rng, primals, out.shape, n_directions):
        cts = vjp_fn(v)
        for j, (i, u) in enumerate(zip(nums, us)):
            tangents = [u if m == j else np.zeros_like(x) for m, x in enumerate(primals)]
            jv = autodiff.jvp(g, primals, tangents)[1]
            fwd, rev = _vdot(v, jv), _vdot(cts[j], u)
            scale = max(float(np.sum(np.abs(v * jv))), float(np.sum(np.abs(cts[j] * u))))
            report.comparisons.append(Comparison(i, k, "adjoint", fwd, rev, atol + rtol * scale))
    failures = [c for c in report.comparisons if not c.ok]
    if failures:
        _raise("check_adjoint", failures, arrays,
               {"adjoint": ("forward <v, J u>", "reverse <J^T v, u>")})
    return report
