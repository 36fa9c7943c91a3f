"""The directional policy (Kakade & Lee 2018, lexicographic ties) and the disagreement detector.

The defining property: with direction ``d``, the directional gradient at ``theta`` is
``lim_{t->0+} grad f(theta + t d)``. It is checked against ordinary gradients at ``theta + t d``
(at which no kink is hit, verified with every primitive's ``hits()``) on random piecewise-linear
networks whose pre-activations, ties and clamp bounds are planted exactly on kinks (integer weights
and inputs, so the arithmetic is exact), and on networks with smooth parts.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import kinkprop as kp
from kinkprop import tape
from kinkprop.diagnostics.generalized import hull_distance, nnls
from kinkprop.kinks import directional
from kinkprop.kinks.directional import UnresolvedKinkWarning

PRESETS = ("pytorch", "jax", "tensorflow")
N_NETWORKS = 60


def grad_dir(f, *args, directions=None, seed=0, max_directions=3, **opts):
    """Directional gradient(s) of ``f`` w.r.t. every argument (a tuple when several)."""
    nums = tuple(range(len(args)))
    with kp.kink_policy("directional"), kp.directional_options(
            seed=seed, directions=directions, max_directions=max_directions, **opts):
        g = kp.grad(f, nums)(*args)
    return g if len(args) > 1 else g[0]


def grad_preset(f, *args, preset="pytorch"):
    nums = tuple(range(len(args)))
    with kp.kink_policy(preset):
        g = kp.grad(f, nums)(*args)
    return g if len(args) > 1 else g[0]


def kinks_hit(f, *args) -> int:
    """Kink elements hit by a forward pass of ``f`` at ``args`` (every primitive's ``hits()``)."""
    ts = [kp.tensor(np.asarray(a, np.float64), requires_grad=True) for a in args]
    out = f(*ts)
    return sum(t._node.prim.hits(t._node.res) for t in tape.toposort(out)
               if t._node is not None and t._node.prim.kink is not None)


def one_sided_limit(f, params, d, t=1e-6):
    """``lim_{t->0+} grad f(theta + t d)`` from ordinary gradients at two kink-free points (one
    Richardson step removes the O(t) drift: the pieces are polynomial in the parameters)."""
    grads = []
    for s in (t, t / 2):
        moved = [p + s * di for p, di in zip(params, d)]
        assert kinks_hit(f, *moved) == 0, "a kink is hit at theta + t d"
        with kp.kink_policy("pytorch"):
            grads.append(kp.grad(f, tuple(range(len(moved))))(*moved))
    return [2 * b - a for a, b in zip(*grads)]


# -- classic counterexamples -------------------------------------------------------------------


def test_relu_minus_relu_of_minus_is_identity():
    def f(x):
        return (kp.relu(x) - kp.relu(-x)).sum()

    x0 = np.array([0.0])
    assert grad_preset(f, x0)[0] == 0.0  # backprop with relu'(0) = 0: not a generalized gradient
    for preset in PRESETS:
        assert grad_preset(f, x0, preset=preset)[0] == 0.0
    for seed in range(4):
        assert grad_dir(f, x0, seed=seed)[0] == 1.0
    rep = directional.last_report
    assert rep.swept and rep.kinks == 2 and rep.resolved == 2 and rep.unresolved == 0
    assert rep.by_direction == [2] and rep.directions == 1


def test_relu_plus_relu_minus_abs_is_zero():
    def f(x):
        return (kp.relu(x) + kp.relu(-x) - kp.abs(x)).sum()

    x0 = np.zeros(3)
    assert np.array_equal(grad_preset(f, x0, preset="jax"), [-1.0, -1.0, -1.0])
    for d in ([1.0, -1.0, 2.0], [-3.0, 0.5, -1.0]):
        assert np.array_equal(grad_dir(f, x0, directions=[[np.array(d)]]), np.zeros(3))
    assert np.array_equal(grad_dir(f, x0, seed=3), np.zeros(3))


def test_max_of_x_and_x_is_one():
    x0 = np.array([0.0, 2.0])
    # the two pieces are the same function: tied along a random direction, so no choice can
    # change the gradient (a.s.); reported as immaterial, one sweep, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnresolvedKinkWarning)
        g = grad_dir(lambda x: kp.maximum(x, x).sum(), x0)
    assert np.array_equal(g, [1.0, 1.0])
    assert directional.last_report.immaterial == 2
    assert directional.last_report.unresolved == 0
    assert directional.last_report.directions == 1
    # asked to refine, it tries every direction, still ties, and reports the sites unresolved
    with pytest.warns(UnresolvedKinkWarning):
        g = grad_dir(lambda x: kp.maximum(x, x).sum(), x0, refine=True)
    assert np.array_equal(g, [1.0, 1.0])
    assert directional.last_report.unresolved == 2
    assert directional.last_report.directions == 3
    with pytest.warns(UnresolvedKinkWarning):
        g = grad_dir(lambda x: kp.max(kp.stack([x, x])), np.array([1.5]), refine=True)
    assert np.array_equal(g, [1.0])
    assert directional.last_report.unresolved_sites == [("max#0", 1)]


@pytest.mark.parametrize("d, expected", [(1.0, 2.0), (-1.0, 1.0), (0.25, 2.0), (-3.0, 1.0)])
def test_maximum_x_2x_follows_the_direction(d, expected):
    g = grad_dir(lambda x: kp.maximum(x, 2 * x).sum(), np.array([0.0]),
                 directions=[[np.array([d])]])
    assert g[0] == expected
    assert grad_preset(lambda x: kp.maximum(x, 2 * x).sum(), np.array([0.0]))[0] == 1.5  # split


def test_max_pool_window_tied_through_shared_parameters():
    # one 2x2 window [w0 + w1, 2 w0, 2 w1, w0 - 5]: at w = (1, 1) three entries tie at 2
    def f(w):
        img = kp.stack([w[0] + w[1], 2 * w[0], 2 * w[1], w[0] - 5.0]).reshape(1, 1, 2, 2)
        return kp.max_pool2d(img, 2).sum()

    w0 = np.array([1.0, 1.0])
    pieces = {0: [1.0, 1.0], 1: [2.0, 0.0], 2: [0.0, 2.0]}
    # entry 0 is the mean of entries 1 and 2, so it never wins alone: the Bouligand gradients are
    # pieces 1 and 2, and PyTorch's "first" (piece 0) is their midpoint, a Clarke element only
    for d, winner in (([1.0, 0.0], 1), ([0.0, 1.0], 2), ([0.5, -1.0], 1), ([-1.0, 0.5], 2)):
        g = grad_dir(f, w0, directions=[[np.array(d)]])
        assert np.array_equal(g, pieces[winner]), (d, g)
    # along (1, 1) or (-1, -1) the tangents tie too (2, 2, 2): the second direction (1, -1), with
    # tangents (0, 2, -2), picks entry 1
    for d in ([1.0, 1.0], [-1.0, -1.0]):
        g = grad_dir(f, w0, directions=[[np.array(d)], [np.array([1.0, -1.0])]])
        assert np.array_equal(g, pieces[1]) and directional.last_report.by_direction == [0, 1]
    assert np.array_equal(grad_preset(f, w0), pieces[0])  # first in row-major order
    for seed in range(5):  # random directions: the one-sided limit along them
        d = np.random.default_rng(seed).standard_normal(2)
        assert np.allclose(grad_dir(f, w0, directions=[[d]]), one_sided_limit(f, [w0], [d])[0])


def test_clamp_at_both_bounds():
    def f(x):
        return kp.clamp(x, -1.0, 1.0).sum()

    x0 = np.array([-1.0, 1.0, 0.0, 2.0])
    assert np.array_equal(grad_dir(f, x0, directions=[[np.array([1.0, 1.0, 1.0, 1.0])]]),
                          [1.0, 0.0, 1.0, 0.0])  # leaves the low bound inward, the high outward
    assert np.array_equal(grad_dir(f, x0, directions=[[np.array([-1.0, -1.0, 5.0, 5.0])]]),
                          [0.0, 1.0, 1.0, 0.0])
    assert np.array_equal(grad_preset(f, x0), [1.0, 1.0, 1.0, 0.0])  # PyTorch 2.13: 1 at bounds
    assert np.array_equal(grad_preset(f, x0, preset="jax"), [0.5, 0.5, 1.0, 0.0])

    # tensor bounds that are parameters: whichever moves inward relative to the other is active
    def g(x, lo):
        return kp.clamp(x, min=lo, max=2.0).sum()

    x1, lo1 = np.array([0.0, 0.0]), np.array([0.0, 0.0])
    gx, glo = grad_dir(g, x1, lo1, directions=[[np.array([1.0, -1.0]), np.array([0.0, 0.0])]])
    assert np.array_equal(gx, [1.0, 0.0]) and np.array_equal(glo, [0.0, 1.0])
    gx, glo = grad_dir(g, x1, lo1, directions=[[np.array([1.0, 1.0]), np.array([2.0, 0.5])]])
    assert np.array_equal(gx, [0.0, 1.0]) and np.array_equal(glo, [1.0, 0.0])


def test_abs_through_a_linear_layer():
    def f(W, b):
        return kp.abs(W @ np.array([1.0, 1.0]) + b).sum()

    W0, b0 = np.array([[1.0, -1.0], [2.0, 1.0]]), np.array([0.0, -3.0])  # both outputs at 0
    gW, gb = grad_preset(f, W0, b0)
    assert np.array_equal(gW, np.zeros((2, 2))) and np.array_equal(gb, [0.0, 0.0])
    rng = np.random.default_rng(0)
    for _ in range(6):
        d = [rng.standard_normal((2, 2)), rng.standard_normal(2)]
        gW, gb = grad_dir(f, W0, b0, directions=[d])
        s = np.sign(d[0].sum(axis=1) + d[1])  # the tangent of each output along d
        assert np.array_equal(gb, s) and np.array_equal(gW, s[:, None] * np.ones((2, 2)))
        limit = one_sided_limit(f, [W0, b0], d)
        assert np.allclose(gW, limit[0]) and np.allclose(gb, limit[1])


def test_other_elementwise_kinks_take_the_one_sided_derivative():
    x0 = np.array([0.0, 0.0, 6.0, -1.0, 1.0])
    d = np.array([1.0, -1.0, 1.0, -1.0, -1.0])

    def f(x):
        return (kp.leaky_relu(x[:2], 0.25).sum() + kp.relu6(x[2:3]).sum()
                + kp.hardtanh(x[3:]).sum())

    assert np.array_equal(grad_dir(f, x0, directions=[[d]]), [1.0, 0.25, 0.0, 0.0, 1.0])


# -- policy scopes -----------------------------------------------------------------------------


def test_per_primitive_and_per_scope():
    x0 = np.array([0.0, 0.0])

    def per_call(x):
        return (kp.relu(x, at_kink="directional") - kp.relu(-x)).sum()

    def plain(x):
        return (kp.relu(x) - kp.relu(-x)).sum()

    d = [[np.array([1.0, -1.0])]]
    with kp.directional_options(directions=d):
        g = kp.grad(per_call)(x0)  # only the first relu resolves; the second keeps PyTorch's 0
    assert np.array_equal(g, [1.0, 0.0])
    with kp.kink_policy(relu="directional"), kp.directional_options(directions=d):
        assert np.array_equal(kp.grad(plain)(x0), [1.0, 1.0])
        # other primitives keep the policy in force
        assert kp.grad(lambda x: kp.maximum(x, -x).sum())(x0)[0] == 0.0


def test_backward_and_dict_directions():
    x = kp.tensor(np.array([0.0, 0.0]), requires_grad=True)
    w = kp.tensor(np.array([1.0, 1.0]), requires_grad=True)
    with kp.kink_policy("directional"):
        loss = kp.relu(x * w - x).sum() + kp.abs(w - 1.0).sum()
    dirs = [{x: np.array([1.0, -1.0]), w: np.array([-1.0, 1.0])}]
    with kp.directional_options(directions=dirs), pytest.warns(UnresolvedKinkWarning):
        loss.backward()
    # relu(x (w - 1)) at x = 0, w = 1: tangent 0 along every direction (unresolved, PyTorch's 0);
    # abs(w - 1): the sign of w's tangent
    assert np.array_equal(w.grad, [-1.0, 1.0])
    assert directional.last_report.kinks == 4
    assert directional.last_report.unresolved == 2
    assert np.array_equal(x.grad, [0.0, 0.0])


def test_jvp_under_directional_resolves_first():
    with kp.kink_policy("directional"), kp.directional_options(directions=[[np.array([-1.0])]]):
        _, t = kp.jvp(lambda x: kp.relu(x), [np.array([0.0])], [np.array([1.0])])
    assert t[0] == 0.0  # the piece active along -1 is the left one, whatever the tangent


# -- lexicographic refinement and unresolved sites ---------------------------------------------


def test_second_direction_resolves_a_zero_tangent():
    def f(x):
        return kp.relu(x[0]) + 3.0 * x[1]

    x0 = np.array([0.0, 5.0])
    for second, expected in ((1.0, 1.0), (-1.0, 0.0)):
        dirs = [[np.array([0.0, 1.0])], [np.array([second, 0.0])]]
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnresolvedKinkWarning)
            g = grad_dir(f, x0, directions=dirs)
        assert np.array_equal(g, [expected, 3.0])
        rep = directional.last_report
        assert rep.directions == 2 and rep.by_direction == [0, 1] and rep.unresolved == 0
        assert rep.details[0].decided == [0, 1]

    # ties: maximum(x0, x1) with equal tangents along d1; d2 decides
    dirs = [[np.array([1.0, 1.0])], [np.array([0.0, 1.0])]]
    g = grad_dir(lambda x: kp.maximum(x[0], x[1]), np.array([2.0, 2.0]), directions=dirs)
    assert np.array_equal(g, [0.0, 1.0])
    dirs = [[np.array([1.0, 1.0])], [np.array([1.0, 1.0])], [np.array([1.0, 0.0])]]
    g = grad_dir(lambda x: kp.max(x), np.array([2.0, 2.0]), directions=dirs)
    assert np.array_equal(g, [1.0, 0.0]) and directional.last_report.by_direction == [0, 0, 1]
    # max_directions bounds the refinement
    with pytest.warns(UnresolvedKinkWarning):
        g = grad_dir(lambda x: kp.max(x), np.array([2.0, 2.0]), directions=dirs,
                     max_directions=2)
    assert np.array_equal(g, [0.5, 0.5]) and directional.last_report.directions == 2


