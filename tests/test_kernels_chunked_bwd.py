"""The chunk-parallel Pallas backward (``backward="chunked"``) in interpret mode.

Gradients of <o, do> + <S_T, dS> in q, k, v, log_decay and the initial state
against float64 autodiff of the quadratic reference (kernels spec §5.2
tolerances), over value blocks, padded dims and T, gate families and dtypes;
and against the fused backward on the same forward.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.kernels import KernelConfig, pallas_bwd_chunked, pallas_linear_attention
from qsf_jax.kernels.testing import (GRAD_NAMES, TOL, gradient_case, pallas_eqns,
                                     random_inputs, rel_rms_error)

# Interpret mode is a test device, not what users run: its programs compile several
# times faster without XLA's heavy passes (the `fast_compiles` fixture).
pytestmark = [pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("fast_compiles")]


def _grads(args, do, dS, *, chunk, block_v=64, backward="chunked", **kw):
  cfg = KernelConfig(block_v=block_v)

  def loss(q, k, v, g, S0):
    o, S_T = pallas_linear_attention(q, k, v, g, S0, chunk_size=chunk, interpret=True,
                                     return_final_state=True, fwd_config=cfg,
                                     bwd_config=cfg, backward=backward, **kw)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S_T * dS)

  return jax.grad(loss, argnums=range(5))(*args)


# Each row compiles its own kernels in interpret mode, so the padding cases share one
# row. The seeds are those of the fused backward's cases of the same shapes
# (test_kernels_pallas.py, test_linear_attention_grads.py), whose float64 reference
# gradients ``gradient_case`` then computes once per process.
@pytest.mark.parametrize("shape, dtype, gate, chunk, block_v, seed", [
    # T = C + 1 (the last chunk padded), Dk 24 -> 32, Dv 24 -> 32 in two value blocks
    ((2, 65, 2, 24, 24), "float32", "weak", 32, 16, 7),
    ((1, 1, 1, 16, 16), "float32", "head", 64, 64, 7),      # T = 1: one padded chunk
    ((1, 300, 2, 16, 16), "float32", "strong", 64, 64, 3),  # five chunks, strong decay
    ((1, 100, 2, 16, 32), "bfloat16", "medium", 32, 16, 4),
    ((1, 512, 2, 64, 64), "bfloat16", "strong", 64, 64, 1),
    ((1, 512, 2, 64, 64), "bfloat16", "extreme", 64, 64, 2),
])
def test_chunked_backward_matches_float64(shape, dtype, gate, chunk, block_v, seed):
  args, do, dS, ref = gradient_case(*shape, dtype, gate, seed)
  grads = _grads(args, do, dS, chunk=chunk, block_v=block_v)
  tol = TOL[dtype]
  for name, x, gr, r in zip(GRAD_NAMES, args, grads, ref):
    assert gr.dtype == x.dtype and gr.shape == x.shape, (name, gr.dtype, gr.shape)
    err = rel_rms_error(gr, r)
    bound = tol["dg" if name == "log_decay" else "grad"]
    assert err <= bound, f"d{name} rel RMS error {err:.2e} > {bound:.0e}"


def test_chunked_and_fused_backward_agree_without_decay_or_state_under_vmap():
  # No log_decay, no initial state and no final-state cotangent: the kernels run without
  # their optional refs, under vmap (an extra grid axis) and jit. Both backwards see the
  # same forward, in float32.
  q, k, v, _, _ = random_inputs(3, 2, 70, 2, 16, 32, gate="none", initial_state=False)
  stack = lambda x: jnp.stack([x, -0.5 * x])
  do = np.random.default_rng(4).standard_normal((2,) + v.shape).astype(np.float32)
  outs = {}
  for backward in ("fused", "chunked"):
    f = lambda q, k, v, b=backward: pallas_linear_attention(
        q, k, v, chunk_size=32, interpret=True, backward=b)[0]
    loss = lambda q, k, v, f=f: jnp.sum(jax.vmap(f)(q, k, v) * do)
    outs[backward] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(stack(q), stack(k), stack(v))
  for a, b in zip(outs["chunked"], outs["fused"]):
    assert rel_rms_error(a, b) <= 1e-5


def _states_dtypes_and_grads(q, k, v, g, S0, do, dS):
  """dtypes of the two states the chunked backward stores, and every gradient."""
  cfg = KernelConfig(block_v=16)  # Dv = 32: two value blocks in the states kernel

  def loss(q, k, v, g, S0):
    o, S_T = pallas_linear_attention(q, k, v, g, S0, chunk_size=32, interpret=True,
                                     return_final_state=True, fwd_config=cfg,
                                     bwd_config=cfg, backward="chunked")
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S_T * dS)

  grad = jax.grad(loss, argnums=range(5))
  states = [e for e in pallas_eqns(grad, q, k, v, g, S0)
            if e.params["name"] == "linear_attention_bwd_states"]
  assert len(states) == 1, states
  return [str(x.aval.dtype) for x in states[0].outvars[:2]], grad(q, k, v, g, S0)


@pytest.mark.parametrize("dtype, gate, stored", [
    ("bfloat16", "none", "bfloat16"),   # no dG: states rounded on store, not on load
    ("bfloat16", "medium", "float32"),  # dG needs ~16-bit states (hi/lo products)
    ("float32", "none", "float32"),
])
def test_chunked_backward_state_dtype_and_bits(monkeypatch, dtype, gate, stored):
  # T = 100 in four chunks of 32 (the last padded), initial and final states.
  q, k, v, g, S0 = random_inputs(8, 1, 100, 2, 16, 32, dtype=jnp.dtype(dtype), gate=gate)
  rng = np.random.default_rng(8)
  do = rng.standard_normal(v.shape).astype(np.float32)
  dS = rng.standard_normal(S0.shape).astype(np.float32)
  dtypes, grads = _states_dtypes_and_grads(q, k, v, g, S0, do, dS)
  assert dtypes == [stored, stored]
  # The same backward with float32 states: the same bits (the MMAs round the
  # states to the input dtype either way).
  # jax >= 0.12 caches the traced kernels of a partitioned call, so the patch needs
  # fresh traces, and so do the tests that run after this one.
  monkeypatch.setattr(pallas_bwd_chunked, "state_store_dtype",
                      lambda dtype, has_decay: jnp.dtype(jnp.float32))
  jax.clear_caches()
  try:
    dtypes32, grads32 = _states_dtypes_and_grads(q, k, v, g, S0, do, dS)
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  assert dtypes32 == ["float32", "float32"]
  for name, a, b in zip(GRAD_NAMES, grads, grads32):
    if a is None:
      assert b is None and g is None and name == "log_decay", name
      continue
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                  err_msg=name)


def test_rejects_unknown_backward():
  q, k, v, g, _ = random_inputs(5, 1, 16, 1, 16, 16, initial_state=False)
  with pytest.raises(ValueError, match=r"backward must be one of \('fused', 'chunked'\), "
                                       r"got 'split'"):
    pallas_linear_attention(q, k, v, g, interpret=True, backward="split")


def test_rejects_unknown_decay_grad():
  q, k, v, g, _ = random_inputs(5, 1, 16, 1, 16, 16, initial_state=False)
  for bad in ("exact", None, ["pairs"]):
    with pytest.raises(ValueError, match=r"decay_grad must be one of \('difference', 'pairs'\), "
                                         rf"got {re.escape(repr(bad))}"):
      pallas_linear_attention(q, k, v, g, interpret=True, decay_grad=bad)


@pytest.mark.parametrize("backward, split_sweeps", [("fused", False), ("fused", True),
                                                    ("chunked", False)])
def test_decay_grad_pairs_matches_float64(backward, split_sweeps):
  # decay_grad="pairs" outside the slow strong-decay test: padded T, Dk and Dv, two
  # value blocks, an initial state and a final-state cotangent, float32 and bfloat16.
  # Every gradient against float64, and dq, dk, dv, dh0 against the default form.
  for shape, dtype in (((2, 65, 2, 24, 24), "float32"), ((1, 100, 2, 16, 32), "bfloat16")):
    args, do, dS, ref = gradient_case(*shape, dtype, "medium", 7)
    kw = dict(chunk=32, block_v=16, backward=backward, split_sweeps=split_sweeps)
    got = _grads(args, do, dS, decay_grad="pairs", **kw)
    default = _grads(args, do, dS, decay_grad="difference", **kw)
    tol = TOL[dtype]
    for name, gr, d, r in zip(GRAD_NAMES, got, default, ref):
      err = rel_rms_error(gr, r)
      bound = tol["dg" if name == "log_decay" else "grad"]
      assert err <= bound, f"{dtype} d{name} rel RMS error {err:.2e} > {bound:.0e}"
      if name != "log_decay":  # the diagonal is rounded to the input dtype in "difference"
        assert rel_rms_error(gr, d) <= tol["grad"], (dtype, name, rel_rms_error(gr, d))
