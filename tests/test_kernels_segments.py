"""Two-level split of the sequence (kernels/segments.py) under the Pallas kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.kernels import pallas_linear_attention, reference_linear_attention, segments
from qsf_jax.kernels.testing import GRAD_NAMES, TOL, gradient_case, random_inputs, rel_rms_error

# Interpret mode is a test device, not what users run: its programs compile several
# times faster without XLA's heavy passes (the `fast_compiles` fixture).
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _prefix_states(k, v, g, S0, ends):
  """States after the first t tokens, t in ``ends``, by the float64 token recurrence
  S_t = exp(g_t) S_{t-1} + k_t v_t^T (numpy, no compilation)."""
  k, v, g, S = (np.asarray(x, np.float64) for x in (k, v, g, S0))
  out = {0: S.copy()}
  for t in range(max(ends)):
    S = np.exp(g[:, t])[..., None, None] * S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
    out[t + 1] = S.copy()
  return [out[t] for t in ends]


@pytest.mark.parametrize("gate", ["strong", "weak", "head"])
def test_entering_states_are_prefix_states(gate):
  # S_in[:, s] is the state after the first s L tokens; S_T the state after all T. Under
  # the weak and per-head gates the carried term exp(gamma_s) S_s is of order one, so a
  # wrong segment decay shows; under the strong gate it is below e^-20.
  _, k, v, g, S0 = random_inputs(2, 2, 96, 3, 8, 5, gate=gate)
  S_in, S_T = segments.entering_states(k, v, g, S0, 4)
  assert S_in.shape == (2, 4, 3, 8, 5) and S_in.dtype == jnp.float32
  want = _prefix_states(k, v, g, S0, [0, 24, 48, 72, 96])
  for s in range(5):
    got = S_in[:, s] if s < 4 else S_T
    np.testing.assert_allclose(np.asarray(got), want[s], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("num_segments, gate, dtype", [
    (2, "weak", "float32"),   # the state carried between segments is of order one
    (4, "extreme", "float32"),
    (4, "strong", "bfloat16"),
])
def test_segmented_outputs_and_grads_match_float64(num_segments, gate, dtype):
  # T = 120 pads to 128 = 4 segments x 2 chunks of 16 (2 x 4 with two segments); every
  # output and gradient (through the kernels' custom_vjp and the XLA state passing)
  # against float64.
  args, do, dS, ref = gradient_case(1, 120, 2, 16, 32, dtype, gate, 11)

  def run(q, k, v, g, S0):
    return pallas_linear_attention(q, k, v, g, S0, chunk_size=16, interpret=True,
                                   return_final_state=True, num_segments=num_segments)

  def loss(*a):
    o, S_T = run(*a)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S_T * dS)

  tol = TOL[dtype]
  o, S_T = run(*args)
  with jax.enable_x64(True):
    o64, S64 = reference_linear_attention(*(jnp.asarray(np.asarray(x, np.float64))
                                            for x in args))
  assert rel_rms_error(o, o64) <= tol["o"] and rel_rms_error(S_T, S64) <= tol["o"]
  grads = jax.grad(loss, argnums=range(5))(*args)
  for name, x, gr, r in zip(GRAD_NAMES, args, grads, ref):
    assert gr.dtype == x.dtype and np.all(np.isfinite(np.asarray(gr, np.float64))), name
    bound = tol["dg"] if name == "log_decay" else tol["grad"]
    assert rel_rms_error(gr, r) <= bound, (name, rel_rms_error(gr, r))


def test_segments_without_initial_state_or_decay():
  q, k, v, _, _ = random_inputs(5, 1, 128, 1, 16, 16, gate="none", initial_state=False)
  o1, S1 = pallas_linear_attention(q, k, v, chunk_size=16, interpret=True,
                                   return_final_state=True, num_segments=1)
  o4, S4 = pallas_linear_attention(q, k, v, chunk_size=16, interpret=True,
                                   return_final_state=True, num_segments=4)
  assert rel_rms_error(o4, o1) < 1e-6 and rel_rms_error(S4, S1) < 1e-6


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4", None, np.bool_(True), np.int64(0)])
def test_bad_num_segments(bad):
  q, k, v, g, _ = random_inputs(0, 1, 32, 1, 16, 16)
  with pytest.raises(ValueError, match="num_segments"):
    pallas_linear_attention(q, k, v, g, interpret=True, num_segments=bad)
