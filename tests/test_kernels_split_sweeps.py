"""Backward sweeps split over programs (``split_sweeps=True``) in interpret mode.

The backward's forward sweep (dq, or the chunk states) and its reverse sweep (dk,
dv, or the state gradients) share only their inputs and write disjoint outputs, so
running them in separate programs must give the same gradients to the bit, for
both backward designs, with and without decay, initial and final states.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.kernels import KernelConfig, pallas_linear_attention
from qsf_jax.kernels.testing import GRAD_NAMES, pallas_eqns, random_inputs

# Interpret mode is a test device, not what users run: its programs compile several
# times faster without XLA's heavy passes (the `fast_compiles` fixture).
pytestmark = [pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("fast_compiles")]

_CFG = KernelConfig(block_v=16)  # Dv = 32: two value blocks, so four programs per row


def _grads(args, do, dS, backward, split_sweeps):
  def loss(q, k, v, g, S0):
    o, S_T = pallas_linear_attention(q, k, v, g, S0, chunk_size=32, interpret=True,
                                     return_final_state=True, fwd_config=_CFG,
                                     bwd_config=_CFG, backward=backward,
                                     split_sweeps=split_sweeps)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S_T * dS)

  grad = jax.grad(loss, argnums=range(5))
  grids = {e.params["name"]: tuple(e.params["grid_mapping"].grid)
           for e in pallas_eqns(grad, *args)}
  return grad(*args), grids


@pytest.mark.parametrize("backward, sweeps_kernel", [
    ("fused", "linear_attention_bwd"), ("chunked", "linear_attention_bwd_states")])
@pytest.mark.parametrize("dtype, gate", [
    ("float32", "medium"), ("bfloat16", "strong"), ("bfloat16", "none")])
def test_split_sweeps_give_the_same_bits(backward, sweeps_kernel, dtype, gate):
  # T = 100: four chunks of 32, the last padded; two heads.
  q, k, v, g, S0 = random_inputs(21, 1, 100, 2, 16, 32, dtype=jnp.dtype(dtype), gate=gate)
  rng = np.random.default_rng(21)
  do = rng.standard_normal(v.shape).astype(np.float32)
  dS = rng.standard_normal(S0.shape).astype(np.float32)
  args = (q, k, v, g, S0)
  split, grids = _grads(args, do, dS, backward, True)
  whole, grids_whole = _grads(args, do, dS, backward, False)
  # (Dv / BV, H, B) -> (2 Dv / BV, H, B) for the kernel that holds the two sweeps.
  assert grids_whole[sweeps_kernel] == (2, 2, 1)
  assert grids == dict(grids_whole, **{sweeps_kernel: (4, 2, 1)})
  for name, a, b in zip(GRAD_NAMES, split, whole):
    if g is None and name == "log_decay":
      assert a is None and b is None
      continue
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                  err_msg=name)


def test_split_sweeps_with_segments():
  # The two-level split folds segments into the batch; each folded row's backward
  # splits its sweeps the same way.
  q, k, v, g, _ = random_inputs(23, 1, 128, 1, 16, 32, initial_state=False)
  do = np.random.default_rng(23).standard_normal(v.shape).astype(np.float32)

  def grads(split):
    def loss(q, k, v, g):
      o, _ = pallas_linear_attention(q, k, v, g, chunk_size=32, interpret=True,
                                     fwd_config=_CFG, bwd_config=_CFG, num_segments=2,
                                     split_sweeps=split)
      return jnp.sum(o * do)
    return jax.grad(loss, argnums=range(4))(q, k, v, g)

  for a, b in zip(grads(True), grads(False)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rejects_a_non_bool_split_sweeps():
  q, k, v, g, _ = random_inputs(22, 1, 16, 1, 16, 16, initial_state=False)
  with pytest.raises(ValueError, match=r"split_sweeps must be a bool \(True or False\), got 1"):
    pallas_linear_attention(q, k, v, g, interpret=True, split_sweeps=1)
