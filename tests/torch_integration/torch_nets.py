"""One network written twice: torch (nn modules and functional calls, rerouted by kinkprop.torch)
and the kinkprop NumPy engine. Inputs and first-layer weights are small integers, so in float64
every pre-activation is exact and lands on kinks: zeros (+0 and -0), ties between two feature
maps, clamp and hardtanh bounds, tied maxima in pooling windows and along axes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import kinkprop as kp

N, C, H, W = 2, 2, 6, 6
K = 4  # conv channels


def make_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = {
        "x": rng.integers(-2, 3, (N, C, H, W)).astype(np.float64),
        "w1": rng.integers(-1, 2, (K, C, 3, 3)).astype(np.float64),
        "b1": np.zeros(K),
        "w2": rng.integers(-1, 2, (K, C, 3, 3)).astype(np.float64),
        "lo": rng.integers(-2, 1, (W,)).astype(np.float64),
        "hi": rng.integers(1, 3, (W,)).astype(np.float64),
    }
    p["v"] = rng.standard_normal(_n_features())
    # the l1 target equals the network's value in about half the places (ties at l1's kink)
    h1 = kp.conv2d(p["x"], p["w1"], p["b1"], padding=1).data
    pooled = np.maximum(h1, 0).max(axis=(2, 3)) - 1.0
    p["target"] = pooled + rng.integers(0, 2, pooled.shape)
    return p


def _n_features() -> int:
    per = N * K * H * W
    return (per * 12  # relu, -0 relu, leaky, abs, relu6, hardtanh, hardswish, clamp x2, maximum,
                      # minimum, overlapping max-pool
            + N * K * 3 * 3  # 2x2 max-pool
            + N * H * W * 2  # max / min over channels
            + 3)  # full max, amax, amin


class TorchNet(nn.Module):
    def __init__(self, p):
        super().__init__()
        t = {k: torch.tensor(v, dtype=torch.float64) for k, v in p.items()}
        self.conv1 = nn.Conv2d(C, K, 3, padding=1).double()
        self.conv2 = nn.Conv2d(C, K, 3, padding=1, bias=False).double()
        with torch.no_grad():
            self.conv1.weight.copy_(t["w1"])
            self.conv1.bias.copy_(t["b1"])
            self.conv2.weight.copy_(t["w2"])
        self.lo = nn.Parameter(t["lo"])
        self.hi = nn.Parameter(t["hi"])
        self.v = nn.Parameter(t["v"])
        self.register_buffer("target", t["target"])
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.relu6 = nn.ReLU6()
        self.leaky = nn.LeakyReLU(0.1)

    def forward(self, x):
        h1 = self.conv1(x)
        h2 = self.conv2(x)
        a = self.relu(h1)
        feats = [
            a,
            F.relu(-h1.clone(), inplace=True),          # -0 kinks, in place
            self.leaky(h1),
            torch.abs(h1 - 1),
            self.relu6(h1 + 5),                          # nn.ReLU6 -> F.hardtanh(0, 6)
            F.hardtanh(h1),
            nn.functional.hardswish(h1),                 # integers: on -3 and 3 in places
            torch.clamp(h1, -1, 2),
            h1.clamp(min=self.lo, max=self.hi),          # tensor bounds
            torch.maximum(h1, h2),
            torch.min(h1, h2),                           # torch.min(a, b) is minimum
            F.max_pool2d(h1, 3, stride=1, padding=1),    # overlapping windows
            self.pool(a),                                # ties among relu zeros
            torch.max(h1, dim=1).values,
            h1.min(1)[0],
            torch.max(h1).reshape(1),
            torch.amax(h2).reshape(1),
            h2.amin().reshape(1),
        ]
        z = torch.cat([f.reshape(-1) for f in feats])
        s = (z * self.v).sum()
        pooled = torch.amax(a, dim=(2, 3)) - 1.0  # (N, K); amax along dims: the "max" rule
        return s + F.l1_loss(pooled, self.target)  # integers: input = target in places

    def named_grads(self, x):
        grads = {"w1": self.conv1.weight.grad, "b1": self.conv1.bias.grad,
                 "w2": self.conv2.weight.grad, "lo": self.lo.grad, "hi": self.hi.grad,
                 "v": self.v.grad, "x": x.grad}
        return {k: None if g is None else g.detach().numpy() for k, g in grads.items()}


def kp_loss(p, x, w1, b1, w2, lo, hi, v):
    h1 = kp.conv2d(x, w1, b1, padding=1)
    h2 = kp.conv2d(x, w2, None, padding=1)
    a = kp.relu(h1)
    feats = [
        a,
        kp.relu(-h1),
        kp.leaky_relu(h1, 0.1),
        kp.abs(h1 - 1),
        kp.relu6(h1 + 5),
        kp.hardtanh(h1),
        kp.hardswish(h1),
        kp.clamp(h1, -1.0, 2.0),
        kp.clamp(h1, lo, hi),
        kp.maximum(h1, h2),
        kp.minimum(h1, h2),
        kp.max_pool2d(h1, 3, stride=1, padding=1),
        kp.max_pool2d(a, 2),
        kp.max(h1, axis=1),
        kp.min(h1, axis=1),
        kp.reshape(kp.max(h1), (1,)),
        kp.reshape(kp.max(h2), (1,)),
        kp.reshape(kp.min(h2), (1,)),
    ]
    z = kp.concatenate([kp.reshape(f, (-1,)) for f in feats])
    s = kp.sum(z * v)
    # amax over dims (2, 3): the full-reduction rule ("max") per (n, k) -- kp.max takes one axis
    # or all, so reduce each (n, k) plane separately
    planes = [kp.reshape(kp.max(kp.getitem(a, (n, k))), (1,)) for n in range(N) for k in range(K)]
    pooled = kp.reshape(kp.concatenate(planes), (N, K)) - 1.0
    return s + kp.l1_loss(pooled, p["target"])


def torch_grads(p, preset=None, **overrides):
    """Gradients of TorchNet under kinkprop.torch.kink_policy(preset, **overrides); with
    ``preset == "native"`` torch's own rules (no kinkprop scope)."""
    import kinkprop.torch as kpt

    net = TorchNet(p)
    x = torch.tensor(p["x"], requires_grad=True)
    if preset == "native":
        loss = net(x)
    else:
        with kpt.kink_policy(preset, **overrides):
            loss = net(x)
    loss.backward()
    return float(loss), net.named_grads(x)


def kp_grads(p, preset=None, **overrides):
    names = ["x", "w1", "b1", "w2", "lo", "hi", "v"]
    ts = {k: kp.tensor(p[k], requires_grad=True) for k in names}
    with kp.kink_policy(preset, **overrides):
        loss = kp_loss(p, *(ts[k] for k in names))
        loss.backward()
    return float(loss.data), {k: ts[k].grad for k in names}
