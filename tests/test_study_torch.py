"""``kinkprop study --engine torch``: the volume and training protocols on PyTorch models, into the
same results database and report; NumPy run ids unchanged; the CLI's checks."""

import json
import sqlite3
import sys

import numpy as np
import pytest

from kinkprop.study.runner import StudySpec, execute, run_study

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from kinkprop.study import torch_runs  # noqa: E402  (imports torch)
from kinkprop.study.report import write_report  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _spec(**kw):
    base = dict(name="t", dataset="digits", models=[["mlp", {"widths": [16]}]],
                precisions=["fp32"], policies=["relu=0", "relu=1"], seeds=[0], epochs=1,
                batch_size=128, volume_seeds=1, volume_max_batches=2,
                protocols=["volume", "training", "audit"], engine="torch")
    base.update(kw)
    return StudySpec(**base)


def _config(**kw):
    base = {"study": "t", "dataset": "digits", "data_dir": None, "batch_size": 128,
            "engine": "torch", "device": "cpu", "model": "mlp", "model_opts": {"widths": [16]},
            "batch_norm": False, "protocol": "training", "precision": "fp32",
            "policy": "relu=1", "seed": 0, "epochs": 1, "optimizer": "sgd", "lr": 0.05,
            "momentum": 0.9}
    base.update(kw)
    return base


def _digits():
    from kinkprop.data import load_dataset

    return load_dataset("digits")


def _dead_unit_mlp(batch_norm=False):
    """An MLP on digits whose first hidden unit gets exactly 0 on every sample: a kink hit per
    sample at ``2:relu``, where ReLU'(0) decides whether that unit's weights get a gradient."""
    torch.manual_seed(0)
    model = torch_runs.build_model("mlp", (1, 8, 8), 10, batch_norm, {"widths": [8]})
    with torch.no_grad():
        model[1].weight[0].zero_()
        if model[1].bias is not None:
            model[1].bias[0].zero_()
    return model


def test_numpy_run_ids_are_unchanged():
    # computed from StudySpec().runs() before the engine field existed
    runs = StudySpec().runs()
    assert runs[0]["run_id"] == "2d48c477f256757c"  # volume, fp32, relu=0.5, seed 0
    assert [r for r in runs if r["protocol"] == "training"][0]["run_id"] == "181d301e30023d60"
    assert not any("engine" in r or "device" in r for r in runs)
    assert [r["run_id"] for r in StudySpec(engine="numpy").runs()] == [r["run_id"] for r in runs]


def test_torch_runs_carry_engine_and_device_and_skip_the_audit():
    runs = _spec().runs()
    assert {r["protocol"] for r in runs} == {"volume", "training"}
    assert all(r["engine"] == "torch" and r["device"] == "cpu" for r in runs)
    numpy_ids = {r["run_id"] for r in _spec(engine="numpy").runs()}
    assert not numpy_ids & {r["run_id"] for r in runs}
    out = execute({**runs[0], "protocol": "audit"})
    assert out["status"] == "failed" and "NumPy-only" in out["error"]


def test_torch_study_writes_the_database_and_the_report(tmp_path):
    db = tmp_path / "results.db"
    logged = []
    out = run_study(_spec(), db, workers=1, progress=False, log=logged.append)
    assert out["failed"] == 0 and out["ran"] == out["runs"] == 1 + 2  # volume + 2 training
    assert any("audit protocol is NumPy-only" in m for m in logged)
    con = sqlite3.connect(db)
    configs = [json.loads(c) for (c,) in con.execute("SELECT config FROM runs")]
    assert all(c["engine"] == "torch" for c in configs)
    rows = con.execute("SELECT epoch, kink_hits, effective, changed_steps, steps, test_acc "
                       "FROM epochs ORDER BY changed_steps").fetchall()
    assert len(rows) == 2
    assert rows[0][3] is None and rows[1][3] == 0  # the baseline run has no comparison
    assert all(r[0] == 1 and r[4] == 12 and r[2] is None and 0 <= r[5] <= 1 for r in rows)
    assert con.execute("SELECT DISTINCT site FROM sites").fetchall() == [("2:relu",)]
    (result,) = con.execute("SELECT result FROM runs WHERE protocol = 'volume'").fetchone()
    volume = json.loads(result)
    assert volume["batches"] == 2 and volume["relu_calls"] == 2 * 128 * 16
    assert run_study(_spec(), db, workers=1, progress=False, log=lambda m: None)["ran"] == 0
    report = write_report(db)
    md = open(report["paths"]["markdown"]).read()
    assert "| mlp-16 [torch] | sgd lr=0.05 | fp32 | relu=1 | 1 |" in md
    assert "| mlp-16 [torch] | fp32 | relu=0 vs relu=1 | 0/1 |" in md


