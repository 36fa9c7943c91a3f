"""JAX as an oracle for the ``"jax"`` preset, in float64 (``jax_enable_x64``).

The preset claims to reproduce JAX 0.10.2 (the version pinned in the ``test`` extra). Here the
installed JAX is asked directly:

1. At constructed kinks (-0.0 and 0, ties, x on a clamp bound, lo = hi, lo > hi, flat and all-tied
   max-pool windows) kinkprop under the preset matches JAX *exactly*: forward values, VJPs
   (``jax.vjp``, i.e. what ``jax.grad`` transposes) with random cotangents, and JVPs (``jax.jvp``)
   with random tangents. The derivatives there are small exact rationals (0, 1/2, 1/3, 1/4, ...);
   only JVPs that sum many terms (full reductions, means) are compared to a few ulps, since JAX adds
   in another order.
2. The same literal table as tests/test_kinks_pinned.py's "jax" column, from ``jax.grad`` and from
   ``jax.jvp`` with unit tangents.
3. Small composed networks: one random (no kink is hit with probability 1) to 1e-10 relative, one
   on an integer grid whose hidden units and pools *do* hit kinks inside the composition, exactly.

Known difference (pinned below): with kernel 2 and padding 1, JAX's *forward* mode breaks max-pool
ties in column-major order, its reverse mode (jax.grad) in row-major order; kinkprop follows
jax.grad in both modes. Everything else agrees with the preset, bit for bit.

Mapping of kinkprop primitives to JAX: relu, leaky_relu, relu6, hard_tanh, hard_swish from
``jax.nn``; abs, maximum, minimum, max, min from ``jax.numpy``; clamp is ``jnp.clip`` (scalar and
array bounds); max_pool2d is ``lax.reduce_window(x, -inf, lax.max, ...)`` on NCHW; l1_loss is
``jnp.mean(jnp.abs(a - b))``.
"""

from __future__ import annotations

import numpy as np
import pytest

import kinkprop as kp
from kinkprop.kinks.presets import PRESETS

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy
lax = jax.lax

#: the preset that claims to reproduce the installed jax, e.g. "jax" for 0.10.2
PRESET = next((name for name, p in PRESETS.items()
               if p.reproduces.startswith(f"JAX {jax.__version__} ")), None)
needs_preset = pytest.mark.skipif(PRESET is None, reason=f"no preset reproduces jax {jax.__version__}")


def to_j(a):
    return jnp.asarray(np.asarray(a, dtype=np.float64))


def jitted(f):
    """jax.jit: one XLA compile per check rather than one per op and shape (what keeps this file
    fast). ``JAX_DISABLE_JIT=1`` runs the same checks op by op, eagerly, with the same results."""
    return jax.jit(f)


def modes(f, xs, g, ts):
    """Traced: value, VJP with cotangent g (reverse mode, what jax.grad computes) and JVP with
    tangents ts (jax.jvp)."""
    out, pullback = jax.vjp(f, *xs)
    return out, pullback(g), jax.jvp(f, tuple(xs), tuple(ts))[1]


def jvp_by_vjp(f, xs, ts):
    """J t from reverse mode: one jax.vjp pullback (compiled once) per output element; exact for
    0/1 Jacobians."""
    xs = [to_j(x) for x in xs]
    pullback = jitted(lambda xs, g: jax.vjp(f, *xs)[1](g))
    shape = jax.eval_shape(f, *xs).shape
    rows = [sum(np.sum(np.asarray(d) * t) for d, t in zip(pullback(xs, to_j(e.reshape(shape))), ts))
            for e in np.eye(int(np.prod(shape)))]
    return np.array(rows).reshape(shape)


def jax_modes(f, xs, g, ts):
    out, grads, tangent = jitted(lambda xs, g, ts: modes(f, xs, g, ts))(
        [to_j(x) for x in xs], to_j(g), [to_j(t) for t in ts])
    return np.asarray(out), [np.asarray(d) for d in grads], np.asarray(tangent)


