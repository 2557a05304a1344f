"""Building blocks of the chunk step shared by the Pallas kernel bodies.

Each is a jnp function of the tiles of one chunk (kernels spec §1.2-1.4),
traced inside ``pallas_kernels`` and ``pallas_bwd_chunked`` and lowered to
Triton. Notation: b_C the chunk-local cumsum of g (C,) in float32 and
b_last = gamma_c = b_{C-1}; both are None without decay (g = 0), and every
helper then drops its exp(.) factors.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_F32 = jnp.float32


def _dot(a, b, precision):
  """a @ b with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=_F32)


def _dot_tn(a, b, precision):
  """a^T @ b (contracting dim 0 of both; lowered as tt.trans + dot)."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=_F32)


def _dot_nt(a, b, precision):
  """a @ b^T (contracting dim 1 of both)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=_F32)


def _gamma(b_ref, c, C):
  """gamma_c = b[c C + C - 1], the last chunk-local cumsum of chunk c, in float32.

  A scalar load from the ref: Triton cannot index a register tensor, and a
  masked reduction of the loaded chunk would add cross-warp barriers to every
  step of the serial chunk loop (11 -> 8 ``bar.sync`` in the forward's PTX).
  None without decay (``b_ref`` None).
  """
  return None if b_ref is None else b_ref[c * C + C - 1].astype(_F32)


def _load_b(b_ref, sl):
  """The chunk's float32 cumsums b (C,) from the ref, or None without decay."""
  return None if b_ref is None else b_ref[sl].astype(_F32)


_LOG2_E = 1.4426950408889634


def _exp(x):
  """exp(x) = exp2(x log2 e) in float32; None (the factor 1 of b == 0) for x None.

  On GPU ``exp2`` is one ``ex2.approx`` instruction, while ``exp`` lowers to
  libdevice ``__nv_expf``, a range reduction around the same instruction (8
  instructions per element; the C x C mask takes one exp per entry and chunk
  step): 22% fewer PTX instructions in the D = 128 forward, 17% in the fused
  backward. The product scales the exponent itself (a difference of cumsums),
  not the cumsums: FLA pre-scales b by 1 / ln 2 (kernels spec §1.4), but then
  each rounded b carries an absolute error proportional to |b|, which strong
  decays make large (S_T rel. error 1.8e-5 > 1e-5 at g ~ U[-20, 0], float32).
  """
  return None if x is None else jnp.exp2(x * _LOG2_E)


def _rows(x, e_C):
  """diag(e) x: scales row i of x by e_i; x itself for e None (no decay)."""
  return x if e_C is None else x * e_C[:, None]


def _weights(b_C, b_last):
  """w = exp(gamma_c - b) (C,), the decay from each step to the chunk end, or None."""
  return None if b_C is None else _exp(b_last - b_C)


def _hi_lo(x_f32, dtype):
  """x = hi + lo with both halves in ``dtype`` (about twice its mantissa bits)."""
  hi = x_f32.astype(dtype)
  return hi, (x_f32 - hi.astype(_F32)).astype(dtype)


def _dot_f32_operand(dot, a, x_f32, precision, split):
  """dot(a, x) for a float32 x and an MMA operand a (``dot`` is _dot_nt or _dot_tn).

  Float32 ``a`` takes x as is. Otherwise x is rounded to a's dtype as an MMA
  operand, or with ``split`` kept to about 16 bits as x_hi + x_lo in a's dtype,
  two MMAs summed in float32.
  """
  if a.dtype == _F32:
    return dot(a, x_f32, precision)
  if not split:
    return dot(a, x_f32.astype(a.dtype), precision)
  x_hi, x_lo = _hi_lo(x_f32, a.dtype)
  return dot(a, x_hi, precision) + dot(a, x_lo, precision)


