"""``kinkprop report DB``: a self-contained Markdown report (and the same as HTML) with tables
(mean ± std over seeds) and matplotlib plots, plus a short plain-language summary.

Statistics: differences between a policy and the baseline (ReLU'(0) = 0) are paired by seed (same
initialisation, same data order) and tested with an exact sign-flip permutation test on the paired
differences. A difference is called significant only when p < 0.05; with n seeds the smallest
attainable p is 2 / 2**n, so with fewer than 6 seeds nothing can be called significant, and the
report says so rather than reading noise as an effect.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .runner import BASELINE
from .store import Store

ALPHA = 0.05


# -- statistics --------------------------------------------------------------------------------


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def sign_flip_p(diffs) -> float:
    """Exact two-sided p-value of the mean paired difference under random sign flips."""
    diffs = [d for d in diffs if d is not None]
    n = len(diffs)
    if n == 0:
        return float("nan")
    observed = abs(sum(diffs))
    if n > 16:  # 65536 sign patterns is plenty; beyond, use the first 16 pairs' exact test
        diffs, n = diffs[:16], 16
        observed = abs(sum(diffs))
    count = sum(1 for signs in itertools.product((1, -1), repeat=n)
                if abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-15)
    return count / 2 ** n


def _fmt(m, s, digits=4, pct=False):
    if math.isnan(m):
        return "–"
    if pct:
        return f"{100 * m:.2f} ± {100 * s:.2f}%"
    return f"{m:.{digits}g} ± {s:.2g}"


# -- gathering -----------------------------------------------------------------------------------


def _key(cfg, *names):
    return tuple(json.dumps(cfg.get(n), sort_keys=True) if isinstance(cfg.get(n), (dict, list))
                 else cfg.get(n) for n in names)


def _model_label(cfg):
    opts = cfg.get("model_opts") or {}
    label = cfg["model"] + ("-" + "x".join(map(str, opts["widths"])) if "widths" in opts else "")
    label += " +BN" if cfg.get("batch_norm") else ""
    return label + (f" [{cfg['engine']}]" if cfg.get("engine", "numpy") != "numpy" else "")


def gather(store: Store) -> dict:
    volume = defaultdict(list)
    for run in store.runs("volume"):
        c = run["config"]
        volume[(_model_label(c), c["precision"], c["policy"])].append(run["result"])
    training = defaultdict(dict)  # (model, optimizer, precision, policy) -> seed -> run
    for run in store.runs("training"):
        c = run["config"]
        opt = c["optimizer"] + f" lr={c['lr']:g}"
        run["epoch_rows"] = store.epochs(run["run_id"])
        run["site_rows"] = store.sites(run["run_id"])
        training[(_model_label(c), opt, c["precision"], c["policy"])][c["seed"]] = run
    audits = [run for run in store.runs("audit")]
    return {"volume": volume, "training": training, "audit": audits,
            "spec": store.meta("spec", {}), "counts": store.count()}


# -- tables --------------------------------------------------------------------------------------


def volume_rows(volume) -> list[list]:
    rows = []
    for (model, prec, pol), results in sorted(volume.items()):
        n_in = sum(r["in_s"] for r in results)
        firsts = [r["first_batch"] for r in results if r["first_batch"] is not None]
        calls = sum(r["relu_calls"] for r in results)
        zeros = sum(r["relu_zeros"] for r in results)
        rows.append([model, prec, f"{BASELINE} vs {pol}", f"{n_in}/{len(results)}",
                     f"{100 * n_in / len(results):.0f}%",
                     f"{statistics.median(firsts):g}" if firsts else "–",
                     f"{zeros / calls:.3g}" if calls else "–"])
    return rows


def training_rows(training) -> tuple[list[list], list[dict]]:
    rows, findings = [], []
    for (model, opt, prec, pol), by_seed in sorted(training.items()):
        accs = [r["result"]["final_test_acc"] for r in by_seed.values()]
        losses = [r["result"]["final_test_loss"] for r in by_seed.values()]
        hits = [sum(e["kink_hits"] or 0 for e in r["epoch_rows"]) for r in by_seed.values()]
        changed = [r["result"]["changed_steps"] for r in by_seed.values()]
        steps = [r["result"]["steps"] or 0 for r in by_seed.values()]
        diverged = sum(bool(r["result"]["diverged"]) for r in by_seed.values())
        base = training.get((model, opt, prec, BASELINE), {})
        diffs = [by_seed[s]["result"]["final_test_acc"] - base[s]["result"]["final_test_acc"]
                 for s in by_seed if s in base and pol != BASELINE
                 and by_seed[s]["result"]["final_test_acc"] is not None
                 and base[s]["result"]["final_test_acc"] is not None]
        if diffs:
            dm, ds = mean_std(diffs)
            p = sign_flip_p(diffs)
            verdict = ("significant" if p < ALPHA else
                       "no detectable difference" if len(diffs) >= 6 else
                       f"too few seeds to tell (min p = {2 / 2 ** len(diffs):.2g})")
            cmp = f"{100 * dm:+.2f} ± {100 * ds:.2f} pts, p = {p:.2g}: {verdict}"
            findings.append({"model": model, "optimizer": opt, "precision": prec, "policy": pol,
                             "diff": dm, "std": ds, "p": p, "verdict": verdict,
                             "n": len(diffs)})
        else:
            cmp = "baseline" if pol == BASELINE else "–"
        share = (f"{sum(c or 0 for c in changed)}/{sum(steps)}" if pol != BASELINE else "–")
        rows.append([model, opt, prec, pol, len(by_seed), _fmt(*mean_std(accs), pct=True),
                     _fmt(*mean_std(losses)), f"{statistics.fmean(hits):.3g}", share,
                     str(diverged), cmp])
    return rows, findings


def audit_rows(audits) -> list[list]:
    rows = []
    for run in audits:
        for s in run["result"].get("slopes", []):
            rows.append([_model_label(run["config"]), s.get("precision"),
                         s.get("direction", ""), _num(s.get("slope_smooth")),
                         _num(s.get("slope_crossing"))])
    return rows


def _num(v):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def site_hits(training) -> dict:
    """(precision, site) -> total hits and evaluated, over every training run."""
    out = defaultdict(lambda: [0, 0])
    for (model, opt, prec, pol), by_seed in training.items():
        for run in by_seed.values():
            for s in run["site_rows"]:
                cell = out[(prec, f"{model} {s['site']}")]
                cell[0] += s["hits"]
                cell[1] += s["evaluated"]
    return out


# -- plots ---------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path) -> bool:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _grouped_bars(path, precs, series, ylabel, title, log=False, ylim=None) -> bool:
    """One group of bars per precision, one bar per (label, values) series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(len(series), 1)
    for j, (label, values) in enumerate(series):
        ax.bar([i + j * width for i in range(len(precs))], values, width, label=label)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(precs))], precs)
    if log:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, ax, path)


