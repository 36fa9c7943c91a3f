"""conv2d's two orders of output positions (image-major and batch-last, see primitives/conv.py)
give the same forward values, VJPs and JVPs: each is forced in turn and checked against PyTorch
in float64, on geometries with strides, padding and non-square kernels, and the automatic choice
is checked on LeNet's two convolutions."""

from __future__ import annotations

import numpy as np
import pytest

import kinkprop as kp
from kinkprop.primitives import conv

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

GEOMETRIES = [  # (x shape, w shape, stride, padding, bias)
    ((3, 2, 7, 9), (4, 2, 3, 2), 1, 0, True),
    ((2, 3, 8, 6), (5, 3, 2, 3), 2, 1, False),
    ((4, 1, 9, 9), (3, 1, 3, 3), (1, 2), (1, 0), True),
    ((9, 6, 10, 10), (16, 6, 5, 5), 1, 0, True),  # LeNet's second conv, a smaller batch
]


@pytest.fixture(params=[False, True], ids=["image-major", "batch-last"])
def layout(request, monkeypatch):
    monkeypatch.setattr(conv, "_batch_last", lambda geo, weight_shape: request.param)
    return request.param


def _args(rng, xs, ws, bias):
    args = [rng.standard_normal(xs), rng.standard_normal(ws)]
    if bias:
        args.append(rng.standard_normal(ws[0]))
    return args


@pytest.mark.parametrize("xs, ws, stride, padding, bias", GEOMETRIES)
def test_conv2d_layout_matches_torch(layout, xs, ws, stride, padding, bias):
    rng = np.random.default_rng(sum(xs) + sum(ws))
    args = _args(rng, xs, ws, bias)

    def f(x, w, *b):
        return kp.conv2d(x, w, b[0] if b else None, stride=stride, padding=padding)

    ts = [torch.tensor(a, requires_grad=True) for a in args]
    ref = F.conv2d(ts[0], ts[1], ts[2] if bias else None, stride=stride, padding=padding)
    out, vjp_fn = kp.vjp(f, *args)
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-12, atol=1e-12)

    g = rng.standard_normal(out.shape)
    ref_grads = torch.autograd.grad(ref, ts, torch.tensor(g))
    for got, want in zip(vjp_fn(g), ref_grads):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-11)

    tangents = [rng.standard_normal(np.shape(a)) for a in args]
    _, t_out = kp.jvp(f, args, tangents)
    _, t_ref = torch.func.jvp(
        lambda *a: F.conv2d(a[0], a[1], a[2] if bias else None, stride=stride, padding=padding),
        tuple(torch.tensor(a) for a in args), tuple(torch.tensor(t) for t in tangents))
    np.testing.assert_allclose(t_out, t_ref.numpy(), rtol=1e-12, atol=1e-11)


def test_lenet_convolutions_choose_their_order():
    first = conv._Geometry((128, 1, 28, 28), (5, 5), (1, 1), (2, 2), "conv2d")
    second = conv._Geometry((128, 6, 14, 14), (5, 5), (1, 1), (0, 0), "conv2d")
    assert not conv._batch_last(first, (6, 1, 5, 5))  # wide output: image-major
    assert conv._batch_last(second, (16, 6, 5, 5))  # OW 10, 150 columns per 16 outputs


def test_census_bound_follows_the_layout(layout):
    """The ambiguous census level bounds conv2d's rounding error by conv2d(|x|, |w|) + |b|,
    computed from the saved columns: it must land on the right output positions in either
    order."""
    rng = np.random.default_rng(3)
    x, w, b = _args(rng, (5, 6, 10, 10), (16, 6, 5, 5), True)
    x[0] *= 1e3  # one image with a much larger bound: a misplaced bound shows
    with kp.census("ambiguous") as c:
        out = kp.conv2d(x, w, b)
        kept, bound, n = c._bounds[id(out)]
    assert kept is out and n == 6 * 25 + 1
    want = F.conv2d(torch.tensor(np.abs(x)), torch.tensor(np.abs(w)), torch.tensor(np.abs(b)))
    np.testing.assert_allclose(bound, want.numpy(), rtol=1e-12)


@pytest.mark.parametrize("xs, ws, stride, padding, bias, moving",
                         [(*g, m) for g in GEOMETRIES for m in ("x", "w", "b", "all")
                          if g[-1] or m != "b"])
