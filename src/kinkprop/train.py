"""Training loop behind ``kinkprop train``: metrics, atomic checkpoints, resume, clean stops.

A run directory holds ``config.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoint.npz``
(written at the end of each epoch and on interrupt) and ``summary.json``. ``resume`` continues from
the checkpoint, mid-epoch included, and gives the same result as an uninterrupted run: the
checkpoint keeps the data order's generator state at the start of the epoch and the number of
batches done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import nn
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DataLoader, load_dataset
from .diagnostics.bifurcation import compare_on_tape
from .kinks import directional
from .kinks.census import LEVELS, Census, census
from .kinks.directional import own_directions
from .kinks.policy import kink_policy, parse_policy
from .optim import OPTIMIZERS, CosineAnnealingLR, StepLR
from .precision import PRECISIONS, training_format
from .primitives import cross_entropy
from .tape import no_grad
from .tensor import Tensor

SCHEDULES = ("none", "step", "cosine")


class TrainingError(RuntimeError):
    """Training stopped: the message says why and what was kept."""


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_rng_state(v) -> bool:
    """Whether ``v`` is a state a PCG64 generator (the loader's and the directions') accepts."""
    if not isinstance(v, dict) or v.get("bit_generator") != "PCG64":
        return False
    try:
        np.random.PCG64().state = v
    except (TypeError, ValueError, KeyError, OverflowError):
        return False
    return True


#: the resume fields of a training checkpoint's meta: (what it must be, the check)
_RESUME_FIELDS = {
    "epoch": ("a count (an integer >= 0)", _is_count),
    "step_in_epoch": ("a count (an integer >= 0)", _is_count),
    "epoch_start_state": ("a PCG64 generator state", _is_rng_state),
    "history": ("a list of per-epoch records, each with a numeric test_acc, test_loss and "
                "seconds", lambda v: isinstance(v, list) and all(
                    isinstance(h, dict) and all(_is_number(h.get(k)) for k in
                                                ("test_acc", "test_loss", "seconds"))
                    for h in v)),
    "partial": ("a dict of the epoch's running loss, correct, n and seconds", lambda v: (
        isinstance(v, dict) and all(_is_number(v.get(k)) for k in
                                    ("loss", "correct", "n", "seconds")))),
    "losses": ("a list of numbers", lambda v: isinstance(v, list) and all(
        _is_number(x) for x in v)),
}
#: fields later versions added: absent means an older checkpoint, but present must be well formed
_OPTIONAL_RESUME_FIELDS = {
    "epoch_kinks": ("a dict of per-site dicts of counts", lambda v: isinstance(v, dict) and all(
        isinstance(c, dict) and all(_is_count(n) for n in c.values()) for c in v.values())),
    "epoch_counts": ("two counts", lambda v: isinstance(v, list) and len(v) == 2 and all(
        _is_count(x) for x in v)),
    "direction_state": ("a PCG64 generator state", _is_rng_state),
}


def _check_resume_meta(meta: dict, path, batches_per_epoch: int) -> None:
    """A :class:`CheckpointError` naming the first resume field of ``meta`` that is missing or
    malformed (a checkpoint edited by hand or damaged), before any of it is applied."""
    for fields, required in ((_RESUME_FIELDS, True), (_OPTIONAL_RESUME_FIELDS, False)):
        for key, (what, ok) in fields.items():
            if key not in meta:
                if required:
                    raise CheckpointError(f"{path}: the checkpoint has no {key!r} entry, so the "
                                          "run cannot resume from it; start it again with --force")
                continue
            if not ok(meta[key]):
                raise CheckpointError(
                    f"{path}: the checkpoint's {key!r} should be {what}, got "
                    f"{_short(meta[key])}; it was edited or damaged, so the run cannot resume "
                    "from it (restore the file, or start the run again with --force)")
    if meta["step_in_epoch"] > batches_per_epoch:
        raise CheckpointError(
            f"{path}: the checkpoint's 'step_in_epoch' is {meta['step_in_epoch']}, but an epoch "
            f"of this run has {batches_per_epoch} batches; it was edited or damaged, so the run "
            "cannot resume from it (restore the file, or start the run again with --force)")


def _short(v, limit=80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    model: str = "mlp"
    widths: tuple = (256, 128, 100)
    batch_norm: bool = False
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "none"
    precision: str = "fp32"
    kink_policy: str = "pytorch"
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    census: str = "off"
    compare_policy: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.model not in nn.MODELS:
            raise ValueError(f"unknown model {self.model!r}; valid: {', '.join(nn.MODELS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: "
                             f"{', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid: "
                             f"{', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        if self.census not in ("off", *LEVELS):
            raise ValueError(f"unknown census level {self.census!r}; valid: off, "
                             f"{', '.join(LEVELS)}")
        parse_policy(self.kink_policy)
        if self.compare_policy is not None:
            parse_policy(self.compare_policy)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; valid: {sorted(known)}")
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        return cls(**d)


def build(config: TrainConfig, dataset=None):
    """Dataset, model, optimizer and schedule for a config."""
    data = dataset if dataset is not None else load_dataset(config.dataset, config.data_dir)
    opts = {"batch_norm": config.batch_norm}
    if config.model == "mlp":
        opts["widths"] = tuple(config.widths)
    model = nn.build_model(config.model, data.input_shape, data.num_classes, seed=config.seed,
                           dtype=training_format(config.precision)[0], **opts)
    kwargs = {"weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        kwargs.update(momentum=config.momentum, nesterov=config.nesterov)
    optimizer = OPTIMIZERS[config.optimizer](model.parameters(), lr=config.lr, **kwargs)
    schedule = None
    if config.schedule == "step":
        schedule = StepLR(optimizer, step_size=max(1, config.epochs // 3), gamma=0.1)
    elif config.schedule == "cosine":
        schedule = CosineAnnealingLR(optimizer, T_max=config.epochs)
    return data, model, optimizer, schedule


def _subset(x, y, n):
    return (x, y) if n is None else (x[:n], y[:n])


def evaluate(model, x, y, batch_size: int = 1000, dtype=None) -> dict:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in eval mode, without a tape."""
    was_training = model.training
    model.eval()
    dtype = dtype or model.parameters()[0].dtype
    total, correct, n = 0.0, 0, 0
    with no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            logits = model(Tensor(xb.astype(dtype)))
            total += float(cross_entropy(logits, yb).data) * len(xb)
            correct += int((logits.data.astype(np.float32).argmax(axis=1) == yb).sum())
            n += len(xb)
    model.train(was_training)
    return {"loss": total / n, "acc": correct / n}


