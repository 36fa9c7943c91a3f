"""The gradient checker is itself tested: it passes correct rules and rejects wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

import kinkprop as kp
from kinkprop.diagnostics import GradcheckError, GradcheckReport, check_adjoint, check_grad
from kinkprop.primitives.core import PRIMITIVES, apply, register, unbroadcast
from kinkprop.tensor import as_tensor, lift_pair

_R = np.random.default_rng(1234)  # drawn at import only: the parametrized inputs


@pytest.fixture
def rng():
    """A fresh seeded generator per test (independent of test order and xdist workers)."""
    return np.random.default_rng(5678)


@pytest.fixture
def throwaway():
    """Register throwaway primitives under unique names; remove them from PRIMITIVES afterwards."""
    names = []

    def make(forward, vjp, jvp):
        name = f"_gradcheck_test_{len(names)}_{id(names):x}"
        assert name not in PRIMITIVES
        names.append(name)
        prim = register(name, forward, vjp, jvp)
        return lambda *xs: apply(prim, tuple(as_tensor(x) for x in xs))

    yield make
    for name in names:
        PRIMITIVES.pop(name, None)


def _sin_forward(x):
    return np.sin(x), x


def _sin_vjp(g, x, needs, choice):
    return (g * np.cos(x),)


def _sin_jvp(ts, x, choice):
    return ts[0] * np.cos(x)


# -- correct functions pass --------------------------------------------------------------------


@pytest.mark.parametrize("f, args", [
    (lambda a, b: kp.tanh(kp.matmul(a, b)), [_R.standard_normal((3, 4)),
                                             _R.standard_normal((4, 2))]),
    (lambda x: kp.sum(kp.exp(x) * x), [_R.standard_normal((2, 3))]),
    (lambda x, y: kp.log_softmax(x + y, axis=0), [_R.standard_normal((3, 2)),
                                                   _R.standard_normal((2,))]),
], ids=["tanh_matmul", "scalar_output", "broadcast"])
def test_passes_on_correct_functions(f, args):
    report = check_grad(f, args)
    assert isinstance(report, GradcheckReport)
    assert report.argnums == tuple(range(len(args)))
    assert len(report.comparisons) == len(args) * 3 * 2  # arguments x directions x modes
    assert report.worst_ratio < 1
    assert {c.mode for c in report.comparisons} == {"rev", "fwd"}
    adj = check_adjoint(f, args)
    assert len(adj.comparisons) == len(args) * 3
    assert "comparisons" in str(report)


def test_throwaway_correct_primitive_passes(throwaway, rng):
    sin = throwaway(_sin_forward, _sin_vjp, _sin_jvp)
    x = rng.standard_normal((4, 3))
    check_grad(sin, [x])
    check_adjoint(sin, [x])


def test_integer_arguments_are_constants_by_default(rng):
    logits = rng.standard_normal((4, 3))
    labels = np.array([0, 2, 1, 2])
    report = check_grad(kp.cross_entropy, [logits, labels])
    assert report.argnums == (0,)


def test_argnums_selects_and_validates(rng):
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    assert check_grad(kp.mul, [a, b], argnums=1).argnums == (1,)
    assert check_grad(kp.mul, [a, b], argnums=(-1, 0)).argnums == (0, 1)
    with pytest.raises(ValueError, match="out of range"):
        check_grad(kp.mul, [a, b], argnums=2)
    with pytest.raises(ValueError, match="no floating-point argument"):
        check_grad(lambda i: kp.tensor(np.zeros(2)), [np.arange(2)])


def test_modes_validated():
    with pytest.raises(ValueError, match="modes"):
        check_grad(kp.exp, [np.ones(2)], modes=("backward",))
    assert {c.mode for c in check_grad(kp.exp, [np.ones(2)], modes=("fwd",)).comparisons} == {
        "fwd"}


def test_zero_dimensional_arguments_stay_float64():
    # x + eps * u is a NumPy scalar for 0-d x; the checker must not let it become float32
    report = check_grad(lambda a, b: a * b + a ** 3, [np.float64(0.3), np.array([1.0, -2.0])])
    assert report.worst_ratio < 1e-2
    check_grad(kp.exp, [0.7], modes="fwd")


def test_seeded_and_deterministic(rng):
    x = rng.standard_normal(5)
    r1, r2 = check_grad(kp.tanh, [x], seed=7), check_grad(kp.tanh, [x], seed=7)
    assert [c.expected for c in r1.comparisons] == [c.expected for c in r2.comparisons]
    r3 = check_grad(kp.tanh, [x], seed=8)
    assert [c.expected for c in r1.comparisons] != [c.expected for c in r3.comparisons]


def test_requires_float64_tensor_output():
    with pytest.raises(TypeError, match="float64"):
        check_grad(lambda x: kp.Tensor(x.data.astype(np.float32)), [np.ones(3)])
    with pytest.raises(TypeError, match="kp.Tensor"):
        check_grad(lambda x: x.data, [np.ones(3)], modes=("fwd",))


# -- wrong rules are rejected ------------------------------------------------------------------


def test_rejects_wrong_vjp(throwaway, rng):
    # VJP off by a sign: reverse mode must fail, forward mode (correct) passes
    sin = throwaway(_sin_forward, lambda g, x, needs, c: (-g * np.cos(x),), _sin_jvp)
    x = rng.standard_normal((3, 2))
    with pytest.raises(GradcheckError) as info:
        check_grad(sin, [x])
    err = info.value
    assert isinstance(err, AssertionError)
    assert err.failures and {c.mode for c in err.failures} == {"rev"}
    assert len(err.failures) == 3  # every direction
    msg = str(err)
    assert "argument 0 (shape (3, 2))" in msg and "reverse <J^T v, u>" in msg
    assert "numeric <v, dF>" in msg
    c = err.failures[0]
    assert f"{c.expected:.17g}" in msg and f"{c.got:.17g}" in msg
    assert np.isclose(c.got, -c.expected, rtol=1e-5)
    check_grad(sin, [x], modes=("fwd",))
    with pytest.raises(GradcheckError, match="adjoint"):
        check_adjoint(sin, [x])


def test_rejects_slightly_wrong_vjp(throwaway, rng):
    # a 1e-4 relative error is far above the float64 finite-difference floor
    sin = throwaway(_sin_forward, lambda g, x, needs, c: (g * np.cos(x) * (1 + 1e-4),), _sin_jvp)
    with pytest.raises(GradcheckError):
        check_grad(sin, [rng.standard_normal(6)], modes=("rev",))


def test_rejects_wrong_jvp(throwaway, rng):
    sin = throwaway(_sin_forward, _sin_vjp, lambda ts, x, c: ts[0] * np.sin(x))
    with pytest.raises(GradcheckError) as info:
        check_grad(sin, [rng.standard_normal(4)])
    assert {c.mode for c in info.value.failures} == {"fwd"}
    assert "forward <v, J u>" in str(info.value)


def test_names_the_wrong_argument(throwaway, rng):
    # mul whose VJP for the second (broadcast) argument multiplies by a * a instead of a
    def forward(a, b):
        return a * b, (a, b)

    def vjp(g, res, needs, c):
        a, b = res
        return unbroadcast(g * b, a.shape), unbroadcast(g * a * a, b.shape)

    def jvp(ts, res, c):
        a, b = res
        return ts[0] * b + a * ts[1]

    mul = throwaway(forward, vjp, jvp)
    a, b = rng.standard_normal((3, 4)) + 3.0, rng.standard_normal((4,))
    with pytest.raises(GradcheckError) as info:
        check_grad(mul, [a, b])
    assert {c.argnum for c in info.value.failures} == {1}
    assert "argument 1 (shape (4,))" in str(info.value)
    assert "argument 0" not in str(info.value)


def test_adjoint_catches_transposed_vjp(throwaway, rng):
    # a linear map x -> M x whose VJP applies M instead of M^T
    m = rng.standard_normal((4, 4))
    prim = throwaway(lambda x: (m @ x, None), lambda g, res, needs, c: (m @ g,),
                     lambda ts, res, c: m @ ts[0])
    with pytest.raises(GradcheckError, match="check_adjoint"):
        check_adjoint(prim, [rng.standard_normal(4)])


def test_adjoint_catches_kink_mismatch_that_finite_differences_miss(throwaway):
    # relu whose VJP takes 1 at the kink but whose JVP takes 0: identical away from 0
    def forward(x):
        return np.maximum(x, 0.0), x

    prim = throwaway(forward, lambda g, x, needs, c: (g * (x >= 0),),
                     lambda ts, x, c: ts[0] * (x > 0))
    away = np.array([-2.0, -0.5, 0.5, 2.0])
    check_grad(prim, [away])
    check_adjoint(prim, [away])
    with pytest.raises(GradcheckError) as info:
        check_adjoint(prim, [np.array([-1.0, 0.0, 1.0])])
    assert "forward <v, J u>" in str(info.value) and "reverse <J^T v, u>" in str(info.value)


def test_adjoint_catches_missing_unbroadcast(throwaway, rng):
    # add whose VJP for the broadcast argument returns the mean instead of the sum
    def forward(a, b):
        return a + b, (a.shape, b.shape)

    def vjp(g, res, needs, c):
        ga = unbroadcast(g, res[0])
        gb = unbroadcast(g, res[1]) / (g.size // int(np.prod(res[1])))
        return ga, gb

    add = throwaway(forward, vjp, lambda ts, res, c: ts[0] + ts[1])
    with pytest.raises(GradcheckError) as info:
        check_adjoint(lambda a, b: add(*lift_pair(a, b)), [rng.standard_normal((5, 3)),
                                                           rng.standard_normal(3)])
    assert {c.argnum for c in info.value.failures} == {1}


def test_finite_differences_are_sensitive_to_eps(rng):
    # a huge step makes the central difference visibly wrong: the check is not vacuous
    x = rng.standard_normal(4)
    check_grad(kp.exp, [x], eps=1e-6)
    with pytest.raises(GradcheckError):
        check_grad(kp.exp, [x], eps=0.1)


# -- kinks and policies ------------------------------------------------------------------------


def test_central_differences_at_relu_kink_see_the_midpoint():
    # (relu(eps u) - relu(-eps u)) / (2 eps) = u / 2: finite differences agree with the policy
    # value 0.5 at the kink and with no other, which is why this file keeps them off kinks
    x = np.array([-1.0, 0.0, 1.0])
    with kp.kink_policy("pytorch"):
        with pytest.raises(GradcheckError):
            check_grad(kp.relu, [x])
        check_adjoint(kp.relu, [x])
    with kp.kink_policy(relu=0.5):
        check_grad(kp.relu, [x])
        check_adjoint(kp.relu, [x])


def test_adjoint_at_ties_under_each_rule():
    a = np.array([1.0, 2.0, 3.0, 3.0])
    b = np.array([1.0, 0.0, 3.0, 4.0])
    for ties in ("split", "first", "last"):
        with kp.kink_policy(maximum=ties, max_axis=ties):
            check_adjoint(kp.maximum, [a, b])
            check_adjoint(lambda x: kp.max(x, axis=0), [np.stack([a, b])])
