"""The real orthogonal Cayley cell: the real baseline (wave-function spec §1.3,
§4 "Real baseline").

  Q = (I - dt A/2)^{-1} (I + dt A/2),   A^T = -A  =>  Q^T Q = I, det Q = 1,

the unitary cell of ``cayley`` with the purely imaginary Hamiltonian H = iA
(``orthogonal_cayley(A, dt) == cayley_unitary(1j * A, dt)``). Re-exported by
``cayley``.
"""

from __future__ import annotations

import jax.numpy as jnp

from qsf_jax import _checks
from qsf_jax.wavefunction.hermitian import eye_like
from qsf_jax.wavefunction.refined_solve import _refined_solve


def orthogonal_cayley(A, dt=1.0):
  """Real orthogonal Cayley map of an antisymmetric generator (spec §1.3).

    Q = (I - dt A/2)^{-1} (I + dt A/2),   A^T = -A  =>  Q^T Q = I, det Q = 1.

  Sign relation: this is exactly ``cayley_unitary(1j * A, dt)``, since
  I + i dt (iA)/2 = I - dt A/2 and I - i dt (iA)/2 = I + dt A/2; the real
  baseline is the complex cell with the purely imaginary Hamiltonian H = iA.
  The result is orthogonal only when A is antisymmetric (e.g. from
  ``skew_from_real``); a concrete A is checked (``_checks.check_hermitian``
  with ``anti``), a traced one is not.

  Args:
    A: real antisymmetric matrix (..., D, D).
    dt: step length (scalar > 0).

  Returns:
    Q: real orthogonal (..., D, D) in SO(D).
  """
  A = _checks.as_array("A", A)
  _checks.check_square("A", A, batch_dims=None)
  _checks.check_hermitian("A", A, anti=True)
  _checks.check_time_step("dt", dt)
  A = A.astype(_checks.result_dtype(A))
  B = (0.5 * jnp.asarray(dt, A.dtype)) * A
  I = eye_like(B)
  return _refined_solve(I - B, I + B)


def orthogonal_step(A, h, dt=1.0):
  """One step of the real orthogonal baseline cell (spec §1.3, §4 "Real baseline").

    (I - dt A/2) h' = (I + dt A/2) h,   ||h'|| = ||h||  for A^T = -A.

  Args:
    A: real antisymmetric matrix (D, D) shared by all states, or (..., D, D)
      with the same batch axes as ``h`` (a concrete A is checked, as in
      ``orthogonal_cayley``).
    h: real state(s) (..., D).
    dt: step length (scalar > 0).

  Returns:
    h': real (..., D).
  """
  A = _checks.as_array("A", A)
  D = _checks.check_square("A", A, batch_dims=None)
  h = _checks.as_array("h", h)
  if h.ndim < 1 or h.shape[-1] != D:
    raise ValueError(
        f"h must have shape (..., {D}) to match A of shape {tuple(A.shape)}, "
        f"got {tuple(h.shape)}")
  _checks.check_batch_axes("A", A.shape, 2, "h", h.shape)
  _checks.check_hermitian("A", A, anti=True)  # otherwise ||h'|| != ||h||, silently
  _checks.check_time_step("dt", dt)
  dtype = _checks.result_dtype(A, h)
  A, h = A.astype(dtype), h.astype(dtype)
  B = (0.5 * jnp.asarray(dt, dtype)) * A
  I = eye_like(B)
  if A.ndim == 2:
    # One factorisation for every state: columns are the batch of states.
    h_DB = h.reshape(-1, D).T
    return _refined_solve(I - B, (I + B) @ h_DB).T.reshape(h.shape)
  return _refined_solve(I - B, (I + B) @ h[..., None])[..., 0]
