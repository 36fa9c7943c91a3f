"""Where a kinkprop training step spends its time: per primitive (forward / VJP), the tape's own
Python work, casts and gradient accumulation, the optimizer, and the GEMM floor.

    python benchmarks/profile_step.py --model mlp --threads 1
    python benchmarks/profile_step.py --model lenet --threads 2 --cprofile 30
    python benchmarks/profile_step.py --model lenet --policy directional

Thread counts are set in the environment before NumPy is imported. Timers wrap every primitive
record's ``forward`` and ``vjp`` (and ``jvp``, for the directional policy's tangent sweep), plus
``Tensor._accumulate``, the optimizer step and the directional resolution; what is left of the
un-instrumented step time is the tape's per-node Python (apply, Node, toposort, the sweep loop,
cotangent sums) and the module / layer code. Timer overhead (~1 us per call) is reported.
"""

from __future__ import annotations

import argparse
import os
import sys

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _early_threads():
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"


_THREADS = _early_threads()
for _v in THREAD_VARS:
    os.environ[_v] = _THREADS
for _v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(_v, None)  # see bench.py; only affects BLAS if unset before numpy loads

import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases  # noqa: E402

import kinkprop as kp  # noqa: E402
from kinkprop.optim import SGD, Adam  # noqa: E402
from kinkprop.primitives.core import PRIMITIVES  # noqa: E402
from kinkprop.tensor import Tensor  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
#: the clock: this thread's CPU time by default, so time this process spends descheduled on a busy
#: machine is not charged to whatever function was running (with one BLAS thread all the work
#: runs on this thread); ``--clock wall`` for several threads
CLOCK = time.thread_time


def _timed(fn, key):
    def wrapper(*args, **kwargs):
        t0 = CLOCK()
        try:
            return fn(*args, **kwargs)
        finally:
            rec = TIMES[key]
            rec[0] += CLOCK() - t0
            rec[1] += 1

    wrapper.__wrapped__ = fn
    return wrapper


def instrument(optimizer):
    """Wrap the primitive records and the other pieces of a step in timers (in place)."""
    undo = []
    for name, prim in PRIMITIVES.items():
        for rule in ("forward", "vjp", "jvp"):
            fn = getattr(prim, rule)
            object.__setattr__(prim, rule, _timed(fn, f"{name}.{rule}"))
            undo.append((prim, rule, fn))
    acc = Tensor._accumulate
    Tensor._accumulate = _timed(acc, "Tensor._accumulate (leaf grad copy/add)")
    step = optimizer.step
    optimizer.step = _timed(step, "optimizer.step")
    from kinkprop import tape
    from kinkprop.kinks import directional

    topo = tape.toposort
    tape.toposort = _timed(topo, "tape.toposort")
    res = directional.resolve_if_needed
    directional.resolve_if_needed = _timed(res, "directional.resolve_if_needed (total)")

    census_undo = []
    try:
        from kinkprop.kinks.census import Census

        for meth in ("on_kink", "on_kink_backward", "on_apply"):
            if hasattr(Census, meth):
                fn = getattr(Census, meth)
                setattr(Census, meth, _timed(fn, f"census.{meth}"))
                census_undo.append((meth, fn))
    except ImportError:
        Census = None

    def restore():
        for meth, fn in census_undo:
            setattr(Census, meth, fn)
        for prim, rule, fn in undo:
            object.__setattr__(prim, rule, fn)
        Tensor._accumulate = acc
        optimizer.step = step
        tape.toposort = topo
        directional.resolve_if_needed = res

    return restore


def make_step(model_name, dtype, optimizer, policy, batch_norm, census=None):
    data = cases.batches(4, dtype=dtype)
    model = cases.kp_model(model_name, dtype, batch_norm)
    opt = (SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else Adam(model.parameters(), lr=1e-3))
    scope = None
    if census:
        if not hasattr(kp, "census"):
            raise SystemExit("kp.census does not exist in this checkout")
        scope = lambda: kp.census(level=census)  # noqa: E731
    step = cases.kp_step(model, opt, data, scope=scope)
    if policy is None:
        return step, opt

    def scoped():
        with kp.kink_policy(policy), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step()

    return scoped, opt


def time_steps(step, n):
    ts = []
    for _ in range(n):
        t0 = CLOCK()
        step()
        ts.append(CLOCK() - t0)
    return statistics.median(ts) * 1e3