@contextlib.contextmanager
def _null():
    yield None


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop stops after the step in progress, saving first."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self._old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


class Trainer:
    """Runs a config into a run directory (``out``); see the module docstring."""

    def __init__(self, config: TrainConfig, out=None, resume: bool = False, force: bool = False,
                 progress: bool | None = None, dataset=None, log=print):
        config.validate()
        self.config, self.log = config, log
        self.out = Path(out) if out is not None else None
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.data, self.model, self.optimizer, self.schedule = build(config, dataset)
        if self.out is not None:  # after the data loaded: a bad dataset leaves no run behind
            self._prepare_out(resume, force)
        self.dtype, self.format_scope = training_format(config.precision)
        self.census: Census | None = None
        self.epoch_kinks: dict = {}
        self.compare = None if config.compare_policy is None else parse_policy(
            config.compare_policy)
        self.named_params = dict(self.model.named_parameters())
        self.epoch_changed = self.epoch_steps = 0
        self.policy = parse_policy(config.kink_policy)
        self.x_train, self.y_train = _subset(self.data.x_train, self.data.y_train,
                                             config.train_subset)
        self.x_test, self.y_test = _subset(self.data.x_test, self.data.y_test, config.test_subset)
        self.loader = DataLoader(self.x_train, self.y_train, config.batch_size, shuffle=True,
                                 seed=config.seed)
        # the directional policy's random directions: a generator of the run's own, seeded by its
        # seed and kept in the checkpoint, so that a run (resumed or not) draws the same ones
        # whatever ran before it in the process
        self.direction_rng = np.random.default_rng(config.seed)
        self.epoch, self.step_in_epoch, self.history = 0, 0, []
        self.epoch_start_state = self.loader.state
        self.partial = {"loss": 0.0, "correct": 0, "n": 0, "seconds": 0.0}
        self.losses: list[float] = []
        self.callbacks: list = []
        if resume and self.checkpoint_path.exists():
            self._load()

    # -- run directory -----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.npz"

    def _prepare_out(self, resume, force):
        cfg_path = self.out / "config.json"
        if cfg_path.exists():
            if resume:
                saved = json.loads(cfg_path.read_text())
                if saved != self.config.to_json():
                    diff = {k: (saved.get(k), v) for k, v in self.config.to_json().items()
                            if saved.get(k) != v}
                    raise ValueError(f"--resume: {self.out} holds a run with a different config "
                                     f"(saved vs given: {diff}); resume with the same options")
            elif not force:
                raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue "
                                      "it or --force to overwrite it")
            else:
                for name in ("checkpoint.npz", "metrics.jsonl", "summary.json"):
                    (self.out / name).unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(json.dumps(self.config.to_json(), indent=2))

    def _meta(self) -> dict:
        return {"kind": "kinkprop-train", "version": 1, "config": self.config.to_json(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "epoch_start_state": self.epoch_start_state, "history": self.history,
                "partial": self.partial, "losses": self.losses, "epoch_kinks": self.epoch_kinks,
                "epoch_counts": [self.epoch_changed, self.epoch_steps],
                "direction_state": self.direction_rng.bit_generator.state}

    def save(self) -> None:
        sched = {} if self.schedule is None else {
            k: np.asarray(v) for k, v in self.schedule.state_dict().items()}
        save_checkpoint(self.checkpoint_path, self._meta(), model=self.model.state_dict(),
                        optim=self.optimizer.state_dict(), sched=sched)

    def _load(self) -> None:
        meta, groups = load_checkpoint(self.checkpoint_path)
        _check_resume_meta(meta, self.checkpoint_path, len(self.loader))
        self.model.load_state_dict(groups.get("model", {}))
        self.optimizer.load_state_dict(groups.get("optim", {}))
        if self.schedule is not None and groups.get("sched"):
            self.schedule.load_state_dict({k: v.item() for k, v in groups["sched"].items()})
        self.epoch, self.step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        self.epoch_start_state = meta["epoch_start_state"]
        self.epoch_kinks = meta.get("epoch_kinks", {})
        self.epoch_changed, self.epoch_steps = meta.get("epoch_counts", [0, 0])
        self.history, self.partial, self.losses = meta["history"], meta["partial"], meta["losses"]
        if "direction_state" in meta:  # (checkpoints written before it was kept start afresh)
            self.direction_rng.bit_generator.state = meta["direction_state"]
        self.log(f"resuming {self.out} at epoch {self.epoch + 1}, step {self.step_in_epoch}")

    # -- training ------------------------------------------------------------------------------
    def train_step(self, xb, yb) -> tuple[float, int]:
        self.optimizer.zero_grad()
        logits = self.model(Tensor(xb.astype(self.dtype, copy=False)))
        loss = cross_entropy(logits, yb)
        value = float(loss.data)
        if not math.isfinite(value):
            raise FloatingPointError(value)
        if self.compare is None:
            loss.backward()
        else:  # count the steps whose gradient the policy changed (second backward on kinks only)
            res = compare_on_tape(loss, self.named_params, self.compare)
            self.epoch_changed += res.differs
        self.epoch_steps += 1
        if self.census is not None:
            self._count_step()
        for cb in self.callbacks:
            cb(self, loss)
        self.optimizer.step()
        correct = int((logits.data.astype(np.float32).argmax(axis=1) == yb).sum())
        return value, correct

    def _count_step(self) -> None:
        """Fold this step's census (and directional report) into the epoch's per-site totals."""
        step = self.census.step()
        self.census.steps.clear()  # per-epoch totals are kept below, not every step
        for key, c in step.items():
            tot = self.epoch_kinks.setdefault(key, {"hits": 0, "effective": 0, "evaluated": 0,
                                                    "ambiguous": 0, "steps_hit": 0})
            tot["hits"] += c.hits
            tot["effective"] += c.effective
            tot["evaluated"] += c.evaluated
            tot["ambiguous"] += c.ambiguous
            tot["steps_hit"] += c.hits > 0
        report = directional.last_report
        if self.policy.uses_directional and report is not None and report.swept:
            d = self.epoch_kinks.setdefault("directional", {"steps_swept": 0, "kinks": 0,
                                                            "resolved": 0, "unresolved": 0,
                                                            "directions": 0})
            d["steps_swept"] += 1
            d["kinks"] += report.kinks
            d["resolved"] += report.resolved
            d["unresolved"] += report.unresolved
            d["directions"] += report.directions

    def run(self) -> dict:
        level = self.config.census
        with kink_policy(self.policy), self.format_scope, _StopFlag() as stop, (
                census(level) if level != "off" else _null()) as c, own_directions(
                    self.direction_rng):
            self.census = c
            while self.epoch < self.config.epochs:
                self._run_epoch(stop)
        summary = self._summary()
        if self.out is not None:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _run_epoch(self, stop) -> None:
        cfg = self.config
        self.loader.state = self.epoch_start_state
        batches = iter(self.loader)
        for _ in range(self.step_in_epoch):  # resumed mid-epoch: skip the batches already done
            next(batches)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.loader), initial=self.step_in_epoch, leave=False,
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}")
        self.model.train()
        t0 = time.perf_counter()
        for xb, yb in batches:
            try:
                value, correct = self.train_step(xb, yb)
            except FloatingPointError as e:
                kept = (f"the last good checkpoint is {self.checkpoint_path} (epoch "
                        f"{self.epoch}, step {self.step_in_epoch})"
                        if self.out is not None and self.checkpoint_path.exists()
                        else "no checkpoint was written")
                raise TrainingError(
                    f"non-finite loss ({e}) at epoch {self.epoch + 1}, step "
                    f"{self.step_in_epoch + 1}; training stopped, {kept}. Lower --lr or use a "
                    "wider precision") from None
            self.step_in_epoch += 1
            self.losses.append(value)
            p = self.partial
            p["loss"] += value * len(xb)
            p["correct"] += correct
            p["n"] += len(xb)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{p['loss'] / p['n']:.4f}", acc=f"{p['correct'] / p['n']:.3f}")
            if stop.signal is not None:
                self.partial["seconds"] += time.perf_counter() - t0
                if bar is not None:
                    bar.close()
                if self.out is not None:
                    self.save()
                    where = f"checkpoint saved to {self.checkpoint_path}; continue with --resume"
                else:
                    where = "no --out, nothing saved"
                raise KeyboardInterrupt(f"stopped by signal {stop.signal} at epoch "
                                        f"{self.epoch + 1}, step {self.step_in_epoch}; {where}")
        if bar is not None:
            bar.close()
        p = self.partial
        p["seconds"] += time.perf_counter() - t0
        test = evaluate(self.model, self.x_test, self.y_test, dtype=self.dtype)
        record = {"epoch": self.epoch + 1, "train_loss": p["loss"] / max(p["n"], 1),
                  "train_acc": p["correct"] / max(p["n"], 1), "test_loss": test["loss"],
                  "test_acc": test["acc"], "seconds": p["seconds"], "lr": self.optimizer.lr}
        if self.census is not None:
            record["kinks"] = self.epoch_kinks
            self.epoch_kinks = {}
        record["steps"] = self.epoch_steps
        if self.compare is not None:
            record["changed_steps"] = self.epoch_changed
        self.epoch_changed = self.epoch_steps = 0
        self.history.append(record)
        self.log(f"epoch {record['epoch']:>3}  train loss {record['train_loss']:.4f} "
                 f"acc {record['train_acc']:.4f}  test loss {record['test_loss']:.4f} "
                 f"acc {record['test_acc']:.4f}  {record['seconds']:.1f}s")
        if self.schedule is not None:
            self.schedule.step()
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_start_state = self.loader.state
        self.partial = {"loss": 0.0, "correct": 0, "n": 0, "seconds": 0.0}
        if self.out is not None:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.save()

    def _summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {"config": self.config.to_json(), "epochs": len(self.history),
                "final_test_acc": last.get("test_acc"), "final_test_loss": last.get("test_loss"),
                "best_test_acc": max((h["test_acc"] for h in self.history), default=None),
                "seconds": sum(h["seconds"] for h in self.history), "history": self.history}


def evaluate_checkpoint(path, data_dir=None, batch_size: int = 1000) -> dict:
    """Rebuild the model recorded in a checkpoint and evaluate it on its dataset's test split."""
    meta, groups = load_checkpoint(path)
    if meta.get("kind") != "kinkprop-train":
        raise ValueError(f"{path}: not a kinkprop training checkpoint")
    config = TrainConfig.from_json(meta["config"])
    if data_dir is not None:
        config.data_dir = data_dir
    data, model, _, _ = build(config)
    model.load_state_dict(groups["model"])
    x, y = _subset(data.x_test, data.y_test, config.test_subset)
    dtype, scope = training_format(config.precision)
    with kink_policy(parse_policy(config.kink_policy)), scope:
        result = evaluate(model, x, y, batch_size, dtype=dtype)
    return {"checkpoint": str(path), "epoch": meta["epoch"], "dataset": config.dataset,
            "model": config.model, "test_loss": result["loss"], "test_acc": result["acc"]}