def test_volume_detects_a_constructed_kink():
    data = _digits()
    cfg = _config(protocol="volume", max_batches=3)
    for policy in ("relu=1", "relu=0.5", "directional"):
        result, _, _ = torch_runs.volume({**cfg, "policy": policy}, data, _dead_unit_mlp())
        assert result["in_s"] and result["first_batch"] == 0, policy
        assert result["relu_zeros"] >= 3 * 128 and result["second_backwards"] == 3
        assert result["per_layer_hits"]["2:relu"] == result["relu_zeros"]
    untouched, _, _ = torch_runs.volume(cfg, data)
    assert not untouched["in_s"] and untouched["relu_zeros"] == 0


def test_volume_detects_a_difference_in_bf16():
    # measured: in bfloat16, batch-norm outputs land exactly on 0 (fp32: never, same init)
    cfg = _config(protocol="volume", max_batches=4, batch_norm=True)
    bf16, _, _ = torch_runs.volume({**cfg, "precision": "bf16"})
    fp32, _, _ = torch_runs.volume(cfg)
    assert bf16["in_s"] and bf16["relu_zeros"] > 0
    assert not fp32["in_s"] and fp32["relu_zeros"] == 0


def test_training_counts_changed_steps_and_keeps_batch_norm_statistics():
    data = _digits()
    model = _dead_unit_mlp(batch_norm=True)
    result, epochs, sites = torch_runs.training(_config(epochs=2), data, model)
    assert result["diverged"] is None and result["epochs_done"] == 2
    assert result["steps"] == 24 and 1 <= result["changed_steps"] <= 24
    assert epochs[0]["kink_hits"] >= 128 and epochs[0]["changed_steps"] >= 1
    assert {s["site"] for s in sites} == {"3:relu"}
    # the second forward on hit steps does not update the running statistics
    assert model[2].num_batches_tracked.item() == 24
    base, _, _ = torch_runs.training(_config(epochs=2, policy="relu=0"), data,
                                     _dead_unit_mlp(batch_norm=True))
    assert base["changed_steps"] == 0 and base["steps"] == 24


def test_training_is_seeded_and_follows_the_numpy_loaders_order():
    from kinkprop.data import DataLoader

    data = _digits()
    a, ea, _ = torch_runs.training(_config(policy="relu=0"), data)
    b, eb, _ = torch_runs.training(_config(policy="relu=1"), data)  # no kink hit: same run
    assert a["final_test_acc"] == b["final_test_acc"] and ea[0]["train_loss"] == eb[0]["train_loss"]
    setup = torch_runs._Setup(_config(), data)
    loader = DataLoader(data.x_train, data.y_train, 128, shuffle=True, seed=0)
    for (xt, yt), (xn, yn) in zip(setup.batches(), loader):
        assert np.array_equal(xt.numpy(), xn) and np.array_equal(yt.numpy(), yn)


def test_divergence_and_unsupported_settings_are_reported():
    result, epochs, _ = torch_runs.training(_config(lr=1e20))
    assert "non-finite loss" in result["diverged"] and epochs == []
    with pytest.raises(ValueError, match="float8"):
        torch_runs.training(_config(precision="fp8-e4m3"))
    with pytest.raises(ValueError, match="NumPy-only"):
        torch_runs.check_policy("relu=replace:1")


def test_cli_checks_engine_device_and_torch(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from kinkprop.cli import main

    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, ["study", "--db", str(tmp_path / "r.db"), *args])

    res = run("--engine", "jax")
    assert res.exit_code != 0 and "unknown engine 'jax'; valid: numpy, torch" in res.output
    res = run("--engine", "torch", "--precisions", "fp32,fp8-e5m2")
    assert res.exit_code != 0 and "not supported by the torch engine" in res.output
    res = run("--device", "cuda")
    assert res.exit_code != 0 and "numpy engine runs on the CPU" in res.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = run("--engine", "torch", "--device", "cuda")
    assert res.exit_code != 0 and "CUDA is not available" in res.output
    monkeypatch.setitem(sys.modules, "torch", None)
    res = run("--engine", "torch")
    assert res.exit_code != 0 and "pip install 'kinkprop[torch]'" in res.output
    assert not (tmp_path / "r.db").exists()
