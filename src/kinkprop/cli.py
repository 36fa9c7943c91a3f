"""``kinkprop`` command line (click)."""

from __future__ import annotations

import json
import sys

import click

from .precision import PRECISIONS


class _Error(click.ClickException):
    def show(self, file=None):
        click.echo(f"kinkprop: error: {self.message}", err=True)


def _fail(e: Exception):
    raise _Error(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kinkprop")
def main():
    """Backpropagation through non-smooth networks, every kink an explicit, recorded choice."""


@main.command()
def conventions():
    """Print the table of non-smooth primitives x framework presets (from the registry)."""
    from .kinks import conventions as table

    table()


@main.command()
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default=200, show_default=True)
def demo(seed, steps):
    """Train a tiny ReLU network with backprop and print loss and gradient facts."""
    from .demo import run_demo

    run_demo(seed=seed, steps=steps)


def _csv_ints(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@main.command()
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, mnist1d, digits, mnist, kmnist")
@click.option("--data-dir", default=None, help="directory of IDX files (fashion-mnist / mnist / "
              "kmnist), or the cache directory for mnist1d")
@click.option("--model", default="mlp", show_default=True, help="mlp, lenet, convnet")
@click.option("--widths", default=None, callback=_csv_ints,
              help="hidden widths of the mlp, e.g. 256,128,100")
@click.option("--batch-norm/--no-batch-norm", default=False, show_default=True)
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--optimizer", default="sgd", show_default=True, help="sgd, adam, adamw")
@click.option("--lr", default=0.1, show_default=True)
@click.option("--momentum", default=0.0, show_default=True)
@click.option("--nesterov/--no-nesterov", default=False)
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--schedule", default="none", show_default=True, help="none, step, cosine")
@click.option("--precision", default="fp32", show_default=True,
              help=", ".join(PRECISIONS))
@click.option("--kink-policy", default="pytorch", show_default=True,
              help="a preset (pytorch, pytorch-2.14, jax, tensorflow, directional) and/or "
                   "overrides, e.g. 'relu=1.0' or 'jax,max_pool2d=split'")
@click.option("--seed", default=0, show_default=True)
@click.option("--census", "census_level", default="off", show_default=True,
              help="count kink hits per layer per epoch: off, exact, ambiguous")
@click.option("--train-subset", default=None, type=int, help="use only the first N training "
              "samples")
@click.option("--test-subset", default=None, type=int)
@click.option("--out", default=None, help="run directory: config, metrics.jsonl, checkpoint, "
              "summary")
@click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint")
@click.option("--force", is_flag=True, help="overwrite an existing run in --out")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: on a TTY)")
def train(widths, out, resume, force, progress, census_level, **options):
    """Train a model on a dataset and report per-epoch metrics."""
    from .data import DataError
    from .train import TrainConfig, Trainer, TrainingError

    options["census"] = census_level
    if widths is not None:
        options["widths"] = widths
    if resume and force:
        _fail(ValueError("--resume and --force exclude each other"))
    if resume and out is None:
        _fail(ValueError("--resume needs --out DIR"))
    try:
        config = TrainConfig(**options)
        trainer = Trainer(config, out=out, resume=resume, force=force, progress=progress)
        summary = trainer.run()
    except KeyboardInterrupt as e:
        click.echo(f"kinkprop: {e}" if str(e) else "kinkprop: interrupted", err=True)
        sys.exit(130)
    except (ValueError, FileExistsError, DataError, TrainingError) as e:
        _fail(e)
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


@main.command(name="census")
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--data-dir", default=None)
@click.option("--model", default="mlp", show_default=True)
@click.option("--widths", default="512,512", show_default=True, callback=_csv_ints)
@click.option("--precisions", default="fp64,fp32,bf16,fp16", show_default=True)
@click.option("--inits", default=10, show_default=True, help="random initialisations (R)")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--max-batches", default=None, type=int, help="cap the pass at N minibatches")
@click.option("--policy-a", default="pytorch,relu=0", show_default=True)
@click.option("--policy-b", default="pytorch,relu=1", show_default=True)
@click.option("--epochs", default=2, show_default=True, help="epochs of the training census "
              "(0: skip it)")