def plot_share_in_s(volume, path) -> bool:
    if not volume:
        return False
    precs = sorted({k[1] for k in volume}, key=_prec_order)
    series = [(f"{model}: {BASELINE} vs {pol}",
               [100 * statistics.fmean(r["in_s"] for r in volume.get((model, p, pol), [])
                                       or [{"in_s": 0}]) for p in precs])
              for model, pol in sorted({(k[0], k[2]) for k in volume})]
    return _grouped_bars(path, precs, series, "initialisations in S (%)",
                         "Share of initialisations whose first-layer gradient changes with "
                         "ReLU'(0)", ylim=(0, 105))


def plot_hit_rates(training, path) -> bool:
    hits = site_hits(training)
    if not hits:
        return False
    precs = sorted({k[0] for k in hits}, key=_prec_order)
    series = [(site, [max(hits[(p, site)][0] / hits[(p, site)][1] if hits[(p, site)][1] else 0,
                          1e-12) for p in precs])
              for site in sorted({k[1] for k in hits})]
    return _grouped_bars(path, precs, series, "exact kink hits per element evaluated",
                         "Kink hit rate per precision and layer (training, all policies)",
                         log=True)


def plot_accuracy_vs_alpha(training, path) -> bool:
    pts = defaultdict(list)
    for (model, opt, prec, pol), by_seed in training.items():
        alpha = _alpha(pol)
        if alpha is None:
            continue
        accs = [r["result"]["final_test_acc"] for r in by_seed.values()]
        m, s = mean_std(accs)
        pts[(model, opt, prec)].append((alpha, m, s))
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, rows in sorted(pts.items()):
        rows.sort()
        ax.errorbar([r[0] for r in rows], [100 * r[1] for r in rows],
                    yerr=[100 * r[2] for r in rows], marker="o", capsize=3,
                    label=" ".join(label))
    ax.set_xlabel("ReLU'(0)")
    ax.set_ylabel("final test accuracy (%), mean ± std over seeds")
    ax.set_title("Accuracy vs the value chosen at the kink")
    return _save(fig, ax, path)


