"""Inputs at the edges of the wave-function core: nearly Hermitian H, overflow, 16-bit
floats, undefined readouts, empty spaces, and the stacked cells' lift at init.

Each case gave a silent wrong result or an error from deep inside JAX before.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax import wavefunction as wf
from qsf_jax.models import build_model, get_config

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small programs: compile time dominates


def _nearly_hermitian(N=8, rel=4e-5, seed=0):
  """A complex64 H whose anti-Hermitian part is rel * max|H|: inside check_hermitian's
  sqrt(eps) tolerance (3.4e-4 in float32), far above rounding."""
  rng = np.random.default_rng(seed)
  X = rng.standard_normal((N, N))
  H = (X + X.T) / 2
  P = rng.standard_normal((N, N))
  return jnp.asarray(H + 1j * rel * np.abs(H).max() * (P + P.T) / 2, jnp.complex64)


def test_a_nearly_hermitian_h_still_gives_a_unitary_step():
  H = _nearly_hermitian()
  assert float(jnp.abs(H - wf.dagger(H)).max()) > 1e-5 * float(jnp.abs(H).max())
  U = wf.cayley_unitary(H, 1.0)
  # unprojected, this H gives |U^dagger U - I| = 1.4e-4
  assert float(jnp.abs(wf.dagger(U) @ U - jnp.eye(8)).max()) < 1e-6
  psi = jnp.ones(8, jnp.complex64) / np.sqrt(8)
  psi1 = wf.cayley_step(H, psi, 1.0)
  J = wf.probability_currents(H, psi, psi1, 1.0)
  # antisymmetric to rounding (unprojected: |J + J^T| was 1e-4 of |J|)
  assert float(jnp.abs(J + J.T).max()) <= 1e-6 * float(jnp.abs(J).max())
  # an exactly Hermitian H is unchanged by the projection
  Hh = wf.hermitian_from_real(jnp.asarray(np.real(H)), jnp.asarray(np.imag(H)))
  np.testing.assert_array_equal(np.asarray(wf.cayley_unitary(Hh, 0.3)),
                                np.asarray(wf.cayley_unitary(wf.dagger(Hh), 0.3)))


def test_an_overflowing_step_is_refused():
  H = jnp.asarray(np.diag([1.0, 2.0]), jnp.complex64)
  psi = jnp.ones(2, jnp.complex64)
  with pytest.raises(ValueError, match="dt=1e\\+39 overflows float32"):
    wf.cayley_step(H, psi, 1e39)
  with pytest.raises(ValueError, match="dt \\* H / 2 overflows complex64 .*max \\|H\\| = 2e\\+30"):
    wf.cayley_step(H * 1e30, psi, 1e10)
  with pytest.raises(ValueError, match="overflows"):
    wf.cayley_unitary(H, 1e40)
  # float64 holds the same step
  with jax.enable_x64(True):
    U = wf.cayley_unitary(jnp.asarray(np.diag([1.0, 2.0])), 1e39)
    assert bool(jnp.all(jnp.isfinite(U)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_inputs_compute_in_float32(dtype):
  X = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3)), dtype)
  assert wf.hermitian_from_real(X, X).dtype == jnp.complex64
  assert wf.random_hermitian(jax.random.key(0), 3, dtype=dtype).dtype == jnp.complex64
  Q = wf.orthogonal_cayley(X - X.T)
  assert Q.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(Q.T @ Q), np.eye(3), atol=1e-6)
  assert wf.orthogonal_step(X - X.T, jnp.ones(3, dtype)).dtype == jnp.float32


def test_readouts_refuse_what_they_cannot_score():
  psi = jnp.ones(2, jnp.complex64) / np.sqrt(2)
  with pytest.raises(ValueError, match="Ms must be Hermitian"):
    wf.povm_probabilities(jnp.triu(jnp.ones((2, 2, 2))), psi)
  with pytest.raises(ValueError, match="Ms has non-finite entries"):
    wf.readout_rates(jnp.full((2, 2, 2), jnp.nan), jnp.eye(2), psi)
  with pytest.raises(ValueError, match="Ms must be Hermitian"):
    wf.readout_rates(jnp.triu(jnp.ones((2, 2, 2))), jnp.eye(2), psi)
  with pytest.raises(ValueError, match="beta must be finite"):
    wf.born_logits(jnp.eye(2), psi, beta=jnp.nan)
  with pytest.raises(ValueError, match="bias must be finite"):
    wf.born_logits(jnp.eye(2), psi, bias=jnp.array([0.0, jnp.inf]))
  with pytest.raises(ValueError, match="W psi = 0"):  # psi in the kernel of W
    wf.normalized_born(jnp.array([[1.0, 1.0], [2.0, 2.0]]), jnp.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="W psi = 0"):
    wf.normalized_born(jnp.eye(2), jnp.zeros((3, 2)).at[0].set(1.0))
  p = jax.jit(wf.normalized_born)(jnp.eye(2), psi)  # traced: no check, no error
  np.testing.assert_allclose(np.asarray(p), [0.5, 0.5], rtol=1e-6)


def test_empty_space_and_bad_batch_shapes():
  assert wf.cayley_step(jnp.zeros((0, 0)), jnp.zeros((3, 0))).shape == (3, 0)
  key = jax.random.key(0)
  for bad, match in (((-1,), ">= 0"), (3, "tuple of ints"), ((2.0,), "must be an int")):
    with pytest.raises(ValueError, match=match):
      wf.random_hermitian(key, 3, batch_shape=bad)
  assert wf.random_hermitian(key, 3, batch_shape=(2,)).shape == (2, 3, 3)


def test_stacked_cells_lift_to_unit_variance_weights():
  """Cell l + 1's mixture weights e = [Re psi, Im psi] A + c start with unit variance, as
  the embedding gives cell 0 (the lift's std was 1/sqrt(2): variance 0.5)."""
  cfg = get_config("wave", "tiny", wave_layers=2)
  model = build_model(cfg)
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.vocab_size)
  variances = []
  for seed in range(4):
    params = jax.jit(model.init)(jax.random.key(seed), tokens)["params"]
    states = jax.jit(lambda p, x: model.apply({"params": p}, x, return_states=True))(
        params, tokens)
    feats = jnp.concatenate([jnp.real(states[0]), jnp.imag(states[0])], axis=-1)
    e = feats @ params["lift_1"]["kernel"] + params["lift_1"]["bias"][None, None]
    variances.append(float(jnp.var(e)))
  assert 0.8 < np.mean(variances) < 1.25, variances
