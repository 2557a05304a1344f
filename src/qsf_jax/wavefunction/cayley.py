"""The Cayley (Crank-Nicolson) unitary cell (wave-function spec §1.3, §1.6).

Trapezoidal rule for i dpsi/dt = H psi with H frozen over a step of length dt:

  (I + i dt H/2) psi' = (I - i dt H/2) psi,
  U = (I + i dt H/2)^{-1} (I - i dt H/2),

exactly unitary for Hermitian H (the two factors commute). An eigenvalue
lambda of H becomes the eigenvalue exp(-2i arctan(lambda dt/2)) of U, and U
never has the eigenvalue -1.

The real orthogonal baseline is the same cell with H = iA, A real
antisymmetric; ``realify`` (defined in ``hermitian``, re-exported here)
embeds U(N) into SO(2N).

Batch axes: a Hamiltonian is shared by all states ((N, N), or (T, N, N) for a
sequence) or given one per state with the states' leading axes ((..., N, N),
(T, ..., N, N) for states (..., N)).

Derivatives: the solves carry their own derivative (``_refined_solve``: the
exact solve's, from the same LU factors), in forward and reverse mode alike
(``jvp``, ``jacfwd``, ``grad``, ``jacrev``, ``hessian``).

The refined solve is in ``refined_solve``; the real orthogonal cell
(``orthogonal_cayley``, ``orthogonal_step``) in ``cayley_orthogonal``,
re-exported here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qsf_jax import _checks
from qsf_jax.wavefunction.cayley_orthogonal import (  # noqa: F401  (re-export, spec §1.3)
    orthogonal_cayley, orthogonal_step)
from qsf_jax.wavefunction.hermitian import complex_dtype, dagger, eye_like
from qsf_jax.wavefunction.hermitian import realify, realify_state  # noqa: F401  (re-export, spec §1.3)
from qsf_jax.wavefunction.refined_solve import _refined_solve


def _hamiltonian(name, H, *, batch_dims=None):
  """Validates a Hamiltonian (real symmetric or complex Hermitian); returns it complex.

  The shape is checked at trace time; a concrete H must also be finite and
  Hermitian to sqrt(eps) of its precision (``_checks.check_hermitian``), since
  a non-Hermitian H silently gives a non-unitary step. The accepted H is then
  projected onto the Hermitian matrices, (H + H^dagger) / 2 (an exactly
  Hermitian H is unchanged), so an H that is Hermitian only to that tolerance
  still gives a step that is unitary to rounding, not to the tolerance.
  """
  H = _checks.as_array(name, H, allow_complex=True)
  _checks.check_square(name, H, batch_dims=batch_dims)
  _checks.check_hermitian(name, H)
  H = H.astype(complex_dtype(H.dtype))
  return 0.5 * (H + dagger(H))


def _half_generator(H, dt):
  """A = i dt H / 2, the half-step generator of the Cayley map (spec §1.3).

  A concrete dt H / 2 that overflows H's precision (a dt or an H near its
  largest finite value) is refused: the solves would return NaN.
  """
  _checks.check_time_step("dt", dt)
  rdtype = jnp.dtype(H.real.dtype)
  if isinstance(dt, (int, float)) and dt > float(jnp.finfo(rdtype).max):
    raise ValueError(f"dt={dt} overflows {rdtype.name}: use a shorter dt or float64")
  A = (0.5j * jnp.asarray(dt, rdtype)) * H
  _checks.check_overflow(A, lambda: (
      f"dt * H / 2 overflows {A.dtype.name} (dt={dt}, max |H| = "
      f"{float(jnp.max(jnp.abs(H))):.3g}): use a shorter dt, a smaller H or float64"))
  return A


def cayley_unitary(H, dt=1.0):
  """The Cayley unitary of a Hermitian matrix (wave-function spec §1.3).

    U = (I + i dt H/2)^{-1} (I - i dt H/2),   U^dagger U = I for H^dagger = H.

  Computed with a (refined) linear solve, no explicit inverse.

  Args:
    H: Hermitian matrix, complex (or real symmetric) (..., N, N).
    dt: step length (scalar > 0).

  Returns:
    U: complex unitary (..., N, N).
  """
  H = _hamiltonian("H", H)
  A = _half_generator(H, dt)
  I = eye_like(A)
  return _refined_solve(I + A, I - A)


def cayley_step(H, psi, dt=1.0):
  """One Crank-Nicolson step psi' = U psi (wave-function spec §1.3).

    (I + i dt H/2) psi' = (I - i dt H/2) psi,

  solved as a linear system with one refinement step (no explicit inverse);
  ||psi'|| = ||psi|| up to rounding, without systematic drift.

  Args:
    H: Hermitian matrix (N, N) shared by all states, or (..., N, N) with the
      same batch axes as ``psi``.
    psi: state(s), complex or real (..., N).
    dt: step length (scalar > 0).

  Returns:
    psi': complex (..., N), same shape as ``psi``.
  """
  H = _hamiltonian("H", H)
  N = H.shape[-1]
  psi = _checks.as_array("psi", psi, allow_complex=True)
  if psi.ndim < 1 or psi.shape[-1] != N:
    raise ValueError(
        f"psi must have shape (..., {N}) to match H of shape {tuple(H.shape)}, "
        f"got {tuple(psi.shape)}")
  _checks.check_batch_axes("H", H.shape, 2, "psi", psi.shape)
  _checks.check_finite("psi", psi)
  dtype = complex_dtype(H.dtype, psi.dtype)
  H, psi = H.astype(dtype), psi.astype(dtype)
  A = _half_generator(H, dt)
  I = eye_like(A)
  if N == 0:  # the empty space: nothing to evolve
    return psi
  if H.ndim == 2:
    # One factorisation for every state: columns are the batch of states.
    psi_NB = psi.reshape(-1, N).T
    out_NB = _refined_solve(I + A, (I - A) @ psi_NB)
    return out_NB.T.reshape(psi.shape)
  rhs = (I - A) @ psi[..., None]
  return _refined_solve(I + A, rhs)[..., 0]


def _sequence(H_seq):
  """Validates a Hamiltonian sequence (T, ..., N, N); returns it complex."""
  H_seq = _hamiltonian("H_seq", H_seq, batch_dims=None)
  if H_seq.ndim < 3:
    raise ValueError(
        f"H_seq must have shape (T, N, N) or (T, ..., N, N), got {tuple(H_seq.shape)}")
  return H_seq


def _check_sequence(H_seq, psi0):
  """Validates H_seq (T, [...,] N, N) and psi0 (..., N); returns both in one complex dtype.

  A batched sequence (T, ..., N, N) needs psi0 with the same leading axes.
  """
  H_seq = _sequence(H_seq)
  N = H_seq.shape[-1]
  psi0 = _checks.as_array("psi0", psi0, allow_complex=True)
  if psi0.ndim < 1 or psi0.shape[-1] != N:
    raise ValueError(
        f"psi0 must have shape (..., {N}) to match H_seq of shape "
        f"{tuple(H_seq.shape)}, got {tuple(psi0.shape)}")
  _checks.check_batch_axes("H_seq[t]", H_seq.shape[1:], 2, "psi0", psi0.shape)
  _checks.check_finite("psi0", psi0)
  dtype = complex_dtype(H_seq.dtype, psi0.dtype)
  return H_seq.astype(dtype), psi0.astype(dtype)


def cayley_scan(H_seq, psi0, dt=1.0, *, return_states=True):
  """Runs the Cayley cell over a sequence of Hamiltonians (spec §1.3, §1.6).

    psi_{t+1} = (I + i dt H_t/2)^{-1} (I - i dt H_t/2) psi_t,   t = 0..T-1,

  as a ``jax.lax.scan`` (one O(N^3) solve per step, sequential in time).

  Args:
    H_seq: Hermitian matrices (T, N, N), or one sequence per state
      (T, ..., N, N) with the leading axes of ``psi0``.
    psi0: initial state(s) (..., N).
    dt: step length (scalar > 0).
    return_states: whether to stack the states psi_1..psi_T.

  Returns:
    (psi_T, states): the final state (..., N) and the states after each step
    (T, ..., N), or ``None`` for ``states`` when ``return_states`` is False.
  """
  H_seq, psi0 = _check_sequence(H_seq, psi0)
  _checks.check_time_step("dt", dt)
  return _cayley_scan(H_seq, psi0, jnp.asarray(dt, H_seq.real.dtype),
                      _checks.check_flag("return_states", return_states))


@functools.partial(jax.jit, static_argnames=("return_states",))
def _cayley_scan(H_seq, psi0, dt, return_states):
  """Compiled body of ``cayley_scan`` (compiled once per shape, also when called eagerly)."""

  def body(psi, H_NN):
    new = cayley_step(H_NN, psi, dt)
    return new, (new if return_states else None)

  return jax.lax.scan(body, psi0, H_seq)


def cayley_products(H_seq, dt=1.0):
  """Cumulative Cayley products by a parallel prefix (spec §1.6).

    P_t = U_t U_{t-1} ... U_1,   U_t = Cayley(H_t),   t = 1..T,

  with ``jax.lax.associative_scan`` (O(log T) depth, O(T N^3) work); the
  time-parallel twin of ``cayley_scan`` for state-independent Hamiltonians.

  Args:
    H_seq: Hermitian matrices (T, ..., N, N).
    dt: step length (scalar > 0).

  Returns:
    P: cumulative unitaries (T, ..., N, N); P[t] maps psi_0 to psi_{t+1}.
  """
  H_seq = _sequence(H_seq)
  _checks.check_time_step("dt", dt)
  return _cayley_products(H_seq, jnp.asarray(dt, H_seq.real.dtype))


@jax.jit
def _cayley_products(H_seq, dt):
  """Compiled body of ``cayley_products``."""
  U_TNN = cayley_unitary(H_seq, dt)
  # Later factors act on the left: combine(earlier, later) = later @ earlier.
  return jax.lax.associative_scan(lambda a, b: b @ a, U_TNN)


def cayley_scan_parallel(H_seq, psi0, dt=1.0):
  """States of the Cayley cell from parallel products (spec §1.6).

    psi_t = P_t psi_0,   P_t = U_t ... U_1   (see ``cayley_products``).

  The products are not refined as ``cayley_scan``'s solves are, so in float32
  the norm drifts more over long sequences: after 10^4 random steps (N = 8,
  ``random_hermitian``) max | ||psi_t|| - 1 | was 4.1e-5 to 4.2e-5 here against
  1.4e-6 to 8.8e-6 for ``cayley_scan`` (3 seeds); float64 keeps both at round-off.

  Args:
    H_seq: Hermitian matrices (T, N, N), or one sequence per state
      (T, ..., N, N) with the leading axes of ``psi0``.
    psi0: initial state(s) (..., N).
    dt: step length (scalar > 0).

  Returns:
    (psi_T, states): as ``cayley_scan``: (..., N) and (T, ..., N); for T = 0,
    psi0 and an empty (0, ..., N).
  """
  H_seq, psi0 = _check_sequence(H_seq, psi0)
  if H_seq.shape[0] == 0:  # no step: as cayley_scan
    _checks.check_time_step("dt", dt)
    return psi0, jnp.zeros((0,) + psi0.shape, psi0.dtype)
  P_TNN = cayley_products(H_seq, dt)
  if P_TNN.ndim == 3:  # shared products: one matrix per step for every state
    states = jnp.einsum("tnm,...m->t...n", P_TNN, psi0)
  else:
    states = jnp.einsum("t...nm,...m->t...n", P_TNN, psi0)
  return states[-1], states


def hamiltonian_from_unitary(U, dt=1.0):
  """Inverse Cayley map (wave-function spec §1.3).

    H = -(2i/dt) (I - U)(I + U)^{-1},

  for a unitary U without eigenvalue -1; the two factors commute, so it is
  computed as a solve (I + U) X = (I - U). The result is symmetrised,
  H <- (H + H^dagger)/2, which removes rounding-level non-Hermiticity. For a
  diagonal phase target U = diag(exp(-i theta)) this gives
  lambda_j = (2/dt) tan(theta_j/2).

  Args:
    U: unitary matrix, complex (..., N, N); a concrete U must be unitary and
      have no eigenvalue within rounding of -1 (``_checks.check_unitary``).
    dt: step length (scalar > 0).

  Returns:
    H: complex Hermitian (..., N, N) with ``cayley_unitary(H, dt) == U``.
  """
  U = _checks.as_array("U", U, allow_complex=True)
  _checks.check_square("U", U, batch_dims=None)
  _checks.check_unitary("U", U, no_minus_one=True)
  U = U.astype(complex_dtype(U.dtype))
  _checks.check_time_step("dt", dt)
  I = eye_like(U)
  X = _refined_solve(I + U, I - U)
  H = (-2j / jnp.asarray(dt, U.real.dtype)) * X
  return 0.5 * (H + dagger(H))