def plot_taylor(audits, path) -> bool:
    rows = [r for run in audits for r in run["result"].get("rows", [])
            if r["remainder"] > 0 and not r.get("at_floor")]  # below the rounding floor: noise
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("precision"), r.get("kind"), r.get("direction"))].append(r)
    precs = sorted({k[0] for k in groups}, key=_prec_order)
    colors = {p: f"C{i}" for i, p in enumerate(precs)}
    labelled = set()
    for (prec, kind, direction), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs.sort(key=lambda r: r["h"])
        hs = [r["h"] for r in rs]
        rem = [r["remainder"] for r in rs]
        ax.plot(hs, rem, color=colors[prec], alpha=0.6, lw=1,
                label=None if prec in labelled else prec)
        labelled.add(prec)
        crossed = [(h, r) for h, r, x in zip(hs, rem, rs) if x.get("crossings")]
        if crossed:
            ax.scatter(*zip(*crossed), color=colors[prec], marker="x", s=18)
    hs = sorted({r["h"] for r in rows})
    if hs:  # reference slopes through the median remainder at the largest step
        top = statistics.median(r["remainder"] for r in rows if r["h"] == hs[-1])
        ax.plot(hs, [top * (h / hs[-1]) ** 2 for h in hs], "k--", lw=0.8, label="slope 2")
        ax.plot(hs, [top * h / hs[-1] for h in hs], "k:", lw=0.8, label="slope 1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step h")
    ax.set_ylabel("|f(θ+hd) − f(θ) − h⟨∇f, d⟩|")
    ax.set_title("Taylor remainder above the rounding floor (x: segment crosses a kink)")
    return _save(fig, ax, path)


def _alpha(policy: str):
    if policy.startswith("relu=") and "replace" not in policy:
        try:
            return float(policy.split("=", 1)[1])
        except ValueError:
            return None
    return None


def _prec_order(p):
    order = ["fp64", "fp32", "bf16", "fp16", "fp8-e4m3", "fp8-e5m2"]
    return order.index(p) if p in order else len(order)


# -- summary ---------------------------------------------------------------------------------------


def summary_lines(data) -> list[str]:
    lines = []
    vol = data["volume"]
    if vol:
        by_prec = defaultdict(lambda: defaultdict(list))
        for (model, prec, pol), results in vol.items():
            if _alpha(pol) == 1.0:
                by_prec[prec][model] += [r["in_s"] for r in results]
        for prec in sorted(by_prec, key=_prec_order):
            parts = ", ".join(f"{sum(v)}/{len(v)} ({model})"
                              for model, v in sorted(by_prec[prec].items()))
            lines.append(f"- {prec}: ReLU'(0)=0 vs 1 changed the first-layer gradient within one "
                         f"pass over the data for {parts} initialisations.")
        zero = defaultdict(lambda: [0, 0])
        for (model, prec, pol), results in vol.items():
            for r in results:
                zero[prec][0] += r["relu_zeros"]
                zero[prec][1] += r["relu_calls"]
        rates = ", ".join(f"{p} {z / c:.2g}" for p, (z, c) in sorted(
            zero.items(), key=lambda kv: _prec_order(kv[0])) if c)
        lines.append(f"- Share of ReLU inputs exactly on the kink (0): {rates}.")
    _, findings = training_rows(data["training"])
    if findings:
        sig = [f for f in findings if f["verdict"] == "significant"]
        big = max(findings, key=lambda f: abs(f["diff"]))
        lines.append(f"- Training: {len(findings)} policy-vs-baseline comparisons; "
                     f"{len(sig)} significant at p < {ALPHA}. Largest mean accuracy change: "
                     f"{100 * big['diff']:+.2f} points ({big['policy']}, {big['precision']}, "
                     f"{big['model']}), {big['verdict']}.")
    changed = defaultdict(lambda: [0, 0])
    for (model, opt, prec, pol), by_seed in data["training"].items():
        if pol == BASELINE:
            continue
        for run in by_seed.values():
            changed[prec][0] += run["result"]["changed_steps"] or 0
            changed[prec][1] += run["result"]["steps"] or 0
    if changed:
        lines.append("- Training steps whose gradient the policy changed: " + ", ".join(
            f"{p} {c}/{n}" for p, (c, n) in sorted(changed.items(),
                                                     key=lambda kv: _prec_order(kv[0]))) + ".")
    slopes = audit_rows(data["audit"])
    if slopes:
        sm = [float(r[3]) for r in slopes if r[3] != "–"]
        cr = [float(r[4]) for r in slopes if r[4] != "–"]
        if sm:
            lines.append(f"- First-order property: remainder slope {statistics.median(sm):.2f} "
                         "(median) on segments without kink crossings (2 = smooth)"
                         + (f", {statistics.median(cr):.2f} once kinks are crossed (1 = the "
                            "first-order property fails at kinks)." if cr else "."))
    return lines


