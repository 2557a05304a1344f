"""The Kalman chain over tokens: covariances and log-normalisers (QSF eqs. 57-59, spec §6.5).

Each token n predicts with its free flow (U_n, c_n, Sigma_K,n) and updates with its
target x_tgt,n, either by the paper's endpoint measurement (QSF eqs. 57-58) or by the
exact running-measurement propagator (spec §6.3). Arguments follow ``chain.py``: one
generator and bias for all tokens, or one per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qsf_jax import _checks
from qsf_jax.physics.chain import _affine_steps, _per_step, _validate_measured
from qsf_jax.physics.generators import koopman_cov
from qsf_jax.physics.kalman_bucy import _kalman_bucy
from qsf_jax.physics.propagate import (FORMS, MODES, GaussianPropagator, GaussianState,
                                       _measurement_update, check_substeps, exact_substeps)


def chain_filter_full(x0, A_seq, b_seq, x_tgt_seq, M=None, *, dt=1.0, sigma_m=1.0,
                      sigma_K=1.0, P0=None, mode="paper", form="auto",
                      n_sub="auto") -> GaussianPropagator:
  """The Kalman chain over tokens with covariances and log-normalisers (spec §6.5).

  Starting from N(x0, P0), each token n predicts with the free flow and updates
  with its target. ``mode="paper"`` (QSF eqs. 57-59, spec §6.2):

    m^- = U_n m + c_n,   P^- = U_n P U_n^T + Sigma_K,n,
    (m, P) <- measurement_update(m^-, P^-, x_tgt,n, M, dt/sigma_m^2);

  with P0 = 0 the first step is exactly QSF eqs. 57-58 (``propagate``).
  ``mode="kalman_bucy"``: each token runs the exact running-measurement
  propagator from N(m, P) (``kalman_bucy_step``, spec §6.3), so the chain is the
  exact path integral of QSF eqs. 52-55 with a piecewise-constant target.

  Args:
    x0: initial mean (d,).
    A_seq: generators (d, d) or (N, d, d).
    b_seq: biases (d,) or (N, d).
    x_tgt_seq: targets per token (N, d).
    M: measurement matrix, the value projection W_V (d, d), or None (identity).
    dt: token step > 0.
    sigma_m: measurement noise > 0 (inf allowed).
    sigma_K: Koopman noise, finite > 0.
    P0: initial covariance (d, d), PSD; None means 0 (a known start point).
    mode: "paper" or "kalman_bucy" (static).
    form: "auto"/"gain" or "information" update (static; paper mode).
    n_sub: exact sub-steps per token (Kalman-Bucy mode): a static int >= 1,
      or "auto" (``exact_substeps`` over all tokens' generators; needs concrete
      A_seq, M, dt, sigma_m and sigma_K).

  Returns:
    GaussianPropagator with mean (N, d), precision (N, d, d), covariance
    (N, d, d) and log_normalizer (N,) (log predictive weight of each target;
    their sum is the chain's log Z).
  """
  _checks.check_choice("mode", mode, MODES)
  _checks.check_choice("form", form, FORMS)
  x0, A, b, y, M, N, r = _validate_measured(x0, A_seq, b_seq, x_tgt_seq, M, dt,
                                            sigma_m, sigma_K)
  d = x0.shape[0]
  if P0 is None:
    P0 = jnp.zeros((d, d), x0.dtype)
  else:
    P0 = _checks.as_array("P0", P0)
    _checks.check_shape("P0", P0, (d, d))
    _checks.check_covariance("P0", P0)
    P0 = P0.astype(x0.dtype)
  check_substeps(n_sub)
  if mode == "kalman_bucy":
    if n_sub == "auto":
      n_sub = exact_substeps(A, M, dt, sigma_m, sigma_K)
    dtype = x0.dtype
    out = _exact_chain(x0, P0, jnp.broadcast_to(A, (N, d, d)), jnp.broadcast_to(b, (N, d)),
                       y, M, jnp.asarray(dt, dtype), jnp.asarray(sigma_m, dtype),
                       jnp.asarray(sigma_K, dtype), n_sub=int(n_sub))
    return _checked_chain(out)
  U_NDD, c_ND = _per_step(_affine_steps(A, b, dt), A, b, N)
  if A.ndim == 3:
    S_NDD = jax.vmap(lambda a: koopman_cov(a, sigma_K, dt))(A)
    _checks.check_overflow(S_NDD, _checks.koopman_cov_message(x0.dtype))  # traced in the vmap
  else:
    S_NDD = jnp.broadcast_to(koopman_cov(A, sigma_K, dt), (N, d, d))
  return _checked_chain(_paper_chain(x0, P0, U_NDD, c_ND, S_NDD, y, M, r,
                                    form="information" if form == "information" else "gain"))


def _checked_chain(out: GaussianPropagator) -> GaussianPropagator:
  """Refuses a concrete chain result with non-finite means (the covariances feed
  them through the gains; the means are the small array to copy to the host).

  The inputs were checked finite, so such a result is an overflow, e.g. of the
  covariance of a growing mode compounded over the tokens (U P U^T).
  """
  _checks.check_overflow(out.mean, f"the chain's means overflowed "
                         f"{jnp.dtype(out.mean.dtype).name} over the tokens: A has a mode that "
                         "grows too fast for this precision; use float64, fewer tokens or a "
                         "shorter dt")
  return out


@functools.partial(jax.jit, static_argnames=("form",))
def _paper_chain(x0, P0, U_NDD, c_ND, S_NDD, y_ND, M, r, *, form):
  """The paper-mode Kalman chain of ``chain_filter_full`` over validated arrays
  (predict with (U_n, c_n, Sigma_K,n), update with x_tgt,n at precision r)."""
  def step(carry, inputs):
    m_D, P_DD = carry
    U, c, S, y_D = inputs
    out = _measurement_update(U @ m_D + c, U @ P_DD @ U.T + S, y_D, M, r, form=form)
    return (out.mean, out.covariance), out

  return jax.lax.scan(step, (x0, P0), (U_NDD, c_ND, S_NDD, y_ND))[1]


@functools.partial(jax.jit, static_argnames=("n_sub",))
def _exact_chain(x0, P0, A_NDD, b_ND, y_ND, M, dt, sigma_m, sigma_K, *, n_sub):
  """The Kalman-Bucy chain of ``chain_filter_full`` over validated arrays (one
  exact ``kalman_bucy_step`` of n_sub sub-steps per token; dt and the sigmas as
  scalar arrays)."""
  def step(carry, inputs):
    out = _kalman_bucy(*carry, *inputs, M, dt, sigma_m, sigma_K, n_sub=n_sub)
    return (out.mean, out.covariance), out

  return jax.lax.scan(step, (x0, P0), (A_NDD, b_ND, y_ND))[1]


def chain_filter(x0, A_seq, b_seq, x_tgt_seq, M=None, *, dt=1.0, sigma_m=1.0,
                 sigma_K=1.0, P0=None, mode="paper", form="auto",
                 n_sub="auto") -> GaussianState:
  """The Kalman chain over tokens (QSF eqs. 57-59, spec §6.5).

    P^- = U_n P U_n^T + Sigma_K,n, then the §6.2 update with x_tgt,n;
  with P0 = 0 the first step is QSF eqs. 57-58. See ``chain_filter_full``.

  Args:
    x0: initial mean (d,).
    A_seq: generators (d, d) or (N, d, d).
    b_seq: biases (d,) or (N, d).
    x_tgt_seq: targets (N, d).
    M: measurement matrix W_V (d, d) or None (identity).
    dt: token step > 0.
    sigma_m: measurement noise > 0 (inf allowed).
    sigma_K: Koopman noise, finite > 0.
    P0: initial covariance (d, d) or None (0).
    mode: "paper" or "kalman_bucy" (exact propagator within each token).
    form: "auto"/"gain" or "information" (paper mode).
    n_sub: exact sub-steps per token (Kalman-Bucy mode): an int >= 1 or "auto".

  Returns:
    GaussianState with mean (N, d) and precision (N, d, d).
  """
  full = chain_filter_full(x0, A_seq, b_seq, x_tgt_seq, M, dt=dt, sigma_m=sigma_m,
                           sigma_K=sigma_K, P0=P0, mode=mode, form=form, n_sub=n_sub)
  return GaussianState(full.mean, full.precision)
