"""Overhead of kinkprop.torch on a ResNet-18 training step, against native PyTorch.

    python benchmarks/torch_overhead.py                       # CPU, reduced batch and input size
    python benchmarks/torch_overhead.py --device cuda --batch 256 --size 224 --reps 30

Configurations, each a full SGD step (zero_grad, forward, cross-entropy, backward, optimizer step):

``native``          no kinkprop scope
``preset``          ``kink_policy("jax")`` (on a ResNet its relu / max-pool rules are torch's)
``policy``          ``kink_policy("jax", relu=1.0, max_pool2d="split")``: rerouted rules everywhere
``census``          ``census(model)``, ``c.step()`` and ``c.read()`` (one host transfer) per step
``policy+census``   both
``directional``     ``kink_policy("directional", model=model)``: forward-mode tangents, one pass
``directional-1d``  the same with the direction on the 1-D parameters only (batch-norm scales and
                    shifts, biases): no random draw over the weights, half the tangent convolutions

Runs are interleaved (every repetition runs each configuration once, in a rotating order), so
load drifts hit all configurations alike. Reported per configuration: the median wall time of a
step, its ratio to native's median, the min / median / max over repetitions of the ratio to the
native step of the same repetition, and the same for the process CPU time (on a shared CPU with
``--threads 1`` the CPU time is the steadier figure: time the process spends preempted does not
count). The first line names the device (for a CPU its model and torch's vector ISA).
The targets: <= 1.10 for the policy and the census, <= 2 for directional on steps that hit kinks
(the census line under each dtype shows they do). A table is printed and a JSON file written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kinkprop.torch as kpt
from kinkprop.torch.models import resnet18

CONFIGS = ["native", "preset", "policy", "census", "policy+census", "directional",
           "directional-1d"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, opt, x, y, config):
    def plain():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    if config == "native":
        return plain, contextlib.nullcontext
    if config == "preset":
        return plain, lambda: kpt.kink_policy("jax")
    if config == "policy":
        return plain, lambda: kpt.kink_policy("jax", relu=1.0, max_pool2d="split")
    if config == "directional":
        return plain, lambda: kpt.kink_policy("directional", model=model, seed=0)
    if config == "directional-1d":
        return plain, lambda: kpt.kink_policy("directional", model=model, seed=0,
                                              params=lambda name, p: p.dim() == 1)
    if config in ("census", "policy+census"):
        state = {}

        @contextlib.contextmanager
        def scope():
            with contextlib.ExitStack() as stack:
                if config == "policy+census":
                    stack.enter_context(kpt.kink_policy("jax", relu=1.0, max_pool2d="split"))
                state["c"] = stack.enter_context(kpt.census(model))
                yield

        def counted():
            plain()
            c = state["c"]
            c.step()
            state["reading"] = c.read()  # one host transfer per step

        return counted, scope
    raise ValueError(config)


def run(args, dtype) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet18(num_classes=10, stem=args.stem).to(device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,), device=device)
    steps = {c: make_step(model, opt, x, y, c) for c in args.configs}
    times = {c: [] for c in args.configs}
    cpu = {c: [] for c in args.configs}
    for rep in range(args.warmup + args.reps):
        order = args.configs[rep % len(args.configs):] + args.configs[:rep % len(args.configs)]
        for c in order:
            step, scope = steps[c]
            with scope():
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                _sync(device)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rep >= args.warmup:
                times[c].append(dt)
                cpu[c].append(dc)
    # did the steps hit kinks? (one census step, outside the timing)
    with kpt.census(model) as c:
        F.cross_entropy(model(x), y).backward()
        reading = c.read()
    out = {"dtype": str(dtype).replace("torch.", ""), "kink_hits_per_step": reading.hits,
           "evaluated_per_step": reading.evaluated, "configs": {}}
    native, native_cpu = times.get("native"), cpu.get("native")
    for c in args.configs:
        med = statistics.median(times[c])
        entry = {"median_s": med, "times_s": times[c], "cpu_times_s": cpu[c],
                 "median_cpu_s": statistics.median(cpu[c])}
        if native:
            paired = sorted(t / n for t, n in zip(times[c], native))
            entry["ratio_of_medians"] = med / statistics.median(native)
            entry["median_paired_ratio"] = statistics.median(paired)
            entry["paired_ratio_min_max"] = [paired[0], paired[-1]]
            entry["cpu_ratio_of_medians"] = entry["median_cpu_s"] / statistics.median(native_cpu)
            paired = sorted(t / n for t, n in zip(cpu[c], native_cpu))
            entry["cpu_paired_ratio_min_med_max"] = [paired[0], statistics.median(paired),
                                                     paired[-1]]
        out["configs"][c] = entry
    return out


def _device_name(device: str) -> str:
    """What produced the numbers: the GPU's name, or the CPU's model and torch's vector ISA."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{device} ({model}, {torch.backends.cpu.get_cpu_capability()})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", default="torch_overhead.json")
    args = ap.parse_args(argv)
    args.configs = args.configs.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "device": _device_name(args.device),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "batch": args.batch, "size": args.size,
        "stem": args.stem, "reps": args.reps, "warmup": args.warmup, "runs": [],
    }
    t_start = time.perf_counter()
    for name in args.dtypes.split(","):
        results["runs"].append(run(args, getattr(torch, name)))
    results["wall_s"] = time.perf_counter() - t_start
    print(f"ResNet-18 training step on {results['device']} (torch {results['torch']}, "
          f"{results['threads']} threads), batch {args.batch}, {args.size}x{args.size}, "
          f"{args.reps} interleaved reps; wall {results['wall_s']:.0f} s")
    print(f"{'dtype':9s} {'config':14s} {'median ms':>10s} {'ratio':>6s} "
          f"{'paired min/med/max':>18s} {'cpu ms':>10s} {'cpu ratio':>9s} "
          f"{'cpu paired min/med/max':>22s}")
    nan = float("nan")
    for r in results["runs"]:
        for c, e in r["configs"].items():
            lo, hi = e.get("paired_ratio_min_max", (nan, nan))
            clo, cmed, chi = e.get("cpu_paired_ratio_min_med_max", (nan, nan, nan))
            print(f"{r['dtype']:9s} {c:14s} {e['median_s'] * 1e3:10.1f} "
                  f"{e.get('ratio_of_medians', nan):6.3f} "
                  f"{lo:6.3f}/{e.get('median_paired_ratio', nan):5.3f}/{hi:5.3f} "
                  f"{e['median_cpu_s'] * 1e3:10.1f} {e.get('cpu_ratio_of_medians', nan):9.3f} "
                  f"{clo:10.3f}/{cmed:5.3f}/{chi:5.3f}")
        print(f"{r['dtype']:9s} kink hits per step: {r['kink_hits_per_step']} of "
              f"{r['evaluated_per_step']} evaluated")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