@click.option("--lr", default=0.05, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="runs/census", show_default=True)
def census_cmd(dataset, data_dir, model, widths, precisions, inits, batch_size, max_batches,
               policy_a, policy_b, epochs, lr, seed, out):
    """How often does training land on a kink? Bifurcation volume and training census."""
    from pathlib import Path

    from .data import DataError, load_dataset
    from .kinks.policy import parse_policy
    from .study import census as cs
    from .train import TrainConfig

    try:
        names = cs.parse_precisions(precisions)
        parse_policy(policy_a), parse_policy(policy_b)
        data = load_dataset(dataset, data_dir)
    except (ValueError, DataError) as e:
        _fail(e)
    opts = {"widths": widths} if model == "mlp" else {}
    volume, training = [], []
    for prec in names:
        click.echo(f"[{prec}] bifurcation volume: {inits} initialisations, one pass ...", err=True)
        volume.append(cs.bifurcation_volume(data, model, prec, inits, batch_size, policy_a,
                                            policy_b, max_batches, seed, opts))
        if epochs:
            click.echo(f"[{prec}] training census: {epochs} epoch(s) ...", err=True)
            config = TrainConfig(dataset=dataset, data_dir=data_dir, model=model,
                                 widths=widths or (), epochs=epochs, batch_size=batch_size,
                                 lr=lr, momentum=0.9, precision=prec, seed=seed)
            training += cs.training_census(data, config, log=lambda m: None)
    click.echo("Bifurcation volume (share of initialisations whose first-layer gradients differ "
               f"between {policy_a} and {policy_b}):")
    click.echo(cs.volume_table(volume))
    if training:
        click.echo("\nTraining census (exact kink hits per layer per epoch):")
        click.echo(cs.training_table(training))
    paths = cs.write_outputs(Path(out), volume, training)
    click.echo("\nwrote " + ", ".join(paths.values()))


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@main.command()
@click.option("--preset", default="quick", show_default=True,
              help="quick (MNIST-1D, about 3 minutes on 2 cores) or fashion-mnist (the full grid)")
@click.option("--spec", "spec_file", default=None,
              help="a JSON file of StudySpec fields (name, dataset, models, precisions, policies, "
                   "batch_norm, optimizers, seeds, epochs, ...) overriding the preset")
@click.option("--db", default=None, help="results database [default: runs/study-NAME/results.db, "
              "runs/study-NAME-torch/results.db with --engine torch]")
@click.option("--workers", default=2, show_default=True)
@click.option("--engine", default=None, help="numpy (kinkprop's engine, the default) or torch "
              "(PyTorch models under kinkprop.torch; the volume and training protocols)")
@click.option("--device", default=None, help="--engine torch: cpu (the default), cuda or cuda:N")
@click.option("--data-dir", default=None)
@click.option("--precisions", default=None, help="override, e.g. fp64,fp32,bf16,fp16")
@click.option("--policies", default=None, help="override, e.g. relu=0,relu=0.5,relu=1,directional,"
              "relu=replace:1 (the last: the 2021 paper's code, which replaces the gradient)")
