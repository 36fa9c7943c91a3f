"""Training matches PyTorch step for step in float64 (same init, data order, optimizer)."""

import numpy as np
import pytest

import kinkprop as kp
from kinkprop import nn
from kinkprop.optim import SGD, Adam, AdamW

torch = pytest.importorskip("torch")


def _torch_copy(model, tmodel):
    for (name, p), (tname, tp) in zip(model.named_parameters(), tmodel.named_parameters()):
        assert name == tname and p.shape == tuple(tp.shape)
        with torch.no_grad():
            tp.copy_(torch.from_numpy(p.data.copy()))


def _torch_mlp(widths, n_in, n_out, batch_norm):
    layers, n = [torch.nn.Flatten()], n_in
    for w in widths:
        layers.append(torch.nn.Linear(n, w))
        if batch_norm:
            layers.append(torch.nn.BatchNorm1d(w))
        layers.append(torch.nn.ReLU())
        n = w
    layers.append(torch.nn.Linear(n, n_out))
    return torch.nn.Sequential(*layers).double()


def _torch_convnet(batch_norm):
    bn = (lambda c: [torch.nn.BatchNorm2d(c)]) if batch_norm else (lambda c: [])
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), *bn(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, padding=1), *bn(6), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(6 * 3 * 3, 16),
        *([torch.nn.BatchNorm1d(16)] if batch_norm else []), torch.nn.ReLU(),
        torch.nn.Linear(16, 10)).double()


OPTIMIZERS = {
    "sgd": (lambda p: SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "momentum": (lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
                 lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "nesterov": (lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True),
                 lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (lambda p: Adam(p, lr=1e-2, weight_decay=1e-3),
             lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3)),
    "adamw": (lambda p: AdamW(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2)),
}


def _run_both(model, tmodel, make_opt, make_topt, x, y, steps=20, batch=16):
    opt, topt = make_opt(model.parameters()), make_topt(tmodel.parameters())
    rng = np.random.default_rng(1)
    ours, theirs = [], []
    for _ in range(steps):
        idx = rng.choice(len(x), batch, replace=False)
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        loss = kp.cross_entropy(model(kp.tensor(xb)), yb)
        loss.backward()
        opt.step()
        ours.append(float(loss.data))
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(xb)),
                                                  torch.from_numpy(yb))
        tloss.backward()
        topt.step()
        theirs.append(tloss.item())
    return np.array(ours), np.array(theirs)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("batch_norm", [False, True])
def test_mlp_first_20_losses_match_torch(opt, batch_norm):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 1, 6, 6))
    y = rng.integers(0, 10, 200)
    model = nn.build_model("mlp", (1, 6, 6), 10, seed=3, dtype="float64", widths=(32, 24),
                           batch_norm=batch_norm)
    tmodel = _torch_mlp((32, 24), 36, 10, batch_norm)
    _torch_copy(model, tmodel)
    ours, theirs = _run_both(model, tmodel, *OPTIMIZERS[opt], x, y)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
    for (name, p), (_, tp) in zip(model.named_parameters(), tmodel.named_parameters()):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), atol=1e-9, err_msg=name)
    if batch_norm:
        for (name, b), (_, tb) in zip(model.named_buffers(),
                                      [(n, b) for n, b in tmodel.named_buffers()
                                       if "num_batches" not in n]):
            np.testing.assert_allclose(b, tb.numpy(), atol=1e-9, err_msg=name)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_convnet_first_20_losses_match_torch(batch_norm):
    rng = np.random.default_rng(0)
    x = rng.random((100, 1, 12, 12))
    x[x < 0.4] = 0.0  # flat regions: max-pool ties, exact zeros, as in Fashion-MNIST
    y = rng.integers(0, 10, 100)
    model = nn.build_model("convnet", (1, 12, 12), 10, seed=5, dtype="float64",
                           channels=(4, 6), hidden=16, batch_norm=batch_norm)
    tmodel = _torch_convnet(batch_norm)
    _torch_copy(model, tmodel)
    ours, theirs = _run_both(model, tmodel, *OPTIMIZERS["momentum"], x, y)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)


def test_eval_mode_uses_running_statistics():
    rng = np.random.default_rng(0)
    model = nn.build_model("mlp", (8,), 3, seed=0, dtype="float64", widths=(5,), batch_norm=True)
    tmodel = _torch_mlp((5,), 8, 3, True)
    _torch_copy(model, tmodel)
    for _ in range(3):
        xb = rng.standard_normal((10, 8))
        model(kp.tensor(xb))
        tmodel(torch.from_numpy(xb))
    model.eval()
    tmodel.eval()
    xb = rng.standard_normal((4, 8))
    np.testing.assert_allclose(model(kp.tensor(xb)).data,
                               tmodel(torch.from_numpy(xb)).detach().numpy(), atol=1e-12)
