"""Bad input gets a clear error: it names the primitive, the shapes or the valid choices."""

from __future__ import annotations

import re

import numpy as np
import pytest

import kinkprop as kp


def t(*shape, dtype=np.float64, grad=False):
    return kp.tensor(np.ones(shape, dtype=dtype), requires_grad=grad)


def raises(exc, *fragments):
    """pytest.raises matching every fragment (literally, in order)."""
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


# -- shapes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op, fn", [
    ("add", lambda a, b: a + b), ("sub", lambda a, b: a - b), ("mul", lambda a, b: a * b),
    ("div", lambda a, b: a / b), ("pow", lambda a, b: a ** b), ("add", kp.add),
    ("maximum", kp.maximum), ("minimum", kp.minimum),
    ("where", lambda a, b: kp.where(np.ones(3, bool), a, b)),
])
def test_broadcast_failure_names_the_primitive_and_both_shapes(op, fn):
    # NumPy's own message ("operands could not be broadcast together ...") names no operation
    with raises(ValueError, f"{op}: shapes (2, 3) and (4,) do not broadcast"):
        fn(t(2, 3, grad=True), t(4))
    with raises(ValueError, op, "(4,)", "(2, 3)"):  # reflected: ndarray first
        fn(np.ones(4), t(2, 3))


def test_clamp_tensor_bounds_that_do_not_broadcast():
    with raises(ValueError, "clamp: shapes (2, 3) and (4,) and (2, 3)"):
        kp.clamp(t(2, 3), np.zeros(4), np.ones((2, 3)))


def test_matmul_shapes():
    with raises(ValueError, "matmul", "(2, 3)", "(4, 5)", "3 != 4"):
        t(2, 3) @ t(4, 5)
    with raises(ValueError, "matmul", "batch", "(2, 2, 3)", "(3, 3, 1)"):
        kp.matmul(t(2, 2, 3), t(3, 3, 1))
    with raises(ValueError, "matmul", "()", "(3,)"):
        kp.matmul(t(), t(3))
    with raises(ValueError, "linear", "(8, 5)", "(4, 6)"):  # linear: x @ weight.T, its own record
        kp.linear(t(8, 5), t(4, 6))


def test_conv2d_shapes():
    with raises(ValueError, "conv2d", "(1, 2, 5, 5)", "(3, 1, 3, 3)"):
        kp.conv2d(t(1, 2, 5, 5), t(3, 1, 3, 3))
    with raises(ValueError, "conv2d", "(2, 5, 5)", "(3, 2, 3, 3)"):
        kp.conv2d(t(2, 5, 5), t(3, 2, 3, 3))
    with raises(ValueError, "conv2d", "weight", "(3, 2, 3)"):
        kp.conv2d(t(1, 2, 5, 5), t(3, 2, 3))
    with raises(ValueError, "conv2d", "bias", "(3,)", "(4,)"):
        kp.conv2d(t(1, 2, 5, 5), t(3, 2, 3, 3), t(4))
    with raises(ValueError, "conv2d", "does not fit", "(2, 2)"):
        kp.conv2d(t(1, 2, 2, 2), t(3, 2, 3, 3))


def test_pooling_arguments():
    with raises(ValueError, "max_pool2d", "4-D", "(5, 5)"):
        kp.max_pool2d(t(5, 5), 2)
    with raises(ValueError, "max_pool2d", "padding", "half"):
        kp.max_pool2d(t(1, 1, 6, 6), 2, padding=2)
    with raises(ValueError, "avg_pool2d", "does not fit"):
        kp.avg_pool2d(t(1, 1, 2, 2), 3)
    with raises(ValueError, "kernel_size", "integers"):
        kp.max_pool2d(t(1, 1, 4, 4), 1.5)


def test_cross_entropy_inputs():
    with raises(ValueError, "cross_entropy", "(N, C)", "(3, 4, 5)"):
        kp.cross_entropy(t(3, 4, 5), np.zeros(3, int))
    with raises(ValueError, "cross_entropy", "labels", "(3,)", "(2,)"):
        kp.cross_entropy(t(3, 4), np.zeros(2, int))
    with raises(TypeError, "cross_entropy", "integers", "float64"):
        kp.cross_entropy(t(3, 4), np.zeros(3))
    with raises(ValueError, "cross_entropy", "[0, 4)", "[0, 4]"):
        kp.cross_entropy(t(3, 4), np.array([0, 1, 4]))


