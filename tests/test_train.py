"""Training loop: metrics, checkpoints, resume, clean stops and clear errors."""

import json
import os
import signal

import numpy as np
import pytest

from kinkprop.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kinkprop.data import Dataset
from kinkprop.train import TrainConfig, Trainer, TrainingError, evaluate_checkpoint


def _blobs(n=240, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = rng.standard_normal((3, 1, 4, 4)) * 2
    x = (centres[y] + rng.standard_normal((n, 1, 4, 4))).astype(np.float32)
    return Dataset("blobs", x[:200], y[:200], x[200:], y[200:], ["a", "b", "c"], (1, 4, 4))


def _config(**kw):
    base = dict(dataset="blobs", model="mlp", widths=(16,), epochs=3, batch_size=32, lr=0.1,
                momentum=0.9, schedule="cosine")
    base.update(kw)
    return TrainConfig(**base)


def test_training_learns_and_writes_its_run(tmp_path):
    summary = Trainer(_config(), out=tmp_path / "run", dataset=_blobs(), log=lambda m: None).run()
    assert summary["final_test_acc"] > 0.9
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert set(json.loads(lines[0])) >= {"train_loss", "train_acc", "test_loss", "test_acc",
                                         "seconds"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 3
    meta, groups = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert meta["epoch"] == 3 and "1.weight" in groups["model"]
    with np.load(tmp_path / "run" / "checkpoint.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, optimizer):
    data = _blobs()
    full = Trainer(_config(optimizer=optimizer), out=tmp_path / "a", dataset=data,
                   log=lambda m: None)
    full_summary = full.run()

    stopped = Trainer(_config(optimizer=optimizer), out=tmp_path / "b", dataset=data,
                      log=lambda m: None)
    calls = []

    def stop_midway(trainer, loss):
        calls.append(1)
        if len(calls) == 9:  # epoch 2, step 2 of 7
            os.kill(os.getpid(), signal.SIGTERM)

    stopped.callbacks.append(stop_midway)
    with pytest.raises(KeyboardInterrupt, match="continue with --resume"):
        stopped.run()
    meta, _ = load_checkpoint(tmp_path / "b" / "checkpoint.npz")
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 2)

    resumed = Trainer(_config(optimizer=optimizer), out=tmp_path / "b", resume=True,
                      dataset=data, log=lambda m: None)
    summary = resumed.run()
    assert resumed.losses == full.losses
    for key in ("final_test_acc", "final_test_loss"):
        assert summary[key] == full_summary[key]
    a = full.model.state_dict()
    assert all(np.array_equal(a[k], v) for k, v in resumed.model.state_dict().items())


def test_directional_runs_draw_their_own_seeded_directions(tmp_path):
    """A run under the directional policy draws its directions from a generator seeded by its
    seed and kept in its checkpoint: the same directions whatever ran before it in the process
    (study workers run many), and a resumed run continues the sequence."""
    from kinkprop.kinks import directional

    rng = np.random.default_rng(0)  # 8x8 blobs clipped at 0: max-pool windows tie every step
    y = rng.integers(0, 3, 240)
    x = np.maximum(rng.standard_normal((3, 1, 8, 8))[y] * 2 + rng.standard_normal((240, 1, 8, 8)),
                   0).astype(np.float32)
    data = Dataset("blobs", x[:200], y[:200], x[200:], y[200:], ["a", "b", "c"], (1, 8, 8))
    cfg = dict(kink_policy="directional", model="convnet", epochs=2)

    def states(trainer):
        seen = []
        trainer.callbacks.append(lambda t, loss: seen.append(
            str(directional.current_options().generator().bit_generator.state)))
        return seen

    first = Trainer(_config(**cfg), dataset=data, log=lambda m: None)
    first_states = states(first)
    first.run()
    directional.current_options().generator().standard_normal(1000)  # another run's draws
    second = Trainer(_config(**cfg), dataset=data, log=lambda m: None)
    second_states = states(second)
    second.run()
    assert second_states == first_states and second.losses == first.losses
    assert len(set(first_states)) > 1  # directions were drawn: kinks were hit

    stopped = Trainer(_config(**cfg), out=tmp_path / "r", dataset=data, log=lambda m: None)
    stopped.callbacks.append(lambda t, loss: len(t.losses) == 9 and os.kill(os.getpid(),
                                                                          signal.SIGTERM))
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    resumed = Trainer(_config(**cfg), out=tmp_path / "r", resume=True, dataset=data,
                      log=lambda m: None)
    resumed_states = states(resumed)
    resumed.run()
    assert resumed_states == first_states[-len(resumed_states):]
    assert resumed.losses == first.losses


def test_existing_run_is_not_overwritten(tmp_path):
    Trainer(_config(epochs=1), out=tmp_path, dataset=_blobs(), log=lambda m: None).run()
    with pytest.raises(FileExistsError, match="--resume .* --force"):
        Trainer(_config(epochs=1), out=tmp_path, dataset=_blobs(), log=lambda m: None)
    with pytest.raises(ValueError, match="different config"):
        Trainer(_config(epochs=1, lr=0.5), out=tmp_path, resume=True, dataset=_blobs())
    Trainer(_config(epochs=1), out=tmp_path, force=True, dataset=_blobs(), log=lambda m: None)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(_config(epochs=3, lr=1e6, momentum=0.0, schedule="none"), out=tmp_path,
                      dataset=_blobs(), log=lambda m: None)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at epoch \d+, step \d+"):
        trainer.run()


def test_non_finite_loss_message_names_the_checkpoint(tmp_path):
    trainer = Trainer(_config(epochs=3), out=tmp_path, dataset=_blobs(), log=lambda m: None)
    blown = []

    def blow_up(t, loss):
        if t.epoch == 1 and not blown:
            blown.append(1)
            for p in t.model.parameters():
                p.data[...] = np.nan

    trainer.callbacks.append(blow_up)
    with pytest.raises(TrainingError, match="last good checkpoint .*epoch 1"):
        trainer.run()
    meta, groups = load_checkpoint(tmp_path / "checkpoint.npz")
    assert meta["epoch"] == 1 and np.isfinite(groups["model"]["1.weight"]).all()


def _bad_state(state):
    state = json.loads(json.dumps(state))
    state["state"]["state"] = "abc"
    return state


@pytest.mark.parametrize("key,edit", [
    ("direction_state", _bad_state),
    ("epoch_start_state", _bad_state),
    ("epoch_start_state", lambda s: {**s, "bit_generator": "MT19937"}),
    ("epoch", lambda v: "1"),
    ("step_in_epoch", lambda v: -2),
    ("history", lambda v: {"epoch": 1}),
    ("partial", lambda v: {**v, "loss": None}),
    ("losses", lambda v: v + ["nan"]),
    ("epoch_counts", lambda v: [1]),
    ("epoch_kinks", lambda v: []),
    ("epoch_kinks", lambda v: {"2:relu": 5}),
    ("history", None),  # removed
    ("history", lambda v: [{}]),
    ("history", lambda v: [{**v[0], "test_acc": "x"}]),
    ("step_in_epoch", lambda v: 999),  # more than an epoch's batches
])
def test_resume_from_an_edited_checkpoint_names_the_entry(tmp_path, key, edit):
    """A checkpoint whose meta was edited by hand (or damaged) fails to resume with a message
    naming the entry, before anything is applied or written: the file stays as it was."""
    Trainer(_config(epochs=2), out=tmp_path, dataset=_blobs(), log=lambda m: None).run()
    path = tmp_path / "checkpoint.npz"
    meta, groups = load_checkpoint(path)
    meta["epoch"] = 1  # (so that the resumed run would have work left)
    if edit is None:
        del meta[key]
    else:
        meta[key] = edit(meta[key])
    save_checkpoint(path, meta, **groups)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=f"{key}.*(edited or damaged|start it again)"):
        Trainer(_config(epochs=2), out=tmp_path, resume=True, dataset=_blobs(),
                log=lambda m: None).run()
    assert path.read_bytes() == before


@pytest.mark.parametrize("meta", ["5", "null", "[1]", "{bad"])
def test_a_checkpoint_whose_meta_is_not_a_json_object_is_refused(tmp_path, meta):
    path = tmp_path / "c.npz"
    np.savez(path, meta=np.asarray(meta))
    with pytest.raises(CheckpointError, match="'meta' entry .*not a readable kinkprop checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("field,value,valid", [("model", "resnet", "mlp, lenet, convnet"),
                                               ("optimizer", "lbfgs", "sgd, adam, adamw"),
                                               ("precision", "fp4", "fp64, fp32"),
                                               ("schedule", "linear", "none, step, cosine"),
                                               ("kink_policy", "torch", "pytorch")])
