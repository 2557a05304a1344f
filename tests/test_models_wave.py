"""The wave-function LM (wave-function spec §1.2-1.4) and real-parameter checks for all stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturbed
from qsf_jax.models import STAGES, build_model, get_config
from qsf_jax.models.wave import MixtureHamiltonian

pytestmark = pytest.mark.usefixtures("fast_compiles")  # tiny models: compile time dominates

T = 7


def _np(x):
  return np.asarray(x, np.complex128 if jnp.iscomplexobj(x) else np.float64)


def _herm(X, Y):
  return 0.5 * (X + X.swapaxes(-1, -2)) + 0.5j * (Y - Y.swapaxes(-1, -2))


@pytest.fixture(scope="module")
def wave2():
  """A two-cell wave model with the POVM readout (exercises stacking and both heads)."""
  # A non-default step Delta t, so the recurrence check also sees wave_dt reach the cell.
  cfg = get_config("wave", "tiny", wave_layers=2, wave_readout="born", wave_dt=0.7)
  model = build_model(cfg)
  tokens = jax.random.randint(jax.random.key(0), (3, T), 0, cfg.vocab_size)
  variables = jax.jit(model.init)(jax.random.key(1), tokens)
  # Move away from the init (psi0 uniform, small H0) so the check is generic.
  variables = perturbed(variables, 2, 0.2)
  states = jax.jit(lambda v, x: model.apply(v, x, return_states=True))(variables, tokens)
  logits = jax.jit(lambda v, x: model.apply(v, x))(variables, tokens)
  return cfg, variables["params"], tokens, states, logits


def test_states_match_an_independent_cayley_recurrence(wave2):
  """psi_{t+1} = (I + i dt H_t/2)^{-1}(I - i dt H_t/2) psi_t, H_t = H_0 + sum_m e_m(x_t) G_m."""
  cfg, p, tokens, states, _ = wave2
  N = cfg.wave_dim
  e = _np(p["embed"]["embedding"])[np.asarray(tokens)]          # (B, T, M)
  for layer in range(cfg.wave_layers):
    c = p[f"cell_{layer}"]
    if layer:
      prev = _np(states[layer - 1])
      feats = np.concatenate([prev.real, prev.imag], axis=-1)
      e = feats @ _np(p[f"lift_{layer}"]["kernel"]) + _np(p[f"lift_{layer}"]["bias"])
    hp = c["hamiltonian"]
    H0 = _herm(_np(hp["H0_X"]), _np(hp["H0_Y"]))
    G = _herm(_np(hp["G_X"]), _np(hp["G_Y"]))
    psi0 = _np(c["psi0_re"]) + 1j * _np(c["psi0_im"])
    psi = np.broadcast_to(psi0 / np.linalg.norm(psi0), (tokens.shape[0], N))
    I = np.eye(N)
    want = []
    for t in range(T):
      H = H0[None] + np.einsum("bm,mnk->bnk", e[:, t], G)
      A = 0.5j * cfg.wave_dt * H
      psi = np.linalg.solve(I + A, np.einsum("bnk,bk->bn", I - A, psi)[..., None])[..., 0]
      want.append(psi)
    np.testing.assert_allclose(_np(states[layer]), np.stack(want, axis=1), atol=2e-5)


def test_unitary_steps_preserve_the_norm(wave2):
  """||psi_t|| = 1 at every step of every cell (float32: 1e-5; spec §4 checklist)."""
  _, _, _, states, _ = wave2
  for psi in states:
    assert psi.dtype == jnp.complex64
    np.testing.assert_allclose(np.linalg.norm(_np(psi), axis=-1), 1.0, atol=1e-5)


def test_one_cell_never_forgets_a_changed_token():
  """psi_{t+1} = U(x_t) psi_t with U unitary and a function of x_t alone, so two rows that
  differ only at s keep ||psi_t - psi'_t|| for every t > s (docs/RESULTS.md; one cell).
  A second cell reads the first cell's state, so there the distance moves."""
  s = 2
  for layers in (1, 2):
    cfg = get_config("wave", "tiny", wave_layers=layers)
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, T), 0, cfg.vocab_size)
    other = tokens.at[:, s].set((tokens[:, s] + 1) % cfg.vocab_size)
    variables = perturbed(jax.jit(model.init)(jax.random.key(4), tokens), 5, 0.2)
    run = jax.jit(lambda v, x: model.apply(v, x, return_states=True)[-1])
    d_BT = np.linalg.norm(_np(run(variables, tokens)) - _np(run(variables, other)), axis=-1)
    assert np.all(d_BT[:, :s] == 0) and np.all(d_BT[:, s] > 0.05)  # states psi_1..psi_T
    drift = np.abs(d_BT[:, s:] - d_BT[:, s:s + 1]).max()
    if layers == 1:
      assert drift < 1e-5, drift
    else:
      assert drift > 1e-3, drift