@pytest.mark.parametrize("loss", [kp.mse_loss, kp.l1_loss, kp.hinge_loss])
def test_losses_need_equal_shapes(loss):
    with raises(ValueError, loss.__name__, "(3,)", "(3, 1)"):
        loss(t(3), t(3, 1))


def test_concatenate_and_stack_shapes():
    with raises(ValueError, "concatenate", "(2, 3)", "(3, 4)", "axis 1"):
        kp.concatenate([t(2, 3), t(3, 4)], axis=1)
    with raises(ValueError, "concatenate", "(2, 3)", "(2,)"):
        kp.concatenate([t(2, 3), t(2)])
    with raises(ValueError, "concatenate", "axis 2"):
        kp.concatenate([t(2, 3), t(2, 3)], axis=2)
    with raises(ValueError, "stack", "(2, 3)", "(3, 2)"):
        kp.stack([t(2, 3), t(3, 2)])


def test_reshape_and_shape_ops():
    with raises(ValueError, "reshape", "(6,)", "(4, 2)"):
        kp.reshape(t(6), (4, 2))
    with raises(ValueError, "reshape", "(-1, -1)"):
        t(6).reshape(-1, -1)
    with raises(ValueError, "transpose", "(0, 0)", "(2, 3)"):
        kp.transpose(t(2, 3), (0, 0))
    with raises(ValueError, "broadcast_to", "(3,)", "(2, 4)"):
        kp.broadcast_to(t(3), (2, 4))
    with raises(ValueError, "squeeze", "(2, 3)"):
        kp.squeeze(t(2, 3), 0)
    with raises(IndexError, "getitem", "(2, 3)"):
        t(2, 3)[5]


def test_reduction_arguments():
    with raises(ValueError, "max", "axis 2", "(2, 3)"):
        kp.max(t(2, 3), axis=2)
    with raises(ValueError, "min", "empty", "(0, 3)"):
        kp.min(t(0, 3))
    with raises(TypeError, "max", "axis", "(0, 1)"):
        kp.max(t(2, 3), axis=(0, 1))
    with raises(ValueError, "axis 3 out of range"):
        kp.sum(t(2, 3), axis=3)
    with raises(ValueError, "var", "ddof=1"):
        kp.var(t(1), ddof=1)


def test_non_smooth_arguments():
    with raises(ValueError, "clamp", "min", "max"):
        kp.clamp(t(3))
    with raises(ValueError, "hardtanh", "min_val 1.0", "max_val 0.0"):
        kp.hardtanh(t(3), 1.0, 0.0)


# -- gradients -------------------------------------------------------------------------------------


def test_backward_on_non_scalar_without_grad():
    y = t(3, grad=True) * 2.0
    with raises(RuntimeError, "backward()", "scalar", "(3,)", "grad="):
        y.backward()
    with raises(ValueError, "backward()", "(2,)", "(3,)"):
        y.backward(np.ones(2))


def test_backward_on_tensor_without_grad():
    with raises(RuntimeError, "does not require grad", "requires_grad=True"):
        (t(3) * 2.0).sum().backward()


def test_grad_vjp_jvp_shapes():
    with raises(ValueError, "grad", "scalar", "(3,)", "kp.vjp"):
        kp.grad(lambda x: x * 2.0)(np.ones(3))
    _, vjp_fn = kp.vjp(lambda x: x * 2.0, np.ones(3))
    with raises(ValueError, "vjp", "(2,)", "(3,)"):
        vjp_fn(np.ones(2))
    with raises(ValueError, "jvp", "(2,)", "(3,)"):
        kp.jvp(lambda x: x * 2.0, (np.ones(3),), (np.ones(2),))
    with raises(ValueError, "jvp", "1 primals", "2 tangents"):
        kp.jvp(lambda x: x * 2.0, (np.ones(3),), (np.ones(3), np.ones(3)))
    with raises(ValueError, "argnums 2", "2 arguments"):
        kp.grad(lambda a, b: (a * b).sum(), argnums=2)(np.ones(2), np.ones(2))
    with raises(TypeError, "kp.Tensor", "float"):
        kp.grad(lambda x: 1.0)(np.ones(2))


