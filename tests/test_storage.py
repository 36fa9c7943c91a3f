"""float16 tensors keep computed values as float32 images (kinkprop.storage), and that changes
nothing a user can see: the same bits as packing every result, arrays handed out stay the truth
(writes into them count, held ones see every optimizer step), and images are never written."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

import kinkprop as kp
from kinkprop import storage
from kinkprop.nn import Linear, ReLU, Sequential
from kinkprop.optim import SGD, Adam
from kinkprop.precision import float16


def _bits(a):
    return np.asarray(a).view(np.uint16)


def _net(seed=0):
    return Sequential(Linear(30, 40, rng=seed), ReLU(), Linear(40, 5, rng=seed + 1)).to("float16")


def _packed_reference(x16, y, params16, lr):
    """The same SGD step computed the old way: every primitive result packed to float16 by astype
    and unpacked again (float32 arithmetic in between)."""
    w1, b1, w2, b2 = (p.astype(np.float32) for p in params16)
    r = lambda a: a.astype(np.float32).astype(np.float16).astype(np.float32)  # noqa: E731
    x = x16.astype(np.float32)
    h = r(x @ w1.T + b1)
    a = r(np.maximum(h, 0))
    z = r(a @ w2.T + b2)
    zs = z - z.max(1, keepdims=True)
    p = np.exp(zs) / np.exp(zs).sum(1, keepdims=True)
    onehot = np.eye(5, dtype=np.float32)[y]
    gz = r((p - onehot) / len(y))
    gw2, gb2 = r(gz.T @ a), r(gz.sum(0))
    ga = r(gz @ w2)
    gh = r(ga * (h > 0))
    gw1, gb1 = r(gh.T @ x), r(gh.sum(0))
    new = [r(w - np.float32(lr) * g) for w, g in ((w1, gw1), (b1, gb1), (w2, gw2), (b2, gb2))]
    return [n.astype(np.float16) for n in new], [g.astype(np.float16) for g in (gw1, gb1, gw2, gb2)]


def test_a_training_step_gives_the_bits_of_packing_every_result():
    rng = np.random.default_rng(0)
    net = _net()
    x16 = rng.standard_normal((64, 30)).astype(np.float16)
    y = rng.integers(0, 5, 64)
    before = [p.data.copy() for p in net.parameters()]
    opt = SGD(net.parameters(), lr=0.5)
    loss = kp.cross_entropy(net(kp.Tensor(x16)), y)
    loss.backward()
    grads = [p.grad.copy() for p in net.parameters()]
    opt.step()
    want_params, want_grads = _packed_reference(x16, y, before, 0.5)
    for got, want in zip(grads, want_grads):
        assert got.dtype == float16 and np.array_equal(_bits(got), _bits(want))
    for p, want in zip(net.parameters(), want_params):
        assert p.dtype == float16 and np.array_equal(_bits(p.data), _bits(want))


def test_results_are_images_until_asked_for_and_then_the_array_is_the_truth():
    x = kp.tensor(np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4))
    y = x * 3.1
    assert y.dtype == float16 and y.shape == (3, 4) and y.ndim == 2 and y.size == 12 and len(y) == 3
    assert y._value._image is not None and y._value._array is None  # nothing packed yet
    d = y.data
    assert d.dtype == float16 and y._value._image is None
    want = np.linspace(-2, 2, 12, dtype=np.float16).astype(np.float32) * np.float32(np.float16(3.1))
    assert np.array_equal(_bits(d), _bits(want.reshape(3, 4).astype(np.float16)))
    d[0, 0] = 100.0  # a write into the handed-out array is the tensor's value from now on
    assert (y + 0.0).data[0, 0] == 100.0
    assert y.data is d


def test_an_optimizer_step_stays_lazy_and_keeps_the_parameter_array():
    net = _net()
    p = net.parameters()[0]
    arr_id = id(p.data)
    opt = SGD(net.parameters(), lr=0.1)
    kp.cross_entropy(net(kp.tensor(np.ones((4, 30), np.float16))), np.arange(4)).backward()
    opt.step()
    assert not p._value._packed  # the update lives in the image
    assert id(p.data) == arr_id  # packed into the same array when asked for


def test_an_array_held_elsewhere_sees_every_step_and_its_writes_count():
    rng = np.random.default_rng(1)
    net = _net()
    w = net.parameters()[0]
    held = w.data  # e.g. a pruning mask applied through a kept reference
    view = net.parameters()[2].data[:2]  # a view holds its base array too
    opt = Adam(net.parameters(), lr=1e-2)
    x = kp.tensor(rng.standard_normal((8, 30)).astype(np.float16))
    for _ in range(2):
        opt.zero_grad()
        kp.cross_entropy(net(x), np.arange(8) % 5).backward()
        before = held.copy()
        opt.step()
        assert not np.array_equal(held, before)  # updated in place, as the array it is
        assert np.array_equal(_bits(held), _bits(w.data))
        assert np.shares_memory(view, net.parameters()[2].data)
    held[...] = 0  # written behind the tensor's back: the next forward must see it
    out = net[0](x)
    assert np.array_equal(out.data, np.broadcast_to(net.parameters()[1].data, out.shape))


def test_gradients_are_images_and_clipping_in_place_counts():
    net = _net()
    opt = SGD(net.parameters(), lr=1.0)
    x = kp.tensor(np.full((4, 30), 0.5, np.float16))
    kp.cross_entropy(net(x), np.arange(4)).backward()
    b = net.parameters()[3]
    assert b._grad._image is not None
    g = b.grad
    assert g.dtype == float16 and b._grad._image is None
    g *= 0  # clip to nothing: the step must not move this parameter
    before = b.data.copy()
    opt.step()
    assert np.array_equal(_bits(b.data), _bits(before))


def test_accumulated_gradients_round_like_float16_addition():
    w = kp.tensor(np.array([1.0, 2.0, 3.0], np.float16), requires_grad=True)
    scale = np.float16(1.0009766)  # 1 + 2**-10: products leave float16's grid
    for _ in range(3):
        (w * scale).sum().backward()
    want = np.float16(0)
    for _ in range(3):
        want = np.float16(want + scale)  # float16 += float16, as NumPy rounds it
    assert w.grad.dtype == float16 and np.array_equal(w.grad, np.full(3, want, np.float16))


def test_images_are_never_written_and_views_stay_views():
    """A transposed weight is a view of the weight's array (a primitive that only moves elements
    runs on float16 arrays as they are): it sees the step, and writes through it reach the
    weight, as in float32. Images, which residuals and other tensors may share, are read-only."""
    w = kp.tensor(np.arange(6, dtype=np.float16).reshape(2, 3), requires_grad=True)
    wt = w.T
    assert np.shares_memory(wt.data, w.data)
    opt = SGD([w], lr=1.0)
    (wt * 2.0).sum().backward()
    opt.step()
    assert np.array_equal(wt.data, w.data.T) and wt.data[0, 0] == -2.0
    wt.data[0, 0] = 42.0
    assert w.data[0, 0] == 42.0
    with pytest.raises(ValueError, match="read-only"):
        (w * 1.0)._compute()[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        w._compute()[0, 0] = 1.0


def test_kp_grad_and_detach_hand_out_float16():
    x = np.linspace(-1, 1, 10, dtype=np.float16)
    g = kp.grad(lambda t: (t * t * 1.5).sum())(x)
    assert g.dtype == float16
    assert np.array_equal(_bits(g), _bits((x.astype(np.float32) * 3.0).astype(np.float16)))
    y = kp.tensor(x) * 2.0
    d = y.detach()  # shares the array, as before: writes show in both
    d.data[:] = 0
    assert not y.data.any()
    w = kp.tensor(x.copy(), requires_grad=True)
    dw = w.detach()
    opt = SGD([w], lr=1.0)
    (w * 1.0).sum().backward()
    opt.step()
    assert np.array_equal(dw.data, w.data)


def test_the_review_cases():
    """Cases a review of this change found broken (each against the packed semantics)."""
    x = kp.tensor(np.array([1.5, -2.5, 3.5], np.float16))
    one = x[1].data
    assert isinstance(one, np.ndarray) and one.shape == () and one == np.float16(-2.5)
    one[...] = 7  # a 0-d array, writable, as in float32
    assert kp.relu(x.sum()).data == np.float16(2.5)
    # a float64 .grad set on a float16 parameter steps in float32, as before
    rng = np.random.default_rng(3)
    w0 = (rng.standard_normal(200_000) * 0.05).astype(np.float16)
    g64 = rng.standard_normal(200_000) * 0.3
    p = kp.tensor(w0.copy(), requires_grad=True)
    p.grad = g64
    SGD([p], lr=0.1).step()
    want = (w0.astype(np.float32) - np.float32(0.1) * g64.astype(np.float32)).astype(np.float16)
    assert np.array_equal(_bits(p.data), _bits(want))
    # float8 emulation rounds relu's cotangent off float16's grid (65504 -> 65536): round again
    a = kp.tensor(np.array([2.0, 4.0], np.float16), requires_grad=True)
    with kp.precision.emulate_float8("fp8-e4m3"), np.errstate(over="ignore"):
        kp.relu(a * 0.5).backward(np.array([65504.0, 1.0], np.float16))
    assert np.array_equal(a.grad, np.array([np.inf, 0.5], np.float16))
    # a float32 .grad on a float16 tensor accumulates in float32, as before
    w = kp.tensor(np.array([1.0, 2.0], np.float16), requires_grad=True)
    (w * 3.0).sum().backward()
    w.grad = w.grad.astype(np.float32)
    (w * 3.0).sum().backward()
    assert w.grad.dtype == np.float32 and np.array_equal(w.grad, [6.0, 6.0])
    # a reduction over a strided slice sums a compact upcast, as before (NumPy's float32 order
    # depends on the layout): data built so that the two orders round apart
    rng = np.random.default_rng(7)
    b = (rng.standard_normal((40000, 3)) * 3).astype(np.float16)
    b[1:4, 0] = 0
    exact = b[:, ::2].astype(np.float64).sum()
    lo = np.float16(exact + 300)
    target = (float(lo) + float(np.nextafter(lo, np.float16(np.inf)))) / 2 - exact - 2.0 ** -14
    for r in (1, 2, 3):
        v = np.float16(target)
        b[r, 0] = v
        target -= float(v)
    f = np.ascontiguousarray(b.astype(np.float32)[:, ::2])
    assert kp.tensor(b)[:, ::2].sum().data == np.float16(f.sum())


def test_sole_owner_counting_matches_this_interpreter():
    s = storage.Stored(np.zeros(4, np.float16))
    assert s._sole_owner()
    held = s.array()
    assert not s._sole_owner()
    del held
    assert s._sole_owner()
    view = storage.Stored(np.zeros(8, np.float16)[::2])
    assert not view._sole_owner()  # memory owned elsewhere


@pytest.mark.parametrize("op", ["relu", "abs", "relu6", "hardtanh"])
def test_selecting_primitives_give_the_round_trip_bits(op):
    """relu, abs and relu6 skip the rounding (their outputs are inputs or 0 / 6); hardtanh with
    bounds off float16's grid must not."""
    specials = np.array([0x8000, 0x0000, 0x7C00, 0xFC00, 0x7E00, 0x0001, 0x8001, 0x4600, 0x4601],
                        np.uint16).view(np.float16)
    data = np.concatenate([specials, np.linspace(-8, 8, 300).astype(np.float16)])
    x = kp.tensor(data)
    f = {"relu": lambda t: kp.relu(t), "abs": lambda t: kp.abs(t), "relu6": lambda t: kp.relu6(t),
         "hardtanh": lambda t: kp.hardtanh(t, -0.3, 0.7)}[op]
    got = f(x).data
    x32 = data.astype(np.float32)
    want = {"relu": lambda: np.maximum(x32, np.zeros_like(x32)), "abs": lambda: np.abs(x32),
            "relu6": lambda: np.clip(x32, 0.0, 6.0),
            "hardtanh": lambda: np.clip(x32, np.float32(np.float16(-0.3)),
                                        np.float32(np.float16(0.7)))}[op]()
    with np.errstate(invalid="ignore"):
        assert np.array_equal(_bits(got), _bits(want.astype(np.float16)))


