"""The generator of a Koopman matrix: the real logarithm A = logm(K) / dt (decision
D17, QSF §6.4) and its split A = -iH + D (QSF eq. 1) with the normalised
commutator ||[H, D]|| (QSF §2.2, §6.6).

Runs on the host in float64 (decision D15). Re-exported by ``spectral``, whose
``spectral_analysis(commutator=True)`` adds these per layer.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import scipy.linalg as sl

from qsf_jax import _checks
from qsf_jax.physics.generators import decompose_generator
from qsf_jax.physics.host_arrays import _nonneg, host_real, refuse_tracer


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
  refuse_tracer("H", H)
  refuse_tracer("D", D)
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
