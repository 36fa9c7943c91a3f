"""The CPU fast path of kinkprop.torch gives what the device-agnostic path gives, and the cheaper
formulations give the rules' values.

On the CPU reading a count costs no device sync, so the directional max-pool looks at the (rare)
tied windows by index (``ops.SPARSE_ON_CPU``); elsewhere it runs branch-free over every window.
Both must agree: gradients, the tangents passed on, and the report. Also here: the directional
relu element by element (NaN inputs and tangents included), the batch-norm tangent against
torch's own JVP, and the directions' draw."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
fwAD = torch.autograd.forward_ad

import kinkprop.torch as kpt  # noqa: E402
from kinkprop.torch import ops  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
D = torch.float64
TOL = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _directional(fn, x, direction, weights):
    """(gradient, tangent of fn(x), (kinks, unresolved)) under the directional policy."""
    tangents = []

    def f(v):
        y = fn(v)
        tangents.append(fwAD.unpack_dual(y).tangent.detach().clone())
        return (y * weights).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (g,), report = kpt.directional_grad(f, [x], directions=[[direction]])
    return g, tangents[0], (report.kinks, report.unresolved)


def _both(fn, x, direction, weights):
    fast = _directional(fn, x, direction, weights)
    before = ops.SPARSE_ON_CPU
    ops.SPARSE_ON_CPU = False
    try:
        slow = _directional(fn, x, direction, weights)
    finally:
        ops.SPARSE_ON_CPU = before
    return fast, slow


def _assert_same(fast, slow, dtype):
    (g1, t1, r1), (g2, t2, r2) = fast, slow
    assert r1 == r2
    for a, b in ((g1, g2), (t1, t2)):
        scale = max(1.0, b.double().nan_to_num().abs().max().item())
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=TOL[dtype] * scale,
                                   equal_nan=True)


def _ints(shape, seed, high=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=g).to(D)


GEOMETRIES = [(3, 2, 1, 1, False), (2, 2, 0, 2, True), (3, 2, 1, 1, True), (2, 1, 1, 1, False),
              (2, 2, 0, 1, False), (3, 3, 1, 2, True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("direction", ["random", "integer", "zero"])
def test_max_pool_directional_by_index_matches_the_dense_rule(dtype, geometry, direction):
    """Integer inputs (many tied windows); integer or zero directions leave ties along the
    direction too (equal splits among the winners)."""
    kernel, stride, padding, dilation, ceil = geometry
    x = _ints((2, 3, 7, 6), 1).to(dtype).requires_grad_()
    gen = torch.Generator().manual_seed(2)
    d = {"random": torch.randn(x.shape, generator=gen, dtype=D),
         "integer": _ints(x.shape, 3) - 1.0, "zero": torch.zeros(x.shape, dtype=D)}[direction]
    d = d.to(dtype)
    out_shape = F.max_pool2d(x.detach(), kernel, stride, padding, dilation, ceil).shape
    w = torch.randn(out_shape, generator=gen, dtype=D).to(dtype)
    fast, slow = _both(lambda v: F.max_pool2d(v, kernel, stride, padding, dilation, ceil),
                       x, d, w)
    assert fast[2][0] > 0
    _assert_same(fast, slow, dtype)


def _pool_rule(rule, x, geometry, g, t):
    """(gradient, tangent) of max_pool2d under a policy rule, through forward and reverse mode."""
    x = x.detach().requires_grad_()
    with fwAD.dual_level(), kpt.kink_policy(max_pool2d=rule):
        out = F.max_pool2d(fwAD.make_dual(x, t), *geometry)
        tangent = fwAD.unpack_dual(out).tangent
        fwAD.unpack_dual(out).primal.backward(g)
    return x.grad, tangent


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("rule", ["split", "last"])
@pytest.mark.parametrize("inputs", ["ties", "random"])
def test_max_pool_rules_by_index_are_bitwise_the_dense_rule(dtype, geometry, rule, inputs):
    """Split and last by index (torch's kernels plus the tied windows rebuilt, the machinery of
    the directional rule): the same sums in the same order as the dense weights (VJP and JVP),
    in every dtype."""
    gen = torch.Generator().manual_seed(8)
    x = (_ints((2, 3, 7, 6), 9) if inputs == "ties"
         else torch.randn((2, 3, 7, 6), generator=gen, dtype=D)).to(dtype)
    t = torch.randn(x.shape, generator=gen, dtype=D).to(dtype)
    g = torch.randn(F.max_pool2d(x, *geometry).shape, generator=gen, dtype=D).to(dtype)
    before = ops.BY_INDEX_RULES
    ops.BY_INDEX_RULES = {rule}
    try:
        fast = _pool_rule(rule, x, geometry, g, t)
    finally:
        ops.BY_INDEX_RULES = before
    slow = _pool_rule(rule, x, geometry, g, t)
    assert torch.equal(fast[0], slow[0])
    assert torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_max_pool_directional_downstream_and_unbatched(dtype):
    """A tangent that comes through an earlier op, a NaN in one window, an unbatched input."""
    base = _ints((3, 6, 6), 4).to(dtype)
    base[1, 2, 3] = float("nan")
    scale = torch.ones((3, 1, 1), dtype=dtype, requires_grad=True)
    d = torch.tensor([[[1.0]], [[0.0]], [[-2.0]]], dtype=dtype)
    w = torch.randn((3, 3, 3), generator=torch.Generator().manual_seed(0), dtype=D).to(dtype)
    fast, slow = _both(lambda s: F.max_pool2d(base * s, 2), scale, d, w)
    _assert_same(fast, slow, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_relu_directional_element_by_element(dtype):
    """1 where x > 0 or x = +-0 and t > 0; 0 where x < 0, x is NaN, or x = +-0 and t < 0; the
    fallback (0) where x = +-0 and t is 0 or NaN (unresolved); the tangent passed on is t * d."""
    nan = float("nan")
    x = torch.tensor([2.0, -1.0, 0.0, -0.0, 0.0, -0.0, 0.0, nan, 3.0], dtype=dtype,
                     requires_grad=True)
    t = torch.tensor([5.0, 5.0, 1.0, -1.0, 0.0, nan, 1.0, 1.0, nan], dtype=dtype)
    w = torch.arange(1.0, 10.0, dtype=dtype)
    d = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=dtype)
    tangents = []

    def f(v):
        y = torch.relu(v)
        tangents.append(fwAD.unpack_dual(y).tangent.detach().clone())
        return (y * w).sum()

    with pytest.warns(kpt.UnresolvedKinkWarning):
        (g,), report = kpt.directional_grad(f, [x], directions=[[t]])
    assert torch.equal(g, w * d)
    want = t * d
    assert torch.equal(tangents[0].isnan(), want.isnan())
    assert torch.equal(tangents[0].nan_to_num(), want.nan_to_num())
    assert (report.kinks, report.unresolved) == (5, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_relu_directional_site_without_kinks_matches_the_branch_free_rule(dtype):
    """On the CPU a relu site whose input holds no zero skips the tangent's comparisons."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((3, 40), generator=gen, dtype=D).to(dtype)
    x[0, :2] = torch.tensor([float("nan"), 1.0])
    x.requires_grad_()
    d = torch.randn(x.shape, generator=gen, dtype=D).to(dtype)
    w = torch.randn(x.shape, generator=gen, dtype=D).to(dtype)
    fast, slow = _both(torch.relu, x, d, w)
    assert fast[2] == (0, 0)
    _assert_same(fast, slow, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_relu_at_nan_inputs_gives_zero_not_nan(dtype):
    """A NaN input is no kink: relu's derivative there is 0, as the NumPy engine's ``x > 0``
    (never NaN, so a zero cotangent stays zero), under the directional policy and the others."""
    x = torch.tensor([float("nan"), float("-nan"), 0.0, -1.0, 2.0], dtype=dtype,
                     requires_grad=True)
    g = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0], dtype=dtype)
    for d in ([1.0, 1.0, 1.0, 1.0, 1.0], [float("nan")] * 5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the NaN direction leaves the kink tied
            (grad,), report = kpt.directional_grad(
                lambda v: (torch.relu(v) * g).sum(), [x],
                directions=[[torch.tensor(d, dtype=dtype)]])
        assert grad.tolist()[:2] == [0.0, 0.0] and grad.tolist()[3:] == [0.0, 1.0]
        assert report.kinks == 1
    for value in (0.5, 1.0):
        x.grad = None
        with kpt.kink_policy("jax", relu=value):
            (torch.relu(x) * g).sum().backward()
        assert x.grad.tolist() == [0.0, 0.0, value, 0.0, 1.0]


def test_relu_directional_without_tangents():
    """No tangent reaches the input (it needs a gradient but carries no direction): every kink
    takes the fallback."""
    w = torch.zeros(3, dtype=D, requires_grad=True)
    const = torch.tensor([0.0, -0.0, 1.0], dtype=D, requires_grad=True)
    with pytest.warns(kpt.UnresolvedKinkWarning):
        (g,), report = kpt.directional_grad(lambda v: (torch.relu(const) * v).sum(), [w],
                                            directions=[[torch.ones(3, dtype=D)]],
                                            fallback="pytorch")
    assert (report.kinks, report.unresolved) == (2, 2)
    assert g.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (7, 3), (5, 2, 9)])
