"""Figures of training history, propagators and SSE ensembles (QSF Fig. 1, §6.2-6.7).

Same conventions as ``plots_spectrum``: arrays in, a ``Figure`` out, written
(``plots_spectrum.save``) when ``path`` is given.
"""

from __future__ import annotations

import numpy as np
from matplotlib import cm, colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qsf_jax.analysis.plots_spectrum import _layer_colours, save


def plot_alpha(steps_S, alpha_SL, *, source: str = "", path=None) -> Figure:
  """Learned measurement strength alpha_l over training (QSF Fig. 1 analogue).

  Left: alpha_l against step, one line per layer. Right: the last recorded
  alpha_l against depth l (the paper: 1.05-1.35, increasing with depth).

  Args:
    steps_S: training steps (S,).
    alpha_SL: alpha per step and layer (S, L).
    source: where the values come from (for the title).
    path: output path (``plots_spectrum.save``), or None.
  """
  steps_S = np.asarray(steps_S)
  alpha_SL = np.asarray(alpha_SL, np.float64)
  if alpha_SL.ndim != 2 or alpha_SL.shape[0] != steps_S.shape[0] or steps_S.size == 0:
    raise ValueError(f"alpha_SL must be (S, L) with S = len(steps_S) > 0, got "
                     f"{alpha_SL.shape} and {steps_S.shape}")
  L = alpha_SL.shape[1]
  cmap, norm = _layer_colours(L)
  fig = Figure(figsize=(11, 4.2), layout="constrained")
  ax, ax2 = fig.subplots(1, 2)
  for l in range(L):
    ax.plot(steps_S, alpha_SL[:, l], "o-" if steps_S.size < 20 else "-", ms=3,
            color=cmap(norm(l)), lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel("α_l")
  ax.set_title(f"α per layer over training{f' ({source})' if source else ''}")
  cbar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
  cbar.locator = MaxNLocator(integer=True)
  cbar.update_ticks()
  ax2.plot(np.arange(L), alpha_SL[-1], "o-", color="tab:green")
  ax2.axhspan(1.05, 1.35, color="tab:green", alpha=0.12, label="paper: 1.05-1.35")
  ax2.set_xlabel("layer")
  ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax2.set_ylabel("α_l")
  ax2.set_title(f"α at step {int(steps_S[-1])}")
  ax2.legend(fontsize=8)
  return save(fig, path)


def plot_losses(curves: dict, *, mark_step: int | None = None, path=None) -> Figure:
  """Training and validation loss against step (nats).

  Args:
    curves: ``{"train": (steps, loss), "eval": (steps, loss)}`` (either may be empty).
    mark_step: the step of the analysed checkpoint, marked with a vertical line
      where the curves go on past it (None: no mark).
    path: output path (``plots_spectrum.save``), or None.
  """
  fig = Figure(figsize=(6.5, 4), layout="constrained")
  ax = fig.subplots()
  last = -np.inf
  for kind, style in (("train", "-"), ("eval", "o-")):
    steps, loss = curves.get(kind, (np.zeros(0), np.zeros(0)))
    if len(steps):
      ax.plot(steps, loss, style, ms=4, label=kind)
      last = max(last, float(np.max(steps)))
  if mark_step is not None and mark_step < last:
    ax.axvline(mark_step, color="0.4", lw=0.9, ls="--", label=f"analysed step {mark_step}")
  ax.set_xlabel("step")
  ax.set_ylabel("cross entropy (nats)")
  ax.legend()
  ax.set_title("loss")
  return save(fig, path)


def plot_stage_losses(curves_by_stage: dict, *, title: str = "", path=None) -> Figure:
  """Training (left) and validation (right) loss of several runs against their own step.

  Each progressive stage (QSF spec D12) restarts its step count, so the curves
  share the x axis "step within the stage"; a stage initialised from its
  parent starts below a stage trained from scratch.

  Args:
    curves_by_stage: ``{stage: {"train": (steps, loss), "eval": (steps, loss)}}`` in
      plotting order (``history.loss_curves`` of each run).
    title: figure title.
    path: output path (``plots_spectrum.save``), or None.
  """
  if not curves_by_stage:
    raise ValueError("curves_by_stage is empty: no run to plot")
  fig = Figure(figsize=(11, 4), layout="constrained")
  ax_tr, ax_ev = fig.subplots(1, 2, sharey=True)
  colours = colormaps["tab10"]
  for i, (stage, curves) in enumerate(curves_by_stage.items()):
    c = colours(i % 10)
    steps, loss = curves.get("train", (np.zeros(0), np.zeros(0)))
    if len(steps):
      ax_tr.plot(steps, loss, "-", color=c, lw=1.2, label=stage)
    steps, loss = curves.get("eval", (np.zeros(0), np.zeros(0)))
    if len(steps):
      ax_ev.plot(steps, loss, "o-", color=c, ms=4, label=stage)
  for ax, name in ((ax_tr, "training loss"), (ax_ev, "validation loss")):
    ax.set_xlabel("step within the stage")
    ax.set_title(name)
    ax.grid(alpha=0.3)
  ax_tr.set_ylabel("cross entropy (nats)")
  ax_ev.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return save(fig, path)


def plot_propagation(prop: dict, labels, *, layer: int, path=None) -> Figure:
  """Propagator means of one layer along a sentence, paper and exact (QSF eqs. 57-58, §6.3).

  Top: ||mean|| per token for the free prior K u + b, the paper and exact
  propagator means and the layer's actual update. Bottom: relative deviation
  ||mean - update|| / ||update||.

  Args:
    prop: the output of ``propagation.propagate_sentence`` (with ``step_ND``).
    labels: token strings (N,) for the x axis.
    layer: the layer index (title).
    path: output path (``plots_spectrum.save``), or None.
  """
  n = prop["prior"].shape[0]
  if len(labels) != n:
    raise ValueError(f"labels has {len(labels)} entries for {n} tokens")
  x = np.arange(n)
  fig = Figure(figsize=(max(8.0, 0.22 * n + 3), 6.2), layout="constrained")
  ax, ax2 = fig.subplots(2, 1, sharex=True)
  series = [("prior", "free prior K u + b", "0.5", "--", "."),
            ("paper", "paper form (eqs. 57-58)", "tab:blue", "-", "."),
            ("exact", "exact (Kalman-Bucy)", "tab:orange", "none", "o")]
  for key, lab, col, ls, mk in series:
    ax.plot(x, np.linalg.norm(prop[key], axis=1), ls=ls, color=col, marker=mk, ms=4,
            mfc="none" if key == "exact" else col, label=lab)
  if "step" in prop:
    ax.plot(x, np.linalg.norm(prop["step"], axis=1), "-", color="k", marker=".",
            label="layer update h^(l+1) - h^(l)")
  ax.set_ylabel("‖mean‖")
  ax.legend(fontsize=8)
  ax.set_title(f"layer {layer}: one-token propagators along a validation sentence "
               f"({prop['variant']} variant)")
  for key, col, ls, mk in (("dev_prior", "0.5", "--", "."), ("dev_paper", "tab:blue", "-", "."),
                           ("dev_exact", "tab:orange", "none", "o")):
    if key in prop:
      ax2.plot(x, prop[key], ls=ls, color=col, marker=mk, ms=4,
               mfc="none" if key == "dev_exact" else col, label=key[4:])
  ax2.set_ylabel("‖mean − layer update‖ / ‖update‖")
  ax2.set_yscale("log")
  ax2.legend(fontsize=8)
  ax2.set_xticks(x)
  ax2.set_xticklabels([repr(s)[1:-1] for s in labels], rotation=90, fontsize=7)
  return save(fig, path)


def plot_sse(sse: dict, *, layer: int, token: str = "", path=None) -> Figure:
  """SSE ensemble over one token interval (QSF eq. 43/42, §6.7).

  Left: ||x(t)|| per path, the ensemble mean and the unmeasured flow. Right:
  the distance to the measured state x* (W_V x* = x_tgt): measurement pulls the paths
  towards the target (collapse).

  Args:
    sse: the output of ``propagation.sse_ensemble``.
    layer: the layer index (title).
    token: the token the interval belongs to (title).
    path: output path (``plots_spectrum.save``), or None.
  """
  t = sse["t"]
  fig = Figure(figsize=(11, 4.2), layout="constrained")
  axes = fig.subplots(1, 2)
  for ax, key, free, lab in ((axes[0], "norm", "free_norm", "‖x(t)‖"),
                             (axes[1], "dist", "free_dist", "‖x(t) − x*‖, W_V x* = x_tgt")):
    paths = np.asarray(sse[key], np.float64)
    for p in paths:
      ax.plot(t, p, color="tab:blue", lw=0.6, alpha=0.35)
    ok = np.isfinite(paths)
    with np.errstate(invalid="ignore"):
      mean = np.where(ok, paths, 0.0).sum(axis=0) / ok.sum(axis=0)
    ax.plot(t, mean, color="navy", lw=2, label="ensemble mean (finite paths)")
    ax.plot(t, sse[free], color="k", lw=1.5, ls="--", label="no measurement (σ = ∞)")
    ax.set_xlabel("t (one token interval)")
    ax.set_ylabel(lab)
    ax.legend(fontsize=8)
  fig.suptitle(f"SSE ({sse['sse_variant']}, eq. {'43' if sse['sse_variant'] == 'paper' else '42'}) "
               f"from layer {layer}'s operators ("
               f"{'surrogate K − I' if sse['variant_dynamics'] == 'discrete' else 'logm(K)'}"
               " generator), "
               f"{paths.shape[0]} paths{f', token {token!r}' if token else ''}; "
               "states scaled by 1/‖x0‖")
  return save(fig, path)


def plot_occupancy(layers: list, *, path=None) -> Figure:
  """Top-mode occupancy enrichment of the special-token categories per layer (QSF §4.4).

  enrichment = mean top-mode occupancy over a category's tokens / mean over all
  tokens; > 1 means the category occupies the largest-|lambda| mode more.

  Args:
    layers: per layer the summary dict of ``modes.TokenOccupancy.summary``.
    path: output path (``plots_spectrum.save``), or None.
  """
  L = len(layers)
  fig = Figure(figsize=(8, 4.2), layout="constrained")
  ax = fig.subplots()
  cats = sorted({c for rec in layers for c in rec.get("categories", {})})
  for c in cats:
    y = [rec["categories"].get(c, {}).get("enrichment") for rec in layers]
    y = np.array([np.nan if v is None else v for v in y], np.float64)
    if np.any(np.isfinite(y)):
      ax.plot(np.arange(L), y, "o-", label=c)
  ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
  ax.set_xlabel("layer")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel("occupancy enrichment")
  ax.set_title("which tokens occupy each layer's largest-|λ| mode")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, "no special-category token in the analysed sequences",
            ha="center", va="center", transform=ax.transAxes)
  return save(fig, path)
