"""Chunk-parallel ("chunked") forward for the Pallas-Triton linear attention.

The fused forward (``pallas_kernels.fwd_kernel``) runs one program per (value
block, head, batch row) through all T/C chunks, each step with four matmuls,
the C x C decay mask and the output store on the serial path. This variant
follows FLA's ``chunk`` forward (kernels spec §2.1: ``chunk_fwd_h`` then
``chunk_fwd_o``) in two kernels:

1. ``states_kernel``, grid (Dv / BV, H, B), serial over chunks with one matmul
   per step (kernels spec §1.2):
     S_0 = h0,  S_{c+1} = exp(gamma_c) S_c + K_c^T diag(exp(gamma_c - b)) V_c,
   storing the state entering each chunk, S_c, in the input dtype (FLA keeps
   forward states in bf16; the fused kernel rounds S_c to the same dtype as an
   MMA operand) and S_T in float32.
2. ``out_kernel``, grid (T / C, H, B), one program per chunk, every value
   block in turn:
     A = (Q K^T) ⊙ M,  O = A V + diag(exp(b)) Q S_c.

The step arithmetic is the fused kernel's (``chunk_step``), so both forwards
give the same values. The price is HBM traffic: the states are written and read
back, 4 B H (T/C) Dk Dv bytes in bf16 (268 MB at B=H=8, T=4096, C=64, D=128,
against 268 MB for q, k, v and o), and k, v are read twice. Selected with
``pallas_linear_attention(..., forward="chunked")``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import roofline
from .block_specs import chunk_specs, sequence_specs
from .chunk_step import (_decay_mask, _dot, _dot_nt, _exp, _masked, _rows, _split_refs,
                         _store_chunk_states)

_F32 = jnp.float32


def states_kernel(*refs, C, NT, has_decay, has_h0, store_state, precision):
  """States entering each chunk for one (value block, head, batch row).

  Args:
    *refs: k (Tp, Dk), v (Tp, BV), [b (Tp,) chunk-local cumsums], [h0 (Dk, BV)]
      inputs; then S (NT, Dk, BV) in the input dtype, S[c] the state entering
      chunk c, and [ST (Dk, BV) float32] outputs.
    C: chunk length.
    NT: number of chunks (Tp / C).
    has_decay: whether a b ref is present (else g = 0).
    has_h0: whether an initial state is present.
    store_state: whether S_T is wanted (its increments are then kept to about
      16 bits, as in the fused forward, ``chunk_step._state_increment``).
    precision: dot precision (HIGHEST for float32 operands, else None).
  """
  (k_ref, v_ref), b_ref, h0_ref, _, rest = _split_refs(refs, 2, has_decay, has_h0)
  s_ref = rest[0]
  Dk = k_ref.shape[-1]
  BV = v_ref.shape[-1]

  S0_KV = h0_ref[...].astype(_F32) if has_h0 else jnp.zeros((Dk, BV), _F32)
  S_KV = _store_chunk_states(s_ref, k_ref, v_ref, b_ref, S0_KV, C=C, NT=NT,
                             precision=precision, split=store_state)
  if store_state:
    rest[1][...] = S_KV


def out_kernel(*refs, C, BV, has_decay, precision):
  """Outputs of one chunk of one (head, batch row), every value block.

  Args:
    *refs: q, k (C, Dk); v (C, Dv); [b (C,) float32 chunk-local cumsum];
      S (Dk, Dv) the state entering the chunk, in the input dtype; then the
      output o (C, Dv).
    C: chunk length.
    BV: value block walked inside the program (Dv / BV static steps).
    has_decay: whether b is present (else g = 0).
    precision: dot precision (HIGHEST for float32 operands, else None).
  """
  (q_ref, k_ref, v_ref), b_ref, _, _, (s_ref, o_ref) = _split_refs(refs, 3, has_decay, False)
  q_CK = q_ref[...]
  b_C = None if b_ref is None else b_ref[...].astype(_F32)
  A_CC = _masked(_dot_nt(q_CK, k_ref[...], precision), _decay_mask(b_C, C))
  A_CC = A_CC.astype(v_ref.dtype)
  e_C = _exp(b_C)
  for j in range(v_ref.shape[-1] // BV):  # static, unrolled
    cols = pl.ds(j * BV, BV)
    o_CV = _dot(A_CC, v_ref[:, cols], precision)
    o_CV += _rows(_dot(q_CK, s_ref[:, cols], precision), e_C)
    o_ref[:, cols] = o_CV.astype(o_ref.dtype)


def fwd_call_chunked(q, k, v, b, h0, *, chunk, block_v, launch, precision, store_state):
  """The chunked forward on padded inputs: ``states_kernel``, then ``out_kernel``.

  Arguments and results as ``pallas_kernels.fwd_call_fused`` (``block_v`` is
  the value block of both kernels); the bf16 chunk states in between cost
  2 B H (Tp / C) Dk Dv bytes.
  """
  B, Tp, H, Dk = q.shape
  Dv = v.shape[-1]
  C, BV = chunk, block_v
  NT, NV = Tp // C, Dv // BV
  has_decay = b is not None
  itemsize = jnp.dtype(q.dtype).itemsize
  state_bytes = B * H * NT * Dk * Dv * itemsize
  # 1. states, grid (NV, H, B), each program over the whole sequence.
  sp = sequence_specs(Tp, Dk, BV, NT)
  extra = [x for x in (b, h0) if x is not None]
  in_specs = [sp.qk, sp.v] + [sp.b] * has_decay + [sp.state] * (h0 is not None)
  out_shape = [jax.ShapeDtypeStruct((B, H, NT, Dk, Dv), q.dtype)]
  out_specs = [sp.chunk_states]
  if store_state:
    out_shape.append(jax.ShapeDtypeStruct((B, H, Dk, Dv), _F32))
    out_specs.append(sp.state)
  cost = pl.CostEstimate(
      flops=int(2 * B * H * Tp * Dk * Dv),
      transcendentals=int(B * H * Tp * NV) if has_decay else 0,
      bytes_accessed=int(B * H * Tp * (Dk * NV + Dv) * itemsize + state_bytes))
  kernel = functools.partial(states_kernel, C=C, NT=NT, has_decay=has_decay,
                             has_h0=h0 is not None, store_state=store_state,
                             precision=precision)
  outs = launch(kernel, (NV, H, B), in_specs, out_specs, out_shape,
                "linear_attention_fwd_states", cost)(k, v, *extra)
  # 2. outputs, grid (NT, H, B), one chunk per program.
  cs = chunk_specs(C, Dk, Dv)
  cost = pl.CostEstimate(
      flops=int(roofline.fwd_flops(B, H, Tp, Dk, Dv, C)),
      transcendentals=int(B * H * Tp * (C + 1)) if has_decay else 0,
      bytes_accessed=int(B * H * Tp * (2 * Dk + 2 * Dv) * itemsize + state_bytes))
  kernel = functools.partial(out_kernel, C=C, BV=BV, has_decay=has_decay,
                             precision=precision)
  o = launch(kernel, (NT, H, B),
             [cs.qk, cs.qk, cs.v] + [cs.b] * has_decay + [cs.state], [cs.v],
             [jax.ShapeDtypeStruct(v.shape, v.dtype)], "linear_attention_fwd_out", cost)(
                 q, k, v, *([b] if has_decay else []), outs[0])[0]
  return o, (outs[1] if store_state else None)
