"""PyTorch as an oracle, in float64.

1. Random compositions (no kink is hit with probability 1) match torch's values and gradients to
   1e-10 relative.
2. At constructed kinks (zeros, ties, bounds, flat max-pool windows) the preset that names the
   installed torch version matches torch *exactly*: forward values, VJPs with random cotangents,
   and JVPs with random tangents (exact where no sum is involved; reductions sum in a different
   order than torch, so their JVPs match to a few ulps).
"""

from __future__ import annotations

import numpy as np
import pytest

import kinkprop as kp

torch = pytest.importorskip("torch")
F = torch.nn.functional
torch_jvp = torch.func.jvp
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

TORCH_VERSION = ".".join(torch.__version__.split("+")[0].split(".")[:2])
#: the preset that claims to reproduce the installed torch, e.g. "pytorch" for 2.13
PRESET = next((name for name, p in kp.PRESETS.items()
               if p.reproduces.startswith(f"PyTorch {TORCH_VERSION}.")), None)
needs_preset = pytest.mark.skipif(PRESET is None,
                                  reason=f"no preset reproduces torch {torch.__version__}")


def to_t(a, grad=True):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def torch_vjp(f, xs, g):
    ts = [to_t(x) for x in xs]
    out = f(*ts)
    grads = torch.autograd.grad(out, ts, torch.as_tensor(np.asarray(g, dtype=np.float64)),
                                allow_unused=True)
    return out.detach().numpy(), [np.zeros_like(x) if d is None else d.numpy()
                                  for x, d in zip(xs, grads)]


def torch_tangent(f, xs, ts):
    return torch_jvp(f, tuple(to_t(x, False) for x in xs), tuple(to_t(t, False) for t in ts)
                     )[1].numpy()


def assert_close(got, want, rtol=1e-10):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    scale = np.abs(want).max() if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def compare_smooth(kp_f, torch_f, xs):
    """Value and gradient of a scalar function, every input, to 1e-10 relative."""
    val, grads = torch_vjp(torch_f, xs, 1.0)
    kval, kvjp = kp.vjp(kp_f, *xs)
    assert_close(kval, val)
    for got, want in zip(kvjp(np.ones(())), grads):
        assert_close(got, want)


# -- random compositions --------------------------------------------------------------------------


def test_mlp_linear_relu_cross_entropy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 16)
    xs = [rng.standard_normal((16, 10)), rng.standard_normal((12, 10)) * 0.4,
          rng.standard_normal(12) * 0.1, rng.standard_normal((8, 12)) * 0.4,
          rng.standard_normal(8) * 0.1, rng.standard_normal((4, 8)) * 0.4,
          rng.standard_normal(4) * 0.1]

    def kp_f(x, w1, b1, w2, b2, w3, b3):
        h = kp.relu(kp.linear(x, w1, b1))
        h = kp.relu(kp.linear(h, w2, b2))
        return kp.cross_entropy(kp.linear(h, w3, b3), labels)

    def torch_f(x, w1, b1, w2, b2, w3, b3):
        h = torch.relu(F.linear(x, w1, b1))
        h = torch.relu(F.linear(h, w2, b2))
        return F.cross_entropy(F.linear(h, w3, b3), torch.as_tensor(labels))

    compare_smooth(kp_f, torch_f, xs)


@pytest.mark.parametrize("seed", [0, 1])
def test_cnn_conv_relu_pools_linear_cross_entropy(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 3)
    xs = [rng.standard_normal((3, 2, 10, 10)), rng.standard_normal((4, 2, 3, 3)) * 0.3,
          rng.standard_normal(4) * 0.1, rng.standard_normal((5, 4, 3, 3)) * 0.3,
          rng.standard_normal(5) * 0.1, rng.standard_normal((10, 80)) * 0.1,
          rng.standard_normal(10) * 0.1]

    def kp_f(x, c1, cb1, c2, cb2, w, b):
        h = kp.max_pool2d(kp.relu(kp.conv2d(x, c1, cb1, padding=1)), 2)             # 3x4x5x5
        h = kp.relu(kp.conv2d(h, c2, cb2, stride=2, padding=1))                      # 3x5x3x3
        h = kp.avg_pool2d(h, 2, stride=1, padding=1)                                 # 3x5x4x4
        h = kp.max_pool2d(h, 3, stride=1, padding=1) + h                             # overlap
        return kp.cross_entropy(kp.linear(kp.flatten(h, 1), w, b), labels)

    def torch_f(x, c1, cb1, c2, cb2, w, b):
        h = F.max_pool2d(torch.relu(F.conv2d(x, c1, cb1, padding=1)), 2)
        h = torch.relu(F.conv2d(h, c2, cb2, stride=2, padding=1))
        h = F.avg_pool2d(h, 2, stride=1, padding=1)
        h = F.max_pool2d(h, 3, stride=1, padding=1) + h
        return F.cross_entropy(F.linear(torch.flatten(h, 1), w, b), torch.as_tensor(labels))

    compare_smooth(kp_f, torch_f, xs)


