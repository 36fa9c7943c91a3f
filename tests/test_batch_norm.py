"""batch_norm as one primitive: PyTorch's training-mode batch-norm in float64 (values, VJP, JVP),
and the BatchNorm modules that use it give what the composed form gave."""

from __future__ import annotations

import numpy as np
import pytest

import kinkprop as kp
import kinkprop.nn as knn

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.mark.parametrize("shape", [(6, 3), (5, 4, 3, 2), (4, 2, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_matches_torch(shape, affine):
    rng = np.random.default_rng(len(shape) + affine)
    x = rng.standard_normal(shape) * 3 + 1
    wb = [rng.standard_normal(shape[1]), rng.standard_normal(shape[1])] if affine else []
    args = [x, *wb]

    def f(x, *wb):
        return kp.batch_norm(x, *wb, eps=1e-4)

    def tf(x, *wb):
        return F.batch_norm(x, None, None, *(wb or (None, None)), training=True, eps=1e-4)

    ts = [torch.tensor(a, requires_grad=True) for a in args]
    ref = tf(*ts)
    out, vjp_fn = kp.vjp(f, *args)
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(shape)
    for got, want in zip(vjp_fn(g), torch.autograd.grad(ref, ts, torch.tensor(g))):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)
    tangents = [rng.standard_normal(np.shape(a)) for a in args]
    _, t_out = kp.jvp(f, args, tangents)
    _, t_ref = torch.func.jvp(tf, tuple(torch.tensor(a) for a in args),
                              tuple(torch.tensor(t) for t in tangents))
    np.testing.assert_allclose(t_out, t_ref.numpy(), rtol=1e-10, atol=1e-12)


def test_batch_norm_reports_its_statistics_and_checks_its_input():
    x = np.arange(12.0).reshape(4, 3)
    stats = {}
    kp.batch_norm(x, stats=stats)
    np.testing.assert_array_equal(stats["mean"], x.mean(axis=0))
    np.testing.assert_array_equal(stats["var"], x.var(axis=0))
    with pytest.raises(ValueError, match="both, or neither"):
        kp.batch_norm(x, np.ones(3))
    with pytest.raises(ValueError, match=r"must be \(3,\)"):
        kp.batch_norm(x, np.ones(2), np.zeros(2))



def test_one_value_per_channel_gives_the_bias_as_the_composed_form_did():
    x = kp.tensor(np.array([[1.0, -2.0, 3.0]]), requires_grad=True)
    w, b = kp.tensor(np.full(3, 2.0), requires_grad=True), kp.tensor(np.arange(3.0),
                                                                      requires_grad=True)
    y = kp.batch_norm(x, w, b)
    y.backward(np.ones((1, 3)))
    np.testing.assert_array_equal(y.data, [[0.0, 1.0, 2.0]])
    np.testing.assert_array_equal(x.grad, np.zeros((1, 3)))
    np.testing.assert_array_equal(b.grad, np.ones(3))


@pytest.mark.parametrize("layer, shape", [(knn.BatchNorm2d, (8, 3, 4, 4)), (knn.BatchNorm1d, (8, 5))])
def test_modules_give_what_the_composed_form_gave(monkeypatch, layer, shape):
    """float64 training steps through the one-record batch_norm and through the composed form
    agree: outputs, gradients, running statistics."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 2 + 0.5
    g = rng.standard_normal(shape)

    def step():
        bn = layer(shape[1], dtype="float64")
        bn.weight.data[...] = rng.standard_normal(shape[1])
        xt = kp.tensor(x, requires_grad=True)
        y = bn(xt)
        names = {t.grad_fn.prim.name for t in kp.tape.toposort(y) if t.grad_fn is not None}
        y.backward(g)
        return "batch_norm" in names, [y.data, xt.grad, bn.weight.grad, bn.bias.grad,
                                       bn.running_mean.copy(), bn.running_var.copy()]

    state = rng.bit_generator.state
    one_record, fused = step()
    monkeypatch.setattr(knn.layers, "_ONE_RECORD", ())  # every format composed
    rng.bit_generator.state = state
    still_one_record, composed = step()
    assert one_record and not still_one_record
    for a, b in zip(fused, composed):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_low_precision_modules_keep_the_composed_form():
    bn = knn.BatchNorm2d(3, dtype="bfloat16")
    y = bn(kp.tensor(np.ones((4, 3, 2, 2)), dtype="bfloat16", requires_grad=True))
    names = {t.grad_fn.prim.name for t in kp.tape.toposort(y) if t.grad_fn is not None}
    assert "batch_norm" not in names and {"mean", "div"} <= names


def test_an_empty_batch_keeps_its_shape():
    x = kp.tensor(np.zeros((0, 3, 2, 2)), requires_grad=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = kp.batch_norm(x, np.ones(3), np.zeros(3))
        y.sum().backward()
    assert y.shape == (0, 3, 2, 2) and x.grad.shape == (0, 3, 2, 2)