def jax_vjp(f, xs, g):
    out, grads, _ = jax_modes(f, xs, g, [np.zeros(np.shape(x)) for x in xs])
    return out, grads


def jax_tangent(f, xs, ts):
    return jax_modes(f, xs, np.zeros(jax.eval_shape(f, *map(to_j, xs)).shape), ts)[2]


def assert_close(got, want, rtol=1e-10):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    scale = np.abs(want).max() if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def pool_j(kernel, stride, padding=0):
    """NCHW max-pool as JAX writes it: reduce_window with lax.max, padded with -inf."""
    k, s, p = (kernel, kernel), (stride, stride), padding
    return lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, *k), (1, 1, *s),
                                       ((0, 0), (0, 0), (p, p), (p, p)))


# -- inputs exactly on the kinks --------------------------------------------------------------------

KINKY = np.array([-3.0, -2.0, -1.0, -0.0, 0.0, 0.0, 0.5, 1.0, 3.0, 6.0, 6.0, 7.0])


def kinky(rng, shape):
    return rng.choice(KINKY, size=shape)


def bounds(rng, shape_x, shape_b):
    """x, lo, hi with many x on a bound, some lo = hi, some lo > hi (no case excluded)."""
    lo = rng.choice([-1.0, 0.0, 1.0], size=shape_b)
    hi = lo + rng.choice([-1.0, 0.0, 1.0, 2.0], size=shape_b)
    x = rng.choice([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0], size=shape_x)
    r = rng.random(shape_x)
    return np.where(r < 0.3, lo, np.where(r < 0.6, hi, x)), lo, hi


def ties(rng, shape, values=(-0.0, 0.0, 1.0, 2.0)):
    return rng.choice(np.array(values), size=shape)


def near(target, offset):
    """[input, target] with input = target + offset: on the kink where offset is 0."""
    return [target + offset, target]


def pool_input(rng, shape, flat=False):
    # flat regions tied at 0 (after relu, both signs of zero) and at a positive value; flat: the
    # first channel all 0 and the last all 1.5, so that every window there is all tied
    x = np.maximum(rng.choice([-1.0, -0.0, 0.0, 0.0, 1.5, 1.5, 2.0], size=shape), 0.0)
    if flat:
        x[0, 0], x[-1, -1] = 0.0, 1.5
    return x


