"""Tests of the continuity equation and the pairwise probability currents
(wave-function spec §1.5, §4, §5)."""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest

from qsf_jax.wavefunction import born as bn
from qsf_jax.wavefunction import cayley as cy
from qsf_jax.wavefunction import currents as cu
from qsf_jax.wavefunction import hermitian as hm

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small programs: compile time dominates


def _rand_real(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape)


def _rand_state(seed, N, batch=()):
  z = _rand_real(seed, batch + (N,)) + 1j * _rand_real(seed + 1, batch + (N,))
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _rand_H(seed, N, batch=()):
  return hm.hermitian_from_real(_rand_real(seed, batch + (N, N)), _rand_real(seed + 1, batch + (N, N)))


def _inf_norm(x):
  return float(jnp.max(jnp.abs(x)))


def test_discrete_continuity_is_exact(x64):
  dt = 0.9
  H = _rand_H(0, 7)
  psi0 = _rand_state(2, 7, (3,))
  psi1 = cy.cayley_step(H, psi0, dt)
  J = cu.probability_currents(H, psi0, psi1, dt)
  assert J.shape == (3, 7, 7) and J.dtype == jnp.float64
  drho = jnp.abs(psi1) ** 2 - jnp.abs(psi0) ** 2
  assert float(jnp.max(jnp.abs(drho))) > 1e-2  # mass really moves
  assert _inf_norm(drho - jnp.sum(J, axis=-1)) < 1e-12
  assert _inf_norm(J + jnp.swapaxes(J, -1, -2)) < 1e-15
  # Matches the literal formula of spec §1.5.
  pbar = 0.5 * (psi0[1] + np.asarray(psi1[1]))
  ref = 2 * dt * np.imag(np.conj(pbar)[:, None] * np.asarray(H) * pbar[None, :])
  assert np.max(np.abs(np.asarray(J[1]) - ref)) < 1e-14


def test_current_sign_is_flow_from_k_into_j(x64):
  # All mass starts in level k = 1; a real coupling moves it into j = 0, so J_01 > 0.
  H = np.array([[0.0, 1.0], [1.0, 0.0]])
  psi0 = np.array([0.0, 1.0], complex)
  psi1 = cy.cayley_step(H, psi0, 0.5)
  J = cu.probability_currents(H, psi0, psi1, 0.5)
  gained = float(jnp.abs(psi1[0]) ** 2)
  assert gained > 0.05
  np.testing.assert_allclose(float(J[0, 1]), gained, rtol=1e-13)
  np.testing.assert_allclose(float(J[1, 0]), -gained, rtol=1e-13)


def test_diagonal_hamiltonian_moves_no_mass(x64):
  H = jnp.diag(jnp.asarray(_rand_real(3, 6)))
  psi0 = _rand_state(4, 6)
  psi1 = cy.cayley_step(H, psi0, 1.0)
  J = cu.probability_currents(H, psi0, psi1, 1.0)
  assert _inf_norm(J) < 1e-16
  assert _inf_norm(cu.instantaneous_currents(H, psi0)) < 1e-16
  assert _inf_norm(jnp.abs(psi1) - jnp.abs(psi0)) < 1e-15


def test_instantaneous_currents_give_the_population_derivative(x64):
  H = _rand_H(5, 5)
  psi = _rand_state(7, 5)
  rho = lambda t: jnp.abs(jsl.expm(-1j * t * H) @ psi) ** 2
  _, drho_dt = jax.jvp(rho, (0.0,), (1.0,))
  J = cu.instantaneous_currents(H, psi)
  assert _inf_norm(J + J.T) < 1e-15
  assert _inf_norm(jnp.sum(J, axis=-1) - drho_dt) < 1e-12
  # The discrete midpoint currents per unit time tend to J as dt -> 0 (first order).
  errs = []
  for dt in (1e-2, 1e-3):
    Jd = cu.probability_currents(H, psi, cy.cayley_step(H, psi, dt), dt) / dt
    errs.append(_inf_norm(Jd - J))
  assert errs[1] < errs[0] / 5 and errs[1] < 1e-2


def test_readout_rates(x64):
  H = _rand_H(8, 4)
  psi = _rand_state(10, 4)
  M = hm.isometry_from_real(_rand_real(11, (9, 4)), _rand_real(12, (9, 4)))
  Ms = bn.povm_from_isometry(M, 0.2)
  p = lambda t: bn.povm_probabilities(Ms, jsl.expm(-1j * t * H) @ psi)
  _, dp_dt = jax.jvp(p, (0.0,), (1.0,))
  rates = cu.readout_rates(Ms, H, psi)
  assert rates.shape == (9,)
  assert _inf_norm(rates - dp_dt) < 1e-12
  assert abs(float(jnp.sum(rates))) < 1e-13