def test_unknown_names_list_the_valid_ones(field, value, valid):
    with pytest.raises(ValueError, match=valid):
        _config(**{field: value}).validate()


def test_evaluate_checkpoint_and_corrupt_checkpoint(tmp_path, monkeypatch):
    data = _blobs()
    Trainer(_config(epochs=1), out=tmp_path, dataset=data, log=lambda m: None).run()
    monkeypatch.setattr("kinkprop.train.load_dataset", lambda name, data_dir=None: data)
    result = evaluate_checkpoint(tmp_path / "checkpoint.npz")
    assert result["epoch"] == 1 and 0 <= result["test_acc"] <= 1
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable kinkprop checkpoint"):
        load_checkpoint(bad)


@pytest.mark.parametrize("precision", ["fp64", "bf16", "fp16"])
def test_training_in_each_precision(precision):
    summary = Trainer(_config(precision=precision), dataset=_blobs(), log=lambda m: None).run()
    assert summary["final_test_acc"] > 0.8


def test_a_run_keeps_the_enclosing_directional_options():
    """Its own generator is the only directional option a run sets."""
    import warnings

    import kinkprop as kp
    from kinkprop.kinks import directional

    seen = []
    trainer = Trainer(_config(kink_policy="directional", epochs=1), dataset=_blobs(),
                      log=lambda m: None)
    trainer.callbacks.append(lambda t, loss: seen.append(
        (directional.current_options().max_directions, directional.current_options().fallback,
         directional.current_options().rng is t.direction_rng)))
    with kp.directional_options(max_directions=1, fallback="jax"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.run()
    assert seen and set(seen) == {(1, "jax", True)}
