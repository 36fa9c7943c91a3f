"""The directional policy in torch: on networks with planted kinks the gradient is the ordinary
gradient at theta + t d (small t, no kink there), and it equals the NumPy engine's directional
gradient for the same direction."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

import torch_nets as tn  # noqa: E402

import kinkprop as kp  # noqa: E402
import kinkprop.torch as kpt  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
D = torch.float64


class PlantedMLP(nn.Module):
    """Integer first layer (exact zeros before the relu), max-pooling over features (tied
    integers), then smooth layers."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(4, 8).double()
        self.fc2 = nn.Linear(4, 5).double()
        self.fc3 = nn.Linear(5, 3).double()
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randint(-1, 2, (8, 4), generator=g))
            self.fc1.bias.zero_()
            for m in (self.fc2, self.fc3):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=D) * 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=D) * 0.1)

    def forward(self, x):
        h = F.relu(self.fc1(x))  # (N, 8) integers, many zeros
        h = F.max_pool2d(h.reshape(-1, 1, 2, 4), 2, stride=(2, 1)).reshape(-1, 3)  # ties
        h = torch.cat([h, torch.maximum(h[:, :1], h[:, 1:2])], 1)  # more ties
        return self.fc3(torch.relu(self.fc2(h)))


class PlantedCNN(nn.Module):
    """conv (integer weights) -> batch-norm -> relu -> max-pool -> linear. The batch holds x and
    -x, so each channel's batch mean is exactly 0 and the batch-norm output is exactly 0 where
    the convolution is."""

    def __init__(self, seed, batch_norm=True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False).double()
        self.bn = nn.BatchNorm2d(3).double() if batch_norm else nn.Identity()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 2 * 2, 2).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randint(-1, 2, self.conv.weight.shape, generator=g))

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.bn(self.conv(x)))).flatten(1))