def test_unresolved_sites_are_reported_not_guessed():
    def f(x):
        return kp.relu(x[0]) + kp.abs(x[1]) + kp.leaky_relu(x[2], 0.125)

    dirs = [[np.array([0.0, 0.0, 0.0])], [np.array([0.0, 0.0, 0.0])]]
    with pytest.warns(UnresolvedKinkWarning, match="still tied after 2 given direction"):
        g = grad_dir(f, np.zeros(3), directions=dirs)
    assert np.array_equal(g, [0.0, 0.0, 0.125])  # the fallback preset's (PyTorch's) values
    rep = directional.last_report
    assert rep.unresolved == 3 and rep.resolved == 0
    assert rep.unresolved_sites == [("relu#0", 1), ("abs#0", 1), ("leaky_relu#0", 1)]
    text = str(rep)
    assert "3 unresolved" in text and "relu#0: 1 hit, 0 resolved, 1 UNRESOLVED" in text
    with pytest.warns(UnresolvedKinkWarning):
        g = grad_dir(f, np.zeros(3), directions=dirs, fallback="jax")
    assert np.array_equal(g, [0.0, 1.0, 1.0])


def test_report_is_readable():
    grad_dir(lambda x: (kp.relu(x) + kp.abs(x)).sum(), np.array([0.0, 1.0, 0.0]), seed=1)
    text = str(directional.last_report)
    assert text.startswith("directional: 4 kink element(s) hit at 2 of 2 site(s); 4 resolved "
                           "(4 by direction 1), 0 unresolved; 1 random direction(s) swept")
    assert "relu#0: 2 hit, 2 resolved" in text and "abs#0: 2 hit, 2 resolved" in text


