"""Tests of the Born readouts, the isometry parameterisation and real-parameter training
(wave-function spec §1.4, §1.6, §4, §5)."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsf_jax.wavefunction import born as bn
from qsf_jax.wavefunction import cayley as cy
from qsf_jax.wavefunction import hermitian as hm

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small programs: compile time dominates


def _rand_real(seed, shape, dtype=np.float64):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _rand_state(seed, N, batch=()):
  z = _rand_real(seed, batch + (N,)) + 1j * _rand_real(seed + 1, batch + (N,))
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _inf_norm(x):
  return float(jnp.max(jnp.abs(x)))


# --- isometry (spec §1.4) ----------------------------------------------------------------

def test_isometry_from_real_is_the_polar_factor(x64):
  W_re, W_im = _rand_real(0, (2, 9, 4)), _rand_real(1, (2, 9, 4))
  M = hm.isometry_from_real(W_re, W_im)
  assert M.shape == (2, 9, 4) and M.dtype == jnp.complex128
  assert _inf_norm(hm.dagger(M) @ M - jnp.broadcast_to(jnp.eye(4), (2, 4, 4))) < 1e-12
  u, _, vh = np.linalg.svd(W_re + 1j * W_im, full_matrices=False)
  assert _inf_norm(M - u @ vh) < 1e-12


def test_isometry_gradient_is_finite_at_an_isometry(x64):
  # W^dagger W = I has a fully degenerate spectrum: eigh-based derivatives would be 0/0.
  Q, _ = np.linalg.qr(_rand_real(2, (6, 3)) + 1j * _rand_real(3, (6, 3)))
  loss = lambda a, b: jnp.sum(jnp.abs(hm.isometry_from_real(a, b)[0]) ** 2)
  g_re, g_im = jax.grad(loss, argnums=(0, 1))(Q.real, Q.imag)
  assert bool(jnp.all(jnp.isfinite(g_re))) and bool(jnp.all(jnp.isfinite(g_im)))
  # M(W) is the polar factor, so its derivative at an isometry W = Q is the
  # finite difference of the SVD polar factor.
  d_re, d_im = _rand_real(4, (6, 3)), _rand_real(5, (6, 3))

  def polar_loss(t):
    u, _, vh = np.linalg.svd(Q + t * (d_re + 1j * d_im), full_matrices=False)
    return np.sum(np.abs((u @ vh)[0]) ** 2)

  fd = (polar_loss(1e-6) - polar_loss(-1e-6)) / 2e-6
  ad = float(jnp.sum(g_re * d_re) + jnp.sum(g_im * d_im))
  assert abs(ad - fd) < 1e-6 * max(1.0, abs(fd))


# --- Born probabilities and POVMs (spec §1.4) --------------------------------------------

def test_born_probabilities_sum_to_one_and_unsharp_floor(x64):
  M = hm.isometry_from_real(_rand_real(6, (10, 4)), _rand_real(7, (10, 4)))
  psi = _rand_state(8, 4, (5,))
  p = bn.born_probabilities(M, psi)
  assert p.shape == (5, 10) and p.dtype == jnp.float64
  np.testing.assert_allclose(np.sum(p, axis=-1), 1.0, atol=1e-13)
  eta = 0.1
  pe = bn.born_probabilities(M, psi, eta)
  np.testing.assert_allclose(np.sum(pe, axis=-1), 1.0, atol=1e-13)
  assert float(jnp.min(pe)) >= eta / 10
  np.testing.assert_allclose(pe, (1 - eta) * p + eta / 10, atol=1e-15)


def test_povm_form_matches_rank_one_form(x64):
  M = hm.isometry_from_real(_rand_real(9, (7, 3)), _rand_real(10, (7, 3)))
  psi = _rand_state(11, 3, (4,))
  for eta in (0.0, 0.25):
    Ms = bn.povm_from_isometry(M, eta)
    assert _inf_norm(jnp.sum(Ms, axis=0) - jnp.eye(3)) < 1e-13
    assert float(np.min(np.linalg.eigvalsh(np.asarray(Ms)))) > -1e-15
    p = bn.povm_probabilities(Ms, psi)
    np.testing.assert_allclose(np.sum(p, axis=-1), 1.0, atol=1e-13)
    np.testing.assert_allclose(p, bn.born_probabilities(M, psi, eta), atol=1e-14)


def test_quadratic_phase_coupling_expansion(x64):
  # p_k = sum_j (M_k)_jj |psi_j|^2 + 2 sum_{j<l} Re((M_k)_lj psi_j conj(psi_l)), spec §1.4.
  M = hm.isometry_from_real(_rand_real(12, (6, 4)), _rand_real(13, (6, 4)))
  Ms = np.asarray(bn.povm_from_isometry(M))
  psi = _rand_state(14, 4)
  p = np.asarray(bn.born_probabilities(M, psi))
  for k in range(6):
    Mk = Ms[k]
    val = np.sum(np.real(np.diag(Mk)) * np.abs(psi) ** 2)
    val += 2 * sum(np.real(Mk[l, j] * psi[j] * np.conj(psi[l]))
                   for j in range(4) for l in range(j + 1, 4))
    assert abs(val - p[k]) < 1e-14


def test_phase_cancellation_is_exact(x64):
  # Exact in exact arithmetic; in floating point the amplitude m^dagger psi is the
  # difference of two equal rounded products, which a fused multiply-add leaves at the
  # rounding error of one product (~1e-17), so p vanishes to ~1e-33.
  N, j, l = 5, 1, 3
  e = np.eye(N)
  m = (e[j] + e[l]) / np.sqrt(2.0)
  M = m[None, :].conj()  # row = m^dagger
  c = 0.6 * np.exp(0.7j)
  anti = np.zeros(N, complex)
  anti[j], anti[l] = c, -c
  assert 0.0 <= float(bn.born_probabilities(M, anti)[0]) < 1e-30
  same = anti.copy()
  same[l] = c
  np.testing.assert_allclose(float(bn.born_probabilities(M, same)[0]), 2 * abs(c) ** 2, rtol=1e-14)
  # With unsharpness the cancelled outcome keeps exactly the floor eta/K.
  np.testing.assert_allclose(float(bn.born_probabilities(M, anti, 0.1)[0]), 0.1, rtol=1e-14)
  # General relative phase: p = (|psi_j|^2 + |psi_l|^2 + 2|psi_j||psi_l| cos(phi_j - phi_l)) / 2.
  psi = np.zeros(N, complex)
  psi[j], psi[l] = 0.6 * np.exp(0.4j), 0.8 * np.exp(-1.1j)
  expected = 0.5 * (0.36 + 0.64 + 2 * 0.48 * np.cos(1.5))
  np.testing.assert_allclose(float(bn.born_probabilities(M, psi)[0]), expected, rtol=1e-14)


def test_pairwise_tomography_povm_matches_closed_form(x64):
  # The T_N POVM of spec §2.3, m_k = (e_j + i^m e_l) / (sqrt 2 sqrt(2(N-1))), measured on
  # phase states psi_j = exp(-i Phi_j)/sqrt(N), gives
  # p_k = (1-eta)/K (1 + cos(Phi_j - Phi_l - m pi/2)) + eta/K.
  N, eta = 4, 0.1
  rows, labels = [], []
  for j in range(N):
    for l in range(j + 1, N):
      for m in range(4):
        v = np.zeros(N, complex)
        v[j], v[l] = 1.0, 1j ** m
        rows.append(v / (np.sqrt(2) * np.sqrt(2 * (N - 1))))
        labels.append((j, l, m))
  m_KN = np.array(rows)
  K = len(rows)
  M = m_KN.conj()  # rows m_k^dagger
  assert _inf_norm(hm.dagger(M) @ M - np.eye(N)) < 1e-15
  Phi = np.random.default_rng(15).uniform(-np.pi, np.pi, (6, N))
  psi = np.exp(-1j * Phi) / np.sqrt(N)
  p = np.asarray(bn.born_probabilities(M, psi, eta))
  for k, (j, l, m) in enumerate(labels):
    want = (1 - eta) / K * (1 + np.cos(Phi[:, j] - Phi[:, l] - m * np.pi / 2)) + eta / K
    np.testing.assert_allclose(p[:, k], want, atol=1e-15)


def test_born_logits_and_normalized_born(x64):
  W = _rand_real(16, (12, 3)) + 1j * _rand_real(17, (12, 3))
  psi = _rand_state(18, 3, (2,))
  bias = _rand_real(19, (12,))
  amp = np.einsum("vn,bn->bv", W, psi)
  logits = bn.born_logits(W, psi, beta=2.5, bias=bias)
  np.testing.assert_allclose(logits, 2.5 * np.abs(amp) ** 2 + bias, rtol=1e-13)
  np.testing.assert_allclose(bn.born_logits(W, psi), np.abs(amp) ** 2, rtol=1e-13)
  p = bn.normalized_born(W, psi)
  np.testing.assert_allclose(np.sum(p, axis=-1), 1.0, atol=1e-14)
  np.testing.assert_allclose(p, np.abs(amp) ** 2 / np.sum(np.abs(amp) ** 2, -1, keepdims=True),
                             rtol=1e-13)
  # max_psi p_k is the leverage score w_k^dagger G^{-1} w_k (G = W^dagger W), attained at
  # psi = G^{-1} w_k; the scores sum to N.
  G = W.conj().T @ W
  w = W.conj()  # w_k as rows
  lev = np.real(np.einsum("kn,nm,km->k", w.conj(), np.linalg.inv(G), w))
  np.testing.assert_allclose(np.sum(lev), 3.0, rtol=1e-12)
  for k in (0, 5):
    star = np.linalg.solve(G, w[k])
    np.testing.assert_allclose(float(bn.normalized_born(W, star)[k]), lev[k], rtol=1e-12)
    other = _rand_state(20 + k, 3)
    assert float(bn.normalized_born(W, other)[k]) <= lev[k] + 1e-14
  # beta can be a trained parameter.
  g = jax.grad(lambda b: jnp.sum(bn.born_logits(W, psi, beta=b)))(1.0)
  np.testing.assert_allclose(g, np.sum(np.abs(amp) ** 2), rtol=1e-13)


# --- gradients through the cell (spec §1.6) ----------------------------------------------

def _nll(params, psi0, target, eta=0.1):
  """-log p(target) after a few Cayley steps; every parameter is real."""
  H_seq = hm.hermitian_from_real(params["X"], params["Y"])
  M = hm.isometry_from_real(params["W_re"], params["W_im"])
  psi_T, _ = cy.cayley_scan(H_seq, psi0, 0.8, return_states=False)
  psi_T = cy.cayley_step(H_seq[0], psi_T, 0.8)
  return -jnp.log(bn.born_probabilities(M, psi_T, eta)[target])


def _params(seed, T=2, N=4, K=6, dtype=np.float64):
  return {"X": _rand_real(seed, (T, N, N), dtype) / 2, "Y": _rand_real(seed + 1, (T, N, N), dtype) / 2,
          "W_re": _rand_real(seed + 2, (K, N), dtype), "W_im": _rand_real(seed + 3, (K, N), dtype)}


def test_gradients_match_central_differences(x64):
  params = _params(21)
  psi0 = _rand_state(25, 4)
  loss = jax.jit(lambda p: _nll(p, psi0, 2))
  grads = jax.grad(loss)(params)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  g_ad = np.asarray(jax.flatten_util.ravel_pytree(grads)[0])
  assert np.all(np.isfinite(g_ad)) and g_ad.dtype == np.float64
  f = jax.jit(lambda v: loss(unravel(v)))
  eps = 1e-6
  basis = np.eye(flat.size)
  g_fd = np.array([(f(flat + eps * b) - f(flat - eps * b)) / (2 * eps) for b in basis])
  rel = np.linalg.norm(g_ad - g_fd) / np.linalg.norm(g_fd)
  assert rel < 1e-6


@pytest.mark.slow
def test_adam_on_real_parameters_reduces_the_loss():
  params = _params(30, dtype=np.float32)
  psi0 = jnp.ones(4, jnp.complex64) / 2
  targets = jnp.array([0, 3, 5])
  loss = lambda p: jnp.mean(jax.vmap(lambda t: _nll(p, psi0, t))(targets))
  tx = optax.adam(0.05)

  @jax.jit
  def step(p, s):
    val, g = jax.value_and_grad(loss)(p)
    upd, s = tx.update(g, s, p)
    return optax.apply_updates(p, upd), s, val

  opt_state = tx.init(params)
  first = None
  for _ in range(60):
    params, opt_state, val = step(params, opt_state)
    first = float(val) if first is None else first
  final = float(loss(params))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
  # The optimum spreads the mass evenly over the three targets: -log(0.9/3 + 0.1/6) = 1.1499.
  assert first > 2.0 and final < 1.16


# --- bad inputs --------------------------------------------------------------------------

def test_bad_inputs_raise_with_argument_names():
  M = jnp.ones((5, 3), jnp.complex64)
  psi = jnp.ones(3, jnp.complex64)
  with pytest.raises(ValueError, match=r"psi must have shape \(\.\.\., 3\) to match M.*\(4,\)"):
    bn.born_probabilities(M, jnp.ones(4))
  with pytest.raises(ValueError, match=r"M must have at least 2 dimensions, got shape \(3,\)"):
    bn.born_probabilities(jnp.ones(3), psi)
  with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\], got 1.5"):
    bn.born_probabilities(M, psi, eta=1.5)
  for fn in (lambda e: bn.born_probabilities(M, psi, e), lambda e: bn.povm_from_isometry(M, e)):
    with pytest.raises(ValueError, match=r"eta must be a scalar, got shape \(2,\)"):
      fn(jnp.array([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"eta must be a scalar, got shape \(2,\)"):
      jax.jit(fn)(jnp.array([0.1, 0.2]))  # shapes are known under jit too
  with pytest.raises(ValueError, match=r"Ms must be a square matrix.*\(5, 3, 2\)"):
    bn.povm_probabilities(jnp.ones((5, 3, 2)), psi)
  with pytest.raises(ValueError, match=r"psi must have shape \(\.\.\., 3\) to match W"):
    bn.born_logits(M, jnp.ones(2))
  with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
    bn.born_logits(M, psi, bias=jnp.ones(4))
  with pytest.raises(ValueError, match="bias must be real"):
    bn.born_logits(M, psi, bias=jnp.ones(5) * 1j)
  with pytest.raises(ValueError, match=r"beta must have 0 dimension"):
    bn.born_logits(M, psi, beta=jnp.ones(2))
  with pytest.raises(ValueError, match="W_re must be real"):
    hm.isometry_from_real(jnp.ones((5, 3)) * 1j, jnp.ones((5, 3)))
  with pytest.raises(ValueError, match=r"W_re and W_im must have the same shape"):
    hm.isometry_from_real(jnp.ones((5, 3)), jnp.ones((5, 2)))
  with pytest.raises(ValueError, match=r"K >= N.*\(2, 3\)"):
    hm.isometry_from_real(jnp.ones((2, 3)), jnp.ones((2, 3)))


def test_non_finite_states_and_rank_deficient_readouts_are_refused():
  """A NaN state, or a W without full column rank, used to give NaN probabilities."""
  rng = np.random.default_rng(3)
  M = hm.isometry_from_real(rng.normal(size=(5, 3)), rng.normal(size=(5, 3)))
  with pytest.raises(ValueError, match="psi must be finite; it has 1 non-finite"):
    bn.born_probabilities(M, jnp.array([1.0, jnp.nan, 0.0]))
  with pytest.raises(ValueError, match="M must be finite"):
    bn.born_probabilities(M.at[0, 0].set(jnp.inf), jnp.ones(3))
  with pytest.raises(ValueError, match="W_re must be finite"):
    hm.isometry_from_real(np.full((5, 3), np.nan), np.zeros((5, 3)))
  W = rng.normal(size=(2, 5, 3))
  W[1, :, 2] = W[1, :, 0]  # rank 2 in the second batch entry
  with pytest.raises(ValueError, match=r"full column rank \(N=3\).*max \|M\^dagger M - I\|"):
    hm.isometry_from_real(W, np.zeros_like(W))
  with pytest.raises(ValueError, match="full column rank"):
    hm.isometry_from_real(np.zeros((4, 2)), np.zeros((4, 2)))
  # An ill-conditioned but full-rank W (condition number 400, float32) is accepted.
  U, _ = np.linalg.qr(rng.normal(size=(16, 16)) + 1j * rng.normal(size=(16, 16)))
  V, _ = np.linalg.qr(rng.normal(size=(16, 16)) + 1j * rng.normal(size=(16, 16)))
  Wc = (U * np.geomspace(1, 1 / 400, 16)) @ V.conj().T
  Mc = np.asarray(hm.isometry_from_real(Wc.real.astype(np.float32), Wc.imag.astype(np.float32)))
  assert np.abs(Mc.conj().T @ Mc - np.eye(16)).max() < 1e-2
  # Real and imaginary parts that are each rank-deficient can give a full-rank W.
  a = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
  b = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
  M2 = np.asarray(hm.isometry_from_real(a, b))
  np.testing.assert_allclose(M2.conj().T @ M2, np.eye(2), atol=1e-6)
  # Traced values are not checked (the check needs concrete numbers).
  out = jax.jit(hm.isometry_from_real)(np.zeros((4, 2)), np.zeros((4, 2)))
  assert out.shape == (4, 2)
