"""A one-minute demo: train a tiny ReLU network with backprop and print loss and gradient facts."""

from __future__ import annotations

import contextlib

import numpy as np

from . import nn
from .kinks.policy import kink_policy
from .optim import SGD
from .primitives import cross_entropy
from .tape import Hooks
from .tensor import Tensor


def _spirals(n: int, rng: np.random.Generator):
    t = rng.uniform(0.25, 3.0, n) * np.pi
    label = rng.integers(0, 2, n)
    sign = np.where(label == 0, 1.0, -1.0)
    x = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], axis=1) / 6
    return (x + rng.normal(0, 0.05, x.shape)).astype(np.float32), label


@contextlib.contextmanager
def _count_relu_zeros(counter):
    def hook(prim, site, res, ans, node):
        if prim.name == "relu":
            counter["calls"] += ans.size
            counter["zeros"] += prim.hits(res)

    Hooks.on_kink.append(hook)
    try:
        yield counter
    finally:
        Hooks.on_kink.remove(hook)


def run_demo(seed: int = 0, steps: int = 200, echo=print) -> dict:
    rng = np.random.default_rng(seed)
    x, y = _spirals(512, rng)
    model = nn.build_model("mlp", (2,), 2, seed=seed, widths=(32, 32))
    opt = SGD(model.parameters(), lr=0.5, momentum=0.9)
    counter = {"calls": 0, "zeros": 0}
    echo("kinkprop demo: a 2-32-32-2 ReLU network learns two spirals with backprop (float32)")
    with _count_relu_zeros(counter):
        for step in range(1, steps + 1):
            opt.zero_grad()
            logits = model(Tensor(x))
            loss = cross_entropy(logits, y)
            loss.backward()
            opt.step()
            if step in (1, steps // 4, steps // 2, steps):
                acc = float((logits.data.argmax(1) == y).mean())
                echo(f"  step {step:4d}  loss {float(loss.data):.4f}  train accuracy {acc:.3f}")
    echo(f"ReLU inputs seen: {counter['calls']:,}; exactly zero (on the kink): {counter['zeros']}")

    # The same gradient under ReLU'(0) = 0 and = 1, at a point placed exactly on kinks:
    # the input (0, 0) makes every first-layer pre-activation equal its bias; zero the biases.
    first = model[1]
    first.bias.data[:] = 0.0
    x0 = np.zeros((4, 2), np.float32)
    grads = {}
    for label, policy in [("ReLU'(0)=0", {"relu": 0.0}), ("ReLU'(0)=1", {"relu": 1.0}),
                          ("directional", "directional")]:
        model.zero_grad()
        with kink_policy(**policy) if isinstance(policy, dict) else kink_policy(policy):
            loss = cross_entropy(model(Tensor(x0)), np.array([0, 1, 0, 1]))
            loss.backward()
        grads[label] = first.bias.grad.copy()
    diff = float(np.abs(grads["ReLU'(0)=0"] - grads["ReLU'(0)=1"]).max())
    echo("At an input placed exactly on the kinks of layer 1 (pre-activations = 0):")
    for label, g in grads.items():
        echo(f"  d loss / d bias, {label:12s}: norm {np.linalg.norm(g):.4g}")
    echo(f"  largest difference between ReLU'(0)=0 and 1: {diff:.4g} -> the choice matters "
         "exactly on kinks, and nowhere else")
    return {"zeros": counter["zeros"], "calls": counter["calls"], "kink_difference": diff}
