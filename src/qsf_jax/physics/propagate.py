"""Gaussian path-integral propagators over one token interval (QSF eqs. 56-58).

The path weight exp(-S_K - S_meas) (QSF eqs. 52-55) maps a start point x0 to
Z * N(mean, precision^{-1}). ``mode="paper"`` (QSF eqs. 57-58, spec §6.2)
updates the Koopman prior N(mu_K, Sigma_K) by one endpoint measurement
x_tgt ~ N(M x, (sigma_m^2/dt) I), M = W_V; ``mode="kalman_bucy"`` (spec §6.3) is
the exact marginal of the running measurement cost
(1/2 sigma_m^2) int |M x - x_tgt|^2 dt, the Kalman-Bucy solution, through a
Hamiltonian matrix exponential. In both, log Z = log E_free[exp(-S_meas)]
(0 for sigma_m = inf). The signatures follow spec §6.2:
``propagate(x0, A, b, x_tgt, M=W_V, dt=1, sigma_m=1, sigma_K=1, mode="paper")``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from qsf_jax import _checks
from qsf_jax.physics.generators import koopman_affine, koopman_cov

MODES = ("paper", "kalman_bucy")
FORMS = ("auto", "information", "gain")


class GaussianState(NamedTuple):
  """A Gaussian N(mean, precision^{-1}) over the hidden state (QSF eq. 56).

  Attributes:
    mean: mean mu (..., d).
    precision: precision Lambda (..., d, d), symmetric positive definite.
  """
  mean: jax.Array
  precision: jax.Array


class GaussianPropagator(NamedTuple):
  """The propagator Z * N(mean, covariance) with both precision and covariance.

  Attributes:
    mean: mean mu (..., d).
    precision: Lambda = covariance^{-1} (..., d, d).
    covariance: P = Lambda^{-1} (..., d, d).
    log_normalizer: log Z = log E_prior[exp(-S_meas)] (...,), <= 0.
  """
  mean: jax.Array
  precision: jax.Array
  covariance: jax.Array
  log_normalizer: jax.Array


def _sym(X):
  return 0.5 * (X + jnp.swapaxes(X, -1, -2))


def _spd_inv_logdet(X_DD):
  """Inverse and log-determinant of a symmetric positive-definite matrix."""
  c = jsl.cho_factor(X_DD, lower=True)
  inv = _sym(jsl.cho_solve(c, jnp.eye(X_DD.shape[-1], dtype=X_DD.dtype)))
  return inv, 2.0 * jnp.sum(jnp.log(jnp.diagonal(c[0])))


def check_finite_positive(name: str, value) -> None:
  """Raises ``ValueError`` for a concrete value that is not finite and > 0."""
  _checks.check_positive(name, value)
  try:
    v = np.asarray(value)
  except Exception:  # a tracer: cannot be checked at trace time
    return
  if v.dtype != object and not np.all(np.isfinite(v)):
    raise ValueError(f"{name} must be finite and > 0, got {value}")


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
    v = _checks._concrete(value)
    if v is None:
      raise ValueError(
          f"n_sub='auto' chooses the number of exact sub-steps from the values of A, M, "
          f"dt, sigma_m and sigma_K, but {name} is traced here (inside jit, vmap or "
          f"grad); pass an int n_sub, e.g. qsf_jax.exact_substeps(A, M, dt, sigma_m, "
          f"sigma_K) computed outside the transformation")
    vals[name] = v.astype(np.float64)
  _checks.check_time_step("dt", dt)
  _checks.check_positive("sigma_m", sigma_m)
  check_finite_positive("sigma_K", sigma_K)
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


def measurement_update(prior_mean, prior_cov, x_tgt, M, obs_precision, *, form="gain"):
  """Bayesian update of a Gaussian prior by one linear measurement (QSF eqs. 16-20).

  Prior N(mu_0, Sigma_0), likelihood x_tgt ~ N(M x, r^{-1} I) with r the
  measurement precision (r = dt/sigma^2 for QSF eqs. 57-58). Information form
  (QSF eqs. 16-17, 19):

    Lambda = Sigma_0^{-1} + r M^T M,  mu = Lambda^{-1}(Sigma_0^{-1} mu_0 + r M^T x_tgt).

  Gain (Kalman) form (QSF eq. 20, spec §6.2), written with r so that r = 0
  (sigma = inf) is exact and no Sigma_0^{-1} is needed:

    G = r Sigma_0 M^T (r M Sigma_0 M^T + I)^{-1},  mu = mu_0 + G (x_tgt - M mu_0),
    P = (I - G M) Sigma_0 (I - G M)^T + r^{-1} G G^T   (Joseph form, PSD).

  The log-normaliser is log int N(x; mu_0, Sigma_0) exp(-(r/2)|M x - x_tgt|^2) dx:
  -1/2 log det(I + r M Sigma_0 M^T) - (r/2) e^T (I + r M Sigma_0 M^T)^{-1} e with
  e = x_tgt - M mu_0 (gain form), or, by completing the square (QSF eq. 18),
  -1/2 log det(Sigma_0 Lambda) - 1/2 (mu_0^T Sigma_0^{-1} mu_0 + r |x_tgt|^2 - eta^T mu).

  Args:
    prior_mean: mu_0 (d,).
    prior_cov: Sigma_0 (d, d), symmetric positive definite (the gain form's mean
      and covariance also accept a singular one; the precision is then inf).
    x_tgt: measured target in value space (d,).
    M: measurement matrix, W_V (d, d).
    obs_precision: r >= 0, scalar (0 means no measurement).
    form: "gain" (also "auto") or "information".

  Returns:
    GaussianPropagator with mean (d,), precision and covariance (d, d), and the
    scalar log_normalizer.
  """
  _checks.check_choice("form", form, FORMS)
  mu0 = _checks.as_array("prior_mean", prior_mean)
  _checks.check_ndim("prior_mean", mu0, 1)
  d = mu0.shape[0]
  S0 = _checks.as_array("prior_cov", prior_cov)
  _checks.check_shape("prior_cov", S0, (d, d))
  y = _checks.as_array("x_tgt", x_tgt)
  _checks.check_shape("x_tgt", y, (d,))
  M = _checks.as_array("M", M)
  _checks.check_shape("M", M, (d, d))
  _checks.check_shape("obs_precision", jnp.asarray(obs_precision), ())
  dtype = _checks.result_dtype(mu0, S0, y, M)
  mu0, S0, y, M = (a.astype(dtype) for a in (mu0, S0, y, M))
  eye = jnp.eye(d, dtype=mu0.dtype)
  r = jnp.asarray(obs_precision, mu0.dtype)
  if form == "information":
    S0inv, logdet_S0 = _spd_inv_logdet(S0)
    Lam = _sym(S0inv + r * (M.T @ M))
    eta = S0inv @ mu0 + r * (M.T @ y)
    P, logdet_Lam = _spd_inv_logdet(Lam)
    mu = P @ eta
    quad = mu0 @ (S0inv @ mu0) + r * (y @ y) - eta @ mu
    log_z = -0.5 * (logdet_S0 + logdet_Lam) - 0.5 * quad
    return GaussianPropagator(mu, Lam, P, log_z)
  B = _sym(r * (M @ S0 @ M.T) + eye)
  cB = jsl.cho_factor(B, lower=True)
  G = jsl.cho_solve(cB, r * (M @ S0)).T
  J = jsl.cho_solve(cB, jnp.sqrt(r) * (M @ S0)).T  # G / sqrt(r), finite at r = 0
  e = y - M @ mu0
  mu = mu0 + G @ e
  IGM = eye - G @ M
  P = _sym(IGM @ S0 @ IGM.T + J @ J.T)
  Lam, _ = _spd_inv_logdet(P)
  log_z = (-jnp.sum(jnp.log(jnp.diagonal(cB[0])))
           - 0.5 * r * (e @ jsl.cho_solve(cB, e)))
  return GaussianPropagator(mu, Lam, P, log_z)


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
    M: measurement matrix W_V (d, d).
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
  arrs = {"m": m, "P": P, "b": b, "x_tgt": x_tgt, "M": M}
  for name, shape in (("m", (d,)), ("P", (d, d)), ("b", (d,)), ("x_tgt", (d,)),
                      ("M", (d, d))):
    arrs[name] = _checks.as_array(name, arrs[name])
    _checks.check_shape(name, arrs[name], shape)
  dtype = _checks.result_dtype(A, *arrs.values())
  m_D, P_DD, b, x_tgt, M = (arrs[k].astype(dtype) for k in ("m", "P", "b", "x_tgt", "M"))
  A, n = A.astype(dtype), d + 1
  _check_scalars(dt, sigma_m, sigma_K)
  n_sub = _resolve_substeps(n_sub, A, M, dt, sigma_m, sigma_K)
  inv_s2 = 1.0 / jnp.asarray(sigma_m, dtype) ** 2
  g_D = inv_s2 * (M.T @ x_tgt)
  Ah = jnp.zeros((n, n), dtype).at[:d, :d].set(A).at[:d, d].set(b)
  Qh = jnp.zeros((n, n), dtype).at[:d, :d].set(
      jnp.asarray(sigma_K, dtype) ** 2 * jnp.eye(d, dtype=dtype))
  Rh = (jnp.zeros((n, n), dtype).at[:d, :d].set(inv_s2 * (M.T @ M)).at[:d, d].set(-g_D)
        .at[d, :d].set(-g_D).at[d, d].set(inv_s2 * (x_tgt @ x_tgt)))
  Hh = jnp.concatenate([jnp.concatenate([Ah, Qh], axis=1),
                        jnp.concatenate([Rh, -Ah.T], axis=1)], axis=0)
  h = jnp.asarray(dt, dtype) / n_sub
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

  Ph0 = jnp.zeros((n, n), dtype).at[:d, :d].set(P_DD)
  mh0 = jnp.concatenate([m_D, jnp.ones((1,), dtype)])
  (mh, Ph, log_z), _ = jax.lax.scan(sub_step, (mh0, Ph0, jnp.zeros((), dtype)), None,
                                    length=n_sub)
  Lam, _ = _spd_inv_logdet(Ph[:d, :d])
  return GaussianPropagator(mh[:d], Lam, Ph[:d, :d], log_z)


def _check_scalars(dt, sigma_m, sigma_K):
  _checks.check_time_step("dt", dt)
  _checks.check_positive("sigma_m", sigma_m)
  check_finite_positive("sigma_K", sigma_K)


def _validate(x0, A, b, x_tgt, M):
  """Checks shapes/dtypes and casts every array to one real floating dtype."""
  A = _checks.as_array("A", A)
  d = _checks.check_square("A", A)
  x0 = _checks.as_array("x0", x0)
  if x0.ndim > 1 and x0.shape[-1] == d:
    raise ValueError(f"x0 must have shape ({d},), got {tuple(x0.shape)}: the propagators take "
                     "one state; map over a batch with jax.vmap")
  _checks.check_shape("x0", x0, (d,))
  b = _checks.as_array("b", b)
  _checks.check_shape("b", b, (d,))
  x_tgt = _checks.as_array("x_tgt", x_tgt)
  _checks.check_shape("x_tgt", x_tgt, (d,))
  if M is None:
    dtype = _checks.result_dtype(x0, A, b, x_tgt)
    M = jnp.eye(d, dtype=dtype)
  else:
    M = _checks.as_array("M", M)
    _checks.check_shape("M", M, (d, d))
    dtype = _checks.result_dtype(x0, A, b, x_tgt, M)
  return tuple(a.astype(dtype) for a in (x0, A, b, x_tgt, M))


def propagate_full(x0, A, b, x_tgt, M=None, dt=1.0, sigma_m=1.0, sigma_K=1.0,
                   mode="paper", *, form="auto", n_sub="auto") -> GaussianPropagator:
  """One-interval Gaussian propagator with covariance and log-normaliser (QSF eqs. 56-58).

  ``mode="paper"`` (QSF eqs. 57-58): prior N(mu_K, Sigma_K) from the free
  Koopman flow (QSF eq. 58, ``koopman_affine``/``koopman_cov``), then

    Lambda = Sigma_K^{-1} + (dt/sigma_m^2) M^T M,                      (eq. 57)
    mu = Lambda^{-1} [Sigma_K^{-1} mu_K + (dt/sigma_m^2) M^T x_tgt],   (eq. 58)

  computed in the gain form (``form="auto"`` or ``"gain"``; well-behaved as
  dt -> 0 and sigma_m -> inf) or literally (``form="information"``); see
  ``measurement_update``. ``mode="kalman_bucy"``: the exact path-integral
  propagator of the running measurement (spec §6.3; see ``kalman_bucy_step``),
  for which ``form`` has no effect. For small dt the paper form's mean shift is
  twice the exact one.

  Args:
    x0: initial state (d,).
    A: real generator (d, d); may be singular.
    b: bias (d,).
    x_tgt: context-aggregated target in value space (d,).
    M: measurement matrix, the value projection W_V (d, d); None means the
      identity.
    dt: interval length, scalar > 0.
    sigma_m: measurement noise, scalar > 0; jnp.inf switches the measurement
      off (mu = mu_K, Lambda = Sigma_K^{-1}).
    sigma_K: Koopman noise, finite scalar > 0.
    mode: "paper" or "kalman_bucy" (static).
    form: "auto", "gain" or "information" (static; paper mode only).
    n_sub: exact sub-steps of the Kalman-Bucy mode: a static int >= 1, or
      "auto" (``exact_substeps``, from the values of A, M, dt, sigma_m and
      sigma_K, so not under jit/vmap/grad over them); see ``kalman_bucy_step``.

  Returns:
    GaussianPropagator: mean (d,), precision (d, d), covariance (d, d) and
    log_normalizer (scalar), log Z = log E_free[exp(-S_meas)].
  """
  _checks.check_choice("mode", mode, MODES)
  _checks.check_choice("form", form, FORMS)
  x0, A, b, x_tgt, M = _validate(x0, A, b, x_tgt, M)
  _check_scalars(dt, sigma_m, sigma_K)
  check_substeps(n_sub)
  if mode == "kalman_bucy":
    n_sub = _resolve_substeps(n_sub, A, M, dt, sigma_m, sigma_K)
    return kalman_bucy_step(x0, jnp.zeros_like(A), A, b, x_tgt, M, dt=dt, sigma_m=sigma_m,
                            sigma_K=sigma_K, n_sub=n_sub)
  Phi, c = koopman_affine(A, b, dt)
  mu_K = Phi @ x0 + c
  Sigma_K = koopman_cov(A, sigma_K, dt)
  r = jnp.asarray(dt, x0.dtype) / jnp.asarray(sigma_m, x0.dtype) ** 2
  return measurement_update(mu_K, Sigma_K, x_tgt, M, r,
                            form="information" if form == "information" else "gain")


def propagate(x0, A, b, x_tgt, M=None, dt=1.0, sigma_m=1.0, sigma_K=1.0, mode="paper", *,
              form="auto", n_sub="auto") -> GaussianState:
  """Gaussian propagator G(x_T, dt | x0) ~ N(mu, Lambda^{-1}) (QSF eqs. 56-58).

  Paper form (QSF eqs. 57-58):
    Lambda = Sigma_K^{-1} + (dt/sigma_m^2) M^T M,
    mu = Lambda^{-1} [Sigma_K^{-1} mu_K + (dt/sigma_m^2) M^T x_tgt],
  with mu_K = e^{A dt} x0 + (int_0^dt e^{As} ds) b,
  Sigma_K = sigma_K^2 int_0^dt e^{As} e^{A^T s} ds and M = W_V.
  ``mode="kalman_bucy"`` gives the exact endpoint marginal of the running
  measurement (spec §6.3). ``propagate_full`` also returns the covariance and
  the log-normaliser.

  Args:
    x0: initial state (d,).
    A: real generator (d, d).
    b: bias (d,).
    x_tgt: target in value space (d,).
    M: measurement matrix W_V (d, d), or None (identity).
    dt: interval length > 0.
    sigma_m: measurement noise > 0 (inf allowed).
    sigma_K: Koopman noise, finite > 0.
    mode: "paper" or "kalman_bucy".
    form: "auto" (gain), "gain" or "information".
    n_sub: exact sub-steps (Kalman-Bucy mode only): an int >= 1 or "auto"
      (``exact_substeps``; pass an int under jit/vmap/grad over A, M, dt or sigma).

  Returns:
    GaussianState(mean (d,), precision (d, d)).
  """
  full = propagate_full(x0, A, b, x_tgt, M, dt, sigma_m, sigma_K, mode, form=form,
                        n_sub=n_sub)
  return GaussianState(full.mean, full.precision)
