"""Inputs at the edges of the chunked impls' numerics: strong resets, float16 range, empty axes.

Each case failed before: a reset g = -1e4 cost the chunked forms 1e-3 relative
error (the chunk-local float32 cumsum), g = -inf gave NaN, float16 chunk states
above 65504 turned outputs into inf, and Pallas crashed on B = 0 or H = 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.kernels import linear_attention
from qsf_jax.kernels.op import decay_floor
from qsf_jax.kernels.testing import TOL, numpy_linear_attention, rel_rms_error

# Every case compiles a new program per impl; XLA's heavy passes only reschedule the
# same arithmetic, so the programs compile faster without them (the `fast_compiles`
# fixture) and compute the values the tolerances below are about.
pytestmark = [pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("fast_compiles")]

CHUNKED = [("xla", {}), ("pallas", {"interpret": True})]


def test_decay_floor_values():
  assert decay_floor(jnp.float32) == pytest.approx(2 * np.log(np.finfo(np.float32).eps))
  assert decay_floor(jnp.bfloat16) == decay_floor(jnp.float32)
  assert decay_floor(jnp.float64) == pytest.approx(2 * np.log(np.finfo(np.float64).eps))


@pytest.mark.parametrize("impl,kw", CHUNKED)
def test_strong_resets_keep_float32_accuracy(impl, kw):
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((1, 80, 2, 16)).astype(np.float32) for _ in range(3))
  g = np.full((1, 80, 2), -0.01, np.float32)
  g[:, 0, 0], g[:, 5, 1], g[:, 70, 0] = -1e4, -1e6, -np.inf   # resets early in a chunk
  want_o, want_S = numpy_linear_attention(q, k, v, g)
  o, S_T = linear_attention(q, k, v, g, impl=impl, chunk_size=64, return_final_state=True,
                            **kw)
  assert rel_rms_error(o, want_o) <= TOL["float32"]["o"]
  assert rel_rms_error(S_T, want_S) <= TOL["float32"]["o"]
  # The gradient of a clamped step is 0, as (to float32 resolution) its true value.
  dg = jax.grad(lambda g: jnp.sum(linear_attention(q, k, v, g, impl=impl, chunk_size=64,
                                                   **kw)))(jnp.asarray(g))
  assert np.all(np.isfinite(dg)) and dg[0, 0, 0] == 0.0 and dg[0, 70, 0] == 0.0


def test_xla_exponents_after_resets_are_segment_sums():
  """Resets at the start of a chunk, then weak decay: an exponent b_i - b_j (two
  cumsums of size 30 * 32) kept an absolute error of eps * 960 and cost 3e-5 relative
  error in o; "xla" sums each exponent over its own steps and keeps float32 round-off
  (1.2e-7 measured; "pallas" still forms the difference, see op.py)."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((1, 64, 2, 16)).astype(np.float32) for _ in range(3))
  g = np.full((1, 64, 2), -0.01, np.float32)
  g[:, :32] = -30.0
  want_o, want_S = numpy_linear_attention(q, k, v, g)
  o, S_T = linear_attention(q, k, v, g, impl="xla", chunk_size=64, return_final_state=True)
  assert rel_rms_error(o, want_o) <= 1e-6 and rel_rms_error(S_T, want_S) <= 1e-6


@pytest.mark.parametrize("impl,kw", CHUNKED)
def test_float16_states_beyond_float16_range(impl, kw):
  # Positive keys and values of 30: S_T reaches 1.2e5 > 65504, the outputs stay ~1e3.
  rng = np.random.default_rng(1)
  k, v = ((30 + rng.random((1, 128, 1, 16))).astype(np.float16) for _ in range(2))
  q = (1e-3 * rng.random((1, 128, 1, 16))).astype(np.float16)
  want_o, want_S = numpy_linear_attention(q, k, v)
  assert np.abs(want_S).max() > 65504 > np.abs(want_o).max()
  o, S_T = linear_attention(q, k, v, impl=impl, chunk_size=16, return_final_state=True, **kw)
  assert o.dtype == jnp.float16 and S_T.dtype == jnp.float32
  assert rel_rms_error(o, want_o) <= 1e-3  # float16 output rounding is 5e-4
  assert rel_rms_error(S_T, want_S) <= 1e-5


@pytest.mark.parametrize("impl,kw", CHUNKED + [("reference", {}), ("scan", {})])
@pytest.mark.parametrize("shape", [(0, 8, 2, 4), (2, 8, 0, 4)])
def test_empty_batch_or_heads(impl, kw, shape):
  # Every impl accepts empty axes. op.py validates the call for the impl asked for,
  # then routes it to the jnp form (there is nothing to launch kernels for), so this
  # checks each impl's validation and that routing, not each impl's own kernels.
  q = jnp.ones(shape, jnp.float32)
  g = jnp.zeros(shape[:3])
  o, S_T = linear_attention(q, q, q, g, impl=impl, return_final_state=True, **kw)
  assert o.shape == shape and S_T.shape == (shape[0], shape[2], 4, 4)
