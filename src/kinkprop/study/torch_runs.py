"""The study's ``training`` and ``volume`` protocols on PyTorch models (``kinkprop study --engine
torch --device cpu|cuda``), through :mod:`kinkprop.torch`.

Each function takes a run config (see :meth:`kinkprop.study.runner.StudySpec.runs`) and returns
``(result, epochs, sites)`` with the same keys as the NumPy engine's, so the results database and
the report are shared. The ``audit`` protocol is NumPy-only.

What is the same as the NumPy engine: the data (``kinkprop.data.load_dataset``, moved to the
device once), the minibatch order (``kinkprop.data.DataLoader(seed=seed)``'s permutations), the
optimizer and its hyperparameters, the policies (parsed by ``kinkprop.kinks.parse_policy``; the
baseline is ``relu=0``), the per-epoch rows and the result keys.

What differs, by design:

- **initialisation**: ``torch.manual_seed(seed)`` and torch's default initialisation (the same
  distributions as the NumPy engine's, different draws), built on the CPU and then moved, so a
  seed gives the same initial weights on every device;
- **models**: ``mlp`` is :class:`kinkprop.torch.models.MLP` (no bias before batch-norm);
  ``convnet`` and ``lenet`` are torch ports of :mod:`kinkprop.nn.models`' architectures with the
  same layer sequence (signals such as MNIST-1D run as images of height 1 with ``(1, k)``
  kernels, as there), so site names (``"2:relu"``) match; ``vgg`` and ``resnet18`` (images only)
  are :class:`kinkprop.torch.models.VGG` and :func:`~kinkprop.torch.models.resnet18` (CIFAR stem);
- **precision**: ``fp64`` / ``fp32`` / ``bf16`` / ``fp16`` are torch dtypes for the parameters
  and activations, with torch's own arithmetic (16-bit matmul and convolution accumulate in float32
  on CPU and GPU; there is no per-primitive rounding contract). ``fp16`` on the CPU is allowed but
  slow and warned about; ``fp8-*`` is refused (torch has no float8 training arithmetic). On CUDA,
  fp32 matmuls and convolutions run in IEEE fp32 (TF32 off) and cuDNN is deterministic while a
  run lasts;
- **census**: :func:`kinkprop.torch.census` counts exact hits per site (``evaluated``, ``hits``);
  it has no ``effective`` count, which is stored as NULL;
- **changed steps**: torch fixes the kink choices at forward time, so the baseline gradient comes
  from a second forward + backward under ``relu=0``, run only on steps whose census shows a kink
  hit, with the model's buffers (batch-norm running statistics) saved and restored around it;
- **evaluation loss** is computed in float32 from the model's logits.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import numpy as np

from .runner import BASELINE, _dataset

#: precision name -> torch dtype name (looked up on torch when a run starts)
DTYPES = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: model names the torch engine builds (see the module docstring)
MODEL_NAMES = ("mlp", "convnet", "lenet", "vgg", "resnet18")
PROTOCOLS = ("volume", "training")
INSTALL_HINT = "pip install 'kinkprop[torch]'"
_WARNED: set = set()


# -- checks ---------------------------------------------------------------------------------------


def require_torch():
    """Import torch, or raise an ImportError naming the extra to install."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"the torch engine needs PyTorch ({e}); install it with "
                          f"{INSTALL_HINT}") from None
    return torch


def check_device(device: str) -> None:
    """Raise a ValueError when ``device`` cannot run (e.g. cuda without a CUDA build or GPU)."""
    torch = require_torch()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e}); valid: cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = torch.version.cuda
            why = (f"this torch build ({torch.__version__}) has no CUDA support" if build is None
                   else f"torch {torch.__version__} (CUDA {build}) finds no usable GPU")
            raise ValueError(f"--device {device}: CUDA is not available: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                             "device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; valid: cpu, cuda, cuda:N")


def check_precision(precision: str) -> None:
    if precision.startswith("fp8"):
        raise ValueError(f"precision {precision!r} is not supported by the torch engine (torch "
                         "has no float8 training arithmetic: matmul and convolution are not "
                         "implemented for float8 tensors); use --engine numpy, which emulates it")
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r} for the torch engine; valid: "
                         f"{', '.join(DTYPES)}")


