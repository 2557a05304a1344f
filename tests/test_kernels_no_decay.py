"""The Pallas kernels without decay (``log_decay=None``, the QSF measurement term).

Without decay the wrapper compiles the kernels with ``has_decay=False``: no
cumsum input, no dG outputs and no exponential in the chunk step. The values must be
those of the decay kernels at g = 0 (in interpret mode, to the bit: every
factor dropped is exactly 1), except dq and dk in 16-bit dtypes, where the
state is cast as an MMA operand instead of split hi/lo (``_dot_nt_state``);
every gradient must match the float64 reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.kernels import KernelConfig, pallas_linear_attention
from qsf_jax.kernels.testing import (TOL, float64_grads, pallas_calls, random_inputs,
                                     rel_rms_error)

# Interpret mode is a test device, not what users run: its programs compile several
# times faster without XLA's heavy passes (the `fast_compiles` fixture).
pytestmark = [pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("fast_compiles")]

_CFG = KernelConfig(block_v=16)  # Dv = 32: two value blocks


def _value_and_grads(args, do, dS, g, backward):
  q, k, v, S0 = args

  def loss(q, k, v, S0):
    o, S_T = pallas_linear_attention(q, k, v, g, S0, chunk_size=32, interpret=True,
                                     return_final_state=True, fwd_config=_CFG,
                                     bwd_config=_CFG, backward=backward)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S_T * dS), (o, S_T)

  (_, (o, S_T)), grads = jax.value_and_grad(loss, argnums=range(4), has_aux=True)(
      q, k, v, S0)
  return (o, S_T) + tuple(grads)


@pytest.mark.parametrize("backward", ["fused", "chunked"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_decay_equals_zero_decay_and_float64(dtype, backward):
  # T = 100 in four chunks of 32 (the last padded), with initial and final states.
  q, k, v, _, S0 = random_inputs(1, 1, 100, 2, 16, 32, dtype=jnp.dtype(dtype), gate="none")
  rng = np.random.default_rng(2)
  do = rng.standard_normal(v.shape).astype(np.float32)
  dS = rng.standard_normal(S0.shape).astype(np.float32)
  args = (q, k, v, S0)
  got = _value_and_grads(args, do, dS, None, backward)
  at_zero = _value_and_grads(args, do, dS, jnp.zeros(q.shape[:3], jnp.float32), backward)
  names = ("o", "S_T", "dq", "dk", "dv", "dh0")
  for name, a, b in zip(names, got, at_zero):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    if dtype == "bfloat16" and name in ("dq", "dk"):  # one MMA with bf16 S, not two
      assert 0 < rel_rms_error(a, b) <= TOL[dtype]["grad"], name
      continue
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                  err_msg=name)
  ref = float64_grads((q, k, v, np.zeros(q.shape[:3], np.float32), S0), do, dS)
  tol = TOL[dtype]["grad"]
  for name, gr, r in zip(names[2:], got[2:], ref[:3] + ref[4:]):
    assert rel_rms_error(gr, r) <= tol, (name, rel_rms_error(gr, r))


@pytest.mark.parametrize("backward, n_in, n_out", [
    ("fused", {"linear_attention_fwd": 3, "linear_attention_bwd": 4},
     {"linear_attention_fwd": 1, "linear_attention_bwd": 3}),
    ("chunked", {"linear_attention_fwd": 3, "linear_attention_bwd_states": 4,
                 "linear_attention_bwd_grads": 6},
     {"linear_attention_fwd": 1, "linear_attention_bwd_states": 2,
      "linear_attention_bwd_grads": 3}),
])
def test_no_decay_kernels_have_no_exp_and_no_decay_refs(backward, n_in, n_out):
  q, k, v, g, _ = random_inputs(3, 1, 64, 1, 16, 16, dtype=jnp.bfloat16,
                                initial_state=False)

  def grads(g):
    def loss(q, k, v):
      o, _ = pallas_linear_attention(q, k, v, g, chunk_size=32, interpret=True,
                                     backward=backward)
      return jnp.sum(o.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))

  calls = pallas_calls(grads(None), q, k, v)
  assert {c[0] for c in calls} == set(n_in), calls
  for name, ins, outs, body in calls:
    assert (ins, outs) == (n_in[name], n_out[name]), (name, ins, outs)
    assert not {"exp", "exp2"} & body, name
  # With a decay every kernel takes the cumsum and exponentiates, always as exp2
  # (one instruction on GPU, see chunk_step._exp); this is the control.
  for name, ins, outs, body in pallas_calls(lambda q, k, v: grads(g)(q, k, v), q, k, v):
    assert ins == n_in[name] + 1 and "exp2" in body and "exp" not in body, (name, ins)
