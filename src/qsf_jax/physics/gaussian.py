"""Gaussian results of the propagators and the checks they share (QSF eq. 56).

``GaussianState`` (mean, precision) and ``GaussianPropagator`` (with covariance
and log-normaliser) are what ``propagate``, ``kalman_bucy_step`` and the chains
return.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from qsf_jax import _checks


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


def check_scalars(dt, sigma_m, sigma_K) -> None:
  """Checks dt (finite scalar > 0), sigma_m (> 0, inf allowed) and sigma_K (finite > 0)."""
  _checks.check_time_step("dt", dt)
  _checks.check_scalar("sigma_m", sigma_m)
  _checks.check_positive("sigma_m", sigma_m)
  _checks.check_scalar("sigma_K", sigma_K)
  check_finite_positive("sigma_K", sigma_K)