# (id, kp function, jax function, inputs from rng, options)
# options: "" all bitwise; "dyadic" cotangents and tangents on a coarse dyadic grid, so that sums
# over broadcast axes are exact in any order; "jvp~" the JVP sums many terms (JAX adds in another
# order): 1e-14 relative; "jvp=vjp" JAX's own forward mode disagrees with its reverse mode here (see
# the known-difference test), so the JVP is checked against the Jacobian that jax.vjp gives.
KINK_CASES = [
    ("relu", kp.relu, jax.nn.relu, lambda r: [kinky(r, (6, 7))], ""),
    ("leaky_relu_0.01", lambda x: kp.leaky_relu(x, 0.01), jax.nn.leaky_relu,
     lambda r: [kinky(r, (6, 7))], ""),
    ("leaky_relu_-0.5", lambda x: kp.leaky_relu(x, -0.5),
     lambda x: jax.nn.leaky_relu(x, negative_slope=-0.5), lambda r: [kinky(r, (6, 7))], ""),
    ("abs", kp.abs, jnp.abs, lambda r: [kinky(r, (6, 7))], ""),
    ("relu6", kp.relu6, jax.nn.relu6, lambda r: [kinky(r, (6, 7))], ""),
    ("hard_tanh", kp.hardtanh, jax.nn.hard_tanh, lambda r: [kinky(r, (6, 7))], ""),
    # dyadic: off its kinks JAX's product rule rounds (x = -1.5: 0.25 g - 1.5 g / 6 is not 0 for
    # most g); on the dyadic grid every term is exact
    ("hard_swish", kp.hardswish, jax.nn.hard_swish,
     lambda r: [r.choice([-4.0, -3.0, -1.5, -0.0, 0.0, 3.0, 4.5], (6, 7))], "dyadic"),
    ("clip_scalar", lambda x: kp.clamp(x, -1, 1), lambda x: jnp.clip(x, -1.0, 1.0),
     lambda r: [kinky(r, (6, 7))], ""),
    ("clip_scalar_min", lambda x: kp.clamp(x, min=0.0), lambda x: jnp.clip(x, min=0.0),
     lambda r: [kinky(r, (6, 7))], ""),
    ("clip_scalar_max", lambda x: kp.clamp(x, max=6), lambda x: jnp.clip(x, max=6.0),
     lambda r: [kinky(r, (6, 7))], ""),
    ("clip_scalar_equal_bounds", lambda x: kp.clamp(x, 1, 1), lambda x: jnp.clip(x, 1.0, 1.0),
     lambda r: [kinky(r, (6, 7))], ""),
    ("clip_scalar_min_above_max", lambda x: kp.clamp(x, 1, 0), lambda x: jnp.clip(x, 1.0, 0.0),
     lambda r: [kinky(r, (6, 7))], ""),
    ("clip_array", kp.clamp, jnp.clip, lambda r: list(bounds(r, (6, 7), (6, 7))), ""),
    ("clip_array_broadcast", kp.clamp, jnp.clip, lambda r: list(bounds(r, (6, 7), (7,))), "dyadic"),
    ("clip_array_min", lambda x, lo: kp.clamp(x, lo), lambda x, lo: jnp.clip(x, min=lo),
     lambda r: list(bounds(r, (6, 7), (6, 7))[:2]), ""),
    ("clip_array_max", lambda x, hi: kp.clamp(x, max=hi), lambda x, hi: jnp.clip(x, max=hi),
     lambda r: list(bounds(r, (6, 7), (6, 7))[::2]), ""),
    ("maximum", kp.maximum, jnp.maximum, lambda r: [ties(r, (6, 7)), ties(r, (6, 7))], "dyadic"),
    ("maximum_broadcast", kp.maximum, jnp.maximum, lambda r: [ties(r, (6, 7)), ties(r, (7,))],
     "dyadic"),
    ("maximum_x_0", lambda x: kp.maximum(x, 0.0), lambda x: jnp.maximum(x, 0.0),
     lambda r: [kinky(r, (6, 7))], ""),
    ("maximum_0_x", lambda x: kp.maximum(0.0, x), lambda x: jnp.maximum(0.0, x),
     lambda r: [kinky(r, (6, 7))], ""),
    ("minimum", kp.minimum, jnp.minimum, lambda r: [ties(r, (6, 7)), ties(r, (6, 7))], "dyadic"),
    ("minimum_broadcast", kp.minimum, jnp.minimum, lambda r: [ties(r, (6, 7)), ties(r, (6, 1))],
     "dyadic"),
    ("max_full", kp.max, jnp.max, lambda r: [ties(r, (6, 7))], "jvp~"),
    ("min_full", kp.min, jnp.min, lambda r: [ties(r, (6, 7))], "jvp~"),
    ("max_full_all_tied", kp.max, jnp.max, lambda r: [np.full((3, 7), 2.0)], "jvp~"),
    ("min_full_all_tied_signed_zeros", kp.min, jnp.min, lambda r: [ties(r, (3, 7), (-0.0, 0.0))],
     "jvp~"),
    ("max_axis1", lambda x: kp.max(x, axis=1), lambda x: jnp.max(x, axis=1),
     lambda r: [ties(r, (6, 7))], "jvp~"),
    ("max_axis0_keepdims", lambda x: kp.max(x, axis=0, keepdims=True),
     lambda x: jnp.max(x, axis=0, keepdims=True), lambda r: [ties(r, (6, 7))], "jvp~"),
    ("max_axis_3d", lambda x: kp.max(x, axis=1), lambda x: jnp.max(x, axis=1),
     lambda r: [ties(r, (3, 4, 5))], "jvp~"),
    ("max_axis_-1_all_tied", lambda x: kp.max(x, axis=-1), lambda x: jnp.max(x, axis=-1),
     lambda r: [np.ones((4, 6))], "jvp~"),
    ("min_axis0", lambda x: kp.min(x, axis=0), lambda x: jnp.min(x, axis=0),
     lambda r: [ties(r, (6, 7))], "jvp~"),
    ("max_pool_2", lambda x: kp.max_pool2d(x, 2), pool_j(2, 2),
     lambda r: [pool_input(r, (2, 3, 8, 8), flat=True)], ""),
    ("max_pool_2_stride1", lambda x: kp.max_pool2d(x, 2, 1), pool_j(2, 1),
     lambda r: [pool_input(r, (2, 3, 7, 7), flat=True)], ""),
    ("max_pool_3_stride1_pad1", lambda x: kp.max_pool2d(x, 3, 1, 1), pool_j(3, 1, 1),
     lambda r: [pool_input(r, (2, 2, 6, 6), flat=True)], ""),
    ("max_pool_3_stride2_pad1", lambda x: kp.max_pool2d(x, 3, 2, 1), pool_j(3, 2, 1),
     lambda r: [pool_input(r, (2, 3, 9, 9), flat=True)], ""),
    # kernel 2 with padding 1: JAX's forward mode visits tied windows in another order than its
    # reverse mode (see the known-difference test below); the JVP is checked against jax.vjp's
    ("max_pool_2_stride1_pad1", lambda x: kp.max_pool2d(x, 2, 1, 1), pool_j(2, 1, 1),
     lambda r: [pool_input(r, (2, 2, 5, 5), flat=True)], "jvp=vjp"),
    ("max_pool_2_stride2_pad1_all_negative", lambda x: kp.max_pool2d(x, 2, 2, 1), pool_j(2, 2, 1),
     lambda r: [-1.0 - pool_input(r, (1, 2, 5, 5))], "jvp=vjp"),
    ("l1_loss", kp.l1_loss, lambda a, b: jnp.mean(jnp.abs(a - b)),
     lambda r: near(kinky(r, (6, 7)), r.choice([0.0, 0.0, -0.0, 0.5, -1.0], (6, 7))), "jvp~"),
    ("hinge_loss", kp.hinge_loss, lambda s, y: jnp.mean(jax.nn.relu(1.0 - y * s)),
     lambda r: [r.choice([-1.0, 1.0, 0.5, 2.0], 8), r.choice([-1.0, 1.0], 8)], "jvp~"),
]