@click.option("--seeds", default=None, type=int, help="number of seeds (training)")
@click.option("--volume-seeds", default=None, type=int, help="initialisations (bifurcation volume)")
@click.option("--epochs", default=None, type=int)
@click.option("--protocols", default=None, help="override: volume,training,audit")
@click.option("--progress/--no-progress", default=None)
def study(preset, spec_file, db, workers, engine, device, data_dir, precisions, policies, seeds,
          volume_seeds, epochs, protocols, progress):
    """Does the choice of ReLU'(0) matter? Run a study grid, store it, report it (the main job)."""
    import copy
    import sys
    from pathlib import Path

    from .kinks.policy import parse_policy
    from .precision import PRECISIONS
    from .study.report import write_report
    from .study.runner import ENGINES, PRESETS, run_study

    if preset not in PRESETS:
        _fail(ValueError(f"unknown study preset {preset!r}; valid: {', '.join(PRESETS)}"))
    spec = copy.deepcopy(PRESETS[preset])
    try:
        if spec_file:
            import dataclasses
            import json

            fields = json.loads(Path(spec_file).read_text())
            known = {f.name for f in dataclasses.fields(spec)}
            unknown = set(fields) - known
            if unknown:
                raise ValueError(f"{spec_file}: unknown study fields {sorted(unknown)}; valid: "
                                 f"{sorted(known)}")
            spec = dataclasses.replace(spec, **fields)
        if precisions:
            spec.precisions = _csv(precisions)
            bad = [p for p in spec.precisions if p not in PRECISIONS]
            if bad:
                raise ValueError(f"unknown precision(s) {bad}; valid: {', '.join(PRECISIONS)}")
        if policies:
            spec.policies = _csv(policies)
            for p in spec.policies:
                parse_policy(p)
        if protocols:
            spec.protocols = _csv(protocols)
            bad = [p for p in spec.protocols if p not in ("volume", "training", "audit")]
            if bad:
                raise ValueError(f"unknown protocol(s) {bad}; valid: volume, training, audit")
        if seeds is not None:
            spec.seeds = list(range(seeds))
        if volume_seeds is not None:
            spec.volume_seeds = volume_seeds
        if epochs is not None:
            spec.epochs = epochs
        if data_dir is not None:
            spec.data_dir = data_dir
        if workers < 1:
            raise ValueError("--workers must be >= 1")
        if engine is not None:
            spec.engine = engine
        if device is not None:
            spec.device = device
        if spec.engine not in ENGINES:
            raise ValueError(f"unknown engine {spec.engine!r}; valid: {', '.join(ENGINES)}")
        if spec.engine == "numpy" and spec.device != "cpu":
            raise ValueError(f"--device {spec.device}: the numpy engine runs on the CPU; use "
                             "--engine torch for another device")
        if spec.engine == "torch":
            from .study.torch_runs import check_spec

            for note in check_spec(spec):
                click.echo(f"note: {note}", err=True)
        from .data import load_dataset

        load_dataset(spec.dataset, spec.data_dir)  # fail now, not in every worker
    except Exception as e:  # noqa: BLE001 - every bad input becomes one clear message
        _fail(e)
    suffix = "" if spec.engine == "numpy" else f"-{spec.engine}"
    db = Path(db or f"runs/study-{spec.name}{suffix}/results.db")
    progress = sys.stderr.isatty() if progress is None else progress
    try:
        outcome = run_study(spec, db, workers=workers, progress=progress,
                            log=lambda m: click.echo(m, err=True))
    except KeyboardInterrupt:
        click.echo(f"kinkprop: interrupted; finished runs are saved in {db}; run the same command "
                   "to resume", err=True)
        sys.exit(130)
    except RuntimeError as e:
        _fail(e)
    report = write_report(db)
    click.echo("")
    click.echo("Why can ReLU networks be trained with backprop, and does ReLU'(0) matter? "
               f"({spec.dataset}, {outcome['runs']} runs"
               + ("" if spec.engine == "numpy" else f", {spec.engine} on {spec.device}") + ")")
    for line in report["summary"]:
        click.echo(line)
    if outcome["failed"]:
        click.echo(f"- {outcome['failed']} run(s) failed; see the runs table (status 'failed') "
                   f"in {db}; rerunning retries them.")
    click.echo("")
    click.echo("Report: " + report["paths"]["markdown"] + " (and " + report["paths"]["html"] + ")")
    plots = [v for k, v in report["paths"].items() if v.endswith(".png")]
    if plots:
        click.echo("Plots: " + ", ".join(plots))


@main.command()
@click.argument("db")
@click.option("--out", default=None, help="output directory [default: next to DB]")
def report(db, out):
    """Write a Markdown and HTML report (tables and plots) from a study database."""
    from .study.report import write_report

    try:
        result = write_report(db, out)
    except FileNotFoundError as e:
        _fail(e)
    for line in result["summary"]:
        click.echo(line)
    click.echo("wrote " + ", ".join(result["paths"].values()))


@main.command()
@click.argument("checkpoint")
@click.option("--data-dir", default=None)
@click.option("--batch-size", default=1000, show_default=True)
def evaluate(checkpoint, data_dir, batch_size):
    """Evaluate a training checkpoint on its dataset's test split."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(checkpoint, data_dir, batch_size)
    except (ValueError, CheckpointError, DataError, KeyError) as e:
        _fail(e)
    click.echo(json.dumps(result, indent=2))


from .study.audit import audit_cmd  # noqa: E402 - registered last, imports only click

main.add_command(audit_cmd)


if __name__ == "__main__":
    main()
