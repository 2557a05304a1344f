"""Chunked causal linear attention in plain jnp (the "xla" impl, the CPU path).

The sequence is cut into chunks of C steps (kernels spec §1.2). With the
chunk-local inclusive cumsum b_i = sum_{r=cC}^{cC+i} g_r, gamma_c = b_{C-1} and
S_c the state entering chunk c (S_0 = the initial state):

  A       = (Q K^T) ⊙ M,  M_ij = exp(b_i - b_j) [i >= j]      intra-chunk scores
  O       = A V + diag(exp(b)) Q S_c                           intra + inter
  S_{c+1} = exp(gamma_c) S_c + (diag(exp(gamma_c - b)) K)^T V  state passing

Every exponent is <= 0 for g <= 0; the upper triangle is set to -inf before the
exp. Scores, states and accumulators are float32 (float64 for float64 inputs);
A, the decay-scaled Q/K and the state are cast to the input dtype only as
matmul operands (bf16 MMA operands, spec §1.4). The chunk recurrence is a
``lax.scan`` over chunks; the whole function is differentiable by autodiff.

The exponents b_i - b_j and gamma_c - b_j are formed as segment sums,
sum_{j<r<=i} g_r and sum_{j<r<C} g_r (a matmul of the masked g with a triangle
of ones, and an exclusive reverse cumsum; Mamba-2's ``segsum``), never as the
difference of two cumsums. In the forward pass this keeps the exponent's
rounding to the size of the terms it sums; in the backward pass, autodiff then
gives each dg_r as a sum over the pairs (j < r <= i) that step r decays, terms
all of size about e^{g_r}. The difference form's gradient adds and subtracts the
pairs on one side of r, terms of the output's size, which cancel down to a
gradient of size e^{g_r}: a relative error of eps e^{-g_r} in strongly
decaying heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._validate import (check_chunk_size, compute_dtype, floor_log_decay, pad_axis, round_up,
                        validate_inputs)


def _mm_precision(dtype):
  """HIGHEST (IEEE) for 32/64-bit operands so GPUs do not silently use TF32."""
  if jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


def chunked_linear_attention(q, k, v, log_decay=None, initial_state=None, *, chunk_size=64):
  """Chunked form of o_t = sum_{s<=t} exp(G_t - G_s)(q_t . k_s) v_s + q_t^T exp(G_t) S_0.

  Kernels spec §1.2 (forward), computed chunk-parallel with a sequential
  ``lax.scan`` over the T/C chunk states. T that is not a multiple of C is
  zero-padded (zero k, v, g leave outputs and state unchanged) and sliced back.

  Args:
    q: queries (B, T, H, Dk).
    k: keys (B, T, H, Dk).
    v: values (B, T, H, Dv).
    log_decay: log-decays g <= 0 (B, T, H), or None for no decay.
    initial_state: state S_0 entering the sequence (B, H, Dk, Dv), or None.
    chunk_size: chunk length C (any positive int; C = T when T < C).

  Returns:
    (o, S_T): outputs (B, T, H, Dv) in q's dtype and the final state
    (B, H, Dk, Dv) in the accumulation dtype.

  Raises:
    ValueError: for the inputs ``linear_attention`` refuses, or a chunk_size
      that is not a positive int.
  """
  q, k, v, log_decay, initial_state = validate_inputs(q, k, v, log_decay, initial_state)
  chunk_size = check_chunk_size(chunk_size, power_of_two=False)
  log_decay = floor_log_decay(log_decay, q.dtype)  # resets (-inf) stay finite
  B, T, H, Dk = q.shape
  Dv = v.shape[-1]
  in_dtype = q.dtype
  cd = compute_dtype(in_dtype)
  prec = _mm_precision(in_dtype)
  C = min(int(chunk_size), T)
  Tp = round_up(T, C)
  N = Tp // C
  g_BTH = jnp.zeros((B, T, H), cd) if log_decay is None else log_decay.astype(cd)
  S0_BHKV = (jnp.zeros((B, H, Dk, Dv), cd) if initial_state is None
             else initial_state.astype(cd))
  q_BNCHK = pad_axis(q, 1, Tp).reshape(B, N, C, H, Dk)
  k_BNCHK = pad_axis(k, 1, Tp).reshape(B, N, C, H, Dk)
  v_BNCHV = pad_axis(v, 1, Tp).reshape(B, N, C, H, Dv)
  g_BNHC = jnp.moveaxis(pad_axis(g_BTH, 1, Tp).reshape(B, N, C, H), 2, 3)
  b_BNCH = jnp.moveaxis(jnp.cumsum(g_BNHC, axis=-1), 3, 2)  # b_i = sum_{r<=i} g_r
  gam_BNH = jnp.sum(g_BNHC, axis=-1)

  causal_CC = jnp.arange(C)[:, None] >= jnp.arange(C)[None, :]
  strict_CC = jnp.arange(C)[:, None] > jnp.arange(C)[None, :]
  # seg_ij = sum_{j<r<=i} g_r = sum_r L_ir G_rj with L_ir = [r <= i], G_rj = g_r [r > j]:
  # a matmul with 0/1 weights (exact products; a cumsum over the pairs costs more on CPUs)
  seg_BNHCC = jnp.einsum("ir,bnhrj->bnhij", causal_CC.astype(cd),
                         jnp.where(strict_CC[None, None, None], g_BNHC[..., :, None], 0.0),
                         precision=jax.lax.Precision.HIGHEST)
  expo_BNHCC = jnp.where(causal_CC[None, None, None], seg_BNHCC, -jnp.inf)
  A_BNHCC = jnp.einsum("bnihk,bnjhk->bnhij", q_BNCHK, k_BNCHK, precision=prec,
                       preferred_element_type=cd) * jnp.exp(expo_BNHCC)
  o_BNCHV = jnp.einsum("bnhij,bnjhv->bnihv", A_BNHCC.astype(in_dtype), v_BNCHV,
                       precision=prec, preferred_element_type=cd)

  # gamma_c - b_j = sum_{j<r<C} g_r: the reverse cumsum shifted by one step
  rev_BNHC = jax.lax.cumsum(g_BNHC, axis=3, reverse=True)
  tail_BNHC = jnp.concatenate([rev_BNHC[..., 1:], jnp.zeros_like(rev_BNHC[..., :1])], axis=-1)
  w_BNCH = jnp.exp(jnp.moveaxis(tail_BNHC, 3, 2))
  kd_BNCHK = (k_BNCHK.astype(cd) * w_BNCH[..., None]).astype(in_dtype)
  dS_BNHKV = jnp.einsum("bnjhk,bnjhv->bnhkv", kd_BNCHK, v_BNCHV, precision=prec,
                        preferred_element_type=cd)

  def step(S_BHKV, x):
    dS_BHKV, gam_BH = x
    return S_BHKV * jnp.exp(gam_BH)[:, :, None, None] + dS_BHKV, S_BHKV

  S_BHKV, Sin_NBHKV = jax.lax.scan(
      step, S0_BHKV, (jnp.moveaxis(dS_BNHKV, 1, 0), jnp.moveaxis(gam_BNH, 1, 0)))
  Sin_BNHKV = jnp.moveaxis(Sin_NBHKV, 0, 1)
  qd_BNCHK = (q_BNCHK.astype(cd) * jnp.exp(b_BNCH)[..., None]).astype(in_dtype)
  o_BNCHV = o_BNCHV + jnp.einsum("bnihk,bnhkv->bnihv", qd_BNCHK, Sin_BNHKV.astype(in_dtype),
                                 precision=prec, preferred_element_type=cd)
  o_BTHV = o_BNCHV.reshape(B, Tp, H, Dv)[:, :T]
  return o_BTHV.astype(in_dtype), S_BHKV