def test_bad_options():
    with pytest.raises(ValueError, match="max_directions"), \
            kp.directional_options(max_directions=0):
        pass
    with pytest.raises(ValueError, match="fallback"), \
            kp.directional_options(fallback="directional"):
        pass
    with pytest.raises(ValueError, match="one array per differentiated input"):
        grad_dir(lambda x, y: kp.relu(x).sum() + y.sum(), np.zeros(2), np.zeros(2),
                 directions=[[np.ones(2)]])


# -- no cost where no kink ---------------------------------------------------------------------


def test_no_kink_hit_means_no_sweep_and_bitwise_equal(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 5))
    W1, W2 = rng.standard_normal((5, 6)), rng.standard_normal((6, 4))

    def f(W1, W2):
        z = x @ W1
        h = (kp.relu(z) + kp.maximum(z, kp.abs(z - 0.3)) + kp.clamp(z, -0.5, 0.5)
             + kp.leaky_relu(z, 0.1))
        p = kp.max_pool2d(h.reshape(2, 1, 4, 6), 2)
        o = p.reshape(2, 6) @ W2 + kp.max(h @ W2, axis=0).sum()
        return kp.cross_entropy(o, np.array([1, 3])) + kp.max(z) + kp.min(h)

    def boom(*a, **k):
        raise AssertionError("tangent sweep on a step with no kink hit")

    monkeypatch.setattr(tape, "forward_sweep", boom)
    got = grad_dir(f, W1, W2)
    assert not directional.last_report.swept and directional.last_report.kinks == 0
    assert directional.last_report.sites == 9
    for preset in PRESETS:
        for a, b in zip(got, grad_preset(f, W1, W2, preset=preset)):
            assert np.array_equal(a, b)
    # the same through loss.backward()
    ts = [kp.tensor(W1.copy(), requires_grad=True), kp.tensor(W2.copy(), requires_grad=True)]
    with kp.kink_policy("directional"):
        loss = f(*ts)
    loss.backward()
    assert all(np.array_equal(t.grad, g) for t, g in zip(ts, got))


