"""``kinkprop census``: how often does training land on a kink, per layer and per precision?

Two protocols:

* **bifurcation volume** (Bertoin et al. 2021, section 3, with the correct chain rule): for R
  random initialisations, one pass over the training data without training (lr = 0); for each
  minibatch, :func:`~kinkprop.diagnostics.bifurcation.bifurcation_test` compares the first layer's
  weight gradient under two policies (default ReLU'(0) = 0 vs 1). An initialisation is "in S" when
  they differ on some minibatch. Reported per precision: the share of initialisations in S, the
  index of the first differing minibatch, and the exact-zero rate per ReLU call.
* **training census**: N epochs of training with the census on; exact hits per layer per epoch.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import nn
from ..data import DataLoader
from ..diagnostics.bifurcation import bifurcation_test
from ..kinks.census import census
from ..kinks.directional import own_directions
from ..precision import training_format
from ..primitives import cross_entropy
from ..tensor import Tensor
from ..textable import text_table
from ..train import TrainConfig, Trainer


@dataclass
class VolumeResult:
    precision: str
    inits: int
    in_s: int
    first_batches: list = field(default_factory=list)  # first differing batch per init in S
    relu_calls: int = 0
    relu_zeros: int = 0
    batches: int = 0
    second_backwards: int = 0
    per_layer_hits: dict = field(default_factory=dict)

    @property
    def share_in_s(self) -> float:
        return self.in_s / self.inits if self.inits else 0.0

    @property
    def zero_rate(self) -> float:
        return self.relu_zeros / self.relu_calls if self.relu_calls else 0.0

    @property
    def median_first_batch(self):
        return statistics.median(self.first_batches) if self.first_batches else None

    def row(self) -> dict:
        d = asdict(self)
        d.update(share_in_s=self.share_in_s, zero_rate=self.zero_rate,
                 median_first_batch=self.median_first_batch)
        return d


def first_layer(model) -> tuple[str, object]:
    """The first parameterised layer's weight (the paper compares first-layer gradients)."""
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.ndim >= 2:
            return name, p
    raise ValueError("model has no weight matrix")


def bifurcation_volume(data, model_name: str, precision: str, inits: int, batch_size: int = 128,
                       policy_a="pytorch,relu=0", policy_b="pytorch,relu=1",
                       max_batches: int | None = None, seed: int = 0, model_opts=None,
                       progress=None) -> VolumeResult:
    """Run the bifurcation-volume protocol for one precision (see the module docstring)."""
    dtype, scope = training_format(precision)
    result = VolumeResult(precision, inits, 0)
    for r in range(inits):
        model = nn.build_model(model_name, data.input_shape, data.num_classes, seed=seed + r,
                               dtype=dtype, **(model_opts or {}))
        weight_name, weight = first_layer(model)
        params = dict(model.named_parameters())
        loader = DataLoader(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed + r)
        first = None
        # a directional policy draws from a generator of this initialisation's seed: the result
        # does not depend on what ran before in the process
        with scope, census() as c, own_directions(np.random.default_rng(seed + r)):
            for b, (xb, yb) in enumerate(loader):
                if max_batches is not None and b >= max_batches:
                    break
                xt = Tensor(xb.astype(dtype, copy=False))
                res = bifurcation_test(lambda m=model, x=xt, y=yb: cross_entropy(m(x), y), params,
                                       policy_a, policy_b)
                model.zero_grad()
                result.batches += 1
                result.second_backwards += res.second_backward
                if first is None and res.diff_norms.get(weight_name, 0.0) > 0:
                    first = b
                if progress is not None:
                    progress(r, b)
        for key, counts in c.totals().items():
            result.per_layer_hits[key] = result.per_layer_hits.get(key, 0) + counts.hits
            if counts.primitive == "relu":
                result.relu_calls += counts.evaluated
                result.relu_zeros += counts.hits
        if first is not None:
            result.in_s += 1
            result.first_batches.append(first)
    return result


def training_census(data, config: TrainConfig, log=print) -> list[dict]:
    """Train with the census on; per-epoch rows of hits per layer."""
    config.census = "exact"
    trainer = Trainer(config, dataset=data, log=log, progress=False)
    summary = trainer.run()
    rows = []
    for record in summary["history"]:
        for site, counts in record.get("kinks", {}).items():
            if site == "directional":
                continue
            rows.append({"precision": config.precision, "epoch": record["epoch"], "site": site,
                         **counts, "test_acc": record["test_acc"]})
    return rows


def write_outputs(out: Path, volume: list[VolumeResult], training: list[dict]) -> dict:
    """CSV and JSON files and the PNG plot; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "census.json", "volume_csv": out / "bifurcation_volume.csv",
             "training_csv": out / "training_census.csv", "plot": out / "census.png"}
    paths["json"].write_text(json.dumps({"bifurcation_volume": [v.row() for v in volume],
                                         "training_census": training}, indent=2))
    _write_csv(paths["volume_csv"], [{k: v for k, v in r.row().items()
                                      if not isinstance(v, (list, dict))} for r in volume])
    _write_csv(paths["training_csv"], training)
    plot(paths["plot"], volume, training)
    return {k: str(v) for k, v in paths.items()}


def _write_csv(path, rows):
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(path, volume: list[VolumeResult], training: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    precisions = [v.precision for v in volume]
    ax.bar(precisions, [100 * v.share_in_s for v in volume], color="#4477aa")
    for i, v in enumerate(volume):
        ax.text(i, 100 * v.share_in_s + 1, f"{v.in_s}/{v.inits}", ha="center", fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_ylabel("initialisations in S (%)")
    ax.set_title("Gradients differ between ReLU'(0)=0 and 1\n(one pass, no training)")
    ax = axes[1]
    sites = sorted({r["site"] for r in training})
    for prec in dict.fromkeys(r["precision"] for r in training):
        for site in sites:
            rows = [r for r in training if r["precision"] == prec and r["site"] == site]
            if rows:
                ax.plot([r["epoch"] for r in rows], [max(r["hits"], 0.5) for r in rows],
                        marker="o", label=f"{prec} {site}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("exact kink hits (0 drawn at 0.5)")
    ax.set_title("Training census: hits per layer per epoch")
    if training:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def volume_table(volume: list[VolumeResult]) -> str:
    head = ["precision", "inits", "in S", "share in S", "median first batch", "batches",
            "relu zero rate", "2nd backwards"]
    rows = [[v.precision, v.inits, v.in_s, f"{100 * v.share_in_s:.1f}%",
             "-" if v.median_first_batch is None else f"{v.median_first_batch:g}", v.batches,
             f"{v.zero_rate:.3g}", v.second_backwards] for v in volume]
    return _table(head, rows)


def training_table(training: list[dict]) -> str:
    head = ["precision", "epoch", "site", "evaluated", "hits", "effective", "steps hit"]
    rows = [[r["precision"], r["epoch"], r["site"], r["evaluated"], r["hits"], r["effective"],
             r["steps_hit"]] for r in training]
    return _table(head, rows)


def _table(head, rows) -> str:
    return text_table(head, rows)


def parse_precisions(text: str) -> list[str]:
    from ..precision import PRECISIONS

    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if bad or not names:
        raise ValueError(f"unknown precision(s) {bad}; valid: {', '.join(PRECISIONS)}")
    return names