def _data(kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randint(-1, 2, (6, 4), generator=g).to(D)
        return x, torch.randint(0, 3, (6,), generator=g)
    x = torch.randint(-1, 2, (3, 1, 4, 4), generator=g).to(D)
    return torch.cat([x, -x]), torch.randint(0, 2, (6,), generator=g)


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _plain_grads(model, x, y, **policy):
    model.zero_grad()
    with kpt.kink_policy(**policy):
        F.cross_entropy(model(x), y).backward()
    return _grads(model)


@pytest.mark.parametrize("kind,seed", [("mlp", 0), ("mlp", 1), ("cnn", 0), ("cnn", 2)])
def test_directional_gradient_is_the_one_sided_limit(kind, seed):
    model = PlantedMLP(seed) if kind == "mlp" else PlantedCNN(seed)
    x, y = _data(kind, seed)
    model.zero_grad()
    with kpt.census(model) as c, kpt.kink_policy("directional", model=model, seed=seed) as s:
        F.cross_entropy(model(x), y).backward()
    g_dir = _grads(model)
    report = s.report()
    direction = s.directional.current
    hit = c.read()
    assert report.kinks > 0 and report.unresolved == 0
    relu_hits = sum(v.hits for k, v in hit.sites.items() if v.primitive == "relu")
    assert relu_hits > 0
    g_ref = _plain_grads(model, x, y, preset="pytorch")
    assert max((a - b).abs().max().item() for a, b in zip(g_dir, g_ref)) > 1e-3  # kinks matter

    t = 1e-7
    with torch.no_grad():
        for p, d in zip(model.parameters(), direction):
            p.add_(d, alpha=t)
    model.zero_grad()
    with kpt.census(model) as c2:
        F.cross_entropy(model(x), y).backward()  # torch's own rules
    moved = c2.read()
    assert sum(v.hits for v in moved.sites.values() if v.primitive == "relu") == 0
    for a, b in zip(g_dir, _grads(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_batch_norm_running_stats_update_once_per_forward():
    torch.manual_seed(0)
    a, b = PlantedCNN(0), PlantedCNN(0)
    x, y = _data("cnn", 0)
    F.cross_entropy(a(x), y).backward()
    with kpt.kink_policy("directional", model=b):
        F.cross_entropy(b(x), y).backward()
    assert torch.equal(a.bn.running_mean, b.bn.running_mean)
    assert torch.equal(a.bn.running_var, b.bn.running_var)
    assert a.bn.num_batches_tracked.item() == b.bn.num_batches_tracked.item() == 1
    assert all(type(p) is nn.Parameter for p in b.parameters())  # put back after the forward


def test_seeded_directions_are_reproducible_and_fresh_each_step():
    model = PlantedMLP(0)
    x, y = _data("mlp", 0)
    runs = []
    for _ in range(2):
        with kpt.kink_policy("directional", model=model, seed=5) as s:
            dirs = []
            for _ in range(2):
                model(x)
                dirs.append([d.clone() for d in s.directional.current])
        runs.append(dirs)
    for a, b in zip(runs[0], runs[1]):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(runs[0][0][0], runs[0][1][0])  # a new direction per forward
    # the draw: uniform on [-1, 1] from the CPU generator's raw 64-bit words (NumPy's SFC64
    # seeded with the seed), k / 2^63 in float64
    bits = np.random.SFC64(5)
    first = [torch.from_numpy(bits.random_raw(p.numel()).view(np.int64)).reshape(p.shape).to(D)
             * 2.0**-63 for p in model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(first, runs[0][0]))


def test_matches_the_numpy_engine_for_the_same_direction():
    """Every rerouted op (TorchNet) with one explicit direction, in both engines."""
    p = tn.make_params(0)
    rng = np.random.default_rng(5)
    names = ["w1", "b1", "w2", "lo", "hi", "v"]
    d = {k: rng.standard_normal(p[k].shape) for k in names}
    net = tn.TorchNet(p)
    x = torch.tensor(p["x"])
    params = {"w1": net.conv1.weight, "b1": net.conv1.bias, "w2": net.conv2.weight,
              "lo": net.lo, "hi": net.hi, "v": net.v}
    direction = {params[k]: torch.tensor(d[k]) for k in names}
    with kpt.kink_policy("directional", model=net, directions=[direction]) as scope:
        net(x).backward()
    report_t = scope.report(warn=False)
    ts = {k: kp.tensor(p[k], requires_grad=True) for k in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with kp.kink_policy("directional"), kp.directional_options(
                directions=[{ts[k]: d[k] for k in names}], max_directions=1):
            tn.kp_loss(p, kp.tensor(p["x"]), *(ts[k] for k in names)).backward()
    from kinkprop.kinks import directional as kd

    report_k = kd.last_report
    assert (report_t.kinks, report_t.unresolved) == (report_k.kinks, report_k.unresolved)
    assert report_t.kinks > 400
    for k in names:
        want = ts[k].grad
        np.testing.assert_allclose(params[k].grad.numpy(), want, rtol=0,
                                   atol=1e-12 * max(1.0, np.abs(want).max()), err_msg=k)


def test_ties_along_the_direction_are_immaterial_if_random_unresolved_if_given():
    model = nn.Linear(2, 2).double()
    x = torch.ones(1, 2, dtype=D)

    def run(**kw):
        model.zero_grad()
        with kpt.kink_policy("directional", model=model, **kw) as s:
            h = model(x)
            torch.maximum(h, h * 1).sum().backward()  # the same tangent on both sides
        return s

    s = run(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = s.report()
    assert (report.kinks, report.unresolved, report.immaterial) == (2, 0, 2)
    s = run(directions=[[torch.ones(2, 2, dtype=D), torch.ones(2, dtype=D)]])
    with pytest.warns(kpt.UnresolvedKinkWarning):
        report = s.report()
    assert (report.kinks, report.unresolved) == (2, 2)
    assert report.unresolved_sites == [("maximum#0", 2)]
    assert model.bias.grad.tolist() == [1.0, 1.0]  # an equal split of maximum(h, h)


def test_directional_grad_functional_and_fallback():
    w = torch.zeros(4, dtype=D, requires_grad=True)
    direction = [torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=D)]
    with pytest.warns(kpt.UnresolvedKinkWarning):
        (g,), report = kpt.directional_grad(lambda v: F.relu(v).sum(), [w],
                                            directions=[direction])
    assert g.tolist() == [1.0, 0.0, 0.0, 1.0]  # the zero tangent takes pytorch's relu'(0) = 0
    assert (report.kinks, report.unresolved) == (4, 1)  # a given direction: unresolved
    with pytest.warns(kpt.UnresolvedKinkWarning):
        (g,), _ = kpt.directional_grad(lambda v: F.relu(v).sum(), [w], directions=[direction],
                                       fallback="jax", relu="directional", preset="pytorch")
    assert g.tolist() == [1.0, 0.0, 0.0, 1.0]  # jax's relu'(0) is 0 too


def test_direction_on_a_subset_of_parameters():
    """Biases only: the planted zeros move with their unit's bias, so the limit still holds."""
    model = PlantedMLP(3)
    x, y = _data("mlp", 3)
    model.zero_grad()
    only_bias = lambda name, p: name.endswith("bias")  # noqa: E731
    with kpt.kink_policy("directional", model=model, params=only_bias, seed=1) as s:
        F.cross_entropy(model(x), y).backward()
    report = s.report()
    assert report.kinks > 0 and report.unresolved == 0
    g_dir = _grads(model)
    d = dict(zip([n for n, _ in model.named_parameters() if n.endswith("bias")],
                 s.directional.current))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in d:
                p.add_(d[n], alpha=1e-7)
    g_t = _plain_grads(model, x, y)
    for a, b in zip(g_dir, g_t):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_patch_with_the_directional_policy_on_one_layer():
    model = PlantedCNN(0, batch_norm=False)
    x, y = _data("cnn", 0)
    g_ref = _plain_grads(model, x, y, preset="pytorch")
    handle = kpt.patch(model, "directional", modules=["pool"], seed=0)
    try:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        report = handle.report()
    finally:
        handle.remove()
    assert [d.primitive for d in report.details] == ["max_pool2d"]
    assert report.details[0].name == "pool:max_pool2d"
    g = _grads(model)
    assert any((a - b).abs().max().item() > 1e-6 for a, b in zip(g, g_ref))
    import torch.autograd.forward_ad as fwAD

    assert fwAD._current_level == -1  # the per-forward dual level is closed