def check_policy(text: str):
    from ..kinks.policy import parse_policy
    from ..kinks.spec import _is_replace

    policy = parse_policy(text)
    for key, value in policy.values.items():
        if _is_replace(value):
            raise ValueError(f"policy {text!r}: {key}=replace:... (the 2021 paper's gradient "
                             "replacement) is NumPy-only; the torch engine supports numbers, "
                             "left/right, tie rules and 'directional'")
    return policy


def check_spec(spec) -> list[str]:
    """Validate a study for the torch engine before any run starts; returns notes to show the
    user (fp16 on the CPU is slow). Raises ValueError, or ImportError without torch. (The
    runner notes that the audit protocol is skipped.)"""
    require_torch()
    check_device(spec.device)
    notes = []
    for prec in spec.precisions:
        check_precision(prec)
    for pol in spec.policies:
        check_policy(pol)
    for model, _ in spec.models:
        if model not in MODEL_NAMES:
            raise ValueError(f"unknown model {model!r} for the torch engine; valid: "
                             f"{', '.join(MODEL_NAMES)}")
    if "fp16" in spec.precisions and spec.device == "cpu":
        notes.append("fp16 on the CPU: torch computes float16 matmuls there, but slowly")
    return notes


# -- models ---------------------------------------------------------------------------------------


def build_model(name: str, input_shape, num_classes: int, batch_norm: bool, opts: dict):
    """A torch model by study name (see the module docstring); call after seeding."""
    from ..torch import models as tm

    opts = dict(opts or {})
    input_shape = tuple(input_shape)
    if name == "mlp":
        return tm.MLP(int(np.prod(input_shape)), num_classes,
                      widths=tuple(opts.get("widths", (256, 128, 100))), batch_norm=batch_norm)
    if name in ("convnet", "lenet"):
        return _port(name, input_shape, num_classes, batch_norm, opts)
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs image inputs (C, H, W), got {input_shape}")
    if name == "vgg":
        return tm.VGG(input_shape[0], num_classes, channels=tuple(opts.get("channels",
                                                                             (32, 64, 128))),
                      convs_per_stage=opts.get("convs_per_stage", 2), batch_norm=batch_norm)
    if name == "resnet18":
        return tm.resnet18(num_classes, batch_norm=batch_norm, stem=opts.get("stem", "cifar"),
                           width=opts.get("width", 64), in_channels=input_shape[0])
    raise ValueError(f"unknown model {name!r} for the torch engine; valid: "
                     f"{', '.join(MODEL_NAMES)}")


def _port(name, input_shape, num_classes, batch_norm, opts):
    """``kinkprop.nn.models.convnet`` / ``lenet``, layer for layer, in torch."""
    import torch
    import torch.nn as tnn

    if len(input_shape) == 3:
        c, is_1d = input_shape[0], False
        layers: list = []
    elif len(input_shape) == 2:
        c, is_1d = input_shape[0], True
        layers = [tnn.Unflatten(1, (c, 1))]  # (N, C, L) -> (N, C, 1, L), as nn.models' Reshape
    else:
        raise ValueError(f"conv models need (C, H, W) or (C, L) inputs, got {input_shape}")

    def conv(cin, cout, k, pad):
        return tnn.Conv2d(cin, cout, (1, k) if is_1d else k, padding=(0, pad) if is_1d else pad)

    pool = (1, 2) if is_1d else 2
    if name == "convnet":
        for out in opts.get("channels", (32, 64)):
            layers.append(conv(c, out, 3, 1))
            layers += [tnn.BatchNorm2d(out)] if batch_norm else []
            layers += [tnn.ReLU(), tnn.MaxPool2d(pool)]
            c = out
        head = [(opts.get("hidden", 128), batch_norm)]
    else:  # lenet
        layers += [conv(c, 6, 5, 2)] + ([tnn.BatchNorm2d(6)] if batch_norm else [])
        layers += [tnn.ReLU(), tnn.MaxPool2d(pool), conv(6, 16, 5, 0)]
        layers += [tnn.BatchNorm2d(16)] if batch_norm else []
        layers += [tnn.ReLU(), tnn.MaxPool2d(pool)]
        head = [(120, False), (84, False)]
    layers.append(tnn.Flatten())
    probe = tnn.Sequential(*layers).eval()
    with torch.no_grad():
        n = probe(torch.zeros(1, *input_shape)).shape[1]
    for width, bn in head:
        layers.append(tnn.Linear(n, width))
        layers += [tnn.BatchNorm1d(width)] if bn else []
        layers.append(tnn.ReLU())
        n = width
    layers.append(tnn.Linear(n, num_classes))
    return tnn.Sequential(*layers)


