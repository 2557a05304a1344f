"""Figure of the separation sweep: error vs state dimension, complex vs real (spec §2.5).

One column per N. Top row: expected KL to the target; bottom row: rms
double-centred log error with the Eckart-Young lower bound curve for
affine-softmax models of dimension D. Complex models are drawn at their
complex dimension N (their realification has real dimension 2N).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KL_FLOOR = 1e-16  # KL values below this (rounding, possibly negative) are drawn here
STYLES = {
    "real": dict(color="tab:blue", marker="o", label="real SO(D) + affine-softmax (trained)"),
    "complex": dict(color="tab:red", marker="s",
                    label="complex U(N) + Born, rank-1 POVM, all learned"),
    "complex_fixed_povm": dict(color="tab:orange", marker="D",
                               label="complex U(N) + Born, fixed POVM"),
    "complex_hardcoded": dict(color="black", marker="*", label="complex U(N), explicit (spec §2.4)"),
    "realified": dict(color="tab:green", marker="^", label="realified SO(2N) + quadratic (trained)"),
    "realified_hardcoded": dict(color="tab:green", marker="x",
                                label="realified SO(2N) + quadratic, explicit"),
}


RANKED_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive")  # complex_r{r}, r = 2, 3, ...


def _style(model: str):
  """The plot style of a row, or None for rows the figure leaves out."""
  if model in STYLES:
    return STYLES[model]
  rank = model[len("complex_r"):]
  if model.startswith("complex_r") and rank.isdigit():
    return dict(color=RANKED_COLORS[(int(rank) - 2) % len(RANKED_COLORS)], marker="P",
                label=f"complex U(N) + Born, rank-{rank} POVM, all learned")
  return None  # e.g. the complex_fixed_dynamics diagnostics (table only)


def _xpos(run):
  """Complex models at N (complex dimension); real models at their real dimension."""
  return run["dim"]


def plot_results(results: dict, path: str) -> None:
  """Writes the sweep figure as a PNG.

  Args:
    results: the dict returned by ``sweep.run_sweep``.
    path: output file name (.png).
  """
  Ns = sorted(int(n) for n in results["tasks"])
  fig, axes = plt.subplots(2, len(Ns), figsize=(4.6 * len(Ns), 7.5), squeeze=False)
  for col, N in enumerate(Ns):
    task = results["tasks"][str(N)]
    ax_kl, ax_rms = axes[0, col], axes[1, col]
    runs = [r for r in results["runs"] if r["N"] == N]
    for model in dict.fromkeys(r["model"] for r in runs):
      style = _style(model)
      rs = [r for r in runs if r["model"] == model]
      if style is None:
        continue
      for ax, key, floor in ((ax_kl, "kl", KL_FLOOR), (ax_rms, "rms_log_err", KL_FLOOR)):
        x = [_xpos(r) for r in rs]
        med = [max(np.median(r[key]), floor) for r in rs]
        ax.plot(x, med, linestyle="-" if model == "real" else "none", markersize=8, **style)
        for r in rs:  # every seed, faint
          vals = np.maximum(np.asarray(r[key]), floor)
          ax.scatter([_xpos(r)] * vals.size, vals, color=style["color"], alpha=0.3, s=12)
    d = np.asarray(task["bound_dims"])
    b = np.asarray(task["bound"])
    keep = (d >= 1) & (d < task["K"] - 1)  # the bound is exactly 0 from D = K - 1 on
    ax_rms.step(d[keep], b[keep], where="mid", color="gray", linestyle="--",
                label="Eckart-Young lower bound (affine-softmax, dim D); 0 for D >= K-1")
    ticks = sorted({r["dim"] for r in runs} | {N * N, task["K"] - 1})
    for ax in (ax_kl, ax_rms):
      ax.set_yscale("log")
      ax.set_ylim(bottom=KL_FLOOR / 3)
      ax.set_xlim(0, max(ticks) + 1)
      ax.set_xticks(ticks)
      for xv, lab in ((N * N, "N²"), (task["K"] - 1, "K-1")):
        ax.axvline(xv, color="lightgray", linewidth=1)
        ax.text(xv, 0.02, " " + lab, transform=ax.get_xaxis_transform(), fontsize=8,
                color="gray")
      ax.grid(True, which="major", alpha=0.3)
    ax_kl.set_title(f"T_N, N = {N} (K = {task['K']} outputs)")
    ax_kl.set_ylabel("expected KL(p* || model) [nats]")
    ax_rms.set_ylabel("rms double-centred log error")
    ax_rms.set_xlabel("state dimension (complex: N; real: D)")
  handles, labels = [], []
  for ax in (axes[0, 0], axes[1, 0]):
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
