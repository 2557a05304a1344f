"""Tests of the Cayley cell and its Hermitian parameterisation (wave-function spec §1.2, §1.3, §4, §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.wavefunction import cayley as cy
from qsf_jax.wavefunction import hermitian as hm

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small arrays: compile time dominates


def _rand_real(seed, shape, dtype=np.float64):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _rand_state(seed, N, batch=()):
  z = _rand_real(seed, batch + (N,)) + 1j * _rand_real(seed + 1, batch + (N,))
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _rand_H(seed, N, batch=()):
  X = _rand_real(seed, batch + (N, N)) / np.sqrt(N)
  Y = _rand_real(seed + 100, batch + (N, N)) / np.sqrt(N)
  return hm.hermitian_from_real(X, Y)


def _inf_norm(x, y=0.0):
  """max |x - y|, on the host: a check compiles nothing of its own."""
  return float(np.max(np.abs(np.asarray(x) - np.asarray(y))))


# --- Hermitian / skew construction (spec §1.2) -------------------------------------------

def test_hermitian_from_real_is_hermitian_with_matching_precision(x64):
  X, Y = _rand_real(0, (2, 5, 5)), _rand_real(1, (2, 5, 5))
  H = hm.hermitian_from_real(X, Y)
  assert H.dtype == jnp.complex128 and H.shape == (2, 5, 5)
  assert _inf_norm(H, hm.dagger(H)) == 0.0
  np.testing.assert_allclose(np.real(H), 0.5 * (X + np.swapaxes(X, -1, -2)), atol=1e-15)
  np.testing.assert_allclose(np.imag(H), 0.5 * (Y - np.swapaxes(Y, -1, -2)), atol=1e-15)


def test_hermitian_from_real_float32_gives_complex64():
  H = hm.hermitian_from_real(_rand_real(0, (4, 4), np.float32), _rand_real(1, (4, 4), np.float32))
  assert H.dtype == jnp.complex64


def test_skew_from_real_is_s_minus_its_transpose():
  """Wave-function spec §1.3: A = S - S^T (no factor 1/2), for stacks too."""
  S = np.asarray(_rand_real(5, (2, 4, 4)), np.float64)
  np.testing.assert_allclose(np.asarray(hm.skew_from_real(S), np.float64),
                             S - np.swapaxes(S, -1, -2), rtol=1e-6, atol=1e-6)


def test_skew_and_random_hermitian(x64):
  A = hm.skew_from_real(_rand_real(2, (3, 6, 6)))
  assert _inf_norm(A + np.swapaxes(A, -1, -2)) == 0.0
  H = hm.random_hermitian(jax.random.PRNGKey(0), 6, dtype=jnp.float64, batch_shape=(4,))
  assert H.shape == (4, 6, 6) and H.dtype == jnp.complex128
  assert _inf_norm(H, hm.dagger(H)) == 0.0
  assert 0.2 < float(jnp.std(jnp.real(H))) < 1.0  # entries of size 1/sqrt(N)
  with pytest.raises(ValueError, match="key must be a JAX PRNG key"):
    hm.random_hermitian(0, 6)  # an int seed, as numpy takes


# --- Cayley unitary (spec §1.3) ----------------------------------------------------------

@pytest.mark.parametrize("dt", [1.0, 0.3, 4.0])
def test_cayley_unitary_is_unitary(x64, dt):
  U = cy.cayley_unitary(_rand_H(3, 8, (5,)) * 3.0, dt)
  err = hm.dagger(U) @ U - jnp.broadcast_to(jnp.eye(8), U.shape)
  assert _inf_norm(err) < 1e-12


def test_eigenphase_map(x64):
  dt = 0.7
  H = _rand_H(4, 8) * 4.0
  lam, V = np.linalg.eigh(np.asarray(H))
  U = np.asarray(cy.cayley_unitary(H, dt))
  D = V.conj().T @ U @ V
  expected = np.exp(-2j * np.arctan(lam * dt / 2))
  assert np.max(np.abs(D - np.diag(expected))) < 1e-12
  np.testing.assert_allclose(np.angle(np.diag(D)), -2 * np.arctan(lam * dt / 2), atol=1e-12)


def test_cayley_step_matches_unitary_and_supports_batches(x64):
  H = _rand_H(5, 6)
  psi = _rand_state(6, 6, (3, 2))
  U = cy.cayley_unitary(H, 0.5)
  out = cy.cayley_step(H, psi, 0.5)
  assert out.shape == (3, 2, 6)
  assert _inf_norm(out, np.einsum("nm,abm->abn", U, psi)) < 1e-13
  # Batched Hamiltonians with matching batched states.
  Hb = _rand_H(7, 6, (4,))
  psib = _rand_state(8, 6, (4,))
  outb = cy.cayley_step(Hb, psib)
  ref = jnp.stack([cy.cayley_step(Hb[i], psib[i]) for i in range(4)])
  assert _inf_norm(outb, ref) < 1e-13
  # jit and vmap give the same result.
  outv = jax.jit(jax.vmap(cy.cayley_step, in_axes=(0, 0)))(Hb, psib)
  assert _inf_norm(outv, ref) < 1e-13


def test_cayley_step_solves_crank_nicolson_system(x64):
  H, psi, dt = _rand_H(9, 5), _rand_state(10, 5), 1.3
  new = cy.cayley_step(H, psi, dt)
  I = np.eye(5)
  lhs = (I + 0.5j * dt * np.asarray(H)) @ np.asarray(new)
  rhs = (I - 0.5j * dt * np.asarray(H)) @ psi
  assert np.max(np.abs(lhs - rhs)) < 1e-13


def test_inverse_map_round_trips(x64):
  dt = 0.8
  H = _rand_H(11, 7) * 2.0
  assert _inf_norm(cy.hamiltonian_from_unitary(cy.cayley_unitary(H, dt), dt), H) < 1e-12
  # A random unitary (QR of a Gaussian matrix) has no eigenvalue -1 almost surely.
  Q, _ = np.linalg.qr(_rand_real(12, (7, 7)) + 1j * _rand_real(13, (7, 7)))
  H2 = cy.hamiltonian_from_unitary(Q, dt)
  assert _inf_norm(H2, hm.dagger(H2)) == 0.0
  assert _inf_norm(cy.cayley_unitary(H2, dt), Q) < 1e-11
  # Diagonal phase targets: lambda_j = (2/dt) tan(theta_j / 2), spec §1.3.
  theta = np.linspace(-3.0, 3.0, 7)
  Hd = cy.hamiltonian_from_unitary(np.diag(np.exp(-1j * theta)), dt)
  np.testing.assert_allclose(np.diag(np.asarray(Hd)).real, (2 / dt) * np.tan(theta / 2), rtol=1e-12)
  assert _inf_norm(Hd, jnp.diag(jnp.diag(Hd))) < 1e-14


def test_realify_is_an_orthogonal_homomorphism(x64):
  U1 = cy.cayley_unitary(_rand_H(14, 5))
  U2 = cy.cayley_unitary(_rand_H(15, 5))
  R1, R2 = cy.realify(U1), cy.realify(U2)
  assert R1.shape == (10, 10) and R1.dtype == jnp.float64
  assert _inf_norm(R1.T @ R1, np.eye(10)) < 1e-12
  assert abs(float(jnp.linalg.det(R1)) - 1.0) < 1e-12
  assert _inf_norm(cy.realify(U1 @ U2), R1 @ R2) < 1e-14
  psi = _rand_state(16, 5)
  assert _inf_norm(R1 @ cy.realify_state(psi), cy.realify_state(U1 @ psi)) < 1e-14


def test_orthogonal_cayley_is_special_orthogonal_and_equals_complex_cell(x64):
  A = hm.skew_from_real(_rand_real(17, (2, 6, 6)))
  dt = 0.9
  Q = cy.orthogonal_cayley(A, dt)
  assert Q.dtype == jnp.float64
  assert _inf_norm(jnp.swapaxes(Q, -1, -2) @ Q, jnp.broadcast_to(jnp.eye(6), Q.shape)) < 1e-12
  np.testing.assert_allclose(np.linalg.det(np.asarray(Q)), 1.0, atol=1e-12)
  # Same cell as the complex map with the purely imaginary Hamiltonian H = iA.
  assert _inf_norm(cy.cayley_unitary(1j * A, dt), Q) < 1e-13
  h = _rand_real(18, (3, 6))
  h1 = cy.orthogonal_step(A[0], h, dt)
  assert _inf_norm(h1, h @ np.asarray(Q[0]).T) < 1e-13
  np.testing.assert_allclose(np.linalg.norm(h1, axis=-1), np.linalg.norm(h, axis=-1), rtol=1e-13)


# --- recurrences (spec §1.6) -------------------------------------------------------------

def test_scan_matches_step_loop_and_parallel_products(x64):
  H_seq = _rand_H(19, 6, (9,)) * 2.0
  psi0 = _rand_state(20, 6)
  psi_T, states = jax.jit(cy.cayley_scan)(H_seq, psi0, 0.6)
  psi = psi0
  for t in range(9):
    psi = cy.cayley_step(H_seq[t], psi, 0.6)
    assert _inf_norm(states[t], psi) < 1e-13
  assert _inf_norm(psi_T, psi) < 1e-13
  P = cy.cayley_products(H_seq, 0.6)
  ref = cy.cayley_unitary(H_seq[0], 0.6)
  for t in range(9):
    if t:
      ref = cy.cayley_unitary(H_seq[t], 0.6) @ ref
    assert _inf_norm(P[t], ref) < 1e-12
  psi_Tp, states_p = cy.cayley_scan_parallel(H_seq, psi0, 0.6)
  assert _inf_norm(states_p, states) < 1e-12
  assert _inf_norm(psi_Tp, psi_T) < 1e-12
  last, none = cy.cayley_scan(H_seq, psi0, 0.6, return_states=False)
  assert none is None and _inf_norm(last, psi_T) == 0.0


def test_traced_dt_under_jit_and_grad(x64):
  H_seq = _rand_H(23, 4, (3,))
  psi0 = _rand_state(24, 4)
  target = np.eye(4)[1]

  def overlap(dt):
    psi_T, _ = cy.cayley_scan(H_seq, psi0, dt, return_states=False)
    return jnp.abs(jnp.vdot(target, psi_T)) ** 2

  f = jax.jit(overlap)
  g = jax.jit(jax.grad(overlap))(0.7)
  fd = (f(0.7 + 1e-6) - f(0.7 - 1e-6)) / 2e-6
  assert abs(float(g) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))
  assert abs(float(f(0.7)) - float(overlap(0.7))) < 1e-14


def test_parallel_twin_float32():
  H_seq = hm.random_hermitian(jax.random.PRNGKey(1), 8, batch_shape=(16,))
  psi0 = jnp.ones(8, jnp.complex64) / jnp.sqrt(8.0)
  _, s = cy.cayley_scan(H_seq, psi0)
  _, sp = cy.cayley_scan_parallel(H_seq, psi0)
  assert s.dtype == sp.dtype == jnp.complex64
  assert _inf_norm(s, sp) < 1e-5
  # No step: both forms return psi0 and an empty (0, N) state array.
  for scan in (cy.cayley_scan, cy.cayley_scan_parallel):
    last, states = scan(H_seq[:0], psi0)
    np.testing.assert_array_equal(np.asarray(last), np.asarray(psi0))
    assert states.shape == (0, 8) and states.dtype == jnp.complex64


def test_scan_batched_states(x64):
  H_seq = _rand_H(21, 4, (5,))
  psi0 = _rand_state(22, 4, (3,))
  psi_T, states = cy.cayley_scan(H_seq, psi0)
  assert states.shape == (5, 3, 4)
  for b in range(3):
    assert _inf_norm(cy.cayley_scan(H_seq, psi0[b])[0], psi_T[b]) < 1e-13


def _cycled_norm_drift(dtype, T=10_000, N=8, n_hamiltonians=4):
  """|‖psi_T‖ - 1| after T Cayley steps cycling a fixed set of Hamiltonians."""
  Hs = hm.random_hermitian(jax.random.PRNGKey(0), N, dtype=dtype, batch_shape=(n_hamiltonians,))
  H_seq = jnp.tile(Hs, (T // n_hamiltonians, 1, 1))
  psi0 = jnp.ones(N, Hs.dtype) / jnp.sqrt(jnp.asarray(N, dtype))
  run = jax.jit(lambda H, p: cy.cayley_scan(H, p, return_states=False)[0])
  return abs(float(jnp.linalg.norm(run(H_seq, psi0))) - 1.0)


def test_norm_drift_float64(x64):
  assert _cycled_norm_drift(jnp.float64) < 1e-12


def test_norm_drift_float32():
  assert _cycled_norm_drift(jnp.float32) < 1e-5


# --- bad inputs --------------------------------------------------------------------------

def test_bad_inputs_raise_with_argument_names():
  H = hm.random_hermitian(jax.random.PRNGKey(0), 4)
  psi = jnp.ones(4, jnp.complex64) / 2
  with pytest.raises(ValueError, match=r"H must be a square matrix.*\(4, 3\)"):
    cy.cayley_step(H[:, :3], psi)
  with pytest.raises(ValueError, match=r"psi must have shape \(\.\.\., 4\).*\(5,\)"):
    cy.cayley_step(H, jnp.ones(5))
  with pytest.raises(ValueError, match=r"batched H.*\(2, 4, 4\).*\(3, 4\)"):
    cy.cayley_step(jnp.stack([H, H]), jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="dt must be > 0"):
    cy.cayley_unitary(H, 0.0)
  # An array dt would broadcast against H's columns and break unitarity silently.
  with pytest.raises(ValueError, match=r"dt must be a scalar, got shape \(4,\)"):
    cy.cayley_step(H, psi, dt=jnp.full(4, 0.1))
  with pytest.raises(ValueError, match="dt must be > 0 and finite"):
    cy.cayley_unitary(H, jnp.inf)
  with pytest.raises(ValueError,
                     match=r"H_seq must have shape \(T, N, N\) or \(T, \.\.\., N, N\), got \(4, 4\)"):
    cy.cayley_scan(H, psi)
  with pytest.raises(ValueError, match=r"psi0 must have shape \(\.\.\., 4\)"):
    cy.cayley_scan(H[None], jnp.ones(3))
  with pytest.raises(ValueError, match="psi must be finite"):
    cy.cayley_step(H, psi.at[0].set(jnp.nan))
  with pytest.raises(ValueError, match="psi0 must be finite"):
    cy.cayley_scan(H[None], psi.at[1].set(jnp.inf))
  # A truthy non-bool is refused rather than read as True.
  with pytest.raises(ValueError, match="return_states must be a bool.*'no'"):
    cy.cayley_scan(H[None], psi, return_states="no")
  for scan in (cy.cayley_scan, cy.cayley_scan_parallel):
    with pytest.raises(ValueError, match=r"batched H_seq\[t\] of shape \(2, 4, 4\) needs psi0 .*"
                       r"shape \(2, 4\), got \(3, 4\); pass one H_seq\[t\] of shape \(4, 4\)"):
      scan(jnp.stack([H, H])[None], jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="X must be real"):
    hm.hermitian_from_real(jnp.ones((3, 3)) * 1j, jnp.ones((3, 3)))
  with pytest.raises(ValueError, match=r"X and Y must have the same shape.*\(3, 3\).*\(4, 4\)"):
    hm.hermitian_from_real(jnp.ones((3, 3)), jnp.ones((4, 4)))
  with pytest.raises(ValueError, match=r"X must be a square matrix.*\(3, 4\)"):
    hm.hermitian_from_real(jnp.ones((3, 4)), jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="S must be real"):
    hm.skew_from_real(jnp.ones((3, 3), jnp.complex64))
  with pytest.raises(ValueError, match="A must be real"):
    cy.orthogonal_cayley(jnp.ones((3, 3), jnp.complex64))
  with pytest.raises(ValueError, match=r"h must have shape \(\.\.\., 3\)"):
    cy.orthogonal_step(jnp.zeros((3, 3)), jnp.ones(2))
  with pytest.raises(ValueError, match="h must be real"):
    cy.orthogonal_step(jnp.zeros((3, 3)), jnp.ones(3) * 1j)
  with pytest.raises(ValueError, match=r"U must be a square matrix"):
    cy.realify(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="N must be >= 1, got 0"):
    hm.random_hermitian(jax.random.PRNGKey(0), 0)
  with pytest.raises(ValueError, match="N must be an int, got 2.0"):
    hm.random_hermitian(jax.random.PRNGKey(0), 2.0)
  # under jit, a size or a flag must be static, and the error says so
  with pytest.raises(ValueError, match=r"N must be a Python int, but it is traced.*static_arg"):
    jax.jit(lambda n: hm.random_hermitian(jax.random.PRNGKey(0), n))(3)
  H2 = jnp.stack([hm.random_hermitian(jax.random.PRNGKey(0), 3)] * 2)
  with pytest.raises(ValueError, match=r"return_states must be a Python bool, but it is traced"):
    jax.jit(lambda r: cy.cayley_scan(H2, jnp.ones(3, jnp.complex64), return_states=r))(True)


def test_structure_of_concrete_inputs_is_checked(x64):
  """Non-Hermitian H, non-antisymmetric A, and a U that is not unitary or has an
  eigenvalue at -1 used to give silently wrong (non-unitary) results."""
  rng = np.random.default_rng(0)
  G = rng.normal(size=(4, 4)) + 1j * rng.normal(size=(4, 4))
  psi = jnp.ones(4, jnp.complex128) / 2
  with pytest.raises(ValueError, match="H must be Hermitian"):
    cy.cayley_step(G, psi)
  with pytest.raises(ValueError, match="H_seq must be Hermitian"):
    cy.cayley_scan(jnp.stack([G + G.conj().T, G]), psi)
  with pytest.raises(ValueError, match="H has non-finite entries"):
    cy.cayley_unitary(jnp.full((2, 2), jnp.nan))
  for cell in (cy.orthogonal_cayley, lambda A: cy.orthogonal_step(A, np.ones(3))):
    with pytest.raises(ValueError, match="A must be antisymmetric"):
      cell(rng.normal(size=(3, 3)))
  # rounding-level asymmetry of a computed Hermitian matrix passes, in float32 too
  Q = np.linalg.qr(G)[0]
  H_c = (Q * rng.normal(size=4)) @ Q.conj().T
  cy.cayley_unitary(jnp.asarray(H_c, jnp.complex64))
  cy.cayley_unitary(H_c)
  # traced inputs are not checked (values unknown at trace time)
  jax.jit(cy.cayley_unitary)(G)
  U = cy.cayley_unitary(H_c)
  with pytest.raises(ValueError, match="U must be unitary"):
    cy.hamiltonian_from_unitary(1.1 * U)
  for theta in (np.pi, np.pi - 1e-12):
    U_m1 = Q @ np.diag(np.exp(-1j * np.array([theta, 0.3, -1.0, 2.0]))) @ Q.conj().T
    with pytest.raises(ValueError, match="eigenvalue at or near -1"):
      cy.hamiltonian_from_unitary(U_m1)
  U_ok = Q @ np.diag(np.exp(-1j * np.array([np.pi - 1e-4, 0.3, -1.0, 2.0]))) @ Q.conj().T
  np.testing.assert_allclose(cy.cayley_unitary(cy.hamiltonian_from_unitary(U_ok)), U_ok,
                             atol=1e-9)


def _fd_check(loss, X, Y, eps=1e-6, n_dirs=3):
  """Directional central differences of a real loss against jax.grad (both jitted:
  one compile each instead of one per primitive)."""
  gX, gY = jax.jit(jax.grad(loss, argnums=(0, 1)))(X, Y)
  loss = jax.jit(loss)
  rng = np.random.default_rng(7)
  for _ in range(n_dirs):
    dX, dY = rng.standard_normal(X.shape), rng.standard_normal(Y.shape)
    fd = (loss(X + eps * dX, Y + eps * dY) - loss(X - eps * dX, Y - eps * dY)) / (2 * eps)
    an = float(jnp.sum(gX * dX) + jnp.sum(gY * dY))
    assert abs(fd - an) <= 1e-6 * max(1.0, abs(fd)), (fd, an)


def test_cayley_unitary_gradient_matches_finite_differences(x64):
  """The custom derivative of the refined LU solve is the exact solve's derivative."""
  X, Y = _rand_real(1, (3, 5, 5)), _rand_real(2, (3, 5, 5))
  w = jnp.asarray(_rand_real(3, (1, 5, 5)))

  def loss(X, Y):
    U = cy.cayley_unitary(hm.hermitian_from_real(X, Y), dt=0.7)
    return jnp.sum(w * jnp.real(U)) + jnp.sum(jnp.swapaxes(w, 1, 2) * jnp.imag(U) ** 2)

  _fd_check(loss, jnp.asarray(X), jnp.asarray(Y))

  def loss_step(X, Y):
    psi = jnp.asarray(_rand_state(4, 5))
    p = cy.cayley_step(hm.hermitian_from_real(X[0], Y[0]), psi, dt=0.7)
    return jnp.sum(jnp.abs(p[:2]) ** 2)

  _fd_check(loss_step, jnp.asarray(X), jnp.asarray(Y))


