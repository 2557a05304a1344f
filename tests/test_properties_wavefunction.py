"""Property-based tests of the wave-function core (wave-function spec §1.3-1.5), in float64.

Each property draws its inputs with ``hypothesis`` from strategies that are
well-posed by construction (stated at each strategy), and checks an identity of
the spec to a tolerance derived from the rounding error of the computation:
eps times a condition number computed from the drawn input, never a tuned
constant. Shapes come from small fixed sets (each new shape compiles anew).

Rounding model used below (Higham, "Accuracy and Stability of Numerical
Algorithms", §9): a solve B x = rhs by LU with partial pivoting has a backward
error gamma_{3N} ~ 3N eps (growth factor O(1) for the well-scaled matrices drawn
here), so a forward error of at most kappa(B) times that; comparing two computed
results doubles it. ``_lu_tol`` rounds this up to 10 N eps kappa(B).
"""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsf_jax.wavefunction import born as bn
from qsf_jax.wavefunction import cayley as cy
from qsf_jax.wavefunction import currents as cu
from qsf_jax.wavefunction import hermitian as hm

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small arrays: compile time dominates

# Deterministic (derandomize), no example database written, no per-example deadline
# (the first example of each shape compiles).
settings.register_profile("qsf_properties", derandomize=True, deadline=None,
                          max_examples=25, database=None, print_blob=True)
PROPS = settings.get_profile("qsf_properties")

EPS = float(np.finfo(np.float64).eps)

seeds = st.integers(0, 2**32 - 1)
# dt * ||H|| spans 1e-3 .. 1e3 (log-uniform): x = dt lambda / 2 stays far below
# 1/sqrt(eps), so no eigenvalue of U comes near -1 within rounding, and
# kappa(I + i dt H/2) <= sqrt(1 + x_max^2) stays below 1e3.
log_dts = st.floats(-3.0, 3.0)


def _rand_H(rng, N, batch=()):
  """A Hermitian H with ||H||_2 = 1 exactly (rescaled): its conditioning under dt
  is then set by dt alone."""
  X = rng.standard_normal(batch + (N, N))
  Y = rng.standard_normal(batch + (N, N))
  H = np.asarray(hm.hermitian_from_real(X, Y))
  return H / np.linalg.norm(H, 2, axis=(-2, -1), keepdims=True)


def _rand_state(rng, N, batch=()):
  z = rng.standard_normal(batch + (N,)) + 1j * rng.standard_normal(batch + (N,))
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _cayley_kappa(H, dt):
  """2-norm condition number of I + i dt H/2 per matrix (normal: singular values
  sqrt(1 + (dt lambda/2)^2))."""
  x = 0.5 * dt * np.linalg.eigvalsh(H)
  s = np.sqrt(1.0 + x**2)
  return s.max(axis=-1) / s.min(axis=-1)


def _lu_tol(N, kappa):
  """10 N eps kappa: see the module docstring."""
  return 10.0 * N * EPS * np.asarray(kappa)


def _maxabs(x, y=0.0):
  return float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))


# --- Cayley cell (spec §1.3) ----------------------------------------------------------------

@PROPS
@given(seed=seeds, log_dt=log_dts, N=st.sampled_from([2, 5]),
       dtype=st.sampled_from([np.complex128, np.complex64]))
def test_cayley_unitary_is_unitary_for_any_hermitian_h_and_dt(seed, log_dt, N, dtype):
  """U^dagger U = I to rounding, scaled by kappa(I + i dt H/2), in H's precision (the
  spec's float64, and the models' complex64)."""
  dt = 10.0**log_dt
  with jax.enable_x64(True):
    H = _rand_H(np.random.default_rng(seed), N).astype(dtype)
    U = np.asarray(cy.cayley_unitary(H, dt))
  assert U.dtype == dtype
  U = U.astype(np.complex128)
  err = _maxabs(U.conj().T @ U, np.eye(N))
  eps = float(np.finfo(dtype).eps)
  assert err <= 2 * _lu_tol(N, _cayley_kappa(H.astype(np.complex128), dt)) * (eps / EPS), (
      err, dt)


