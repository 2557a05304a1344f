"""Koopman spectra, the energy budget and the generator split (QSF §2.2-2.4, §6.6).

For a layer's Koopman matrix K = e^{A dt} the eigenvalues lambda_k = e^{mu_k dt},
mu_k = -i omega_k + gamma_k, give per mode (QSF §2.2, decision D17)

  gamma_k = ln|lambda_k| / dt,        omega_k = -arg(lambda_k) / dt,

and the energy budget of QSF eqs. 6-8, with the sign convention of the spec
(Gamma_decay is a magnitude, >= 0):

  Gamma_decay  = sum_{k: gamma_k < 0} |gamma_k|,
  Gamma_growth = sum_{k: gamma_k > 0} gamma_k,
  Gamma_net    = sum_k gamma_k = Gamma_growth - Gamma_decay = Tr D,

and the net-dissipation criterion of eq. 9, Gamma_net < 0. Eqs. 6-8 split by the
*sign* of gamma, so Gamma_net = Gamma_growth - Gamma_decay holds exactly; the
*classes* (decay / neutral / growth) use the tolerance tau of decision D18,
|gamma| <= tau being neutral, and their per-class sums are reported separately.

The analysis (``spectral_analysis``, ``koopman_generator``, ``commutator_norm`` and
``projectors.effective_gain``) runs on the host in float64 (decision D15), whatever the input dtype and the
global JAX x64 flag; ``hamiltonian_koopman`` is a jittable JAX function.

The generator (``koopman_generator``, ``commutator_norm``,
``on_nonpositive_axis``) lives in ``koopman_log`` and the host-side checks
(``host_real``) in ``host_arrays``; both are re-exported here.
"""

from __future__ import annotations

import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from qsf_jax import _checks
from qsf_jax.physics.host_arrays import _nonneg, host_real
from qsf_jax.physics.koopman_log import (  # noqa: F401 (re-exported)
    _generator_record, commutator_norm, koopman_generator, on_nonpositive_axis)

_CLASSES = ("decay", "neutral", "growth")


def _host_matrices(K_list) -> np.ndarray:
  """Validates ``K_list`` and returns it as a float64 host array (L, d, d)."""
  if isinstance(K_list, (list, tuple)):
    if not K_list:
      raise ValueError("K_list must hold at least one (d, d) matrix, got an empty list")
    mats = [host_real(f"K_list[{i}]", K) for i, K in enumerate(K_list)]
    for i, K in enumerate(mats):
      _checks.check_square(f"K_list[{i}]", K)
      if K.shape != mats[0].shape:
        raise ValueError(f"K_list[{i}] has shape {K.shape}, but K_list[0] has {mats[0].shape}")
    K_LDD = np.stack(mats)
  else:
    K_LDD = host_real("K_list", K_list)
    if K_LDD.ndim == 2:
      raise ValueError(
          f"K_list must be a list of (d, d) matrices or a stacked (L, d, d) array, got "
          f"a single matrix of shape {K_LDD.shape}; pass [K] for one layer")
    _checks.check_square("K_list", K_LDD, batch_dims=1)
  if K_LDD.shape[0] == 0 or K_LDD.shape[-1] == 0:
    raise ValueError(f"K_list must be non-empty, got shape {K_LDD.shape}")
  if not np.all(np.isfinite(K_LDD)):
    raise ValueError("K_list has non-finite entries")
  return K_LDD


def _counts(gamma: np.ndarray, tol: float) -> dict:
  """Mode counts by class (decision D18): decay gamma < -tol, growth gamma > tol."""
  n_decay, n_growth = int(np.sum(gamma < -tol)), int(np.sum(gamma > tol))
  return {"decay": n_decay, "neutral": gamma.size - n_decay - n_growth, "growth": n_growth}


# |Gamma_net| up to this much per eigenvalue is round-off (a unitary K from expm gives
# ~1e-14 of either sign): neither net dissipative nor net growing (QSF §6.8 check 8).
ROUNDOFF_PER_MODE = 1e-9


