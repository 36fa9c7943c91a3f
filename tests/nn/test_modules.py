"""Module API, layers, initialisers, optimizers and schedules."""

import numpy as np
import pytest

import kinkprop as kp
from kinkprop import nn
from kinkprop.optim import SGD, Adam, CosineAnnealingLR, StepLR


def test_same_seed_same_network_and_names():
    a = nn.build_model("convnet", (1, 12, 12), 10, seed=7, channels=(4, 6), hidden=16)
    b = nn.build_model("convnet", (1, 12, 12), 10, seed=7, channels=(4, 6), hidden=16)
    c = nn.build_model("convnet", (1, 12, 12), 10, seed=8, channels=(4, 6), hidden=16)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias",
                        "9.weight", "9.bias"]
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["0.weight"], sc["0.weight"])
    assert [m.path for m in a.modules()][:3] == ["", "0", "1"]


def test_nested_paths_follow_assignment():
    inner = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    outer = nn.Sequential(nn.Linear(3, 3), inner)
    assert inner[1].path == "1.1"
    assert [n for n, _ in outer.named_parameters()] == ["0.weight", "0.bias", "1.0.weight",
                                                        "1.0.bias"]


def test_relu_sites_are_named_by_module_path():
    sites = []

    def hook(prim, site, res, ans, node):
        sites.append(site)

    model = nn.build_model("mlp", (4,), 2, seed=0, widths=(3, 3))
    kp.tape.Hooks.on_kink.append(hook)
    try:
        model(kp.tensor(np.ones((2, 4), np.float32)))
    finally:
        kp.tape.Hooks.on_kink.remove(hook)
    assert sites == ["2", "4"]


def test_torch_default_init_bounds():
    lin = nn.Linear(400, 300, rng=np.random.default_rng(0))
    bound = 1 / np.sqrt(400)
    assert np.abs(lin.weight.data).max() <= bound
    assert np.abs(lin.weight.data).max() > 0.99 * bound
    assert lin.weight.dtype == np.float32


@pytest.mark.parametrize("name,std", [("kaiming_normal_", np.sqrt(2 / 500)),
                                      ("xavier_normal_", np.sqrt(2 / 800))])
def test_normal_initialisers_have_the_documented_spread(name, std):
    t = kp.tensor(np.empty((300, 500), np.float64))
    getattr(nn.init, name)(t, np.random.default_rng(0), **({"nonlinearity": "relu"}
                                                          if "kaiming" in name else {}))
    assert abs(t.data.std() / std - 1) < 0.01


def test_state_dict_round_trip_and_errors():
    model = nn.build_model("mlp", (4,), 2, seed=0, widths=(3,), batch_norm=True)
    state = model.state_dict()
    assert "2.running_mean" in state
    other = nn.build_model("mlp", (4,), 2, seed=1, widths=(3,), batch_norm=True)
    other.load_state_dict(state)
    assert all(np.array_equal(v, other.state_dict()[k]) for k, v in state.items())
    with pytest.raises(KeyError, match="missing keys"):
        other.load_state_dict({"1.weight": state["1.weight"]})
    bad = dict(state)
    bad["1.weight"] = np.zeros((5, 5))
    before = other.state_dict()
    with pytest.raises(ValueError, match="1.weight has shape"):
        other.load_state_dict(bad)
    assert all(np.array_equal(v, other.state_dict()[k]) for k, v in before.items())


def test_dropout_is_seeded_and_off_in_eval():
    x = kp.tensor(np.ones((4, 50), np.float32))
    a = nn.Dropout(0.5, rng=1)(x).data
    b = nn.Dropout(0.5, rng=1)(x).data
    assert np.array_equal(a, b) and set(np.unique(a)) <= {0.0, 2.0}
    d = nn.Dropout(0.5, rng=1).eval()
    assert np.array_equal(d(x).data, x.data)


def test_optimizer_updates_in_place():
    model = nn.build_model("mlp", (4,), 2, seed=0, widths=(3,))
    arrays = [p.data for p in model.parameters()]
    for opt in (SGD(model.parameters(), lr=0.1, momentum=0.9), Adam(model.parameters())):
        for _ in range(2):
            model.zero_grad()
            kp.cross_entropy(model(kp.tensor(np.ones((2, 4), np.float32))), [0, 1]).backward()
            opt.step()
    assert all(p.data is a for p, a in zip(model.parameters(), arrays))


def test_low_precision_parameters_stay_in_their_format():
    model = nn.build_model("mlp", (4,), 2, seed=0, widths=(3,), dtype="bf16")
    opt = Adam(model.parameters(), lr=0.1)
    kp.cross_entropy(model(kp.tensor(np.ones((2, 4)), dtype="bf16")), [0, 1]).backward()
    before = model.parameters()[0].data.astype(np.float32).copy()
    opt.step()
    p = model.parameters()[0]
    assert p.dtype == kp.bfloat16 and p.grad.dtype == kp.bfloat16
    assert not np.array_equal(before, p.data.astype(np.float32))


def test_schedules_match_torch_formulas():
    torch = pytest.importorskip("torch")
    w = torch.zeros(1, requires_grad=True)
    for ours_cls, theirs_cls, kw in [(StepLR, torch.optim.lr_scheduler.StepLR,
                                      {"step_size": 3, "gamma": 0.5}),
                                     (CosineAnnealingLR, torch.optim.lr_scheduler.CosineAnnealingLR,
                                      {"T_max": 7, "eta_min": 0.01})]:
        opt = SGD([kp.tensor(np.zeros(1), requires_grad=True)], lr=0.3)
        topt = torch.optim.SGD([w], lr=0.3)
        ours, theirs = ours_cls(opt, **kw), theirs_cls(topt, **kw)
        for _ in range(9):
            topt.step()
            ours.step()
            theirs.step()
            assert opt.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12)


def test_bad_optimizer_arguments():
    p = [kp.tensor(np.zeros(2), requires_grad=True)]
    with pytest.raises(ValueError, match="lr"):
        SGD(p, lr=float("nan"))
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(p, lr=0.1, nesterov=True)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid: mlp, lenet, convnet"):
        nn.build_model("resnet", (1, 28, 28), 10)


@pytest.mark.parametrize("name", ["mlp", "lenet", "convnet"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 40)])
def test_models_accept_images_and_signals(name, shape):
    model = nn.build_model(name, shape, 10, seed=0)
    out = model(kp.tensor(np.zeros((3, *shape), np.float32)))
    assert out.shape == (3, 10)