@PROPS
@given(seed=seeds, log_dt=log_dts, N=st.sampled_from([2, 5]))
def test_orthogonal_cayley_is_the_unitary_cell_of_h_equal_i_a(seed, log_dt, N):
  """orthogonal_cayley(A, dt) == cayley_unitary(1j * A, dt) for skew A, and Q^T Q = I.

  Strategy: A = S - S^T scaled to ||A||_2 = 1, so 1j * A is exactly Hermitian.
  """
  dt = 10.0**log_dt
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    A = np.asarray(hm.skew_from_real(rng.standard_normal((N, N))))
    A = A / np.linalg.norm(A, 2)
    Q = np.asarray(cy.orthogonal_cayley(A, dt))
    U = np.asarray(cy.cayley_unitary(1j * A, dt))
  tol = _lu_tol(N, _cayley_kappa(1j * A, dt))
  assert Q.dtype == np.float64
  assert _maxabs(Q, U) <= 2 * tol
  assert _maxabs(Q.T @ Q, np.eye(N)) <= 2 * tol


@PROPS
@given(seed=seeds, log_dt=st.floats(-2.0, 2.0), N=st.sampled_from([2, 5]))
def test_hamiltonian_from_unitary_inverts_cayley_unitary(seed, log_dt, N):
  """hamiltonian_from_unitary(cayley_unitary(H, dt), dt) == H.

  Strategy: ||H||_2 = 1, dt in [1e-2, 1e2], so x = dt lambda/2 <= 50 and the
  eigenvalues of U stay at |1 + u| = 2/sqrt(1 + x^2) >= 0.04 from -1.
  Tolerance: H = -(2i/dt)(I - U)(I + U)^{-1} has the derivative
  dH = (4i/dt) (I + U)^{-1} dU (I + U)^{-1}, and ||(I + U)^{-1}||_2 = sqrt(1 + x_max^2)/2,
  so |dH| <= (1 + x_max^2)/dt |dU|, with |dU| bounded by the forward solve
  (``_lu_tol`` with kappa(I + i dt H/2)) plus the inverse solve (``_lu_tol`` with
  kappa(I + U) <= sqrt(1 + x_max^2)).
  """
  dt = 10.0**log_dt
  with jax.enable_x64(True):
    H = _rand_H(np.random.default_rng(seed), N)
    U = cy.cayley_unitary(H, dt)
    H2 = np.asarray(cy.hamiltonian_from_unitary(U, dt))
  x_max = 0.5 * dt * np.max(np.abs(np.linalg.eigvalsh(H)))
  dU = _lu_tol(N, _cayley_kappa(H, dt)) + _lu_tol(N, np.sqrt(1.0 + x_max**2))
  tol = (1.0 + x_max**2) / dt * dU
  assert _maxabs(H2, H2.conj().T) == 0.0
  assert _maxabs(H2, H) <= tol, (_maxabs(H2, H), tol, dt)


# T = 1 and T = 6 (odd splits in the associative scan); one state or a batch of 3
# states with one Hamiltonian sequence each (T, 3, N, N).
SCAN_SHAPES = [(1, ()), (6, ()), (6, (3,))]


@PROPS
@given(seed=seeds, log_dt=log_dts, shape=st.sampled_from(SCAN_SHAPES))
def test_cayley_scan_parallel_equals_cayley_scan_and_conserves_norm(seed, log_dt, shape):
  """cayley_scan_parallel == cayley_scan, and ||psi_t|| = 1 along the scan.

  Each step adds a unitary-to-rounding error of ``_lu_tol`` with that step's kappa;
  unitary factors do not amplify earlier errors, so the errors add up over steps.
  """
  T, batch = shape
  N = 4
  dt = 10.0**log_dt
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    H_seq = _rand_H(rng, N, (T,) + batch)
    psi0 = _rand_state(rng, N, batch)
    last_s, states_s = cy.cayley_scan(H_seq, psi0, dt)
    last_p, states_p = cy.cayley_scan_parallel(H_seq, psi0, dt)
  kappa = _cayley_kappa(H_seq, dt)                       # (T, *batch)
  acc = np.cumsum(np.max(kappa.reshape(T, -1), axis=-1))  # (T,): error bound after t steps
  tol_t = _lu_tol(N, acc)
  states_s, states_p = np.asarray(states_s), np.asarray(states_p)
  for t in range(T):
    assert _maxabs(states_s[t], states_p[t]) <= 2 * tol_t[t], t
    assert _maxabs(np.linalg.norm(states_s[t], axis=-1), 1.0) <= tol_t[t], t
    assert _maxabs(np.linalg.norm(states_p[t], axis=-1), 1.0) <= tol_t[t], t
  assert _maxabs(last_s, states_s[-1]) == 0.0 and _maxabs(last_p, states_p[-1]) == 0.0