def test_losses_normalisations_and_non_smooth_primitives_off_their_kinks():
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((5, 6)), rng.standard_normal((5, 6)),
          rng.standard_normal(6) - 1.0, rng.standard_normal((5, 1)) + 1.0]
    target = rng.standard_normal((5, 6))
    pm1 = np.sign(rng.standard_normal(6))

    def kp_f(x, y, lo, hi):
        return (kp.mse_loss(kp.softmax(x, axis=-1), target)
                + kp.l1_loss(kp.log_softmax(x, axis=0), target)
                + kp.sum(kp.logsumexp(x * y, axis=1)) * 0.3 + kp.logsumexp(y)
                + kp.sum(kp.var(x, axis=0)) + kp.var(y, ddof=1)
                + kp.sum(kp.leaky_relu(x, 0.1) * y) + kp.sum(kp.hardtanh(3 * x, -1.5, 2.0) * y)
                + kp.sum(kp.relu6(8 * x) * y) + kp.sum(kp.clamp(x, -0.5, 0.5) * y)
                + kp.sum(kp.clamp(x, min=-0.3) * y) + kp.sum(kp.clamp(y, lo, hi) * x)
                + kp.sum(kp.abs(x) * y) + kp.sum(kp.maximum(x, y) * y)
                + kp.sum(kp.minimum(x, lo) * y) + kp.sum(kp.max(x * y, axis=1))
                + kp.min(x, axis=0)[2] + kp.max(y) + kp.min(x * y)
                + kp.hinge_loss(x[0], pm1) + kp.sum(kp.exp(kp.tanh(x)) * kp.sigmoid(y)))

    def torch_f(x, y, lo, hi):
        tg = torch.as_tensor(target)
        return (F.mse_loss(torch.softmax(x, -1), tg) + F.l1_loss(torch.log_softmax(x, 0), tg)
                + torch.logsumexp(x * y, 1).sum() * 0.3 + torch.logsumexp(y, (0, 1))
                + torch.var(x, 0, correction=0).sum() + torch.var(y, correction=1)
                + (F.leaky_relu(x, 0.1) * y).sum() + (F.hardtanh(3 * x, -1.5, 2.0) * y).sum()
                + (F.relu6(8 * x) * y).sum() + (torch.clamp(x, -0.5, 0.5) * y).sum()
                + (torch.clamp(x, min=-0.3) * y).sum() + (torch.clamp(y, lo, hi) * x).sum()
                + (torch.abs(x) * y).sum() + (torch.maximum(x, y) * y).sum()
                + (torch.minimum(x, lo) * y).sum() + torch.max(x * y, 1).values.sum()
                + torch.min(x, 0).values[2] + torch.max(y) + torch.min(x * y)
                + torch.relu(1.0 - torch.as_tensor(pm1) * x[0]).mean()
                + (torch.exp(torch.tanh(x)) * torch.sigmoid(y)).sum())

    compare_smooth(kp_f, torch_f, xs)


# -- exactly on the kinks ---------------------------------------------------------------------------

KINKY = np.array([-2.0, -1.0, -0.0, 0.0, 0.0, 0.5, 1.0, 3.0, 6.0, 6.0, 7.0])


def kinky(rng, shape):
    return rng.choice(KINKY, size=shape)


