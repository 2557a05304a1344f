"""Pallas (Triton backend) fused kernels for chunked causal linear attention.

The two kernel bodies and their launch wrappers (``fwd_call_fused``,
``bwd_call_fused``: block specs, output shapes, cost estimates).

Design (kernels spec §1.2-1.3, FLA ``fused_chunk``): one program per
(value block, head, batch row) walks the T/C chunks with ``lax.fori_loop`` and
keeps its (Dk, BV) slice of the state in float32 registers; the state never
goes to HBM. The backward is two sweeps in one program: a forward sweep that
recomputes the states for dq, then a reverse sweep carrying dS for dk and dv.

Triton rules obeyed here (spec §3.2): every loaded/stored tile is a power of
two with dims >= 16 (the wrapper pads T to a multiple of C and Dk/Dv to powers
of two); values are never indexed or sliced (``_gamma`` loads a scalar from the ref);
loops are ``fori_loop`` without ``xs`` or ``reverse``; the reverse sweep walks
with index arithmetic; refs, not values, are sliced with ``pl.ds``.

Kernel refs, per program (the BlockSpecs squeeze batch and head):
  q, k: (Tp, Dk) input dtype; v, do: (Tp, BV); b: (Tp,) float32 chunk-local
  cumsum of g; h0, dST: (Dk, BV) float32; o: (Tp, BV); ST, dh0: (Dk, BV)
  float32; dq, dk: (Tp, Dk) partial sums over value blocks; dv: (Tp, BV);
  dgq, dgk: (Tp,) float32 partial q.dq and k.dk.

Without decay (``log_decay=None``, the QSF measurement term) the kernels are
compiled with ``has_decay=False``: no b ref and no dgq/dgk outputs, M is the
boolean causal mask applied with a select, and every exp(.) factor is dropped
(b == 0), so the chunk step does no transcendental work at all; with no dG to
protect, the backward casts the state to the input dtype as an MMA operand
(``chunk_step._dot_nt_state``). ``b_C`` and gamma are then None in the
helpers of ``chunk_step``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import roofline
from .block_specs import sequence_specs, value_block
from .chunk_step import (_chunk_slice, _decay_mask, _dot, _dot_nt, _dot_nt_state, _exp, _gamma,
                         _load_b, _masked, _off_diagonal, _rows, _run_sweeps, _split_refs,
                         _state_grad_step, _state_step, _weights)

_F32 = jnp.float32


def fwd_kernel(*refs, C, NT, has_decay, has_h0, store_state, precision):
  """Forward sweep: kernels spec §1.2 for one (value block, head, batch row).

  Per chunk c, with b the chunk-local cumsum and gamma_c = b_{C-1}:
    A = (Q K^T) ⊙ M,  O = A V + diag(exp(b)) Q S_c,
    S_{c+1} = exp(gamma_c) S_c + K^T diag(exp(gamma_c - b)) V
  (the last product to about 16 bits when S_T is stored, see
  ``chunk_step._state_increment``).

  Args:
    *refs: q (Tp, Dk), k (Tp, Dk), v (Tp, BV), [b (Tp,)], [h0 (Dk, BV)] inputs,
      then o (Tp, BV) and [ST (Dk, BV)] outputs.
    C: chunk length.
    NT: number of chunks (Tp / C).
    has_decay: whether a b ref is present (else g = 0, see the module docstring).
    has_h0: whether an initial-state ref is present.
    store_state: whether a final-state ref is present.
    precision: dot precision (HIGHEST for float32 operands, else None).
  """
  (q_ref, k_ref, v_ref), b_ref, h0_ref, _, rest = _split_refs(refs, 3, has_decay, has_h0)
  o_ref = rest.pop(0)
  st_ref = rest.pop(0) if store_state else None
  Dk = q_ref.shape[-1]
  BV = v_ref.shape[-1]

  def body(c, S_KV):
    sl = _chunk_slice(c, C)
    q_CK, k_CK, v_CV = q_ref[sl], k_ref[sl], v_ref[sl]
    b_C = _load_b(b_ref, sl)
    A_CC = _masked(_dot_nt(q_CK, k_CK, precision), _decay_mask(b_C, C))
    o_CV = _dot(A_CC.astype(v_CV.dtype), v_CV, precision)
    o_CV += _rows(_dot(q_CK, S_KV.astype(q_CK.dtype), precision), _exp(b_C))
    o_ref[sl] = o_CV.astype(o_ref.dtype)
    return _state_step(S_KV, k_CK, v_CV, b_C, _gamma(b_ref, c, C), precision,
                       split=store_state)

  S0_KV = h0_ref[...].astype(_F32) if has_h0 else jnp.zeros((Dk, BV), _F32)
  S_KV = lax.fori_loop(0, NT, body, S0_KV)
  if store_state:
    st_ref[...] = S_KV.astype(st_ref.dtype)


def bwd_kernel(*refs, C, NT, has_decay, has_h0, has_dst, precision, NV=None,
               diagonal_last=False):
  """Backward sweeps: kernels spec §1.3 for one (value block, head, batch row).

  With dA = (dO V^T) ⊙ M and dS_{c+1} the gradient of the state leaving chunk c
  (dS_NT = dS_T or 0; the reverse sweep forms A^T and dA^T directly, see
  ``_decay_mask``):
    dQ   = dA K + diag(exp(b)) dO S_c^T                   (forward sweep)
    dK   = dA^T Q + diag(exp(gamma_c - b)) V dS_{c+1}^T   (reverse sweep)
    dV   = A^T dO + diag(exp(gamma_c - b)) K dS_{c+1}
    dS_c = exp(gamma_c) dS_{c+1} + (diag(exp(b)) Q)^T dO,  dh0 = dS_0.
  dQ, dK (and q.dq, k.dk for the decay gradient dG_t = q_t.dq_t - k_t.dk_t) are
  partial sums over value blocks; dV and dh0 are exact for this block.

  Args:
    *refs: q, k (Tp, Dk), v, do (Tp, BV), [b (Tp,)], [h0 (Dk, BV)], [dST (Dk, BV)]
      inputs, then dq, dk (Tp, Dk), dv (Tp, BV), [dgq, dgk (Tp,)], [dh0 (Dk, BV)].
    C: chunk length.
    NT: number of chunks (Tp / C).
    has_decay: whether b is present and dgq, dgk are wanted (else g = 0).
    has_h0: whether the initial state is present (and dh0 is wanted).
    has_dst: whether a final-state cotangent is present.
    precision: dot precision (HIGHEST for float32 operands, else None).
    NV: None runs both sweeps in this program, one after the other. An int
      (the number of value blocks) splits them: on the grid (2 NV, H, B),
      program j < NV runs the forward sweep of value block j and program
      NV + j its reverse sweep. The sweeps share nothing but the inputs and
      write disjoint outputs, so the results are the same to the bit, with
      twice the programs and half the serial chain each.
    diagonal_last: with decay, take q.dq and k.dk before the diagonal of dA
      joins dQ and dK (``chunk_step._off_diagonal``; ``decay_grad="pairs"``):
      the undecayed pairs (t, t) then no longer cancel in dG, where their
      rounding dominates a strongly decaying head's dg.
  """
  (q_ref, k_ref, v_ref, do_ref), b_ref, h0_ref, dst_ref, rest = _split_refs(
      refs, 4, has_decay, has_h0, has_dst)
  dq_ref, dk_ref, dv_ref = rest[:3]
  dgq_ref, dgk_ref = rest[3:5] if has_decay else (None, None)
  dh0_ref = rest[-1] if has_h0 else None
  Dk = q_ref.shape[-1]
  BV = v_ref.shape[-1]

  def fwd_body(c, S_KV):
    sl = _chunk_slice(c, C)
    q_CK, k_CK, v_CV, do_CV = q_ref[sl], k_ref[sl], v_ref[sl], do_ref[sl]
    b_C = _load_b(b_ref, sl)
    dA_CC = _masked(_dot_nt(do_CV, v_CV, precision), _decay_mask(b_C, C))
    if has_decay and diagonal_last:  # the diagonal joins dq after q.dq
      dA_CC, dAd_C = _off_diagonal(dA_CC, C)
    dq_CK = _dot(dA_CC.astype(k_CK.dtype), k_CK, precision)
    dq_CK += _rows(_dot_nt_state(do_CV, S_KV, precision, has_decay), _exp(b_C))
    if has_decay:
      dgq_ref[sl] = jnp.sum(q_CK.astype(_F32) * dq_CK, axis=1)
      if diagonal_last:
        dq_CK += _rows(k_CK.astype(_F32), dAd_C)
    dq_ref[sl] = dq_CK.astype(dq_ref.dtype)
    return _state_step(S_KV, k_CK, v_CV, b_C, _gamma(b_ref, c, C), precision)

  def forward_sweep():
    S0_KV = h0_ref[...].astype(_F32) if has_h0 else jnp.zeros((Dk, BV), _F32)
    lax.fori_loop(0, NT, fwd_body, S0_KV)

  def bwd_body(i, dS_KV):
    c = NT - 1 - i
    sl = _chunk_slice(c, C)
    q_CK, k_CK, v_CV, do_CV = q_ref[sl], k_ref[sl], v_ref[sl], do_ref[sl]
    b_C = _load_b(b_ref, sl)
    b_last = _gamma(b_ref, c, C)
    Mt_CC = _decay_mask(b_C, C, transpose=True)
    w_C = _weights(b_C, b_last)
    At_CC = _masked(_dot_nt(k_CK, q_CK, precision), Mt_CC).astype(do_CV.dtype)
    dv_CV = (_dot(At_CC, do_CV, precision)
             + _rows(_dot(k_CK, dS_KV.astype(k_CK.dtype), precision), w_C))
    dv_ref[sl] = dv_CV.astype(dv_ref.dtype)
    dAt_CC = _masked(_dot_nt(v_CV, do_CV, precision), Mt_CC)
    if has_decay and diagonal_last:  # the diagonal joins dk after k.dk
      dAt_CC, dAd_C = _off_diagonal(dAt_CC, C)
    dk_CK = (_dot(dAt_CC.astype(q_CK.dtype), q_CK, precision)
             + _rows(_dot_nt_state(v_CV, dS_KV, precision, has_decay), w_C))
    if has_decay:
      dgk_ref[sl] = jnp.sum(k_CK.astype(_F32) * dk_CK, axis=1)
      if diagonal_last:
        dk_CK += _rows(q_CK.astype(_F32), dAd_C)
    dk_ref[sl] = dk_CK.astype(dk_ref.dtype)
    return _state_grad_step(dS_KV, q_CK, do_CV, b_C, b_last, precision)

  def reverse_sweep():
    dS0_KV = dst_ref[...].astype(_F32) if has_dst else jnp.zeros((Dk, BV), _F32)
    dS_KV = lax.fori_loop(0, NT, bwd_body, dS0_KV)
    if has_h0:
      dh0_ref[...] = dS_KV.astype(dh0_ref.dtype)

  _run_sweeps(forward_sweep, reverse_sweep, NV)


def fwd_call_fused(q, k, v, b, h0, *, chunk, block_v, launch, precision, store_state):
  """The fused forward on padded inputs: grid (Dv / BV, H, B) over ``fwd_kernel``.

  Args:
    q, k: (B, Tp, H, Dk); v: (B, Tp, H, Dv), Tp a multiple of ``chunk``.
    b: (B, Tp, H) float32 chunk-local cumsums of g, or None (no decay).
    h0: (B, H, Dk, Dv) float32 initial state, or None.
    chunk: C.
    block_v: value block BV (divides Dv).
    launch: ``(kernel, grid, in_specs, out_specs, out_shape, name, cost) ->
      callable``, the Triton launcher with the forward's settings.
    precision: dot precision.
    store_state: whether to return S_T.

  Returns:
    (o (B, Tp, H, Dv) in v's dtype, S_T (B, H, Dk, Dv) float32 or None).
  """
  B, Tp, H, Dk = q.shape
  Dv = v.shape[-1]
  C, BV = chunk, block_v
  NV = Dv // BV
  sp = sequence_specs(Tp, Dk, BV)
  extra = [x for x in (b, h0) if x is not None]
  in_specs = [sp.qk, sp.qk, sp.v] + [sp.b] * (b is not None) + [sp.state] * (h0 is not None)
  out_shape = [jax.ShapeDtypeStruct((B, Tp, H, Dv), v.dtype)]
  out_specs = [sp.v]
  if store_state:
    out_shape.append(jax.ShapeDtypeStruct((B, H, Dk, Dv), _F32))
    out_specs.append(sp.state)
  kernel = functools.partial(fwd_kernel, C=C, NT=Tp // C, has_decay=b is not None,
                             has_h0=h0 is not None, store_state=store_state,
                             precision=precision)
  itemsize = jnp.dtype(q.dtype).itemsize
  cost = pl.CostEstimate(
      flops=int(roofline.fwd_flops(B, H, Tp, Dk, Dv, C)),
      transcendentals=int(B * H * Tp * (C + 2) * NV) if b is not None else 0,
      bytes_accessed=int(roofline.fwd_bytes(B, H, Tp, Dk, Dv, C, elem_bytes=itemsize)))
  outs = launch(kernel, (NV, H, B), in_specs, out_specs, out_shape, "linear_attention_fwd",
                cost)(q, k, v, *extra)
  return outs[0], (outs[1] if store_state else None)


def bwd_call_fused(q, k, v, do, b, h0, dST, *, chunk, block_v, launch, precision,
                   split_sweeps=False, diagonal_last=False):
  """The fused backward on padded inputs: grid (Dv / BV, H, B) over ``bwd_kernel``.

  dq, dk (and dG) come out of the kernel as partial sums over the value blocks,
  in float32 when there are several, and are summed here. With
  ``split_sweeps`` the grid is (2 Dv / BV, H, B): the forward and reverse
  sweeps of each value block run in separate programs (same results).

  Args:
    q, k: (B, Tp, H, Dk); v, do: (B, Tp, H, Dv), Tp a multiple of ``chunk``.
    b: (B, Tp, H) float32 chunk-local cumsums of g, or None (no decay).
    h0: (B, H, Dk, Dv) float32 initial state, or None.
    dST: (B, H, Dk, Dv) float32 final-state cotangent, or None.
    chunk: C.
    block_v: value block BV (divides Dv).
    launch: the Triton launcher with the backward's settings (see fwd_call_fused).
    precision: dot precision.
    split_sweeps: run the two sweeps in separate programs.
    diagonal_last: see ``bwd_kernel``.

  Returns:
    (dq, dk, dv, dG (B, Tp, H) float32 or None without decay, dh0 (B, H, Dk,
    Dv) float32 or None).
  """
  B, Tp, H, Dk = q.shape
  Dv = v.shape[-1]
  C, BV = chunk, block_v
  NV = Dv // BV
  has_decay = b is not None
  part_dtype = q.dtype if NV == 1 else _F32  # partial dq/dk are summed in float32
  split = NV if split_sweeps else None
  sp = sequence_specs(Tp, Dk, BV, NV=split)
  part_spec = pl.BlockSpec((None, None, Tp, None, Dk),
                           lambda j, h, bb: (value_block(j, split), bb, 0, h, 0))
  dg_spec = pl.BlockSpec((None, None, Tp, None),
                         lambda j, h, bb: (value_block(j, split), bb, 0, h))
  extra = [x for x in (b, h0, dST) if x is not None]
  in_specs = [sp.qk, sp.qk, sp.v, sp.v] + [sp.b] * has_decay
  in_specs += [sp.state] * (len(extra) - has_decay)
  out_shape = [jax.ShapeDtypeStruct((NV, B, Tp, H, Dk), part_dtype),
               jax.ShapeDtypeStruct((NV, B, Tp, H, Dk), part_dtype),
               jax.ShapeDtypeStruct((B, Tp, H, Dv), v.dtype)]
  out_specs = [part_spec, part_spec, sp.v]
  if has_decay:
    out_shape += [jax.ShapeDtypeStruct((NV, B, Tp, H), _F32)] * 2
    out_specs += [dg_spec, dg_spec]
  if h0 is not None:
    out_shape.append(jax.ShapeDtypeStruct((B, H, Dk, Dv), _F32))
    out_specs.append(sp.state)
  kernel = functools.partial(bwd_kernel, C=C, NT=Tp // C, has_decay=has_decay,
                             has_h0=h0 is not None, has_dst=dST is not None,
                             precision=precision, NV=split, diagonal_last=diagonal_last)
  itemsize = jnp.dtype(q.dtype).itemsize
  cost = pl.CostEstimate(
      flops=int(roofline.bwd_flops(B, H, Tp, Dk, Dv, C)),
      transcendentals=int(B * H * Tp * (2 * C + 4) * NV) if has_decay else 0,
      bytes_accessed=int(roofline.bwd_bytes(B, H, Tp, Dk, Dv, C, elem_bytes=itemsize)))
  outs = launch(kernel, (2 * NV if split_sweeps else NV, H, B), in_specs, out_specs,
                out_shape, "linear_attention_bwd", cost)(q, k, v, do, *extra)
  dq_parts, dk_parts, dv = outs[:3]
  dq = dq_parts[0] if NV == 1 else jnp.sum(dq_parts, axis=0)
  dk = dk_parts[0] if NV == 1 else jnp.sum(dk_parts, axis=0)
  dG = jnp.sum(outs[3] - outs[4], axis=0) if has_decay else None
  return dq, dk, dv, dG, (outs[-1] if h0 is not None else None)
