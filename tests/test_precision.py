"""The float16 casts of kinkprop.precision: bit for bit what NumPy's ``astype`` gives, warnings and
memory layout included, and their use by primitives and optimizers.

Every float16 pattern is checked both ways; float32 -> float16 on special values, every tie, the
subnormal range and a large random sample. All 2**32 float32 patterns (a few minutes) run with
KINKPROP_EXHAUSTIVE_CASTS=1.
"""

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest

import kinkprop as kp
from kinkprop import precision
from kinkprop.optim import SGD, Adam, AdamW
from kinkprop.precision import float_to_half, half_to_float, round_to_half, to_compute, to_storage

ALL_HALVES = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
FAST = 4 * precision._CHUNK // 3  # more than a chunk, and not a multiple of one


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _assert_down_matches_astype(x):
    """float_to_half(x) has astype's bits, and round_to_half(x) those bits as float32, into a new
    array and in place, on the fast path (x padded past its size threshold)."""
    x = np.asarray(x, np.float32).reshape(-1)
    if x.size < FAST:
        x = np.concatenate([x, np.zeros(FAST - x.size, np.float32)])
    with np.errstate(all="ignore"):
        want = x.astype(np.float16)
        got = float_to_half(x)
    bad = np.flatnonzero(_bits(got) != _bits(want))
    assert bad.size == 0, (f"{bad.size} mismatches, first: x bits {_bits(x)[bad[:3]]}, "
                           f"astype {_bits(want)[bad[:3]]}, got {_bits(got)[bad[:3]]}")
    # round_to_half: the same values kept in float32 (what float16 tensors carry)
    with np.errstate(all="ignore"):
        grid = round_to_half(x)
    bad = np.flatnonzero(_bits(grid) != _bits(want.astype(np.float32)))
    assert bad.size == 0, (f"round_to_half: {bad.size} mismatches, first: x bits "
                           f"{_bits(x)[bad[:3]]}, got {_bits(grid)[bad[:3]]}")
    # and in place (x's memory overwritten as it goes)
    grid = x.copy()
    with np.errstate(all="ignore"):
        round_to_half(grid, grid)
    bad = np.flatnonzero(_bits(grid) != _bits(want.astype(np.float32)))
    assert bad.size == 0, (f"round_to_half in place: {bad.size} mismatches, first: x bits "
                           f"{_bits(x)[bad[:3]]}, got {_bits(grid)[bad[:3]]}")


# -- float16 -> float32 ------------------------------------------------------------------------


def test_half_to_float_matches_astype_on_every_float16():
    want = ALL_HALVES.astype(np.float32)
    assert np.array_equal(_bits(half_to_float(ALL_HALVES)), _bits(want))
    out = np.empty(ALL_HALVES.shape, np.float32)
    assert half_to_float(ALL_HALVES, out) is out
    assert np.array_equal(_bits(out), _bits(want))


@pytest.mark.parametrize("bits", [0x7C00, 0xFC00, 0x7C01, 0x7E00, 0xFE01, 0x7FFF, 0xFFFF, 0x7BFF])
def test_half_to_float_finds_a_lone_inf_or_nan(bits):
    h = np.full(FAST, 0x3C00, np.uint16)  # ones
    h[FAST // 2] = bits
    h = h.view(np.float16)
    assert np.array_equal(_bits(half_to_float(h)), _bits(h.astype(np.float32)))


def test_half_to_float_on_small_strided_and_fortran_arrays():
    h = ALL_HALVES[::7][:3000].reshape(60, 50)
    for a in (h, h[:, ::3], np.asfortranarray(h), h[:2, :3], h[0, 0], h[:0]):
        got = half_to_float(a)
        assert got.shape == a.shape and got.dtype == np.float32
        assert np.array_equal(_bits(got), _bits(a.astype(np.float32)))
    assert half_to_float(np.asfortranarray(h)).flags.f_contiguous  # astype's layout


# -- float32 -> float16 ------------------------------------------------------------------------


def test_float_to_half_special_values():
    f32 = np.float32
    specials = [0.0, -0.0, np.inf, -np.inf, 1.0, -1.0, 65504.0, -65504.0, 65519.996, 65520.0,
                -65520.0, 65536.0, 1e6, np.finfo(f32).max, -np.finfo(f32).max, 32768.0, 32767.998,
                2.0 ** -14, 2.0 ** -24, 2.0 ** -25, -(2.0 ** -25), 3 * 2.0 ** -26, 2.0 ** -26,
                1.5 * 2.0 ** -24, 2.5 * 2.0 ** -24, 2.0 ** -14 - 2.0 ** -25,
                np.finfo(f32).tiny, np.finfo(f32).smallest_subnormal, -np.finfo(f32).smallest_subnormal]
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA00000, 0x7F802000,
                     0x7F801FFF, 0x7FFFFFFF, 0xFFFFE000], np.uint32).view(np.float32)
    x = np.concatenate([np.array(specials, f32), nans])
    _assert_down_matches_astype(x)
    _assert_down_matches_astype(np.repeat(x, 97))  # specials in several chunks, next to each other