def first_weight(model):
    """The first parameterised layer's weight (name, tensor), as the NumPy engine's volume."""
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.ndim >= 2:
            return name, p
    raise ValueError("model has no weight matrix")


# -- shared pieces --------------------------------------------------------------------------------


class _Setup:
    """Device, dtype, data on the device, a seeded model and the minibatch order of one run."""

    def __init__(self, config, data=None, model=None):
        torch = require_torch()
        self.torch = torch
        check_precision(config["precision"])
        check_device(config.get("device", "cpu"))
        self.notes: list[str] = []
        self.device = torch.device(config.get("device", "cpu"))
        self.dtype = getattr(torch, DTYPES[config["precision"]])
        if self.dtype == torch.float16 and self.device.type == "cpu":
            msg = "fp16 on the CPU: torch computes float16 matmuls there, but slowly"
            if not _WARNED:  # once per process (each worker would repeat it per run)
                _WARNED.add(msg)
                warnings.warn(msg, stacklevel=3)
            self.notes.append(msg)
        data = data if data is not None else _dataset(config["dataset"], config["data_dir"])
        self.data = data
        torch.manual_seed(config["seed"])
        if model is None:
            model = build_model(config["model"], data.input_shape, data.num_classes,
                                config["batch_norm"], config.get("model_opts"))
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.model.train()
        self.x_train = torch.as_tensor(data.x_train).to(self.device, self.dtype)
        self.y_train = torch.as_tensor(data.y_train, dtype=torch.int64).to(self.device)
        self.x_test = torch.as_tensor(data.x_test).to(self.device, self.dtype)
        self.y_test = torch.as_tensor(data.y_test, dtype=torch.int64).to(self.device)
        from ..data import DataLoader

        n = len(data.x_train)
        # the NumPy engine's order: the same loader over indices draws the same permutations
        self.order = DataLoader(np.arange(n), np.arange(n), config["batch_size"], shuffle=True,
                                seed=config["seed"])

    def batches(self):
        for idx, _ in self.order:
            i = self.torch.as_tensor(idx, device=self.device)
            yield self.x_train[i], self.y_train[i]


