"""Figures of the Koopman spectra (QSF Fig. 2 analogue, eqs. 4-8, §6.6).

Every function takes plain arrays, returns a ``matplotlib.figure.Figure``
(object-oriented API, no pyplot state, rendered by Agg) and, given ``path``,
also writes it as a PNG.
"""

from __future__ import annotations

import numpy as np
from matplotlib import cm, colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110


def save(fig: Figure, path) -> Figure:
  """Writes ``fig`` as a PNG at ``path`` (if not None) and returns it."""
  if path is not None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
  return fig


def _layer_colours(n_layers: int):
  return colormaps["viridis"], Normalize(vmin=0, vmax=max(n_layers - 1, 1))


def plot_spectrum(eigs_per_layer, *, title: str = "", path=None) -> Figure:
  """Eigenvalues of every K^(l) in the complex plane, coloured by layer (Fig. 2 analogue).

  Left: the complex plane with the unit circle |lambda| = 1 (neutral modes,
  QSF §2.2). Right: the same points as (arg lambda, log10 |lambda|), where the
  unit circle is the line 0, decay lies below and growth above.

  Args:
    eigs_per_layer: list of L complex arrays (d,).
    title: figure title.
    path: PNG path, or None.
  """
  L = len(eigs_per_layer)
  if L == 0:
    raise ValueError("eigs_per_layer is empty")
  cmap, norm = _layer_colours(L)
  fig = Figure(figsize=(11, 4.8), layout="constrained")
  ax, ax2 = fig.subplots(1, 2)
  th = np.linspace(0, 2 * np.pi, 400)
  ax.plot(np.cos(th), np.sin(th), color="crimson", lw=1.2, label="|λ| = 1")
  ax2.axhline(0.0, color="crimson", lw=1.2, label="|λ| = 1")
  size = max(2.0, 30.0 / np.sqrt(max(1, sum(len(e) for e in eigs_per_layer)) / 64))
  for l, lam in enumerate(eigs_per_layer):
    lam = np.asarray(lam)
    c = [cmap(norm(l))]
    ax.scatter(lam.real, lam.imag, s=size, c=c, alpha=0.7, linewidths=0)
    with np.errstate(divide="ignore"):
      ax2.scatter(np.angle(lam), np.log10(np.maximum(np.abs(lam), 1e-300)), s=size, c=c,
                  alpha=0.7, linewidths=0)
  ax.set_aspect("equal", adjustable="datalim")
  ax.set_xlabel("Re λ")
  ax.set_ylabel("Im λ")
  ax.axhline(0, color="0.8", lw=0.5, zorder=0)
  ax.axvline(0, color="0.8", lw=0.5, zorder=0)
  ax.legend(loc="upper right", fontsize=8)
  ax2.set_xlabel("arg λ (rad)")
  ax2.set_ylabel("log10 |λ|")
  ax2.set_xlim(-np.pi * 1.02, np.pi * 1.02)
  ax2.legend(loc="upper right", fontsize=8)
  sm = cm.ScalarMappable(norm=norm, cmap=cmap)
  cbar = fig.colorbar(sm, ax=[ax, ax2], label="layer (0-based)", shrink=0.85)
  cbar.locator = MaxNLocator(integer=True)
  cbar.update_ticks()
  fig.suptitle(title or f"Koopman spectra, {L} layers")
  return save(fig, path)