def gemm_floor(model_name, dtype, n):
    """The step's GEMMs alone, in NumPy and PyTorch (MLP only: 3 forward, 5 backward)."""
    if model_name != "mlp":
        return None
    rng = np.random.default_rng(0)
    dtype = kp.precision.compute_dtype(kp.precision.as_dtype(dtype))  # 16-bit: float32 GEMMs
    dims = [784, *cases.MLP_WIDTHS, 10]
    b = cases.BATCH
    xs = [rng.random((b, d)).astype(dtype) for d in dims]
    ws = [rng.random((o, i)).astype(dtype) for i, o in zip(dims[:-1], dims[1:])]

    def np_gemms():
        for x, w in zip(xs[:-1], ws):
            x @ w.T
        for k, (x, w) in enumerate(zip(xs[:-1], ws)):
            g = xs[k + 1]
            g.T @ x  # weight gradient
            if k:
                g @ w  # input gradient (none for the first layer)

    out = {"numpy_ms": time_steps(np_gemms, n)}
    try:
        import torch

        torch.set_num_threads(int(_THREADS))
        txs = [torch.from_numpy(x) for x in xs]
        tws = [torch.from_numpy(w) for w in ws]

        def t_gemms():
            for x, w in zip(txs[:-1], tws):
                x @ w.T
            for k, (x, w) in enumerate(zip(txs[:-1], tws)):
                g = txs[k + 1]
                g.T @ x
                if k:
                    g @ w

        out["torch_ms"] = time_steps(t_gemms, n)
    except ImportError:
        pass
    return out


def timer_overhead(n=20000):
    f = _timed(lambda: None, "_overhead")
    t0 = CLOCK()
    for _ in range(n):
        f()
    t = (CLOCK() - t0) / n
    TIMES.pop("_overhead", None)
    return t * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp", choices=("mlp", "lenet", "convnet"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--batch-norm", action="store_true")
    p.add_argument("--policy", default=None, help="kink policy in force (e.g. directional)")
    p.add_argument("--census", default=None, metavar="LEVEL",
                   help="run each step inside kp.census(level=LEVEL) (exact or ambiguous)")
    p.add_argument("--threads", default="1")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--clock", choices=("cpu", "wall"), default=None,
                   help="cpu: this thread's CPU time (default with 1 thread); wall: perf_counter "
                        "(default with more threads)")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="also print cProfile's top N functions (by --sort)")
    p.add_argument("--sort", choices=("tottime", "cumulative"), default="tottime",
                   help="cProfile's order: own time (default) or time including callees")
    args = p.parse_args()
    global CLOCK
    clock = args.clock or ("cpu" if _THREADS == "1" else "wall")
    CLOCK = time.thread_time if clock == "cpu" else time.perf_counter

    step, opt = make_step(args.model, args.dtype, args.optimizer, args.policy, args.batch_norm,
                          args.census)
    for _ in range(5):
        step()
    plain = time_steps(step, args.steps)
    restore = instrument(opt)
    time_steps(step, 3)
    TIMES.clear()
    instrumented = time_steps(step, args.steps)
    per_step = {k: (v[0] / args.steps * 1e3, v[1] / args.steps) for k, v in TIMES.items()}
    restore()
    overhead_us = timer_overhead()

    print(f"{args.model} {args.dtype} {args.optimizer}"
          f"{' policy=' + args.policy if args.policy else ''}"
          f"{' census=' + args.census if args.census else ''}, batch {cases.BATCH}, "
          f"{_THREADS} thread(s), {clock} clock: step {plain:.2f} ms (median of {args.steps}); instrumented "
          f"{instrumented:.2f} ms; timer overhead ~{overhead_us:.1f} us per call")
    floor = gemm_floor(args.model, args.dtype, args.steps)
    if floor:
        print("GEMM floor (the step's 8 GEMMs alone, in the compute format): " +
              ", ".join(f"{k} {v:.2f} ms" for k, v in floor.items()))
    print(f"\n{'where':<48} {'ms/step':>8} {'%step':>6} {'calls':>6}")
    nested = {"directional.resolve_if_needed (total)", "tape.toposort"}
    accounted = 0.0
    for key, (ms, calls) in sorted(per_step.items(), key=lambda kv: -kv[1][0]):
        if ms < 0.005:
            continue
        print(f"{key:<48} {ms:>8.3f} {100 * ms / plain:>5.1f}% {calls:>6.0f}")
        if key not in nested and not key.endswith(".jvp"):
            accounted += ms
    calls = sum(c for k, (ms, c) in per_step.items())
    rest = plain - accounted
    print(f"{'everything else (tape, apply, modules, loss)':<48} {rest:>8.3f} "
          f"{100 * rest / plain:>5.1f}%")
    extra = " and the directional resolution" if args.policy else ""
    jvp = "; jvp time is inside the resolution" if args.policy else ""
    print(f"({calls:.0f} timed calls per step; toposort{extra} counted in 'everything else'{jvp})")

    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            step()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(args.sort).print_stats(args.cprofile)
        text = s.getvalue()
        print("\n" + text[text.index("   ncalls"):] if "   ncalls" in text else text)


if __name__ == "__main__":
    main()
