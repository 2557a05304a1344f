"""Forward correctness, API and validation of ``qsf_jax.kernels.linear_attention``.

Every CPU impl is compared with an independent float64 NumPy recurrence using
the relative RMS error and the tolerances of kernels spec §5.2. The Pallas impl
has its own file (interpret mode is slower).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.kernels import linear_attention, resolve_impl
from qsf_jax.kernels.testing import TOL, numpy_linear_attention, random_inputs, rel_rms_error

# Most cases compile a new shape for each impl; XLA's heavy passes only reschedule the
# same arithmetic, so the programs compile faster without them (the `fast_compiles`
# fixture) and compute the values the tolerances below are about.
pytestmark = pytest.mark.usefixtures("fast_compiles")

CPU_IMPLS = ("reference", "scan", "xla")


def _check_fwd(impl, B, T, H, Dk, Dv, *, dtype=jnp.float32, gate="medium", h0=True,
               chunk_size=64, seed=0):
  q, k, v, g, S0 = random_inputs(seed, B, T, H, Dk, Dv, dtype=dtype,
                                 gate=gate, initial_state=h0)
  o, S_T = linear_attention(q, k, v, g, initial_state=S0, return_final_state=True,
                            impl=impl, chunk_size=chunk_size)
  o_ref, S_ref = numpy_linear_attention(q, k, v, g, S0)
  tol = TOL[jnp.dtype(dtype).name]["o"]
  assert o.shape == (B, T, H, Dv) and o.dtype == dtype
  assert S_T.shape == (B, H, Dk, Dv) and S_T.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(o, np.float32)))
  assert rel_rms_error(o, o_ref) <= tol, (impl, T, rel_rms_error(o, o_ref))
  assert rel_rms_error(S_T, S_ref) <= tol, (impl, T, rel_rms_error(S_T, S_ref))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
def test_forward_matches_float64_square(impl, T):
  _check_fwd(impl, 2, T, 2, 16, 16, gate="medium", h0=True)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("T", [65, 300])
def test_forward_matches_float64_dk_ne_dv(impl, T):
  _check_fwd(impl, 1, T, 3, 24, 8, gate="weak", h0=True, seed=1)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_forward_gate_families(impl):
  # Same shapes for every gate family, so each impl compiles once.
  for gate in ("zero", "weak", "strong", "head", "extreme"):
    _check_fwd(impl, 1, 70, 2, 16, 16, gate=gate, h0=True, seed=2)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("T", [65, 300])
def test_forward_bfloat16(impl, T):
  _check_fwd(impl, 1, T, 2, 16, 32, dtype=jnp.bfloat16, gate="medium", h0=True, seed=3)


@pytest.mark.parametrize("chunk_size", [1, 16, 32, 64, 100])
def test_xla_chunk_sizes_agree(chunk_size):
  _check_fwd("xla", 1, 200, 2, 16, 16, chunk_size=chunk_size, seed=4)


def test_impls_agree_with_each_other_without_state():
  q, k, v, g, _ = random_inputs(5, 2, 90, 2, 16, 16, initial_state=False)
  outs = [linear_attention(q, k, v, g, impl=i, chunk_size=32) for i in CPU_IMPLS]
  for o in outs[1:]:
    assert rel_rms_error(o, outs[0]) <= 1e-5


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_no_decay_is_plain_causal_linear_attention(impl):
  q, k, v, _, _ = random_inputs(6, 1, 40, 1, 16, 16, gate="none",
                                initial_state=False)
  scores = np.tril(np.einsum("tk,sk->ts", np.asarray(q[0, :, 0], np.float64),
                             np.asarray(k[0, :, 0], np.float64)))
  o_ref = scores @ np.asarray(v[0, :, 0], np.float64)
  o = linear_attention(q, k, v, impl=impl, chunk_size=16)
  assert rel_rms_error(np.asarray(o)[0, :, 0], o_ref) <= 1e-5


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_chunked_prefill_then_decode_equals_full_call(impl):
  q, k, v, g, S0 = (np.asarray(x) for x in random_inputs(7, 2, 100, 2, 16, 8))
  o_full, S_full = linear_attention(q, k, v, g, initial_state=S0, return_final_state=True,
                                    impl=impl, chunk_size=32)
  pieces, S = [], S0
  for lo, hi in [(0, 45), (45, 90)]:  # chunked prefill
    o, S = linear_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi],
                            initial_state=S, return_final_state=True, impl=impl, chunk_size=32)
    pieces.append(o)
  for t in range(90, 100):  # step-by-step decode
    o, S = linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1],
                            initial_state=S, return_final_state=True, impl=impl, chunk_size=32)
    pieces.append(o)
  assert rel_rms_error(np.concatenate(pieces, axis=1), o_full) <= 1e-5
  assert rel_rms_error(S, S_full) <= 1e-5


def test_return_final_state_flag_and_jit():
  q, k, v, g, _ = random_inputs(8, 1, 20, 1, 16, 16, initial_state=False)
  o = linear_attention(q, k, v, g, impl="xla")
  assert isinstance(o, jax.Array) and o.shape == (1, 20, 1, 16)
  f = jax.jit(lambda q, k, v, g: linear_attention(q, k, v, g, impl="xla", chunk_size=16))
  assert rel_rms_error(f(q, k, v, g), o) <= 1e-6
  # o keeps the operands' dtype with or without the final state (which is float32)
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  o16 = linear_attention(q16, k16, v16, g, impl="xla")
  o16s, S16 = linear_attention(q16, k16, v16, g, impl="xla", return_final_state=True)
  assert (o16.dtype, o16s.dtype, S16.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  np.testing.assert_array_equal(np.asarray(o16, np.float32), np.asarray(o16s, np.float32))


def test_vmap_over_extra_batch_axis():
  q, k, v, g, S0 = random_inputs(9, 2, 33, 2, 16, 16)
  stack = lambda x: np.stack([x, 0.5 * np.asarray(x)])
  f = lambda q, k, v, g, S0: linear_attention(q, k, v, g, initial_state=S0, impl="xla",
                                              chunk_size=16)
  o = jax.vmap(f)(stack(q), stack(k), stack(v), stack(g), stack(S0))
  for i in range(2):
    o_ref, _ = numpy_linear_attention(*(stack(x)[i] for x in (q, k, v, g, S0)))
    assert rel_rms_error(o[i], o_ref) <= 1e-5


def test_auto_resolves_to_xla_on_cpu():
  assert jax.default_backend() == "cpu"
  assert resolve_impl("auto", jnp.float32) == "xla"
  assert resolve_impl("scan", jnp.float32) == "scan"


def test_log_decay_dtype_bfloat16_is_accepted():
  q, k, v, g, _ = random_inputs(10, 1, 30, 1, 16, 16, initial_state=False)
  g = np.asarray(g).astype(jnp.bfloat16)
  o = linear_attention(q, k, v, g, impl="xla", chunk_size=16)
  o_ref, _ = numpy_linear_attention(q, k, v, g)
  assert rel_rms_error(o, o_ref) <= 1e-5


def test_float64_inputs_keep_float64(x64):
  q, k, v, g, S0 = (np.asarray(x, np.float64) for x in random_inputs(11, 1, 50, 2, 16, 16))
  for impl in CPU_IMPLS:
    o, S_T = linear_attention(q, k, v, g, initial_state=S0, return_final_state=True,
                              impl=impl, chunk_size=16)
    assert o.dtype == jnp.float64 and S_T.dtype == jnp.float64
    o_ref, S_ref = numpy_linear_attention(q, k, v, g, S0)
    assert rel_rms_error(o, o_ref) <= 1e-12
    assert rel_rms_error(S_T, S_ref) <= 1e-12


# ----------------------------------------------------------------- bad input
def _good(B=1, T=8, H=2, Dk=16, Dv=8):
  return tuple(np.asarray(x) for x in random_inputs(12, B, T, H, Dk, Dv))


def test_rejects_wrong_rank():
  q, k, v, g, _ = _good()
  with pytest.raises(ValueError, match=r"q must have 4 dimension.*\(8, 2, 16\)"):
    linear_attention(q[0], k, v)


def test_rejects_mismatched_shapes():
  q, k, v, g, S0 = _good()
  with pytest.raises(ValueError, match=r"k must have the shape of q \(1, 8, 2, 16\), got \(1, 8, 2, 8\)"):
    linear_attention(q, k[..., :8], v)
  with pytest.raises(ValueError, match=r"v must have shape \(1, 8, 2, Dv\).*got \(1, 7, 2, 8\)"):
    linear_attention(q, k, v[:, :7])
  with pytest.raises(ValueError, match=r"log_decay must have shape \(1, 8, 2\), got \(1, 8\)"):
    linear_attention(q, k, v, g[..., 0])
  with pytest.raises(ValueError, match=r"initial_state must have shape \(1, 2, 16, 8\), got \(1, 2, 8, 16\)"):
    linear_attention(q, k, v, g, initial_state=np.swapaxes(S0, -1, -2))


def test_rejects_bad_dtypes():
  q, k, v, g, S0 = _good()
  with pytest.raises(ValueError, match=r"q, k and v must share one dtype"):
    linear_attention(q, k.astype(jnp.bfloat16), v)
  with pytest.raises(ValueError, match=r"q must be real"):
    linear_attention(q.astype(np.complex64), k, v)
  with pytest.raises(ValueError, match=r"log_decay must be real"):
    linear_attention(q, k, v, g.astype(np.complex64))
  with pytest.raises(ValueError, match=r"v must have a floating dtype.*int32"):
    linear_attention(q, k, v.astype(np.int32))
  with pytest.raises(ValueError, match=r"initial_state must be real"):
    linear_attention(q, k, v, initial_state=S0.astype(np.complex64))


def test_rejects_bad_impl_and_chunk_size():
  q, k, v, _, _ = _good()
  with pytest.raises(ValueError, match=r"impl must be one of .*'triton'"):
    linear_attention(q, k, v, impl="triton")
  for bad in (0, -4, 1.5, True, np.bool_(True), np.int64(0), "16"):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
      linear_attention(q, k, v, chunk_size=bad, impl="xla")
  # A NumPy integer (e.g. from a config array) is a chunk size like a Python int.
  # So is a concrete integer 0-d array; a traced one says to make it static.
  for size in (np.int64(16), jnp.int32(16), np.array(16)):
    np.testing.assert_array_equal(
        np.asarray(linear_attention(q, k, v, chunk_size=size, impl="xla")),
        np.asarray(linear_attention(q, k, v, chunk_size=16, impl="xla")))
  with pytest.raises(ValueError, match=r"chunk_size .* traced: .*static_argnames=\['chunk_size'\]"):
    jax.jit(lambda c: linear_attention(q, k, v, chunk_size=c, impl="xla"))(16)
  with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
    linear_attention(q, k, v, chunk_size=jnp.float32(16.0), impl="xla")
  with pytest.raises(ValueError, match=r"power of two >= 16 for impl='pallas'.*48"):
    linear_attention(q, k, v, chunk_size=48, impl="pallas", interpret=True)


def test_rejects_log_decay_outside_its_domain():
  q, k, v, g, _ = _good()
  for impl in ("xla", "reference", "scan"):
    with pytest.raises(ValueError, match=r"log_decay must be <= 0.*0 NaN and 1 positive.*0.5"):
      linear_attention(q, k, v, _with(g, 0.5), impl=impl)
  with pytest.raises(ValueError, match=r"log_decay must be <= 0.*1 NaN and 0 positive"):
    linear_attention(q, k, v, _with(g, np.nan), impl="xla")
  # -inf is a full reset: the state before it is forgotten.
  reset = _with(g, -np.inf, t=4)
  o = linear_attention(q, k, v, reset, impl="xla")
  tail_g = np.where(np.isinf(reset[:, 4:]), 0.0, reset[:, 4:]).astype(g.dtype)  # S_0 = 0 anyway
  o_tail = linear_attention(q[:, 4:], k[:, 4:], v[:, 4:], tail_g, impl="xla")
  np.testing.assert_allclose(np.asarray(o)[:, 4:, 1], np.asarray(o_tail)[:, :, 1], rtol=1e-5,
                             atol=1e-6)
  # Traced values are not checked.
  out = jax.jit(lambda g: linear_attention(q, k, v, g, impl="xla"))(_with(g, 0.5))
  assert out.shape == v.shape


def _with(g, value, t=3):
  g = np.array(g)
  g[0, t, 1] = value
  return g


def test_exported_impls_check_their_inputs():
  # They are public (qsf_jax.kernels.__all__): a short k was zero-padded, a
  # one-head k broadcast and int inputs gave zeros, without an error.
  from qsf_jax.kernels import (chunked_linear_attention, reference_linear_attention,
                               scan_linear_attention)
  q, k, v, g, S0 = _good()
  for fn in (chunked_linear_attention, reference_linear_attention, scan_linear_attention):
    with pytest.raises(ValueError, match=r"k must have the shape of q"):
      fn(q, k[:, :5], v)
    with pytest.raises(ValueError, match=r"k must have the shape of q"):
      fn(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match=r"q must have a floating dtype"):
      fn(q.astype(np.int32), k.astype(np.int32), v.astype(np.int32))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(1, 2, 16, 8\)"):
      fn(q, k, v, g, S0[:, :1])
  for bad in (0, -4, 2.5):
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
      chunked_linear_attention(q, k, v, chunk_size=bad)
  # A reset (g = -inf) called directly, not only through linear_attention: it gave NaN.
  reset = _with(g, -np.inf, t=4)
  want = np.asarray(reference_linear_attention(q, k, v, reset)[0])
  got = np.asarray(chunked_linear_attention(q, k, v, reset, chunk_size=4)[0])
  assert np.all(np.isfinite(got)) and rel_rms_error(got, want) < 1e-5


def test_rejects_non_bool_flags():
  q, k, v, _, _ = _good()
  with pytest.raises(ValueError, match="return_final_state must be a bool.*'no'"):
    linear_attention(q, k, v, return_final_state="no", impl="xla")
  with pytest.raises(ValueError, match="interpret must be a bool.*1"):
    linear_attention(q, k, v, impl="pallas", interpret=1)


def test_rejects_empty_sequence():
  q, k, v, _, _ = _good()
  with pytest.raises(ValueError, match=r"at least one time step"):
    linear_attention(q[:, :0], k[:, :0], v[:, :0])


def test_pallas_without_interpret_needs_a_gpu():
  q, k, v, _, _ = _good()
  with pytest.raises(ValueError, match=r"[Ii]nterpret"):
    linear_attention(q, k, v, impl="pallas")


def test_pallas_rejects_float64(x64):
  q, k, v = (np.asarray(x, np.float64) for x in _good()[:3])
  with pytest.raises(ValueError, match=r"impl='pallas' supports .*float64"):
    linear_attention(q, k, v, impl="pallas", interpret=True)