@pytest.mark.parametrize("at_kink", [0.0, 0.3, 1.0])
def test_relu_cotangents_round_only_where_a_kink_value_needs_it(at_kink):
    """Off its kink relu's VJP passes float16 cotangents on (nothing to round); on it, g * 0.3
    leaves float16's grid and must be rounded (the subnormals here lose bits)."""
    rng = np.random.default_rng(2)
    x16 = rng.standard_normal(500).astype(np.float16)
    x16[::7] = 0
    g16 = (rng.standard_normal(500) * 1e-6).astype(np.float16)  # many subnormals
    x = kp.tensor(x16, requires_grad=True)
    kp.relu(x * 3.0, at_kink=at_kink).backward(g16)  # the product's VJP reads relu's cotangent
    d = np.where(x16 > 0, 1.0, np.where(x16 == 0, at_kink, 0.0)).astype(np.float32)
    g_relu = (g16.astype(np.float32) * d).astype(np.float16).astype(np.float32)
    want = (g_relu * np.float32(3.0)).astype(np.float16)
    assert np.array_equal(_bits(x.grad), _bits(want))


@pytest.mark.parametrize("op", ["tanh", "exp", "sigmoid", "sqrt"])
def test_an_output_the_backward_pass_reads_keeps_its_float32_values(op):
    """Fresh results are rounded in their own memory only when nothing else holds them: these
    primitives keep their output for the VJP, which reads it as computed (before rounding)."""
    rng = np.random.default_rng(3)
    x16 = rng.uniform(0.01 if op == "sqrt" else -3, 3, 5000).astype(np.float16)
    g16 = rng.standard_normal(5000).astype(np.float16)
    x, g = x16.astype(np.float32), g16.astype(np.float32)
    r = lambda a: a.astype(np.float16)  # noqa: E731
    y = {"tanh": lambda: np.tanh(x), "exp": lambda: np.exp(x), "sqrt": lambda: np.sqrt(x),
         "sigmoid": lambda: 0.5 * (1.0 + np.tanh(0.5 * x))}[op]()
    d = {"tanh": lambda: 1.0 - y * y, "exp": lambda: y, "sqrt": lambda: 0.5 / y,
         "sigmoid": lambda: y * (1.0 - y)}[op]()
    t = kp.tensor(x16, requires_grad=True)
    out = getattr(kp, op)(t)
    out.backward(g16)
    assert np.array_equal(_bits(out.data), _bits(r(y)))
    assert np.array_equal(_bits(t.grad), _bits(r(g * d)))