def test_batch_norm_tangent_matches_torch_forward_ad(dtype, shape):
    gen = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(s, generator=gen, dtype=D)

    c = shape[1]
    x, tx = (rnd(*shape) * 3 + 5).to(dtype), rnd(*shape).to(dtype)
    w, b, tw, tb = (rnd(c).to(dtype) for _ in range(4))
    for tangents in ((tx, tw, tb), (tx, None, None), (None, tw, tb), (None, None, tb)):
        for weight in (w, None):
            t_x, t_w, t_b = tangents
            t_w = t_w if weight is not None else None
            with fwAD.dual_level():
                dual = [v if v is None or t is None else fwAD.make_dual(v, t)
                        for v, t in ((x, t_x), (weight, t_w), (b, t_b))]
                y = F.batch_norm(dual[0], None, None, dual[1], dual[2], True, 0.1, 1e-5)
                want = fwAD.unpack_dual(y).tangent
            got = ops.batch_norm_tangent(x, weight, t_x, t_w, t_b, 1e-5)
            exact = ops.batch_norm_tangent(x.double(), None if weight is None else weight.double(),
                                           *(None if t is None else t.double()
                                             for t in (t_x, t_w, t_b)), 1e-5)
            assert got.dtype == dtype
            scale = exact.abs().max().item()
            tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
            # as accurate as torch's own JVP (within a rounding of the result)
            err = (got.double() - exact).abs().max().item()
            err_torch = (want.double() - exact).abs().max().item()
            assert err <= max(tol * scale, 2 * err_torch)