@pytest.mark.parametrize("data, dtype", [([1, 2], None), ([True, False], None),
                                         ([1.0, 2.0], np.int32), (np.arange(3), None)])
def test_integer_and_bool_tensors_cannot_require_grad(data, dtype):
    with raises(TypeError, "floating-point", "require grad"):
        kp.tensor(data, requires_grad=True, dtype=dtype)
    with raises(TypeError, "floating-point"):
        kp.Tensor(data, requires_grad=True, dtype=dtype)


def test_float_formats_can_require_grad():
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        assert kp.tensor([1.0], requires_grad=True, dtype=dtype).requires_grad


def test_second_backward_through_a_released_graph():
    x = kp.tensor(np.array([-1.0, 2.0]), requires_grad=True)
    y = (kp.relu(x) * x).sum()
    y.backward()
    assert np.array_equal(x.grad, [0, 4])
    with raises(RuntimeError, "second time", "retain_graph=True"):
        y.backward()


def test_retain_graph_allows_a_second_backward_which_accumulates():
    x = kp.tensor(np.array([-1.0, 2.0]), requires_grad=True)
    y = (kp.relu(x) * x).sum()
    y.backward(retain_graph=True)
    y.backward(retain_graph=True)
    assert np.array_equal(x.grad, [0, 8])
    y.backward()  # the last one may release
    assert np.array_equal(x.grad, [0, 12])
    with raises(RuntimeError, "retain_graph=True"):
        y.backward()
    x.zero_grad()
    (x * 3.0).sum().backward()  # a fresh graph starts from zero after zero_grad
    assert np.array_equal(x.grad, [3, 3])


# -- policies --------------------------------------------------------------------------------------


def enter(*preset, **overrides):
    with kp.kink_policy(*preset, **overrides):
        pass


def test_unknown_preset_lists_the_valid_ones():
    with raises(ValueError, "unknown kink-policy preset 'pytorch-1.0'", "pytorch", "pytorch-2.14",
                "jax", "tensorflow", "directional"):
        enter("pytorch-1.0")
    with raises(ValueError, "'mxnet'", "valid", "jax"):
        kp.parse_policy("mxnet,relu=1")


def test_unknown_primitive_lists_the_valid_ones():
    with raises(ValueError, "unknown non-smooth primitive 'relu7'", "relu", "leaky_relu", "clamp",
                "max_pool2d", "l1_loss"):
        enter(relu7=1.0)
    with raises(ValueError, "unknown non-smooth primitive 'sigmoid'"):
        kp.parse_policy("pytorch,sigmoid=1")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_policy_values_are_rejected(value):
    with raises(ValueError, "relu", "finite"), kp.kink_policy(relu=value):
        pass
    with raises(ValueError, "clamp", "high kink", "finite"), kp.kink_policy(clamp=(0.0, value)):
        pass
    with raises(ValueError, "leaky_relu", "finite"):
        kp.leaky_relu(t(2), 0.1, at_kink=value)
    with raises(ValueError, "relu", "finite"):
        kp.parse_policy(f"relu={value}")


@pytest.mark.parametrize("value", ["middle", "Split", 0.5, 1, "none"])
def test_tie_rules_outside_split_first_last_are_rejected(value):
    with raises(ValueError, "max_pool2d", "split, first, last"):
        enter(max_pool2d=value)
    with raises(ValueError, "maximum", "split, first, last"):
        kp.maximum(t(2), t(2), ties=value)
    with raises(ValueError, "max_axis", "split, first, last"):
        kp.max(t(2, 2), axis=0, ties=value)


def test_malformed_kink_values_are_rejected():
    with raises(ValueError, "relu", "left, right", "'middle'"):
        kp.relu(t(2), at_kink="middle")
    with raises(ValueError, "relu", "finite number", "True"):
        kp.relu(t(2), at_kink=True)
    with raises(ValueError, "clamp", "two kinks", "(at_low, at_high)", "0.5"):
        kp.clamp(t(2), 0, 1, at_kink=0.5)
    with raises(ValueError, "hardtanh", "two kinks"):
        kp.hardtanh(t(2), at_kink=(0, 0.5, 1))
    with raises(ValueError, "relu6", "two kinks", "'left'"), kp.kink_policy(relu6="left"):
        pass
    with raises(ValueError, "preset 'jax' must come first"):
        kp.parse_policy("relu=1,jax")
