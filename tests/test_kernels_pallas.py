"""The Pallas-Triton kernels in interpret mode (CPU): forward, gradients, state.

Every case is compared with the float64 NumPy recurrence (forward) or float64
autodiff of the reference (gradients), with the tolerances of kernels spec §5.2.
Interpret mode costs a few seconds of compilation per shape (spec §3.4), so the
shapes are small and shared between cases where possible.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.kernels import KernelConfig, linear_attention, pallas_linear_attention
from qsf_jax.kernels.testing import (TOL, assert_grads_match, float64_grads,
                                     numpy_linear_attention, random_inputs, rel_rms_error)

# Interpret mode is a test device, not what users run: its programs compile several
# times faster without XLA's heavy passes (the `fast_compiles` fixture).
pytestmark = [pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("fast_compiles")]


def _pallas(q, k, v, g=None, S0=None, **kw):
  kw.setdefault("interpret", True)
  kw.setdefault("return_final_state", True)
  return linear_attention(q, k, v, g, initial_state=S0, impl="pallas", **kw)


def _assert_fwd(o, S_T, args, dtype=jnp.float32):
  o_ref, S_ref = numpy_linear_attention(*args)
  tol = TOL[jnp.dtype(dtype).name]["o"]
  assert o.dtype == dtype and o.shape == o_ref.shape
  assert S_T.dtype == jnp.float32 and S_T.shape == S_ref.shape
  assert np.all(np.isfinite(np.asarray(o).astype(np.float32)))
  assert rel_rms_error(o, o_ref) <= tol, rel_rms_error(o, o_ref)
  assert rel_rms_error(S_T, S_ref) <= tol, rel_rms_error(S_T, S_ref)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
def test_forward_matches_float64(T):
  args = random_inputs(T, 2, T, 2, 16, 16)
  _assert_fwd(*_pallas(*args), args)


def test_forward_padded_dims_and_value_blocks():
  # Dk = 24 and Dv = 40 are padded to 32 and 64; block_v = 16 gives 4 value blocks.
  args = random_inputs(1, 1, 90, 2, 24, 40, gate="weak")
  o, S_T = pallas_linear_attention(*args, chunk_size=32, interpret=True,
                                   return_final_state=True,
                                   fwd_config=KernelConfig(block_v=16))
  _assert_fwd(o, S_T, args)


def test_forward_gate_families():
  for gate in ("zero", "weak", "medium", "strong", "head", "extreme"):
    args = random_inputs(2, 1, 64, 2, 16, 16, gate=gate)
    _assert_fwd(*_pallas(*args), args)


def test_forward_bfloat16():
  args = random_inputs(3, 1, 130, 2, 32, 16, dtype=jnp.bfloat16)
  _assert_fwd(*_pallas(*args), args, dtype=jnp.bfloat16)


def test_chunk_sizes_agree():
  args = random_inputs(4, 1, 100, 1, 16, 16)
  outs = [_pallas(*args, chunk_size=c) for c in (16, 32, 64)]
  for o, S_T in outs:
    _assert_fwd(o, S_T, args)
  for o, S_T in outs[1:]:
    assert rel_rms_error(o, outs[0][0]) <= 1e-5
    assert rel_rms_error(S_T, outs[0][1]) <= 1e-5


def test_matches_xla_impl_without_state():
  q, k, v, g, _ = random_inputs(5, 2, 77, 2, 16, 32, initial_state=False)
  o = _pallas(q, k, v, g, return_final_state=False)
  o_xla = linear_attention(q, k, v, g, impl="xla")
  assert rel_rms_error(o, o_xla) <= 1e-5


@pytest.mark.slow
def test_prefill_then_decode_equals_full_call():
  q, k, v, g, S0 = (np.asarray(x) for x in random_inputs(6, 1, 80, 2, 16, 16))
  o_full, S_full = _pallas(q, k, v, g, S0)
  o1, S = _pallas(q[:, :64], k[:, :64], v[:, :64], g[:, :64], S0)
  pieces = [o1]
  for t in range(64, 80):
    o, S = _pallas(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], S)
    pieces.append(o)
  assert rel_rms_error(np.concatenate(pieces, axis=1), o_full) <= 1e-5
  assert rel_rms_error(S, S_full) <= 1e-5


# ------------------------------------------------------------------ gradients
@pytest.mark.slow
def test_grads_float32():
  assert_grads_match("pallas", 2, 65, 2, 16, 8, seed=65, interpret=True)


@pytest.mark.slow
def test_grads_bfloat16():
  assert_grads_match("pallas", 1, 100, 2, 16, 32, dtype=jnp.bfloat16, seed=4, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("gate, seed", [("medium", 1), ("strong", 1), ("extreme", 2)])
def test_grads_bfloat16_multi_chunk_decay(gate, seed):
  # Eight chunks of 64 at D = 64, bf16, with the final state and its cotangent. Two
  # roundings of the float32 state to bf16 used to break the 2e-2 bound on dg: in the
  # backward's inter-chunk products (4.3e-2 with strong decay; the error does not cancel
  # in dG_t = q_t.dq_t - k_t.dk_t) and in the forward's S_T, whose <S_T, dS_T> the
  # reverse cumsum of dG cancels against the backward's k.dk terms (2.4e-2, extreme).
  assert_grads_match("pallas", 1, 512, 2, 64, 64, dtype=jnp.bfloat16, gate=gate, seed=seed,
                     chunk_size=64, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("backward", ["fused", "chunked"])
def test_decay_gradient_of_each_head_in_strong_decay_with_pairs(backward):
  """dg of a strongly decaying head is small (about e^g of the other gradients); with
  ``decay_grad="pairs"`` it must still come out to float32 accuracy, head by head.
  The diagonal pairs (t, t) enter q_t.dq_t and k_t.dk_t at the size of the output and
  cancel in dG only to the rounding of dq and dk ("difference", the default: relative
  error 1.5e-4 at g = -5 and 1.1e-3 at g = -8 with XLA's default passes, 4.3e-3 at
  g = -8 under this module's ``fast_compiles``); "pairs" adds them to dq and dk after
  taking q.dq and k.dk (``chunk_step._off_diagonal``). The other gradients match the
  default form to float32 rounding."""
  rng = np.random.default_rng(11)
  B, T, H, D = 1, 256, 4, 16
  q, k, v, do = (rng.standard_normal((B, T, H, D)) for _ in range(4))
  S0 = rng.standard_normal((B, H, D, D))
  g = np.broadcast_to(np.array([-0.1, -2.0, -5.0, -8.0]), (B, T, H)).copy()

  def grads(fn, dtype):
    def loss(g, q, k, v, S0):
      o = fn(q, k, v, g, S0)
      return jnp.sum(o * do.astype(dtype))
    args = [jnp.asarray(x, dtype) for x in (g, q, k, v, S0)]
    return [np.asarray(x, np.float64) for x in jax.grad(loss, argnums=range(5))(*args)]

  reference = lambda q, k, v, g, S0: linear_attention(q, k, v, g, initial_state=S0,
                                                      impl="reference")
  pallas = lambda form: lambda q, k, v, g, S0: pallas_linear_attention(
      q, k, v, g, S0, chunk_size=64, interpret=True, backward=backward, decay_grad=form)[0]
  with jax.enable_x64(True):
    ref = grads(reference, jnp.float64)
  got, default = grads(pallas("pairs"), jnp.float32), grads(pallas("difference"), jnp.float32)
  for h in range(H):
    err = rel_rms_error(got[0][..., h], ref[0][..., h])
    assert err <= TOL["float32"]["grad"], (backward, g[0, 0, h], err)
  assert rel_rms_error(default[0][..., 3], ref[0][..., 3]) > 1e-4  # what "pairs" mends
  for name, a, b in zip(("dq", "dk", "dv", "dh0"), got[1:], default[1:]):
    assert rel_rms_error(a, b) <= 3e-7, (name, rel_rms_error(a, b))


@pytest.mark.slow
def test_grads_strong_decay_long_sequence():
  assert_grads_match("pallas", 1, 300, 2, 16, 16, gate="strong", seed=3, chunk_size=64,
                     interpret=True)


@pytest.mark.slow
def test_grads_with_value_blocks_and_padded_dims():
  # Dk = 24 -> 32, Dv = 32 in two value blocks: dq, dk are sums of per-block partials.
  q, k, v, g, S0 = random_inputs(8, 1, 50, 2, 24, 32)
  rng = np.random.default_rng(9)
  do = rng.standard_normal(v.shape).astype(np.float32)
  dS = rng.standard_normal(S0.shape).astype(np.float32)
  cfg = KernelConfig(block_v=16)

  def loss(q, k, v, g, S0):
    o, S_T = pallas_linear_attention(q, k, v, g, S0, chunk_size=16, interpret=True,
                                     return_final_state=True, fwd_config=cfg, bwd_config=cfg)
    return jnp.sum(o * do) + jnp.sum(S_T * dS)

  grads = jax.grad(loss, argnums=range(5))(q, k, v, g, S0)
  ref = float64_grads((q, k, v, g, S0), do, dS)
  for name, gr, r in zip(("q", "k", "v", "log_decay", "initial_state"), grads, ref):
    bound = TOL["float32"]["dg" if name == "log_decay" else "grad"]
    assert rel_rms_error(gr, r) <= bound, (name, rel_rms_error(gr, r))


@pytest.mark.slow
def test_grads_without_decay_or_state_under_jit_vmap_checkpoint():
  q, k, v, _, _ = random_inputs(10, 1, 40, 1, 16, 16, gate="none", initial_state=False)
  do = np.random.default_rng(11).standard_normal((2,) + v.shape).astype(np.float32)
  f = lambda q, k, v: linear_attention(q, k, v, impl="pallas", chunk_size=16, interpret=True)
  loss = jax.jit(lambda q, k, v: jnp.sum(jax.vmap(jax.checkpoint(f))(q, k, v) * do))
  stack = lambda x: np.stack([x, -0.5 * np.asarray(x)])
  grads = jax.grad(loss, argnums=(0, 1, 2))(stack(q), stack(k), stack(v))
  zeros_g = np.zeros(q.shape[:3], np.float32)
  zeros_S = np.zeros((1, 1, 16, 16), np.float32)
  for i in range(2):
    ref = float64_grads([stack(x)[i] for x in (q, k, v)] + [zeros_g, zeros_S], do[i], zeros_S)
    for gr, r in zip(grads, ref[:3]):
      assert rel_rms_error(gr[i], r) <= TOL["float32"]["grad"]


def test_rejects_bad_block_v():
  args = random_inputs(12, 1, 16, 1, 16, 32)
  with pytest.raises(ValueError, match=r"block_v must be a power of two >= 16, got 24"):
    pallas_linear_attention(*args, interpret=True, fwd_config=KernelConfig(block_v=24))
  # Interpret mode ignores warps and stages, so bad ones failed only on a GPU.
  for kw, match in ((dict(num_warps=0), "num_warps must be >= 1"),
                    (dict(num_warps="4"), "num_warps must be an int"),
                    (dict(num_warps=6), "num_warps must be a power of two"),
                    (dict(num_stages=1.5), "num_stages must be an int")):
    with pytest.raises(ValueError, match=match):
      KernelConfig(**kw)
  with pytest.raises(ValueError, match="fwd_config must be a KernelConfig"):
    pallas_linear_attention(*args, interpret=True, fwd_config={"block_v": 16})


def test_gpu_check_flags_on_cpu(capsys):
  from qsf_jax.kernels import gpu_check  # pylint: disable=import-outside-toplevel
  for bad, why in ((["--compile_workers=0"], "--compile_workers must be >= 1"),
                   (["--configs=c64_nope"], "unknown --configs")):
    with pytest.raises(SystemExit):
      gpu_check.main(bad)
    assert why in capsys.readouterr().err
  assert gpu_check.main(["--quick", "--compile_workers=4"]) == 2  # no GPU: says so, exits 2
  assert "needs a GPU backend" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_script_logic_in_interpret_mode():
  from qsf_jax.kernels import gpu_check  # pylint: disable=import-outside-toplevel
  res = gpu_check.check_case(1, 40, 1, 16, 24, "float32", "medium", chunk=16, interpret=True,
                             compile_workers=3)  # the four functions compiled side by side
  assert [n for n, _, _ in res] == ["o", "S_T", "dq", "dk", "dv", "dg", "dh0"]
  for name, err, bound in res:
    assert err <= bound, (name, err)
  # Without decay (the QSF measurement term) there is no dg to check.
  res = gpu_check.check_case(1, 40, 1, 16, 24, "bfloat16", "none", chunk=16, interpret=True,
                             backward="chunked")
  assert [n for n, _, _ in res] == ["o", "S_T", "dq", "dk", "dv", "dh0"]
  for name, err, bound in res:
    assert err <= bound, (name, err)