def test_scan_with_currents_accumulates_the_flux(x64):
  T, N, dt = 40, 6, 0.7
  H_seq = _rand_H(13, N, (T,)) / np.sqrt(N)
  psi0 = _rand_state(15, N)
  trace = cu.cayley_scan_with_currents(H_seq, psi0, dt)
  assert trace.states.shape == (T, N) and trace.currents.shape == (T, N, N)
  assert trace.flux.shape == (N, N)
  _, states = cy.cayley_scan(H_seq, psi0, dt)
  assert _inf_norm(trace.states - states) < 1e-14
  prev = jnp.concatenate([jnp.asarray(psi0)[None], states[:-1]])
  for t in (0, 17, T - 1):
    assert _inf_norm(trace.currents[t] - cu.probability_currents(H_seq[t], prev[t], states[t], dt)) < 1e-15
  assert _inf_norm(trace.flux - jnp.sum(trace.currents, axis=0)) < 1e-13
  assert _inf_norm(trace.flux + trace.flux.T) < 1e-13
  drho = jnp.abs(states[-1]) ** 2 - jnp.abs(psi0) ** 2
  assert _inf_norm(drho - jnp.sum(trace.flux, axis=-1)) < 1e-12
  # Per-step continuity holds at every step.
  step_drho = jnp.abs(states) ** 2 - jnp.abs(prev) ** 2
  assert _inf_norm(step_drho - jnp.sum(trace.currents, axis=-1)) < 1e-12


def test_scan_with_currents_float32_and_batch():
  H_seq = hm.random_hermitian(jax.random.PRNGKey(0), 4, batch_shape=(8,))
  psi0 = jnp.ones((2, 4), jnp.complex64) / 2
  trace = jax.jit(cu.cayley_scan_with_currents)(H_seq, psi0)
  assert trace.states.shape == (8, 2, 4) and trace.currents.shape == (8, 2, 4, 4)
  assert trace.flux.dtype == jnp.float32
  drho = jnp.abs(trace.states[-1]) ** 2 - jnp.abs(psi0) ** 2
  assert _inf_norm(drho - jnp.sum(trace.flux, axis=-1)) < 1e-5


def test_bad_inputs_raise_with_argument_names():
  H = jnp.eye(3, dtype=jnp.complex64)
  psi = jnp.ones(3, jnp.complex64)
  with pytest.raises(ValueError, match=r"H must be a square matrix.*\(3, 2\)"):
    cu.probability_currents(H[:, :2], psi, psi)
  with pytest.raises(ValueError,
                     match=r"batched H of shape \(2, 3, 3\) needs psi0 .*\(2, 3\), got \(3,\)"):
    cu.probability_currents(jnp.stack([H, H]), psi, psi)
  with pytest.raises(ValueError, match=r"psi1 must have shape \(\.\.\., 3\).*\(4,\)"):
    cu.probability_currents(H, psi, jnp.ones(4))
  with pytest.raises(ValueError, match="psi1 must be finite"):
    cu.probability_currents(H, psi, psi.at[2].set(jnp.nan))
  with pytest.raises(ValueError, match=r"psi0 and psi1 must have the same shape.*\(3,\).*\(2, 3\)"):
    cu.probability_currents(H, psi, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="dt must be > 0"):
    cu.probability_currents(H, psi, psi, dt=-1.0)
  with pytest.raises(ValueError, match=r"psi must have shape \(\.\.\., 3\)"):
    cu.instantaneous_currents(H, jnp.ones(2))
  with pytest.raises(ValueError, match=r"Ms must have shape \(K, 3, 3\)"):
    cu.readout_rates(jnp.ones((2, 4, 4)), H, psi)
  with pytest.raises(ValueError, match=r"H_seq must have shape \(T, N, N\)"):
    cu.cayley_scan_with_currents(H, psi)
  # A non-Hermitian H is refused: its "currents" are not antisymmetric (no continuity).
  bad = jnp.ones((3, 3)) + 1j * jnp.triu(jnp.ones((3, 3)))
  for call in (lambda: cu.probability_currents(bad, psi, psi),
               lambda: cu.instantaneous_currents(bad, psi),
               lambda: cu.readout_rates(jnp.stack([H, H]), bad, psi)):
    with pytest.raises(ValueError, match=r"H must be Hermitian"):
      call()
