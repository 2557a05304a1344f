"""Propagators for a trained Koopman layer K (spec §6.4, decision D17).

A trained layer gives a one-step map x -> K x + b rather than a generator. If K
has a real logarithm A = logm(K) (no eigenvalue on (-inf, 0]), the layer is
the time-1 flow of dx = (A x + b_c) dt + sigma_K dW, and the continuous
propagator of QSF eqs. 57-58 applies; otherwise only the discrete variant is
defined. Finding A needs an eigen-decomposition and a matrix logarithm on the
host (float64 numpy/scipy), so ``layer_generator`` and ``propagate_layer`` are
not jittable; the propagators they call are.
"""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp
import jax.scipy.linalg as jsl

from qsf_jax import _checks
from qsf_jax.physics.propagate import (FORMS, MODES, GaussianState,
                                       check_finite_positive, measurement_update,
                                       propagate)
from qsf_jax.physics.host_arrays import host_real
from qsf_jax.physics.koopman_log import koopman_generator, on_nonpositive_axis

VARIANTS = ("continuous", "discrete")


def layer_generator(K, *, tol=1e-8):
  """The real generator A = logm(K) of a layer, if it exists (spec §6.4, D17).

  K = e^{A} with A real requires that K have no eigenvalue on the closed
  negative real axis (-inf, 0]; then the principal logarithm is real. An
  eigenvalue lambda counts as on that axis when Re(lambda) <= tol * rho and
  |Im(lambda)| <= tol * rho, with rho the spectral radius. The logarithm
  (``koopman_generator``, float64 on the host) is accepted only if it is real
  and expm(A) reproduces K to a relative 1-norm error below tol; otherwise the
  discrete variant is reported.

  Args:
    K: Koopman matrix (d, d), real; a concrete array (not a tracer).
    tol: relative tolerance of the tests above.

  Returns:
    (A, variant): A a float64 numpy array (d, d) and "continuous", or
    (None, "discrete").
  """
  K64 = host_real("K", K)  # float64 on the host, whatever the x64 flag
  _checks.check_square("K", K64)
  lam = np.linalg.eigvals(K64)
  if float(np.max(np.abs(lam))) == 0.0 or np.any(on_nonpositive_axis(lam, tol)):
    return None, "discrete"
  A, info = koopman_generator(K64)
  if A is None or np.iscomplexobj(A) or info["logm_rel_error"] > tol:
    return None, "discrete"
  return A, "continuous"


def continuous_bias(A, b):
  """Continuous bias b_c whose time-1 flow adds b: (int_0^1 e^{As} ds) b_c = b (QSF eq. 58).

  With mu_K = e^{A} x0 + (int_0^1 e^{As} ds) b_c (QSF eq. 58, dt = 1), this
  makes the continuous prior mean equal the layer's K x0 + b. phi_1(A) =
  int_0^1 e^{As} ds is the top-right block of expm([[A, I], [0, 0]]); it is
  invertible for a principal logarithm (|Im eig(A)| < pi).

  Args:
    A: generator (d, d).
    b: layer bias (d,).

  Returns:
    b_c (d,).
  """
  A = _checks.as_array("A", A)
  d = _checks.check_square("A", A)
  b = _checks.as_array("b", b)
  _checks.check_shape("b", b, (d,))
  for name, v in (("A", A), ("b", b)):
    _checks.check_finite(name, v)
  dtype = _checks.result_dtype(A, b)
  A, b = A.astype(dtype), b.astype(dtype)
  aug = jnp.zeros((2 * d, 2 * d), A.dtype).at[:d, :d].set(A).at[:d, d:].set(
      jnp.eye(d, dtype=A.dtype))
  phi1 = jsl.expm(aug)[:d, d:]
  return jnp.linalg.solve(phi1, b)


def propagate_layer(K, b, W_V, x0, x_tgt, *, sigma_m=1.0, sigma_K=1.0, mode="paper",
                    form="auto", tol=1e-8):
  """Gaussian propagator of a trained layer, continuous or discrete (spec §6.4).

  * continuous (K has a real logarithm): A = logm(K), dt = 1, bias b_c with
    phi_1(A) b_c = b (``continuous_bias``), then QSF eqs. 57-58
    (or the exact Kalman-Bucy form, ``mode="kalman_bucy"``): prior
    N(K x0 + b, Sigma_K), Sigma_K = sigma_K^2 int_0^1 e^{As} e^{A^T s} ds.
  * discrete (an eigenvalue on (-inf, 0]): prior N(K x0 + b, sigma_K^2 I), then
    the same Bayesian update (QSF eqs. 16-17 with M = W_V, noise sigma_m^2):
    Lambda = I/sigma_K^2 + W_V^T W_V/sigma_m^2,
    mu = Lambda^{-1}((K x0 + b)/sigma_K^2 + W_V^T x_tgt/sigma_m^2); ``mode`` has no
    effect here.

  Not jittable (the logarithm is taken on the host).

  Args:
    K: Koopman matrix (d, d).
    b: layer bias (d,).
    W_V: value projection (d, d), or None (identity).
    x0: state entering the layer (d,).
    x_tgt: attention target in value space (d,).
    sigma_m: measurement noise > 0 (inf allowed).
    sigma_K: Koopman noise, finite > 0.
    mode: "paper" or "kalman_bucy" (continuous variant only).
    form: "auto"/"gain" or "information".
    tol: tolerance of ``layer_generator``.

  Returns:
    (GaussianState(mean (d,), precision (d, d)), variant) with variant
    "continuous" or "discrete".
  """
  _checks.check_choice("mode", mode, MODES)
  _checks.check_choice("form", form, FORMS)
  K = _checks.as_array("K", K)
  d = _checks.check_square("K", K)
  b = _checks.as_array("b", b)
  _checks.check_shape("b", b, (d,))
  x0 = _checks.as_array("x0", x0)
  _checks.check_shape("x0", x0, (d,))
  x_tgt = _checks.as_array("x_tgt", x_tgt)
  _checks.check_shape("x_tgt", x_tgt, (d,))
  M = jnp.eye(d, dtype=K.dtype) if W_V is None else _checks.as_array("W_V", W_V)
  _checks.check_shape("W_V", M, (d, d))
  for name, v in (("sigma_m", sigma_m), ("sigma_K", sigma_K)):
    _checks.check_scalar(name, v)
  _checks.check_positive("sigma_m", sigma_m)
  check_finite_positive("sigma_K", sigma_K)
  for name, v in (("K", K), ("b", b), ("W_V", M), ("x0", x0), ("x_tgt", x_tgt)):
    _checks.check_finite(name, v)
  dtype = _checks.result_dtype(K, b, x0, x_tgt, M)
  K, b, x0, x_tgt, M = (a.astype(dtype) for a in (K, b, x0, x_tgt, M))
  A, variant = layer_generator(K, tol=tol)
  if variant == "continuous":
    A = jnp.asarray(A.astype(dtype))
    state = propagate(x0, A, continuous_bias(A, b), x_tgt, M, dt=1.0, sigma_m=sigma_m,
                      sigma_K=sigma_K, mode=mode, form=form)
    return state, variant
  prior_cov = jnp.asarray(sigma_K, dtype) ** 2 * jnp.eye(d, dtype=dtype)
  r = 1.0 / jnp.asarray(sigma_m, dtype) ** 2
  out = measurement_update(K @ x0 + b, prior_cov, x_tgt, M, r,
                           form="information" if form == "information" else "gain")
  return GaussianState(out.mean, out.precision), variant
