"""Census, bifurcation test and low-precision emulation, validated on constructed kinks."""

import numpy as np
import pytest

import kinkprop as kp
from kinkprop.diagnostics.bifurcation import bifurcation_test
from kinkprop.precision import emulate_float8, scaled_round


def test_exact_hits_signed_zeros_and_effective():
    # products place inputs exactly on the kink, with both signs of zero (-1 * 0 = -0.0);
    # a BLAS sum would not do: its accumulator may start from +0 and turn -0 into +0
    a = np.array([[0.0, -1.0, 3.0, -2.0], [0.0, 1.0, 0.0, -1.0]])
    w = kp.tensor(np.array([1.0, 0.0, 1.0, 1.0]), requires_grad=True)
    z = kp.tensor(a) * w
    np.testing.assert_array_equal(np.signbit(z.data), [[0, 1, 0, 1], [0, 0, 0, 1]])
    with kp.census() as c:
        h = kp.relu(z)
        # cotangent zero at [0, 0]: that hit is not effective
        (h * np.array([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])).sum().backward()
        c.step()
    (counts,) = c.totals().values()
    assert (counts.evaluated, counts.hits) == (8, 5)
    assert (counts.plus_zero, counts.minus_zero) == (4, 1)
    assert counts.effective == 4


def test_max_pool_ties_at_zero_and_at_positive_values():
    x = np.zeros((1, 1, 4, 6))
    x[0, 0, :2, 2:4] = 5.0  # window 2: tied at 5
    x[0, 0, :2, 4:6] = [[1.0, 2.0], [0.0, 0.0]]  # window 3: single max
    x[0, 0, 2:, :2] = [[-1.0, 3.0], [3.0, 0.0]]  # window 4: tied at 3
    # windows 1 (all 0), 5 and 6 (all 0): tied at 0
    t = kp.tensor(x, requires_grad=True)
    with kp.census() as c:
        kp.max_pool2d(t, 2).sum().backward()
    (counts,) = c.totals().values()
    assert (counts.evaluated, counts.hits) == (6, 5)
    assert (counts.tie_zero, counts.tie_nonzero) == (3, 2)
    assert counts.effective == 5