# -- the defining property on random networks with planted kinks -------------------------------

_ACTS = {
    "relu": (kp.relu, (0.0,)),
    "leaky_relu": (lambda z: kp.leaky_relu(z, 0.25), (0.0,)),
    "abs": (kp.abs, (0.0,)),
    "clamp": (lambda z: kp.clamp(z, -1.0, 1.0), (-1.0, 1.0)),
    "hardtanh": (lambda z: kp.hardtanh(z, -2.0, 2.0), (-2.0, 2.0)),
    "relu6": (kp.relu6, (0.0, 6.0)),
}


def planted_network(seed: int):
    """A random piecewise-linear network with exact kinks planted at every stage.

    Integer weights and inputs keep every value exact. Stages: ``act1(x W1 + b1)``;
    ``maximum`` or ``minimum`` against ``z1 W3``; ``act2(. + c)``; a max over each row (``kp.max``
    along an axis, or a 2x2 max-pool window) of ``. + e``; ``clamp`` with bounds at entries'
    values, and a global ``kp.max`` of ``. + u``. Each stage's bias is set so that at least one
    element sits exactly on a kink (a tie at the top, for the maxima); more land there by chance.
    Every kink input moves with a bias of its own, so no tie is structural (the pieces differ).

    Returns ``(f, params, kinds)`` with ``f(*params)`` a scalar tensor.
    """
    rng = np.random.default_rng(seed)
    n, dim, h = 3, 3, 4

    def ints(*shape):
        return rng.integers(-2, 3, shape).astype(np.float64)

    x = ints(n, dim)
    act1, act2 = (rng.choice(list(_ACTS)) for _ in range(2))
    pair = kp.maximum if rng.random() < 0.7 else kp.minimum
    pool = rng.random() < 0.5
    P = {"W1": ints(dim, h), "b1": ints(h), "W2": ints(h, h), "b2": ints(h), "W3": ints(h, h),
         "c": ints(h), "e": ints(h), "u": ints(n), "v": ints(n)}
    names = list(P)
    bounds = [0.0, 0.0]

    def stages(p, upto=9):
        z1 = x @ p["W1"] + p["b1"]
        out = {"z1": z1}
        a1 = _ACTS[act1][0](z1)
        q = z1 @ p["W3"]
        z2 = a1 @ p["W2"] + p["b2"]
        out.update(z2=z2, q=q)
        m = pair(z2, q)
        pre2 = m + p["c"]
        out["pre2"] = pre2
        a2 = _ACTS[act2][0](pre2)
        pre3 = a2 + p["e"]
        out["pre3"] = pre3
        if pool:
            s = kp.max_pool2d(pre3.reshape(n, 1, 2, 2), 2).reshape(n)
        else:
            s = kp.max(pre3, axis=1)
        out["s"] = s
        top = s + p["u"]
        out["top"] = top
        return out, kp.clamp(s, bounds[0], bounds[1]), kp.max(top)

    def values(key):
        with kp.no_grad():
            return stages({k: kp.as_tensor(v) for k, v in P.items()})[0][key].data

    # stage 1: z1[0, j] on a kink of act1
    j = rng.integers(h)
    P["b1"][j] += rng.choice(_ACTS[act1][1]) - values("z1")[0, j]
    # stage 2: z2[1, j] == q[1, j] (a tie in maximum / minimum)
    j = rng.integers(h)
    P["b2"][j] += values("q")[1, j] - values("z2")[1, j]
    # stage 3: pre2[2, j] on a kink of act2
    j = rng.integers(h)
    P["c"][j] += rng.choice(_ACTS[act2][1]) - values("pre2")[2, j]
    # stage 4: in row r, entries k1 and k2 tie at the top of the row (= the pooling window)
    r, (k1, k2) = rng.integers(n), rng.choice(h, 2, replace=False)
    pre3 = values("pre3")
    P["e"][k1] += pre3[r].max() + 1 - pre3[r, k1]
    P["e"][k2] += pre3[r].max() + 1 - pre3[r, k2]
    # stage 5: clamp bounds at entries' values; the global max has a tie at the top
    s = values("s")
    bounds[:] = sorted(rng.choice(s, 2, replace=False))
    if bounds[0] == bounds[1]:
        bounds[1] += 1.0
    top = values("top")
    a, b = rng.choice(n, 2, replace=False)
    P["u"][a] += top.max() + 1 - top[a]
    P["u"][b] += top.max() + 1 - top[b]

    def f(*params):
        p = dict(zip(names, params))
        _, clamped, top = stages(p)
        return (p["v"] * clamped).sum() + top

    kinds = {"act1": act1, "act2": act2, "pair": pair.__name__, "pool": pool}
    return f, [P[k] for k in names], kinds


