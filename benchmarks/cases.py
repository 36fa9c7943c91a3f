"""Benchmark cases for ``benchmarks/bench.py``: data, models, and one training step each.

Every case is a pair of zero-argument callables ``(a, b)`` that each run one full training step
(zero_grad, forward, loss, backward, optimizer step): ``a`` is kinkprop, ``b`` the reference —
PyTorch CPU eager running the same model with the same weights, or kinkprop itself in a baseline
configuration (float32, no census, the standard kink policy). Import this module only after the
thread-count environment variables are set (``bench.py`` does so).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import numpy as np

import kinkprop as kp
import kinkprop.nn as knn
from kinkprop.optim import SGD, Adam

BATCH = 128
IMAGE = (1, 28, 28)
CLASSES = 10
MLP_WIDTHS = (512, 512)  # MLP 784-512-512-10, as in REFERENCES.md section 6


# -- data --------------------------------------------------------------------------------------


def fashion_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images shaped like Fashion-MNIST's: (n, 1, 28, 28) float32 in [0, 1], quantised to k / 255,
    on a flat background of exact zeros with one textured object per image (flat patches in the
    object too), so conv outputs repeat the bias exactly and max-pool windows tie, as on the real
    data (REFERENCES.md section 7). Labels uniform in 0..9."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    x = np.zeros((n, 1, 28, 28), np.float32)
    chunk = 4096
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        cy = rng.uniform(11, 17, (m, 1, 1)).astype(np.float32)
        cx = rng.uniform(11, 17, (m, 1, 1)).astype(np.float32)
        ay = rng.uniform(8, 13, (m, 1, 1)).astype(np.float32)
        ax = rng.uniform(5, 12, (m, 1, 1)).astype(np.float32)
        inside = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0
        level = rng.uniform(0.3, 0.9, (m, 1, 1)).astype(np.float32)
        texture = rng.uniform(-0.25, 0.25, (m, 7, 7)).astype(np.float32)
        texture = np.repeat(np.repeat(texture, 4, axis=1), 4, axis=2)  # flat 4x4 patches
        img = np.clip(level + texture, 0.0, 1.0) * inside
        x[s:s + m, 0] = np.round(img * 255.0) / 255.0
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    return x, y


def batches(n_batches: int, seed: int = 0, dtype=np.float32):
    """A few fixed batches to cycle through (same data for both sides of a comparison)."""
    x, y = fashion_like(n_batches * BATCH, seed)
    x = x.astype(kp.precision.as_dtype(dtype)) if np.dtype(dtype) != np.float32 else x
    return [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
            for i in range(n_batches)]


# -- models ------------------------------------------------------------------------------------


def kp_model(name: str, dtype="float32", batch_norm: bool = False, seed: int = 0):
    opts = {"widths": MLP_WIDTHS} if name == "mlp" else {}
    return knn.build_model(name, IMAGE, CLASSES, seed=seed, dtype=dtype, batch_norm=batch_norm,
                           **opts)


def torch_twin(model, torch_dtype):
    """The same network in PyTorch, built layer by layer from a kinkprop ``Sequential`` and
    holding a copy of its weights, so both sides do the same arithmetic."""
    import torch

    from kinkprop.nn.models import Reshape

    nn = torch.nn
    layers = []
    for m in model.children():
        if isinstance(m, knn.Flatten):
            layers.append(nn.Flatten(m.start_dim))
        elif isinstance(m, knn.Linear):
            layers.append(nn.Linear(m.in_features, m.out_features, bias=m.bias is not None))
        elif isinstance(m, knn.Conv2d):
            o, i, kh, kw = m.weight.shape
            layers.append(nn.Conv2d(i, o, (kh, kw), stride=m.stride, padding=m.padding,
                                    bias=m.bias is not None))
        elif isinstance(m, knn.ReLU):
            layers.append(nn.ReLU())
        elif isinstance(m, knn.MaxPool2d):
            layers.append(nn.MaxPool2d(m.kernel_size, m.stride, m.padding))
        elif isinstance(m, knn.BatchNorm1d):
            layers.append(nn.BatchNorm1d(m.num_features, eps=m.eps, momentum=m.momentum))
        elif isinstance(m, knn.BatchNorm2d):
            layers.append(nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum))
        elif isinstance(m, Reshape):
            layers.append(nn.Unflatten(1, m.shape))
        else:
            raise TypeError(f"no PyTorch twin for {type(m).__name__}")
    tmodel = nn.Sequential(*layers).to(torch_dtype)
    kparams = list(model.named_parameters())
    tparams = list(tmodel.named_parameters())
    if len(kparams) != len(tparams):
        raise RuntimeError("kinkprop and PyTorch models differ in parameter count")
    with torch.no_grad():
        for (name, p), (tname, tp) in zip(kparams, tparams):
            if name != tname or p.shape != tuple(tp.shape):
                raise RuntimeError(f"parameter mismatch: {name} {p.shape} vs {tname} {tp.shape}")
            tp.copy_(torch.from_numpy(np.asarray(p.data, np.float64)).to(torch_dtype))
    return tmodel


# -- steps -------------------------------------------------------------------------------------


def _cycle(data):
    i = 0

    def take():
        nonlocal i
        b = data[i % len(data)]
        i += 1
        return b

    return take


def kp_step(model, optimizer, data, scope=None):
    """One kinkprop training step per call; ``scope()`` (a context manager factory) wraps it."""
    take = _cycle(data)

    def step():
        xb, yb = take()
        optimizer.zero_grad()
        loss = kp.cross_entropy(model(kp.Tensor(xb)), yb)
        loss.backward()
        optimizer.step()

    if scope is None:
        return step

    def scoped():
        with scope() as s:
            step()
            if hasattr(s, "step"):
                s.step()

    return scoped


def torch_step(tmodel, toptimizer, data):
    import torch

    tdata = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data]
    take = _cycle(tdata)
    ce = torch.nn.functional.cross_entropy

    def step():
        xb, yb = take()
        toptimizer.zero_grad(set_to_none=True)
        loss = ce(tmodel(xb), yb)
        loss.backward()
        toptimizer.step()

    return step


# -- the cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    description: str
    a_label: str
    b_label: str
    target: float | None
    build: object  # () -> (a, b, check) ; check() -> dict of facts after the timing (or None)
    quick: bool = True  # included in --quick
    notes: list = field(default_factory=list)


def _vs_torch(model_name, dtype, optimizer, batch_norm=False):
    def build():
        import torch

        tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        data = batches(4, dtype=dtype)
        m = kp_model(model_name, dtype, batch_norm)
        tm = torch_twin(m, tdtype)
        if optimizer == "sgd":
            opt, topt = SGD(m.parameters(), lr=0.1), torch.optim.SGD(tm.parameters(), lr=0.1)
        else:
            opt = Adam(m.parameters(), lr=1e-3)
            # foreach=False: PyTorch's default on CPU is the single-tensor loop too
            topt = torch.optim.Adam(tm.parameters(), lr=1e-3, foreach=False)
        return kp_step(m, opt, data), torch_step(tm, topt, data), None

    return build


def _low_precision(dtype):
    def build():
        data_lo, data32 = batches(4, dtype=dtype), batches(4)
        m_lo, m32 = kp_model("mlp", dtype), kp_model("mlp", "float32")
        return (kp_step(m_lo, SGD(m_lo.parameters(), lr=0.1), data_lo),
                kp_step(m32, SGD(m32.parameters(), lr=0.1), data32), None)

    return build


def census_scope():
    census = getattr(kp, "census", None)
    if census is None:
        return None
    try:
        census(level="exact")
    except TypeError:
        return census
    return lambda: census(level="exact")


def _census(model_name):
    def build():
        scope = census_scope()
        if scope is None:
            raise Skip("kp.census does not exist yet in this checkout")
        data = batches(4)
        m1, m2 = kp_model(model_name), kp_model(model_name)
        a = kp_step(m1, SGD(m1.parameters(), lr=0.1), data, scope=scope)
        b = kp_step(m2, SGD(m2.parameters(), lr=0.1), data)
        return a, b, None

    return build


def _directional(model_name, **options):
    def build():
        from kinkprop.kinks import directional

        data = batches(4)
        m1, m2 = kp_model(model_name), kp_model(model_name)
        reports = []

        @contextlib.contextmanager
        def scope():
            with kp.kink_policy("directional"), kp.directional_options(**options), \
                    warnings.catch_warnings():
                # tied relu zeros in max-pool windows stay tied along every direction
                warnings.simplefilter("ignore")
                yield None
            reports.append(directional.last_report)

        a = kp_step(m1, SGD(m1.parameters(), lr=0.1), data, scope=scope)
        b = kp_step(m2, SGD(m2.parameters(), lr=0.1), data)
        a()  # one step now: fail early if no kink was hit (the case would measure nothing)
        if not reports[-1].swept or reports[-1].kinks == 0:
            raise RuntimeError(f"directional step hit no kink: {reports[-1]}")

        def check():
            last = reports[-1]
            return {
                "steps": len(reports),
                "steps_swept": sum(r.swept for r in reports),
                "kinks_per_step": float(np.mean([r.kinks for r in reports])),
                "resolved_per_step": float(np.mean([r.resolved for r in reports])),
                "unresolved_per_step": float(np.mean([r.unresolved for r in reports])),
                "directions": last.directions,
                "sites_hit": f"{last.sites_hit}/{last.sites}",
            }

        return a, b, check

    return build


class Skip(Exception):
    """A case that cannot run in this checkout (the reason is reported, not an error)."""


CASES = [
    Case("mlp_sgd_f32", "MLP 784-512-512-10, batch 128, SGD step, float32", "kinkprop",
         "torch", 1.1, _vs_torch("mlp", "float32", "sgd")),
    Case("mlp_sgd_f64", "MLP 784-512-512-10, batch 128, SGD step, float64", "kinkprop",
         "torch", 1.1, _vs_torch("mlp", "float64", "sgd")),
    Case("mlp_adam_f32", "MLP 784-512-512-10, batch 128, Adam step, float32", "kinkprop",
         "torch", 1.1, _vs_torch("mlp", "float32", "adam")),
    Case("lenet_sgd_f32", "LeNet-5-like CNN, batch 128, SGD step, float32", "kinkprop",
         "torch", 1.5, _vs_torch("lenet", "float32", "sgd")),
    Case("convnet_bn_sgd_f32", "convnet (32, 64 ch, 3x3) with batch-norm, batch 128, SGD, "
         "float32", "kinkprop", "torch", None, _vs_torch("convnet", "float32", "sgd", True),
         quick=False),
    Case("mlp_bf16_vs_f32", "MLP step, bfloat16 storage (float32 compute) vs float32",
         "kp bf16", "kp f32", 1.5, _low_precision("bfloat16")),
    Case("mlp_f16_vs_f32", "MLP step, float16 storage (float32 compute) vs float32",
         "kp f16", "kp f32", 1.5, _low_precision("float16"), quick=False),
    Case("census_mlp", "MLP step inside kp.census(level='exact') vs without", "census",
         "plain", 1.05, _census("mlp")),
    Case("census_lenet", "LeNet step inside kp.census(level='exact') vs without", "census",
         "plain", 1.05, _census("lenet"), quick=False),
    Case("directional_lenet", "LeNet step, kink_policy('directional') vs the default policy, "
         "on data with max-pool ties", "directional", "standard", 1.5, _directional("lenet")),
    Case("directional_lenet_1d", "as directional_lenet with directional_options("
         "max_directions=1)", "direct. 1d", "standard", 1.5,
         _directional("lenet", max_directions=1), quick=False),
]