def test_float_to_half_every_tie_and_its_neighbours():
    """Each midpoint between neighbouring float16 values (exact in float32) and one float32 step
    either side: rounding to nearest even, subnormals and the overflow threshold included."""
    h = ALL_HALVES[:0x7C01].astype(np.float64)  # 0 .. inf
    mid = ((h[:-1] + h[1:]) / 2).astype(np.float32)  # the last one is 65520 (between max and inf)
    x = np.concatenate([mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))])
    _assert_down_matches_astype(np.concatenate([x, -x]))


def test_float_to_half_subnormal_range_and_random_bits():
    rng = np.random.default_rng(0)
    sub = rng.uniform(-(2.0 ** -14), 2.0 ** -14, 1 << 20).astype(np.float32)
    _assert_down_matches_astype(sub)
    _assert_down_matches_astype(rng.integers(0, 1 << 32, 1 << 22, dtype=np.uint64)
                                .astype(np.uint32).view(np.float32))
    exps = rng.uniform(-30, 17, 1 << 20)
    _assert_down_matches_astype((rng.choice([-1, 1], exps.size) * 2.0 ** exps).astype(np.float32))


@pytest.mark.skipif(not os.environ.get("KINKPROP_EXHAUSTIVE_CASTS"),
                    reason="all 2**32 float32 patterns: set KINKPROP_EXHAUSTIVE_CASTS=1")
def test_float_to_half_every_float32():
    step = 1 << 24
    for start in range(0, 1 << 32, step):
        _assert_down_matches_astype(np.arange(start, start + step, dtype=np.uint64)
                                    .astype(np.uint32).view(np.float32))