def smooth_network(seed: int):
    """Kinks planted in a network with smooth parts: ``act(x W1 + b1)``, batch-norm-like
    normalisation (batch mean and variance), ``tanh``, a row max with a planted tie, a planted
    relu / abs kink, and softmax cross-entropy."""
    rng = np.random.default_rng(1000 + seed)
    n, dim, h = 4, 3, 4
    x = rng.integers(-2, 3, (n, dim)).astype(np.float64)
    labels = rng.integers(0, 3, n)
    act = rng.choice(["relu", "leaky_relu", "abs", "clamp"])
    kink2 = rng.choice(["relu", "abs", "leaky_relu"])
    P = {"W1": rng.integers(-2, 3, (dim, h)).astype(np.float64),
         "b1": rng.integers(-2, 3, h).astype(np.float64),
         "W2": rng.standard_normal((h, h)), "b2": rng.standard_normal(h)}
    names = list(P)
    C = np.zeros((n, h))

    def body(p):
        z1 = x @ p["W1"] + p["b1"]
        a1 = _ACTS[act][0](z1)
        nrm = (a1 - a1.mean(axis=0)) / kp.sqrt(a1.var(axis=0) + 1.0)
        hid = kp.tanh(nrm @ p["W2"] + p["b2"])
        return z1, hid

    with kp.no_grad():
        z1, _ = body({k: kp.as_tensor(v) for k, v in P.items()})
    j = rng.integers(h)
    P["b1"][j] += rng.choice(_ACTS[act][1]) - z1.data[0, j]
    with kp.no_grad():
        _, hid = body({k: kp.as_tensor(v) for k, v in P.items()})
    hid = hid.data
    r = rng.integers(n)
    C[:] = hid - np.array([2.0, 3.0, 4.0, 5.0])  # g = hid - C: 2, 3, 4, 5 (no near-ties) ...
    C[r, :2] = hid[r, :2]  # ... but g[r, 0] = g[r, 1] = 0 exactly: a tie at the top of row r
    C[(r + 1) % n, 2] = hid[(r + 1) % n, 2]  # g[r + 1, 2] = 0 exactly: a kink of kink2

    def f(*params):
        p = dict(zip(names, params))
        _, hid = body(p)
        g = hid - C
        m = kp.max(g[:, :2], axis=1)
        k = _ACTS[kink2][0](g[:, 2])
        logits = kp.stack([m, k, g[:, 3]], axis=1)
        return kp.cross_entropy(logits, labels)

    return f, [P[k] for k in names], {"act": act, "kink2": kink2}


def _random_directions(params, rng):
    return [rng.standard_normal(p.shape) for p in params]


def test_planted_networks_hit_their_kinks():
    for seed in range(N_NETWORKS):
        f, params, _ = planted_network(seed)
        assert kinks_hit(f, *params) >= 5, seed  # one per stage at least


