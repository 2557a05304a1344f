"""The Born-logit separation task and its explicit models (wave-function spec §2.6)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.separation import adjoint, born_logit_rows, bounds, construction, models, train
from qsf_jax.tasks import born_logit as bl
from qsf_jax.tasks import separation as ts
from qsf_jax.wavefunction.born import povm_probabilities
from qsf_jax.wavefunction.cayley import cayley_unitary

pytestmark = pytest.mark.usefixtures("fast_compiles")  # tiny models: compile time dominates


def _random_state(rng, N):
  psi = rng.normal(size=N) + 1j * rng.normal(size=N)
  return psi / np.linalg.norm(psi)


def _random_unitary(rng, N):
  Q, R = np.linalg.qr(rng.normal(size=(N, N)) + 1j * rng.normal(size=(N, N)))
  return Q * (np.diag(R) / np.abs(np.diag(R)))


# --- task -----------------------------------------------------------------------------

@pytest.mark.parametrize("N", [2, 3, 5])
def test_hermitian_basis_is_orthonormal_traceless_hermitian(N):
  B = bl.hermitian_basis(N)
  assert B.shape == (N * N - 1, N, N)
  np.testing.assert_allclose(np.einsum("iab,jba->ij", B, B), np.eye(N * N - 1), atol=1e-15)
  np.testing.assert_allclose(B, np.conj(np.swapaxes(B, 1, 2)), atol=0)
  np.testing.assert_allclose(np.trace(B, axis1=1, axis2=2), 0, atol=1e-15)
  off = bl.hermitian_basis(N, offdiagonal_only=True)
  assert off.shape == (N * (N - 1), N, N)
  np.testing.assert_array_equal(off, B[:N * (N - 1)])
  assert np.all(np.diagonal(off, axis1=1, axis2=2) == 0)


def test_phase_targets_match_the_closed_form():
  """Tr(M_k rho_c) = (1 + cos(Phi_j - Phi_l - m pi/2)) / K on the phase states of T_N."""
  N = 4
  task = bl.make_born_logit_task(N, beta=3.0, seed=5)
  t_n = ts.make_task(N, seed=5, eta=0.0)  # the same cue phases, unsharpness 0
  np.testing.assert_array_equal(task.tokens_CT, t_n.tokens_CT)
  np.testing.assert_allclose(task.logits_CK, 3.0 * t_n.probs_CK, atol=1e-14)
  z = np.exp(3.0 * t_n.probs_CK)
  np.testing.assert_allclose(task.probs_CK, z / z.sum(1, keepdims=True), rtol=1e-13)
  np.testing.assert_allclose(task.probs_CK.sum(1), 1.0, atol=1e-14)
  psi_re, psi_im = ts.target_state(t_n.Phi_CN)
  np.testing.assert_allclose(task.psi_CN, psi_re + 1j * psi_im, atol=1e-13)


def test_generic_targets_match_the_core_cayley_and_born_rule(x64):
  """An independent route: the jax core Cayley map and explicit POVM matrices, per context."""
  task = bl.make_born_logit_task(3, contexts="generic", beta=2.0, num_cues=3, length=2, seed=1)
  U = np.asarray(cayley_unitary(jnp.asarray(task.H_ANN), 1.0))
  m_re, m_im = ts.povm_vectors(3)
  m = m_re + 1j * m_im
  Ms = jnp.asarray(np.einsum("ka,kb->kab", m, m.conj()))
  for c, (a1, a2) in enumerate(itertools.product(range(3), repeat=2)):
    psi = U[a2] @ U[a1] @ np.full(3, 1 / np.sqrt(3))
    np.testing.assert_allclose(task.psi_CN[c], psi, atol=1e-14)
    logits = 2.0 * np.asarray(povm_probabilities(Ms, jnp.asarray(psi)))
    np.testing.assert_allclose(task.logits_CK[c], logits, atol=1e-14)
  np.testing.assert_allclose(np.linalg.norm(task.psi_CN, axis=1), 1.0, atol=1e-14)
  assert task.tokens_CT.tolist()[:2] == [[0, 1, 1], [0, 1, 2]]


@pytest.mark.parametrize("N", [3, 4, 5])
@pytest.mark.parametrize("contexts", ["phase", "generic"])
def test_rank_certificate_is_the_exact_real_dimension(N, contexts):
  """rank J_C log P* J_K = N(N-1) for phase states, N^2 - 1 for generic ones (spec §2.6)."""
  task = bl.make_born_logit_task(N, contexts=contexts)
  expected = N * (N - 1) if contexts == "phase" else N * N - 1
  assert task.exact_real_dim == expected
  assert bounds.log_rank(task.probs_CK) == expected
  ey = bounds.eckart_young_bound(task.probs_CK, np.array([expected - 1, expected]))
  assert ey[0] > 1e-2 and ey[1] < 1e-12


def test_default_dims_bracket_the_exact_dimension():
  assert born_logit_rows.default_dims(bl.make_born_logit_task(3, num_cues=3)) == (3, 5, 6, 12)
  generic = bl.make_born_logit_task(4, contexts="generic", num_cues=3)
  assert born_logit_rows.default_dims(generic) == (4, 8, 14, 15, 30)


def test_default_beta_is_K():
  task = bl.make_born_logit_task(3)
  assert task.beta == task.K == 12
  np.testing.assert_allclose(task.logits_CK.max(), 2.0, rtol=0.1)  # spread [0, 2] (phase)
  assert 0 < np.log(task.K) - task.entropy < 1  # neither uniform nor near one-hot


@pytest.mark.parametrize("kwargs,match", [
    (dict(N=3, contexts="random"), "contexts must be one of"),
    (dict(N=2, contexts="generic"), "N must be >= 3"),
    (dict(N=1), "N must be >= 2"),
    (dict(N=3, beta=0.0), "beta must be a finite number > 0"),
    (dict(N=3, beta=float("nan")), "beta must be a finite number > 0"),
    (dict(N=3, beta=True), "beta must be a finite number > 0"),
    (dict(N=3, beta="2"), "beta must be a finite number > 0"),
    (dict(N=3, beta=1j), "beta must be a finite number > 0"),
    (dict(N=3, num_cues=0), "num_cues must be >= 1"),
    (dict(N=3, num_cues=20, length=5), "too many"),
    (dict(N=2000), r"N = 2000 has K = 7,996,000 outputs and C = 512 contexts.*lower N"),
])
def test_task_bad_inputs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bl.make_born_logit_task(**kwargs)


# --- adjoint representation -----------------------------------------------------------

def test_adjoint_is_an_orthogonal_representation():
  rng = np.random.default_rng(0)
  N = 4
  B = bl.hermitian_basis(N)
  U, V = _random_unitary(rng, N), _random_unitary(rng, N)
  O_U, O_V = adjoint.adjoint_matrix(U, B), adjoint.adjoint_matrix(V, B)
  np.testing.assert_allclose(O_U.T @ O_U, np.eye(N * N - 1), atol=1e-13)
  np.testing.assert_allclose(adjoint.adjoint_matrix(U @ V, B), O_U @ O_V, atol=1e-13)
  psi = _random_state(rng, N)
  h = adjoint.state_coordinates(psi[None], B)[0]
  np.testing.assert_allclose(np.linalg.norm(h), 1.0, atol=1e-14)
  np.testing.assert_allclose(adjoint.state_coordinates((U @ psi)[None], B)[0], O_U @ h,
                             atol=1e-13)
  # rho = I/N + sqrt(1 - 1/N) sum_i h_i B_i
  rho = np.eye(N) / N + np.sqrt(1 - 1 / N) * np.einsum("i,iab->ab", h, B)
  np.testing.assert_allclose(rho, np.outer(psi, psi.conj()), atol=1e-14)


def test_affine_readout_gives_the_born_logits():
  rng = np.random.default_rng(1)
  N, beta = 3, 1.7
  B = bl.hermitian_basis(N)
  psi = _random_state(rng, N)
  W, b = adjoint.affine_readout(N, beta, B)
  logits, _ = bl.born_logit_targets(psi[None], beta)
  np.testing.assert_allclose(W @ adjoint.state_coordinates(psi[None], B)[0] + b, logits[0],
                             atol=1e-14)


def test_rotation_to_and_inverse_cayley():
  rng = np.random.default_rng(2)
  u = rng.normal(size=6)
  u /= np.linalg.norm(u)
  R = construction.rotation_to(u)
  np.testing.assert_allclose(R[:, 0], u, atol=1e-15)
  np.testing.assert_allclose(R.T @ R, np.eye(6), atol=1e-14)
  assert np.linalg.det(R) == pytest.approx(1.0)
  np.testing.assert_array_equal(construction.rotation_to(np.eye(3)[0]), np.eye(3))
  A = construction.inverse_cayley_real(R, dt=0.5)
  np.testing.assert_array_equal(A, -A.T)
  I = np.eye(6)
  np.testing.assert_allclose(np.linalg.solve(I - 0.25 * A, I + 0.25 * A), R, atol=1e-13)
  with pytest.raises(ValueError, match="rotation by pi"):
    construction.rotation_to(-np.eye(3)[0])
  with pytest.raises(ValueError, match="unit vector"):
    construction.rotation_to(np.array([1.0, 1.0]))
  with pytest.raises(ValueError, match="eigenvalue -1"):
    construction.inverse_cayley_real(np.diag([1.0, -1.0, -1.0]))
  # A matrix that is not orthogonal used to give a generator silently (zero for diag(2, 1)).
  with pytest.raises(ValueError, match=r"Q_DD must be orthogonal \(max \|Q\^T Q - I\| = 3"):
    construction.inverse_cayley_real(np.diag([2.0, 1.0]))
  with pytest.raises(ValueError, match="Q_DD must be a square matrix"):
    construction.inverse_cayley_real(np.ones((2, 3)))
  # A misspelt context kind used to give the generic draw; a bad beta was accepted.
  with pytest.raises(ValueError, match=r"contexts must be one of \['phase', 'generic'\]"):
    bl.cue_hamiltonians(3, 2, "phases", 0)
  with pytest.raises(ValueError, match="beta must be a finite number > 0, got -1"):
    bl.born_logit_targets(np.ones((2, 3), complex) / np.sqrt(3), beta=-1)
  with pytest.raises(ValueError, match=r"psi_CN must have 2 dimensions"):
    bl.born_logit_targets(np.ones(3, complex), beta=1.0)


# --- explicit models --------------------------------------------------------------------

@pytest.mark.parametrize("contexts,N", [("phase", 3), ("phase", 4), ("generic", 3),
                                        ("generic", 4)])
@pytest.mark.parametrize("build", [adjoint.hardcoded_born_logit, adjoint.hardcoded_adjoint])
def test_explicit_models_are_exact(contexts, N, build, x64):
  """Complex N (Born-logit head) and real D* (adjoint, affine-softmax): KL at machine precision."""
  task = bl.make_born_logit_task(N, contexts=contexts, beta=5.0)
  params, cfg = build(task, dt=0.7)
  assert cfg.dim == (N if build is adjoint.hardcoded_born_logit else task.exact_real_dim)
  logq = np.asarray(models.log_probs(params, task.tokens_CT, cfg))
  np.testing.assert_allclose(logq, np.log(task.probs_CK), atol=1e-12)
  assert abs(bounds.expected_kl(logq, task.probs_CK, task.weights_C)) < 1e-14
  if cfg.kind == "real":
    Q = np.asarray(models.transitions(params, cfg))
    np.testing.assert_allclose(np.einsum("vji,vjk->vik", Q, Q),
                               np.broadcast_to(np.eye(cfg.dim), Q.shape), atol=1e-12)


def test_real_models_below_the_exact_dimension_never_beat_the_bound(x64):
  """Any real model of dim D* - 1 (here: trained briefly) is above the Eckart-Young bound."""
  task = bl.make_born_logit_task(3, num_cues=4, length=3)
  D = task.exact_real_dim - 1
  cfg = models.ModelConfig(kind="real", dim=D, num_tokens=task.num_tokens, num_outcomes=task.K)
  result = train.train(task, cfg, (0, 1), train.TrainConfig(steps=300, lr=0.05, log_every=300),
                       dtype=jnp.float64)
  bound = bounds.eckart_young_bound(task.probs_CK, D)
  assert bound > 1e-2
  for logq in result.log_probs:
    assert bounds.rms_centred_log_error(logq, task.probs_CK) >= bound - 1e-12


# --- the Born-logit model kind ----------------------------------------------------------

def test_born_logit_model_kind(x64):
  task = bl.make_born_logit_task(3, contexts="generic", num_cues=3, length=2)
  cfg = models.ModelConfig(kind="born_logit", dim=3, num_tokens=task.num_tokens,
                           num_outcomes=task.K)
  params = models.init_params(jax.random.key(0), cfg, jnp.float64)
  assert {k: v.shape for k, v in params.items()} == {
      "X": (4, 3, 3), "Y": (4, 3, 3), "W_re": (12, 3), "W_im": (12, 3), "b": (12,)}
  U = np.asarray(models.transitions(params, cfg))
  np.testing.assert_allclose(np.einsum("vji,vjk->vik", U.conj(), U),
                             np.broadcast_to(np.eye(3), U.shape), atol=1e-13)
  logq = np.asarray(models.log_probs(params, task.tokens_CT, cfg))
  np.testing.assert_allclose(np.exp(logq).sum(1), 1.0, atol=1e-13)
  psi = np.asarray(models.final_states(U, task.tokens_CT))
  W = np.asarray(params["W_re"]) + 1j * np.asarray(params["W_im"])
  z = np.abs(psi @ W.T) ** 2 + np.asarray(params["b"])
  np.testing.assert_allclose(logq, z - np.log(np.exp(z).sum(1, keepdims=True)), atol=1e-13)
  with pytest.raises(ValueError, match="keys"):
    models.log_probs({k: v for k, v in params.items() if k != "b"}, task.tokens_CT, cfg)
  rank2 = models.ModelConfig(kind="born_logit", dim=3, num_tokens=4, num_outcomes=12,
                             readout_rank=2)
  with pytest.raises(ValueError, match=r"W_re.*\(24, 3\)"):
    models.log_probs(params, task.tokens_CT, rank2)


def test_complex_born_logit_training_lowers_kl():
  task = bl.make_born_logit_task(3, num_cues=4, length=3)
  cfg = models.ModelConfig(kind="born_logit", dim=3, num_tokens=task.num_tokens,
                           num_outcomes=task.K)
  result = train.train(task, cfg, (0,), train.TrainConfig(steps=400, lr=0.02, log_every=400))
  assert result.kl[0] < 0.2 * result.kl_history[0, 0]


def test_rank_r_born_logit_form(x64):
  """readout_rank r: logits_k = psi^dagger E_k psi + b_k, E_k = sum_{i<r} w_{k,i} w_{k,i}^dagger."""
  task = bl.make_born_logit_task(3, num_cues=2, length=2)
  cfg = models.ModelConfig(kind="born_logit", dim=3, num_tokens=task.num_tokens,
                           num_outcomes=task.K, readout_rank=3)
  params = models.init_params(jax.random.key(1), cfg, jnp.float64)
  params["b"] = jnp.arange(task.K, dtype=jnp.float64) / task.K
  assert params["W_re"].shape == (36, 3)
  W = (np.asarray(params["W_re"]) + 1j * np.asarray(params["W_im"])).reshape(12, 3, 3)
  E = np.einsum("kia,kib->kab", W.conj(), W)  # rows are bras: E_k = sum_i w_i^dagger-row outer
  psi = np.asarray(models.final_states(models.transitions(params, cfg), task.tokens_CT))
  z = np.real(np.einsum("ca,kab,cb->ck", psi.conj(), E, psi)) + np.asarray(params["b"])
  logq = np.asarray(models.log_probs(params, task.tokens_CT, cfg))
  np.testing.assert_allclose(logq, z - np.log(np.exp(z).sum(1, keepdims=True)), atol=1e-13)
  assert np.all(np.linalg.eigvalsh(E) > -1e-12) and np.linalg.matrix_rank(E[0]) == 3


@pytest.mark.parametrize("kind,frozen", [("complex_fixed_head", ("W_re", "W_im", "b")),
                                         ("complex_fixed_dynamics", ("X", "Y"))])
def test_diagnostic_rows_start_from_and_keep_the_explicit_half(kind, frozen, x64):
  task = bl.make_born_logit_task(3, contexts="generic", num_cues=3, length=3)
  cfg = models.ModelConfig(kind="born_logit", dim=3, num_tokens=task.num_tokens,
                           num_outcomes=task.K, readout_rank=1)
  init, names = born_logit_rows.row_init(kind, task, cfg, (0, 1), jnp.float64)
  assert names == frozen
  explicit, _ = adjoint.hardcoded_born_logit(task)
  result = train.train(task, cfg, (0, 1), train.TrainConfig(steps=20, log_every=20,
                                                            frozen=names),
                       dtype=jnp.float64, init=init)
  for k in explicit:
    same = np.allclose(np.asarray(result.params[k]), np.asarray(explicit[k])[None], atol=0)
    assert same == (k in frozen), k
  assert born_logit_rows.row_init("real", task, cfg, (0,), jnp.float64) == (None, ())