# --- Born readout (spec §1.4) ---------------------------------------------------------------

@PROPS
@given(seed=seeds, eta=st.floats(0.0, 1.0), KN=st.sampled_from([(4, 4), (7, 3)]),
       log_scale=st.floats(-2.0, 2.0))
def test_born_probabilities_of_an_isometry_are_a_distribution(seed, eta, KN, log_scale):
  """p_k >= eta/K and sum_k p_k = 1 for M = isometry_from_real(W), ||psi|| = 1.

  Strategy: Gaussian W (full column rank with probability 1) scaled by 10^log_scale.
  Tolerance: sum_k p_k = psi^dagger (M^dagger M) psi, so it differs from 1 by at most
  the measured ||M^dagger M - I||_2 (the isometry's own rounding), plus the rounding
  of the K squared amplitudes and their sum (each amplitude an N-term sum): (K + 2N) eps.
  """
  K, N = KN
  rng = np.random.default_rng(seed)
  W_re = 10.0**log_scale * rng.standard_normal((K, N))
  W_im = 10.0**log_scale * rng.standard_normal((K, N))
  with jax.enable_x64(True):
    M = np.asarray(hm.isometry_from_real(W_re, W_im))
    psi = _rand_state(rng, N)
    p = np.asarray(bn.born_probabilities(M, psi, eta))
  gram_err = np.linalg.norm(M.conj().T @ M - np.eye(N), 2)
  assert np.all(p >= (eta / K) * (1 - 2 * EPS)), p
  assert abs(p.sum() - 1.0) <= gram_err + 4 * (K + 2 * N) * EPS, (p.sum() - 1.0, gram_err)


# --- Currents (spec §1.5) -------------------------------------------------------------------

@PROPS
@given(seed=seeds, log_dt=log_dts, T=st.sampled_from([1, 5]))
def test_scan_currents_account_for_every_population_change(seed, log_dt, T):
  """|psi_T|^2 - |psi_0|^2 = F 1 (row sums of the accumulated flux), J^(t) antisymmetric.

  The discrete continuity law |psi1_j|^2 - |psi0_j|^2 = sum_k J_jk holds exactly
  when psi1 - psi0 = -i dt H pbar, i.e. up to the *residual* of the step's solve,
  whose size is backward-stable: gamma_{3N} (1 + dt ||H||) per step (no kappa).
  The currents themselves are rounded to ~N eps dt ||H|| |pbar|^2 each.
  """
  N = 4
  dt = 10.0**log_dt
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    H_seq = _rand_H(rng, N, (T,))
    psi0 = _rand_state(rng, N)
    tr = cu.cayley_scan_with_currents(H_seq, psi0, dt)
  states, J, F = (np.asarray(a) for a in tr)
  per_step = 10.0 * N * EPS * (1.0 + dt)   # ||H_t||_2 = 1
  lhs = np.abs(states[-1])**2 - np.abs(psi0)**2
  assert _maxabs(lhs, F.sum(axis=-1)) <= T * per_step, (_maxabs(lhs, F.sum(axis=-1)), dt)
  assert _maxabs(J, np.swapaxes(J, -1, -2) * -1.0) <= T * per_step
  assert _maxabs(F, J.sum(axis=0)) <= T * per_step


@PROPS
@given(seed=seeds)
def test_readout_rates_of_a_povm_sum_to_zero(seed):
  """For a POVM {M_k} of an isometry, sum_k dp_k/dt = 0 (probability is conserved).

  Tolerance: each rate is 2 Im(psi^dagger M_k H psi) with ||M_k|| <= 1, ||H|| = 1,
  rounded to ~N^2 eps; their sum over K to K times that.
  """
  K, N = 6, 3
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    M = hm.isometry_from_real(rng.standard_normal((K, N)), rng.standard_normal((K, N)))
    Ms = bn.povm_from_isometry(M)
    H = _rand_H(rng, N)
    psi = _rand_state(rng, N)
    dp = np.asarray(cu.readout_rates(Ms, H, psi))
  gram_err = np.linalg.norm(np.asarray(M).conj().T @ np.asarray(M) - np.eye(N), 2)
  assert abs(dp.sum()) <= 2 * gram_err + 10 * K * N * N * EPS, dp.sum()