# -- writing ---------------------------------------------------------------------------------------


def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _html_table(head, rows) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


VOLUME_HEAD = ["model", "precision", "policies", "in S", "share", "median first batch",
               "ReLU zero rate"]
TRAINING_HEAD = ["model", "optimizer", "precision", "policy", "seeds", "test accuracy",
                 "test loss", "kink hits", "steps changed", "diverged", "vs baseline (paired)"]
AUDIT_HEAD = ["model", "precision", "direction", "slope, no crossing", "slope, crossing"]


def write_report(db_path, out_dir=None) -> dict:
    """Write report.md, report.html and the PNG plots next to the database (or in out_dir)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"{db_path}: no such study database; run `kinkprop study` first")
    store = Store(db_path)
    data = gather(store)
    store.close()
    out = Path(out_dir) if out_dir else db_path.parent
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    for name, fn, arg in [("share_in_s.png", plot_share_in_s, data["volume"]),
                          ("hit_rates.png", plot_hit_rates, data["training"]),
                          ("accuracy_vs_relu0.png", plot_accuracy_vs_alpha, data["training"]),
                          ("taylor.png", plot_taylor, data["audit"])]:
        if fn(arg, out / name):
            plots[name] = out / name
    t_rows, _ = training_rows(data["training"])
    sections = [
        ("Answer in brief", None, summary_lines(data)),
        ("Bifurcation volume (one pass, no training)", (VOLUME_HEAD, volume_rows(data["volume"])),
         ["share_in_s.png"]),
        ("Training effect", (TRAINING_HEAD, t_rows), ["accuracy_vs_relu0.png", "hit_rates.png"]),
        ("First-order (Taylor) audit", (AUDIT_HEAD, audit_rows(data["audit"])), ["taylor.png"]),
    ]
    spec = data["spec"]
    intro = (f"Study `{spec.get('name', '?')}` on `{spec.get('dataset', '?')}`: runs "
             f"{data['counts']}. Baseline policy: {BASELINE} (PyTorch's choice). Accuracy "
             "differences are paired by seed and tested with an exact sign-flip test; "
             f"significant means p < {ALPHA}.")
    md = ["# kinkprop study report", "", intro, ""]
    hp = ["<!doctype html><html><head><meta charset='utf-8'><title>kinkprop study report</title>"
          "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
          "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
          "padding:3px 6px}th{background:#eee}</style></head><body>",
          "<h1>kinkprop study report</h1>", f"<p>{html.escape(intro)}</p>"]
    for title, table, extra in sections:
        md += [f"## {title}", ""]
        hp.append(f"<h2>{html.escape(title)}</h2>")
        if table is None:
            md += extra + [""]
            hp.append("<ul>" + "".join(f"<li>{html.escape(x[2:])}</li>" for x in extra)
                      + "</ul>")
            continue
        head, rows = table
        if rows:
            md += [_md_table(head, rows), ""]
            hp.append(_html_table(head, rows))
        else:
            md += ["(no runs of this protocol)", ""]
            hp.append("<p>(no runs of this protocol)</p>")
        for name in extra:
            if name in plots:
                md += [f"![{name}]({name})", ""]
                b64 = base64.b64encode(plots[name].read_bytes()).decode()
                hp.append(f"<p><img alt='{name}' src='data:image/png;base64,{b64}'></p>")
    hp.append("</body></html>")
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    paths["markdown"].write_text("\n".join(md))
    paths["html"].write_text("\n".join(hp))
    return {"paths": {k: str(v) for k, v in {**paths, **plots}.items()},
            "summary": summary_lines(data)}
