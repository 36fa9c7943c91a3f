"""Study grid, results store, resume after a killed worker, report and statistics."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from kinkprop.study.report import sign_flip_p, write_report
from kinkprop.study.runner import StudySpec, run_study

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _spec(**kw):
    base = dict(name="t", dataset="digits", models=[["mlp", {"widths": [16]}]],
                precisions=["fp32", "fp16"], policies=["relu=0", "relu=1"], seeds=[0, 1],
                epochs=1, batch_size=128, volume_seeds=2, volume_max_batches=4,
                protocols=["volume", "training"])
    base.update(kw)
    return StudySpec(**base)


def test_grid_expands_and_ids_are_stable():
    spec = _spec(batch_norm=[False, True])
    runs = spec.runs()
    volume = [r for r in runs if r["protocol"] == "volume"]
    training = [r for r in runs if r["protocol"] == "training"]
    assert len(volume) == 2 * 2 * 1 * 2  # bn x precisions x non-baseline policies x seeds
    assert len(training) == 2 * 2 * 2 * 2  # bn x precisions x policies x seeds
    assert len({r["run_id"] for r in runs}) == len(runs)
    assert [r["run_id"] for r in spec.runs()] == [r["run_id"] for r in runs]


def test_study_runs_stores_resumes_and_reports(tmp_path):
    db = tmp_path / "results.db"
    out = run_study(_spec(), db, workers=1, progress=False, log=lambda m: None)
    assert out["failed"] == 0 and out["ran"] == out["runs"] == 4 + 8
    again = run_study(_spec(), db, workers=1, progress=False, log=lambda m: None)
    assert again["ran"] == 0  # everything finished is skipped
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 8
    assert con.execute("SELECT COUNT(DISTINCT site) FROM sites").fetchone()[0] == 1
    report = write_report(db)
    md = open(report["paths"]["markdown"]).read()
    assert "Bifurcation volume" in md and "| mlp-16 | sgd lr=0.05 | fp16 | relu=1 | 2 |" in md
    assert "too few seeds to tell" in md
    assert os.path.exists(report["paths"]["html"])
    assert any(p.endswith("share_in_s.png") for p in report["paths"].values())
    assert "data:image/png;base64" in open(report["paths"]["html"]).read()


def test_sign_flip_test_is_exact():
    assert sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)
    assert sign_flip_p([1.0] * 6) == pytest.approx(2 / 64)
    assert sign_flip_p([0.5, -0.5, 0.5, -0.5]) == 1.0


def test_report_of_a_missing_database(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `kinkprop study` first"):
        write_report(tmp_path / "none.db")


def test_killed_worker_loses_nothing_finished(tmp_path):
    spec_file = tmp_path / "spec.json"
    spec = _spec(epochs=2, seeds=[0, 1, 2], precisions=["fp32", "bf16"], volume_seeds=3)
    fields = {k: v for k, v in spec.__dict__.items()}
    spec_file.write_text(json.dumps(fields))
    db = tmp_path / "results.db"
    cmd = [sys.executable, "-m", "kinkprop.cli", "study", "--spec", str(spec_file), "--db",
           str(db), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        finished = 0
        while time.time() < deadline and finished < 3:
            time.sleep(0.2)
            if db.exists():
                try:
                    finished = sqlite3.connect(db).execute(
                        "SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0]
                except sqlite3.OperationalError:
                    pass
        assert finished >= 3, "the study did not get going"
        children = _children(proc.pid)
        assert children, "no worker processes found"
        os.kill(children[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    con = sqlite3.connect(db)
    before = dict(con.execute("SELECT run_id, finished FROM runs WHERE status='done'"))
    total = len(spec.runs())
    if proc.returncode != 0:
        assert "run the same command again to resume" in err
        assert len(before) < total
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    after = dict(con.execute("SELECT run_id, finished FROM runs WHERE status='done'"))
    assert len(after) == total
    assert all(after[k] == v for k, v in before.items())  # finished runs were not redone
    n_rows = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert n_rows == total  # nothing duplicated


def _children(pid):
    """Worker processes of ``pid`` (spawned: their command line runs spawn_main)."""
    workers = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            workers.append(int(entry))
    return sorted(workers)


def test_bifurcation_volume_draws_directions_from_its_seed():
    """The volume protocol under the directional policy draws its directions from a generator of
    the initialisation's seed: a study worker that ran other runs before gets the same result."""
    import numpy as np

    from kinkprop.data import Dataset
    from kinkprop.kinks import directional
    from kinkprop.study.census import bifurcation_volume

    rng = np.random.default_rng(0)  # clipped 8x8 blobs: max-pool windows tie at every batch
    y = rng.integers(0, 3, 96)
    x = np.maximum(rng.standard_normal((3, 1, 8, 8))[y] * 2 + rng.standard_normal((96, 1, 8, 8)),
                   0).astype(np.float32)
    data = Dataset("blobs", x[:64], y[:64], x[64:], y[64:], ["a", "b", "c"], (1, 8, 8))

    def run():
        states = []
        v = bifurcation_volume(data, "convnet", "fp32", inits=2, batch_size=16,
                               policy_b="directional", seed=3,
                               progress=lambda r, b: states.append(
                                   str(directional.current_options().generator().bit_generator.state)))
        return v, states

    first, first_states = run()
    directional.current_options().generator().standard_normal(1000)  # another run's draws
    second, second_states = run()
    assert second_states == first_states and len(set(first_states)) > 2
    assert second.row() == first.row()
