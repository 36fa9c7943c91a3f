"""Speed and memory of kinkprop against PyTorch CPU eager (and against itself), one command:

    python benchmarks/bench.py                      # 2 threads, then 1 thread (~3-4 minutes)
    python benchmarks/bench.py --quick              # fewer cases and blocks (~1 minute)
    python benchmarks/bench.py --threads 1 --json bench.json --cases mlp,lenet

Not part of the test suite. Each thread count runs in a fresh child process whose environment sets
OMP / OPENBLAS / MKL thread counts *before* NumPy and PyTorch are imported (threadpoolctl, when
installed, verifies them; ``torch.set_num_threads`` is called too). The child drops
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which this workplace may set and which slow current NumPy,
and reports the OpenBLAS kernel that then runs (``--keep-openblas-env`` keeps them).

Method: for each case the two sides (kinkprop and its reference) run interleaved in one process,
in blocks (A B, then B A, ...), each block timing a chunk of consecutive steps per side; a block's
time is the median step time of its chunk, a case's time the median over blocks, and its ratio the
median of the per-block ratios (min and max are printed too). Ratios are thus measured within one
run, under the same load, which matters on shared, noisy machines.

Memory: peak resident memory of one MLP training epoch, kinkprop and PyTorch each in a fresh
process: the peak (VmHWM, reset through /proc/self/clear_refs after the imports, data and model
are made) minus the resident size at that point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

#: blocks per case (at least 3 are always run; more while the case is within its time budget),
#: target seconds per chunk of steps, warm-up steps per side, and the memory epoch's size
QUICK = {"blocks": 5, "chunk_s": 0.05, "min_steps": 2, "warmup": 2, "budget_s": 4.0,
         "mem_samples": 12800}
FULL = {"blocks": 9, "chunk_s": 0.12, "min_steps": 3, "warmup": 3, "budget_s": 10.0,
        "mem_samples": 60000}


# -- the launcher ------------------------------------------------------------------------------


def child_env(threads: int, keep_openblas: bool) -> tuple[dict, dict]:
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    removed = {}
    if not keep_openblas:
        for var in OPENBLAS_OVERRIDES:
            if var in env:
                removed[var] = env.pop(var)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env, removed


def launch(args) -> int:
    runs = []
    for threads in args.threads:
        env, removed = child_env(threads, args.keep_openblas_env)
        with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as fh:
            out = fh.name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "--threads",
               str(threads), "--_out", out]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--cases", args.cases] if args.cases else []
        rc = subprocess.call(cmd, env=env)
        try:
            run = json.loads(Path(out).read_text())
        except (OSError, json.JSONDecodeError):
            print(f"threads={threads}: the child process failed (exit {rc})", file=sys.stderr)
            return rc or 1
        finally:
            Path(out).unlink(missing_ok=True)
        run["env_removed"] = removed
        runs.append(run)
    memory = None
    wanted = [w.strip() for w in args.cases.split(",")] if args.cases else None
    if not args.no_memory and (wanted is None or any("memory".startswith(w) for w in wanted)):
        threads = min(args.threads)
        env, _ = child_env(threads, args.keep_openblas_env)
        cfg = QUICK if args.quick else FULL
        print(f"\n== peak memory, one MLP epoch ({cfg['mem_samples']} samples), each side in a "
              f"fresh process, {threads} thread(s) ==")
        try:
            memory = measure_memory(threads, cfg["mem_samples"], env)
            memory["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            memory = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
        print(_memory_row(memory))
        if memory["status"] == "ok":
            print("  " + "; ".join(f"{k}: baseline {r['baseline_mb']:.0f} MB, peak "
                                   f"{r['peak_mb']:.0f} MB, epoch {r['seconds']:.1f} s"
                                   for k, r in memory["runs"].items()))
    print("\n== summary ==")
    for run in runs:
        print(f"\n-- {run['threads']} thread(s); load average {run['loadavg_start']} -> "
              f"{run['loadavg_end']} --")
        print_table(run["cases"])
    if memory:
        print()
        print(_memory_row(memory))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "memory": memory}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


# -- machine facts -----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    return {"commit": git("rev-parse", "HEAD"), "src_dirty": bool(status)}


def machine_facts(threads: int) -> dict:
    import numpy as np
    import torch

    facts = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "env": {v: os.environ.get(v) for v in THREAD_VARS + OPENBLAS_OVERRIDES},
    }
    try:
        import threadpoolctl

        facts["threadpools"] = [
            {k: info.get(k) for k in ("user_api", "internal_api", "prefix", "version",
                                      "num_threads", "architecture", "threading_layer")}
            for info in threadpoolctl.threadpool_info()]
    except ImportError:
        facts["threadpools"] = None
    try:
        import re

        config = torch.__config__.show()
        facts["torch_blas"] = {k: v for k, v in re.findall(r"(\w+)=([^,\s]*)", config)
                               if k in ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_MKLDNN",
                                        "USE_OPENMP")}
    except Exception:  # noqa: BLE001 - informational only
        facts["torch_blas"] = None
    import kinkprop

    facts["allocator"] = ("glibc keeps freed memory (kinkprop's default, src/kinkprop/allocator.py)"
                          if kinkprop.allocator.applied() else
                          "the C library's defaults (KINKPROP_MALLOC=system, or not glibc)")
    return facts


def describe(facts: dict) -> str:
    git = facts.get("git") or {}
    lines = [f"machine: {facts['nproc']} CPUs, {facts['cpu']}; Python {facts['python']}, "
             f"numpy {facts['numpy']}, torch {facts['torch']}",
             f"kinkprop: commit {str(git.get('commit'))[:10]}"
             f"{' + uncommitted changes in src/' if git.get('src_dirty') else ''}",
             f"threads: {facts['threads']} (torch.get_num_threads() = {facts['torch_threads']})"]
    for tp in facts.get("threadpools") or []:
        lines.append(f"  threadpool {tp['internal_api']} {tp['version']} ({tp['prefix']}): "
                     f"{tp['num_threads']} threads"
                     + (f", kernel {tp['architecture']}" if tp.get("architecture") else ""))
    if facts.get("allocator"):
        lines.append(f"  allocator: {facts['allocator']} (both sides share the process)")
    if facts.get("torch_blas"):
        lines.append("  torch build: " + ", ".join(f"{k}={v}" for k, v in
                                                    facts["torch_blas"].items()))
    return "\n".join(lines)


# -- timing ------------------------------------------------------------------------------------


def _time_chunk(f, n: int) -> tuple[float, float]:
    """Median wall time and median process CPU time of ``n`` consecutive calls (seconds)."""
    wall, cpu = [], []
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        f()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def interleave(a, b, blocks: int, chunk_s: float, warmup: int, budget_s: float,
               min_steps: int = 3) -> dict:
    """Median step times of ``a`` and ``b`` (ms) over interleaved blocks, with per-block ratios.

    Blocks alternate the order (A B, B A, ...); each times a chunk of ``steps`` consecutive steps
    per side. At least 3 blocks run, up to ``blocks`` while within ``budget_s``.
    """
    import gc

    for _ in range(warmup - 1):
        a()
        b()
    est = max(_time_chunk(a, 1)[0], _time_chunk(b, 1)[0])  # the last warm-up step
    steps = max(min_steps, min(25, int(chunk_s / max(est, 1e-6))))
    ta, tb, ca, cb = [], [], [], []
    start = time.perf_counter()
    for i in range(blocks):
        if i >= 3 and time.perf_counter() - start > budget_s:
            break
        gc.collect()
        if i % 2 == 0:
            xa, xb = _time_chunk(a, steps), _time_chunk(b, steps)
        else:
            xb, xa = _time_chunk(b, steps), _time_chunk(a, steps)
        ta.append(xa[0] * 1e3)
        tb.append(xb[0] * 1e3)
        ca.append(xa[1] * 1e3)
        cb.append(xb[1] * 1e3)
    ratios = [x / y for x, y in zip(ta, tb)]
    cpu_ratios = [x / y for x, y in zip(ca, cb)]
    med = statistics.median
    return {"a_ms": med(ta), "b_ms": med(tb), "ratio": med(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "ratio_of_medians": med(ta) / med(tb),
            "a_cpu_ms": med(ca), "b_cpu_ms": med(cb), "cpu_ratio": med(cpu_ratios),
            "blocks": len(ta), "steps_per_block": steps, "seconds": time.perf_counter() - start,
            "a_block_ms": ta, "b_block_ms": tb, "a_block_cpu_ms": ca, "b_block_cpu_ms": cb}


# -- memory ------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_worker(side: str, samples: int, threads: int) -> None:
    """One MLP training epoch (SGD, batch 128) in this fresh process; prints one JSON line."""
    import gc
    import resource

    import numpy as np

    sys.path.insert(0, str(HERE))
    import cases

    x, y = cases.fashion_like(samples)
    model = cases.kp_model("mlp")
    if side == "torch":
        import torch

        torch.set_num_threads(threads)
        tmodel = cases.torch_twin(model, torch.float32)
        del model
        opt = torch.optim.SGD(tmodel.parameters(), lr=0.1)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        ce = torch.nn.functional.cross_entropy

        def step(i):
            opt.zero_grad(set_to_none=True)
            loss = ce(tmodel(tx[i:i + cases.BATCH]), ty[i:i + cases.BATCH])
            loss.backward()
            opt.step()
    else:
        import kinkprop as kp
        from kinkprop.optim import SGD

        opt = SGD(model.parameters(), lr=0.1)

        def step(i):
            opt.zero_grad()
            loss = kp.cross_entropy(model(kp.Tensor(x[i:i + cases.BATCH])), y[i:i + cases.BATCH])
            loss.backward()
            opt.step()

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "VmHWM (not reset: peak includes the set-up)"
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    for i in range(0, samples - cases.BATCH + 1, cases.BATCH):
        step(i)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print(json.dumps({"side": side, "baseline_mb": base / 1024, "peak_mb": peak / 1024,
                      "delta_mb": (peak - base) / 1024, "seconds": seconds, "method": method,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "numpy": np.__version__}))


def measure_memory(threads: int, samples: int, env: dict) -> dict:
    """Each side in its own fresh process, one after the other."""
    results = {}
    for side in ("kinkprop", "torch"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory", side,
               "--threads", str(threads), "--_samples", str(samples)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"memory worker {side} failed:\n{out.stderr[-2000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    kp_mb, t_mb = results["kinkprop"]["delta_mb"], results["torch"]["delta_mb"]
    return {"name": "memory_mlp_epoch", "description": f"peak RSS over one MLP epoch "
            f"({samples} samples, batch 128, SGD), above the post-set-up baseline",
            "a_label": "kinkprop", "b_label": "torch", "a_mb": kp_mb, "b_mb": t_mb,
            "ratio": kp_mb / t_mb if t_mb > 0 else float("inf"), "target": 1.0,
            "met": kp_mb <= t_mb, "threads": threads, "runs": results}


# -- the table ---------------------------------------------------------------------------------


def _row(c: dict) -> str:
    name = c["name"]
    if c.get("status") != "ok":
        return f"{name:<20} {c.get('status', '?')}: {c.get('reason', '')}"
    target = "-" if c["target"] is None else f"<= {c['target']:.2f}"
    met = "" if c["target"] is None else ("yes" if c["ratio"] <= c["target"] else "NO")
    return (f"{name:<20} {c['a_ms']:>9.2f} {c['b_ms']:>9.2f} {c['b_label']:<9} "
            f"{c['ratio']:>6.2f} {target:>8} {met:>4}   "
            f"{c['ratio_min']:>5.2f} / {c['ratio']:.2f} / {c['ratio_max']:<5.2f}  "
            f"{c['cpu_ratio']:>6.2f}")


HEADER = (f"{'case':<20} {'kp ms':>9} {'ref ms':>9} {'ref':<9} {'ratio':>6} {'target':>8} "
          f"{'met':>4}   {'block ratio min / med / max':<27} {'cpu ratio':>6}")


def _memory_row(memory: dict) -> str:
    if memory.get("status", "ok") != "ok":
        return f"{'memory_mlp_epoch':<20} {memory['status']}: {memory.get('reason', '')}"
    return (f"{'memory_mlp_epoch':<20} {memory['a_mb']:>7.1f}MB {memory['b_mb']:>7.1f}MB "
            f"{'torch':<9} {memory['ratio']:>6.2f} {'<= 1.00':>8} "
            f"{'yes' if memory['met'] else 'NO':>4}   peak RSS above baseline, one epoch")


def print_table(rows, memory=None) -> None:
    print(HEADER)
    for c in rows:
        print(_row(c))
    if memory:
        print(_memory_row(memory))


def markdown(data: dict) -> str:
    """The results of a saved run (``--json``) as Markdown tables, for docs/benchmarks.md."""
    out = []
    for run in data["runs"]:
        m = run["machine"]
        out.append(f"**{run['threads']} thread(s)**{' (quick)' if run.get('quick') else ''}, "
                   f"{run['time']}, load average {run['loadavg_start']} -> {run['loadavg_end']}"
                   f" on {m['nproc']} CPUs\n")
        out.append("| case | kinkprop ms | reference ms | reference | ratio | target | met | "
                   "block ratios min / med / max | cpu ratio |")
        out.append("|---|---:|---:|---|---:|---:|---|---|---:|")
        for c in run["cases"]:
            if c.get("status") != "ok":
                out.append(f"| {c['name']} | {c.get('status')}: {c.get('reason', '')} |||||||")
                continue
            target = "-" if c["target"] is None else f"<= {c['target']:.2f}"
            met = "" if c["target"] is None else ("yes" if c["ratio"] <= c["target"] else "**no**")
            out.append(f"| {c['name']} | {c['a_ms']:.2f} | {c['b_ms']:.2f} | {c['b_label']} | "
                       f"{c['ratio']:.2f} | {target} | {met} | {c['ratio_min']:.2f} / "
                       f"{c['ratio']:.2f} / {c['ratio_max']:.2f} | {c['cpu_ratio']:.2f} |")
        out.append("")
    mem = data.get("memory")
    if mem and mem.get("status") == "ok":
        out.append(f"Peak memory, one MLP epoch ({mem['description'].split('(')[1].split(',')[0]}"
                   f", {mem['threads']} thread(s)): kinkprop {mem['a_mb']:.1f} MB, PyTorch "
                   f"{mem['b_mb']:.1f} MB above the post-set-up baseline; ratio "
                   f"{mem['ratio']:.2f} (target <= 1.00: {'met' if mem['met'] else '**not met**'})."
                   "\n")
    return "\n".join(out)


# -- the child: one thread count ---------------------------------------------------------------


def run_child(args) -> int:
    import numpy as np  # noqa: F401 - after the thread variables are set (by the launcher)
    import torch

    torch.set_num_threads(args.threads[0])
    sys.path.insert(0, str(HERE))
    import cases as C

    threads = args.threads[0]
    cfg = QUICK if args.quick else FULL
    facts = machine_facts(threads)
    facts["git"] = git_state()
    print(f"\n== kinkprop benchmark, {threads} thread(s){' (quick)' if args.quick else ''} ==")
    print(describe(facts))
    load0 = loadavg()
    print(f"load average at start: {load0}  (the machine is shared: interleaved blocks and "
          "medians; see the per-block ratio spread)")
    if load0 and facts["nproc"] and load0[0] + threads > facts["nproc"] + 0.5:
        why = ("BLAS / OpenMP threads spin and wait on descheduled peers" if threads > 1
               else "wall time includes time spent descheduled")
        print(f"WARNING: load average {load0[0]:.1f} on {facts['nproc']} CPUs: other processes "
              f"compete for the cores, so {threads}-thread wall times are inflated ({why}); "
              "the 'cpu ratio' column (process CPU time per step) is steadier, and with 1 "
              "thread it counts only this process's own work")
    wanted = [w.strip() for w in args.cases.split(",")] if args.cases else None
    selected = [c for c in C.CASES
                if (wanted is None and (c.quick or not args.quick))
                or (wanted is not None and any(c.name.startswith(w) for w in wanted))]
    print()
    print(HEADER)
    rows = []
    for case in selected:
        row = {"name": case.name, "description": case.description, "a_label": case.a_label,
               "b_label": case.b_label, "target": case.target}
        try:
            a, b, check = case.build()
            row.update(interleave(a, b, cfg["blocks"], cfg["chunk_s"], cfg["warmup"],
                                  cfg["budget_s"], cfg["min_steps"]))
            if check is not None:
                row["facts"] = check()
            row["status"] = "ok"
            row["met"] = None if case.target is None else row["ratio"] <= case.target
        except C.Skip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 - the engine is changing; report and go on
            row.update(status="error", reason=f"{type(e).__name__}: {e}")
        rows.append(row)
        print(_row(row), flush=True)
        if row.get("facts"):
            print("    " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in row["facts"].items()))
    load1 = loadavg()
    print(f"load average at end: {load1}")
    run = {"threads": threads, "quick": args.quick, "config": cfg, "machine": facts,
           "loadavg_start": load0, "loadavg_end": load1, "cases": rows,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args._out).write_text(json.dumps(run, indent=2))
    return 0


# -- entry point -------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="2,1",
                   help="thread counts to run, comma-separated, each in a fresh process "
                        "(default 2,1)")
    p.add_argument("--quick", action="store_true", help="fewer cases and blocks (~1 minute)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--cases", help="comma-separated case-name prefixes (e.g. mlp,lenet,memory)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory case")
    p.add_argument("--keep-openblas-env", action="store_true",
                   help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE if set (default: unset)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--markdown", metavar="JSON",
                   help="print the results saved in JSON (by --json) as Markdown tables and exit")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_memory", choices=("kinkprop", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--_samples", type=int, default=60000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    if not args.threads or min(args.threads) < 1:
        p.error("--threads needs positive integers, e.g. 2 or 2,1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._memory:
        memory_worker(args._memory, args._samples, args.threads[0])
        return 0
    if args._child:
        return run_child(args)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.list:
        sys.path.insert(0, str(HERE))
        import cases

        for c in cases.CASES:
            target = "-" if c.target is None else f"<= {c.target}"
            print(f"{c.name:<20} {target:>8}  {'quick ' if c.quick else 'full  '}{c.description}")
        print(f"{'memory_mlp_epoch':<20} {'<= 1.0':>8}  quick peak RSS of one MLP epoch vs torch")
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
