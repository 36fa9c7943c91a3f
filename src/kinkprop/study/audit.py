"""``kinkprop audit``: does the first-order property that backprop rests on hold, and where not?

For one batch and a model (built at initialisation, or read from a training checkpoint) it runs
:func:`kinkprop.diagnostics.taylor.taylor_audit` per precision: the Taylor remainder
``|f(θ + h·d) − f(θ) − h·⟨∇f(θ), d⟩|`` of the cross-entropy loss over a log grid of step sizes, for
random unit directions and the normalised gradient, with the kink crossings of each segment counted.
It prints the slope table and writes ``audit.json`` (meta, summary, slopes, rows), ``audit.csv``
(one row per precision, direction and h) and ``audit.png`` (log–log plot) into ``--out``.

The batch is ``--batch-size`` training samples drawn without replacement by ``--seed`` (sorted).
Models run in eval mode: batch-norm uses its running statistics, so f is a fixed function of θ.
This module imports only click and the standard library at import time; the work is imported
inside the command, so ``kinkprop --help`` stays fast.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click


def load_dataset(name: str, data_dir=None):
    """:func:`kinkprop.data.load_dataset`, imported late (tests replace this with a synthetic
    dataset)."""
    from ..data import load_dataset as load

    return load(name, data_dir)


def _csv_ints(ctx, param, value):
    from ..cli import _csv_ints as parse

    return parse(ctx, param, value)


_FROM_CHECKPOINT = ("dataset", "model", "widths", "batch_norm")


@click.command(name="audit")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, mnist1d, digits, mnist, kmnist")
@click.option("--data-dir", default=None, help="directory of IDX files, or mnist1d's cache")
@click.option("--model", default="mlp", show_default=True, help="mlp, lenet, convnet")
@click.option("--widths", default=None, callback=_csv_ints,
              help="hidden widths of the mlp, e.g. 256,128,100")
@click.option("--batch-norm/--no-batch-norm", default=False, show_default=True,
              help="batch-norm layers (audited in eval mode)")
@click.option("--checkpoint", default=None,
              help="audit a training checkpoint (its dataset and model) instead of an "
                   "initialisation")
@click.option("--seed", default=0, show_default=True,
              help="initialisation, batch and random directions")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--precisions", default="fp64,fp32,bf16", show_default=True,
              help="comma-separated: fp64, fp32, fp16, bf16, fp8-e4m3, fp8-e5m2")
@click.option("--directions", "n_random", default=4, show_default=True,
              help="random unit directions (the gradient direction is always added)")
@click.option("--h-min", default=1e-8, show_default=True)
@click.option("--h-max", default=1e-1, show_default=True)
@click.option("--h-num", default=15, show_default=True, help="step sizes on a log grid")
@click.option("--kink-policy", default=None,
              help="policy for the gradient at exact kink hits (default: pytorch, or the "
                   "checkpoint's)")
@click.option("--floor-factor", default=100.0, show_default=True,
              help="remainders below floor-factor * eps * |f| are rounding, not fitted")
@click.option("--detail", is_flag=True, help="also print the remainder per h and direction")
@click.option("--out", default="runs/audit", show_default=True)
def audit_cmd(dataset, data_dir, model, widths, batch_norm, checkpoint, seed, batch_size,
              precisions, n_random, h_min, h_max, h_num, kink_policy, floor_factor, detail, out):
    """Taylor-remainder audit: f(θ+h·d) vs f(θ) + h·⟨∇f, d⟩, with kink crossings counted.

    Slope ≈ 2 of log remainder vs log h where the segment crosses no kink, ≈ 1 just past a crossing;
    remainders under the precision's rounding floor are marked and not fitted.
    """
    from ..checkpoint import CheckpointError
    from ..cli import _fail
    from ..data import DataError
    from ..diagnostics.taylor import taylor_audit

    ctx = click.get_current_context()
    try:
        setup = _setup(ctx, dataset, data_dir, model, widths, batch_norm, checkpoint, seed,
                       batch_size, precisions, n_random, h_min, h_max, h_num, kink_policy,
                       floor_factor)
    except (ValueError, KeyError, DataError, CheckpointError) as e:
        _fail(e)

    net, x, y, info, opts = setup
    click.echo(f"auditing {info['source']} on {len(x)} {info['dataset']} samples in "
               f"{', '.join(opts['precision'])} ...", err=True)
    try:
        result = taylor_audit(net, x, y, **opts)
    except ValueError as e:  # e.g. a non-finite loss in a narrow format
        _fail(e)
    if not result.rows:
        _fail(ValueError("no direction to audit: --directions 0 and the gradient is zero"))
    result.meta.update(info)
    result.meta["title"] = (f"{info['model']} on {info['dataset']} ({info['source']}), batch "
                            f"{len(x)}, seed {seed}")
    click.echo(result.table(detail=detail))
    for note in result.meta.get("skipped", []):
        click.echo(f"note: skipped the {note}")
    paths = write_outputs(Path(out), result)
    click.echo("\nwrote " + ", ".join(paths.values()))


def _setup(ctx, dataset, data_dir, model, widths, batch_norm, checkpoint, seed, batch_size,
           precisions, n_random, h_min, h_max, h_num, kink_policy, floor_factor):
    import numpy as np

    from .. import nn
    from ..diagnostics.taylor import parse_precisions
    from ..kinks.policy import parse_policy

    names = parse_precisions(precisions)
    if not 0 < h_min < h_max:
        raise ValueError(f"need 0 < --h-min < --h-max, got {h_min:g} and {h_max:g}")
    if h_num < 2:
        raise ValueError(f"--h-num must be at least 2, got {h_num}")
    if n_random < 0 or batch_size < 1 or floor_factor < 0:
        raise ValueError("--directions and --floor-factor must be >= 0, --batch-size >= 1")
    if kink_policy is not None:
        parse_policy(kink_policy)
    if checkpoint is not None:
        given = [f"--{k.replace('_', '-')}" for k in _FROM_CHECKPOINT
                 if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise ValueError(f"{', '.join(given)} come(s) from the checkpoint; drop them with "
                             "--checkpoint")
        net, data, info, policy = _from_checkpoint(checkpoint, data_dir)
        kink_policy = kink_policy or policy
    else:
        if model not in nn.MODELS:
            raise ValueError(f"unknown model {model!r}; valid: {', '.join(nn.MODELS)}")
        data = load_dataset(dataset, data_dir)
        opts = {"batch_norm": batch_norm}
        if model == "mlp" and widths is not None:
            opts["widths"] = widths
        net = nn.build_model(model, data.input_shape, data.num_classes, seed=seed,
                             dtype="float64", **opts)
        info = {"source": "initialisation", "dataset": data.name, "model": model,
                "model_options": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in opts.items()}}
    n = len(data.x_train)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(batch_size, n), replace=False))
    x, y = data.x_train[idx], data.y_train[idx]
    hs = np.logspace(np.log10(h_min), np.log10(h_max), h_num)
    return net, x, y, info, {"precision": names, "n_random": n_random, "hs": hs, "seed": seed,
                             "kink_policy": kink_policy or "pytorch",
                             "floor_factor": floor_factor}


def _from_checkpoint(path, data_dir):
    from ..checkpoint import load_checkpoint
    from ..train import TrainConfig, build

    meta, groups = load_checkpoint(path)
    if meta.get("kind") != "kinkprop-train" or "model" not in groups:
        raise ValueError(f"{path}: not a kinkprop training checkpoint")
    config = TrainConfig.from_json(meta["config"])
    if data_dir is not None:
        config.data_dir = data_dir
    config.validate()
    data = load_dataset(config.dataset, config.data_dir)
    _, net, _, _ = build(config, dataset=data)
    net.load_state_dict(groups["model"])
    info = {"source": f"checkpoint {path} (epoch {meta.get('epoch')})", "dataset": data.name,
            "model": config.model, "checkpoint": str(path),
            "trained_precision": config.precision}
    return net, data, info, config.kink_policy


def write_outputs(out: Path, result) -> dict:
    """``audit.json``, ``audit.csv`` and ``audit.png`` in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "audit.json", "csv": out / "audit.csv", "plot": out / "audit.png"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result.rows[0]))
        w.writeheader()
        w.writerows(result.rows)
    result.plot(paths["plot"])
    return {k: str(v) for k, v in paths.items()}