def bounds(rng, shape_x, shape_b):
    """x, lo, hi with many x on a bound, some lo = hi, some lo > hi."""
    lo = rng.choice([-1.0, 0.0, 1.0], size=shape_b)
    hi = lo + rng.choice([-1.0, 0.0, 1.0, 2.0], size=shape_b)
    x = rng.choice([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0], size=shape_x)
    r = rng.random(shape_x)
    x = np.where(r < 0.3, lo, np.where(r < 0.6, hi, x))
    # x < lo = hi: torch 2.13 drops the gradient there (see the known-difference test below)
    return np.where((lo == hi) & (x < lo), lo, x), lo, hi


def ties(rng, shape, values=(0.0, 1.0, 2.0)):
    return rng.choice(np.array(values), size=shape)


def near(target, offset, op="+"):
    """[input, target] with input = target + offset (or target * offset): on the kink at 0 / 1."""
    return [target + offset if op == "+" else target * offset, target]


def pool_input(rng, shape):
    # flat regions tied at 0 (after relu) and at a positive value
    return np.maximum(rng.choice([-1.0, 0.0, 0.0, 1.5, 1.5, 2.0], size=shape), 0.0)


# (id, kp function, torch function, inputs from rng, options)
# options: "" all bitwise; "dyadic" cotangents and tangents on a coarse dyadic grid, so that sums
# over broadcast axes (and torch's maximum JVP, t_b + w (t_a - t_b)) are exact in any order;
# "jvp~" the JVP sums many terms (torch adds in another order): 1e-14 relative; "jvp=vjp" torch's
# own forward mode disagrees with its reverse mode here (see the known-difference tests), so the
# JVP is checked against torch's reverse-mode partials.
KINK_CASES = [
    ("relu", kp.relu, torch.relu, lambda r: [kinky(r, (5, 7))], ""),
    ("leaky_relu_0.01", lambda x: kp.leaky_relu(x, 0.01), lambda x: F.leaky_relu(x, 0.01),
     lambda r: [kinky(r, (5, 7))], ""),
    ("leaky_relu_0.2", lambda x: kp.leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2),
     lambda r: [kinky(r, (5, 7))], ""),
    ("abs", kp.abs, torch.abs, lambda r: [kinky(r, (5, 7))], ""),
    ("relu6", kp.relu6, F.relu6, lambda r: [kinky(r, (5, 7))], ""),
    ("hardtanh", kp.hardtanh, F.hardtanh, lambda r: [kinky(r, (5, 7))], ""),
    ("hardswish", kp.hardswish, F.hardswish,
     lambda r: [r.choice([-4.0, -3.0, -1.5, 0.0, 3.0, 4.5], (5, 7))], ""),
    ("hardtanh_-2_3", lambda x: kp.hardtanh(x, -2, 3), lambda x: F.hardtanh(x, -2.0, 3.0),
     lambda r: [kinky(r, (5, 7)) * 0.5 + r.choice([-1.0, 0.0, 1.0, 2.0], (5, 7))], ""),
    ("clamp_scalar", lambda x: kp.clamp(x, -1, 1), lambda x: torch.clamp(x, -1.0, 1.0),
     lambda r: [kinky(r, (5, 7))], ""),
    ("clamp_scalar_min", lambda x: kp.clamp(x, min=0.0), lambda x: torch.clamp(x, min=0.0),
     lambda r: [kinky(r, (5, 7))], ""),
    ("clamp_scalar_max", lambda x: kp.clamp(x, max=6), lambda x: torch.clamp(x, max=6.0),
     lambda r: [kinky(r, (5, 7))], ""),
    ("clamp_scalar_equal_bounds", lambda x: kp.clamp(x, 1, 1), lambda x: torch.clamp(x, 1.0, 1.0),
     lambda r: [kinky(r, (5, 7))], ""),
    ("clamp_scalar_min_above_max", lambda x: kp.clamp(x, 1, 0),
     lambda x: torch.clamp(x, 1.0, 0.0), lambda r: [kinky(r, (5, 7))], ""),
    ("clamp_tensor", kp.clamp, torch.clamp, lambda r: list(bounds(r, (6, 7), (6, 7))), ""),
    ("clamp_tensor_broadcast", kp.clamp, torch.clamp, lambda r: list(bounds(r, (6, 7), (7,))),
     "dyadic"),
    ("clamp_tensor_min", lambda x, lo: kp.clamp(x, lo), lambda x, lo: torch.clamp(x, min=lo),
     lambda r: list(bounds(r, (6, 7), (6, 7))[:2]), "jvp=vjp"),
    ("clamp_tensor_max", lambda x, hi: kp.clamp(x, max=hi), lambda x, hi: torch.clamp(x, max=hi),
     lambda r: list(bounds(r, (6, 7), (6, 7))[::2]), "jvp=vjp"),
    ("maximum", kp.maximum, torch.maximum, lambda r: [ties(r, (6, 7)), ties(r, (6, 7))],
     "dyadic"),
    ("maximum_broadcast", kp.maximum, torch.maximum, lambda r: [ties(r, (6, 7)), ties(r, (7,))],
     "dyadic"),
    ("maximum_x_0", lambda x: kp.maximum(x, 0.0), lambda x: torch.maximum(x, torch.zeros(())),
     lambda r: [kinky(r, (5, 7))], ""),
    ("minimum", kp.minimum, torch.minimum, lambda r: [ties(r, (6, 7)), ties(r, (6, 7))],
     "dyadic"),
    ("minimum_broadcast", kp.minimum, torch.minimum, lambda r: [ties(r, (6, 7)), ties(r, (6, 1))],
     "dyadic"),
    ("max_full", kp.max, torch.max, lambda r: [ties(r, (5, 7))], "jvp~"),
    ("amax_full", kp.max, torch.amax, lambda r: [ties(r, (5, 7))], "jvp~"),
    ("min_full", kp.min, torch.min, lambda r: [ties(r, (5, 7))], "jvp~"),
    ("max_full_all_tied", kp.max, torch.max, lambda r: [np.full((3, 7), 2.0)], "jvp~"),
    ("max_dim1", lambda x: kp.max(x, axis=1), lambda x: torch.max(x, 1).values,
     lambda r: [ties(r, (6, 7))], ""),
    ("max_dim0_keepdim", lambda x: kp.max(x, axis=0, keepdims=True),
     lambda x: torch.max(x, 0, keepdim=True).values, lambda r: [ties(r, (6, 7))], ""),
    ("max_dim_3d", lambda x: kp.max(x, axis=1), lambda x: torch.max(x, 1).values,
     lambda r: [ties(r, (3, 4, 5))], ""),
    ("min_dim1", lambda x: kp.min(x, axis=1), lambda x: torch.min(x, 1).values,
     lambda r: [ties(r, (6, 7))], ""),
    # torch.amax along a dim splits ties, unlike torch.max(x, dim): a per-call "split"
    ("amax_dim1_split", lambda x: kp.max(x, axis=1, ties="split"), lambda x: torch.amax(x, 1),
     lambda r: [ties(r, (6, 7))], "jvp~"),
    ("amin_dim0_split", lambda x: kp.min(x, axis=0, ties="split"), lambda x: torch.amin(x, 0),
     lambda r: [ties(r, (6, 7))], "jvp~"),
    ("max_pool_2", lambda x: kp.max_pool2d(x, 2), lambda x: F.max_pool2d(x, 2),
     lambda r: [pool_input(r, (2, 3, 8, 8))], ""),
    ("max_pool_2_stride1", lambda x: kp.max_pool2d(x, 2, 1), lambda x: F.max_pool2d(x, 2, 1),
     lambda r: [pool_input(r, (2, 3, 7, 7))], ""),
    ("max_pool_3_stride2_pad1", lambda x: kp.max_pool2d(x, 3, 2, 1),
     lambda x: F.max_pool2d(x, 3, 2, 1), lambda r: [pool_input(r, (2, 3, 9, 9))], ""),
    ("max_pool_3_stride1_pad1", lambda x: kp.max_pool2d(x, 3, 1, 1),
     lambda x: F.max_pool2d(x, 3, 1, 1), lambda r: [pool_input(r, (2, 2, 6, 6))], ""),
    ("max_pool_rect", lambda x: kp.max_pool2d(x, (2, 3), (1, 2), (1, 1)),
     lambda x: F.max_pool2d(x, (2, 3), (1, 2), (1, 1)),
     lambda r: [pool_input(r, (2, 2, 7, 8))], ""),
    ("max_pool_all_negative_padded", lambda x: kp.max_pool2d(x, 2, 2, 1),
     lambda x: F.max_pool2d(x, 2, 2, 1), lambda r: [-1.0 - pool_input(r, (1, 2, 5, 5))], ""),
    ("max_pool_flat", lambda x: kp.max_pool2d(x, 2, 1), lambda x: F.max_pool2d(x, 2, 1),
     lambda r: [np.zeros((1, 1, 4, 4))], ""),
    ("l1_loss", kp.l1_loss, F.l1_loss,
     lambda r: near(kinky(r, (5, 7)), r.choice([0.0, 0.0, 0.5, -1.0], (5, 7))), "jvp~"),
    ("l1_loss_sum", lambda a, b: kp.l1_loss(a, b) * 35.0,
     lambda a, b: F.l1_loss(a, b, reduction="sum"),
     lambda r: near(kinky(r, (5, 7)), r.choice([0.0, 0.0, 2.0], (5, 7))), "jvp~"),
    ("hinge_loss", kp.hinge_loss, lambda s, y: torch.relu(1.0 - y * s).mean(),
     lambda r: near(r.choice([-1.0, 1.0], 8), r.choice([1.0, 1.0, 0.5, 2.0, -1.0], 8), "*"),
     "jvp~"),
]