def kink_case_inputs(name, make, options, jax_f):
    """xs, a cotangent g and tangents ts for one case, the same on every call."""
    rng = np.random.default_rng(sum(map(ord, name)))
    xs = make(rng)

    def draw(shape):
        if "dyadic" in options:
            return rng.integers(-16, 17, size=shape) / 8.0
        return rng.standard_normal(shape)

    g = draw(jax.eval_shape(jax_f, *map(to_j, xs)).shape)
    return xs, g, [draw(np.shape(x)) for x in xs]


@needs_preset
@pytest.mark.parametrize("name, kp_f, jax_f, make, options", KINK_CASES, ids=[c[0] for c in KINK_CASES])
def test_preset_matches_jax_exactly_at_kinks(name, kp_f, jax_f, make, options):
    xs, g, tangents = kink_case_inputs(name, make, options, jax_f)
    with kp.kink_policy(PRESET):
        kval, kvjp = kp.vjp(kp_f, *xs)
        kgrads = kvjp(g)
        got = kp.jvp(kp_f, xs, tangents)[1]
    jval, jgrads, want = jax_modes(jax_f, xs, g, tangents)
    if "jvp=vjp" in options:
        want = jvp_by_vjp(jax_f, xs, tangents)
    assert np.array_equal(kval, jval), "forward values differ"
    for i, (mine, theirs) in enumerate(zip(kgrads, jgrads)):
        assert np.array_equal(mine, theirs), f"input {i}: {mine.tolist()} != {theirs.tolist()}"
    if "jvp~" in options:  # a sum over many terms: JAX adds in another order
        assert_close(got, want, rtol=1e-14)
    else:
        assert np.array_equal(got, want), f"{got.tolist()} != {want.tolist()}"


