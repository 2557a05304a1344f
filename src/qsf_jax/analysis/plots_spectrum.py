"""Figures of the Koopman spectra (QSF Fig. 2 analogue, eqs. 4-8, §6.6).

Every function takes plain arrays, returns a ``matplotlib.figure.Figure``
(object-oriented API, no pyplot state, rendered by Agg) and, given ``path``,
also writes it (``save``).
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
from matplotlib import cm, colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110


def save(fig: Figure, path) -> Figure:
  """Writes ``fig`` at ``path`` (if not None) and returns it.

  The format is the extension's (``.png``, ``.pdf``, ``.svg``, ...; PNG for a
  path without one, at ``DPI``); missing parent folders are made.
  """
  if path is not None:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
  return fig


def _layer_colours(n_layers: int):
  return colormaps["viridis"], Normalize(vmin=0, vmax=max(n_layers - 1, 1))


def _finite_eigenvalues(eigs_per_layer) -> list[np.ndarray]:
  """The layers' eigenvalues as complex arrays; NaN or inf is refused by layer."""
  out = []
  for l, lam in enumerate(eigs_per_layer):
    lam = np.asarray(lam).astype(np.complex128).ravel()
    if not np.all(np.isfinite(lam)):
      raise ValueError(f"layer {l} has {int(np.sum(~np.isfinite(lam)))} non-finite "
                       "eigenvalue(s); a diverged K has no spectrum to plot")
    out.append(lam)
  return out


def _log10_abs(lam_all: np.ndarray) -> tuple[np.ndarray, float | None]:
  """log10 |lambda|, with exact zeros drawn one decade below the smallest nonzero |lambda|.

  Returns:
    The values and the level the zeros are drawn at (None when there is none).
  """
  mag = np.abs(lam_all)
  zero = mag == 0
  if not zero.any():
    return np.log10(mag), None
  level = math.floor(float(np.log10(mag[~zero].min()))) - 1.0 if (~zero).any() else -1.0
  out = np.full(mag.shape, level)
  out[~zero] = np.log10(mag[~zero])
  return out, level


def _check_rates(tol, dt) -> tuple[float, float]:
  tol, dt = float(tol), float(dt)
  if not (math.isfinite(tol) and tol >= 0):
    raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
  if not (math.isfinite(dt) and dt > 0):
    raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
  return tol, dt


