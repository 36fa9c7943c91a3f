"""The device census: counts per site, +0 / -0 apart, no host sync per op, gradients unchanged."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

import torch_nets as tn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import kinkprop.torch as kpt  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
D = torch.float64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3).double()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(self.act(x)))  # the same module twice


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.pool = nn.MaxPool2d(2, stride=1)

    def forward(self, x):
        h = self.block(x)
        return self.pool(h.reshape(1, 1, 2, 3)).sum() + torch.clamp(h, -1, 0).sum()


def test_sites_by_module_path_signed_zeros_and_accumulation():
    net = Net()
    with torch.no_grad():
        net.block.fc.weight.copy_(torch.eye(3))
        net.block.fc.bias.zero_()
    x = torch.tensor([[0.0, -0.0, 1.0], [-0.0, 2.0, 2.0]], dtype=D)
    with kpt.census(net) as c:
        for _ in range(3):
            net(x)
            c.step()
        r = c.read()
    assert list(r.sites) == ["block.act:relu", "block.act:relu#1", "pool:max_pool2d", "clamp#0"]
    first = r.sites["block.act:relu"]
    assert (first.calls, first.evaluated, first.hits) == (3, 18, 9)
    assert first.detail == {"+0": 3, "-0": 6}
    # relu(-0.0) is +0.0 or -0.0 depending on the kernel, and eye @ x + 0 turns -0 into +0: the
    # second application sees +0 only
    second = r.sites["block.act:relu#1"]
    assert second.detail["-0"] == 0 and second.hits == 9
    pool = r.sites["pool:max_pool2d"]  # windows of [[0, 0, 1], [0, 2, 2]]: the second is tied
    assert (pool.evaluated, pool.hits) == (6, 3)
    clamp = r.sites["clamp#0"]
    assert clamp.detail == {"low": 0, "high": 9}
    assert r.steps == 3 and r.world_size == 1
    assert r.hits == sum(s.hits for s in r.sites.values())
    assert "block.act:relu" in str(r)


def test_sites_without_a_model_are_numbered_in_call_order_per_step():
    x = torch.tensor([0.0, 1.0, 0.0])
    with kpt.census() as c:
        for _ in range(2):
            F.relu(x)
            torch.relu(x)
            torch.maximum(x, torch.zeros(3))
            c.step()
    r = c.read()
    assert list(r.sites) == ["relu#0", "relu#1", "maximum#0"]
    assert r.sites["relu#1"].calls == 2 and r.sites["relu#1"].hits == 4
    assert r.sites["maximum#0"].detail == {"ties": 4}


def test_counts_match_the_planted_network_and_gradients_are_unchanged():
    p = tn.make_params(0)
    x = torch.tensor(p["x"])
    net = tn.TorchNet(p)
    net(x).backward()
    native = net.named_grads(x)
    net.zero_grad()
    with kpt.census(net) as c:
        net(x).backward()
    assert all(np.array_equal(native[k], g) for k, g in net.named_grads(x).items()
               if g is not None)
    r = c.read()
    h1 = net.conv1(x).detach()
    h2 = net.conv2(x).detach()
    assert r.sites["relu:relu"].detail == {"+0": int((h1 == 0).sum()), "-0": 0}
    assert r.sites["relu#0"].detail == {"+0": 0, "-0": int((h1 == 0).sum())}  # relu(-h1)
    assert r.sites["relu6:relu6"].detail == {"low": int((h1 == -5).sum()),
                                             "high": int((h1 == 1).sum())}
    assert r.sites["maximum#0"].hits == int((h1 == h2).sum())
    assert r.sites["clamp#1"].detail == {"low": int((h1 == net.lo.detach()).sum()),
                                         "high": int((h1 == net.hi.detach()).sum())}
    along = (h1 == h1.amax(1, keepdim=True)).sum(1)
    assert r.sites["max_axis#0"].hits == int((along > 1).sum())
    assert r.sites["max_axis#0"].evaluated == along.numel()
    windows = F.unfold(torch.relu(h1).reshape(-1, 1, 6, 6), 2, stride=2)  # (N*K, 4, 9)
    tied = (windows == windows.amax(1, keepdim=True)).sum(1) > 1
    assert r.sites["pool:max_pool2d"].hits == int(tied.sum())


class _Syncs(TorchFunctionMode):
    """Records calls that move a tensor's value to the host."""

    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_no_host_sync_per_op_only_in_read():
    model = tn.TorchNet(tn.make_params(1))
    x = torch.tensor(tn.make_params(1)["x"])
    spy = _Syncs()
    with spy, kpt.census(model) as c, kpt.kink_policy("jax", max_pool2d="split"):
        model(x).backward()
        c.step()
        assert spy.calls == []
        c.read()
    assert spy.calls  # the single transfer of read()
    for site in c._sites.values():
        assert isinstance(site.counts, torch.Tensor) and site.counts.device == x.device


def test_census_and_policy_together_and_reset():
    x = torch.tensor([0.0, 1.0, 0.0], dtype=D, requires_grad=True)
    with kpt.census() as c, kpt.kink_policy(relu=1.0):
        F.relu(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    assert c.read().sites["relu#0"].hits == 2
    c.reset()
    assert c.read().sites == {}
