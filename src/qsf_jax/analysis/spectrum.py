"""Spectrum summary of a stack of Koopman matrices (QSF eqs. 4-9, §4.4, §6.6; D17, D18).

``spectrum_summary`` runs ``qsf_jax.physics.spectral_analysis`` in float64 with
the reporting tolerances of decision D18 and adds what the report shows:

* mode counts per class for every tolerance tau (decay gamma < -tau, neutral
  |gamma| <= tau, growth gamma > tau, gamma = ln|lambda|);
* the spectral radius per layer and its argmax layer;
* the energy budget Gamma_decay, Gamma_growth, Gamma_net (QSF eqs. 6-8) with
  the slogdet check Gamma_net = sum_l ln|det K^(l)|;
* the net-dissipation verdict Gamma_net < 0 (QSF eq. 9);
* the unit-circle check of the Hamiltonian ablation (QSF §3.5, D18: Stage IV
  must be 100% neutral at tau = 1e-6 in float64).
"""

from __future__ import annotations

import numpy as np

from qsf_jax.physics.spectral import ROUNDOFF_PER_MODE, spectral_analysis

REPORT_TOLS = (1e-3, 1e-2, 5e-2)
UNIT_CIRCLE_TOL = 1e-6


def unit_circle_check(K_LDD, tol: float = UNIT_CIRCLE_TOL) -> dict:
  """Whether every eigenvalue lies on the unit circle (QSF §3.5, D18).

    on_circle  <=>  |gamma_k| = |ln|lambda_k|| <= tol   for every k, every layer.

  Args:
    K_LDD: Koopman matrices, a stacked (L, d, d) real array or a list of (d, d).
    tol: tolerance on |ln|lambda|| (D18: 1e-6 in float64).

  Returns:
    ``{"tol", "neutral", "n_eigenvalues", "neutral_fraction", "max_abs_log_abs",
    "all_on_unit_circle"}``.
  """
  res = spectral_analysis(K_LDD, tol=tol, tols=())
  gam = np.concatenate([np.asarray(r["gamma"]) for r in res["layers"]])
  n = int(gam.size)
  neutral = int(res["counts"]["neutral"])
  return {"tol": float(tol), "neutral": neutral, "n_eigenvalues": n,
          "neutral_fraction": neutral / n, "max_abs_log_abs": float(np.max(np.abs(gam))),
          "all_on_unit_circle": neutral == n}


def spectrum_summary(K_LDD, *, tol: float = 1e-2, tols=REPORT_TOLS,
                     commutator: bool = False, unit_circle: bool = False) -> dict:
  """Spectral analysis for the report (QSF §6.6, eqs. 4-9).

  Per eigenvalue lambda of each K^(l): gamma = ln|lambda|, omega = -arg(lambda);
  Gamma_decay = sum_{gamma<0} |gamma|, Gamma_growth = sum_{gamma>0} gamma,
  Gamma_net = sum gamma (eqs. 6-8), checked against sum_l ln|det K^(l)|
  (``slogdet_gamma_net``); ``net_dissipative`` is Gamma_net < 0 beyond round-off
  (eq. 9; ``spectral_analysis``).

  Args:
    K_LDD: Koopman matrices (L, d, d) (or a list of (d, d)), real.
    tol: primary neutral tolerance tau (D18).
    tols: tolerances for the count table (D18: 1e-3, 1e-2, 5e-2).
    commutator: also report logm(K), its (H, D) split and ||[H, D]|| (slow for
      large d: one matrix logarithm per layer).
    unit_circle: add ``unit_circle`` = ``unit_circle_check(K_LDD)``.

  Returns:
    The ``spectral_analysis`` dict (JSON-serialisable) plus ``radius_per_layer``
    (list of L floats), ``gamma_net_per_layer``, ``slogdet_abs_error`` (or None),
    ``verdict`` (one sentence) and, if requested, ``unit_circle``.
  """
  res = spectral_analysis(K_LDD, tol=tol, tols=tuple(tols), commutator=commutator)
  res["radius_per_layer"] = [r["spectral_radius"] for r in res["layers"]]
  res["gamma_net_per_layer"] = [r["gamma_net"] for r in res["layers"]]
  slog = res["slogdet_gamma_net"]
  res["slogdet_abs_error"] = None if slog is None else abs(res["gamma_net"] - slog)
  res["verdict"] = verdict(res)
  if unit_circle:
    res["unit_circle"] = unit_circle_check(K_LDD)
  return res


def verdict(res: dict, atol_per_mode: float = ROUNDOFF_PER_MODE) -> str:
  """One sentence on net dissipation (QSF eq. 9: Gamma_net = Tr D < 0).

  |Gamma_net| <= atol_per_mode * (number of eigenvalues) counts as balanced (the
  Hamiltonian ablation, where Gamma_net = 0 up to round-off).
  """
  g = res["gamma_net"]
  if abs(g) <= atol_per_mode * res["n_eigenvalues"]:
    return (f"balanced: Gamma_net = {g:.3g}, zero to round-off (neither net dissipation "
            "nor net gain)")
  if res["net_dissipative"]:
    return (f"net dissipative: Gamma_net = {g:.4g} < 0 (Gamma_growth {res['gamma_growth']:.4g} "
            f"< Gamma_decay {res['gamma_decay']:.4g}), as QSF eq. 9 states")
  return (f"not net dissipative: Gamma_net = {g:.4g} > 0 (Gamma_growth "
          f"{res['gamma_growth']:.4g} > Gamma_decay {res['gamma_decay']:.4g})")


def eigenvalues_per_layer(res: dict) -> list[np.ndarray]:
  """The complex eigenvalues of each layer from a ``spectral_analysis`` dict.

  Args:
    res: the output of ``spectrum_summary`` or ``spectral_analysis``.

  Returns:
    A list of L complex128 arrays (d,), sorted by decreasing |lambda|.
  """
  return [np.asarray(r["eigenvalues"], np.float64) @ np.array([1.0, 1j])
          for r in res["layers"]]


def compact(res: dict) -> dict:
  """``res`` without the per-eigenvalue lists (for a short JSON summary)."""
  drop = ("eigenvalues", "abs", "gamma", "omega", "classes")
  out = {k: v for k, v in res.items() if k != "layers"}
  out["layers"] = [{k: v for k, v in r.items() if k not in drop} for r in res["layers"]]
  return out