@contextlib.contextmanager
def _backend(device):
    """On CUDA: IEEE fp32 (no TF32) and deterministic cuDNN for the run; restored after."""
    import torch

    if device.type != "cuda":
        yield
        return
    saved = {}
    settings = [(torch.backends.cudnn, "deterministic", True),
                (torch.backends.cudnn, "benchmark", False),
                (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
                (torch.backends.cudnn.conv, "fp32_precision", "ieee")]
    for obj, name, value in settings:
        try:
            saved[(obj, name)] = getattr(obj, name)
            setattr(obj, name, value)
        except (AttributeError, RuntimeError):  # an older torch: the legacy flags
            pass
    try:
        yield
    finally:
        for (obj, name), value in saved.items():
            with contextlib.suppress(AttributeError, RuntimeError):
                setattr(obj, name, value)


@contextlib.contextmanager
def _buffers_kept(model):
    """Restore the model's buffers (batch-norm running statistics) on exit."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        import torch

        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


def _policy_scope(policy, model, seed):
    import kinkprop.torch as kpt

    if policy.uses_directional:
        return kpt.kink_policy(policy, model=model, seed=seed)
    return kpt.kink_policy(policy)


def _loss(model, x, y):
    import torch.nn.functional as F

    logits = model(x)
    return F.cross_entropy(logits, y), logits


def _evaluate(setup, batch_size: int = 1000) -> dict:
    import torch
    import torch.nn.functional as F

    model = setup.model
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=setup.device)
    correct = torch.zeros((), dtype=torch.int64, device=setup.device)
    n = len(setup.x_test)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            xb, yb = setup.x_test[i:i + batch_size], setup.y_test[i:i + batch_size]
            logits = model(xb)
            total += F.cross_entropy(logits.float(), yb, reduction="sum").double()
            correct += (logits.argmax(dim=1) == yb).sum()
    model.train()
    return {"loss": total.item() / n, "acc": correct.item() / n}


def _fold_sites(totals: dict, reading) -> None:
    for name, s in reading.sites.items():
        t = totals.setdefault(name, {"primitive": s.primitive, "evaluated": 0, "hits": 0,
                                     "steps_hit": 0, "detail": {}})
        t["evaluated"] += s.evaluated
        t["hits"] += s.hits
        t["steps_hit"] += s.hits > 0
        for k, v in s.detail.items():
            t["detail"][k] = t["detail"].get(k, 0) + v


# -- the protocols --------------------------------------------------------------------------------


def training(config, data=None, model=None):
    """Train with the run's policy; per epoch: test accuracy and loss, kink hits per site, the
    steps whose gradient the policy changed (vs ``relu=0``), divergence."""
    import kinkprop.torch as kpt

    from ..kinks.policy import parse_policy

    setup = _Setup(config, data, model)
    torch, model = setup.torch, setup.model
    policy = check_policy(config["policy"])
    compare = None if config["policy"] == BASELINE else parse_policy(BASELINE)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(config, params)
    history, diverged = [], None
    with _backend(setup.device), kpt.census(model) as census, \
            _policy_scope(policy, model, config["seed"]) as scope:
        for epoch in range(1, config["epochs"] + 1):
            t0 = time.perf_counter()
            sites: dict = {}
            loss_sum, n_seen, changed, steps = 0.0, 0, 0, 0
            correct = torch.zeros((), dtype=torch.int64, device=setup.device)
            directional = ({"steps_swept": 0, "kinks": 0, "resolved": 0, "unresolved": 0,
                            "immaterial": 0, "directions": 0}
                           if scope.directional is not None else None)
            try:
                for xb, yb in setup.batches():
                    optimizer.zero_grad(set_to_none=True)
                    census.reset()
                    loss, logits = _loss(model, xb, yb)
                    value = loss.item()
                    if not math.isfinite(value):
                        raise FloatingPointError(
                            f"non-finite loss ({value}) at epoch {epoch}, step {steps + 1}; "
                            "training stopped. Lower the learning rate or use a wider precision")
                    loss.backward()
                    census.step()
                    reading = census.read()
                    _fold_sites(sites, reading)
                    if directional is not None and reading.hits:  # no hit: nothing swept
                        _fold_directional(directional, scope.report(warn=False))
                    if compare is not None and reading.hits:
                        changed += _differs_from_baseline(model, params, xb, yb, compare, scope)
                    optimizer.step()
                    steps += 1
                    loss_sum += value * len(xb)
                    n_seen += len(xb)
                    correct += (logits.detach().argmax(dim=1) == yb).sum()
            except FloatingPointError as e:
                diverged = str(e)
                break
            seconds = time.perf_counter() - t0
            test = _evaluate(setup)
            history.append({
                "epoch": epoch, "train_loss": loss_sum / max(n_seen, 1),
                "train_acc": correct.item() / max(n_seen, 1), "test_loss": test["loss"],
                "test_acc": test["acc"], "seconds": seconds, "lr": config["lr"],
                "kinks": sites, "steps": steps,
                "changed_steps": changed if compare is not None else None,
                "directional": directional})
    epochs, site_rows = [], []
    for rec in history:
        epochs.append({**{k: v for k, v in rec.items() if k not in ("kinks", "directional")},
                       "kink_hits": sum(s["hits"] for s in rec["kinks"].values()),
                       "effective": None})
        site_rows += [{"epoch": rec["epoch"], "site": name, "evaluated": s["evaluated"],
                       "hits": s["hits"], "effective": None} for name, s in rec["kinks"].items()]
    last = history[-1] if history else {}
    result = {"final_test_acc": last.get("test_acc"), "final_test_loss": last.get("test_loss"),
              "diverged": diverged, "epochs_done": len(history),
              "changed_steps": sum(r["changed_steps"] or 0 for r in history),
              "steps": sum(r["steps"] for r in history),
              "directional": [r["directional"] for r in history],
              "engine": "torch", "device": str(setup.device), "torch": torch.__version__,
              "notes": setup.notes}
    return result, epochs, site_rows


def _optimizer(config, params):
    import torch

    name = config["optimizer"]
    wd = config.get("weight_decay", 0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=config["lr"], momentum=config.get("momentum", 0.0),
                               nesterov=config.get("nesterov", False), weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=config["lr"], weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config["lr"], weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adam, adamw")


def _fold_directional(tot, report) -> None:
    if not report.swept:
        return
    tot["steps_swept"] += 1
    for k in ("kinks", "resolved", "unresolved", "immaterial", "directions"):
        tot[k] += getattr(report, k, 0) or 0


def _differs_from_baseline(model, params, xb, yb, baseline, scope) -> bool:
    """Does the gradient now in ``params[i].grad`` differ from the baseline policy's on the same
    batch? A second forward + backward, the buffers kept, the directional driver (if any) off."""
    import torch

    import kinkprop.torch as kpt

    driver = scope.directional
    if driver is not None:
        driver.detach()
    try:
        with _buffers_kept(model), kpt.kink_policy(baseline):
            loss, _ = _loss(model, xb, yb)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        if driver is not None:
            driver.attach()
    for p, g in zip(params, grads):
        a = p.grad if p.grad is not None else torch.zeros_like(p)
        b = g if g is not None else torch.zeros_like(p)
        if not torch.equal(a, b):
            return True
    return False


def volume(config, data=None, model=None):
    """The bifurcation volume for one initialisation (``seed``): one pass over the data, lr = 0;
    on each minibatch the first layer's weight gradient under ``relu=0`` and, when the census
    shows a kink hit, under the run's policy (``directional``: a direction drawn with seed
    ``seed + batch index``); the run is "in S" when they differ on some batch."""
    import torch

    import kinkprop.torch as kpt

    from ..kinks.policy import parse_policy

    setup = _Setup(config, data, model)
    model = setup.model
    policy = check_policy(config["policy"])
    baseline = parse_policy(BASELINE)
    _, weight = first_weight(model)
    max_batches = config.get("max_batches")
    first = None
    batches = second = relu_calls = relu_zeros = 0
    per_layer: dict = {}
    with _backend(setup.device), kpt.census(model) as census:
        for b, (xb, yb) in enumerate(setup.batches()):
            if max_batches is not None and b >= max_batches:
                break
            census.reset()
            with kpt.kink_policy(baseline):
                loss, _ = _loss(model, xb, yb)
            (ga,) = torch.autograd.grad(loss, [weight])
            census.step()
            reading = census.read()
            batches += 1
            for name, s in reading.sites.items():
                per_layer[name] = per_layer.get(name, 0) + s.hits
                if s.primitive == "relu":
                    relu_calls += s.evaluated
                    relu_zeros += s.hits
            if not reading.hits:
                continue
            second += 1
            with _buffers_kept(model), _policy_scope(policy, model, config["seed"] + b):
                loss, _ = _loss(model, xb, yb)
                (gb,) = torch.autograd.grad(loss, [weight])
            if first is None and not torch.equal(ga, gb):
                first = b
    result = {"in_s": first is not None, "first_batch": first, "relu_calls": relu_calls,
              "relu_zeros": relu_zeros, "batches": batches, "second_backwards": second,
              "per_layer_hits": per_layer, "engine": "torch", "device": str(setup.device),
              "notes": setup.notes}
    return result, [], []


RUNS = {"training": training, "volume": volume}


def execute(config: dict):
    """``(result, epochs, sites)`` of one torch-engine run (called by the runner's ``execute``)."""
    fn = RUNS.get(config["protocol"])
    if fn is None:
        raise ValueError(f"protocol {config['protocol']!r} is NumPy-only; the torch engine runs "
                         f"{', '.join(PROTOCOLS)}")
    return fn(config)