@pytest.mark.parametrize("chunk", range(3))
def test_directional_is_the_one_sided_limit_on_planted_networks(chunk):
    per = N_NETWORKS // 3
    differs = 0
    for seed in range(chunk * per, (chunk + 1) * per):
        f, params, kinds = planted_network(seed)
        rng = np.random.default_rng(seed)
        for _ in range(2):
            d = _random_directions(params, rng)
            got = grad_dir(f, *params, directions=[d])
            rep = directional.last_report
            assert rep.unresolved == 0 and rep.kinks >= 5, (seed, kinds, str(rep))
            want = one_sided_limit(f, params, d)
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-7, err_msg=f"{seed} {kinds}")
        pt = grad_preset(f, *params)
        differs += any(not np.array_equal(a, b) for a, b in zip(pt, got))
    assert differs >= per // 4  # the kinks matter: PyTorch's gradient is often another one


def test_directional_is_the_one_sided_limit_with_smooth_parts():
    for seed in range(20):
        f, params, kinds = smooth_network(seed)
        assert kinks_hit(f, *params) >= 2, seed
        rng = np.random.default_rng(seed)
        for _ in range(2):
            d = _random_directions(params, rng)
            got = grad_dir(f, *params, directions=[d])
            assert directional.last_report.unresolved == 0
            want = one_sided_limit(f, params, d, t=1e-6)
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8, err_msg=f"{seed} {kinds}")


def test_random_directions_are_seeded():
    f, params, _ = planted_network(3)
    a = grad_dir(f, *params, seed=11)
    b = grad_dir(f, *params, seed=11)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # a scope's generator is drawn from afresh at each step, reproducibly
    with kp.kink_policy("directional"), kp.directional_options(seed=5):
        g1 = kp.grad(f, tuple(range(len(params))))(*params)
        g2 = kp.grad(f, tuple(range(len(params))))(*params)
    with kp.kink_policy("directional"), kp.directional_options(seed=5):
        h1 = kp.grad(f, tuple(range(len(params))))(*params)
        h2 = kp.grad(f, tuple(range(len(params))))(*params)
    assert all(np.array_equal(x, y) for x, y in zip(g1 + g2, h1 + h2))


# -- the disagreement detector -----------------------------------------------------------------


def test_check_generalized_flags_the_classic_counterexample():
    def f(x):
        return (kp.relu(x) - kp.relu(-x)).sum()

    res = kp.check_generalized(f, np.array([0.0, 2.0]), policy="pytorch", n_samples=20)
    assert res.differs and res.difference == 1.0 and res.kinks == 2
    # whichever relu the direction leaves on its right piece is the site that differs
    assert len(res.sites) == 1 and res.sites[0].primitive == "relu"
    assert res.sites[0].name in ("relu#0", "relu#1") and res.sites[0].differing == 1
    assert np.array_equal(res.grad_policy[0], [0.0, 1.0])
    assert np.array_equal(res.grad_directional[0], [1.0, 1.0])
    assert res.samples_used == 20 and len(res.bouligand) == 1
    assert res.policy_among is False and res.policy_in_hull is False
    assert res.directional_among is True and res.warning_sign
    assert "warning sign, not a proof" in str(res)


def test_check_generalized_claims_only_what_it_checks():
    # |x| at 0 under PyTorch (0): not a Bouligand gradient, but in their hull: a Clarke element
    res = kp.check_generalized(lambda x: kp.abs(x).sum(), np.array([0.0]), policy="pytorch",
                               n_samples=40, seed=1)
    assert res.differs and res.policy_among is False and res.policy_in_hull is True
    assert len(res.bouligand) == 2 and not res.warning_sign
    # relu'(0) = 0: one of the two Bouligand gradients
    res = kp.check_generalized(lambda x: kp.relu(x).sum(), np.array([0.0]), policy="pytorch",
                               n_samples=40)
    assert res.policy_among is True and not res.warning_sign
    # max(x, x) with ties split: agrees
    res = kp.check_generalized(lambda x: kp.maximum(x, x).sum(), np.array([1.0]))
    assert not res.differs and res.sites == []
    # no kink hit: agree, no sweep
    res = kp.check_generalized(lambda x: kp.relu(x).sum(), np.array([0.5, -1.0]), n_samples=5)
    assert res.kinks == 0 and not res.differs and res.directional_report is None
    assert res.policy_among is True


def test_check_generalized_policy_forms_and_argnums():
    def f(w, x, labels):
        return kp.cross_entropy(kp.relu(x @ w), labels)

    w = np.array([[1.0, -1.0], [0.0, 1.0]])
    x = np.array([[1.0, 1.0], [1.0, 0.0]])
    labels = np.array([0, 1])
    with kp.kink_policy("jax"):
        res = kp.check_generalized(f, w, x, labels)  # the policy in force; w and x differentiated
    assert res.policy == "jax" and res.argnums == (0, 1) and len(res.grad_policy) == 2
    res2 = kp.check_generalized(f, w, x, labels, policy="pytorch,relu=1", argnums=0)
    assert res2.policy == "pytorch+relu=1.0" and len(res2.grad_policy) == 1
    before = directional.last_report
    kp.check_generalized(f, w, x, labels, policy="pytorch")
    assert directional.last_report is before  # the user's per-step report is left alone


def test_check_generalized_structural_kink_cannot_be_sampled():
    def f(w):  # relu(0 * w) sits on its kink at every point
        return kp.relu(np.zeros((1, 2)) @ w).sum() + kp.relu(w).sum()

    res = kp.check_generalized(f, np.array([[0.0], [1.0]]), n_samples=5)
    assert res.samples_on_kink == 5 and res.samples_used == 0 and res.policy_among is None
    assert "sampling cannot vouch" in str(res)


