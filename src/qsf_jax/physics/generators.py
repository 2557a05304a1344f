"""Generators and the free Koopman propagator (QSF eq. 1, eq. 58's mu_K and Sigma_K).

The continuous-time hidden-state dynamics is dx = (A x + b) dt + sigma_K dW'.
Over an interval dt it has the Gaussian transition N(mu_K, Sigma_K) with

  mu_K    = e^{A dt} x0 + (int_0^dt e^{A s} ds) b                     (QSF eq. 58)
  Sigma_K = sigma_K^2 int_0^dt e^{A s} e^{A^T s} ds                    (QSF eq. 58)

Both are computed with augmented matrix exponentials (Van Loan 1978), which need
no A^{-1} and are therefore finite for singular A; Sigma_K over long or stiff
intervals by doubling a short one (``koopman_cov``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from qsf_jax import _checks, _checks_values


def _mT(x):
  return jnp.swapaxes(x, -1, -2)


def decompose_generator(A):
  """Splits a generator into Hermitian and dissipative parts (QSF eq. 1).

    A = -i H + D,   H = (i/2)(A - A^dagger),   D = (A + A^dagger)/2,

  with H and D Hermitian. For real A, H = i S with S = (A - A^T)/2 skew and
  D = (A + A^T)/2 symmetric, so that A = S + D.

  Args:
    A: generator, real or complex (..., d, d).

  Returns:
    (H, D): H complex Hermitian (..., d, d); D Hermitian (..., d, d), real if A is.
  """
  A = _checks.as_array("A", A, allow_complex=True)
  _checks.check_square("A", A, batch_dims=None)
  if jnp.iscomplexobj(A):
    Ah = jnp.conj(_mT(A))
    return 0.5j * (A - Ah), 0.5 * (A + Ah)
  S = 0.5 * (A - _mT(A))
  D = 0.5 * (A + _mT(A))
  return 1j * S, D


# jax's expm returns NaN where scaling and squaring would need more than its
# max_squarings (default 16: |A dt|_1 above about 3.5e5). Unbatched, the squarings
# not needed are skipped (lax.cond), but under vmap every one of the max_squarings
# runs (+30% for a batch of 8 at d = 320 with 32 against 16 on a 2-core CPU, x2.3
# with 64). So concrete inputs get 16, or 64 (|A dt|_1 up to ~1e20) where they need
# it, and traced ones, whose norm is unknown at trace time, 32 (up to ~2e10).
_MAX_SQUARINGS = 64
_DEFAULT_SQUARINGS = 16
_TRACED_SQUARINGS = 32
_SQUARING_NORM = 1e5  # |aug dt|_1 above which the larger count is used


def koopman_affine(A, b, dt=1.0, *, max_squarings=None):
  """The free propagator over dt as an affine map x -> Phi x + c (QSF eq. 58, mu_K).

    expm([[A, b], [0, 0]] dt) = [[Phi, c], [0, 1]],
    Phi = e^{A dt},  c = (int_0^dt e^{A s} ds) b.

  Args:
    A: real generator (d, d).
    b: real bias (d,).
    dt: interval length (scalar > 0).
    max_squarings: squarings allowed to the exponential's scaling and squaring
      (static int); past |[[A, b], [0, 0]] dt|_1 ~ 5.4 * 2^max_squarings the result
      is NaN. None: 16, or 64 where concrete inputs need more (|A dt|_1 up to
      ~1e20); 32 (up to ~2e10) for traced inputs (under jit, vmap or grad), whose
      norm is unknown when the count must be fixed.

  Returns:
    (Phi, c): (d, d) and (d,).
  """
  A = _checks.as_array("A", A)
  d = _checks.check_square("A", A)
  b = _checks.as_array("b", b)
  _checks.check_shape("b", b, (d,))
  _checks.check_time_step("dt", dt)
  for name, v in (("A", A), ("b", b)):
    _checks.check_finite(name, v)  # concrete values only (NaN in, NaN out, otherwise)
  dtype = _checks.result_dtype(A, b)
  if max_squarings is None:
    max_squarings = _affine_squarings(A, b, dt)
  max_squarings = _checks.check_int("max_squarings", max_squarings, 0)
  return _affine_map(A.astype(dtype), b.astype(dtype), jnp.asarray(dt, dtype),
                     max_squarings=max_squarings)


def _affine_squarings(A, b, dt) -> int:
  """The static ``max_squarings`` of ``koopman_affine``'s exponential.

  64 for concrete values with |[[A, b], [0, 0]] dt|_1 = |dt| max(|A|_1, |b|_1)
  above 1e5 (jax's default 16 gives NaN past ~3.5e5), else 16; 32 for traced
  values, where the count cannot depend on them. Stacked A (..., d, d) and b
  (..., d) give the count of the largest norm, for a vmap over the steps.

  Args:
    A: generator (..., d, d).
    b: bias (..., d).
    dt: interval length (scalar).
  """
  vals = [_checks_values._concrete(v) for v in (A, b, dt)]
  if any(v is None for v in vals):
    return _TRACED_SQUARINGS
  a, bb, h = (np.abs(np.asarray(v, np.float64)) for v in vals)
  norm = float(h) * max(float(np.max(np.sum(a, axis=-2), initial=0.0)),
                        float(np.max(np.sum(bb, axis=-1), initial=0.0)))
  return _MAX_SQUARINGS if norm > _SQUARING_NORM else _DEFAULT_SQUARINGS


@functools.partial(jax.jit, static_argnames=("max_squarings",))
def _affine_map(A, b, dt, *, max_squarings):
  """``koopman_affine``'s numerics: (Phi, c) from expm([[A, b], [0, 0]] dt), on
  arrays of one dtype (dt a scalar array); one compiled program per shape."""
  d = A.shape[0]
  aug = jnp.zeros((d + 1, d + 1), A.dtype).at[:d, :d].set(A).at[:d, d].set(b)
  E = jsl.expm(aug * dt, max_squarings=max_squarings)
  return E[:d, :d], E[:d, d]


def koopman_mean(A, b, x0, dt=1.0):
  """Free Koopman mean mu_K = e^{A dt} x0 + (int_0^dt e^{A s} ds) b (QSF eq. 58).

  Args:
    A: real generator (d, d).
    b: real bias (d,).
    x0: initial state (d,).
    dt: interval length (scalar > 0).

  Returns:
    mu_K (d,).
  """
  A, b, x0 = (_checks.as_array(n, v) for n, v in (("A", A), ("b", b), ("x0", x0)))
  dtype = _checks.result_dtype(A, b, x0)  # as propagate: x0 does not lose precision
  Phi, c = koopman_affine(A.astype(dtype), b.astype(dtype), dt)
  _checks.check_shape("x0", x0, (Phi.shape[0],))
  _checks.check_finite("x0", x0)
  return Phi @ x0.astype(dtype) + c


# Van Loan's exponential below runs on an interval h with |A|_1 h <= _VAN_LOAN_NORM;
# longer intervals are reached by doubling (at most _MAX_DOUBLINGS times).
_VAN_LOAN_NORM = 0.5
_MAX_DOUBLINGS = 48


def _van_loan(A, q, h):
  """(e^{A h}, q int_0^h e^{A s} e^{A^T s} ds) from one augmented exponential.

  F = expm([[-A, q I], [0, A^T]] h): F22 = e^{A^T h}, Sigma(h) = F22^T F12. Accurate
  only while |A| h is small: F11 = e^{-A h} grows and F22^T F12 cancels.
  """
  d = A.shape[0]
  top = jnp.concatenate([-A, q * jnp.eye(d, dtype=A.dtype)], axis=1)
  bot = jnp.concatenate([jnp.zeros_like(A), A.T], axis=1)
  F = jsl.expm(jnp.concatenate([top, bot], axis=0) * h)
  F12, F22 = F[:d, d:], F[d:, d:]
  return F22.T, F22.T @ F12


def koopman_cov(A, sigma_K=1.0, dt=1.0):
  """Free Koopman covariance (QSF eq. 58, Sigma_K) by Van Loan's method and doubling.

    Sigma_K = sigma_K^2 int_0^dt e^{A s} e^{A^T s} ds.

  It solves the Lyapunov ODE dSigma/dt = A Sigma + Sigma A^T + sigma_K^2 I with
  Sigma(0) = 0, and is finite for singular A (A = 0 gives sigma_K^2 dt I). Van
  Loan's exponential F = expm([[-A, sigma_K^2 I], [0, A^T]] h) gives Sigma(h) =
  F22^T F12, but F also holds e^{-A h}, which for a fast-decaying mode swamps the
  result (at |A| dt ~ 40 in float64 Sigma turns indefinite). So F is taken only
  over h = dt / 2^k with |A|_1 h <= 1/2, and the interval is doubled k times with
  the semigroup identity

    Sigma(2h) = Sigma(h) + e^{A h} Sigma(h) e^{A^T h},   e^{2 A h} = (e^{A h})^2,

  whose terms are positive semi-definite (no cancellation). k is chosen from the
  values (up to 48, also under jit); the result is symmetrised as (S + S^T)/2.

  Args:
    A: real generator (d, d).
    sigma_K: Koopman (dynamical) noise scale (scalar >= 0).
    dt: interval length (scalar > 0).

  Returns:
    Sigma_K (d, d), symmetric positive semi-definite.
  """
  A = _checks.as_array("A", A)
  _checks.check_square("A", A)
  _checks.check_finite("A", A)
  _checks.check_time_step("dt", dt)
  _checks.check_scalar("sigma_K", sigma_K)  # the shape under jit too
  _checks.check_finite_nonneg("sigma_K", sigma_K)
  dtype = _checks.result_dtype(A)
  S = _doubled_cov(A.astype(dtype), jnp.asarray(sigma_K, dtype) ** 2, jnp.asarray(dt, dtype))
  _checks.check_overflow(S, _checks.koopman_cov_message(dtype))
  return S


@jax.jit
def _doubled_cov(A, q, dt):
  """``koopman_cov``'s numerics (one compiled program per shape and dtype).

  Args:
    A: real generator (d, d).
    q: sigma_K^2 (scalar, A's dtype).
    dt: interval length (scalar, A's dtype).

  Returns:
    Sigma_K (d, d): Van Loan over h = dt / 2^k, |A|_1 h <= 1/2, then k doublings.
  """
  norm = jnp.max(jnp.sum(jnp.abs(A), axis=0)) * dt          # |A dt|_1
  k = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm / _VAN_LOAN_NORM, 1.0))),
               0, _MAX_DOUBLINGS).astype(jnp.int32)
  E, S = _van_loan(A, q, dt / jnp.exp2(k.astype(A.dtype)))

  def double(i, carry):
    def twice(c):
      E, S = c
      return E @ E, S + E @ S @ E.T
    return jax.lax.cond(i < k, twice, lambda c: c, carry)

  _, S = jax.lax.fori_loop(0, _MAX_DOUBLINGS, double, (E, S))
  return 0.5 * (S + S.T)