@needs_preset
@pytest.mark.parametrize("name, kp_f, torch_f, make, options", KINK_CASES,
                         ids=[c[0] for c in KINK_CASES])
def test_preset_matches_torch_exactly_at_kinks(name, kp_f, torch_f, make, options):
    rng = np.random.default_rng(sum(map(ord, name)))
    xs = make(rng)

    def draw(shape):
        if "dyadic" in options:
            return rng.integers(-16, 17, size=shape) / 8.0
        return rng.standard_normal(shape)

    with kp.kink_policy(PRESET):
        kval, kvjp = kp.vjp(kp_f, *xs)
        g = draw(np.shape(kval))
        tval, tgrads = torch_vjp(torch_f, xs, g)
        assert np.array_equal(kval, tval), "forward values differ"
        for i, (got, want) in enumerate(zip(kvjp(g), tgrads)):
            assert np.array_equal(got, want), f"input {i}: {got} != {want}"
        tangents = [draw(np.shape(x)) for x in xs]
        got = kp.jvp(kp_f, xs, tangents)[1]
    if "jvp=vjp" in options:  # elementwise: J t = sum_i (d out / d x_i) t_i, partials by reverse
        partials = torch_vjp(torch_f, xs, np.ones(np.shape(kval)))[1]
        want = sum(p * t for p, t in zip(partials, tangents))
    else:
        want = torch_tangent(torch_f, xs, tangents)
    if "jvp~" in options:  # a sum over many terms: torch adds in another order
        assert_close(got, want, rtol=1e-14)
    else:
        assert np.array_equal(got, want)


