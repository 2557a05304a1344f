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
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import scipy.linalg as sl

from qsf_jax import _checks
from qsf_jax.physics.generators import decompose_generator

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


def _refuse_tracer(name: str, x) -> None:
  """Refuses a tracer by name: the host-side tools need concrete values."""
  if isinstance(x, jax.core.Tracer):
    raise ValueError(
        f"{name} is traced (under jax.jit, vmap or grad), but this function runs on the "
        "host in float64 and returns numbers to read, not to differentiate: call it "
        "outside the transformation, on concrete arrays")


def host_real(name: str, x) -> np.ndarray:
  """Converts a finite real numeric array-like (numpy or jax) to float64 numpy.

  A tracer (the argument of a function under jit, vmap or grad) is refused by
  name: the spectral tools run on the host and return numbers to read.
  """
  if x is None:
    raise ValueError(f"{name} must be an array, got None")
  _refuse_tracer(name, x)
  arr = np.asarray(x)
  if np.iscomplexobj(arr):
    raise ValueError(
        f"{name} must be real (got dtype {arr.dtype}): a Koopman matrix is a real map")
  if arr.dtype.kind in "bOSUMm":
    raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
  try:
    arr = arr.astype(np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}") from e
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} has non-finite entries (NaN or inf)")
  return arr


def _nonneg(name: str, t) -> float:
  """A finite real number >= 0 as a python float, else ``ValueError``."""
  try:
    v = float(t)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a finite number >= 0, got {t!r}") from e
  if not (np.isfinite(v) and v >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {t!r}")
  return v


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


def commutator_norm(H, D, rtol: float = 1e-9) -> float:
  """Normalised commutator ||[H, D]||_F / (||H||_F ||D||_F) (QSF §2.2, §6.6).

  It is 0 exactly when H and D commute, i.e. when the frequencies omega_k come
  from H and the rates gamma_k from D alone. It is 0 by definition when H or D
  is 0, and a part of norm <= rtol (||H||_F + ||D||_F) counts as 0: a unitary
  K's logarithm has ||D|| ~ 1e-14 ||H|| from rounding, and the ratio of two
  rounding-sized numbers would report noise (up to ~1) for parts that commute.

  Args:
    H: Hermitian part of a generator (d, d), real or complex.
    D: dissipative part (d, d).
    rtol: relative size below which H or D counts as 0 (>= 0; 0 for the
      plain ratio whenever both norms are non-zero).
  """
  _refuse_tracer("H", H)
  _refuse_tracer("D", D)
  H, D = np.asarray(H), np.asarray(D)
  d = _checks.check_square("H", H)
  _checks.check_shape("D", D, (d, d))
  rtol = _nonneg("rtol", rtol)
  nH, nD = np.linalg.norm(H), np.linalg.norm(D)
  if min(nH, nD) <= rtol * (nH + nD):  # with rtol = 0: exactly when H or D is 0
    return 0.0
  return float(np.linalg.norm(H @ D - D @ H) / (nH * nD))


def on_nonpositive_axis(lam, rel: float = 1e-8) -> np.ndarray:
  """Which eigenvalues lie on (-inf, 0] to ``rel`` times the spectral radius (bool).

  Such eigenvalues leave K without a real logarithm (D17); rounding moves an
  eigenvalue that is on the half-line off it by about eps ||K||.
  """
  lam = np.asarray(lam)
  rho = float(np.max(np.abs(lam))) if lam.size else 0.0
  return (lam.real <= rel * rho) & (np.abs(lam.imag) <= rel * rho)


def koopman_generator(K, dt: float = 1.0):
  """Generator A = logm(K) / dt of a Koopman matrix K = e^{A dt} (decision D17, §6.4).

  The principal logarithm is real when K has no eigenvalue on (-inf, 0]; otherwise
  no real principal log exists and the complex one is returned. Eigenvalues within
  1e-8 ||K||-relative of that half-line count as on it (rounding moves them off
  it), and so does any K whose logarithm has an imaginary part beyond rounding
  (e.g. a Jordan block at -1, which the eigen-solver splits into a complex pair):
  the real part of such a logarithm is not a logarithm of K.

  Args:
    K: real Koopman matrix (d, d).
    dt: time step (> 0).

  Returns:
    (A, info): A float64 or complex128 (d, d), or None where K has an eigenvalue
    0; info a dict with ``logm_real`` (bool), ``nonpositive_real_eigenvalues``
    (int) and ``logm_rel_error`` = ||expm(A dt) - K||_1 / ||K||_1.
  """
  K = host_real("K", K)
  _checks.check_square("K", K)
  _checks.check_time_step("dt", dt)
  lam = np.linalg.eigvals(K)
  n_bad = int(np.sum(on_nonpositive_axis(lam)))
  info = {"logm_real": n_bad == 0, "nonpositive_real_eigenvalues": n_bad,
          "logm_rel_error": None}
  if np.any(lam == 0):
    return None, info
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # accuracy is reported below
    A = sl.logm(K)
  if n_bad == 0 and np.linalg.norm(np.imag(A)) > 1e-8 * max(1.0, np.linalg.norm(A)):
    info["logm_real"] = False  # e.g. a defective eigenvalue on the axis, split off it
  if info["logm_real"]:
    A = np.real(A)
  if not np.all(np.isfinite(A)):
    return None, info
  info["logm_rel_error"] = float(
      np.linalg.norm(sl.expm(A) - K, 1) / np.linalg.norm(K, 1))
  return A / dt, info


def _generator_record(K_DD: np.ndarray, dt: float) -> dict:
  """logm, the (H, D) split of QSF eq. 1 and the commutator for one layer."""
  A, info = koopman_generator(K_DD, dt)
  rec = dict(info, commutator=None, norm_H=None, norm_D=None, trace_D=None)
  if A is None:
    return rec
  with jax.enable_x64(True):
    H, D = (np.asarray(m) for m in decompose_generator(A))
  rec.update(commutator=commutator_norm(H, D), norm_H=float(np.linalg.norm(H)),
             norm_D=float(np.linalg.norm(D)), trace_D=float(np.real(np.trace(D))))
  return rec


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