# Literal gradients of sum(f) at the kinks, by jax.grad and by jax.jvp with unit tangents, and by
# kinkprop under the preset: the same rows as tests/test_kinks_pinned.py's "jax" column.
NEG0 = -0.0
X4 = [-1.0, NEG0, 0.0, 1.0]
TABLE = [
    ("relu", kp.relu, jax.nn.relu, [X4], 0, [0, 0, 0, 1]),
    ("leaky_relu", lambda x: kp.leaky_relu(x, 0.1), lambda x: jax.nn.leaky_relu(x, 0.1), [X4], 0,
     [0.1, 1, 1, 1]),
    ("abs", kp.abs, jnp.abs, [X4], 0, [-1, 1, 1, 1]),
    ("relu6", kp.relu6, jax.nn.relu6, [[-1.0, NEG0, 0.0, 3.0, 6.0, 7.0]], 0, [0, 0, 0, 1, 0, 0]),
    ("hard_tanh", kp.hardtanh, jax.nn.hard_tanh, [[-2.0, -1.0, 0.0, 1.0, 2.0]], 0, [0, 1, 1, 1, 0]),
    ("hard_swish", kp.hardswish, jax.nn.hard_swish, [[-4.0, -3.0, NEG0, 0.0, 1.5, 3.0, 4.0]], 0,
     [0, 0, 0.5, 0.5, 1, 1, 1]),
    ("clip", lambda x: kp.clamp(x, -1.0, 1.0), lambda x: jnp.clip(x, -1.0, 1.0),
     [[-2.0, -1.0, 0.0, 1.0, 2.0]], 0, [0, 0.5, 1, 0.5, 0]),
    ("clip_equal_bounds", lambda x: kp.clamp(x, 1.0, 1.0), lambda x: jnp.clip(x, 1.0, 1.0),
     [[0.0, 1.0, 2.0]], 0, [0, 0.25, 0]),
    # x, lo, hi columns: x on lo = hi; lo = hi above x; x on lo > hi; x below lo > hi; x on hi < lo.
    # jnp.clip is minimum(hi, maximum(lo, x)): each tie splits, so x on lo = hi keeps 1/2 * 1/2
    *[(f"clip_degenerate_{name}", kp.clamp, jnp.clip,
       [[1.0, 0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 2.0, 1.0], [1.0, 1.0, 0.0, 1.0, 0.0]], wrt, exp)
      for name, wrt, exp in [("x", 0, [0.25, 0, 0, 0, 0]), ("min", 1, [0.25, 0.5, 0, 0, 0]),
                             ("max", 2, [0.5, 0.5, 1, 1, 1])]],
    ("maximum_a", kp.maximum, jnp.maximum, [[0.0, 1.0, 2.0, NEG0], [0.0, 1.0, 1.0, 0.0]], 0,
     [0.5, 0.5, 1, 0.5]),
    ("minimum_b", kp.minimum, jnp.minimum, [[0.0, 1.0, 2.0], [0.0, 1.0, 1.0]], 1, [0.5, 0.5, 1]),
    ("max_3_tied", kp.max, jnp.max, [[1.0, 3.0, 3.0, 3.0]], 0, [0, 1 / 3, 1 / 3, 1 / 3]),
    ("max_axis1", lambda x: kp.max(x, axis=1), lambda x: jnp.max(x, axis=1),
     [[[1.0, 3.0, 3.0], [2.0, 2.0, 0.0], [4.0, 4.0, 4.0]]], 0,
     [[0, 0.5, 0.5], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]]),
    ("max_pool_4_tied_at_0", lambda x: kp.max_pool2d(x, 2), pool_j(2, 2),
     [[[[[0.0, NEG0], [0.0, 0.0]]]]], 0, [[[[1, 0], [0, 0]]]]),
    ("max_pool_overlap", lambda x: kp.max_pool2d(x, 2, 1), pool_j(2, 1), [np.ones((1, 1, 3, 3))], 0,
     [[[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]]),
    ("l1_loss", kp.l1_loss, lambda a, b: jnp.mean(jnp.abs(a - b)),
     [[0.0, 1.0, 2.0, NEG0], [0.0, 1.0, 1.0, 0.0]], 0, [0.25, 0.25, 0.25, 0.25]),
]


