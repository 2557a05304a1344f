"""T_N task generator, bounds, models and explicit constructions (wave-function spec §2)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.separation import bounds, construction, elimination, models
from qsf_jax.tasks import separation as ts
from qsf_jax.wavefunction.born import povm_probabilities
from qsf_jax.wavefunction.cayley import cayley_unitary, orthogonal_cayley
from qsf_jax.wavefunction.hermitian import hermitian_from_real, isometry_from_real, skew_from_real

pytestmark = pytest.mark.usefixtures("fast_compiles")  # tiny models: compile time dominates


@pytest.fixture(scope="module")
def task3():
  return ts.make_task(3)


# --- task generator -------------------------------------------------------------------

@pytest.mark.parametrize("N", [2, 3, 4, 5])
def test_outcomes_and_povm_completeness(N):
  table = ts.outcome_table(N)
  K = ts.num_outcomes(N)
  assert table.shape == (K, 3) and K == 2 * N * (N - 1)
  assert len({tuple(r) for r in table}) == K
  assert np.all(table[:, 0] < table[:, 1]) and set(table[:, 2]) == {0, 1, 2, 3}
  m_re, m_im = ts.povm_vectors(N)
  m = m_re + 1j * m_im
  np.testing.assert_allclose(m.T @ m.conj(), np.eye(N), atol=1e-15)  # sum_k m_k m_k^dagger


def test_targets_sum_to_one_and_match_closed_form(task3):
  P = task3.probs_CK
  assert P.shape == (8**3, 12)
  np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-14)
  # The Born rule applied to psi_c and the POVM gives the same numbers.
  np.testing.assert_allclose(ts.born_target_probabilities(task3.Phi_CN, task3.eta), P, atol=1e-15)
  # One entry written out by hand: context (w, a, b, c), output (j, l, m) = (0, 2, 1).
  a, b, c = 5, 0, 7
  row = a * 64 + b * 8 + c
  np.testing.assert_array_equal(task3.tokens_CT[row], [0, a + 1, b + 1, c + 1])
  Phi = task3.theta_AN[a] + task3.theta_AN[b] + task3.theta_AN[c]
  k = [tuple(r) for r in task3.outcomes].index((0, 2, 1))
  want = 0.9 / 12 * (1 + np.cos(Phi[0] - Phi[2] - np.pi / 2)) + 0.1 / 12
  assert abs(P[row, k] - want) < 1e-15


def test_eta_zero_gives_exact_cancellation():
  P = ts.target_probabilities(np.array([[0.3, 0.3 + np.pi, 1.0]]), eta=0.0)
  table = ts.outcome_table(3)
  k = int(np.flatnonzero((table[:, 0] == 0) & (table[:, 1] == 1) & (table[:, 2] == 0))[0])
  assert P[0, k] < 1e-16  # anti-phase hypotheses cancel
  np.testing.assert_allclose(P.sum(), 1.0, atol=1e-15)


def test_target_state_is_unit_norm(task3):
  re, im = ts.target_state(task3.Phi_CN)
  np.testing.assert_allclose(re**2 + im**2, 1.0 / 3, atol=1e-15)


def test_task_bad_inputs():
  with pytest.raises(ValueError, match="N must be >= 2"):
    ts.make_task(1)
  with pytest.raises(ValueError, match="N must be an integer"):
    ts.make_task(3.0)
  with pytest.raises(ValueError, match="eta"):
    ts.make_task(3, eta=1.0)
  for bad in ("0.1", None, True):  # a string or None failed inside numpy
    with pytest.raises(ValueError, match="eta must be a real number in"):
      ts.make_task(3, eta=bad)
  with pytest.raises(ValueError, match="num_cues must be >= 1"):
    ts.all_contexts(0, 2)
  with pytest.raises(ValueError, match=r"T_300 has K = 179,400 outputs and C = 512 contexts: "
                     r"its C x K target table would hold 91,852,800 entries"):
    ts.make_task(300)  # else a 735 MB float64 table (N = 1000: 8 GB)
  with pytest.raises(ValueError, match="Phi_CN must be real"):
    ts.target_probabilities(np.ones((2, 3)) * 1j)
  with pytest.raises(ValueError, match="2 dimensions"):
    ts.target_probabilities(np.ones(3))
  with pytest.raises(ValueError, match="cues_CL"):
    ts.context_phases(np.zeros((4, 3)), np.array([[0, 4]]))


# --- rank certificate and Eckart-Young bound -------------------------------------------

@pytest.mark.parametrize("N", [3, 4, 5])
def test_rank_certificate(N):
  task = ts.make_task(N)
  assert bounds.log_rank(task.probs_CK) == task.K - 1
  s = bounds.centred_singular_values(task.probs_CK)
  assert s[task.K - 2] > 1e-4 * s[0] and s[task.K - 1] < 1e-12 * s[0]  # a clean gap


def test_phase_contexts_count_cue_multisets():
  # Phi(c) ignores the cue order: only C(A + L - 1, L) of the A^L rows differ,
  # which caps the log-rank below K - 1 once K exceeds that number.
  assert ts.distinct_contexts(8, 3) == 120 and ts.distinct_contexts(8, 3, commuting=False) == 512
  for A, L in [(8, 3), (3, 4), (4, 2)]:
    cues_CL, _ = ts.all_contexts(A, L)
    assert len({tuple(sorted(c)) for c in cues_CL.tolist()}) == ts.distinct_contexts(A, L)
  task = ts.make_task(6, num_cues=4, length=4)  # K = 60 > 35 distinct contexts
  assert np.unique(np.round(task.Phi_CN, 12), axis=0).shape[0] == 35
  assert bounds.log_rank(task.probs_CK) == 34
  with pytest.raises(ValueError, match="num_cues must be >= 1"):
    ts.distinct_contexts(0, 3)


def test_eckart_young_bound_is_attained_by_truncated_svd(task3):
  logP = np.log(task3.probs_CK)
  E = bounds.double_centre(logP)
  U, s, Vt = np.linalg.svd(E, full_matrices=False)
  b = bounds.eckart_young_bound(task3.probs_CK, np.arange(13))
  assert np.all(np.diff(b) <= 1e-15) and b[11] < 1e-12 and b[12] == 0.0
  for D in (1, 3, 6):
    approx = (U[:, :D] * s[:D]) @ Vt[:D]  # best rank-D matrix, itself double-centred
    assert abs(bounds.rms_centred_log_error(logP + approx - E, task3.probs_CK) - b[D]) < 1e-12


def test_double_centre_removes_row_and_column_terms(task3):
  logP = np.log(task3.probs_CK)
  shifted = logP + np.arange(task3.C)[:, None] * 0.1 + np.arange(task3.K)[None, :]
  np.testing.assert_allclose(bounds.double_centre(shifted), bounds.double_centre(logP), atol=1e-12)


def test_expected_kl_is_kl_of_target_from_model_with_context_weights():
  """sum_c w_c KL(p*(.|c) || q(.|c)), against scipy's rel_entr, with unequal weights
  (every task builder uses uniform weights, which cannot tell w_c from 1/C)."""
  from scipy.special import log_softmax, rel_entr  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  P = np.exp(log_softmax(rng.normal(size=(5, 4)), axis=1))
  logQ = log_softmax(rng.normal(size=(5, 4)), axis=1)
  w = np.array([0.5, 0.05, 0.25, 0.15, 0.05])
  want = float(w @ rel_entr(P, np.exp(logQ)).sum(axis=1))
  assert bounds.expected_kl(logQ, P, w) == pytest.approx(want, rel=1e-12)
  assert bounds.expected_kl(np.log(P), P, w) == 0.0


def test_log_rank_tolerance_is_relative_to_the_largest_singular_value():
  """sigma_2 / sigma_1 ~ 2e-10 <= rtol = 1e-9 is rank one, although sigma_2 ~ 7e-9 > 1e-9."""
  from scipy.special import log_softmax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a, b, c, d = (rng.normal(size=n) for n in (6, 5, 6, 5))
  P = np.exp(log_softmax(20 * np.outer(a, b) + 3e-9 * np.outer(c, d), axis=1))
  s = bounds.centred_singular_values(P)
  assert 1e-9 < s[1] and s[1] / s[0] < 1e-9 / 4 and s[2] < 1e-12 * s[0]
  assert bounds.log_rank(P) == 1
  assert bounds.log_rank(P, rtol=1e-12) == 2


def test_bounds_bad_inputs(task3):
  with pytest.raises(ValueError, match="same shape"):
    bounds.expected_kl(np.zeros((3, 4)), task3.probs_CK, task3.weights_C)
  logq = np.log(task3.probs_CK)
  w = task3.weights_C
  for bad in (-w, 2 * w, np.where(np.arange(w.size) == 0, np.nan, w)):
    with pytest.raises(ValueError, match="weights_C must be non-negative and sum to 1"):
      bounds.expected_kl(logq, task3.probs_CK, bad)
  with pytest.raises(ValueError, match="each row of P_CK must sum to 1"):
    bounds.expected_kl(logq, 2 * task3.probs_CK, w)
  with pytest.raises(ValueError, match="must be real"):
    bounds.rms_centred_log_error(np.zeros((512, 12)) * 1j, task3.probs_CK)
  # row and column shifts of log P are no error: both are centred away
  rng = np.random.default_rng(0)
  P = rng.dirichlet(np.ones(4), size=5)
  shifted = np.log(P) + rng.normal(size=(5, 1)) + rng.normal(size=(1, 4))
  assert bounds.rms_centred_log_error(shifted, P) < 1e-12
  with pytest.raises(ValueError, match="strictly positive"):
    bounds.log_rank(np.zeros((4, 4)))
  with pytest.raises(ValueError, match="non-negative integers"):
    bounds.eckart_young_bound(task3.probs_CK, [-1])


# --- Cayley maps without LAPACK ------------------------------------------------------------

def test_elimination_cayley_matches_core(x64):
  key = jax.random.key(0)
  S = jax.random.normal(key, (5, 7, 7), jnp.float64)
  A = skew_from_real(S)
  Q = elimination.orthogonal_cayley_elim(A, dt=0.7)
  np.testing.assert_allclose(Q, orthogonal_cayley(A, dt=0.7), atol=1e-12)
  np.testing.assert_allclose(jnp.swapaxes(Q, -1, -2) @ Q, np.broadcast_to(np.eye(7), Q.shape),
                             atol=1e-12)
  X, Y = jax.random.normal(jax.random.fold_in(key, 1), (2, 5, 4, 4), jnp.float64)
  H = hermitian_from_real(X, Y)
  np.testing.assert_allclose(elimination.cayley_unitary_elim(H), cayley_unitary(H), atol=1e-12)


def test_elimination_gradient_matches_core(x64):
  S = jax.random.normal(jax.random.key(1), (3, 6, 6), jnp.float64)
  W = jax.random.normal(jax.random.key(2), (3, 6, 6), jnp.float64)
  loss = lambda f: (lambda S: jnp.sum(W * jnp.sin(f(skew_from_real(S)))))
  g_elim = jax.grad(loss(elimination.orthogonal_cayley_elim))(S)
  g_core = jax.grad(loss(orthogonal_cayley))(S)
  np.testing.assert_allclose(g_elim, g_core, atol=1e-11)


def test_elimination_bad_inputs():
  with pytest.raises(ValueError, match="must be real"):
    elimination.orthogonal_cayley_elim(jnp.zeros((3, 3), jnp.complex64))
  with pytest.raises(ValueError, match="square"):
    elimination.cayley_unitary_elim(jnp.zeros((3, 4), jnp.complex64))


# --- models ---------------------------------------------------------------------------

def _cfg(task, kind, dim, **kw):
  return models.ModelConfig(kind=kind, dim=dim, num_tokens=task.num_tokens,
                            num_outcomes=task.K, eta=task.eta, **kw)


@pytest.mark.parametrize("kind,dim", [("complex", 3), ("real", 5), ("realified", 6)])
def test_models_output_distributions(task3, kind, dim, x64):
  cfg = _cfg(task3, kind, dim)
  params = models.init_params(jax.random.key(3), cfg, jnp.float64)
  assert all(not jnp.iscomplexobj(v) for v in params.values())  # real parameters only
  logq = models.log_probs(params, task3.tokens_CT, cfg)
  assert logq.shape == (task3.C, task3.K)
  np.testing.assert_allclose(jnp.exp(logq).sum(axis=1), 1.0, atol=1e-12)
  T = models.transitions(params, cfg)
  np.testing.assert_allclose(models.product_states(T, task3.num_cues, task3.length),
                             models.final_states(T, task3.tokens_CT), atol=1e-12)
  for shift in (task3.num_tokens, -1):  # were clamped by the gather, silently
    with pytest.raises(ValueError, match="tokens_CT has ids in .*outside the vocabulary"):
      models.log_probs(params, task3.tokens_CT + shift, cfg)
  core = models.transitions(params, _cfg(task3, kind, dim, solver="core"))
  np.testing.assert_allclose(T, core, atol=1e-12)


def test_model_bad_inputs(task3):
  with pytest.raises(ValueError, match="kind"):
    _cfg(task3, "quantum", 3)
  with pytest.raises(ValueError, match="even"):
    _cfg(task3, "realified", 5)
  with pytest.raises(ValueError, match="dim must be a positive integer"):
    _cfg(task3, "real", 0)
  cfg = _cfg(task3, "real", 4)
  params = models.init_params(jax.random.key(0), cfg)
  bad = dict(params, W=params["W"][:, :3])
  with pytest.raises(ValueError, match=r"params\['W'\] must have shape \(12, 4\)"):
    models.log_probs(bad, task3.tokens_CT, cfg)
  with pytest.raises(ValueError, match="must be real"):
    models.log_probs(dict(params, b=params["b"] * 1j), task3.tokens_CT, cfg)
  with pytest.raises(ValueError, match="tokens_CT must be an int matrix"):
    models.final_states(models.transitions(params, cfg), np.zeros((4, 2)))


@pytest.mark.parametrize("rank", [2, 3])
def test_rank_r_readout_is_the_general_born_rule(task3, rank, x64):
  """p_k = (1-eta) Tr(E_k rho) + eta/K with E_k = sum_i M_{k,i}^dagger M_{k,i} (spec §1.4)."""
  cfg = _cfg(task3, "complex", 3, readout_rank=rank)
  params = models.init_params(jax.random.key(5), cfg, jnp.float64)
  assert params["W_re"].shape == (task3.K * rank, 3)
  T = models.transitions(params, cfg)
  psi = models.final_states(T, task3.tokens_CT)
  logq = models.readout_log_probs(params, psi, cfg)
  M = np.asarray(isometry_from_real(params["W_re"], params["W_im"])).reshape(task3.K, rank, 3)
  E = np.einsum("kia,kib->kab", M.conj(), M)  # (E_k)_ab = sum_i conj(M_kia) M_kib
  np.testing.assert_allclose(E.sum(axis=0), np.eye(3), atol=1e-12)  # a POVM
  assert np.linalg.matrix_rank(E[0]) == min(rank, 3)
  E_eta = (1 - task3.eta) * E + task3.eta / task3.K * np.eye(3)
  np.testing.assert_allclose(np.exp(logq), povm_probabilities(E_eta, psi), atol=1e-12)
  np.testing.assert_allclose(np.exp(logq).sum(axis=1), 1.0, atol=1e-12)


def test_rank_two_readout_contains_the_rank_one_povm(x64):
  """Rank-one rows padded with zero rows give the exact model of spec §2.4 again."""
  task = ts.make_task(3)
  params, cfg1 = construction.hardcoded_complex(task)
  cfg2 = models.ModelConfig(**{**cfg1.__dict__, "readout_rank": 2})
  pad = lambda W: jnp.stack([W, jnp.zeros_like(W)], axis=1).reshape(2 * task.K, task.N)
  params2 = dict(params, W_re=pad(params["W_re"]), W_im=pad(params["W_im"]))
  logq = np.asarray(models.log_probs(params2, task.tokens_CT, cfg2))
  np.testing.assert_allclose(logq, np.asarray(models.log_probs(params, task.tokens_CT, cfg1)),
                             atol=1e-12)
  assert abs(bounds.expected_kl(logq, task.probs_CK, task.weights_C)) < 1e-10


def test_readout_rank_bad_inputs(task3):
  with pytest.raises(ValueError, match="readout_rank must be a positive integer"):
    _cfg(task3, "complex", 3, readout_rank=0)
  with pytest.raises(ValueError, match="readout_rank applies to the complex Born readouts only"):
    _cfg(task3, "real", 4, readout_rank=2)
  with pytest.raises(ValueError, match="num_outcomes \\* readout_rank >= dim"):
    models.ModelConfig(kind="complex", dim=5, num_tokens=3, num_outcomes=2, readout_rank=2)
  models.ModelConfig(kind="complex", dim=5, num_tokens=3, num_outcomes=2, readout_rank=3)
  cfg = _cfg(task3, "complex", 3, readout_rank=2)
  params = models.init_params(jax.random.key(0), _cfg(task3, "complex", 3))  # rank-one shapes
  with pytest.raises(ValueError, match=r"params\['W_re'\] must have shape \(24, 3\)"):
    models.log_probs(params, task3.tokens_CT, cfg)


# --- explicit constructions -------------------------------------------------------------

@pytest.mark.parametrize("N", [3, 4, 5])
@pytest.mark.parametrize("solver", ["elimination", "core"])
def test_hardcoded_complex_is_exact(N, solver, x64):
  task = ts.make_task(N)
  params, cfg = construction.hardcoded_complex(task)
  cfg = models.ModelConfig(**{**cfg.__dict__, "solver": solver})
  logq = np.asarray(models.log_probs(params, task.tokens_CT, cfg))
  kl = bounds.expected_kl(logq, task.probs_CK, task.weights_C)
  assert abs(kl) < 1e-10
  np.testing.assert_allclose(np.exp(logq), task.probs_CK, atol=1e-12)
  # The final states are the target states psi_c (up to one global phase per context).
  psi = np.asarray(models.final_states(models.transitions(params, cfg), task.tokens_CT))
  re, im = ts.target_state(task.Phi_CN)
  overlap = np.abs(np.sum(np.conj(re + 1j * im) * psi, axis=1))
  np.testing.assert_allclose(overlap, 1.0, atol=1e-12)


@pytest.mark.parametrize("N", [3, 4])
def test_realified_control_is_exact(N, x64):
  task = ts.make_task(N)
  params, cfg = construction.hardcoded_realified(task)
  assert cfg.dim == 2 * N
  logq = np.asarray(models.log_probs(params, task.tokens_CT, cfg))
  assert abs(bounds.expected_kl(logq, task.probs_CK, task.weights_C)) < 1e-10
  np.testing.assert_allclose(np.exp(logq), task.probs_CK, atol=1e-12)
  Q = np.asarray(models.transitions(params, cfg))
  np.testing.assert_allclose(np.swapaxes(Q, -1, -2) @ Q, np.broadcast_to(np.eye(2 * N), Q.shape),
                             atol=1e-12)


def test_word_rotation():
  for N in (2, 3, 6):
    R = construction.word_rotation(N)
    np.testing.assert_allclose(R.T @ R, np.eye(N), atol=1e-14)
    np.testing.assert_allclose(R[:, 0], np.full(N, N**-0.5), atol=1e-15)
    assert np.linalg.det(R) > 0 and np.min(np.abs(np.linalg.eigvals(R) + 1)) > 1e-3


def test_real_models_never_beat_the_bound(task3, x64):
  """Any affine-softmax model of dimension D (random parameters here) obeys spec §2.5."""
  for D, seed in itertools.product((1, 3, 9), range(2)):
    cfg = _cfg(task3, "real", D)
    params = models.init_params(jax.random.key(seed), cfg, jnp.float64)
    params = dict(params, b=jax.random.normal(jax.random.key(seed + 7), (task3.K,), jnp.float64))
    logq = np.asarray(models.log_probs(params, task3.tokens_CT, cfg))
    bound = bounds.eckart_young_bound(task3.probs_CK, D)
    assert bounds.rms_centred_log_error(logq, task3.probs_CK) >= bound - 1e-12