@needs_preset
@pytest.mark.parametrize("k", [3, 5, 6, 7, 11])
def test_split_shares_round_like_torch(k):
    # torch divides (g / k); a rounded 1 / k times g differs in the last bit for about a third of g
    rng = np.random.default_rng(k)
    x = np.zeros(12)
    x[rng.choice(12, k, replace=False)] = 1.0
    rows = np.tile(x, (64, 1))
    g = rng.standard_normal(64)
    with kp.kink_policy(PRESET):
        for i in range(16):
            got = kp.vjp(kp.max, x)[1](np.array(g[i]))[0]
            assert np.array_equal(got, torch_vjp(torch.max, [x], np.array(g[i]))[1][0])
            got = kp.vjp(kp.min, -x)[1](np.array(g[i]))[0]
            assert np.array_equal(got, torch_vjp(torch.min, [-x], np.array(g[i]))[1][0])
        got = kp.vjp(lambda r: kp.max(r, axis=1, ties="split"), rows)[1](g)[0]
        assert np.array_equal(got, torch_vjp(lambda r: torch.amax(r, 1), [rows], g)[1][0])


@needs_preset
def test_kink_inputs_really_hit_kinks():
    # guard against the builders drifting away from the kinks they are meant to construct
    rng = np.random.default_rng(0)
    x = kinky(rng, (5, 7))
    assert (x == 0).sum() > 3 and np.signbit(x[x == 0]).any() and (x == 6).any()
    x, lo, hi = bounds(rng, (6, 7), (6, 7))
    assert (x == lo).sum() > 5 and (x == hi).sum() > 5 and (lo == hi).any() and (lo > hi).any()
    windows = pool_input(rng, (1, 1, 8, 8)).reshape(4, 2, 4, 2).transpose(0, 2, 1, 3)
    tied = (windows.reshape(16, 4) == windows.reshape(16, 4).max(1, keepdims=True)).sum(1) > 1
    assert tied.sum() > 3


