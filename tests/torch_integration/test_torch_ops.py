"""kinkprop.torch op by op: the value at each kink comes from the registry, for every preset and
through every torch entry point (functional, torch.*, Tensor methods, nn modules, in place)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

import kinkprop as kp  # noqa: E402
import kinkprop.torch as kpt  # noqa: E402
from kinkprop.kinks.spec import SPECS  # noqa: E402

PRESETS = list(kp.PRESETS)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
D = torch.float64


def grad_of(f, x, **policy):
    x = torch.tensor(x, dtype=D, requires_grad=True)
    with kpt.kink_policy(**policy):
        y = f(x)
    y.sum().backward()
    return x.grad.tolist()


def value(name, preset, slope=None):
    return SPECS[name].resolve(kp.PRESETS[preset].values[name], slope)


@pytest.mark.parametrize("preset", PRESETS)
def test_elementwise_kinks_take_the_registry_value(preset):
    v = value("relu", preset)
    for f in (F.relu, torch.relu, lambda x: x.relu(), nn.ReLU(),
              lambda x: F.relu(x * 1, inplace=True), lambda x: (x * 1).relu_(),
              lambda x: nn.ReLU(inplace=True)(x * 1)):
        assert grad_of(f, [-1.0, 0.0, -0.0, 2.0], preset=preset) == [0.0, v, v, 1.0]
    v = value("leaky_relu", preset, 0.2)
    for f in (lambda x: F.leaky_relu(x, 0.2), nn.LeakyReLU(0.2),
              lambda x: F.leaky_relu(x * 1, 0.2, inplace=True)):
        assert grad_of(f, [-1.0, 0.0, 2.0], preset=preset) == [0.2, v, 1.0]
    v = value("abs", preset)
    for f in (torch.abs, lambda x: x.abs(), abs, torch.absolute, lambda x: (x * 1).abs_()):
        assert grad_of(f, [-1.0, 0.0, 2.0], preset=preset) == [-1.0, v, 1.0]
    lo, hi = value("hardtanh", preset)
    for f in (F.hardtanh, nn.Hardtanh(), lambda x: F.hardtanh(x * 1, inplace=True)):
        assert grad_of(f, [-2.0, -1.0, 0.0, 1.0, 2.0], preset=preset) == [0, lo, 1, hi, 0]
    lo, hi = value("relu6", preset)
    for f in (F.relu6, nn.ReLU6(), lambda x: F.hardtanh(x, 0.0, 6.0)):
        assert grad_of(f, [-1.0, 0.0, 3.0, 6.0, 7.0], preset=preset) == [0, lo, 1, hi, 0]
    lo, hi = value("hardswish", preset)
    for f in (F.hardswish, nn.Hardswish(), lambda x: F.hardswish(x * 1, inplace=True)):
        assert grad_of(f, [-4.0, -3.0, 0.0, 3.0, 4.0], preset=preset) == [0, lo, 0.5, hi, 1]
    lo, hi = value("clamp", preset)
    for f in (lambda x: torch.clamp(x, -1, 1), lambda x: x.clamp(-1.0, 1.0),
              lambda x: torch.clip(x, min=-1, max=1), lambda x: (x * 1).clamp_(-1, 1)):
        assert grad_of(f, [-2.0, -1.0, 0.0, 1.0, 2.0], preset=preset) == [0, lo, 1, hi, 0]
    assert grad_of(lambda x: torch.clamp_min(x, 0.0), [-1.0, 0.0, 1.0], preset=preset) == \
        [0, lo, 1]
    assert grad_of(lambda x: x.clamp_max(0.0), [-1.0, 0.0, 1.0], preset=preset) == [1, hi, 0]


@pytest.mark.parametrize("preset", PRESETS)
def test_ties_follow_the_registry_rule(preset):
    shares = {"split": [0.5, 0.5], "first": [1.0, 0.0], "last": [0.0, 1.0]}
    a = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    b = torch.tensor([1.0, 3.0], dtype=D, requires_grad=True)
    for f, name in ((torch.maximum, "maximum"), (torch.max, "maximum"),
                    (torch.minimum, "minimum"), (lambda p, q: p.min(q), "minimum")):
        a.grad = b.grad = None
        with kpt.kink_policy(preset):
            f(a, b).sum().backward()
        sa, sb = shares[kp.PRESETS[preset].values[name]]
        assert (a.grad[0].item(), b.grad[0].item()) == (sa, sb)
    x = [[3.0, 1.0, 3.0], [0.0, 2.0, 2.0]]
    rule = kp.PRESETS[preset].values["max_axis"]
    want = {"first": [[1, 0, 0], [0, 1, 0]], "last": [[0, 0, 1], [0, 0, 1]],
            "split": [[0.5, 0, 0.5], [0, 0.5, 0.5]]}[rule]
    assert grad_of(lambda t: torch.max(t, dim=1).values, x, preset=preset) == want
    assert grad_of(lambda t: t.max(1, keepdim=True)[0], x, preset=preset) == want
    rule = kp.PRESETS[preset].values["max"]
    want = {"first": [[1, 0, 0], [0, 0, 0]], "last": [[0, 0, 1], [0, 0, 0]],
            "split": [[0.5, 0, 0.5], [0, 0, 0]]}[rule]
    assert grad_of(torch.max, x, preset=preset) == want
    assert grad_of(torch.amax, x, preset=preset) == want
    rule = kp.PRESETS[preset].values["min"]
    want = {"first": [[0, 0, 0], [1, 0, 0]], "last": [[0, 0, 0], [1, 0, 0]],
            "split": [[0, 0, 0], [1, 0, 0]]}[rule]
    assert grad_of(lambda t: t.amin(), x, preset=preset) == want


def test_torch_max_along_a_dim_returns_values_and_torchs_indices():
    x = torch.tensor([[3.0, 1.0, 3.0], [0.0, 2.0, 2.0]], dtype=D, requires_grad=True)
    native = torch.max(x.detach(), 1)
    with kpt.kink_policy("pytorch", max_axis="last"):
        out = torch.max(x, 1)
        values, indices = x.min(dim=0)
    assert isinstance(out, torch.return_types.max)
    assert torch.equal(out.values, native.values) and torch.equal(out.indices, native.indices)
    assert isinstance(x.min(dim=0), torch.return_types.min)
    assert torch.equal(indices, x.detach().min(dim=0).indices)


@pytest.mark.parametrize("rule", ["first", "last", "split"])
def test_max_pool_ties_module_functional_and_indices(rule):
    x = torch.tensor([[[[1.0, 1.0, 0.0, 2.0], [1.0, 0.0, 2.0, 2.0],
                        [0.0, 0.0, 5.0, 4.0], [3.0, 3.0, 3.0, 3.0]]]], dtype=D)
    want = {
        "first": [[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]],
        "last": [[0, 0, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]],
        "split": [[1 / 3, 1 / 3, 0, 1 / 3], [1 / 3, 0, 1 / 3, 1 / 3], [0, 0, 1, 0],
                  [0.5, 0.5, 0, 0]],
    }[rule]
    for f in (nn.MaxPool2d(2), lambda t: F.max_pool2d(t, 2), lambda t: torch.max_pool2d(t, 2),
              lambda t: nn.MaxPool2d(2, return_indices=True)(t)[0],
              lambda t: F.max_pool2d(t[0], 2)):  # the last one unbatched (C, H, W)
        assert grad_of(f, x.tolist(), max_pool2d=rule) == [[want]]
    with kpt.kink_policy(max_pool2d=rule):
        out, idx = F.max_pool2d(x, 2, return_indices=True)
    ref_out, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)


def _pool_reference(x, kernel, stride, padding, dilation, ceil_mode, rule):
    """Gradient of sum(max_pool2d) by brute force over windows (split or last)."""
    out = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    g = torch.zeros_like(x)
    n, c, h, w = x.shape
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            cells = [(i * stride - padding + a * dilation, j * stride - padding + b * dilation)
                     for a in range(kernel) for b in range(kernel)]
            cells = [(r, q) for r, q in cells if 0 <= r < h and 0 <= q < w]
            for nn_ in range(n):
                for cc in range(c):
                    best = out[nn_, cc, i, j]
                    tied = [(r, q) for r, q in cells if x[nn_, cc, r, q] == best]
                    if rule == "split":
                        for r, q in tied:
                            g[nn_, cc, r, q] += 1.0 / len(tied)
                    else:
                        r, q = tied[-1]
                        g[nn_, cc, r, q] += 1.0
    return g


@pytest.mark.parametrize("rule", ["split", "last"])
@pytest.mark.parametrize("geometry", [(3, 2, 1, 1, False), (2, 2, 0, 2, True),
                                      (3, 2, 1, 1, True), (2, 1, 1, 1, False)])
def test_max_pool_dilation_ceil_mode_padding_overlap(rule, geometry):
    kernel, stride, padding, dilation, ceil = geometry
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (2, 2, 7, 6), generator=gen).to(D).requires_grad_()
    with kpt.kink_policy(max_pool2d=rule):
        F.max_pool2d(x, kernel, stride, padding, dilation, ceil).sum().backward()
    ref = _pool_reference(x.detach(), kernel, stride, padding, dilation, ceil, rule)
    torch.testing.assert_close(x.grad, ref, rtol=0, atol=1e-14)


def test_clamp_with_tensor_bounds_shares_with_the_bound():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=D, requires_grad=True)
    lo = torch.tensor(-1.0, dtype=D, requires_grad=True)
    hi = torch.full((5,), 1.0, dtype=D, requires_grad=True)
    with kpt.kink_policy("jax"):  # clamp (0.5, 0.5)
        torch.clamp(x, lo, hi).sum().backward()
    assert x.grad.tolist() == [0, 0.5, 1, 0.5, 0]
    assert lo.grad.item() == 1.5
    assert hi.grad.tolist() == [0, 0, 0, 0.5, 1]


def test_l1_loss_reductions_and_kink():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D, requires_grad=True)
    t = torch.tensor([1.0, 1.0, 3.0, 5.0], dtype=D)
    for reduction, scale in (("mean", 0.25), ("sum", 1.0), ("none", 1.0)):
        x.grad = None
        with kpt.kink_policy("pytorch", l1_loss=0.5):
            F.l1_loss(x, t, reduction=reduction).sum().backward()
        assert x.grad.tolist() == [0.5 * scale, scale, 0.5 * scale, -scale]
    x.grad = None
    with kpt.kink_policy("jax"):
        nn.L1Loss()(x, t).backward()
    assert x.grad.tolist() == [0.25, 0.25, 0.25, -0.25]


def test_outside_any_scope_torch_is_untouched_and_policy_is_captured_at_forward():
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=D, requires_grad=True)
    y = F.relu(x)
    assert type(y.grad_fn).__name__ == "ReluBackward0"
    with kpt.kink_policy(relu=1.0):
        y = F.relu(x)
        z = F.relu(x * 1)
    with kpt.kink_policy(relu=0.25):  # backward under another policy changes nothing
        y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1]
    x.grad = None
    z.sum().backward()  # outside every scope
    assert x.grad.tolist() == [0, 1, 1]
    assert not torch._C._is_torch_function_mode_enabled()


def test_nested_scopes_innermost_wins_and_overrides_compose():
    x = torch.tensor([0.0, 0.0], dtype=D, requires_grad=True)
    with kpt.kink_policy("jax", relu=1.0):
        a = F.relu(x[:1])
        with kpt.kink_policy(relu=0.5):  # overrides on top of kinkprop's default preset
            b = F.relu(x[1:])
            c = F.leaky_relu(x[:1], 0.1)
    (a + b + c).sum().backward()
    assert x.grad.tolist() == [1.0 + 0.1, 0.5]  # leaky_relu: pytorch's "left" = slope


def test_patch_applies_to_chosen_modules_only_and_is_removable():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False),
                          nn.ReLU()).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[2].weight.copy_(torch.eye(2))
    x = torch.tensor([[0.0, 1.0]], dtype=D, requires_grad=True)

    def grad():
        x.grad = None
        model(x).sum().backward()
        return x.grad.tolist()

    assert grad() == [[0.0, 1.0]]
    handle = kpt.patch(model, relu=1.0, modules=["3"])  # the second ReLU only
    assert grad() == [[0.0, 1.0]]  # the first ReLU already stops the gradient at 0
    handle.remove()
    h1 = kpt.patch(model, "jax", relu=1.0, modules=[nn.ReLU])
    assert grad() == [[1.0, 1.0]]
    with kpt.kink_policy(relu=0.0):  # a patched module's policy is the innermost
        assert grad() == [[1.0, 1.0]]
    h1.remove()
    assert grad() == [[0.0, 1.0]]
    h2 = kpt.patch(model, relu=0.5)  # the whole model
    assert grad() == [[0.25, 1.0]]
    h2.remove()
    with pytest.raises(ValueError, match="no submodule"):
        kpt.patch(model, relu=1.0, modules=["nope"])


def test_patch_without_preset_builds_on_the_policy_in_force():
    model = nn.Sequential(nn.ReLU(), nn.Hardtanh())
    x = torch.tensor([0.0, 1.0], dtype=D, requires_grad=True)
    h = kpt.patch(model, relu=1.0)
    with kpt.kink_policy("jax"):  # jax's hardtanh (1, 1) holds inside the patched model
        model(x).sum().backward()
    h.remove()
    assert x.grad.tolist() == [1.0, 1.0]


def test_float32_and_bfloat16_keep_dtypes_and_values():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.tensor([-1.0, 0.0, 2.0], dtype=dtype, requires_grad=True)
        with kpt.kink_policy(relu=0.3, max="split"):
            (F.relu(x).sum() + torch.max(torch.stack([x, x])) * 3).backward()
        assert x.grad.dtype == dtype
        # x[2] is the maximum twice: 1.5 to each copy
        want = torch.tensor([0.0, 0.3, 1.0]) + torch.tensor([0.0, 0.0, 3.0])
        torch.testing.assert_close(x.grad.float(), want.to(dtype).float())


def test_double_backward_and_forward_mode_use_the_policy():
    x = torch.tensor([-1.0, 0.0, 2.0], dtype=D, requires_grad=True)
    with kpt.kink_policy(relu=0.5):
        y = F.leaky_relu(x, 0.1) * x
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert gg.tolist() == [0.2, 0.2, 2.0]  # 2 * leaky'(x); pytorch's leaky'(0) is the slope
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), kpt.kink_policy(relu=0.5):
        dual = fwAD.make_dual(torch.zeros(3, dtype=D), torch.tensor([1.0, -2.0, 4.0], dtype=D))
        tangent = fwAD.unpack_dual(F.relu(dual)).tangent
    assert tangent.tolist() == [0.5, -1.0, 2.0]


def test_registry_errors_and_warnings_reach_torch_users():
    with pytest.raises(ValueError, match="unknown non-smooth primitive"):
        with kpt.kink_policy(relux=1.0):
            pass
    with pytest.raises(ValueError, match="tie rule"):
        with kpt.kink_policy(max_pool2d=0.5):
            pass
    with pytest.raises(TypeError, match="directional"):
        with kpt.kink_policy("jax", model=nn.ReLU()):
            pass
    x = torch.tensor([0.0], dtype=D, requires_grad=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with kpt.kink_policy(abs=3.0):
            torch.abs(x).sum().backward()
    assert x.grad.item() == 3.0
    assert any("outside the Clarke interval" in str(m.message) for m in w) or \
        "abs" in SPECS["abs"]._warned


def test_directional_without_tangents_says_how_to_get_them():
    x = torch.tensor([0.0], dtype=D, requires_grad=True)
    with pytest.raises(RuntimeError, match="needs tangents"):
        with kpt.kink_policy("directional"):
            F.relu(x)


def test_import_kinkprop_does_not_import_torch():
    code = "import sys, kinkprop; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


class _Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        F.relu(self.fc(x))
        raise RuntimeError("boom")


def test_a_forward_that_raises_leaves_no_scope_behind():
    from kinkprop.torch import _scope

    model = _Boom()
    handle = kpt.patch(model, relu=1.0)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.ones(1, 2))
    handle.remove()
    with pytest.raises(RuntimeError, match="boom"):
        with kpt.kink_policy("directional", model=model):
            model(torch.ones(1, 2))
    assert type(model.fc.weight) is nn.Parameter  # the dual parameters were put back
    assert _scope._tls.frames == [] and _scope._tls.paths == [] and _scope._tls.hook_stack == []
    assert not torch._C._is_torch_function_mode_enabled()
    import torch.autograd.forward_ad as fwAD

    assert fwAD._current_level == -1
