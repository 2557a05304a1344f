"""Exact running-measurement propagator by a Hamiltonian exponential (spec §6.3).

``kalman_bucy_step`` is the closed-form Kalman-Bucy solution over one interval
(the exact endpoint marginal of QSF eqs. 52-55); ``exact_substeps`` chooses how
many exact sub-steps keep it well conditioned (``n_sub="auto"``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from qsf_jax import _checks, _checks_values
from qsf_jax.physics.gaussian import (GaussianPropagator, _spd_inv_logdet, _sym,
                                      check_scalars)


# Largest nu h per exact sub-step (``exact_substeps``): float64 means agree with a
# tight ODE solve to ~1e-13 and float32 ones to ~1e-5 up to here; nu h = 16 already
# loses digits (float32 log Z by up to 10%).
SUBSTEP_NU_DT = 8.0


def exact_substeps(A, M=None, dt=1.0, sigma_m=1.0, sigma_K=1.0) -> int:
  """Sub-steps that keep the Kalman-Bucy exponential well conditioned (spec §6.3).

    nu = |A|_2 + sigma_K |M|_2 / sigma_m,    n_sub = max(1, ceil(nu dt / 8)).

  The Hamiltonian matrix of ``kalman_bucy_step`` has eigenvalues of size up to
  about nu (its measurement block [[0, sigma_K^2 I], [M^T M / sigma_m^2, 0]] has
  eigenvalues +-sigma_K s_i(M) / sigma_m), and the closed form cancels terms of
  size e^{nu h}; with nu h <= 8 per sub-step both float64 and float32 keep their
  accuracy. This is what ``n_sub="auto"`` uses; it needs concrete values, so
  under ``jit``, ``vmap`` or ``grad`` over these arguments call it outside and
  pass the int.

  Args:
    A: generator (d, d), or per-token generators (N, d, d) (the largest counts).
    M: measurement matrix (d, d), or None (identity).
    dt: interval length, scalar > 0.
    sigma_m: measurement noise, scalar > 0 (inf: no measurement).
    sigma_K: Koopman noise, finite scalar > 0.

  Returns:
    n_sub, an int >= 1.

  Raises:
    ValueError: if an argument is traced, not finite where it must be, or
      badly shaped.
  """
  vals = {}
  for name, value in (("A", A), ("M", M), ("dt", dt), ("sigma_m", sigma_m),
                      ("sigma_K", sigma_K)):
    if value is None:
      continue
    v = _checks_values._concrete(value)
    if v is None:
      raise ValueError(
          f"n_sub='auto' chooses the number of exact sub-steps from the values of A, M, "
          f"dt, sigma_m and sigma_K, but {name} is traced here (inside jit, vmap or "
          f"grad); pass an int n_sub, e.g. qsf_jax.exact_substeps(A, M, dt, sigma_m, "
          f"sigma_K) computed outside the transformation")
    vals[name] = v.astype(np.float64)
  check_scalars(dt, sigma_m, sigma_K)
  A_v = vals["A"]
  if A_v.ndim not in (2, 3) or A_v.shape[-1] != A_v.shape[-2]:
    raise ValueError(f"A must have shape (d, d) or (N, d, d), got {A_v.shape}")
  if not (np.all(np.isfinite(A_v)) and (M is None or np.all(np.isfinite(vals["M"])))):
    raise ValueError("A and M must be finite to choose n_sub (n_sub='auto')")
  norm_M = 1.0 if M is None else float(np.linalg.norm(vals["M"], 2))
  nu = float(np.max(np.linalg.norm(A_v, 2, axis=(-2, -1)))) + (
      float(vals["sigma_K"]) * norm_M / float(vals["sigma_m"]))
  return max(1, int(np.ceil(nu * float(vals["dt"]) / SUBSTEP_NU_DT)))


def check_substeps(n_sub) -> None:
  """Raises ``ValueError`` unless ``n_sub`` is "auto" or an int >= 1."""
  if isinstance(n_sub, str) and n_sub == "auto":
    return
  if isinstance(n_sub, bool) or not isinstance(n_sub, (int, np.integer)) or n_sub < 1:
    raise ValueError(f"n_sub must be 'auto' or an integer >= 1, got {n_sub!r}")


def _resolve_substeps(n_sub, A, M, dt, sigma_m, sigma_K) -> int:
  """``n_sub`` itself, or ``exact_substeps`` for "auto"."""
  check_substeps(n_sub)
  if n_sub == "auto":
    return exact_substeps(A, M, dt, sigma_m, sigma_K)
  return int(n_sub)



def kalman_bucy_step(m, P, A, b, x_tgt, M, *, dt, sigma_m, sigma_K, n_sub="auto"):
  """Exact running-measurement propagator from N(m, P), in closed form (spec §6.3).

  The endpoint marginal of exp(-S_K - S_meas) (QSF eqs. 52-55) over [0, dt] with
  a constant target and x(0) ~ N(m0, P0) is Z * N(m(dt), P(dt)), the Kalman-Bucy
  solution

    m' = A m + b + P M^T (x_tgt - M m) / sigma_m^2,           m(0) = m0,
    P' = A P + P A^T + sigma_K^2 I - P M^T M P / sigma_m^2,    P(0) = P0.

  Derivation (no ODE solver). Homogenise with a constant coordinate, xh = [x; 1],
  Ah = [[A, b], [0, 0]], Qh = diag(sigma_K^2 I, 0), Rh = [[R, -g], [-g^T, 2c]]
  with R = M^T M/sigma_m^2, g = M^T x_tgt/sigma_m^2, c = |x_tgt|^2/(2 sigma_m^2), so the
  running cost is (1/2) xh^T Rh xh. Let Hh = [[Ah, Qh], [Rh, -Ah^T]] (Hamiltonian)
  and F = expm(Hh dt) [[I, Ph0], [0, I]] = [[F11, F12], [F21, F22]], Ph0 = diag(P0, 0)
  (the shear accounts for the initial spread; F is symplectic).

  * Riccati: P = X Y^{-1} with [X; Y]' = Hh [X; Y], [X; Y](0) = [Ph0; I], so
    diag(P(dt), 0) = F12 F22^{-1}.
  * Mean: the endpoint mode solves the Euler-Lagrange two-point problem
    [x; lam]' = Hh [x; lam] (lam = (xdot - A x - b)/sigma_K^2) with
    x(0) = mh0 + Ph0 lam(0) and the free end lam(dt) = 0, so
    mh(dt) = (F11 - F12 F22^{-1} F21) mh0 = F22^{-T} mh0 (symplectic Schur complement).
  * Normaliser: the Feynman-Kac value function is 1/2 xh^T W xh + kappa with
    W = F22^{-1} F21 and kappa' = 1/2 tr(Qh W), which integrates to
    1/2 (log det F22 + dt tr A); so
    log Z = -1/2 mh0^T W mh0 - 1/2 log det F22 - 1/2 dt tr A.

  The exponential grows like e^{nu dt}, nu ~ |A| + sigma_K |M|/sigma_m, and the
  formulas cancel terms of that size, so the interval is split into ``n_sub``
  exact sub-steps (chained with the same formulas, carrying P and accumulating
  log Z); ``n_sub="auto"`` takes nu h <= 8 (``exact_substeps``). A single step
  at nu dt ~ 40 gave a positive log Z of 4e10 and a wrong mean.

  Args:
    m: initial mean (d,).
    P: initial covariance (d, d), PSD (zeros for a known start point).
    A: generator (d, d).
    b: bias (d,).
    x_tgt: target in value space (d,).
    M: measurement matrix W_V (d, d), or None (the identity, as in ``propagate``).
    dt: interval length, scalar > 0.
    sigma_m: measurement noise, scalar > 0 (inf: no measurement).
    sigma_K: Koopman noise, scalar > 0.
    n_sub: number of equal exact sub-steps (static int >= 1), or "auto"
      (``exact_substeps``; needs concrete A, M, dt, sigma_m and sigma_K).

  Returns:
    GaussianPropagator (mean (d,), precision and covariance (d, d), log Z).
  """
  A = _checks.as_array("A", A)
  d = _checks.check_square("A", A)
  if M is None:
    M = jnp.eye(d, dtype=_checks.result_dtype(A))
  arrs = {"m": m, "P": P, "b": b, "x_tgt": x_tgt, "M": M}
  for name, shape in (("m", (d,)), ("P", (d, d)), ("b", (d,)), ("x_tgt", (d,)),
                      ("M", (d, d))):
    arrs[name] = _checks.as_array(name, arrs[name])
    _checks.check_shape(name, arrs[name], shape)
  _checks.check_covariance("P", arrs["P"])
  dtype = _checks.result_dtype(A, *arrs.values())
  m_D, P_DD, b, x_tgt, M = (arrs[k].astype(dtype) for k in ("m", "P", "b", "x_tgt", "M"))
  A = A.astype(dtype)
  check_scalars(dt, sigma_m, sigma_K)
  n_sub = _resolve_substeps(n_sub, A, M, dt, sigma_m, sigma_K)
  return _kalman_bucy(m_D, P_DD, A, b, x_tgt, M, jnp.asarray(dt, dtype),
                      jnp.asarray(sigma_m, dtype), jnp.asarray(sigma_K, dtype), n_sub=n_sub)


@functools.partial(jax.jit, static_argnames=("n_sub",))
def _kalman_bucy(m_D, P_DD, A, b, x_tgt, M, dt, sigma_m, sigma_K, *, n_sub):
  """``kalman_bucy_step``'s numerics on validated arrays of one dtype (one compiled
  program per shape, dtype and n_sub; the arguments are as there, dt and the
  sigmas as scalar arrays)."""
  d = A.shape[0]
  n = d + 1
  inv_s2 = (1.0 / sigma_m) ** 2  # its gradient is 0, not NaN, at sigma_m = inf
  g_D = inv_s2 * (M.T @ x_tgt)
  Ah = jnp.zeros((n, n), A.dtype).at[:d, :d].set(A).at[:d, d].set(b)
  Qh = jnp.zeros((n, n), A.dtype).at[:d, :d].set(sigma_K ** 2 * jnp.eye(d, dtype=A.dtype))
  Rh = (jnp.zeros((n, n), A.dtype).at[:d, :d].set(inv_s2 * (M.T @ M)).at[:d, d].set(-g_D)
        .at[d, :d].set(-g_D).at[d, d].set(inv_s2 * (x_tgt @ x_tgt)))
  Hh = jnp.concatenate([jnp.concatenate([Ah, Qh], axis=1),
                        jnp.concatenate([Rh, -Ah.T], axis=1)], axis=0)
  h = dt / n_sub
  E = jsl.expm(Hh * h)
  E11, E12, E21, E22 = E[:n, :n], E[:n, n:], E[n:, :n], E[n:, n:]

  def sub_step(carry, _):
    mh, Ph, log_z = carry
    F12, F22 = E11 @ Ph + E12, E21 @ Ph + E22
    lu = jsl.lu_factor(F22)
    W = jsl.lu_solve(lu, E21)
    log_z = (log_z - 0.5 * (mh @ (W @ mh)) - 0.5 * jnp.linalg.slogdet(F22)[1]
             - 0.5 * h * jnp.trace(A))
    Ph = _sym(jsl.lu_solve(lu, F12.T, trans=1).T).at[d, :].set(0.0).at[:, d].set(0.0)
    return (jsl.lu_solve(lu, mh, trans=1).at[d].set(1.0), Ph, log_z), None

  Ph0 = jnp.zeros((n, n), A.dtype).at[:d, :d].set(P_DD)
  mh0 = jnp.concatenate([m_D, jnp.ones((1,), A.dtype)])
  (mh, Ph, log_z), _ = jax.lax.scan(sub_step, (mh0, Ph0, jnp.zeros((), A.dtype)), None,
                                    length=n_sub)
  Lam, _ = _spd_inv_logdet(Ph[:d, :d])
  return GaussianPropagator(mh[:d], Lam, Ph[:d, :d], log_z)
