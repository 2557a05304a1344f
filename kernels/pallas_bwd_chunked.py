"""Chunk-parallel ("chunked") backward for the Pallas-Triton linear attention.

The fused backward (``pallas_kernels.bwd_kernel``) runs one program per (value
block, head, batch row) through two sweeps of ~13 small matmuls per chunk, and
sums dq, dk over value blocks in float32 outside the kernel. This variant
follows FLA's ``chunk`` design (kernels spec §2.1: ``chunk_fwd_h`` recompute,
``chunk_bwd_dh``, then ``chunk_bwd_dqkwg``/``chunk_bwd_dv``, parallel over
chunks) in two kernels:

1. ``states_kernel``, grid (Dv / BV, H, B), sequential over chunks but with one
   matmul per chunk and sweep: it writes the state entering each chunk,
   S_c, and the gradient of the state leaving it, dS_{c+1}, to HBM in float32
   (spec §1.3):
     S_0 = h0,       S_{c+1} = exp(gamma_c) S_c + K_c^T diag(exp(gamma_c - b)) V_c,
     dS_NT = dS_T,   dS_c    = exp(gamma_c) dS_{c+1} + (diag(exp(b)) Q_c)^T dO_c,
   and dh0 = dS_0.
2. ``grads_kernel``, grid (T / C, H, B), one program per chunk with every value
   block in registers, so dq and dk are complete (no partial sums):
     A  = (Q K^T) ⊙ M,  dA = (dO V^T) ⊙ M,
     dQ = dA K + diag(exp(b)) dO S_c^T,
     dK = dA^T Q + diag(exp(gamma_c - b)) V dS_{c+1}^T,
     dV = A^T dO + diag(exp(gamma_c - b)) K dS_{c+1},
     dG_t = q_t . dq_t - k_t . dk_t
   (with ``decay_grad="pairs"``, q.dq and k.dk are taken before the diagonal
   of dA joins dQ and dK, ``chunk_step._off_diagonal``).

It trades HBM traffic (two (T/C, Dk, Dv) state tensors written and read
back) for T/C times more programs and short serial chains. Products with the
float32 states keep them to about 16 bits for 16-bit inputs with decay, as the
fused backward does (``chunk_step._dot_nt_state``). Without decay (b None)
both kernels drop the b ref, every exp(.) factor and the dG output, as the
fused kernels do, and for 16-bit inputs the states are stored in the input
dtype (``state_store_dtype``): the grads kernel rounds every state to that
dtype as an MMA operand anyway, so the results are the same to the bit and the
state traffic halves. Selected with ``pallas_linear_attention(...,
backward="chunked")``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import roofline
from .block_specs import chunk_specs, sequence_specs
from .chunk_step import (_chunk_slice, _decay_mask, _dot, _dot_nt, _dot_nt_state, _dot_tn, _exp,
                         _gamma, _load_b, _masked, _off_diagonal, _rows, _run_sweeps,
                         _split_refs, _state_grad_step, _store_chunk_states, _weights)

_F32 = jnp.float32


def state_store_dtype(dtype, has_decay: bool) -> jnp.dtype:
  """dtype of the chunk states S_c and dS_{c+1} that the chunked backward stores.

  With decay, or for float32 inputs, float32: dG needs the states to about 16
  bits (``chunk_step._dot_nt_state``). Without decay and with 16-bit inputs,
  the input dtype: every product with a state then takes it rounded to the
  input dtype as an MMA operand, so rounding when storing instead of when
  loading gives the same bits and halves the state traffic (kernels spec §7: each
  stored state array takes (T/C) Dk Dv elements per (b, h), 2 bytes each in bf16
  against 4 in float32, written once and read once).

  Args:
    dtype: dtype of q, k, v.
    has_decay: whether a log-decay is present.
  """
  dtype = jnp.dtype(dtype)
  return jnp.dtype(_F32) if has_decay or dtype.itemsize >= 4 else dtype


def states_kernel(*refs, C, NT, has_decay, has_h0, has_dst, precision, NV=None):
  """Chunk-boundary states and state gradients for one (value block, head, batch row).

  Kernels spec §1.2-1.3 (the two recurrences are in the module docstring).

  Args:
    *refs: q, k (Tp, Dk), v, do (Tp, BV), [b (Tp,) chunk-local cumsums],
      [h0 (Dk, BV)], [dST (Dk, BV)] inputs; then S (NT, Dk, BV) with S[c] the
      state entering chunk c, dS (NT, Dk, BV) with dS[c] the gradient of the
      state leaving chunk c (both in ``state_store_dtype``), and [dh0 (Dk, BV)
      float32] outputs.
    C: chunk length.
    NT: number of chunks (Tp / C).
    has_decay: whether a b ref is present (else g = 0).
    has_h0: whether an initial state is present (and dh0 is wanted).
    has_dst: whether a final-state cotangent is present.
    precision: dot precision (HIGHEST for float32 operands, else None).
    NV: None runs both sweeps here; the number of value blocks splits them
      over the grid (2 NV, H, B) as ``pallas_kernels.bwd_kernel`` does.
  """
  (q_ref, k_ref, v_ref, do_ref), b_ref, h0_ref, dst_ref, rest = _split_refs(
      refs, 4, has_decay, has_h0, has_dst)
  s_ref, ds_ref = rest[:2]
  dh0_ref = rest[2] if has_h0 else None
  Dk = q_ref.shape[-1]
  BV = v_ref.shape[-1]

  def forward_sweep():
    S0_KV = h0_ref[...].astype(_F32) if has_h0 else jnp.zeros((Dk, BV), _F32)
    _store_chunk_states(s_ref, k_ref, v_ref, b_ref, S0_KV, C=C, NT=NT, precision=precision)

  def bwd_body(i, dS_KV):
    c = NT - 1 - i
    ds_ref[c] = dS_KV.astype(ds_ref.dtype)
    sl = _chunk_slice(c, C)
    return _state_grad_step(dS_KV, q_ref[sl], do_ref[sl], _load_b(b_ref, sl),
                            _gamma(b_ref, c, C), precision)

  def reverse_sweep():
    dS0_KV = dst_ref[...].astype(_F32) if has_dst else jnp.zeros((Dk, BV), _F32)
    dS_KV = lax.fori_loop(0, NT, bwd_body, dS0_KV)
    if has_h0:
      dh0_ref[...] = dS_KV

  _run_sweeps(forward_sweep, reverse_sweep, NV)


def grads_kernel(*refs, C, BV, has_decay, precision, diagonal_last=False):
  """dq, dk, dv and dG of one chunk of one (head, batch row), every value block.

  Kernels spec §1.3 with the states of ``states_kernel`` (module docstring).

  Args:
    *refs: q, k (C, Dk) chunks of q and k; v, do (C, Dv) chunks of v and the
      output cotangent; [b (C,) float32 chunk-local cumsum of g]; S (Dk, Dv)
      state entering the chunk; dS (Dk, Dv) gradient of the state leaving it
      (both in ``state_store_dtype``); then dq, dk (C, Dk), dv (C, Dv) and
      [dG (C,) float32, dG_t = q_t . dq_t - k_t . dk_t] outputs.
    C: chunk length.
    BV: value block walked inside the program (Dv / BV static steps).
    has_decay: whether b is present and dG is wanted (else g = 0).
    precision: dot precision (HIGHEST for float32 operands, else None).
    diagonal_last: see ``pallas_kernels.bwd_kernel``.
  """
  (q_ref, k_ref, v_ref, do_ref), b_ref, _, _, rest = _split_refs(refs, 4, has_decay, False)
  s_ref, ds_ref, dq_ref, dk_ref, dv_ref = rest[:5]
  q_CK, k_CK = q_ref[...], k_ref[...]
  Dk = q_CK.shape[-1]
  Dv = v_ref.shape[-1]
  b_C = None if b_ref is None else b_ref[...].astype(_F32)
  M_CC = _decay_mask(b_C, C)
  blocks = [pl.ds(j * BV, BV) for j in range(Dv // BV)]  # static, unrolled
  # Two passes over the value blocks keep one (C, Dk) float32 accumulator live at a
  # time (fewer spills at Dk = 128); the second reloads v, do and the states.
  dA_CC = jnp.zeros((C, C), _F32)
  dq_CK = jnp.zeros((C, Dk), _F32)
  for cols in blocks:
    do_CV = do_ref[:, cols]
    dA_CC += _dot_nt(do_CV, v_ref[:, cols], precision)
    dq_CK += _dot_nt_state(do_CV, s_ref[:, cols], precision, has_decay)
  dA_CC = _masked(dA_CC, M_CC)
  if has_decay and diagonal_last:  # the diagonal joins dq, dk after q.dq, k.dk
    dA_CC, dAd_C = _off_diagonal(dA_CC, C)
  dA_CC = dA_CC.astype(q_CK.dtype)
  dq_CK = _dot(dA_CC, k_CK, precision) + _rows(dq_CK, _exp(b_C))
  if has_decay:  # q.dq now, so that dq_CK is dead during the second pass
    dgq_C = jnp.sum(q_CK.astype(_F32) * dq_CK, axis=1)
    if diagonal_last:
      dq_CK += _rows(k_CK.astype(_F32), dAd_C)
  dq_ref[...] = dq_CK.astype(dq_ref.dtype)

  w_C = _weights(b_C, _gamma(b_ref, 0, C))
  A_CC = _masked(_dot_nt(q_CK, k_CK, precision), M_CC).astype(v_ref.dtype)
  dk_CK = jnp.zeros((C, Dk), _F32)
  for cols in blocks:
    v_CV, do_CV, dS_KV = v_ref[:, cols], do_ref[:, cols], ds_ref[:, cols]
    dk_CK += _dot_nt_state(v_CV, dS_KV, precision, has_decay)
    dv_CV = (_dot_tn(A_CC, do_CV, precision)
             + _rows(_dot(k_CK, dS_KV.astype(k_CK.dtype), precision), w_C))
    dv_ref[:, cols] = dv_CV.astype(dv_ref.dtype)
  dk_CK = _dot_tn(dA_CC, q_CK, precision) + _rows(dk_CK, w_C)
  if has_decay:
    rest[5][...] = dgq_C - jnp.sum(k_CK.astype(_F32) * dk_CK, axis=1)
    if diagonal_last:
      dk_CK += _rows(q_CK.astype(_F32), dAd_C)
  dk_ref[...] = dk_CK.astype(dk_ref.dtype)


def bwd_call_chunked(q, k, v, do, b, h0, dST, *, chunk, block_v, launch, precision,
                     split_sweeps=False, diagonal_last=False):
  """The chunked backward on padded inputs: ``states_kernel``, then ``grads_kernel``.

  Arguments and results as ``pallas_kernels.bwd_call_fused`` (``block_v`` is
  the value block of both kernels); dq, dk and dG come out complete, with no
  partial sums, at the cost of 2 B H (Tp / C) Dk Dv states in
  ``state_store_dtype`` (float32, or the 16-bit input dtype without decay).
  ``split_sweeps`` runs the states kernel's two sweeps in separate programs;
  ``diagonal_last`` as ``pallas_kernels.bwd_kernel``.
  """
  B, Tp, H, Dk = q.shape
  Dv = v.shape[-1]
  C, BV = chunk, block_v
  NT, NV = Tp // C, Dv // BV
  has_decay = b is not None
  f32 = lambda *s: jax.ShapeDtypeStruct(s, _F32)
  state_dtype = state_store_dtype(q.dtype, has_decay)
  # 1. states, grid (NV, H, B) or (2 NV, H, B), each program over the whole sequence.
  split = NV if split_sweeps else None
  sp = sequence_specs(Tp, Dk, BV, NT, NV=split)
  extra = [x for x in (b, h0, dST) if x is not None]
  in_specs = [sp.qk, sp.qk, sp.v, sp.v] + [sp.b] * has_decay
  in_specs += [sp.state] * (len(extra) - has_decay)
  out_shape = [jax.ShapeDtypeStruct((B, H, NT, Dk, Dv), state_dtype)] * 2
  out_specs = [sp.chunk_states, sp.chunk_states]
  if h0 is not None:
    out_shape.append(f32(B, H, Dk, Dv))
    out_specs.append(sp.state)
  itemsize = jnp.dtype(q.dtype).itemsize
  state_bytes = 2 * B * H * NT * Dk * Dv * state_dtype.itemsize
  cost = pl.CostEstimate(
      flops=int(4 * B * H * Tp * Dk * Dv),
      transcendentals=int(2 * B * H * Tp * NV) if has_decay else 0,
      bytes_accessed=int(B * H * Tp * (2 * Dk * NV + 2 * Dv) * itemsize + state_bytes))
  kernel = functools.partial(states_kernel, C=C, NT=NT, has_decay=has_decay,
                             has_h0=h0 is not None, has_dst=dST is not None,
                             precision=precision, NV=split)
  outs = launch(kernel, (2 * NV if split_sweeps else NV, H, B), in_specs, out_specs,
                out_shape, "linear_attention_bwd_states", cost)(q, k, v, do, *extra)
  S_BHNKV, dS_BHNKV = outs[:2]
  dh0 = outs[2] if h0 is not None else None
  # 2. gradients, grid (NT, H, B), one chunk per program.
  cs = chunk_specs(C, Dk, Dv)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct(v.shape, v.dtype)] + [f32(B, Tp, H)] * has_decay
  cost = pl.CostEstimate(
      flops=int(roofline.bwd_flops(B, H, Tp, Dk, Dv, C)),
      transcendentals=int(B * H * Tp * (C + 2)) if has_decay else 0,
      bytes_accessed=int(B * H * Tp * (3 * Dk + 3 * Dv) * itemsize + state_bytes))
  kernel = functools.partial(grads_kernel, C=C, BV=BV, has_decay=has_decay,
                             precision=precision, diagonal_last=diagonal_last)
  in_specs = [cs.qk, cs.qk, cs.v, cs.v] + [cs.b] * has_decay + [cs.state, cs.state]
  outs = launch(kernel, (NT, H, B), in_specs,
                [cs.qk, cs.qk, cs.v] + [cs.b] * has_decay, out_shape,
                "linear_attention_bwd_grads", cost)(
                    q, k, v, do, *([b] if has_decay else []), S_BHNKV, dS_BHNKV)
  dq, dk, dv = outs[:3]
  return dq, dk, dv, (outs[3] if has_decay else None), dh0
