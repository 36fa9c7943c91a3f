"""Counterexamples and planted-kink networks: framework presets against the directional policy.

    PYTHONPATH=src python benchmarks/directional_counterexamples.py [--networks 60] [--samples 1000]

Prints (1) the classic counterexamples' derivatives under the PyTorch, JAX and TensorFlow presets and
under the directional policy (per direction where it depends on one), and (2) over the random
piecewise-linear networks with exactly planted kinks used by tests/test_directional.py, the share
of networks where each policy's gradient is NOT among the sampled Bouligand gradients (ordinary
gradients at theta + t d, kink-free points only), and NOT in their convex hull, from
``kp.check_generalized``. The directional row calibrates the sampling: the directional gradient
is a Bouligand element by construction, so its misses are pieces the sampling did not reach
(about 2 % of networks at 200 samples, none at the default 1000; about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import kinkprop as kp
from kinkprop.diagnostics.generalized import hull_distance
from kinkprop.kinks.directional import UnresolvedKinkWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_directional import planted_network, smooth_network

PRESETS = ("pytorch", "jax", "tensorflow")


def _grads(f, args, policy, directions=None):
    nums = tuple(range(len(args)))
    with kp.kink_policy(policy), kp.directional_options(directions=directions), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UnresolvedKinkWarning)
        g = kp.grad(f, nums)(*args)
    return np.concatenate([np.ravel(a) for a in g])


def _pool(w):
    img = kp.stack([w[0] + w[1], 2 * w[0], 2 * w[1], w[0] - 5.0]).reshape(1, 1, 2, 2)
    return kp.max_pool2d(img, 2).sum()


#: (name, f, args, [(label, direction)]) -- each direction one array per argument
COUNTEREXAMPLES = [
    ("d/dx [relu(x) - relu(-x)] at 0  (= x: 1)", lambda x: (kp.relu(x) - kp.relu(-x)).sum(),
     [np.zeros(1)], [("d=+1", [np.ones(1)]), ("d=-1", [-np.ones(1)])]),
    ("d/dx [relu(x) + relu(-x) - |x|] at 0  (= 0: 0)",
     lambda x: (kp.relu(x) + kp.relu(-x) - kp.abs(x)).sum(), [np.zeros(1)],
     [("d=+1", [np.ones(1)]), ("d=-1", [-np.ones(1)])]),
    ("d/dx maximum(x, x) at 0  (= x: 1)", lambda x: kp.maximum(x, x).sum(), [np.zeros(1)],
     [("d=+1", [np.ones(1)])]),
    ("d/dx max(stack[x, x]) at 0  (= x: 1)", lambda x: kp.max(kp.stack([x, x])), [np.zeros(1)],
     [("d=+1", [np.ones(1)])]),
    ("d/dx maximum(x, 2x) at 0  (2 for d>0, 1 for d<0)", lambda x: kp.maximum(x, 2 * x).sum(),
     [np.zeros(1)], [("d=+1", [np.ones(1)]), ("d=-1", [-np.ones(1)])]),
    ("max-pool [w0+w1, 2w0, 2w1, w0-5] at w=(1,1)  (Bouligand (2,0), (0,2))", _pool,
     [np.ones(2)], [("d=(1,0)", [np.array([1.0, 0.0])]), ("d=(0,1)", [np.array([0.0, 1.0])])]),
    ("clamp(x, -1, 1) at x=(-1, 1)", lambda x: kp.clamp(x, -1.0, 1.0).sum(),
     [np.array([-1.0, 1.0])], [("d=(+,+)", [np.ones(2)]), ("d=(-,-)", [-np.ones(2)])]),
    ("d/db sum|W (1,1) + b| at W=[[1,-1],[2,1]], b=(0,-3), wrt b",
     lambda b: kp.abs(np.array([[1.0, -1.0], [2.0, 1.0]]) @ np.ones(2) + b).sum(),
     [np.array([0.0, -3.0])], [("d=(+,-)", [np.array([1.0, -1.0])])]),
]


def _fmt(v) -> str:
    return "[" + ", ".join(f"{x:g}" for x in v) + "]" if v.size > 1 else f"{v.item():g}"


def counterexamples():
    print("Counterexamples: derivative under each preset, and directional along d")
    for name, f, args, dirs in COUNTEREXAMPLES:
        cells = [f"{p} {_fmt(_grads(f, args, p))}" for p in PRESETS]
        cells += [f"directional({lab}) {_fmt(_grads(f, args, 'directional', [d]))}"
                  for lab, d in dirs]
        print(f"  {name}\n    " + "; ".join(cells))


def networks(make, n_networks, n_samples, label):
    """One sampling per network (``check_generalized`` under the directional policy), against which
    every policy's gradient is then placed (the same tolerance as ``check_generalized``)."""
    policies = (*PRESETS, "directional")
    not_among = dict.fromkeys(policies, 0)
    not_hull = dict.fromkeys(policies, 0)
    differs = dict.fromkeys(policies, 0)
    used = distinct = 0
    start = time.perf_counter()
    for seed in range(n_networks):
        f, params, _ = make(seed)
        ref = kp.check_generalized(f, *params, policy="directional", n_samples=n_samples,
                                   seed=seed)
        used += ref.samples_used
        distinct += len(ref.bouligand)
        gd = np.concatenate([np.ravel(a) for a in ref.grad_directional])
        for p in policies:
            res = ref if p == "directional" else kp.check_generalized(f, *params, policy=p,
                                                                      seed=seed)
            g = np.concatenate([np.ravel(a) for a in res.grad_policy])
            differs[p] += not _close(g, gd, ref)
            not_among[p] += not any(_close(g, b, ref) for b in ref.bouligand)
            hull = hull_distance(g, ref.bouligand)
            not_hull[p] += not (hull <= ref.atol + ref.rtol * max(
                np.linalg.norm(g), max(np.linalg.norm(b) for b in ref.bouligand)))
    secs = time.perf_counter() - start
    print(f"\n{label}: {n_networks} networks, {n_samples} sampled points each "
          f"({used / n_networks:.0f} kink-free on average, {distinct / n_networks:.1f} distinct "
          f"Bouligand gradients on average); {secs:.1f} s")
    print(f"  {'policy':<12} {'differs from directional':>25} {'NOT among sampled':>18} "
          f"{'NOT in their hull':>18}")
    for p in policies:
        print(f"  {p:<12} {differs[p] / n_networks:>25.0%} {not_among[p] / n_networks:>18.0%} "
              f"{not_hull[p] / n_networks:>18.0%}")


def _close(a, b, ref) -> bool:
    return bool(np.linalg.norm(a - b) <= ref.atol + ref.rtol * max(np.linalg.norm(a),
                                                                    np.linalg.norm(b)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--networks", type=int, default=60)
    ap.add_argument("--samples", type=int, default=1000)
    a = ap.parse_args(argv)
    counterexamples()
    networks(planted_network, a.networks, a.samples,
             "Planted-kink piecewise-linear networks (tests/test_directional.py)")
    networks(smooth_network, min(a.networks, 20), a.samples,
             "Planted-kink networks with smooth parts (tanh, batch-norm-like, cross-entropy)")


if __name__ == "__main__":
    main()