def jax_grad_and_unit_jvps(jax_f, xs, wrt):
    """jax.grad of sum(f) and jax.jvp of sum(f) with one unit tangent per element of xs[wrt]."""
    def program(xs):
        total = lambda *a: jnp.sum(jax_f(*a))
        fwd = []
        for e in np.eye(xs[wrt].size):
            ts = [jnp.zeros_like(x) for x in xs]
            ts[wrt] = jnp.asarray(e.reshape(xs[wrt].shape))
            fwd.append(jax.jvp(total, tuple(xs), tuple(ts))[1])
        return jax.grad(total, argnums=wrt)(*xs), jnp.stack(fwd).reshape(xs[wrt].shape)

    return map(np.asarray, jitted(program)([to_j(x) for x in xs]))


@needs_preset
@pytest.mark.parametrize("name, kp_f, jax_f, xs, wrt, expected", TABLE, ids=[c[0] for c in TABLE])
def test_jax_grad_and_jvp_at_kinks_equal_the_written_preset(name, kp_f, jax_f, xs, wrt, expected):
    xs = [np.asarray(x, dtype=np.float64) for x in xs]
    expected = np.asarray(expected, dtype=np.float64)
    rev, fwd = jax_grad_and_unit_jvps(jax_f, xs, wrt)
    with kp.kink_policy(PRESET):
        mine = kp.grad(lambda *a: kp.sum(kp_f(*a)), argnums=wrt)(*xs)
    for mode, got in [("jax.grad", rev), ("jax.jvp", fwd), ("kinkprop", mine)]:
        assert np.array_equal(got, expected), f"{mode}: got {got.tolist()}, want {expected.tolist()}"


def test_hardtanh_with_other_bounds_follows_hard_tanh_not_clip():
    """JAX has no hardtanh with bounds: kinkprop's hardtanh(x, lo, hi) under the preset carries
    jax.nn.hard_tanh's rule (1 at both bounds) to any bounds, i.e. it is JAX's
    ``c + r * hard_tanh((x - c) / r)``, not ``jnp.clip`` (1/2 at a bound, the clamp rule)."""
    x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, 4.0])  # bounds -1 and 3: centre 1, half-width 2
    want = jax_vjp(lambda x: 1.0 + 2.0 * jax.nn.hard_tanh((x - 1.0) / 2.0), [x], np.ones(6))[1][0]
    clip = jax_vjp(lambda x: jnp.clip(x, -1.0, 3.0), [x], np.ones(6))[1][0]
    assert want.tolist() == [0, 1, 1, 1, 1, 0] and clip.tolist() == [0, 0.5, 1, 1, 0.5, 0]
    with kp.kink_policy(PRESET or "jax"):
        assert kp.grad(lambda x: kp.sum(kp.hardtanh(x, -1.0, 3.0)))(x).tolist() == want.tolist()
        assert kp.grad(lambda x: kp.sum(kp.clamp(x, -1.0, 3.0)))(x).tolist() == clip.tolist()