@pytest.mark.parametrize("kernel", [(1, 3), 3, 16, 17])
def test_max_pool_ties_counted_for_small_and_large_kernels(kernel):
    """Tied windows are counted from per-offset hits in bytes, in uint16 from 256 offsets on:
    256 or 289 tied offsets must not wrap around to a count of 0 or 33."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = np.zeros((1, 1, kh, 2 * kw))  # window 1: every offset ties at 0
    x[0, 0, 0, kw] = 1.0  # window 2: a single maximum
    with kp.census() as c:
        kp.max_pool2d(kp.tensor(x, requires_grad=True), kernel).sum().backward()
    (counts,) = c.totals().values()
    assert (counts.evaluated, counts.hits, counts.tie_zero) == (2, 1, 1)


def test_sites_are_named_by_module_path_and_call_order():
    model = kp.nn.Sequential(kp.nn.Linear(2, 3), kp.nn.ReLU(), kp.nn.Linear(3, 1), kp.nn.ReLU())
    with kp.census() as c:
        model(kp.tensor(np.zeros((2, 2), np.float32)))
        kp.relu(kp.tensor(np.zeros(3)))
        kp.relu(kp.tensor(np.ones(3)))
    assert list(c.totals()) == ["1:relu", "3:relu", "relu#0", "relu#1"]
    assert c.totals()["relu#0"].hits == 3 and c.totals()["relu#1"].hits == 0


def test_census_never_changes_results():
    rng = np.random.default_rng(0)
    model = kp.nn.build_model("convnet", (1, 8, 8), 4, seed=1, dtype="float64", channels=(3, 4),
                              hidden=8, batch_norm=True)
    x = rng.random((6, 1, 8, 8))
    x[x < 0.5] = 0
    y = rng.integers(0, 4, 6)

    def grads(level):
        model.zero_grad()
        ctx = kp.census(level) if level else _null()
        with ctx:
            kp.cross_entropy(model(kp.tensor(x)), y).backward()
        return [p.grad.copy() for p in model.parameters()]

    base = grads(None)
    for level in ("exact", "ambiguous"):
        assert all(np.array_equal(a, b) for a, b in zip(base, grads(level)))


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_ambiguous_level_uses_the_rounding_bound():
    # z = 1e-8 * 1 + 1 * (-1e-8) = 0 exactly; z2 = 1 - 1 + 1e-17 is within gamma_3 * 2
    W = kp.tensor(np.array([[1e-8, 1.0], [1.0, 1.0], [3.0, 0.0]]), requires_grad=True)
    x = kp.tensor(np.array([[1.0, -1e-8]]))
    b = np.array([0.0, 0.0, np.nextafter(-3.0, 0.0)])
    with kp.census("ambiguous") as c:
        kp.relu(x @ W.T + b).sum().backward()
    (counts,) = c.totals().values()
    # element 0: exactly 0 (a hit, and within the bound); element 1: 1 - 1e-8, far from 0;
    # element 2: 3 - (3 - ulp) = 4.4e-16 <= gamma_3 * 6 (u = 2**-53): ambiguous, not a hit
    assert counts.hits == 1
    assert counts.ambiguous == 2


def test_unknown_census_level():
    with pytest.raises(ValueError, match="valid: exact, ambiguous"):
        with kp.census("full"):
            pass


def _mlp_loss(model, x, y):
    return lambda: kp.cross_entropy(model(kp.tensor(x)), y)


def test_bifurcation_is_detected_exactly_when_an_effective_kink_exists():
    model = kp.nn.Sequential(kp.nn.Linear(2, 3), kp.nn.ReLU(), kp.nn.Linear(3, 2))
    model.to("float64")
    first = model[0]
    first.weight.data[...] = [[1.0, -1.0], [1.0, 1.0], [0.0, 2.0]]
    first.bias.data[...] = 0.0
    params = dict(model.named_parameters())
    # input (1, 1): first unit's pre-activation is exactly 0 -> an effective kink
    on = bifurcation_test(_mlp_loss(model, np.array([[1.0, 1.0]]), [0]), params)
    assert on.differs and on.second_backward and on.kink_hits == 1
    assert set(on.differing) == {"0.weight", "0.bias"}
    assert on.norm > 0
    # the same kink with the unit's outgoing weights zeroed: a hit, but not effective
    model[2].weight.data[:, 0] = 0.0
    off = bifurcation_test(_mlp_loss(model, np.array([[1.0, 1.0]]), [0]), params)
    assert off.kink_hits == 1 and not off.differs
    # no kink at all: identical by construction, no second backward
    none = bifurcation_test(_mlp_loss(model, np.array([[1.0, 2.0]]), [0]), params)
    assert not none.differs and not none.second_backward and none.kink_hits == 0


def test_bifurcation_leaves_policy_a_gradients():
    model = kp.nn.Sequential(kp.nn.Linear(2, 3), kp.nn.ReLU(), kp.nn.Linear(3, 2))
    model.to("float64")
    model[0].weight.data[...] = [[1.0, -1.0], [1.0, 1.0], [0.0, 2.0]]
    model[0].bias.data[...] = 0.0
    x = np.array([[1.0, 1.0]])
    bifurcation_test(_mlp_loss(model, x, [1]), dict(model.named_parameters()))
    got = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    with kp.kink_policy(relu=0.0):
        kp.cross_entropy(model(kp.tensor(x)), [1]).backward()
    assert all(np.array_equal(a, p.grad) for a, p in zip(got, model.parameters()))


def test_float16_pre_activations_hit_zero_more_often_than_float32():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64))
    w = rng.standard_normal((64, 64)) / 8
    hits = {}
    for dtype in ("float32", "float16"):
        with kp.census() as c:
            kp.relu(kp.tensor(x, dtype=dtype) @ kp.tensor(w, dtype=dtype) - 0.0)
        hits[dtype] = c.total_hits()
    assert hits["float16"] >= hits["float32"]


@pytest.mark.parametrize("fmt,fmax", [("fp8-e4m3", 448.0), ("fp8-e5m2", 57344.0)])
def test_float8_scaled_rounding(fmt, fmax):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(1000) * 1e-5).astype(np.float32)
    r = scaled_round(a, kp.precision.as_dtype(fmt))
    assert r.dtype == np.float32
    assert np.max(np.abs(r)) <= np.max(np.abs(a)) * 1.13  # scaled near the top of the range
    rel = np.abs(r - a) / np.abs(a)
    assert np.median(rel) < (0.07 if fmt == "fp8-e4m3" else 0.13)
    assert np.count_nonzero(r) > 990  # no wholesale underflow thanks to the scale
    with emulate_float8(fmt):
        y = kp.relu(kp.tensor(a))
    assert len(np.unique(np.abs(y.data[y.data != 0]) / np.max(np.abs(y.data)))) < 256


def test_training_census_records_hits_per_layer(tmp_path):
    from kinkprop.data import Dataset
    from kinkprop.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 4, 4)).astype(np.float32)
    x[x < 0.5] = 0
    y = rng.integers(0, 2, 64)
    data = Dataset("toy", x[:48], y[:48], x[48:], y[48:], ["a", "b"], (1, 4, 4))
    config = TrainConfig(dataset="toy", model="convnet", epochs=2, batch_size=16, lr=0.05,
                         census="exact", precision="bf16", extra={})
    trainer = Trainer(config, dataset=data, log=lambda m: None)
    summary = trainer.run()
    kinks = summary["history"][0]["kinks"]
    assert set(kinks) == {"1:relu", "2:max_pool2d", "4:relu", "5:max_pool2d", "8:relu"}
    assert kinks["2:max_pool2d"]["hits"] > 0  # flat regions tie
