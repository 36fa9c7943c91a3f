"""``kinkprop study``: experiment grids over precision x kink policy x batch-norm x optimizer x seeds
x model, run in parallel worker processes, each finished run stored at once in SQLite.

Protocols:

``volume``    the bifurcation volume of Bertoin et al. (2021, section 3): for one initialisation
              (seed), one pass over the data without training; does the first layer's gradient
              differ between the baseline policy (ReLU'(0) = 0) and the run's policy on some
              minibatch? Also the first differing minibatch and the exact-zero rate per ReLU call.
``training``  train with the run's policy; per epoch: test accuracy and loss, kink hits per layer,
              the steps whose gradient changed with the policy (compared with the baseline on the
              same tape, a second backward only on steps that hit a kink), divergence.
``audit``     the Taylor-remainder audit at initialisation (see ``kinkprop audit``).

A study is resumable: run ids are hashes of the run's configuration; finished runs are skipped.

Engines: ``numpy`` (kinkprop's own, the default) or ``torch`` (``StudySpec(engine="torch",
device="cpu"|"cuda")``: PyTorch models under :mod:`kinkprop.torch`, see :mod:`.torch_runs`; the
volume and training protocols only), into the same database.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import hashlib
import json
import multiprocessing
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from itertools import product

from .store import Store

BASELINE = "relu=0"
ENGINES = ("numpy", "torch")


@dataclass
class StudySpec:
    name: str = "quick"
    dataset: str = "mnist1d"
    data_dir: str | None = None
    models: list = field(default_factory=lambda: [["mlp", {"widths": [128, 128]}]])
    precisions: list = field(default_factory=lambda: ["fp32", "bf16", "fp16"])
    policies: list = field(default_factory=lambda: ["relu=0", "relu=0.5", "relu=1",
                                                    "directional"])
    batch_norm: list = field(default_factory=lambda: [False])
    optimizers: list = field(default_factory=lambda: [
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 5
    batch_size: int = 64
    protocols: list = field(default_factory=lambda: ["volume", "training", "audit"])
    volume_seeds: int = 10
    volume_max_batches: int | None = None
    audit_precisions: list = field(default_factory=lambda: ["fp64", "fp32", "bf16"])
    engine: str = "numpy"  # or "torch": PyTorch models through kinkprop.torch (torch_runs.py)
    device: str = "cpu"  # torch engine only: cpu, cuda, cuda:N

    def runs(self) -> list[dict]:
        """Every run of the grid, as a JSON-serialisable config with a ``run_id``.

        The engine and device enter the configs (and so the run ids) only for ``engine !=
        "numpy"``, so NumPy runs keep their ids. The audit protocol is NumPy-only: the torch
        engine skips it (:func:`run_study` says so)."""
        out = []
        common = {"study": self.name, "dataset": self.dataset, "data_dir": self.data_dir,
                  "batch_size": self.batch_size}
        if self.engine != "numpy":
            common.update(engine=self.engine, device=self.device)
        for model, opts in self.models:
            for bn in self.batch_norm:
                base = {**common, "model": model, "model_opts": opts, "batch_norm": bn}
                if "volume" in self.protocols:
                    for prec, pol, seed in product(self.precisions, self.policies,
                                                   range(self.volume_seeds)):
                        if pol != BASELINE:
                            out.append({**base, "protocol": "volume", "precision": prec,
                                        "policy": pol, "seed": seed,
                                        "max_batches": self.volume_max_batches})
                if "training" in self.protocols:
                    for prec, pol, opt, seed in product(self.precisions, self.policies,
                                                        self.optimizers, self.seeds):
                        out.append({**base, "protocol": "training", "precision": prec,
                                    "policy": pol, "seed": seed, "epochs": self.epochs, **opt})
                if "audit" in self.protocols and self.engine == "numpy":
                    out.append({**base, "protocol": "audit", "precisions": self.audit_precisions,
                                "seed": 0})
        for run in out:
            run["run_id"] = run_id(run)
        return out


def run_id(config: dict) -> str:
    body = {k: v for k, v in config.items() if k != "run_id"}
    return hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


PRESETS = {
    # batch-norm on and off: the 2021 paper found batch-norm makes exact zeros more frequent
    "quick": StudySpec(batch_norm=[False, True], epochs=4, volume_seeds=6),
    "fashion-mnist": StudySpec(
        name="fashion-mnist", dataset="fashion-mnist",
        models=[["mlp", {"widths": [512, 512]}], ["convnet", {}]],
        precisions=["fp64", "fp32", "bf16", "fp16"],
        policies=["relu=0", "relu=0.5", "relu=1", "directional", "relu=replace:1"],
        batch_norm=[False, True],
        optimizers=[{"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
                    {"optimizer": "adam", "lr": 0.001}],
        seeds=[0, 1, 2], epochs=5, batch_size=128, volume_seeds=10,
        audit_precisions=["fp64", "fp32", "bf16"]),
}


# -- one run (in a worker process) ---------------------------------------------------------------

_DATA_CACHE: dict = {}


def _dataset(name, data_dir):
    from ..data import load_dataset

    key = (name, data_dir)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(name, data_dir)
    return _DATA_CACHE[key]


def execute(config: dict) -> dict:
    """Run one configuration; returns {result, epochs, sites, seconds} (never raises)."""
    t0 = time.perf_counter()
    try:
        if config.get("engine", "numpy") == "torch":
            from .torch_runs import execute as torch_execute

            result, epochs, sites = torch_execute(config)
        elif config.get("engine", "numpy") != "numpy":
            raise ValueError(f"unknown engine {config['engine']!r}; valid: {', '.join(ENGINES)}")
        else:
            fn = {"volume": _volume, "training": _training, "audit": _audit}[config["protocol"]]
            result, epochs, sites = fn(config)
        status, error = "done", None
    except Exception:  # recorded, so one bad cell does not stop the study
        result, epochs, sites = {}, [], []
        status, error = "failed", traceback.format_exc(limit=8)
    return {"config": config, "result": result, "epochs": epochs, "sites": sites,
            "seconds": time.perf_counter() - t0, "status": status, "error": error}


def _model_opts(config):
    opts = dict(config.get("model_opts") or {})
    opts["batch_norm"] = config["batch_norm"]
    return opts


def _volume(config):
    from .census import bifurcation_volume

    data = _dataset(config["dataset"], config["data_dir"])
    v = bifurcation_volume(data, config["model"], config["precision"], inits=1,
                           batch_size=config["batch_size"], policy_a=BASELINE,
                           policy_b=config["policy"], max_batches=config.get("max_batches"),
                           seed=config["seed"], model_opts=_model_opts(config))
    result = {"in_s": v.in_s == 1, "first_batch": v.first_batches[0] if v.first_batches else None,
              "relu_calls": v.relu_calls, "relu_zeros": v.relu_zeros, "batches": v.batches,
              "second_backwards": v.second_backwards, "per_layer_hits": v.per_layer_hits}
    return result, [], []


def _training(config):
    from ..train import TrainConfig, Trainer, TrainingError

    data = _dataset(config["dataset"], config["data_dir"])
    opts = config.get("model_opts") or {}
    tc = TrainConfig(dataset=config["dataset"], data_dir=config["data_dir"],
                     model=config["model"], widths=tuple(opts.get("widths", (256, 128, 100))),
                     batch_norm=config["batch_norm"], epochs=config["epochs"],
                     batch_size=config["batch_size"], optimizer=config["optimizer"],
                     lr=config["lr"], momentum=config.get("momentum", 0.0),
                     precision=config["precision"], kink_policy=config["policy"],
                     seed=config["seed"], census="exact",
                     compare_policy=None if config["policy"] == BASELINE else BASELINE)
    trainer = Trainer(tc, dataset=data, log=lambda m: None, progress=False)
    diverged = None
    try:
        trainer.run()
    except TrainingError as e:
        diverged = str(e)
    epochs, sites = [], []
    for rec in trainer.history:
        kinks = {k: v for k, v in rec.get("kinks", {}).items() if k != "directional"}
        epochs.append({**rec, "kink_hits": sum(v["hits"] for v in kinks.values()),
                       "effective": sum(v["effective"] for v in kinks.values()),
                       "changed_steps": rec.get("changed_steps"), "steps": rec.get("steps")})
        sites += [{"epoch": rec["epoch"], "site": k, "evaluated": v["evaluated"],
                   "hits": v["hits"], "effective": v["effective"]} for k, v in kinks.items()]
    last = trainer.history[-1] if trainer.history else {}
    result = {"final_test_acc": last.get("test_acc"), "final_test_loss": last.get("test_loss"),
              "diverged": diverged, "epochs_done": len(trainer.history),
              "changed_steps": sum(e.get("changed_steps") or 0 for e in trainer.history),
              "steps": sum(e.get("steps") or 0 for e in trainer.history),
              "directional": [rec.get("kinks", {}).get("directional") for rec in trainer.history]}
    return result, epochs, sites


def _audit(config):
    import numpy as np

    from .. import nn
    from ..diagnostics.taylor import taylor_audit
    from ..precision import training_format

    data = _dataset(config["dataset"], config["data_dir"])
    rows, slopes = [], []
    x, y = data.x_train[:config["batch_size"]], data.y_train[:config["batch_size"]]
    for prec in config["precisions"]:
        model = nn.build_model(config["model"], data.input_shape, data.num_classes,
                               seed=config["seed"], dtype=training_format(prec)[0],
                               **_model_opts(config))
        res = taylor_audit(model, x, y, precision=prec, n_random=3,
                           hs=np.logspace(-8, -1, 15), seed=config["seed"])
        rows += [{**r, "precision": prec} for r in res.rows]
        slopes += [{**s, "precision": prec} for s in _slopes_list(res.slopes)]
    return {"rows": rows, "slopes": slopes}, [], []


def _slopes_list(slopes):
    if isinstance(slopes, dict):
        return [{"direction": k, **v} for k, v in slopes.items()]
    return list(slopes)


# -- the study -----------------------------------------------------------------------------------


def run_study(spec: StudySpec, db_path, workers: int = 2, progress: bool = True,
              log=print) -> dict:
    """Run every unfinished run of ``spec`` into the database at ``db_path``."""
    store = Store(db_path)
    store.set_meta("spec", asdict(spec))
    runs = spec.runs()
    done = store.finished_ids()
    todo = [r for r in runs if r["run_id"] not in done]
    engine = "" if spec.engine == "numpy" else f" (engine {spec.engine} on {spec.device})"
    log(f"study {spec.name!r}{engine}: {len(runs)} runs, {len(runs) - len(todo)} already "
        f"finished, {len(todo)} to run on {workers} worker(s); results in {db_path}")
    if spec.engine != "numpy" and "audit" in spec.protocols:
        log(f"note: the audit protocol is NumPy-only; skipped with engine {spec.engine!r}")
    failed = 0
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="runs", leave=False)
    # cheapest first, so an interrupted study keeps the most runs
    todo.sort(key=lambda r: {"volume": 0, "audit": 1, "training": 2}[r["protocol"]])
    if workers <= 1:
        for run in todo:
            failed += _save(store, execute(copy.deepcopy(run)))
            if bar is not None:
                bar.update(1)
    else:
        env = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [pool.submit(execute, run) for run in todo]
                try:
                    for fut in cf.as_completed(futures):
                        failed += _save(store, fut.result())
                        if bar is not None:
                            bar.update(1)
                except cf.process.BrokenProcessPool:
                    for f in futures:
                        f.cancel()
                    raise RuntimeError(
                        f"a worker process died; the {len(store.finished_ids())} finished runs "
                        f"are saved in {db_path}: run the same command again to resume") from None
                except KeyboardInterrupt:
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if bar is not None:
        bar.close()
    counts = store.count()
    store.close()
    return {"runs": len(runs), "ran": len(todo), "failed": failed, "counts": counts}


def _save(store: Store, out: dict) -> int:
    cfg = out["config"]
    store.save_run(cfg["run_id"], cfg["study"], cfg["protocol"], cfg, out["result"],
                   out["epochs"], out["sites"], out["seconds"], out["status"], out["error"])
    return out["status"] != "done"