def test_forward_mode_matches_reverse_mode_and_finite_differences(x64):
  """jvp of every cell (custom_linear_solve) equals central differences; jacfwd equals
  jacrev, and hessian (forward over reverse) equals reverse over reverse."""
  X, Y = jnp.asarray(_rand_real(1, (4, 4))), jnp.asarray(_rand_real(2, (4, 4)))
  psi = jnp.asarray(_rand_state(4, 4))
  cells = {
      "cayley_unitary": lambda X, Y: cy.cayley_unitary(hm.hermitian_from_real(X, Y), 0.7),
      "cayley_step": lambda X, Y: cy.cayley_step(hm.hermitian_from_real(X, Y), psi, 0.7),
      "hamiltonian_from_unitary": lambda X, Y: cy.hamiltonian_from_unitary(
          cy.cayley_unitary(hm.hermitian_from_real(X, Y), 0.7), 0.7),
      "orthogonal_step": lambda X, Y: cy.orthogonal_step(
          hm.skew_from_real(X), jnp.real(psi) + Y[0], 0.7),
  }
  rng = np.random.default_rng(8)
  dX, dY = jnp.asarray(rng.standard_normal((4, 4))), jnp.asarray(rng.standard_normal((4, 4)))
  eps = 1e-6

  @jax.jit  # one program for every cell: the jvp's primal and tangent, both differences
  def jvps(X, Y):
    return {name: jax.jvp(cell, (X, Y), (dX, dY)) + (
        cell(X + eps * dX, Y + eps * dY), cell(X - eps * dX, Y - eps * dY))
            for name, cell in cells.items()}

  for name, (out, tangent, plus, minus) in jvps(X, Y).items():
    np.testing.assert_allclose(out, cells[name](X, Y), rtol=0, atol=1e-14, err_msg=name)
    np.testing.assert_allclose(tangent, (plus - minus) / (2 * eps), rtol=0, atol=1e-7,
                               err_msg=name)
  split = lambda X, Y: (jnp.real(cells["cayley_step"](X, Y)), jnp.imag(cells["cayley_step"](X, Y)))
  loss = lambda X, Y: jnp.sum(jnp.abs(cells["cayley_step"](X, Y)[:2]) ** 2)
  fwd, rev, h_fwd, h_rev = jax.jit(lambda X, Y: (
      jax.jacfwd(split)(X, Y), jax.jacrev(split)(X, Y),
      jax.hessian(loss)(X, Y), jax.jacrev(jax.jacrev(loss))(X, Y)))(X, Y)
  for f, r in zip(jax.tree.leaves((fwd, h_fwd)), jax.tree.leaves((rev, h_rev))):
    np.testing.assert_allclose(f, r, rtol=0, atol=1e-12)


def test_cayley_unitary_gradient_batched_complex64():
  """Backprop through many complex64 Cayley unitaries completes and is finite."""
  X = jnp.asarray(_rand_real(5, (160, 32, 32), np.float32))
  Y = jnp.asarray(_rand_real(6, (160, 32, 32), np.float32))
  w = jnp.asarray(_rand_real(7, (1, 32, 32), np.float32))
  loss = lambda X, Y: jnp.sum(w * jnp.real(cy.cayley_unitary(hm.hermitian_from_real(X, Y))))
  gX, gY = jax.jit(jax.grad(loss, argnums=(0, 1)))(X, Y)
  assert gX.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(gX) & jnp.isfinite(gY)))
  # Forward mode completes too and gives the same directional derivative.
  dX, dY = jnp.sign(gX), jnp.ones_like(gY)
  _, tangent = jax.jit(lambda X, Y: jax.jvp(loss, (X, Y), (dX, dY)))(X, Y)
  want = jnp.sum(gX * dX) + jnp.sum(gY * dY)
  assert abs(float(tangent) - float(want)) <= 1e-4 * abs(float(want))