def test_float_to_half_warns_and_raises_like_astype():
    x = np.full(FAST, 0.5, np.float32)
    x[17] = 1e6
    with pytest.warns(RuntimeWarning, match="overflow"):
        x.astype(np.float16)
    with pytest.warns(RuntimeWarning, match="overflow"):
        got = float_to_half(x)
    assert got[17] == np.inf and got[16] == 0.5
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        float_to_half(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where astype gives none: NaN, inf, subnormals
        y = np.full(FAST, 1e-6, np.float32)
        y[:3] = [np.nan, np.inf, -np.inf]
        assert np.array_equal(_bits(float_to_half(y)), _bits(y.astype(np.float16)))
    tiny = np.full(FAST, 1e-6, np.float32)
    with np.errstate(under="raise"):
        with pytest.raises(FloatingPointError):
            tiny.astype(np.float16)
        with pytest.raises(FloatingPointError):
            float_to_half(tiny)


def test_round_to_half_warns_like_astype_and_keeps_layout():
    x = np.full(FAST, 0.5, np.float32)
    x[17] = 1e6
    with pytest.warns(RuntimeWarning, match="overflow"):
        got = round_to_half(x)
    assert got.dtype == np.float32 and got[17] == np.inf and got[16] == 0.5
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        round_to_half(x)
    with np.errstate(under="warn"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astype's path, subnormal results and all
        y = np.full(FAST, 1e-6, np.float32)
        assert np.array_equal(_bits(round_to_half(y)), _bits(y.astype(np.float16).astype(np.float32)))
    f = np.asfortranarray(np.linspace(-3, 3, 300 * 500, dtype=np.float32).reshape(300, 500))
    for a in (f, f[:, ::3], f[:2, :3], np.float32(0.1), f[:0]):
        got = round_to_half(a)
        want = np.asarray(a).astype(np.float16).astype(np.float32)
        assert got.shape == want.shape and np.array_equal(_bits(got), _bits(want))
    assert round_to_half(f).flags.f_contiguous
    out = np.empty_like(f)
    assert round_to_half(f, out) is out
    with pytest.raises(ValueError, match="overlaps"):
        round_to_half(f[1:], f[:-1])
    with pytest.raises(TypeError, match="float32"):
        round_to_half(f.astype(np.float64))


def test_round_to_half_in_place():
    """``out=x`` rounds in x's own memory to the same bits: every tie and its neighbours, signed
    zeros and values that round to them, overflow, inf and NaN (astype's path inside a chunk),
    across chunk boundaries, in C and Fortran order and strided."""
    h = ALL_HALVES[:0x7C01].astype(np.float64)
    mid = ((h[:-1] + h[1:]) / 2).astype(np.float32)
    ties = np.concatenate([mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))])
    ties = np.concatenate([ties, -ties, ties[::-1], -ties[::-1]])
    ties[::7] = np.float32(-1e-9)  # signs to keep in every chunk
    assert ties.size > 2 * precision._CHUNK
    edge = np.ones(FAST, np.float32)
    edge[5], edge[-5] = -(2.0 ** -25), -(2.0 ** -24)  # the largest magnitude that rounds to -0
    special = np.resize(np.float32([1e6, -np.inf, np.nan, -70000.0, 65519.0, -3e-8, 0.5]), FAST)
    cases = (ties, np.asfortranarray(ties.reshape(2, -1)), edge, special, np.float32([-1e-9, 2.0]))
    for a in cases:
        with np.errstate(over="ignore"):
            want = a.astype(np.float16).astype(np.float32)
            b = a.copy(order="A")
            assert round_to_half(b, b) is b
        assert np.array_equal(_bits(b), _bits(want)) and b.flags.f_contiguous == a.flags.f_contiguous
    b = ties.copy()
    v = b[::3]
    round_to_half(v, v)
    assert np.array_equal(_bits(b[::3]), _bits(ties[::3].astype(np.float16).astype(np.float32)))
    assert np.array_equal(b[1::3], ties[1::3])
    with pytest.warns(RuntimeWarning, match="overflow"):
        round_to_half(special, special)


def test_float_to_half_layouts_out_and_sizes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 500)).astype(np.float32)
    for a in (x, np.asfortranarray(x), x[::2, ::3], x.T, x[:3, :4], x[0, 0], x[:0], x[:, :1]):
        got = float_to_half(a)
        assert got.shape == a.shape and got.dtype == np.float16
        assert np.array_equal(_bits(got), _bits(a.astype(np.float16)))
        assert got.flags.f_contiguous == a.astype(np.float16).flags.f_contiguous
    out = np.empty(x.shape, np.float16)
    assert float_to_half(x, out) is out and np.array_equal(out, x.astype(np.float16))
    with pytest.raises(ValueError, match="shape"):
        float_to_half(x, np.empty((2, 2), np.float16))
    with pytest.raises(TypeError, match="float16"):
        float_to_half(x, np.empty(x.shape, np.float32))
    with pytest.raises(TypeError, match="float16"):
        half_to_float(x)


def test_casts_are_thread_safe():
    """Each thread has its own work arrays."""
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(3 * precision._CHUNK).astype(np.float32) * 10.0 ** -k for k in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: [float_to_half(x) for _ in range(5)], xs))
    for x, rs in zip(xs, results):
        assert all(np.array_equal(_bits(r), _bits(x.astype(np.float16))) for r in rs)


# -- where the engine uses them ------------------------------------------------------------------