def test_known_difference_jax_forward_mode_max_pool_kernel_2_padding_1():
    """With kernel 2 and padding 1, JAX 0.10.2's forward mode (select_and_gather_add, a variadic
    reduce_window on CPU) gives a tied window's tangent to the first tied input in *column*-major
    order, while its reverse mode (select_and_scatter_add, what jax.grad uses) takes the first in
    row-major order, as it does in both modes for every other kernel / padding tried. kinkprop's
    JVP and VJP share one rule: "first" (row-major), in both modes, which is jax.grad's."""
    x, t = np.array([[[[0.0, 1.0], [1.0, 0.0]]]]), np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    f = pool_j(2, 1, 1)  # 3x3 output; the centre window holds all of x: 1 tied at (0, 1), (1, 0)
    centre = np.zeros((1, 1, 3, 3))
    centre[0, 0, 1, 1] = 1.0
    assert jax_tangent(f, [x], [t])[0, 0, 1, 1] == 3.0                            # forward: x[1, 0]
    assert jax_vjp(f, [x], centre)[1][0].tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]  # reverse: x[0, 1]
    kp_f = lambda x: kp.max_pool2d(x, 2, 1, 1)
    with kp.kink_policy(PRESET or "jax"):
        assert kp.jvp(kp_f, [x], [t])[1][0, 0, 1, 1] == 2.0
        assert kp.vjp(kp_f, x)[1](centre)[0].tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]


# -- composed networks ------------------------------------------------------------------------------


def test_random_network_matches_jax():
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((2, 2, 6, 6)), rng.standard_normal((10, 18)) * 0.4,
          rng.standard_normal(10) * 0.1, rng.standard_normal((6, 10)) * 0.4, rng.standard_normal(6) * 0.1,
          rng.standard_normal((2, 6))]

    def kp_f(x, w1, b1, w2, b2, y):
        h = kp.max_pool2d(kp.leaky_relu(x, 0.1), 3, 2, 1)                            # 2x2x3x3
        h = kp.relu(kp.linear(kp.flatten(h, 1), w1, b1))
        h = kp.clamp(kp.linear(h, w2, b2), -0.5, 0.7)
        h = kp.maximum(kp.abs(h), kp.hardtanh(y)) + kp.relu6(4 * h) + kp.hardswish(3 * h)
        return kp.sum(kp.max(h, axis=1)) + kp.min(h) + kp.l1_loss(h, y)

    def jax_f(x, w1, b1, w2, b2, y):
        h = pool_j(3, 2, 1)(jax.nn.leaky_relu(x, 0.1))
        h = jax.nn.relu(h.reshape(2, -1) @ w1.T + b1)
        h = jnp.clip(h @ w2.T + b2, -0.5, 0.7)
        h = jnp.maximum(jnp.abs(h), jax.nn.hard_tanh(y)) + jax.nn.relu6(4 * h) + jax.nn.hard_swish(3 * h)
        return jnp.sum(jnp.max(h, axis=1)) + jnp.min(h) + jnp.mean(jnp.abs(h - y))

    tangents = [rng.standard_normal(np.shape(x)) for x in xs]
    val, grads, tangent = jax_modes(jax_f, xs, 1.0, tangents)
    with kp.kink_policy(PRESET or "jax"):
        kval, kvjp = kp.vjp(kp_f, *xs)
        kgrads = kvjp(np.ones(()))
        ktan = kp.jvp(kp_f, xs, tangents)[1]
    assert_close(kval, val)
    for got, want in zip(kgrads, grads):
        assert_close(got, want)
    assert_close(ktan, tangent)


def dyadic_network(lib):
    """The same network for kinkprop and JAX; integer weights and inputs keep every intermediate
    exact, so pre-activations land exactly on relu's kink and pooled maxima tie."""
    if lib == "kp":
        relu, pool, absf, maximum, clip = kp.relu, lambda h: kp.max_pool2d(h, 2), kp.abs, kp.maximum, kp.clamp
        linear, flat, amax, total = kp.linear, lambda h: kp.flatten(h, 1), kp.max, kp.sum
    else:
        relu, pool, absf, maximum, clip = jax.nn.relu, pool_j(2, 2), jnp.abs, jnp.maximum, jnp.clip
        linear = lambda h, w, b: h @ w.T + b
        flat, amax, total = lambda h: h.reshape(h.shape[0], -1), jnp.max, jnp.sum

    def f(x, w1, b1, w2, b2):
        h = pool(relu(x))                                           # 3x1x2x2, tied windows at 0
        h = relu(linear(flat(h), w1, b1))                           # pre-activations hit 0
        h = linear(h, w2, b2)
        return (total(amax(h, axis=1)) + amax(maximum(h, 0.0)) + total(absf(h))
                + total(clip(h, -1.0, 1.0)))
    return f


