"""Figure of the separation sweep: error vs state dimension, complex vs real (spec §2.5).

One column per N. Top row: expected KL to the target; bottom row: rms
double-centred log error with the Eckart-Young lower bound curve for
affine-softmax models of dimension D. Complex models are drawn at their
complex dimension: N (their realification has real dimension 2N), or n for the
``complex_dims`` rows ``complex_d<n>`` (hollow markers). Works for
both tasks of ``sweep`` (T_N and the Born-logit variant of spec §2.6).
"""

from __future__ import annotations

import re

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
BORN_LOGIT_STYLES = {  # rows of the Born-logit task (spec §2.6)
    "real": STYLES["real"],
    "complex": dict(color="tab:red", marker="s", label="complex U(N) + Born-logit, all learned"),
    "complex_fixed_head": dict(color="tab:orange", marker="D",
                               label="complex U(N) + Born-logit, fixed explicit head"),
    "complex_hardcoded": dict(color="black", marker="*",
                              label="complex U(N) + Born-logit, explicit (spec §2.6)"),
    "real_hardcoded": dict(color="tab:cyan", marker="X",
                           label="real SO(D*) adjoint + affine-softmax, explicit (spec §2.6)"),
}


RANKED_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive")  # complex_r{r}, r = 2, 3, ...


def _style(model: str, task: str = "pairwise"):
  """The plot style of a row of ``task``, or None for rows the figure leaves out.

  A row of another complex dimension n (``complex_d<n>``, ``complex_r<r>_d<n>``)
  takes its family's colour with a hollow marker and names n in its label.
  """
  styles = BORN_LOGIT_STYLES if task == "born_logit" else STYLES
  if model in styles:
    return styles[model]
  wider = re.fullmatch(r"(complex(?:_r\d+)?)_d(\d+)", model)
  if wider:
    base = _style(wider.group(1), task)
    return None if base is None else dict(
        base, fillstyle="none", label=f"{base['label']}, complex dimension {wider.group(2)}")
  rank = model[len("complex_r"):]
  if model.startswith("complex_r") and rank.isdigit():
    head = "rank-{} Born-logit form" if task == "born_logit" else "Born, rank-{} POVM"
    return dict(color=RANKED_COLORS[(int(rank) - 2) % len(RANKED_COLORS)], marker="P",
                label=f"complex U(N) + {head.format(rank)}, all learned")
  return None  # e.g. the complex_fixed_dynamics diagnostics (table only)


def _tick_labels(ticks, span, min_gap=0.05):
  """Labels for sorted ticks; a tick closer than min_gap * span to the next one gets none
  (e.g. D* - 1 next to D*), so the later tick keeps its label."""
  labels = [str(t) for t in ticks]
  for i in range(len(ticks) - 1):
    if ticks[i + 1] - ticks[i] < min_gap * span:
      labels[i] = ""
  return labels


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
  task_name = results["config"].get("task", "pairwise")
  fig, axes = plt.subplots(2, len(Ns), figsize=(4.6 * len(Ns), 7.5), squeeze=False)
  for col, N in enumerate(Ns):
    task = results["tasks"][str(N)]
    ax_kl, ax_rms = axes[0, col], axes[1, col]
    runs = [r for r in results["runs"] if r["N"] == N]
    for model in dict.fromkeys(r["model"] for r in runs):
      style = _style(model, task_name)
      rs = [r for r in runs if r["model"] == model]
      if style is None:
        continue
      for ax, key, floor in ((ax_kl, "kl", KL_FLOOR), (ax_rms, "rms_log_err", KL_FLOOR)):
        x = [_xpos(r) for r in rs]
        med = [max(np.median(r[key]), floor) for r in rs]
        ax.plot(x, med, linestyle="-" if model == "real" else "none", markersize=8, **style)
        for r in rs:  # every seed, faint
          vals = np.maximum(np.asarray(r[key]), floor)
          hollow = style.get("fillstyle") == "none"
          ax.scatter([_xpos(r)] * vals.size, vals, edgecolors=style["color"], alpha=0.3, s=12,
                     facecolors="none" if hollow else style["color"])
    d = np.asarray(task["bound_dims"])
    b = np.asarray(task["bound"])
    keep = (d >= 1) & (d < task["rank"])  # the bound is exactly 0 from D = rank on
    ax_rms.step(d[keep], b[keep], where="mid", color="gray", linestyle="--",
                label="Eckart-Young lower bound (affine-softmax, dim D); 0 from D = "
                      "rank(J log P* J) on")
    if task_name == "born_logit":
      marks = ((task["exact_real_dim"], "D*"),)
      title = f"Born-logit task ({task['contexts']}), N = {N} (K = {task['K']})"
    else:
      marks = ((N * N, "N²"), (task["K"] - 1, "K-1"))
      title = f"T_N, N = {N} (K = {task['K']} outputs)"
    ticks = sorted({r["dim"] for r in runs} | {x for x, _ in marks})
    for ax in (ax_kl, ax_rms):
      ax.set_yscale("log")
      ax.set_ylim(bottom=KL_FLOOR / 3)
      ax.set_xlim(0, max(ticks) + 1)
      ax.set_xticks(ticks, _tick_labels(ticks, span=max(ticks) + 1))
      for xv, lab in marks:
        ax.axvline(xv, color="lightgray", linewidth=1)
        ax.text(xv, 0.02, " " + lab, transform=ax.get_xaxis_transform(), fontsize=8,
                color="gray")
      ax.grid(True, which="major", alpha=0.3)
    ax_kl.set_title(title)
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
