"""Taylor-remainder audit: slopes on smooth and piecewise-linear models, an exact crossing
counter on constructed kinks, precisions, and the ``kinkprop audit`` command."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import kinkprop as kp
from kinkprop.cli import main
from kinkprop.data import Dataset
from kinkprop.diagnostics.taylor import audit_loss, random_directions, taylor_audit
from kinkprop.primitives.core import site
from kinkprop.study import audit as audit_mod


def _smooth_mlp(seed=0):
    rng = np.random.default_rng(seed)
    return kp.nn.Sequential(kp.nn.Linear(6, 8, rng=rng, dtype="float64"), kp.nn.Tanh(),
                            kp.nn.Linear(8, 3, rng=rng, dtype="float64"))


def _batch(n=5, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


def _by(result, direction, precision=None):
    return [r for r in result.rows if r["direction"] == direction
            and (precision is None or r["precision"] == precision)]


# -- slopes ------------------------------------------------------------------------------------


def test_smooth_model_has_slope_two_in_float64():
    x, y = _batch()
    result = taylor_audit(_smooth_mlp(), x, y, precision="fp64", n_random=3,
                          hs=np.logspace(-6, -1, 11))
    assert [s["kind"] for s in result.slopes] == ["random"] * 3 + ["gradient"]
    for s in result.slopes:
        assert s["n_smooth"] >= 5 and 1.8 <= s["slope_smooth"] <= 2.2, s
        assert s["slope_crossing"] is None and s["max_crossings"] == 0
    assert all(r["crossings"] == 0 for r in result.rows)


def _relu_net_near_kink(t_cross):
    """One-hidden-layer ReLU MLP on one sample, every pre-activation far from its kink except unit
    0, which direction ``d`` carries across 0 at h = ``t_cross``."""
    model = kp.nn.build_model("mlp", (4,), 3, seed=0, dtype="float64", widths=(6,))
    x = np.array([[0.5, -1.0, 0.8, 0.3]])
    y = np.array([1])
    lin = model[1]
    (d,) = random_directions(sum(p.size for p in model.parameters()), 1, seed=1)
    dw, db = d[:24].reshape(6, 4), d[24:30]
    rate = dw @ x[0] + db  # dz/dh of each hidden pre-activation along d
    target = np.where(np.arange(6) % 2, 0.5, -0.5)
    target[0] = -np.sign(rate[0]) * abs(rate[0]) * t_cross
    lin.bias.data = target - lin.weight.data @ x[0]
    return model, x, y, d


def test_relu_mlp_crossing_a_kink_has_slope_one():
    t_cross = 1.5e-5
    model, x, y, d = _relu_net_near_kink(t_cross)
    hs = np.logspace(-7, -2, 11)
    result = taylor_audit(model, x, y, directions=[d], hs=hs)
    rows = _by(result, 0)
    assert [r["crossings"] for r in rows] == [int(h > t_cross) for h in hs]
    assert all(r["crossed"] == "2:relu=1" for r in rows if r["h"] > t_cross)
    (s, _) = result.slopes
    assert s["kind"] == "given" and s["first_crossing_h"] == pytest.approx(hs[5])
    assert s["n_crossing"] == 6 and 0.8 <= s["slope_crossing"] <= 1.2, s
    # just before the crossing the remainder is far smaller than just after it
    before, after = rows[4]["remainder"], rows[6]["remainder"]
    assert after > 100 * before


def test_piecewise_linear_without_crossing_is_at_rounding_level():
    rng = np.random.default_rng(3)
    layer = kp.nn.Linear(3, 5, rng=rng, dtype="float64")
    x, readout = rng.standard_normal((4, 3)), rng.standard_normal((5, 2))

    def f():  # linear in (W, b) on each piece: no second-order term at all
        return (kp.relu(layer(kp.tensor(x))) @ readout).sum()

    result = audit_loss(f, layer.parameters(), n_random=3, hs=np.logspace(-9, -5, 5))
    assert all(r["crossings"] == 0 for r in result.rows)
    eps = np.finfo(np.float64).eps
    for r in result.rows:
        assert r["at_floor"] and r["remainder"] <= 100 * eps * abs(r["f0"]), r
    assert all(s["slope_smooth"] is None for s in result.slopes)


def test_exact_kink_hit_policy_decides_the_slope():
    # unit 0 sits exactly on its kink (0.25 * 1 + 0 * ... - 0.25 == 0) and d moves it up: the
    # segment lies on the right piece, so ReLU'(0) = 1 gives the one-sided derivative (slope 2)
    # and ReLU'(0) = 0 misses it by a first-order term (slope 1)
    model = kp.nn.build_model("mlp", (4,), 3, seed=0, dtype="float64", widths=(3,))
    x, y = np.array([[1.0, 0.0, 0.0, 0.0]]), np.array([2])
    model[1].weight.data[0, 0], model[1].bias.data[0] = 0.25, -0.25
    model[1].bias.data[1:] = [2.0, -2.0]
    model[1].weight.data[1:, 0] = 0.0
    d = np.zeros(sum(p.size for p in model.parameters()))
    d[0], d[15:] = 1.0, 0.1  # raise W[0, 0] (so z0) and move the readout
    hs = np.logspace(-6, -2, 5)
    slopes = {}
    for value in (0.0, 1.0):
        result = taylor_audit(model, x, y, directions=[d], hs=hs,
                              kink_policy=f"pytorch,relu={value}")
        # 0 -> + counts as a change, and as one that started on the kink
        assert all(r["crossings"] == r["from_kink"] == 1 for r in _by(result, 0))
        slopes[value] = result.slopes[0]["slope_crossing"]
    assert 0.9 <= slopes[0.0] <= 1.1 and 1.8 <= slopes[1.0] <= 2.2, slopes


# -- the crossing counter ------------------------------------------------------------------------


def test_crossing_counter_is_exact_on_constructed_kinks():
    w = kp.tensor(np.array([-1e-3, -1e-2, 5e-2, -2e-1]), requires_grad=True)

    def f():
        with site("a"):
            out = kp.relu(w).sum()  # flips at h = 2e-3, 2e-2, 0.1, 0.4
        with site("b"):
            out = out + kp.abs(w + 0.02).sum()  # flips at h = 0.14 (w2), 0.36 (w3)
        with site("c"):
            out = out + kp.max(w)  # the winner w2 is overtaken at h = 0.051
        return out

    d = np.array([1.0, 1.0, -1.0, 1.0])  # normalised to 1/2 each
    hs = [1e-3, 3e-3, 3e-2, 5.5e-2, 0.2, 0.5]
    result = audit_loss(f, [w], directions=[d], hs=hs, gradient=False)
    rows = result.rows
    assert [r["crossings"] for r in rows] == [0, 1, 2, 3, 5, 7]
    assert [r["sites_crossed"] for r in rows] == [0, 1, 1, 2, 3, 3]
    assert all(r["from_kink"] == 0 for r in rows)
    assert rows[4]["crossed"] == "a:relu=3;b:abs=1;c:max=1"
    assert rows[5]["crossed"] == "a:relu=4;b:abs=2;c:max=1"
    np.testing.assert_allclose([r["step"] for r in rows], hs)
    assert np.array_equal(w.data, [-1e-3, -1e-2, 5e-2, -2e-1]) and w.grad is None


def test_crossing_counter_ties_pooling_and_two_sided_kinks():
    p0 = np.array([[[[0.1, 0.3, 0.5, 0.4], [0.2, 0.0, 0.45, 0.1]]]])
    p = kp.tensor(p0, requires_grad=True)

    def f():
        out = kp.max_pool2d(p, 2).sum()  # window 0: 0.1 overtakes 0.3 at h = 0.2
        out = out + kp.maximum(p, 0.25).sum()  # 0.1 passes 0.25 at h = 0.15
        return out + kp.clamp(p, 0.0, 0.35).sum()  # passes 0.35 at h = 0.25 (the 0.0 stays)

    d = np.zeros(8)
    d[0] = 1.0
    result = audit_loss(f, [p], directions=[d], hs=[0.1, 0.18, 0.22, 0.3], gradient=False)
    assert [r["crossed"] for r in result.rows] == [
        "", "maximum#0=1", "max_pool2d#0=1;maximum#0=1",
        "max_pool2d#0=1;maximum#0=1;clamp#0=1"]
    # the 0.0 sits on clamp's lower bound but does not move: not a crossing
    assert all(r["from_kink"] == 0 for r in result.rows)


def test_ties_broken_by_the_step_count_as_from_kink():
    p = kp.tensor(np.array([[[[0.2, 0.2], [0.1, 0.0]]]]), requires_grad=True)
    d = np.array([0.0, 1.0, 0.0, 0.0])  # the second of the tied maxima wins for any h > 0
    result = audit_loss(lambda: kp.max_pool2d(p, 2).sum(), [p], directions=[d],
                        hs=[1e-6, 1e-3], gradient=False)
    assert [(r["crossings"], r["from_kink"]) for r in result.rows] == [(1, 1), (1, 1)]


# -- models, precisions, side effects ------------------------------------------------------------


def test_batch_norm_convnet_is_audited_in_eval_mode_and_left_untouched():
    model = kp.nn.build_model("convnet", (1, 6, 6), 3, seed=2, dtype="float32", channels=(2,),
                              hidden=5, batch_norm=True)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 1, 6, 6)).astype(np.float32), np.array([0, 1, 2])
    hs = np.logspace(-5, 0, 6)
    a = taylor_audit(model, x, y, n_random=1, hs=hs)
    b = taylor_audit(model, x, y, n_random=1, hs=hs)
    assert a.rows == b.rows  # eval mode: f is a fixed function of θ
    assert model.training and all(np.array_equal(before[k], v)
                                  for k, v in model.state_dict().items())
    assert model.parameters()[0].dtype == np.float32
    crossed = ";".join(r["crossed"] for r in a.rows)
    assert "max_pool2d=" in crossed and "relu=" in crossed
    assert a.meta["mode"] == "eval" and len(a.rows) == 2 * len(hs)


def test_precisions_set_the_rounding_floor():
    x, y = _batch()
    result = taylor_audit(_smooth_mlp(), x, y, precision=["fp64", "fp32", "bf16", "fp8-e4m3"],
                          n_random=1, hs=np.logspace(-8, -1, 8))
    assert result.precisions == ["fp64", "fp32", "bf16", "fp8-e4m3"]
    for prec, eps in [("fp64", 2.0**-52), ("fp32", 2.0**-23), ("bf16", 2.0**-7),
                      ("fp8-e4m3", 2.0**-3)]:
        rows = _by(result, 0, prec)
        assert rows[0]["floor"] == pytest.approx(100 * eps * abs(rows[0]["f0"]))
        assert all(r["at_floor"] == (r["remainder"] < r["floor"] or r["remainder"] == 0)
                   for r in rows)
    # bf16 cannot represent θ + 1e-8 d: the step taken is 0 and so is the remainder
    tiny = _by(result, 0, "bf16")[0]
    assert tiny["step"] == 0 and tiny["remainder"] == 0 and tiny["at_floor"]
    assert 1.8 <= result.slopes[0]["slope_smooth"] <= 2.2
    summary = {s["precision"]: s for s in result.summary()}
    assert summary["fp64"]["fitted_smooth"] == 2
    table = result.table(detail=True)
    assert "fp8-e4m3" in table and "rounding floor" in table and "~" in table


def test_plot_writes_a_png(tmp_path):
    x, y = _batch()
    result = taylor_audit(_smooth_mlp(), x, y, precision="fp64,fp32", n_random=1,
                          hs=np.logspace(-6, -1, 4))
    result.plot(tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_dead_network_skips_the_gradient_direction():
    w = kp.tensor(np.array([-1.0, -2.0, -3.0]), requires_grad=True)
    result = audit_loss(lambda: kp.relu(w).sum() + 1.0, [w], n_random=1, hs=[1e-3, 1e-2])
    assert [s["kind"] for s in result.slopes] == ["random"]
    assert "gradient norm 0.0" in result.meta["skipped"]


@pytest.mark.parametrize("kwargs,expected", [
    ({"precision": "fp64,fp4"}, "valid: fp64, fp32"),
    ({"hs": [1e-3, 0.0]}, "positive"),
    ({"directions": [np.ones(3)]}, "entries"),
    ({"directions": [np.zeros(83)]}, "norm"),
])
def test_api_bad_input(kwargs, expected):
    x, y = _batch()
    with pytest.raises(ValueError, match=expected):
        taylor_audit(_smooth_mlp(), x, y, **kwargs)


# -- the command ---------------------------------------------------------------------------------


def _blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.standard_normal((3, 1, 4, 4))[y] * 2 + rng.standard_normal((n, 1, 4, 4)))
    x = x.astype(np.float32)
    return Dataset("blobs", x[:48], y[:48], x[48:], y[48:], ["a", "b", "c"], (1, 4, 4))


@pytest.fixture
def blobs(monkeypatch):
    def load(name, data_dir=None):
        if name != "blobs":
            return real(name, data_dir)
        return _blobs()

    real = audit_mod.load_dataset
    monkeypatch.setattr(audit_mod, "load_dataset", load)


def _run(*args):
    return CliRunner().invoke(main, ["audit", *args], catch_exceptions=False)


def test_cli_writes_table_json_csv_and_plot(tmp_path, blobs):
    out = tmp_path / "audit"
    result = _run("--dataset", "blobs", "--widths", "8", "--batch-size", "16", "--precisions",
                  "fp64,fp32", "--directions", "2", "--h-num", "6", "--out", str(out), "--detail")
    assert result.exit_code == 0, result.output
    assert "slope no-cross" in result.output and "fp64: median slope" in result.output
    data = json.loads((out / "audit.json").read_text())
    assert data["meta"]["source"] == "initialisation" and data["meta"]["batch"] == 16
    assert len(data["rows"]) == 2 * 3 * 6 and len(data["slopes"]) == 2 * 3
    assert (out / "audit.csv").read_text().splitlines()[0].startswith("precision,direction,kind,h")
    assert (out / "audit.png").stat().st_size > 0


def test_cli_audits_a_checkpoint(tmp_path, blobs):
    from kinkprop.train import TrainConfig, Trainer

    config = TrainConfig(dataset="blobs", model="mlp", widths=(8,), epochs=1, batch_size=16,
                         lr=0.1, kink_policy="pytorch,relu=1")
    Trainer(config, out=tmp_path / "run", dataset=_blobs(), log=lambda m: None).run()
    out = tmp_path / "audit"
    result = _run("--checkpoint", str(tmp_path / "run" / "checkpoint.npz"), "--precisions",
                  "fp64", "--directions", "1", "--h-num", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "audit.json").read_text())["meta"]
    assert meta["source"].startswith("checkpoint") and meta["trained_precision"] == "fp32"
    assert meta["kink_policy"] == "pytorch+relu=1.0"


def test_cli_digits_smoke(tmp_path):
    pytest.importorskip("sklearn")
    result = _run("--dataset", "digits", "--widths", "16", "--batch-size", "16", "--precisions",
                  "fp64", "--directions", "1", "--h-num", "5", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "audit.png").exists()


@pytest.mark.parametrize("args,expected", [
    (["--model", "vgg"], "valid: mlp, lenet, convnet"),
    (["--dataset", "cifar"], "fashion-mnist, mnist1d"),
    (["--dataset", "blobs", "--precisions", "fp64,fp4"], "valid: fp64, fp32"),
    (["--dataset", "blobs", "--h-min", "1e-1", "--h-max", "1e-3"], "--h-min"),
    (["--dataset", "blobs", "--kink-policy", "relu=nan"], "finite"),
    (["--checkpoint", "/nonexistent/ck.npz"], "no such checkpoint"),
    (["--checkpoint", "x.npz", "--model", "mlp"], "--model come(s) from the checkpoint"),
])
def test_cli_bad_input_is_a_clear_error(args, expected, blobs, tmp_path):
    result = _run(*args, "--out", str(tmp_path))
    assert result.exit_code != 0
    assert expected in result.output, result.output
    assert "Traceback" not in result.output