def plot_spectrum(eigs_per_layer, *, tol: float = 1e-2, dt: float = 1.0, title: str = "",
                  path=None) -> Figure:
  """Eigenvalues of every K^(l) in the complex plane, coloured by layer (Fig. 2 analogue).

  Left: the complex plane with the unit circle |lambda| = 1 (neutral modes,
  QSF §2.2), cut at about the 99th percentile of |lambda| (the points beyond
  are counted in the corner). Right: the same points as (arg lambda,
  log10 |lambda|), where the unit circle is the line 0, decay lies below and
  growth above, and the dashed lines bound the neutral band |ln|lambda|| / dt
  <= tol (D18); its axis spans at least that band, so round-off about the
  unit circle (a unitary K) is not blown up. Exact zeros are drawn as
  crosses one decade below the smallest nonzero |lambda|.

  Args:
    eigs_per_layer: list of L complex arrays (d,), finite.
    tol: neutral tolerance tau on |gamma| = |ln|lambda|| / dt (D18), >= 0.
    dt: the step of K = e^{A dt}, > 0.
    title: figure title.
    path: output path (``save``), or None.
  """
  L = len(eigs_per_layer)
  if L == 0:
    raise ValueError("eigs_per_layer is empty")
  tol, dt = _check_rates(tol, dt)
  layers = _finite_eigenvalues(eigs_per_layer)
  lam_all = np.concatenate(layers)
  if lam_all.size == 0:
    raise ValueError("no eigenvalues to plot")
  y_all, zero_level = _log10_abs(lam_all)
  cmap, norm = _layer_colours(L)
  fig = Figure(figsize=(11, 4.8), layout="constrained")
  ax, ax2 = fig.subplots(1, 2)
  th = np.linspace(0, 2 * np.pi, 400)
  ax.plot(np.cos(th), np.sin(th), color="crimson", lw=1.2, label="|λ| = 1")
  ax2.axhline(0.0, color="crimson", lw=1.2, label="|λ| = 1")
  band = tol * dt / np.log(10)
  if band > 0:
    for sgn in (-1, 1):
      ax2.axhline(sgn * band, color="crimson", lw=0.7, ls="--",
                  label=f"neutral band, τ = {tol:g}" if sgn > 0 else None)
  size = max(2.0, 30.0 / np.sqrt(max(1, lam_all.size) / 64))
  start = 0
  for l, lam in enumerate(layers):
    y = y_all[start:start + lam.size]
    start += lam.size
    c = [cmap(norm(l))]
    ax.scatter(lam.real, lam.imag, s=size, c=c, alpha=0.7, linewidths=0)
    nz = lam != 0
    ax2.scatter(np.angle(lam[nz]), y[nz], s=size, c=c, alpha=0.7, linewidths=0)
    if (~nz).any():
      ax2.scatter(np.zeros(int((~nz).sum())), y[~nz], s=4 * size, c=c, marker="x",
                  linewidths=1.0)
  mag = np.abs(lam_all)
  lim = max(1.15, 1.1 * float(np.percentile(mag, 99)))
  ax.set_aspect("equal", adjustable="box")
  ax.set_xlim(-lim, lim)
  ax.set_ylim(-lim, lim)
  n_out = int(np.sum((np.abs(lam_all.real) > lim) | (np.abs(lam_all.imag) > lim)))
  if n_out:
    ax.text(0.02, 0.02, f"{n_out} beyond the axes (|λ| up to {mag.max():.3g})",
            transform=ax.transAxes, fontsize=8, va="bottom")
  ax.set_xlabel("Re λ")
  ax.set_ylabel("Im λ")
  ax.axhline(0, color="0.8", lw=0.5, zorder=0)
  ax.axvline(0, color="0.8", lw=0.5, zorder=0)
  ax.legend(loc="upper right", fontsize=8)
  lo, hi = float(y_all.min()), float(y_all.max())
  half = 1.5 * band if band > 0 else 0.05  # at least the neutral band, or +-0.05 decades
  if hi - lo < 2 * half and lo > -half and hi < half:
    ax2.set_ylim(-half, half)
  if zero_level is not None:
    ax2.text(0.02, 0.02, f"×: λ = 0 ({int(np.sum(mag == 0))}), drawn at 10^{zero_level:g}",
             transform=ax2.transAxes, fontsize=8, va="bottom")
  ax2.set_xlabel("arg λ (rad)")
  ax2.set_ylabel("log10 |λ|")
  ax2.set_xlim(-np.pi * 1.02, np.pi * 1.02)
  ax2.legend(loc="upper right", fontsize=8)
  if L > 1:  # one layer needs no colour scale
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    cbar = fig.colorbar(sm, ax=[ax, ax2], label="layer (0-based)", shrink=0.85)
    cbar.locator = MaxNLocator(integer=True)
    cbar.update_ticks()
  fig.suptitle(title or f"Koopman spectra, {L} layer{'s' if L > 1 else ''}")
  return save(fig, path)


