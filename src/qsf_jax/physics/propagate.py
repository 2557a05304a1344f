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

import functools

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from qsf_jax import _checks
# GaussianState, check_finite_positive, exact_substeps, check_substeps and
# kalman_bucy_step are re-exported: they were defined here before.
from qsf_jax.physics.gaussian import (GaussianPropagator, GaussianState,  # noqa: F401
                                      _spd_inv_logdet, _sym, check_finite_positive,
                                      check_scalars)
from qsf_jax.physics.generators import _affine_map, _affine_squarings, _doubled_cov
from qsf_jax.physics.kalman_bucy import (SUBSTEP_NU_DT, _resolve_substeps,  # noqa: F401
                                         check_substeps, exact_substeps, kalman_bucy_step)

MODES = ("paper", "kalman_bucy")
FORMS = ("auto", "information", "gain")


def measurement_update(prior_mean, prior_cov, x_tgt, M, obs_precision, *, form="gain"):
  """Bayesian update of a Gaussian prior by one linear measurement (QSF eqs. 16-20).

  Prior N(mu_0, Sigma_0), likelihood x_tgt ~ N(M x, r^{-1} I) with r the
  measurement precision (r = dt/sigma^2 for QSF eqs. 57-58). Information form
  (QSF eqs. 16-17, 19):

    Lambda = Sigma_0^{-1} + r M^T M,  mu = Lambda^{-1}(Sigma_0^{-1} mu_0 + r M^T x_tgt).

  Gain (Kalman) form (QSF eq. 20, spec §6.2), written with r so that r = 0
  (sigma = inf) is exact and no Sigma_0^{-1} is needed:

    G = r Sigma_0 M^T (r M Sigma_0 M^T + I)^{-1},  mu = mu_0 + G (x_tgt - M mu_0),
    P = (I - G M) Sigma_0 (I - G M)^T + r^{-1} G G^T   (Joseph form, PSD),

  with r^{-1} G G^T evaluated as r H H^T, H = G / r, so that P and its derivatives
  are finite at r = 0.

  The log-normaliser is log int N(x; mu_0, Sigma_0) exp(-(r/2)|M x - x_tgt|^2) dx:
  -1/2 log det(I + r M Sigma_0 M^T) - (r/2) e^T (I + r M Sigma_0 M^T)^{-1} e with
  e = x_tgt - M mu_0 (gain form), or, by completing the square (QSF eq. 18),
  -1/2 log det(Sigma_0 Lambda) - 1/2 (mu_0^T Sigma_0^{-1} mu_0 + r |x_tgt|^2 - eta^T mu).

  Args:
    prior_mean: mu_0 (d,).
    prior_cov: Sigma_0 (d, d), symmetric positive definite (the gain form's mean
      and covariance also accept a singular one, whose precision is not finite).
      A concrete one that is not finite, symmetric and positive semi-definite is
      an error.
    x_tgt: measured target in value space (d,).
    M: measurement matrix, W_V (d, d).
    obs_precision: r >= 0, finite scalar (0 means no measurement).
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
  _checks.check_finite_nonneg("obs_precision", obs_precision)  # concrete values only
  _checks.check_covariance("prior_cov", S0)
  dtype = _checks.result_dtype(mu0, S0, y, M)
  mu0, S0, y, M = (a.astype(dtype) for a in (mu0, S0, y, M))
  return _measurement_update(mu0, S0, y, M, jnp.asarray(obs_precision, dtype),
                             form="information" if form == "information" else "gain")


@functools.partial(jax.jit, static_argnames=("form",))
def _measurement_update(mu0, S0, y, M, r, *, form):
  """``measurement_update``'s numerics on validated arrays of one dtype (r a scalar
  array; form "gain" or "information"); one compiled program per shape."""
  eye = jnp.eye(mu0.shape[0], dtype=mu0.dtype)
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
  H = jsl.cho_solve(cB, M @ S0).T  # G / r: finite at r = 0
  G = r * H
  e = y - M @ mu0
  mu = mu0 + G @ e
  IGM = eye - G @ M
  # Joseph form, G (I / r) G^T = r H H^T: no 1/r, and no sqrt(r), whose derivative
  # is infinite at r = 0 (it made d/dsigma_m NaN at sigma_m = inf).
  P = _sym(IGM @ S0 @ IGM.T + r * (H @ H.T))
  Lam, _ = _spd_inv_logdet(P)
  log_z = (-jnp.sum(jnp.log(jnp.diagonal(cB[0])))
           - 0.5 * r * (e @ jsl.cho_solve(cB, e)))
  return GaussianPropagator(mu, Lam, P, log_z)


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
  for name, v in (("x0", x0), ("A", A), ("b", b), ("x_tgt", x_tgt), ("M", M)):
    _checks.check_finite(name, v)  # concrete values only
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
  check_scalars(dt, sigma_m, sigma_K)
  check_substeps(n_sub)
  if mode == "kalman_bucy":
    n_sub = _resolve_substeps(n_sub, A, M, dt, sigma_m, sigma_K)
    return kalman_bucy_step(x0, jnp.zeros_like(A), A, b, x_tgt, M, dt=dt, sigma_m=sigma_m,
                            sigma_K=sigma_K, n_sub=n_sub)
  dtype = x0.dtype
  dt_s = jnp.asarray(dt, dtype)
  r = dt_s * (1.0 / jnp.asarray(sigma_m, dtype)) ** 2  # its gradient is 0, not NaN, at inf
  # r = dt/sigma_m^2 may overflow (concrete values only), and so may Sigma_K for a
  # growing mode: errors that name the arguments to change.
  _checks.check_overflow(r, _checks.obs_precision_message(dt, sigma_m, dtype))
  out, Sigma_K = _paper_propagator(x0, A, b, x_tgt, M, dt_s, r, jnp.asarray(sigma_K, dtype),
                                   form="information" if form == "information" else "gain",
                                   max_squarings=_affine_squarings(A, b, dt))
  _checks.check_overflow(Sigma_K, _checks.koopman_cov_message(dtype))
  _checks.check_covariance("Sigma_K", Sigma_K)
  return out


@functools.partial(jax.jit, static_argnames=("form", "max_squarings"))
def _paper_propagator(x0, A, b, x_tgt, M, dt, r, sigma_K, *, form, max_squarings):
  """``propagate_full``'s paper mode (QSF eqs. 57-58) on validated arrays of one
  dtype: the Koopman prior N(mu_K, Sigma_K), then one endpoint measurement.

  Args:
    x0: initial state (d,).
    A: generator (d, d).
    b: bias (d,).
    x_tgt: target (d,).
    M: measurement matrix (d, d).
    dt: interval length (scalar array).
    r: measurement precision dt/sigma_m^2 (scalar array).
    sigma_K: Koopman noise (scalar array).
    form: "gain" or "information" (static).
    max_squarings: ``koopman_affine``'s squaring count (static).

  Returns:
    (GaussianPropagator, Sigma_K (d, d)): the posterior, and the prior covariance
    for the caller's host-side check.
  """
  Phi, c = _affine_map(A, b, dt, max_squarings=max_squarings)
  Sigma_K = _doubled_cov(A, sigma_K ** 2, dt)
  return _measurement_update(Phi @ x0 + c, Sigma_K, x_tgt, M, r, form=form), Sigma_K


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