def test_hull_distance_and_nnls():
    pts = [np.array([1.0, 0.0]), np.array([-1.0, 0.0]), np.array([0.0, 2.0])]
    assert hull_distance(np.array([0.0, 1.0]), pts) < 1e-9
    assert abs(hull_distance(np.array([0.0, -1.0]), pts) - 1.0) < 1e-9
    assert abs(hull_distance(np.array([3.0, 0.0]), pts) - 2.0) < 1e-9
    rng = np.random.default_rng(0)
    scipy_opt = pytest.importorskip("scipy.optimize")
    for _ in range(20):
        A, b = rng.standard_normal((8, 5)), rng.standard_normal(8)
        np.testing.assert_allclose(nnls(A, b), scipy_opt.nnls(A, b)[0], atol=1e-9)


def test_direction_forms():
    def f(x):
        return kp.maximum(x, 2 * x).sum()

    x0 = np.zeros(2)
    # one input: the array alone will do
    assert np.array_equal(grad_dir(f, x0, directions=[np.array([1.0, -1.0])]), [2.0, 1.0])
    # a dict keyed by tensor; an input it leaves out stays still
    x = kp.tensor(np.zeros(2), requires_grad=True)
    y = kp.tensor(np.zeros(2), requires_grad=True)
    with kp.kink_policy("directional"):
        loss = kp.relu(x).sum() + kp.relu(y).sum()
    with kp.directional_options(directions=[{x: np.array([1.0, -1.0])}, {y: np.ones(2)}]):
        loss.backward()
    assert np.array_equal(x.grad, [1.0, 0.0]) and np.array_equal(y.grad, [1.0, 1.0])
    assert directional.last_report.by_direction == [2, 2]
    other = kp.tensor(np.zeros(2), requires_grad=True)
    with kp.kink_policy("directional"):
        loss = kp.relu(x).sum()
    with kp.directional_options(directions=[{other: np.ones(2)}]), \
            pytest.raises(ValueError, match="not a differentiated input"):
        loss.backward()


# -- the sweep's economies: none may change a choice -------------------------------------------


def test_random_direction_is_drawn_over_the_inputs_a_kink_depends_on_only():
    # b reaches no kink site: the seeded draw goes to a alone, and b's component could not
    # change the choice anyway
    def f(a, b):
        return kp.relu(a).sum() + (b * b).sum()

    a0, b0 = np.array([0.0, 0.0, 1.0]), np.array([2.0, -1.0])
    d_a = np.random.default_rng(4).standard_normal(3)
    got = grad_dir(f, a0, b0, seed=4)
    want = grad_dir(f, a0, b0, directions=[[d_a, np.zeros(2)]])
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert np.array_equal(got[0], [float(d_a[0] > 0), float(d_a[1] > 0), 1.0])


def test_sweep_stops_at_the_last_kink_site_and_drops_tangents_once_read():
    x = kp.tensor(np.array([[0.0, -1.0], [2.0, 0.0]]), requires_grad=True)
    w = kp.tensor(np.array([[1.0, 0.0], [0.0, 1.0]]), requires_grad=True)
    with kp.kink_policy("directional"):
        h = kp.relu(x @ w)
        last = kp.max(h, axis=1)  # the last kink site: nothing after it needs a tangent
        loss = (last * 3.0).sum()
    hit = [t._node for t in tape.toposort(loss) if t._node is not None
           and t._node.prim.kink is not None]
    only, readers = tape.tangent_plan(hit)
    assert id(loss._node) not in only and id(last) not in readers
    seen = []

    def on_kink(node, ts_dirs):
        seen.append(node.prim.name)
        return node.prim.select(ts_dirs, node.res)[0]

    outs = tape.forward_sweep(loss, [{id(x): np.ones((2, 2)), id(w): np.zeros((2, 2))}],
                              on_kink=on_kink, only=only, readers=readers)
    assert seen == ["relu", "max_axis"]
    # every tangent was read and dropped; the last site's was never computed
    assert set(outs[0]) == {id(x), id(w)}


def test_max_pool_selection_keeps_the_tangent_its_jvp_would_compute():
    from kinkprop.primitives.core import PRIMITIVES

    pool = PRIMITIVES["max_pool2d"]
    rng = np.random.default_rng(0)
    x = kp.tensor(rng.integers(0, 3, (3, 2, 6, 6)).astype(np.float32), requires_grad=True)
    with kp.kink_policy("directional"):
        out = kp.max_pool2d(x, 2)
    res = out._node.res
    t_in = rng.standard_normal(x.shape).astype(np.float32)
    choice, tied = pool.select([[t_in]], res)
    kept = pool.jvp([t_in], res, choice)  # taken from the selection
    again = pool.jvp([t_in], res, choice)  # computed
    assert np.array_equal(kept, again) and kept.dtype == np.float32
    # a kept tangent lives only as long as its input tangent (at a last site no JVP takes it)
    choice, _ = pool.select([[t_in]], res)
    del t_in
    assert choice.take_tangent(None) is None and not choice._kept


# -- sparse tangents: the sweep computes what the selections read ----------------------------


