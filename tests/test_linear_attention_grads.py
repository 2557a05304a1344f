"""Gradients of the CPU impls of ``linear_attention`` against float64 autodiff.

The ground truth is ``jax.grad`` of the quadratic reference in float64, with
random cotangents for the outputs and the final state (kernels spec §5.1: a
cotangent of ones hides transposition bugs). Tolerances are spec §5.2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.kernels import linear_attention
from qsf_jax.kernels.testing import (TOL, assert_grads_match, float64_grads, random_inputs,
                                     rel_rms_error)

# Every case here is compile-bound (each shape compiles the impl's forward and backward
# and the float64 reference's), and XLA's heavy passes only reschedule the same float32
# arithmetic: the programs compile several times faster without them (the
# `fast_compiles` fixture) and compute the values the tolerances below are about.
pytestmark = pytest.mark.usefixtures("fast_compiles")

CPU_IMPLS = ("reference", "scan", "xla")
NAMES = ("q", "k", "v", "log_decay", "initial_state")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("T", [1, pytest.param(65, marks=pytest.mark.slow)])
def test_grads_float32(impl, T):
  assert_grads_match(impl, 2, T, 2, 16, 8, seed=T)


@pytest.mark.slow
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_grads_float32_long_strong_decay(impl):
  assert_grads_match(impl, 1, 300, 2, 16, 16, gate="strong", seed=3, chunk_size=64)


@pytest.mark.slow
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_grads_bfloat16(impl):
  assert_grads_match(impl, 1, 100, 2, 16, 32, dtype=jnp.bfloat16, seed=4)


@pytest.mark.parametrize("impl", ["scan", "xla"])
def test_decay_gradient_of_each_head_in_strong_decay(impl):
  """dg of a strongly decaying head is small (about e^g of the other gradients); the
  chunked form must still get it to float32 accuracy, head by head. The difference
  form b_i - b_j of the exponents gave relative errors of 2e-3 at g = -8 (cancellation
  of output-sized terms); the segment sums give float32 round-off."""
  rng = np.random.default_rng(11)
  B, T, H, D = 1, 128, 4, 16
  q, k, v, do = (rng.standard_normal((B, T, H, D)) for _ in range(4))
  S0, dS = (rng.standard_normal((B, H, D, D)) for _ in range(2))
  g = np.broadcast_to(np.array([-0.1, -2.0, -5.0, -8.0]), (B, T, H)).copy()
  def loss_of(impl, dtype):
    def loss(g, q, k, v, S0):
      o, S_T = linear_attention(*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(g, dtype),
                                initial_state=jnp.asarray(S0, dtype), return_final_state=True,
                                impl=impl, chunk_size=64)
      return jnp.sum(o * do.astype(dtype)) + jnp.sum(S_T * dS.astype(dtype))
    return loss
  with jax.enable_x64(True):
    ref = np.asarray(jax.grad(loss_of("reference", jnp.float64))(g, q, k, v, S0))
  got = np.asarray(jax.grad(loss_of(impl, jnp.float32))(g, q, k, v, S0), np.float64)
  for h in range(H):
    err = rel_rms_error(got[..., h], ref[..., h])
    assert err <= TOL["float32"]["grad"], (impl, g[0, 0, h], err)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_grads_without_decay_or_state(impl):
  q, k, v, _, _ = random_inputs(5, 1, 40, 2, 16, 16, gate="none", initial_state=False)
  do = np.random.default_rng(6).standard_normal(v.shape).astype(np.float32)
  f = lambda q, k, v: jnp.sum(linear_attention(q, k, v, impl=impl, chunk_size=16) * do)
  grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  zeros_g = np.zeros(q.shape[:3], np.float32)
  zeros_S = np.zeros((1, 2, 16, 16), np.float32)
  ref = float64_grads((q, k, v, zeros_g, zeros_S), do, zeros_S)
  for gr, r in zip(grads, ref[:3]):
    assert rel_rms_error(gr, r) <= TOL["float32"]["grad"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_xla_without_decay_with_states_matches_float64(dtype):
  # log_decay=None with an initial state and a final-state cotangent: outputs, final
  # state and the gradients in q, k, v and the initial state, batch 2, T = 120 in chunks
  # of 32 (the last padded), against float64 at g = 0.
  q, k, v, _, S0 = random_inputs(9, 2, 120, 2, 32, 32, dtype=jnp.dtype(dtype), gate="none")
  rng = np.random.default_rng(10)
  do = rng.standard_normal(v.shape).astype(np.float32)
  dS = rng.standard_normal(S0.shape).astype(np.float32)

  def loss(q, k, v, S0):
    o, S_T = linear_attention(q, k, v, initial_state=S0, return_final_state=True, impl="xla",
                              chunk_size=32)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S_T * dS), (o, S_T)

  (_, (o, S_T)), grads = jax.value_and_grad(loss, argnums=range(4), has_aux=True)(
      q, k, v, S0)
  zeros_g = np.zeros(q.shape[:3], np.float32)
  with jax.enable_x64(True):
    o64, S64 = linear_attention(*(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)),
                                initial_state=jnp.asarray(np.asarray(S0, np.float64)),
                                return_final_state=True, impl="reference")
  tol = TOL[dtype]
  assert rel_rms_error(o, o64) <= tol["o"] and rel_rms_error(S_T, S64) <= tol["o"]
  ref = float64_grads((q, k, v, zeros_g, S0), do, dS)
  for name, gr, r in zip(("q", "k", "v", "initial_state"), grads, ref[:3] + ref[4:]):
    assert rel_rms_error(gr, r) <= tol["grad"], (name, rel_rms_error(gr, r))


@pytest.mark.slow
def test_xla_grads_under_checkpoint_and_vmap():
  q, k, v, g, S0 = random_inputs(7, 1, 33, 1, 16, 16)
  do = np.random.default_rng(8).standard_normal((2,) + v.shape).astype(np.float32)
  f = lambda q, k, v, g: linear_attention(q, k, v, g, impl="xla", chunk_size=16)
  loss = lambda q, k, v, g: jnp.sum(jax.vmap(jax.checkpoint(f))(q, k, v, g) * do)
  stack = lambda x: np.stack([x, 0.5 * np.asarray(x)])
  grads = jax.grad(loss, argnums=range(4))(*(stack(x) for x in (q, k, v, g)))
  for i in range(2):
    args = [stack(x)[i] for x in (q, k, v, g)] + [np.zeros_like(S0)]
    ref = float64_grads(args, do[i], np.zeros_like(S0))
    for name, gr, r in zip(NAMES, grads, ref):
      tol = TOL["float32"]["dg" if name == "log_decay" else "grad"]
      assert rel_rms_error(gr[i], r) <= tol, (name, i)