def _dot_nt_state(a, S_f32, precision, split):
  """a @ S^T, with the float32 state S kept to about 16 mantissa bits if ``split``.

  With ``split`` and bf16/f16 ``a``, S is split as S = S_hi + S_lo with both
  halves in a's dtype and the two products are summed in float32 (two MMAs
  instead of one). A plain cast of S rounds it to 8 bits; in the backward that
  error does not cancel in the decay gradient dG_t = q_t.dq_t - k_t.dk_t, and
  with strong decays it dominates dg (kernels spec §1.4: FLA keeps backward
  states in float32). Without decay there is no dG and the kernels cast S as
  an MMA operand, the spec's recipe: dq, dk then carry the bf16 error of dv
  (2.9e-3 against 2.4e-3 split, B1 T512 H2 D64) and the backward saves the
  second MMA of every product with a state. Float32 ``a`` uses S as is.
  """
  return _dot_f32_operand(_dot_nt, a, S_f32, precision, split)


def _state_increment(k_CK, vd_CV, precision, split):
  """K^T Vd, the state increment of one chunk (Vd = decay-scaled values, float32).

  The decay scales the values, not the keys: K^T then comes straight from the
  shared-memory tile that Q K^T already uses (a transposed MMA operand), and only
  the (C, BV) scaled values pass through registers, where scaled keys would
  send a (C, Dk) tile through registers and back to shared memory every step
  (12% fewer PTX instructions in the D=128 forward). Vd is rounded to K's dtype
  as an MMA operand (kernels spec §1.4). With ``split`` (bf16/f16 only)
  Vd = Vd_hi + Vd_lo is kept to about 16 bits by two MMAs. The forward does
  this when it returns S_T: the backward adds <S_T, dS_T> to dG at the last
  step, and the reverse cumsum of dG then subtracts the backward's own k.dk
  terms from it; an 8-bit S_T would leave its rounding in every dg_t (seen with
  extreme decays, where the difference is small).
  """
  return _dot_f32_operand(_dot_tn, k_CK, vd_CV, precision, split)


def _state_step(S_KV, k_CK, v_CV, b_C, b_last, precision, split=False):
  """S_{c+1} = exp(gamma_c) S_c + K^T diag(exp(gamma_c - b)) V (spec §1.2).

  gamma_c = b_last; the increment is rounded as ``_state_increment`` says.
  Without decay (b_C None) S_{c+1} = S_c + K^T V, exact in one MMA.
  """
  if b_C is None:
    return S_KV + _dot_tn(k_CK, v_CV, precision)
  vd_CV = _rows(v_CV.astype(_F32), _weights(b_C, b_last))
  return S_KV * _exp(b_last) + _state_increment(k_CK, vd_CV, precision, split)


def _store_chunk_states(s_ref, k_ref, v_ref, b_ref, S0_KV, *, C, NT, precision, split=False):
  """s_ref[c] = S_c, the state entering chunk c, for c < NT (the states kernels).

  S_c follows ``_state_step`` from S_0 = ``S0_KV`` and is stored in s_ref's
  dtype; k_ref (Tp, Dk), v_ref (Tp, BV), b_ref (Tp,) or None. Returns the
  float32 state leaving the last chunk, S_T.
  """
  def body(c, S_KV):
    s_ref[c] = S_KV.astype(s_ref.dtype)
    sl = _chunk_slice(c, C)
    return _state_step(S_KV, k_ref[sl], v_ref[sl], _load_b(b_ref, sl), _gamma(b_ref, c, C),
                       precision, split=split)

  return lax.fori_loop(0, NT, body, S0_KV)


def _state_grad_step(dS_KV, q_CK, do_CV, b_C, b_last, precision):
  """dS_c = exp(gamma_c) dS_{c+1} + (diag(exp(b)) Q)^T dO (spec §1.3).

  Without decay (b_C None) dS_c = dS_{c+1} + Q^T dO.
  """
  if b_C is None:
    return dS_KV + _dot_tn(q_CK, do_CV, precision)
  qd_CK = _rows(q_CK.astype(_F32), _exp(b_C)).astype(q_CK.dtype)
  return dS_KV * _exp(b_last) + _dot_tn(qd_CK, do_CV, precision)