def plot_log_abs_histogram(eigs_per_layer, *, tol: float = 1e-2, dt: float = 1.0,
                           title: str = "", path=None) -> Figure:
  """Histogram of log10 |lambda| over all layers, split by class at tolerance tol (D18).

  With gamma = ln|lambda| / dt (as ``spectral_analysis``): decay gamma < -tol;
  neutral |gamma| <= tol; growth gamma > tol. Exact zeros (decay) are counted
  in the legend and drawn in a bin one decade below the smallest nonzero |lambda|.

  Args:
    eigs_per_layer: list of L complex arrays (d,), finite.
    tol: neutral tolerance tau on |gamma| (>= 0).
    dt: the step of K = e^{A dt}, > 0.
    title: figure title.
    path: output path (``save``), or None.
  """
  tol, dt = _check_rates(tol, dt)
  layers = _finite_eigenvalues(eigs_per_layer)
  lam = np.concatenate(layers) if layers else np.zeros(0, np.complex128)
  if lam.size == 0:
    raise ValueError("no eigenvalues to plot")
  mag = np.abs(lam)
  x, zero_level = _log10_abs(lam)
  with np.errstate(divide="ignore"):
    g = np.log(mag) / dt  # -inf for exact zeros: decay
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
    ax.axvline(s * tol * dt / np.log(10), color="crimson", lw=0.7, ls="--")
  ax.set_xlabel("log10 |λ|")
  ax.set_ylabel("eigenvalues")
  ax.legend(title=f"τ = {tol:g}" + (f", dt = {dt:g}" if dt != 1.0 else ""), fontsize=8,
            loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
  if zero_level is not None:
    ax.text(0.02, 0.98, f"λ = 0: {int(np.sum(mag == 0))}, in the bin at {zero_level:g}",
            transform=ax.transAxes, fontsize=8, va="top")
  ax.set_title(title or f"log10|λ| over {lam.size} eigenvalues")
  return save(fig, path)


def plot_layer_budget(radius_L, gamma_decay_L, gamma_growth_L, gamma_net_L, *,
                      g_eff_L=None, roundoff: float = 0.0, title: str = "",
                      path=None) -> Figure:
  """Per-layer spectral radius (and G_eff) and energy budget (QSF eqs. 6-8, 11).

  Args:
    radius_L: spectral radius per layer (L,).
    gamma_decay_L: Gamma_decay per layer (L,) (>= 0).
    gamma_growth_L: Gamma_growth per layer (L,).
    gamma_net_L: Gamma_net per layer (L,).
    g_eff_L: mean G_eff per layer over validation tokens (L,), optional.
    roundoff: a layer's |Gamma| up to this is round-off (>= 0; e.g.
      ``spectral.ROUNDOFF_PER_MODE * d``). When every bar is within it (a
      unitary K), the budget axis spans +-roundoff and says so, instead of
      drawing the round-off as full-height bars.
    title: figure title.
    path: output path (``save``), or None.
  """
  radius_L = np.asarray(radius_L, np.float64)
  if radius_L.ndim != 1 or radius_L.shape[0] == 0:
    raise ValueError(f"radius_L must have shape (L,) with L >= 1, got {radius_L.shape}")
  L = radius_L.shape[0]
  for name, a in (("gamma_decay_L", gamma_decay_L), ("gamma_growth_L", gamma_growth_L),
                  ("gamma_net_L", gamma_net_L)) + ((("g_eff_L", g_eff_L),)
                                                   if g_eff_L is not None else ()):
    if np.shape(a) != (L,):
      raise ValueError(f"{name} must have shape ({L},), got {np.shape(a)}")
  roundoff = float(roundoff)
  if not (math.isfinite(roundoff) and roundoff >= 0):
    raise ValueError(f"roundoff must be a finite number >= 0, got {roundoff!r}")
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
  bars = np.abs(np.concatenate([np.asarray(a, np.float64) for a in
                                (gamma_decay_L, gamma_growth_L, gamma_net_L)]))
  bars = bars[np.isfinite(bars)]
  if roundoff > 0 and bars.size and bars.max() <= roundoff:
    ax2.set_ylim(-roundoff, roundoff)
    ax2.text(0.5, 0.9, f"every |Γ| <= {roundoff:.2g}: zero to round-off",
             transform=ax2.transAxes, ha="center", fontsize=8)
  ax2.set_xlabel("layer")
  ax2.set_ylabel("Σ ln|λ|")
  ax2.legend(fontsize=8, loc="lower right")
  ax2.set_title("energy budget per layer (eqs. 6-8)")
  for a in (ax, ax2):
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
  if title:
    fig.suptitle(title)
  return save(fig, path)