def _lenet_like(rng, dtype=np.float64):
    """conv - relu - pool - conv - relu - pool - linear on images of flat 8x8 blocks: both pools
    tie, at relu zeros of negative inputs and, inside the blocks, at equal positive values."""
    blocks = rng.integers(0, 3, (6, 1, 3, 3)).astype(dtype)
    x = np.kron(blocks, np.ones((8, 8), dtype))  # 6 x 1 x 24 x 24
    params = [rng.standard_normal((4, 1, 3, 3)), rng.standard_normal(4) * 0.1,
              rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6) * 0.1,
              rng.standard_normal((3, 150))]
    params = [kp.tensor(p.astype(dtype), requires_grad=True) for p in params]

    def loss():
        c1, b1, c2, b2, fc = params
        h = kp.max_pool2d(kp.relu(kp.conv2d(x, c1, b1, padding=1)), 2)
        h = kp.max_pool2d(kp.relu(kp.conv2d(h, c2, b2)), 2)
        return kp.cross_entropy(h.reshape(6, -1) @ fc.T, np.arange(6) % 3)

    return params, loss


def _directional_grads(params, loss, seed):
    for p in params:
        p.grad = None
    with kp.kink_policy("directional"), kp.directional_options(seed=seed), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UnresolvedKinkWarning)
        loss().backward()
    return [p.grad.copy() for p in params], directional.last_report


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_sweep_selects_as_the_dense_one(monkeypatch, seed):
    """The last convolution's JVP runs on the outputs the last pool's selection reads (conv2d's
    jvp_at, forced here whatever their number), and on these networks the selections, hence the
    gradients, are those of the dense sweep. (Not always: jvp_at sums in another order than the
    GEMM, and tangents equal to the last bits may then pick another winner.)"""
    from kinkprop.primitives.core import PRIMITIVES

    params, loss = _lenet_like(np.random.default_rng(seed))
    conv = PRIMITIVES["conv2d"]
    calls, jvp_at = [], conv.jvp_at
    object.__setattr__(conv, "jvp_at", lambda *a: calls.append(a[-1].sum()) or jvp_at(*a))
    try:
        monkeypatch.setattr(tape, "_SPARSE_JVP", 1.0)  # sparse whenever a mask is known
        sparse, report = _directional_grads(params, loss, seed)
        assert report.kinks > 0 and calls and calls[0] > 0  # the sparse path ran, on elements
        monkeypatch.setattr(tape, "_SPARSE_JVP", -1.0)  # never sparse
        calls.clear()
        dense, _ = _directional_grads(params, loss, seed)
        assert not calls
    finally:
        object.__setattr__(conv, "jvp_at", jvp_at)
    assert all(np.array_equal(a, b) for a, b in zip(sparse, dense))


def test_tangent_needs_follow_relu_zeros_and_pool_windows():
    """What the last pool's selection reads (the maxima of its tied windows), narrowed by relu to
    inputs >= 0, is what the convolution before them must get right, element by element; the
    convolution's own input is needed whole (conv2d has no ``demand`` rule)."""
    params, loss = _lenet_like(np.random.default_rng(5))
    with kp.kink_policy("directional"), kp.directional_options(seed=0):
        out = loss()
    order = tape.toposort(out)
    pool2, relu2, conv2 = _last_of(order, ("max_pool2d", "relu", "conv2d"))
    only, _ = tape.tangent_plan([pool2])
    needs = tape.tangent_needs(order, only, {id(pool2)})
    x2 = relu2.res[0]  # the convolution's output, relu's input
    h = np.maximum(x2, 0)
    n, c, hh, ww = h.shape
    win = h.reshape(n, c, hh // 2, 2, ww // 2, 2)
    tied = (win == win.max(axis=(3, 5), keepdims=True)).sum(axis=(3, 5)) > 1
    reads = ((win == win.max(axis=(3, 5), keepdims=True))
             & tied[:, :, :, None, :, None]).reshape(h.shape)
    assert np.array_equal(needs[id(pool2.parents[0])], reads)
    assert np.array_equal(needs[id(relu2.parents[0])], reads & (x2 >= 0))
    assert 0 < np.count_nonzero(reads & (x2 >= 0)) < 0.5 * x2.size  # fewer than all
    assert needs[id(conv2.parents[0])] is None


def _last_of(order, names):
    """The nodes of the last (closest to the loss) application of each primitive in ``names``."""
    found = {}
    for t in order:  # outputs first
        if t._node is not None and t._node.prim.name in names and t._node.prim.name not in found:
            found[t._node.prim.name] = t._node
    return tuple(found[n] for n in names)


def test_directional_backward_over_a_released_graph_says_so():
    """The sweep's needs read saved arrays: over a graph an earlier backward released, the error
    is the sweep's own, with what to do."""
    x = np.kron(np.array([[[[1.0, 0.0], [0.0, 2.0]]]]), np.ones((2, 2)))  # tied 2x2 windows
    w = kp.tensor(np.ones((1, 1, 1, 1)), requires_grad=True)
    with kp.kink_policy("directional"):
        pooled = kp.max_pool2d(kp.conv2d(x, w), 2)
        pooled.sum().backward()  # releases the conv and the pool
        with pytest.raises(RuntimeError, match="released graph.*retain_graph=True"):
            kp.relu(pooled).sum().backward()