def _split_refs(refs, n_in, has_decay, has_h0, has_dst=False):
  """(first n_in refs, b ref, h0 ref, dST ref (each or None), the remaining refs)."""
  rest = list(refs[n_in:])
  b_ref = rest.pop(0) if has_decay else None
  h0_ref = rest.pop(0) if has_h0 else None
  dst_ref = rest.pop(0) if has_dst else None
  return refs[:n_in], b_ref, h0_ref, dst_ref, rest


def _decay_mask(b_C, C, transpose=False):
  """M_ij = exp(b_i - b_j) [i >= j], masked to -inf *before* the exp (spec §1.2).

  Without decay (b_C None) M is the boolean causal mask [i >= j], applied with
  a select by ``_masked`` (no exp).

  ``transpose`` gives M^T. The fused backward's reverse sweep builds the
  transposed scores it needs, A^T = (K Q^T) ⊙ M^T and dA^T = (V dO^T) ⊙ M^T,
  with their own matmuls instead of transposing a matmul result in registers:
  no shared-memory round trip (``bar.sync`` 28 -> 24 in its PTX, fewer spills),
  and not the pattern that Triton 3.4-3.7 miscompiles on Hopper (kernels spec
  §2.1, FLA #640).
  """
  row_CC = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  col_CC = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  keep_CC = col_CC >= row_CC if transpose else row_CC >= col_CC
  if b_C is None:
    return keep_CC
  diff_CC = b_C[None, :] - b_C[:, None] if transpose else b_C[:, None] - b_C[None, :]
  return _exp(jnp.where(keep_CC, diff_CC, -jnp.inf))


def _off_diagonal(x_CC, C):
  """(x with its diagonal set to 0, the diagonal (C,)) for a float32 (C, C) tile.

  The decay gradient dG_t = q_t.dq_t - k_t.dk_t sums pairs (i, j), i >= j: each
  off-diagonal pair decays by exp(b_i - b_j) and enters q_i.dq_i and k_j.dk_j
  with opposite signs, so that the reverse cumsum of dG keeps, for each step r,
  the pairs with j < r <= i (the ones step r decays). A diagonal pair (t, t)
  decays by exp(0) = 1 and enters both q_t.dq_t and k_t.dk_t as
  (q_t.k_t)(do_t.v_t), of the size of the output: accumulated into dq and dk
  first, it cancels in dG only to their rounding, which in a strongly decaying
  head (dG about e^g) dominates dg (kernels spec §1.3). With
  ``decay_grad="pairs"`` the backward kernels therefore form dq and dk from the
  off-diagonal part of dA, take q.dq and k.dk (the pairs with i > j only), and
  add the diagonal, dq_t += dA_tt k_t and dk_t += dA_tt q_t, afterwards;
  dA_tt = do_t.v_t is the same in dA and dA^T.
  """
  row_CC = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  col_CC = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  eye_CC = row_CC == col_CC
  return jnp.where(eye_CC, 0.0, x_CC), jnp.sum(jnp.where(eye_CC, x_CC, 0.0), axis=1)


def _masked(x_CC, M_CC):
  """x ⊙ M for a float M; a select for the boolean causal mask (no decay)."""
  return jnp.where(M_CC, x_CC, 0.0) if M_CC.dtype == jnp.bool_ else x_CC * M_CC


def _chunk_slice(c, C):
  """The rows of chunk c, as an aligned dynamic slice of a (Tp, ...) ref."""
  return pl.ds(pl.multiple_of(c * C, C), C)


def _run_sweeps(forward_sweep, reverse_sweep, NV):
  """Both sweeps in order (NV None), or the one of this program on a split grid.

  On the split grid (2 NV, H, B) programs 0..NV-1 run ``forward_sweep`` and
  programs NV..2NV-1 ``reverse_sweep``.
  """
  if NV is None:
    forward_sweep()
    reverse_sweep()
    return
  reverse = pl.program_id(0) >= NV
  pl.when(jnp.logical_not(reverse))(forward_sweep)
  pl.when(reverse)(reverse_sweep)