def test_batch_norm_in_the_directional_pass_keeps_torch_semantics():
    """Running statistics update once, eval mode passes through, the gradient is torch's."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)).double()
    b = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 2, 6, 6, dtype=D)
    a(x).square().sum().backward()
    with kpt.kink_policy("directional", model=b, seed=0):
        b(x).square().sum().backward()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(a[1].running_mean, b[1].running_mean)
    assert torch.equal(a[1].running_var, b[1].running_var)
    a.eval()
    b.eval()
    with torch.no_grad():
        want = a(x)
    with kpt.kink_policy("directional", model=b, seed=0):
        got = b(x)
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_directions_spend_the_bits_each_dtype_holds(dtype):
    """Each parameter's direction: k / 2^(b-1) for b-bit integers k cut from the generator's raw
    64-bit words (a quarter of a word per 16-bit element), drawn into the same tensors each step;
    after ``model.to`` the buffers follow the parameters. A torch.Generator (other devices) gives
    the same recipe."""
    model = torch.nn.Linear(5, 3).to(dtype)
    x = torch.ones(2, 5, dtype=dtype)
    handle = kpt.patch(model, "directional", seed=3)
    try:
        draws = []
        for _ in range(2):
            model(x).sum().backward()
            draws.append([d.clone() for d in handle.directional.current])
        same_tensors = handle.directional.current
        model(x).sum().backward()
        assert all(a is b for a, b in zip(same_tensors, handle.directional.current))
        bits = np.random.SFC64(3)  # the CPU's generator
        width = dtype.itemsize
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
        for draw in draws:
            for p, d in zip(model.parameters(), draw):
                words = torch.from_numpy(bits.random_raw(-(-p.numel() * width // 8)).view(np.int64))
                want = (words.view(ints)[:p.numel()].reshape(p.shape).to(dtype)
                        * 2.0 ** (1 - 8 * width))
                assert d.dtype == dtype and torch.equal(d, want)
                assert d.abs().max() <= 1
        assert not torch.equal(draws[0][0], draws[1][0])
        model.to(torch.float64)
        model(x.double()).sum().backward()
        assert all(d.dtype == torch.float64 for d in handle.directional.current)
    finally:
        handle.remove()


def test_uniform_bits_from_a_torch_generator():
    from kinkprop.torch.directional import uniform_bits

    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        gen = torch.Generator().manual_seed(7)
        got = uniform_bits((3, 5), dtype, gen)
        words = torch.empty(-(-15 * dtype.itemsize // 8), dtype=torch.int64)
        words.random_(-2**63, None, generator=torch.Generator().manual_seed(7))
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
        want = words.view(ints)[:15].reshape(3, 5).to(dtype) * 2.0 ** (1 - 8 * dtype.itemsize)
        assert got.dtype == dtype and torch.equal(got, want)
        out = torch.empty((3, 5), dtype=dtype)
        assert uniform_bits((3, 5), dtype, gen, out=out) is out
