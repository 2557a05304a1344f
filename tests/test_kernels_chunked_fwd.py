"""The chunk-parallel Pallas forward (``forward="chunked"``) in interpret mode.

Outputs and final states against the float64 recurrence (kernels spec §5.2
tolerances) over T, padded dims, value blocks, gate families (no decay
included), initial states and dtypes; and against the fused forward, which does
the same step arithmetic (``chunk_step``), so the two agree to the bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.kernels import KernelConfig, pallas_linear_attention
from qsf_jax.kernels.testing import (TOL, numpy_linear_attention, random_inputs,
                                     rel_rms_error)

# Interpret mode is a test device, not what users run: its programs compile several
# times faster without XLA's heavy passes (the `fast_compiles` fixture).
pytestmark = [pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("fast_compiles")]


def _both(args, **kw):
  kw = dict(dict(interpret=True, return_final_state=True), **kw)
  return [pallas_linear_attention(*args, forward=f, **kw) for f in ("chunked", "fused")]


@pytest.mark.parametrize("shape, dtype, gate, h0, chunk, block_v", [
    ((2, 1, 2, 16, 16), "float32", "medium", True, 64, 64),    # T = 1: one padded chunk
    ((2, 65, 2, 16, 8), "float32", "strong", True, 32, 64),    # T = C + 1, Dv padded to 16
    ((1, 90, 2, 24, 40), "float32", "weak", False, 32, 16),    # padded dims, 4 value blocks
    ((1, 300, 2, 16, 16), "float32", "extreme", True, 64, 64),  # five chunks
    ((1, 130, 2, 32, 16), "bfloat16", "medium", True, 64, 64),
    ((2, 100, 2, 16, 32), "bfloat16", "none", True, 32, 16),   # no decay
    ((1, 77, 1, 16, 16), "float32", "none", False, 16, 16),
])
def test_chunked_forward_matches_float64_and_fused(shape, dtype, gate, h0, chunk, block_v):
  args = random_inputs(5, *shape, dtype=jnp.dtype(dtype), gate=gate, initial_state=h0)
  (o, S_T), (o_f, S_f) = _both(args, chunk_size=chunk, fwd_config=KernelConfig(block_v=block_v))
  o_ref, S_ref = numpy_linear_attention(*args)
  tol = TOL[dtype]["o"]
  assert o.dtype == args[0].dtype and o.shape == o_ref.shape and S_T.dtype == jnp.float32
  assert rel_rms_error(o, o_ref) <= tol and rel_rms_error(S_T, S_ref) <= tol
  np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_f, np.float32))
  np.testing.assert_array_equal(np.asarray(S_T), np.asarray(S_f))


def test_chunked_forward_gradients_under_jit_and_vmap():
  # The backward is shared; the custom_vjp residuals (S_T among them) come from the
  # chunked forward. The outputs under jit and vmap are checked against float64 too:
  # the gradients alone do not depend on what the forward computes.
  q, k, v, g, S0 = random_inputs(6, 1, 70, 2, 16, 16, gate="weak")
  rng = np.random.default_rng(7)
  do = rng.standard_normal((2,) + v.shape).astype(np.float32)
  dS = rng.standard_normal((2,) + S0.shape).astype(np.float32)
  stack = lambda x: jnp.stack([x, 0.5 * x])
  ins = [stack(x) for x in (q, k, v, g)]

  def run(forward):
    f = lambda q, k, v, g: pallas_linear_attention(q, k, v, g, S0, chunk_size=32,
                                                   interpret=True, forward=forward,
                                                   return_final_state=True)
    loss = jax.jit(lambda *a: jnp.sum(jax.vmap(f)(*a)[0] * do)
                   + jnp.sum(jax.vmap(f)(*a)[1] * dS))
    return jax.jit(jax.vmap(f))(*ins), jax.grad(loss, argnums=range(4))(*ins)

  (o, S_T), grads = run("chunked")
  for i in range(2):
    o_ref, S_ref = numpy_linear_attention(*(x[i] for x in ins), S0)
    assert rel_rms_error(o[i], o_ref) <= TOL["float32"]["o"]
    assert rel_rms_error(S_T[i], S_ref) <= TOL["float32"]["o"]
  for a, b in zip(grads, run("fused")[1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rejects_unknown_forward():
  args = random_inputs(0, 1, 16, 1, 16, 16)
  with pytest.raises(ValueError, match="forward must be one of"):
    pallas_linear_attention(*args, interpret=True, forward="parallel")
