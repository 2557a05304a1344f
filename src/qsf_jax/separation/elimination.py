"""Cayley maps by Gauss-Jordan elimination in plain XLA ops (wave-function spec §1.3).

The shared core (``qsf_jax.wavefunction.cayley``) solves with LAPACK through
jaxlib's CPU FFI kernels. In jaxlib 0.10.2 those kernels fan batches out onto
XLA:CPU's intra-op thread pool and block on the result; when several such
calls run concurrently (as in a jitted, vmapped training step on a 2-core
machine) every pool thread can end up waiting and the program hangs. Training
in this package therefore builds the same Cayley maps from an explicit
Gauss-Jordan inverse that uses only ordinary XLA operations; the tests check
that it agrees with the core functions.

Pivoting is unnecessary here: the matrices inverted are I - dt A/2 (A real
antisymmetric) and I + i dt H/2 (H Hermitian), whose Hermitian part is I, and
elimination without pivoting is stable for matrices with a positive-definite
Hermitian part (every pivot has real part >= 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qsf_jax import _checks


@jax.custom_jvp
def inverse_positive_real(M_DD):
  """Inverse of matrices with positive-definite Hermitian part, by Gauss-Jordan.

  Row k of the augmented matrix [M | I] is scaled by its pivot and eliminated
  from every other row, for k = 0..D-1, in a ``jax.lax.fori_loop``. The
  derivative is d(M^{-1}) = -M^{-1} dM M^{-1} (custom JVP), so the loop is not
  differentiated through.

  Args:
    M_DD: real or complex matrices (..., D, D) with (M + M^dagger)/2 positive definite.

  Returns:
    M^{-1}: (..., D, D), same dtype.
  """
  D = M_DD.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(D, dtype=M_DD.dtype), M_DD.shape)
  aug = jnp.concatenate([M_DD, eye], axis=-1)  # (..., D, 2D)
  ids_D = jnp.arange(D)

  def body(k, aug):
    row = jax.lax.dynamic_index_in_dim(aug, k, axis=-2, keepdims=False)  # (..., 2D)
    pivot = jax.lax.dynamic_index_in_dim(row, k, axis=-1, keepdims=True)  # (..., 1)
    row = row / pivot
    col = jax.lax.dynamic_index_in_dim(aug, k, axis=-1, keepdims=False)  # (..., D)
    is_k = jnp.broadcast_to(ids_D == k, col.shape)
    factor = jnp.where(is_k, jnp.zeros_like(col), col)
    aug = aug - factor[..., :, None] * row[..., None, :]
    return jax.lax.dynamic_update_index_in_dim(aug, row, k, axis=-2)

  aug = jax.lax.fori_loop(0, D, body, aug)
  return aug[..., D:]


@inverse_positive_real.defjvp
def _inverse_positive_real_jvp(primals, tangents):
  (M_DD,), (dM_DD,) = primals, tangents
  inv_DD = inverse_positive_real(M_DD)
  return inv_DD, -(inv_DD @ dM_DD @ inv_DD)


def orthogonal_cayley_elim(A, dt=1.0):
  """Real orthogonal Cayley map (wave-function spec §1.3), without LAPACK.

    Q = (I - dt A/2)^{-1} (I + dt A/2),   A^T = -A  =>  Q in SO(D).

  Same result as ``qsf_jax.wavefunction.cayley.orthogonal_cayley``.

  Args:
    A: real antisymmetric matrices (..., D, D).
    dt: step length (scalar > 0).

  Returns:
    Q: real orthogonal (..., D, D).
  """
  A = _checks.as_array("A", A)
  _checks.check_square("A", A, batch_dims=None)
  _checks.check_time_step("dt", dt)
  A = A.astype(_checks.result_dtype(A))
  B = (0.5 * jnp.asarray(dt, A.dtype)) * A
  I = jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape)
  return inverse_positive_real(I - B) @ (I + B)


def cayley_unitary_elim(H, dt=1.0):
  """Complex Cayley unitary (wave-function spec §1.3), without LAPACK.

    U = (I + i dt H/2)^{-1} (I - i dt H/2),   H^dagger = H  =>  U^dagger U = I.

  Same result as ``qsf_jax.wavefunction.cayley.cayley_unitary``.

  Args:
    H: complex Hermitian matrices (..., N, N).
    dt: step length (scalar > 0).

  Returns:
    U: complex unitary (..., N, N).
  """
  H = _checks.as_array("H", H, allow_complex=True)
  _checks.check_square("H", H, batch_dims=None)
  _checks.check_time_step("dt", dt)
  H = H.astype(jnp.result_type(H.dtype, jnp.complex64))
  B = (0.5j * jnp.asarray(dt, H.real.dtype)) * H
  I = jnp.broadcast_to(jnp.eye(H.shape[-1], dtype=H.dtype), H.shape)
  return inverse_positive_real(I + B) @ (I - B)
