"""The same network and inputs -- landing exactly on every kind of kink -- through both engines:
kinkprop's NumPy engine under ``kp.kink_policy`` and torch under ``kinkprop.torch.kink_policy``,
for every preset and some explicit overrides. Gradients agree to 1e-12 in float64 (the only
differences are summation orders inside conv and reductions)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_nets as tn  # noqa: E402

import kinkprop as kp  # noqa: E402
import kinkprop.torch as kpt  # noqa: E402

POLICIES = [(name, {}) for name in kp.PRESETS] + [
    ("pytorch", {"relu": 0.5}),
    ("pytorch", {"max_pool2d": "split"}),
    ("pytorch", {"maximum": "last"}),
    ("jax", {"max_pool2d": "last", "minimum": "first", "max_axis": "last", "min_axis": "split"}),
    ("tensorflow", {"leaky_relu": "right", "abs": 0.25, "hardtanh": ("left", "right"),
                    "relu6": (1.0, 0.5), "clamp": (0.25, 0.75), "max": "first", "min": "last",
                    "l1_loss": 0.7}),
]


def assert_grads_equal(got: dict, want: dict, rtol=1e-12):
    assert got.keys() == want.keys()
    for k in want:
        scale = max(1.0, float(np.abs(want[k]).max()))
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=rtol * scale, err_msg=k)


@pytest.fixture(scope="module")
def params():
    return tn.make_params(0)


@pytest.mark.parametrize("preset,overrides", POLICIES,
                         ids=[f"{p}{'+' if o else ''}{','.join(o)}" for p, o in POLICIES])
def test_torch_matches_numpy_engine_on_kinks(params, preset, overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # values outside the Clarke interval warn once
        loss_t, grads_t = tn.torch_grads(params, preset, **overrides)
        loss_k, grads_k = tn.kp_grads(params, preset, **overrides)
    assert loss_t == pytest.approx(loss_k, rel=1e-12)
    assert_grads_equal(grads_t, grads_k)


def test_the_policies_differ_on_this_network(params):
    """Guard: the network really sits on kinks, so each policy above changes the gradient."""
    base = tn.kp_grads(params, "pytorch")[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for preset, overrides in POLICIES[1:]:
            other = tn.kp_grads(params, preset, **overrides)[1]
            assert any(np.abs(other[k] - base[k]).max() > 1e-6 for k in base), (preset, overrides)


TORCH_VERSION = ".".join(torch.__version__.split("+")[0].split(".")[:2])
NATIVE_PRESET = next((name for name, p in kp.PRESETS.items()
                      if p.reproduces.startswith(f"PyTorch {TORCH_VERSION}.")), None)


@pytest.mark.skipif(NATIVE_PRESET is None, reason=f"no preset reproduces torch {torch.__version__}")
def test_preset_of_installed_torch_matches_native_torch(params):
    """With no kinkprop scope torch runs its own rules; the preset naming this torch version gives
    the same gradients through the rerouted ops (and through the NumPy engine, above)."""
    loss_n, native = tn.torch_grads(params, "native")
    loss_p, preset = tn.torch_grads(params, NATIVE_PRESET)
    assert loss_n == loss_p
    assert_grads_equal(preset, native, rtol=1e-13)


@pytest.mark.parametrize("rule", ["first", "last", "split"])
def test_max_pool_vjp_is_bitwise_the_numpy_engines(rule):
    """Overlapping windows with ties, a random cotangent: the same sums in the same order."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, (2, 3, 7, 7)).astype(np.float64)
    g = rng.standard_normal((2, 3, 4, 4))
    xt = torch.tensor(x, requires_grad=True)
    with kpt.kink_policy(max_pool2d=rule):
        out = torch.nn.functional.max_pool2d(xt, 3, stride=2, padding=1)
    out.backward(torch.tensor(g))
    xk = kp.tensor(x, requires_grad=True)
    with kp.kink_policy(max_pool2d=rule):
        kp.sum(kp.max_pool2d(xk, 3, stride=2, padding=1) * g).backward()
    assert np.array_equal(xt.grad.numpy(), xk.grad)


@pytest.mark.parametrize("name,torch_f,kp_f", [
    ("relu", torch.relu, kp.relu),
    ("leaky_relu", lambda x: torch.nn.functional.leaky_relu(x, 0.3),
     lambda x: kp.leaky_relu(x, 0.3)),
    ("abs", torch.abs, kp.abs),
    ("hardtanh", torch.nn.functional.hardtanh, kp.hardtanh),
    ("clamp", lambda x: torch.clamp(x, -1.0, 0.0), lambda x: kp.clamp(x, -1.0, 0.0)),
])
@pytest.mark.parametrize("value", [0.0, 0.3, 1.0, 1.7])
def test_elementwise_vjp_is_bitwise_the_numpy_engines(name, torch_f, kp_f, value):
    x = np.array([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0])
    g = np.random.default_rng(0).standard_normal(x.shape)
    v = (value, value) if kp.SPECS[name].kind == "pair" else value
    xt = torch.tensor(x, requires_grad=True)
    xk = kp.tensor(x, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with kpt.kink_policy(**{name: v}):
            torch_f(xt).backward(torch.tensor(g))
        with kp.kink_policy(**{name: v}):
            kp.sum(kp_f(xk) * g).backward()
    assert np.array_equal(xt.grad.numpy(), xk.grad)
