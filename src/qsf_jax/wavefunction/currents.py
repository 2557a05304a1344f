"""Continuity equation and pairwise probability currents (wave-function spec §1.5).

With rho_j = |psi_j|^2 and i dpsi/dt = H psi,

  d rho_j / dt = sum_k J_jk,   J_jk = 2 Im(conj(psi_j) H_jk psi_k),

where J_jk is the net rate of probability flowing from k into j; J is
antisymmetric (H_kj = conj(H_jk)), so total mass is conserved, and only the
off-diagonal entries of H move mass. The Cayley step obeys the same law
exactly, with the midpoint state pbar = (psi_t + psi_{t+1})/2.

Batch axes: H is (N, N), shared by all states, or one per state with the
states' leading axes (..., N, N), as in ``cayley_step``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qsf_jax import _checks
from qsf_jax.wavefunction.cayley import _check_sequence, cayley_step
from qsf_jax.wavefunction.hermitian import complex_dtype, dagger


def _hamiltonian_and_states(H, **states):
  """Validates H and equally shaped states (..., N); returns them complex.

  H is (N, N) or batched like the states (..., N, N)
  (``_checks.check_batch_axes``). A concrete H must be finite and Hermitian
  (``_checks.check_hermitian``): the currents' antisymmetry and the continuity
  equation hold only then. The accepted H is projected onto the Hermitian
  matrices, (H + H^dagger) / 2, so one Hermitian only to that check's tolerance
  still gives currents antisymmetric to rounding (an exactly Hermitian H is
  unchanged).
  """
  H = _checks.as_array("H", H, allow_complex=True)
  N = _checks.check_square("H", H, batch_dims=None)
  _checks.check_hermitian("H", H)
  arrays = {}
  shape = None
  for name, psi in states.items():
    psi = _checks.as_array(name, psi, allow_complex=True)
    if psi.ndim < 1 or psi.shape[-1] != N:
      raise ValueError(
          f"{name} must have shape (..., {N}) to match H of shape "
          f"{tuple(H.shape)}, got {tuple(psi.shape)}")
    if shape is not None and psi.shape != shape:
      names = list(states)
      raise ValueError(
          f"{names[0]} and {name} must have the same shape, got {shape} and "
          f"{tuple(psi.shape)}")
    shape = tuple(psi.shape)
    _checks.check_batch_axes("H", H.shape, 2, name, psi.shape)
    _checks.check_finite(name, psi)
    arrays[name] = psi
  dtype = complex_dtype(H.dtype, *(a.dtype for a in arrays.values()))
  H = H.astype(dtype)
  return 0.5 * (H + dagger(H)), [a.astype(dtype) for a in arrays.values()]


def _pair_currents(H_NN, phi):
  """J_jk = 2 Im(conj(phi_j) H_jk phi_k): phi (..., N), H (N, N) or (..., N, N) -> (..., N, N)."""
  return 2.0 * jnp.imag(jnp.einsum("...j,...jk,...k->...jk", jnp.conj(phi), H_NN, phi))


def instantaneous_currents(H, psi):
  """Continuous-time pairwise currents (wave-function spec §1.5).

    J_jk = 2 Im(conj(psi_j) H_jk psi_k),   d|psi_j|^2/dt = sum_k J_jk,

  for i dpsi/dt = H psi; J^T = -J and J_jj = 0 for Hermitian H.

  Args:
    H: Hermitian matrix (N, N), or one per state (..., N, N).
    psi: state(s) (..., N).

  Returns:
    J: real antisymmetric currents (..., N, N); J[..., j, k] flows from k into j.
  """
  H, (psi,) = _hamiltonian_and_states(H, psi=psi)
  return _pair_currents(H, psi)


def probability_currents(H, psi0, psi1, dt=1.0):
  """Exact discrete currents of one Cayley step (wave-function spec §1.5).

    J_jk = 2 dt Im(conj(pbar_j) H_jk pbar_k),   pbar = (psi0 + psi1)/2,
    |psi1_j|^2 - |psi0_j|^2 = sum_k J_jk        (exact when psi1 = U psi0).

  Sign check: Crank-Nicolson gives psi1 - psi0 = -i dt H pbar, and
  |a|^2 - |b|^2 = Re[(a - b) conj(a + b)] = Re[-i dt (H pbar)_j 2 conj(pbar_j)]
  = 2 dt Im(conj(pbar_j) (H pbar)_j) = sum_k J_jk.

  Args:
    H: Hermitian matrix of the step (N, N), or one per state (..., N, N).
    psi0: state before the step (..., N).
    psi1: state after the step (..., N), same shape as ``psi0``.
    dt: step length (scalar > 0).

  Returns:
    J: real antisymmetric currents (..., N, N); J[..., j, k] is the mass moved
    from k into j during the step.
  """
  _checks.check_time_step("dt", dt)
  H, (psi0, psi1) = _hamiltonian_and_states(H, psi0=psi0, psi1=psi1)
  pbar = 0.5 * (psi0 + psi1)
  return jnp.asarray(dt, H.real.dtype) * _pair_currents(H, pbar)


def readout_rates(Ms, H, psi):
  """Readout-space continuity: dp_k/dt = Tr(M_k rho') (wave-function spec §1.5).

    dp_k/dt = -i Tr(M_k [H, rho]) = 2 Im(psi^dagger M_k H psi),   rho = psi psi^dagger.

  Args:
    Ms: POVM elements, Hermitian (K, N, N), or one set per state (..., K, N, N).
    H: Hermitian matrix (N, N), or one per state (..., N, N).
    psi: state(s) (..., N).

  Returns:
    dp: real rates (..., K); they sum to zero for a POVM.
  """
  H, (psi,) = _hamiltonian_and_states(H, psi=psi)
  Ms = _checks.as_array("Ms", Ms, allow_complex=True)
  _checks.check_square("Ms", Ms, batch_dims=None)
  _checks.check_hermitian("Ms", Ms)  # finite too; the rate formula needs M_k Hermitian
  if Ms.ndim < 3 or Ms.shape[-1] != H.shape[-1]:
    raise ValueError(
        f"Ms must have shape (K, {H.shape[-1]}, {H.shape[-1]}) to match H, got "
        f"{tuple(Ms.shape)}")
  _checks.check_batch_axes("Ms", Ms.shape, 3, "psi", psi.shape)
  Ms = Ms.astype(complex_dtype(Ms.dtype, H.dtype))
  Hpsi = jnp.einsum("...bc,...c->...b", H, psi)
  z = jnp.einsum("...a,...kab,...b->...k", jnp.conj(psi), Ms, Hpsi)
  return 2.0 * jnp.imag(z)


class CurrentsTrace(NamedTuple):
  """Result of ``cayley_scan_with_currents``.

  Attributes:
    states: states after each step psi_1..psi_T (T, ..., N).
    currents: per-step discrete currents J^(t) (T, ..., N, N).
    flux: accumulated flux F = sum_t J^(t) (..., N, N).
  """
  states: jax.Array
  currents: jax.Array
  flux: jax.Array


def cayley_scan_with_currents(H_seq, psi0, dt=1.0):
  """Cayley recurrence with exact per-step currents (wave-function spec §1.3, §1.5).

    psi_{t+1} = U_t psi_t,   J^(t)_jk = 2 dt Im(conj(pbar_tj) (H_t)_jk pbar_tk),
    F = sum_t J^(t),   |psi_T|^2 - |psi_0|^2 = F 1   (elementwise row sums).

  Args:
    H_seq: Hermitian matrices (T, N, N), or one sequence per state
      (T, ..., N, N) with the leading axes of ``psi0``.
    psi0: initial state(s) (..., N).
    dt: step length (scalar > 0).

  Returns:
    CurrentsTrace(states (T, ..., N), currents (T, ..., N, N), flux (..., N, N)).
  """
  H_seq, psi0 = _check_sequence(H_seq, psi0)
  _checks.check_time_step("dt", dt)
  return _scan_with_currents(H_seq, psi0, jnp.asarray(dt, H_seq.real.dtype))


@jax.jit
def _scan_with_currents(H_seq, psi0, dt):
  """Compiled body of ``cayley_scan_with_currents``."""

  def body(carry, H_NN):
    psi, flux = carry
    new = cayley_step(H_NN, psi, dt)
    J = dt * _pair_currents(H_NN, 0.5 * (psi + new))
    return (new, flux + J), (new, J)

  flux0 = jnp.zeros(psi0.shape + (psi0.shape[-1],), H_seq.real.dtype)
  (_, flux), (states, currents) = jax.lax.scan(body, (psi0, flux0), H_seq)
  return CurrentsTrace(states, currents, flux)