def test_kink_hooks_see_the_output_before_it_is_rounded():
    from kinkprop import tape

    seen = []
    hook = lambda prim, site, res, ans, node: seen.append(np.array(ans))  # noqa: E731
    x16 = np.linspace(-4, 4, 3001).astype(np.float16)
    tape.Hooks.on_kink.append(hook)
    try:
        out = kp.leaky_relu(kp.tensor(x16), 0.1)
    finally:
        tape.Hooks.on_kink.remove(hook)
    x = x16.astype(np.float32)
    want = np.where(x > 0, x, x * np.float32(0.1))
    assert np.array_equal(seen[0], want) and not np.array_equal(seen[0], want.astype(np.float16))
    assert np.array_equal(_bits(out.data), _bits(want.astype(np.float16)))


def test_reference_thresholds_ignore_a_tracer_active_at_import():
    """A tracer that reads frame locals while kinkprop is imported (a debugger) must not raise
    the counts that mean "nothing else holds it": tanh's gradient reads the output its VJP kept,
    which in-place rounding would then overwrite (review)."""
    code = (
        "import sys, numpy as np\n"
        "def tracer(frame, event, arg):\n"
        "    frame.f_locals\n"
        "    return tracer\n"
        "sys.settrace(tracer)\n"
        "import kinkprop as kp\n"
        "sys.settrace(None)\n"
        "x16 = np.linspace(-3, 3, 2000).astype(np.float16)\n"
        "x = kp.tensor(x16, requires_grad=True)\n"
        "kp.tanh(x).backward(np.ones(2000, np.float16))\n"
        "a = np.tanh(x16.astype(np.float32))\n"
        "bad = int((x.grad.view(np.uint16) != (1 - a * a).astype(np.float16).view(np.uint16)).sum())\n"
        "print(kp.storage._FRESH_REFS, kp.storage._SOLE_REFS, bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(storage._FRESH_REFS), str(storage._SOLE_REFS), "0"]


def test_reading_data_between_steps_changes_nothing_in_any_layout():
    """Whether a user looks at ``.data`` between steps (which packs the values and drops the
    image) must not change a bit: so the optimizer's new image keeps the parameter's memory
    layout, as an upcast of its array would (review: a Fortran-ordered weight's column sums)."""
    rng = np.random.default_rng(0)
    w0 = np.asfortranarray((rng.standard_normal((300, 200)) * 0.1).astype(np.float16))
    c = kp.tensor(np.float32(1.0))  # float32 products: their sums depend on the order
    results = []
    for look in (False, True):
        w = kp.nn.Parameter(w0.copy(order="F"))
        opt = SGD([w], lr=0.01)
        for _ in range(3):
            col = kp.sum(w * c * (w * c), axis=0)
            loss = kp.sum(col * col)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if look:
                w.data  # noqa: B018  (reading packs the values and drops the image)
        results.append((col.data.copy(), w.data.copy()))
    (col_a, w_a), (col_b, w_b) = results
    assert np.array_equal(_bits(col_a), _bits(col_b)) and np.array_equal(_bits(w_a), _bits(w_b))


def test_an_ndarray_subclass_output_becomes_a_plain_array():
    from kinkprop.primitives.core import apply, register

    prim = register("test_storage_matrix_out", lambda x: (np.asmatrix(x) * np.float32(1.5), None),
                    lambda g, res, needs, c: (np.asarray(g) * 1.5,), lambda ts, res, c: ts[0] * 1.5)
    x16 = (np.arange(1, 5, dtype=np.float16).reshape(2, 2) / 3).astype(np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # np.matrix
        y = apply(prim, (kp.tensor(x16, requires_grad=True),))
    y16 = (x16.astype(np.float32) * np.float32(1.5)).astype(np.float16)
    want = (y16.astype(np.float32) * y16.astype(np.float32)).astype(np.float16)  # elementwise
    assert np.array_equal(_bits((y * y).data), _bits(want))