def test_born_readout_is_a_normalised_distribution(wave2):
  """POVM readout: sum_k p_k = ||psi||^2 = 1 with no softmax, and p_k >= eta / V (spec §1.4)."""
  cfg, _, _, _, logits = wave2
  p = np.exp(_np(logits))
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  assert p.min() >= cfg.wave_eta / cfg.vocab_size * (1 - 1e-5)


def test_born_logit_head_formula():
  """logits = beta |W psi|^2 + b with W = W_re + i W_im (spec §1.4)."""
  cfg = get_config("wave", "tiny")
  model = build_model(cfg)
  tokens = jax.random.randint(jax.random.key(3), (2, T), 0, cfg.vocab_size)
  variables = jax.jit(model.init)(jax.random.key(4), tokens)
  p = perturbed(variables["params"], 5, 0.1)
  psi = jax.jit(lambda v, x: model.apply(v, x, return_states=True))({"params": p}, tokens)[-1]
  logits = jax.jit(lambda v, x: model.apply(v, x))({"params": p}, tokens)
  r = p["readout"]
  W = _np(r["W_re"]) + 1j * _np(r["W_im"])
  want = float(r["beta"]) * np.abs(np.einsum("vn,btn->btv", W, _np(psi))) ** 2 + _np(r["bias"])
  np.testing.assert_allclose(_np(logits), want, rtol=1e-4, atol=1e-4)


def test_cell_hamiltonians_are_hermitian(wave2):
  cfg, p, _, _, _ = wave2
  e = jax.random.normal(jax.random.key(6), (2, 3, cfg.wave_generators))
  H = MixtureHamiltonian(cfg).apply({"params": p["cell_0"]["hamiltonian"]}, e)
  assert H.shape == (2, 3, cfg.wave_dim, cfg.wave_dim) and jnp.iscomplexobj(H)
  np.testing.assert_allclose(_np(H), np.conj(_np(H)).swapaxes(-1, -2), atol=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_every_parameter_is_real(stage):
  """Real parameters only (conventions §2.5): every trainable leaf is real floating point."""
  cfg = get_config(stage, "tiny", wave_layers=2)
  shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 4), jnp.int32))
  for leaf in jax.tree.leaves(shapes["params"]):
    assert leaf.dtype == jnp.float32, (stage, leaf)


def test_initial_scales_follow_the_docstrings():
  """e = E[x] ~ N(0, 1); H0 entries ~ N(0, 1/N), G entries ~ N(0, 1/(N M)); beta = 1, b = 0."""
  cfg = get_config("wave", "tiny", wave_dim=16, wave_generators=8)
  N, M = cfg.wave_dim, cfg.wave_generators
  p = jax.jit(build_model(cfg).init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
  h = p["cell_0"]["hamiltonian"]
  for x, std in ((p["embed"]["embedding"], 1.0), (h["H0_X"], N ** -0.5), (h["H0_Y"], N ** -0.5),
                 (h["G_X"], (N * M) ** -0.5), (h["G_Y"], (N * M) ** -0.5)):
    assert np.std(_np(x)) == pytest.approx(std, rel=0.15), (x.shape, std)
  assert float(p["readout"]["beta"]) == 1.0 and not np.any(_np(p["readout"]["bias"]))