def _budget(gamma: np.ndarray, tol: float, tols) -> dict:
  """The energy budget of QSF eqs. 6-9 for the rates ``gamma`` (n,)."""
  g_decay = float(-np.sum(gamma[gamma < 0]))
  g_growth = float(np.sum(gamma[gamma > 0]))
  g_net = float(np.sum(gamma))
  return {
      "counts": _counts(gamma, tol),
      "counts_by_tol": {f"{t:g}": _counts(gamma, t) for t in tols},
      "gamma_decay": g_decay,
      "gamma_growth": g_growth,
      "gamma_net": g_net,
      "gamma_by_class": {
          "decay": float(np.sum(gamma[gamma < -tol])),
          "neutral": float(np.sum(gamma[np.abs(gamma) <= tol])),
          "growth": float(np.sum(gamma[gamma > tol]))},
      "net_dissipative": bool(g_net < -ROUNDOFF_PER_MODE * gamma.size),
  }


def _slogdet_check(gamma: np.ndarray, logdet: float, dt: float, rtol: float):
  """Gamma_net against sum ln|det K| / dt (QSF §2.2: sum_k gamma_k = ln|det e^{A}|)."""
  if not np.isfinite(logdet):  # an exactly singular K: ln|det K| = -inf
    return None, False
  ref = logdet / dt
  scale = max(1.0, float(np.sum(np.abs(gamma))))
  return float(ref), bool(abs(float(np.sum(gamma)) - ref) <= rtol * scale)