def test_jvp_at_masked_elements_matches_the_dense_jvp(layout, xs, ws, stride, padding, bias,
                                                      moving):
    """conv2d's jvp_at (the directional sweep's sparse JVP) gives the dense JVP's values on the
    elements asked for and zeros elsewhere, whichever inputs move."""
    rng = np.random.default_rng(len(xs) + sum(ws))
    args = _args(rng, xs, ws, bias)
    x = kp.tensor(args[0], requires_grad=True)
    out = kp.conv2d(x, *(kp.tensor(a, requires_grad=True) for a in args[1:]), stride=stride,
                    padding=padding)
    node = out._node
    ts = [rng.standard_normal(np.shape(a)) if moving in (name, "all") else None
          for a, name in zip(args, "xwb")]
    dense = node.prim.jvp(ts, node.res, node.choice)
    for need in (rng.random(out.shape) < 0.2, np.zeros(out.shape, bool)):  # some; none
        got = node.prim.jvp_at(ts, node.res, node.choice, need)
        assert got.shape == out.shape
        np.testing.assert_allclose(got[need], np.asarray(dense)[need], rtol=1e-12, atol=1e-12)
        assert not got[~need].any()


@pytest.mark.parametrize("shape, kernel", [((3, 2, 5, 7), 2), ((2, 3, 9, 9), 3), ((40, 4, 8, 8), 2)])
@pytest.mark.parametrize("census", [False, True])
def test_max_pool_first_winner_vjp_matches_torch(monkeypatch, shape, kernel, census):
    """Tiling windows with ties (integer inputs), odd sizes whose last rows and columns no window
    covers, batches split in blocks, and hits computed by the census or not: the gradient is
    PyTorch's, bit for bit."""
    monkeypatch.setattr(conv, "_VJP_BLOCK_BYTES", 700)  # a few images per block
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 3, shape).astype(np.float64)
    g = rng.standard_normal((shape[0], shape[1], shape[2] // kernel, shape[3] // kernel))
    xt = kp.tensor(x, requires_grad=True)
    with kp.kink_policy("pytorch"), (kp.census() if census else _nothing()):
        kp.max_pool2d(xt, kernel).backward(g)
    t = torch.tensor(x, requires_grad=True)
    F.max_pool2d(t, kernel).backward(torch.tensor(g))
    assert np.array_equal(xt.grad, t.grad.numpy())


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("xs, ws", [((0, 6, 12, 12), (16, 6, 5, 5)), ((0, 1, 12, 12), (6, 1, 5, 5)),
                                    ((2, 0, 6, 6), (4, 0, 3, 3))])
def test_empty_batches_and_channels(layout, xs, ws):
    """No image, or no input channel (each output then its bias): the shapes, zero gradients."""
    x = kp.tensor(np.zeros(xs), requires_grad=True)
    w = kp.tensor(np.ones(ws), requires_grad=True)
    y = kp.conv2d(x, w, np.ones(ws[0]))
    shape = (xs[0], ws[0], xs[2] - ws[2] + 1, xs[3] - ws[3] + 1)
    assert y.shape == shape and np.array_equal(y.data, np.ones(shape))
    kp.max_pool2d(y, 2).sum().backward()
    assert x.grad.shape == xs and w.grad.shape == ws and not w.grad.any()
    _, t = kp.jvp(lambda a, b: kp.conv2d(a, b), [x.data, w.data], [x.data, w.data])
    assert t.shape == shape


def test_no_output_channel_is_refused():
    with pytest.raises(ValueError, match="no output channel"):
        kp.conv2d(np.zeros((1, 3, 4, 4)), np.zeros((0, 3, 3, 3)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int8, np.int16, np.int32,
                                   np.int64, np.uint8, np.bool_])
def test_max_pool_padding_never_wins_in_any_dtype(dtype):
    """Padding takes the lowest value of the input's type (-inf, an integer type's minimum,
    False): the max over a padded window is the max over its real elements. (Filling integer
    padding with -inf through np.full casts it to 0, which beat every negative element.)"""
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    low = info.min if info is not None else (False if dtype is np.bool_ else -1e4)
    x = np.full((2, 1, 3, 4), low, dtype)
    x[1, 0, 1, 2] = 1 if dtype is not np.bool_ else True
    got = kp.max_pool2d(kp.tensor(x), 2, stride=1, padding=1).data
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    want = np.lib.stride_tricks.sliding_window_view(xp, (2, 2), axis=(2, 3)).max(axis=(-2, -1))
    assert got.dtype == dtype and np.array_equal(got.astype(np.float64), want)


@pytest.mark.parametrize("value", [0.0, -np.inf, 1.5])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_padding_is_np_pad(dtype, value):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 5, 4)).astype(dtype)
    for xx, pad in ((x, (1, 2)), (x.transpose(0, 1, 3, 2), (0, 1)), (x[:0], (2, 0))):
        geo = conv._Geometry(xx.shape, (3, 3), (1, 1), pad, "t")
        want = np.pad(xx, ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2), constant_values=value)
        got = geo.pad(xx, value)
        assert got.dtype == want.dtype and np.array_equal(got, want) and got.flags.c_contiguous
    with pytest.raises(ValueError, match="cannot pad int8 with -inf"):
        conv._Geometry((1, 1, 2, 2), (2, 2), (1, 1), (1, 1), "t").pad(np.zeros((1, 1, 2, 2),
                                                                                np.int8), -np.inf)
