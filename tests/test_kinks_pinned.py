"""Pinned exact derivatives at every kink, for every preset and explicit per-call policies, in both
modes.

Every expected value is written out literally, from REFERENCES.md section 4 (what each framework
computes) and the kink semantics of ``kinkprop.kinks.spec`` (the value multiplies the incoming
gradient; ``"left"`` / ``"right"`` are one-sided derivatives; ties ``split`` / ``first`` / ``last``
in row-major order). Nothing here is computed by the engine under test.

Each check takes the gradient of ``sum(f(*xs))`` three ways: ``kp.grad`` (reverse), ``Tensor.backward``
(reverse, through the Tensor API) and ``kp.jvp`` with one unit tangent per element (forward).
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pytest

import kinkprop as kp
from kinkprop.kinks.spec import SPECS

PRESETS = ("pytorch", "pytorch-2.14", "jax", "tensorflow")
NEG0 = -0.0


def grads(f, xs, wrt=0):
    """d sum(f(*xs)) / d xs[wrt] by kp.grad, by Tensor.backward and by kp.jvp (unit tangents)."""
    xs = [np.asarray(x, dtype=np.float64) for x in xs]
    rev = kp.grad(lambda *a: kp.sum(f(*a)), argnums=wrt)(*xs)
    ts = [kp.tensor(x, requires_grad=i == wrt) for i, x in enumerate(xs)]
    kp.sum(f(*ts)).backward()
    back = ts[wrt].grad
    fwd = np.empty(xs[wrt].size)
    for i in range(xs[wrt].size):
        tangents = [np.zeros_like(x) for x in xs]
        tangents[wrt].flat[i] = 1.0
        fwd[i] = np.sum(kp.jvp(f, xs, tangents)[1])
    return rev, back, fwd.reshape(xs[wrt].shape)


def check(f, xs, expected, wrt=0):
    expected = np.asarray(expected, dtype=np.float64)
    for mode, got in zip(("kp.grad", "backward", "kp.jvp"), grads(f, xs, wrt)):
        assert got.shape == expected.shape, mode
        assert np.array_equal(got, expected), f"{mode}: got {got.tolist()}, want {expected.tolist()}"


def by_preset(default, **diff):
    """Expected value per preset: ``default`` unless listed (``pytorch_2_14=`` for pytorch-2.14)."""
    out = {p: default for p in PRESETS}
    out.update({k.replace("_2_14", "-2.14"): v for k, v in diff.items()})
    return out


# -- every non-smooth primitive x every preset ---------------------------------------------------
# (id, f, inputs, wrt, expected per preset)

X4 = [-1.0, NEG0, 0.0, 1.0]

PRESET_CASES = [
    ("relu", kp.relu, [X4], 0, by_preset([0, 0, 0, 1])),
    ("leaky_relu", lambda x: kp.leaky_relu(x, 0.1), [X4], 0,
     by_preset([0.1, 0.1, 0.1, 1], jax=[0.1, 1, 1, 1])),
    ("leaky_relu_negative_slope", lambda x: kp.leaky_relu(x, -0.5), [X4], 0,
     by_preset([-0.5, -0.5, -0.5, 1], jax=[-0.5, 1, 1, 1])),
    ("abs", kp.abs, [X4], 0, by_preset([-1, 0, 0, 1], jax=[-1, 1, 1, 1])),
    ("relu6", kp.relu6, [[-1.0, NEG0, 0.0, 3.0, 6.0, 7.0]], 0, by_preset([0, 0, 0, 1, 0, 0])),
    ("hardtanh", kp.hardtanh, [[-2.0, -1.0, 0.0, 1.0, 2.0]], 0,
     by_preset([0, 0, 1, 0, 0], jax=[0, 1, 1, 1, 0], tensorflow=[0, 1, 1, 1, 0])),
    ("hardswish", kp.hardswish, [[-4.0, -3.0, NEG0, 0.0, 1.5, 3.0, 4.0]], 0,
     by_preset([0, 0, 0.5, 0.5, 1, 1, 1])),
    ("hardtanh_0_6", lambda x: kp.hardtanh(x, 0.0, 6.0), [[NEG0, 0.0, 3.0, 6.0]], 0,
     by_preset([0, 0, 1, 0], jax=[1, 1, 1, 1], tensorflow=[1, 1, 1, 1])),
    ("clamp", lambda x: kp.clamp(x, -1.0, 1.0), [[-2.0, -1.0, 0.0, 1.0, 2.0]], 0,
     by_preset([0, 1, 1, 1, 0], pytorch_2_14=[0, 0, 1, 0, 0], jax=[0, 0.5, 1, 0.5, 0])),
    ("clamp_min_only", lambda x: kp.clamp(x, min=0), [X4], 0,
     by_preset([0, 1, 1, 1], pytorch_2_14=[0, 0, 0, 1], jax=[0, 0.5, 0.5, 1])),
    ("clamp_max_only", lambda x: kp.clamp(x, max=0), [X4], 0,
     by_preset([1, 1, 1, 0], pytorch_2_14=[1, 0, 0, 0], jax=[1, 0.5, 0.5, 0])),
    # tensor bounds: x, lo, hi; the bound gets the rest where x sits on it
    *[(f"clamp_tensor_{name}", kp.clamp,
       [[-2.0, -1.0, 0.0, 1.0, 2.0, 0.5], [-1.0] * 5 + [0.5], [1.0] * 6], wrt, exp)
      for name, wrt, exp in [
          ("x", 0, by_preset([0, 1, 1, 1, 0, 1], pytorch_2_14=[0, 0, 1, 0, 0, 0],
                             jax=[0, 0.5, 1, 0.5, 0, 0.5])),
          ("min", 1, by_preset([1, 0, 0, 0, 0, 0], pytorch_2_14=[1, 1, 0, 0, 0, 1],
                               jax=[1, 0.5, 0, 0, 0, 0.5])),
          ("max", 2, by_preset([0, 0, 0, 0, 1, 0], pytorch_2_14=[0, 0, 0, 1, 1, 0],
                               jax=[0, 0, 0, 0.5, 1, 0])),
      ]],
    ("maximum_a", kp.maximum, [[0.0, 1.0, 2.0, NEG0], [0.0, 1.0, 1.0, 0.0]], 0,
     by_preset([0.5, 0.5, 1, 0.5], tensorflow=[1, 1, 1, 1])),
    ("maximum_b", kp.maximum, [[0.0, 1.0, 2.0, NEG0], [0.0, 1.0, 1.0, 0.0]], 1,
     by_preset([0.5, 0.5, 0, 0.5], tensorflow=[0, 0, 0, 0])),
    ("maximum_x_0", lambda x: kp.maximum(x, 0.0), [X4], 0,
     by_preset([0, 0.5, 0.5, 1], tensorflow=[0, 1, 1, 1])),
    ("maximum_0_x", lambda x: kp.maximum(0.0, x), [X4], 0,
     by_preset([0, 0.5, 0.5, 1], tensorflow=[0, 0, 0, 1])),
    ("minimum_a", kp.minimum, [[0.0, 1.0, 2.0], [0.0, 1.0, 1.0]], 0,
     by_preset([0.5, 0.5, 0], tensorflow=[1, 1, 0])),
    ("minimum_b", kp.minimum, [[0.0, 1.0, 2.0], [0.0, 1.0, 1.0]], 1,
     by_preset([0.5, 0.5, 1], tensorflow=[0, 0, 1])),
    ("max_2_tied", kp.max, [[[1.0, 3.0], [3.0, 0.0]]], 0, by_preset([[0, 0.5], [0.5, 0]])),
    ("max_3_tied", kp.max, [[1.0, 3.0, 3.0, 3.0]], 0, by_preset([0, 1 / 3, 1 / 3, 1 / 3])),
    ("max_4_tied_at_0", kp.max, [[[0.0, NEG0], [0.0, 0.0]]], 0,
     by_preset([[0.25, 0.25], [0.25, 0.25]])),
    ("min_2_tied", kp.min, [[[1.0, 3.0], [1.0, 2.0]]], 0, by_preset([[0.5, 0], [0.5, 0]])),
    ("max_axis1", lambda x: kp.max(x, axis=1),
     [[[1.0, 3.0, 3.0], [2.0, 2.0, 0.0], [5.0, 1.0, 5.0], [4.0, 4.0, 4.0]]], 0,
     by_preset([[0, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]],
               jax=[[0, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [1 / 3, 1 / 3, 1 / 3]],
               tensorflow=[[0, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [1 / 3, 1 / 3, 1 / 3]])),
    ("max_axis0_keepdims", lambda x: kp.max(x, axis=0, keepdims=True),
     [[[1.0, 3.0, 0.0], [2.0, 3.0, 0.0]]], 0,
     by_preset([[0, 1, 1], [1, 0, 0]], jax=[[0, 0.5, 0.5], [1, 0.5, 0.5]],
               tensorflow=[[0, 0.5, 0.5], [1, 0.5, 0.5]])),
    ("max_axis_negative", lambda x: kp.max(x, axis=-1), [[[2.0, 2.0], [0.0, 1.0]]], 0,
     by_preset([[1, 0], [0, 1]], jax=[[0.5, 0.5], [0, 1]], tensorflow=[[0.5, 0.5], [0, 1]])),
    ("min_axis1", lambda x: kp.min(x, axis=1), [[[1.0, 1.0, 3.0], [0.0, 2.0, 0.0]]], 0,
     by_preset([[1, 0, 0], [1, 0, 0]], jax=[[0.5, 0.5, 0], [0.5, 0, 0.5]],
               tensorflow=[[0.5, 0.5, 0], [0.5, 0, 0.5]])),
    # max-pool: every preset takes the first maximum in row-major order
    ("max_pool_2_tied_positive", lambda x: kp.max_pool2d(x, 2), [[[[[1.0, 3.0], [3.0, 0.0]]]]],
     0, by_preset([[[[0, 1], [0, 0]]]])),
    ("max_pool_4_tied_at_0", lambda x: kp.max_pool2d(x, 2), [[[[[0.0, NEG0], [0.0, 0.0]]]]],
     0, by_preset([[[[1, 0], [0, 0]]]])),
    ("max_pool_overlap", lambda x: kp.max_pool2d(x, 2, stride=1), [np.ones((1, 1, 3, 3))], 0,
     by_preset([[[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]])),
    ("max_pool_padding_negative", lambda x: kp.max_pool2d(x, 3, stride=2, padding=1),
     [-np.ones((1, 1, 3, 3))], 0, by_preset([[[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]])),
    ("max_pool_two_windows", lambda x: kp.max_pool2d(x, 2),
     [[[[[2.0, 0.0, 5.0, 5.0], [0.0, 2.0, 5.0, 5.0]]]]], 0,
     by_preset([[[[1, 0, 1, 0], [0, 0, 0, 0]]]])),
    ("l1_loss_input", kp.l1_loss, [[0.0, 1.0, 2.0, NEG0], [0.0, 1.0, 1.0, 0.0]], 0,
     by_preset([0, 0, 0.25, 0], jax=[0.25, 0.25, 0.25, 0.25])),
    ("l1_loss_target", kp.l1_loss, [[0.0, 1.0, 2.0, NEG0], [0.0, 1.0, 1.0, 0.0]], 1,
     by_preset([0, 0, -0.25, 0], jax=[-0.25, -0.25, -0.25, -0.25])),
    # margin - y * s = [0, 0, 0.5, -1]: two scores on the margin (relu's rule: 0 in every preset)
    ("hinge_loss", kp.hinge_loss, [[1.0, -1.0, 0.5, 2.0], [1.0, -1.0, 1.0, 1.0]], 0,
     by_preset([0, 0, -0.25, 0])),
]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name, f, xs, wrt, expected", PRESET_CASES,
                         ids=[c[0] for c in PRESET_CASES])
def test_preset_at_kinks(preset, name, f, xs, wrt, expected):
    with kp.kink_policy(preset):
        check(f, xs, expected[preset], wrt)


def test_every_non_smooth_primitive_is_pinned_under_every_preset():
    covered = {"relu", "leaky_relu", "abs", "relu6", "hardtanh", "hardswish", "clamp", "maximum", "minimum",
               "max", "max_axis", "min", "min_axis", "max_pool2d", "l1_loss"}
    assert covered == set(SPECS)


def test_clamp_degenerate_bounds():
    # x = lo = hi: max(x, lo) gives x the share at_low, min(., hi) then at_high: x gets the
    # product, never the sum. lo > hi: the output is hi, so hi gets everything (as PyTorch).
    xs = [[1.0, 1.0, 0.0, 2.0], [1.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    expected = {
        "pytorch": ([1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1]),
        "pytorch-2.14": ([0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]),
        "jax": ([0.25, 0, 0, 0], [0.25, 0, 0.5, 0], [0.5, 1, 0.5, 1]),
    }
    for preset, per_input in expected.items():
        with kp.kink_policy(preset):
            for wrt, exp in enumerate(per_input):
                check(kp.clamp, xs, exp, wrt)


def test_clamp_scalar_degenerate_bounds():
    x = [0.0, 1.0, 2.0]
    with kp.kink_policy("pytorch"):
        check(lambda x: kp.clamp(x, 1.0, 1.0), [x], [0, 1, 0])
        check(lambda x: kp.clamp(x, 2.0, 0.0), [x], [0, 0, 0])  # constant: the output is 0
    with kp.kink_policy("jax"):
        check(lambda x: kp.clamp(x, 1.0, 1.0), [x], [0, 0.25, 0])
    check(lambda x: kp.hardtanh(x, 1.0, 1.0, at_kink=(1, 0.5)), [x], [0, 0.5, 0])


# -- explicit per-call policies (the same under every scope) ---------------------------------------


def pool(kernel, stride=None, padding=0, ties=None):
    return lambda x: kp.max_pool2d(x, kernel, stride, padding, ties=ties)


CALL_CASES = [
    ("relu_0", lambda x: kp.relu(x, at_kink=0), [X4], 0, [0, 0, 0, 1]),
    ("relu_0.5", lambda x: kp.relu(x, at_kink=0.5), [X4], 0, [0, 0.5, 0.5, 1]),
    ("relu_1", lambda x: kp.relu(x, at_kink=1), [X4], 0, [0, 1, 1, 1]),
    ("relu_left", lambda x: kp.relu(x, at_kink="left"), [X4], 0, [0, 0, 0, 1]),
    ("relu_right", lambda x: kp.relu(x, at_kink="right"), [X4], 0, [0, 1, 1, 1]),
    ("relu_method", lambda x: x.relu(at_kink=1), [X4], 0, [0, 1, 1, 1]),
    ("leaky_left", lambda x: kp.leaky_relu(x, 0.25, at_kink="left"), [X4], 0,
     [0.25, 0.25, 0.25, 1]),
    ("leaky_right", lambda x: kp.leaky_relu(x, 0.25, at_kink="right"), [X4], 0, [0.25, 1, 1, 1]),
    ("leaky_0.5", lambda x: kp.leaky_relu(x, 0.25, at_kink=0.5), [X4], 0, [0.25, 0.5, 0.5, 1]),
    ("abs_0", lambda x: kp.abs(x, at_kink=0), [X4], 0, [-1, 0, 0, 1]),
    ("abs_0.5", lambda x: kp.abs(x, at_kink=0.5), [X4], 0, [-1, 0.5, 0.5, 1]),
    ("abs_left", lambda x: kp.abs(x, at_kink="left"), [X4], 0, [-1, -1, -1, 1]),
    ("abs_right", lambda x: kp.abs(x, at_kink="right"), [X4], 0, [-1, 1, 1, 1]),
    ("relu6_1_0.5", lambda x: kp.relu6(x, at_kink=(1, 0.5)), [[-1.0, NEG0, 0.0, 3.0, 6.0, 7.0]],
     0, [0, 1, 1, 1, 0.5, 0]),
    ("relu6_right_left", lambda x: kp.relu6(x, at_kink=("right", "left")),
     [[NEG0, 0.0, 6.0]], 0, [1, 1, 1]),
    ("hardswish_right_left", lambda x: kp.hardswish(x, at_kink=("right", "left")),
     [[-4.0, -3.0, 3.0, 4.0]], 0, [0, -0.5, 1.5, 1]),
    ("hardswish_-0.25_1.25", lambda x: kp.hardswish(x, at_kink=(-0.25, 1.25)),
     [[-3.0, 0.0, 3.0]], 0, [-0.25, 0.5, 1.25]),
    ("hardtanh_left_right", lambda x: kp.hardtanh(x, -1, 1, at_kink=("left", "right")),
     [[-1.0, 0.0, 1.0]], 0, [0, 1, 0]),
    ("hardtanh_0.5_1", lambda x: kp.hardtanh(x, -2, 3, at_kink=(0.5, 1)),
     [[-3.0, -2.0, 0.0, 3.0, 4.0]], 0, [0, 0.5, 1, 1, 0]),
    ("clamp_1_0", lambda x: kp.clamp(x, -1, 1, at_kink=(1, 0)), [[-1.0, 0.0, 1.0]], 0,
     [1, 1, 0]),
    ("clamp_0_1", lambda x: kp.clamp(x, -1, 1, at_kink=(0, 1)), [[-1.0, 0.0, 1.0]], 0,
     [0, 1, 1]),
    ("clamp_right_left", lambda x: kp.clamp(x, -1, 1, at_kink=("right", "left")),
     [[-1.0, 0.0, 1.0]], 0, [1, 1, 1]),
    ("clamp_method", lambda x: x.clamp(0, 2, at_kink=(0.5, 0.25)), [[NEG0, 1.0, 2.0]], 0,
     [0.5, 1, 0.25]),
    ("clamp_tensor_x_0.5_0", lambda x, lo, hi: kp.clamp(x, lo, hi, at_kink=(0.5, 0)),
     [[-1.0, 0.0, 1.0], [-1.0] * 3, [1.0] * 3], 0, [0.5, 1, 0]),
    ("clamp_tensor_min_0.5_0", lambda x, lo, hi: kp.clamp(x, lo, hi, at_kink=(0.5, 0)),
     [[-1.0, 0.0, 1.0], [-1.0] * 3, [1.0] * 3], 1, [0.5, 0, 0]),
    ("clamp_tensor_max_0.5_0", lambda x, lo, hi: kp.clamp(x, lo, hi, at_kink=(0.5, 0)),
     [[-1.0, 0.0, 1.0], [-1.0] * 3, [1.0] * 3], 2, [0, 0, 1]),
    # a broadcast bound collects the gradient of every element that sits on it
    ("clamp_tensor_broadcast_min", lambda x, lo: kp.clamp(x, lo, None, at_kink=(0.25, 0)),
     [[[0.0, 1.0], [-1.0, 1.0]], [0.0, 1.0]], 1, [1.75, 1.5]),
    *[(f"maximum_{t}_{s}", partial(kp.maximum, ties=t),
       [[0.0, 1.0, 2.0], [0.0, 1.0, 1.0]], wrt, exp)
      for t, s, wrt, exp in [
          ("split", "a", 0, [0.5, 0.5, 1]), ("split", "b", 1, [0.5, 0.5, 0]),
          ("first", "a", 0, [1, 1, 1]), ("first", "b", 1, [0, 0, 0]),
          ("last", "a", 0, [0, 0, 1]), ("last", "b", 1, [1, 1, 0])]],
    *[(f"minimum_{t}_{s}", partial(kp.minimum, ties=t),
       [[0.0, 1.0, 2.0], [0.0, 1.0, 1.0]], wrt, exp)
      for t, s, wrt, exp in [
          ("split", "a", 0, [0.5, 0.5, 0]), ("split", "b", 1, [0.5, 0.5, 1]),
          ("first", "a", 0, [1, 1, 0]), ("first", "b", 1, [0, 0, 1]),
          ("last", "a", 0, [0, 0, 0]), ("last", "b", 1, [1, 1, 1])]],
    *[(f"max_all_{t}", partial(kp.max, ties=t), [[[1.0, 3.0], [3.0, 3.0]]], 0,
       exp) for t, exp in [("split", [[0, 1 / 3], [1 / 3, 1 / 3]]),
                           ("first", [[0, 1], [0, 0]]), ("last", [[0, 0], [0, 1]])]],
    *[(f"min_all_{t}", partial(kp.min, ties=t), [[[1.0, 3.0], [1.0, 1.0]]], 0,
       exp) for t, exp in [("split", [[1 / 3, 0], [1 / 3, 1 / 3]]),
                           ("first", [[1, 0], [0, 0]]), ("last", [[0, 0], [0, 1]])]],
    *[(f"max_axis1_{t}", partial(kp.max, axis=1, ties=t),
       [[[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]], 0, exp)
      for t, exp in [("split", [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]]),
                     ("first", [[0, 1, 0], [1, 0, 0]]), ("last", [[0, 0, 1], [0, 0, 1]])]],
    *[(f"max_axis0_{t}", partial(kp.max, axis=0, ties=t),
       [[[1.0, 3.0], [1.0, 2.0], [0.0, 3.0]]], 0, exp)
      for t, exp in [("split", [[0.5, 0.5], [0.5, 0], [0, 0.5]]),
                     ("first", [[1, 1], [0, 0], [0, 0]]), ("last", [[0, 0], [1, 0], [0, 1]])]],
    *[(f"min_axis0_{t}", partial(kp.min, axis=0, ties=t),
       [[[1.0, 3.0], [1.0, 2.0], [0.0, 2.0]]], 0, exp)
      for t, exp in [("split", [[0, 0], [0, 0.5], [1, 0.5]]),
                     ("first", [[0, 0], [0, 1], [1, 0]]), ("last", [[0, 0], [0, 0], [1, 1]])]],
    *[(f"max_pool_2_tied_{t}", pool(2, ties=t),
       [[[[[1.0, 3.0], [3.0, 0.0]]]]], 0, exp)
      for t, exp in [("split", [[[[0, 0.5], [0.5, 0]]]]), ("first", [[[[0, 1], [0, 0]]]]),
                     ("last", [[[[0, 0], [1, 0]]]])]],
    *[(f"max_pool_4_tied_at_0_{t}", pool(2, ties=t),
       [[[[[0.0, 0.0], [NEG0, 0.0]]]]], 0, exp)
      for t, exp in [("split", [[[[0.25, 0.25], [0.25, 0.25]]]]),
                     ("first", [[[[1, 0], [0, 0]]]]), ("last", [[[[0, 0], [0, 1]]]])]],
    # 3x3 of ones, 2x2 windows at stride 1: four windows, each a four-way tie
    *[(f"max_pool_overlap_{t}", pool(2, 1, ties=t),
       [np.ones((1, 1, 3, 3))], 0, exp)
      for t, exp in [("split", [[[[0.25, 0.5, 0.25], [0.5, 1, 0.5], [0.25, 0.5, 0.25]]]]),
                     ("first", [[[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]]),
                     ("last", [[[[0, 0, 0], [0, 1, 1], [0, 1, 1]]]])]],
    # padding 1 around a 2x2 of -1: each 2x2 window holds one real element; padding never wins
    *[(f"max_pool_padding_{t}", pool(2, 2, 1, ties=t),
       [-np.ones((1, 1, 2, 2))], 0, [[[[1, 1], [1, 1]]]]) for t in ("split", "first", "last")],
    # 3x3 windows at stride 2, padding 1, on a 3x3 of zeros: windows share the middle row/column
    *[(f"max_pool_padding_overlap_{t}", pool(3, 2, 1, ties=t),
       [np.zeros((1, 1, 3, 3))], 0, exp)
      for t, exp in [("split", [[[[0.25, 0.5, 0.25], [0.5, 1, 0.5], [0.25, 0.5, 0.25]]]]),
                     ("first", [[[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]]),
                     ("last", [[[[0, 0, 0], [0, 1, 1], [0, 1, 1]]]])]],
    ("l1_loss_1", lambda a, b: kp.l1_loss(a, b, at_kink=1), [[0.0, 2.0], [0.0, 1.0]], 0,
     [0.5, 0.5]),
    ("l1_loss_-0.5", lambda a, b: kp.l1_loss(a, b, at_kink=-0.5), [[0.0, 2.0], [0.0, 1.0]], 0,
     [-0.25, 0.5]),
    ("l1_loss_left", lambda a, b: kp.l1_loss(a, b, at_kink="left"), [[0.0, 2.0], [0.0, 1.0]], 0,
     [-0.5, 0.5]),
    ("hinge_loss_1", lambda s, y: kp.hinge_loss(s, y, at_kink=1),
     [[1.0, -1.0, 0.5, 2.0], [1.0, -1.0, 1.0, 1.0]], 0, [-0.25, 0.25, -0.25, 0]),
    ("hinge_loss_margin_2", lambda s, y: kp.hinge_loss(s, y, margin=2.0, at_kink=0.5),
     [[2.0, -2.0], [1.0, -1.0]], 0, [-0.25, 0.25]),
]


@pytest.mark.parametrize("scope", PRESETS)
@pytest.mark.parametrize("name, f, xs, wrt, expected", CALL_CASES,
                         ids=[c[0] for c in CALL_CASES])
def test_per_call_policy_at_kinks(scope, name, f, xs, wrt, expected):
    with kp.kink_policy(scope):
        check(f, xs, expected, wrt)


@pytest.mark.parametrize("name, policy, f, xs, expected", [
    ("relu", {"relu": 1.0}, kp.relu, [X4], [0, 1, 1, 1]),
    ("abs", {"abs": "left"}, kp.abs, [X4], [-1, -1, -1, 1]),
    ("clamp", {"clamp": (0.5, 0.25)}, lambda x: kp.clamp(x, 0, 1), [[0.0, 1.0]], [0.5, 0.25]),
    ("max_axis", {"max_axis": "last"}, lambda x: kp.max(x, axis=0), [[1.0, 1.0]], [0, 1]),
    ("max_pool2d", {"max_pool2d": "split"}, lambda x: kp.max_pool2d(x, 2),
     [np.zeros((1, 1, 2, 2))], [[[[0.25, 0.25], [0.25, 0.25]]]]),
    ("l1_loss", {"l1_loss": 1.0}, lambda x: kp.l1_loss(x, np.zeros(2)), [[0.0, 0.0]], [0.5, 0.5]),
])
def test_scoped_overrides(name, policy, f, xs, expected):
    with kp.kink_policy("tensorflow", **policy):
        check(f, xs, expected)
    with kp.kink_policy(**policy):  # on top of the policy in force
        check(f, xs, expected)


# -- the rules around the values ------------------------------------------------------------------

G = np.array([3.0, 5.0, -7.0, 11.0])
X_RELU = np.array([-1.0, 0.0, 0.0, 2.0])


def test_kink_value_multiplies_the_incoming_gradient():
    # the chain rule: the value at the kink multiplies g (not replaces it, cf. REFERENCES.md 2)
    f = lambda x: kp.relu(x, at_kink=1)
    _, vjp_fn = kp.vjp(f, X_RELU)
    assert np.array_equal(vjp_fn(G)[0], [0, 5, -7, 11])
    x = kp.tensor(X_RELU, requires_grad=True)
    f(x).backward(G)
    assert np.array_equal(x.grad, [0, 5, -7, 11])
    assert np.array_equal(kp.jvp(f, (X_RELU,), (G,))[1], [0, 5, -7, 11])
    _, vjp_fn = kp.vjp(lambda x: kp.relu(x, at_kink=0.5), X_RELU)
    assert np.array_equal(vjp_fn(G)[0], [0, 2.5, -3.5, 11])


def test_tie_shares_multiply_the_incoming_gradient():
    _, vjp_fn = kp.vjp(lambda x: kp.max(x, axis=1, ties="split"),
                       np.array([[2.0, 2.0, 1.0], [4.0, 4.0, 4.0]]))
    assert np.array_equal(vjp_fn(np.array([-6.0, 9.0]))[0], [[-3, -3, 0], [3, 3, 3]])
    _, vjp_fn = kp.vjp(lambda a, b: kp.maximum(a, b, ties="split"), np.zeros(2), np.zeros(2))
    assert np.array_equal(vjp_fn(np.array([3.0, -5.0]))[1], [1.5, -2.5])
    _, vjp_fn = kp.vjp(lambda x: kp.max_pool2d(x, 2, 1, ties="first"), np.ones((1, 1, 2, 3)))
    assert np.array_equal(vjp_fn(np.array([[[[3.0, -7.0]]]]))[0], [[[[3, -7, 0], [0, 0, 0]]]])
    _, vjp_fn = kp.vjp(lambda x: kp.clamp(x, -1.0, 1.0, at_kink=(0.5, 0.25)),
                       np.array([-1.0, 0.0, 1.0]))
    assert np.array_equal(vjp_fn(np.array([4.0, 5.0, -8.0]))[0], [2, 5, -2])


def test_policy_in_force_at_forward_time_is_what_backward_uses():
    x = kp.tensor(np.array([0.0, 1.0]), requires_grad=True)
    with kp.kink_policy(relu=1.0):
        y = kp.relu(x).sum()
    with kp.kink_policy(relu=0.0):
        y.backward()
    assert np.array_equal(x.grad, [1, 1])

    x = kp.tensor(np.array([0.0, 1.0]), requires_grad=True)
    y = kp.relu(x).sum()  # default policy: pytorch, relu'(0) = 0
    with kp.kink_policy(relu=1.0):
        y.backward()
    assert np.array_equal(x.grad, [0, 1])

    with kp.kink_policy("jax"):
        _, vjp_fn = kp.vjp(lambda x: kp.max_pool2d(x, 2) + kp.abs(x).sum(), np.zeros((1, 1, 2, 2)))
    with kp.kink_policy("pytorch", max_pool2d="split"):
        assert np.array_equal(vjp_fn(np.ones((1, 1, 1, 1)))[0], [[[[2, 1], [1, 1]]]])


def test_per_call_argument_beats_scope():
    with kp.kink_policy("pytorch", relu=1.0, max_pool2d="split", clamp=(0.5, 0.5)):
        check(lambda x: kp.relu(x, at_kink=0), [[0.0]], [0])
        check(lambda x: kp.max_pool2d(x, 2, ties="last"), [np.zeros((1, 1, 2, 2))],
              [[[[0, 0], [0, 1]]]])
        check(lambda x: kp.clamp(x, 0, 1, at_kink=(1, 0)), [[0.0, 1.0]], [1, 0])
        check(lambda x: kp.relu(x), [[0.0]], [1])  # no argument: the scope


def test_policy_in_force_is_reported():
    assert kp.current_policy()["relu"] == 0.0
    with kp.kink_policy("jax", relu=1.0) as pol:
        assert kp.current_policy() is pol
        assert pol["relu"] == 1.0 and pol["abs"] == 1.0
    assert kp.current_policy()["relu"] == 0.0


@pytest.fixture
def fresh_warnings():
    """Out-of-Clarke warnings fire once per primitive per process: start from none, restore."""
    saved = {name: set(spec._warned) for name, spec in SPECS.items()}
    for spec in SPECS.values():
        spec._warned.clear()
    yield
    for name, spec in SPECS.items():
        spec._warned.clear()
        spec._warned.update(saved[name])


def _count_warnings(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    return [w for w in rec if "Clarke" in str(w.message)]


def test_out_of_clarke_value_warns_once_per_primitive_and_is_used(fresh_warnings):
    f = kp.grad(lambda x: kp.relu(x, at_kink=2).sum())
    first = _count_warnings(lambda: np.testing.assert_array_equal(f(np.array([0.0, 1.0])),
                                                                  [2, 1]))
    assert len(first) == 1
    assert "relu" in str(first[0].message) and "[0.0, 1.0]" in str(first[0].message)
    assert _count_warnings(lambda: f(np.array([0.0]))) == []  # once
    # another primitive warns on its own; forward mode uses the value too
    got = []
    abs_w = _count_warnings(lambda: got.append(
        kp.jvp(lambda x: kp.abs(x, at_kink=-3), (np.zeros(1),), (np.ones(1),))[1]))
    assert len(abs_w) == 1 and "abs" in str(abs_w[0].message)
    assert np.array_equal(got[0], [-3])
    clamp_w = _count_warnings(lambda: kp.clamp(kp.tensor([0.0]), 0, 1, at_kink=(0, 1.5)))
    assert len(clamp_w) == 1 and "clamp" in str(clamp_w[0].message)
    with kp.kink_policy(leaky_relu=2.0):
        # building the policy does not warn (the Clarke interval depends on the call's slope);
        # using it does
        leaky_w = _count_warnings(lambda: kp.leaky_relu(kp.tensor([0.0]), 0.1))
    assert len(leaky_w) == 1 and "leaky_relu" in str(leaky_w[0].message)


def test_values_inside_clarke_do_not_warn(fresh_warnings):
    assert _count_warnings(lambda: [
        kp.relu(kp.tensor([0.0]), at_kink=0.5), kp.abs(kp.tensor([0.0]), at_kink=-1),
        kp.leaky_relu(kp.tensor([0.0]), 0.1, at_kink=0.1), kp.clamp(kp.tensor([0.0]), 0, 1, at_kink=(0, 1)),
        kp.hardtanh(kp.tensor([0.0]), at_kink=(1, 0.5))]) == []
    for preset in PRESETS:
        with kp.kink_policy(preset):
            assert _count_warnings(lambda: [
                kp.relu(kp.tensor([0.0])), kp.leaky_relu(kp.tensor([0.0]), 0.2),
                kp.abs(kp.tensor([0.0])), kp.relu6(kp.tensor([0.0])), kp.hardtanh(kp.tensor([0.0])),
                kp.clamp(kp.tensor([0.0]), 0, 1), kp.l1_loss(kp.tensor([0.0]), [0.0])]) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), np.float64("nan")])
def test_non_finite_policy_values_raise(bad):
    x = kp.tensor([0.0])
    with pytest.raises(ValueError, match="finite"):
        kp.relu(x, at_kink=bad)
    with pytest.raises(ValueError, match="finite"):
        kp.clamp(x, 0, 1, at_kink=(0, bad))
    with pytest.raises(ValueError, match="finite"), kp.kink_policy(abs=bad):
        pass
    with pytest.raises(ValueError, match="finite"):
        kp.l1_loss(x, x, at_kink=bad)


def test_negative_zero_is_a_kink_in_forward_values_too():
    x = np.array([NEG0, 0.0])
    assert np.array_equal(kp.relu(x).numpy(), [0, 0])
    assert np.array_equal(kp.abs(x).numpy(), [0, 0])
    assert not np.signbit(kp.abs(x).numpy()).any()


def test_replace_arm_reproduces_the_2021_paper_code_not_the_chain_rule():
    """relu=replace:a sets the cotangent at the kink to a (REFERENCES.md section 2); it is a
    labelled comparison arm, distinct from at_kink=a, which multiplies."""
    x = kp.tensor(np.array([-1.0, 0.0, 0.0, 2.0]), requires_grad=True)
    with kp.kink_policy(relu="replace:1"):
        y = kp.relu(x)
    y.backward(np.array([3.0, 5.0, -7.0, 11.0]))
    np.testing.assert_array_equal(x.grad, [0.0, 1.0, 1.0, 11.0])
    x.grad = None
    kp.relu(x, at_kink=1.0).backward(np.array([3.0, 5.0, -7.0, 11.0]))
    np.testing.assert_array_equal(x.grad, [0.0, 5.0, -7.0, 11.0])
    with pytest.raises(ValueError, match="finite"):
        kp.relu(x, at_kink="replace:nan")