def spectral_analysis(K_list, tol: float = 1e-2, dt: float = 1.0, *,
                      tols=(1e-3, 1e-2, 5e-2), commutator: bool = False,
                      floor: float = 1e-300, slogdet_rtol: float = 1e-6) -> dict:
  """Spectrum and energy budget of a stack of Koopman matrices (QSF §6.6, eqs. 4-9).

  Per eigenvalue lambda of each K^(l) (float64, host):
    gamma = ln(max(|lambda|, floor)) / dt,   omega = -arg(lambda) / dt,
  class decay if gamma < -tol, growth if gamma > tol, else neutral (D18). Budget
  (eqs. 6-8; Gamma_decay >= 0 is a magnitude):
    Gamma_decay = sum_{gamma<0} |gamma|,  Gamma_growth = sum_{gamma>0} gamma,
    Gamma_net = sum gamma = Gamma_growth - Gamma_decay,  net_dissipative: Gamma_net < 0
  beyond round-off (Gamma_net < -1e-9 per eigenvalue, ``ROUNDOFF_PER_MODE``: a
  unitary K gives |Gamma_net| ~ 1e-14 of either sign, and is not dissipative).
  ``gamma_by_class`` is the signed sum of gamma over each class's modes (so its
  "decay" entry is negative, and the three entries add up to Gamma_net).
  Consistency: Gamma_net = sum_l ln|det K^(l)| / dt (slogdet), accepted when
  |difference| <= slogdet_rtol * max(1, sum |gamma|); an exactly singular layer
  gives ``slogdet_gamma_net = None`` and ``slogdet_consistent = False``. The
  eigenvalues of a strongly non-normal K carry errors of about eps times their
  condition numbers, which slogdet (an LU) does not: ``False`` there says the
  rates are that inaccurate (8 x 8 K whose Schur forms have off-diagonal entries
  ~30 gave differences up to 1.7e-4 of sum |gamma|).

  Args:
    K_list: list/tuple of real (d, d) matrices, or a stacked (L, d, d) array
      (numpy or jax, any real dtype).
    tol: neutral tolerance tau on |gamma| (>= 0).
    dt: time step of K = e^{A dt} (> 0).
    tols: further tolerances for ``counts_by_tol`` (keys formatted with ``:g``).
    commutator: also compute A = logm(K)/dt per layer, its (H, D) split (eq. 1),
      ||[H, D]|| / (||H|| ||D||) and Tr D (under the key ``generator``), and
      ``commutator_max`` / ``commutator_mean`` over the ``commutator_layers``
      layers with a real logarithm (a layer without one keeps its record, split
      from the complex principal log, with ``logm_real`` False, but is left out
      of these: its (H, D) is not that of a real generator).
    floor: lower bound on |lambda| inside the log (> 0).
    slogdet_rtol: relative tolerance of the slogdet consistency check.

  Returns:
    A JSON-serialisable dict (python scalars, lists, dicts; no NaN or inf):
    ``counts``, ``counts_by_tol``, ``gamma_decay``, ``gamma_growth``,
    ``gamma_net``, ``gamma_by_class``, ``net_dissipative``, ``slogdet_gamma_net``,
    ``slogdet_consistent``, ``spectral_radius``, ``min_abs_eigenvalue``,
    ``argmax_layer`` (0-based), ``tol``, ``tols``, ``dt``, ``floor``,
    ``n_layers``, ``dim``, ``n_eigenvalues``, and ``layers``: per layer the same
    budget keys plus ``eigenvalues`` ([re, im] pairs, sorted by decreasing
    |lambda|), ``abs``, ``gamma``, ``omega``, ``classes`` and, with
    ``commutator=True``, ``generator``.
  """
  K_LDD = _host_matrices(K_list)
  _checks.check_time_step("dt", dt)
  for name, value in (("floor", floor), ("slogdet_rtol", slogdet_rtol)):
    _checks.check_positive(name, value)
    if not np.isfinite(value):  # +inf passes check_positive (a sigma may be infinite)
      raise ValueError(f"{name} must be finite and > 0, got {value}")
  tol = _nonneg("tol", tol)
  if isinstance(tols, (str, bytes)) or not hasattr(tols, "__iter__"):
    raise ValueError(f"tols must be a sequence of tolerances, e.g. (1e-3, 1e-2), got {tols!r}")
  tols = tuple(_nonneg(f"tols[{i}]", t) for i, t in enumerate(tols))
  dt, floor = float(dt), float(floor)

  layers, gammas, logdets = [], [], []
  for K_DD in K_LDD:
    lam = np.linalg.eigvals(K_DD)
    lam = lam[np.lexsort((np.angle(lam), -np.abs(lam)))]
    mag = np.abs(lam)
    gamma = np.log(np.maximum(mag, floor)) / dt
    omega = -np.angle(lam) / dt
    logdet = float(np.linalg.slogdet(K_DD)[1])
    slog, ok = _slogdet_check(gamma, logdet, dt, slogdet_rtol)
    rec = _budget(gamma, tol, tols)
    rec.update(
        slogdet_gamma_net=slog, slogdet_consistent=ok,
        spectral_radius=float(mag.max()), min_abs_eigenvalue=float(mag.min()),
        eigenvalues=[[float(z.real), float(z.imag)] for z in lam],
        abs=mag.tolist(), gamma=gamma.tolist(), omega=omega.tolist(),
        classes=[_CLASSES[int(g > tol) - int(g < -tol) + 1] for g in gamma])
    if commutator:
      rec["generator"] = _generator_record(K_DD, dt)
    layers.append(rec)
    gammas.append(gamma)
    logdets.append(logdet)

  gamma_all = np.concatenate(gammas)
  slog, ok = _slogdet_check(gamma_all, float(np.sum(logdets)), dt, slogdet_rtol)
  radii = [rec["spectral_radius"] for rec in layers]
  out = _budget(gamma_all, tol, tols)
  out.update(
      slogdet_gamma_net=slog, slogdet_consistent=ok,
      spectral_radius=float(max(radii)), argmax_layer=int(np.argmax(radii)),
      min_abs_eigenvalue=float(min(rec["min_abs_eigenvalue"] for rec in layers)),
      tol=tol, tols=list(tols), dt=dt, floor=floor, n_layers=int(K_LDD.shape[0]),
      dim=int(K_LDD.shape[-1]), n_eigenvalues=int(gamma_all.size), layers=layers)
  if commutator:  # over the layers whose K has a real generator (D17)
    comms = [r["generator"]["commutator"] for r in layers
             if r["generator"]["commutator"] is not None and r["generator"]["logm_real"]]
    out["commutator_max"] = float(max(comms)) if comms else None
    out["commutator_mean"] = float(np.mean(comms)) if comms else None
    out["commutator_layers"] = len(comms)
  return out


def hamiltonian_koopman(S):
  """Unitary Koopman matrix of the Hamiltonian ablation (QSF Stage IV, decision D8).

    K = expm(S - S^T),

  orthogonal (K^T K = I, all |lambda| = 1) because S - S^T is skew-symmetric,
  i.e. the generator has D = 0 (QSF §2.8).

  Args:
    S: free real parameter (..., d, d).

  Returns:
    K (..., d, d), same dtype as S (floating).
  """
  S = _checks.as_array("S", S)
  _checks.check_square("S", S, batch_dims=None)
  S = S.astype(_checks.result_dtype(S))
  return jsl.expm(S - jnp.swapaxes(S, -1, -2))
