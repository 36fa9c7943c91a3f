"""The command line: each command runs, and bad input gets a clear error."""

import json

import pytest
from click.testing import CliRunner

from kinkprop.cli import main


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_conventions_prints_the_registry_table():
    out = _run("conventions").output
    assert "max_pool2d" in out and "tensorflow" in out and "PyTorch 2.13.0" in out


def test_demo_runs_and_reports_kink_facts():
    result = _run("demo", "--steps", "20")
    assert result.exit_code == 0
    assert "exactly zero" in result.output and "ReLU'(0)=1" in result.output


def test_train_digits_then_evaluate(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    result = _run("train", "--dataset", "digits", "--epochs", "6", "--batch-size", "32",
                  "--lr", "0.05", "--momentum", "0.9", "--out", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["final_test_acc"] > 0.8
    again = _run("train", "--dataset", "digits", "--epochs", "6", "--out", str(out))
    assert again.exit_code != 0 and "--resume" in again.output
    ev = _run("evaluate", str(out / "checkpoint.npz"))
    assert ev.exit_code == 0 and json.loads(ev.output)["test_acc"] == summary["final_test_acc"]


@pytest.mark.parametrize("args,expected", [
    (["--dataset", "cifar"], "fashion-mnist, mnist1d"),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "dataset-fashion-mnist"),
    (["--model", "vgg"], "valid: mlp, lenet, convnet"),
    (["--precision", "fp4"], "valid: fp64, fp32"),
    (["--kink-policy", "relu=nan"], "finite"),
    (["--kink-policy", "relu=1,bogus=2"], "unknown non-smooth primitive"),
])
def test_train_bad_input_is_a_clear_error(args, expected):
    result = _run("train", *args)
    assert result.exit_code != 0
    assert expected in result.output
    assert "Traceback" not in result.output


def test_evaluate_missing_checkpoint(tmp_path):
    result = _run("evaluate", str(tmp_path / "none.npz"))
    assert result.exit_code != 0 and "no such checkpoint" in result.output