def test_to_compute_and_to_storage_match_astype_for_every_low_precision_format():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(50_000) * 10.0 ** rng.uniform(-9, 4, 50_000)).astype(np.float32)
    for fmt in (precision.float16, precision.bfloat16, precision.float8_e4m3, precision.float8_e5m2):
        with np.errstate(all="ignore"):
            stored = to_storage(x, fmt)
            assert stored.dtype == fmt and np.array_equal(_bits(stored), _bits(x.astype(fmt)))
            back = to_compute(stored)
            assert np.array_equal(_bits(back), _bits(stored.astype(np.float32)))
    assert to_storage(x, np.float32) is x and to_compute(x) is x


def test_float16_round_trip_keeps_every_bit_pattern():
    """Why primitives that only move elements may skip it (precision.ROUND_TRIP_EXACT)."""
    with np.errstate(all="ignore"):
        back = float_to_half(half_to_float(ALL_HALVES))
    assert np.array_equal(_bits(back), _bits(ALL_HALVES))
    assert precision.ROUND_TRIP_EXACT == {precision.float16}
    b = ALL_HALVES.view(ml_dtypes.bfloat16)
    with np.errstate(all="ignore"):
        assert not np.array_equal(_bits(b.astype(np.float32).astype(ml_dtypes.bfloat16)), _bits(b))


def test_moving_primitives_in_float16_match_the_round_trip():
    rng = np.random.default_rng(4)
    data = rng.standard_normal((4, 6, 5)).astype(np.float16)
    data.reshape(-1)[:4] = np.array([0x7C01, 0xFE00, 0x8000, 0x0001], np.uint16).view(np.float16)
    x = kp.Tensor(data, requires_grad=True)
    outs = {"reshape": x.reshape(6, 20), "transpose": x.transpose(2, 0, 1), "flatten": x.flatten(1),
            "getitem": x[1:, ::2], "fancy": x[[0, 0, 3]], "pad": kp.pad(x, 1),
            "concatenate": kp.concatenate([x, x], axis=1)}
    want = {"reshape": data.reshape(6, 20), "transpose": data.transpose(2, 0, 1),
            "flatten": data.reshape(4, 30), "getitem": data[1:, ::2], "fancy": data[[0, 0, 3]],
            "pad": np.pad(data, 1), "concatenate": np.concatenate([data, data], axis=1)}
    for name, out in outs.items():
        assert out.dtype == np.float16 and np.array_equal(_bits(out.data), _bits(want[name])), name
    with np.errstate(invalid="ignore"):  # the sums meet the NaNs
        (outs["reshape"].sum() + outs["fancy"].sum()).backward()  # the VJPs still run in float32
    want_grad = np.ones_like(data) + np.array([2, 0, 0, 1], np.float16)[:, None, None]
    assert x.grad.dtype == np.float16 and np.array_equal(x.grad, want_grad)


def _reference_step(opt_cls, kwargs, w, g, steps):
    """The optimizer's arithmetic in float32 by astype, rounded once per step."""
    p = kp.Tensor(w.astype(np.float32), requires_grad=True)
    opt = opt_cls([p], **kwargs)
    for _ in range(steps):
        p.grad = g.astype(np.float32)
        opt.step()
        p.data[...] = p.data.astype(np.float16).astype(np.float32)
    return p.data.astype(np.float16)


@pytest.mark.parametrize("opt_cls, kwargs", [(SGD, {"lr": 0.1}),
                                             (SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
                                             (SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
                                             (Adam, {"lr": 1e-3}),
                                             (Adam, {"lr": 1e-3, "weight_decay": 0.1}),
                                             (AdamW, {"lr": 1e-3, "weight_decay": 0.1})])
def test_optimizer_steps_on_float16_parameters_round_once(opt_cls, kwargs):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((300, 700)) * 0.05).astype(np.float16)
    g = (rng.standard_normal((300, 700)) * 1e-5).astype(np.float16)  # many float16 subnormals
    p = kp.Tensor(w.copy(), requires_grad=True)
    data = p.data
    opt = opt_cls([p], **kwargs)
    for _ in range(3):
        p.grad = g.copy()
        opt.step()
    assert p.data is data  # updated in place
    assert np.array_equal(_bits(p.data), _bits(_reference_step(opt_cls, kwargs, w, g, 3)))
