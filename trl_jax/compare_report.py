"""The report of ``trl-jax compare``: the printed per-step table, verdict, throughput and memory lines
(:func:`format_report`), and the plot (:func:`plot_compare`: loss and the objective's main metrics of both sides on
shared axes, plus a throughput bar; matplotlib). Both read the result dict that :func:`trl_jax.compare.run_compare`
writes to ``compare.json``."""

from __future__ import annotations

import numpy as np


def _fmt(x, spec=".6g") -> str:
    return "-" if x is None else format(x, spec)


def format_report(r: dict) -> str:
    lines = [f"== trl-jax compare {r['command']}: TRL ({r['devices']['trl']}) vs trl_jax ({r['devices']['trl_jax']}), "
             f"{r['steps']} steps =="]
    if r.get("sampling_differs"):
        lines.append("Sampling differs (different random streams): each step below is compared on the SAME "
                     "completions, trl_jax's samples fed to TRL's trainer; throughput is each library's own loop.")
    keys = sorted(r["max_rel"])
    judged = [k for k in keys if k not in r.get("not_judged", [])]
    w = max([len(k) for k in keys] + [6])
    for row in r["per_step"]:
        lines.append(f"step {row['step']}")
        lines.append(f"  {'metric':<{w}}  {'TRL':>13}  {'trl_jax':>13}  {'abs diff':>10}  {'rel diff':>10}")
        for k in keys:
            m = row["metrics"][k]
            flag = "" if m["ok"] else "  <-- over tolerance" if m.get("judged", True) else "  (not judged)"
            lines.append(f"  {k:<{w}}  {m['trl']:>13.6g}  {m['trl_jax']:>13.6g}  {m['abs_diff']:>10.2e}  "
                         f"{m['rel_diff']:>10.2e}{flag}")
    if r["only_trl"] or r["only_trl_jax"]:
        lines.append(f"logged by TRL only: {', '.join(r['only_trl']) or '-'}; by trl_jax only: "
                     f"{', '.join(r['only_trl_jax']) or '-'}")
    tol = f"rtol {r['rtol']:g} (atol {r['atol']:g} near zero)"
    if r["ok"]:
        worst = max(judged, key=lambda k: r["max_rel"][k]) if judged else None
        lines.append(f"VERDICT: within tolerance ({tol}) on all {len(judged)} judged shared metrics over "
                     f"{r['steps_logged']['trl']}"
                     f" steps" + (f"; largest relative difference {r['max_rel'][worst]:.2e} ({worst}, step "
                                  f"{r['worst_step'][worst]})" if worst else ""))
    else:
        fd = r["first_divergence"]
        why = []
        if fd:
            why.append(f"first diverging step {fd['step']} ({', '.join(fd['keys'])})")
        if r["steps_logged"]["trl"] != r["steps_logged"]["trl_jax"]:
            why.append(f"logged steps differ (TRL {r['steps_logged']['trl']}, trl_jax {r['steps_logged']['trl_jax']})")
        if r["only_trl"]:
            why.append(f"metrics missing in trl_jax: {', '.join(r['only_trl'])}")
        lines.append(f"VERDICT: NOT within tolerance ({tol}): " + "; ".join(why))
    t = r["throughput"]
    lines.append(f"throughput (steps after the first {r['warmup_steps']} warm-up steps; first step, with compilation, "
                 "timed apart):")
    for side, name in (("trl", "TRL"), ("trl_jax", "trl_jax")):
        s = t[side]
        lines.append(f"  {name:<8} tokens/s {_fmt(s['tokens_per_s'], '.1f'):>10}   s/step {_fmt(s['step_s'], '.4f'):>8}"
                     f"   first step {_fmt(s['first_step_s'], '.2f')} s")
    lines.append(f"  trl_jax / TRL: tokens/s {_fmt(t['tokens_per_s_ratio'], '.2f')}x, step-time speed-up "
                 f"{_fmt(t['step_time_ratio'], '.2f')}x")
    m = r["memory"]
    for side, name in (("trl", "TRL"), ("trl_jax", "trl_jax")):
        dev = m[side]["peak_device_mb"]
        lines.append(f"  peak memory {name:<8} device: {_fmt(dev, '.0f') + ' MB' if dev is not None else 'unavailable'}"
                     f" ({m[side]['kind']}); host RSS {m[side]['peak_rss_mb']:.0f} MB")
    lines.append(f"  memory trl_jax / TRL ({'device' if m['compared'] == 'peak_device_mb' else 'host RSS'}): "
                 f"{_fmt(m['ratio_jax_over_trl'], '.2f')}x")
    for n in r["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def plot_compare(r: dict, path: str) -> str:
    """Loss curves (+ the objective's main metric) of both sides on shared axes, and a throughput bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = ["loss"] + [k for k in r.get("main_metrics", []) if k in r["curves"]]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.4), dpi=80)
    for ax, k in zip(axes, metrics):
        c = r["curves"][k]
        x = np.arange(1, len(c["trl"]) + 1)
        ax.plot(x, c["trl"], "o-", color="#ee4c2c", label="TRL (PyTorch)", markersize=4)
        ax.plot(x, c["trl_jax"], "x--", color="#3b6fd1", label="trl_jax (JAX)", markersize=5)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{k} (max rel. diff {r['max_rel'][k]:.1e})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    t = r["throughput"]
    use_tokens = t["trl"]["tokens_per_s"] and t["trl_jax"]["tokens_per_s"]
    vals = [t[s]["tokens_per_s"] if use_tokens else 1.0 / t[s]["step_s"] for s in ("trl", "trl_jax")]
    bars = ax.bar(["TRL", "trl_jax"], vals, color=["#ee4c2c", "#3b6fd1"])
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.0f}" if v >= 10 else f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8)
    ratio = vals[1] / vals[0] if vals[0] else float("nan")
    ax.set_title(("tokens/s" if use_tokens else "steps/s") + f" after warm-up (trl_jax/TRL {ratio:.2f}x)", fontsize=9)
    ax.set_xticks([0, 1], [f"TRL\n{r['devices']['trl']}"[:40], f"trl_jax\n{r['devices']['trl_jax']}"[:40]],
                  fontsize=7)
    same = " (step on the same completions: trl_jax's samples)" if r.get("sampling_differs") else ""
    fig.suptitle(f"trl-jax compare {r['command']}: {'within' if r['ok'] else 'NOT within'} rtol {r['rtol']:g}{same}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