def test_preset_for_installed_torch():
    if TORCH_VERSION == "2.13":
        assert PRESET == "pytorch"
    assert kp.PRESETS["pytorch"].reproduces.startswith("PyTorch 2.13.0")
    assert kp.PRESETS["pytorch-2.14"].reproduces.startswith("PyTorch 2.14")


def test_pytorch_2_14_differs_from_pytorch_only_in_clamp():
    a, b = kp.PRESETS["pytorch"].values, kp.PRESETS["pytorch-2.14"].values
    assert set(a) == set(b) == set(kp.SPECS)
    assert {k for k in a if a[k] != b[k]} == {"clamp"}
    assert (a["clamp"], b["clamp"]) == ((1.0, 1.0), (0.0, 0.0))


@needs_preset
def test_known_difference_clamp_below_equal_tensor_bounds():
    """x < min = max with tensor bounds: torch 2.13 sends the gradient nowhere (its min mask needs
    min < max, its max mask x > max); kinkprop composes min(max(x, lo), hi) and, with the preset's
    (1, 1), gives it to min. The function is constant in x there; d/dmin + d/dmax must be 1."""
    xs = [np.array([0.0]), np.array([1.0]), np.array([1.0])]
    _, tgrads = torch_vjp(torch.clamp, xs, np.array([1.0]))
    assert [t.tolist() for t in tgrads] == [[0.0], [0.0], [0.0]]
    with kp.kink_policy(PRESET):
        kgrads = kp.vjp(kp.clamp, *xs)[1](np.array([1.0]))
    assert [k.tolist() for k in kgrads] == [[0.0], [1.0], [0.0]]


def test_known_difference_torch_forward_mode_clamp_one_tensor_bound():
    """torch 2.13's forward mode for clamp(x, min=tensor) / clamp(x, max=tensor) gives x's
    derivative 0 where x equals the bound, while its reverse mode gives 1 (as the two-bound clamp
    does in both modes). kinkprop's JVP and VJP share one rule: 1 under the preset, in both."""
    x, b, one = np.array([0.0]), np.array([0.0]), np.array([1.0])
    for torch_f, kp_f in [(lambda x, b: torch.clamp(x, min=b), lambda x, b: kp.clamp(x, b)),
                          (lambda x, b: torch.clamp(x, max=b), lambda x, b: kp.clamp(x, max=b))]:
        assert torch_tangent(torch_f, [x, b], [one, 0 * one]).tolist() == [0.0]  # forward
        assert torch_vjp(torch_f, [x, b], one)[1][0].tolist() == [1.0]          # reverse
        with kp.kink_policy(PRESET or "pytorch"):
            assert kp.jvp(kp_f, [x, b], [one, 0 * one])[1].tolist() == [1.0]
            assert kp.vjp(kp_f, x, b)[1](one)[0].tolist() == [1.0]


def test_known_difference_torch_maximum_jvp_rounding():
    """torch's maximum JVP is t_b + w (t_a - t_b), which rounds even away from ties; kinkprop's
    picks the winner's tangent exactly. Same value to an ulp; kinkprop's is the exact one."""
    a, b, ta, tb = [np.array([v]) for v in (2.0, 1.0, 0.1, 0.7)]
    assert torch_tangent(torch.maximum, [a, b], [ta, tb]).tolist() != [0.1]
    assert kp.jvp(kp.maximum, [a, b], [ta, tb])[1].tolist() == [0.1]