def dyadic_inputs(rng):
    x = rng.choice([-1.0, 0.0, 0.0, 1.0, 2.0], size=(3, 1, 4, 4))
    w1 = rng.choice([-1.0, 0.0, 1.0], size=(8, 4))
    w2 = rng.choice([-1.0, 0.0, 1.0], size=(5, 8))
    b2 = rng.choice([-1.0, 0.0], size=5)
    # pick relu's bias so that sample 0's pre-activation is exactly 0 on every other hidden unit
    pooled = np.maximum(x, 0).reshape(3, 2, 2, 2, 2).max(axis=(2, 4)).reshape(3, 4)
    b1 = np.where(np.arange(8) % 2 == 0, -(pooled[0] @ w1.T), rng.choice([-1.0, 0.0, 1.0], size=8))
    return [x, w1, b1, w2, b2]


@needs_preset
@pytest.mark.parametrize("seed", [0, 1])
def test_dyadic_network_through_kinks_matches_jax_exactly(seed):
    rng = np.random.default_rng(seed)
    xs = dyadic_inputs(rng)
    kp_f, jax_f = dyadic_network("kp"), dyadic_network("jax")
    # the kinks are really hit inside the composition
    pooled = np.maximum(xs[0], 0).reshape(3, 2, 2, 2, 2).max(axis=(2, 4)).reshape(3, 4)
    h = np.maximum(pooled @ xs[1].T + xs[2], 0) @ xs[3].T + xs[4]
    assert ((pooled @ xs[1].T + xs[2]) == 0).sum() >= 4 and np.isin(h, [-1.0, 0.0, 1.0]).any()
    windows = np.maximum(xs[0], 0).reshape(3, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(12, 4)
    assert ((windows == windows.max(axis=1, keepdims=True)).sum(axis=1) > 1).sum() >= 2
    tangents = [rng.integers(-4, 5, size=np.shape(x)) / 4.0 for x in xs]
    jval, jgrads, jtan = jax_modes(jax_f, xs, 1.0, tangents)  # cotangent 1: jax.grad
    with kp.kink_policy(PRESET):
        kval = kp_f(*xs).numpy()
        kgrads = kp.grad(kp_f, argnums=tuple(range(5)))(*xs)
        ktan = kp.jvp(kp_f, xs, tangents)[1]
    assert np.array_equal(kval, jval)
    for i, (got, want) in enumerate(zip(kgrads, jgrads)):
        want = np.asarray(want)
        assert np.array_equal(got, want), f"input {i}: {got.tolist()} != {want.tolist()}"
    assert np.array_equal(ktan, jtan)


# -- guards ---------------------------------------------------------------------------------------


def test_kink_inputs_really_hit_kinks():
    rng = np.random.default_rng(0)
    x = kinky(rng, (5, 7))
    assert (x == 0).sum() > 3 and np.signbit(x[x == 0]).any() and (x == 6).any() and (x == -1).any()
    x, lo, hi = bounds(rng, (6, 7), (6, 7))
    assert (x == lo).sum() > 5 and (x == hi).sum() > 5 and (lo == hi).any() and (lo > hi).any()
    assert ((x < lo) & (lo == hi)).any() and ((x == lo) & (lo > hi)).any()
    windows = pool_input(rng, (1, 1, 8, 8)).reshape(4, 2, 4, 2).transpose(0, 2, 1, 3)
    tied = (windows.reshape(16, 4) == windows.reshape(16, 4).max(1, keepdims=True)).sum(1) > 1
    assert tied.sum() > 3


def test_jax_preset_names_the_installed_jax():
    # the test extra pins jax==0.10.2, the version the preset claims to reproduce
    assert PRESETS["jax"].reproduces == f"JAX {jax.__version__} (CPU)"
    assert PRESET == "jax"