def plot_log_abs_histogram(eigs_per_layer, *, tol: float = 1e-2, title: str = "",
                           path=None) -> Figure:
  """Histogram of log10 |lambda| over all layers, split by class at tolerance tol (D18).

  decay: ln|lambda| < -tol; neutral: |ln|lambda|| <= tol; growth: ln|lambda| > tol.

  Args:
    eigs_per_layer: list of L complex arrays (d,).
    tol: neutral tolerance on |ln|lambda||.
    title: figure title.
    path: PNG path, or None.
  """
  lam = np.concatenate([np.asarray(e) for e in eigs_per_layer])
  if lam.size == 0:
    raise ValueError("no eigenvalues to plot")
  mag = np.maximum(np.abs(lam), 1e-300)
  x = np.log10(mag)
  g = np.log(mag)
  lo, hi = float(x.min()), float(x.max())
  if hi - lo < 1e-9:
    lo, hi = lo - 0.05, hi + 0.05
  bins = np.linspace(lo, hi, 61)
  fig = Figure(figsize=(7.5, 4.2), layout="constrained")
  ax = fig.subplots()
  parts = [(x[g < -tol], "decay", "tab:blue"), (x[np.abs(g) <= tol], "neutral", "tab:gray"),
           (x[g > tol], "growth", "tab:red")]
  ax.hist([p[0] for p in parts], bins=bins, stacked=True, color=[p[2] for p in parts],
          label=[f"{p[1]} ({p[0].size})" for p in parts])
  ax.axvline(0.0, color="crimson", lw=1.0)
  for s in (-1, 1):
    ax.axvline(s * tol / np.log(10), color="crimson", lw=0.7, ls="--")
  ax.set_xlabel("log10 |λ|")
  ax.set_ylabel("eigenvalues")
  ax.legend(title=f"τ = {tol:g}", fontsize=8)
  ax.set_title(title or f"log10|λ| over {lam.size} eigenvalues")
  return save(fig, path)


def plot_layer_budget(radius_L, gamma_decay_L, gamma_growth_L, gamma_net_L, *,
                      g_eff_L=None, title: str = "", path=None) -> Figure:
  """Per-layer spectral radius (and G_eff) and energy budget (QSF eqs. 6-8, 11).

  Args:
    radius_L: spectral radius per layer (L,).
    gamma_decay_L: Gamma_decay per layer (L,) (>= 0).
    gamma_growth_L: Gamma_growth per layer (L,).
    gamma_net_L: Gamma_net per layer (L,).
    g_eff_L: mean G_eff per layer over validation tokens (L,), optional.
    title: figure title.
    path: PNG path, or None.
  """
  radius_L = np.asarray(radius_L, np.float64)
  L = radius_L.shape[0]
  for name, a in (("gamma_decay_L", gamma_decay_L), ("gamma_growth_L", gamma_growth_L),
                  ("gamma_net_L", gamma_net_L)):
    if np.shape(a) != (L,):
      raise ValueError(f"{name} must have shape ({L},), got {np.shape(a)}")
  idx = np.arange(L)
  fig = Figure(figsize=(11, 4.2), layout="constrained")
  ax, ax2 = fig.subplots(1, 2)
  ax.plot(idx, radius_L, "o-", color="tab:red", label="spectral radius max|λ|")
  if g_eff_L is not None:
    ax.plot(idx, np.asarray(g_eff_L, np.float64), "s-", color="tab:purple",
            label="mean G_eff (eq. 11)")
  ax.axhline(1.0, color="crimson", lw=0.8, ls="--")
  shown = np.concatenate([radius_L, np.asarray(g_eff_L if g_eff_L is not None else [],
                                               np.float64), [1.0]])
  shown = shown[np.isfinite(shown) & (shown > 0)]
  if shown.max() / shown.min() > 3.0:  # a log axis only where the values span a range
    ax.set_yscale("log")
  else:
    lo, hi = float(shown.min()), float(shown.max())
    pad = max(0.1 * (hi - lo), 0.05 * hi)
    ax.set_ylim(lo - pad, hi + pad)
  ax.set_xlabel("layer")
  ax.set_ylabel("|λ|")
  ax.legend(fontsize=8)
  ax.set_title("spectral radius per layer")
  w = 0.28
  ax2.bar(idx - w, -np.asarray(gamma_decay_L), w, color="tab:blue", label="-Γ_decay")
  ax2.bar(idx, np.asarray(gamma_growth_L), w, color="tab:red", label="Γ_growth")
  ax2.bar(idx + w, np.asarray(gamma_net_L), w, color="k", label="Γ_net")
  ax2.axhline(0.0, color="0.5", lw=0.6)
  ax2.set_xlabel("layer")
  ax2.set_ylabel("Σ ln|λ|")
  ax2.legend(fontsize=8)
  ax2.set_title("energy budget per layer (eqs. 6-8)")
  for a in (ax, ax2):
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
  if title:
    fig.suptitle(title)
  return save(fig, path)
