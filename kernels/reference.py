"""Reference impls of causal linear attention: quadratic masked form and recurrence.

Both compute, per batch row and head (G_t = sum_{r<=t} g_r, S_0 the initial state),

  o_t = sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s + q_t^T (exp(G_t) S_0)
  S_T = sum_s exp(G_T - G_s) k_s v_s^T + exp(G_T) S_0,

the parallel and the recurrent form of S_t = exp(g_t) S_{t-1} + k_t v_t^T,
o_t = S_t^T q_t (kernels spec §1.1 with scale 1). Arithmetic is in float32
(float64 for float64 inputs) with ``precision=HIGHEST``; outputs are cast back to
the input dtype and the final state stays in the accumulation dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._validate import compute_dtype, validate_inputs

_HI = jax.lax.Precision.HIGHEST


def _prepare(q, k, v, log_decay, initial_state):
  """Casts to the accumulation dtype and fills in zero decay / zero state."""
  cd = compute_dtype(q.dtype)
  B, T, H, Dk = q.shape
  Dv = v.shape[-1]
  g_BTH = (jnp.zeros((B, T, H), cd) if log_decay is None else log_decay.astype(cd))
  S0_BHKV = (jnp.zeros((B, H, Dk, Dv), cd) if initial_state is None
             else initial_state.astype(cd))
  return q.astype(cd), k.astype(cd), v.astype(cd), g_BTH, S0_BHKV


def reference_linear_attention(q, k, v, log_decay=None, initial_state=None):
  """Naive O(T^2) masked form (kernels spec §1.1, §5.1 reference 2).

  o_t = sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s + q_t^T exp(G_t) S_0. The
  pairwise exponent G_t - G_s = sum_{r=s+1}^{t} g_r is summed directly (a cumsum
  over t of g masked to r > s) rather than as a difference of global cumsums,
  which cancels catastrophically in float32 for long T (spec §5.1). It is
  masked to -inf above the diagonal *before* the exp, so no positive exponent
  is ever evaluated. Memory is O(B T^2 H).

  Args:
    q: queries (B, T, H, Dk).
    k: keys (B, T, H, Dk).
    v: values (B, T, H, Dv).
    log_decay: log-decays g <= 0 (B, T, H), or None for no decay.
    initial_state: state S_0 entering the sequence (B, H, Dk, Dv), or None.

  Returns:
    (o, S_T): outputs (B, T, H, Dv) in q's dtype and the final state
    (B, H, Dk, Dv) in the accumulation dtype.
  """
  q, k, v, log_decay, initial_state = validate_inputs(q, k, v, log_decay, initial_state)
  q_BTHK, k_BTHK, v_BTHV, g_BTH, S0_BHKV = _prepare(q, k, v, log_decay, initial_state)
  T = q.shape[1]
  t_T1, s_1T = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
  # expo[b, t, s, h] = sum_{s < r <= t} g_r  (the decay from step s to step t)
  g_BTSH = jnp.where((t_T1 > s_1T)[None, :, :, None], g_BTH[:, :, None, :], 0.0)
  expo_BTSH = jnp.cumsum(g_BTSH, axis=1)
  decay_BTSH = jnp.exp(jnp.where((t_T1 >= s_1T)[None, :, :, None], expo_BTSH, -jnp.inf))
  scores_BTSH = jnp.einsum("bthk,bshk->btsh", q_BTHK, k_BTHK, precision=_HI) * decay_BTSH
  o_BTHV = jnp.einsum("btsh,bshv->bthv", scores_BTSH, v_BTHV, precision=_HI)
  G_BTH = jnp.cumsum(g_BTH, axis=1)
  o_BTHV = o_BTHV + jnp.einsum(
      "bthk,bhkv->bthv", q_BTHK * jnp.exp(G_BTH)[..., None], S0_BHKV, precision=_HI)
  w_BSH = decay_BTSH[:, -1]  # exp(G_T - G_s)
  S_BHKV = jnp.einsum("bshk,bshv->bhkv", k_BTHK * w_BSH[..., None], v_BTHV, precision=_HI)
  S_BHKV = S_BHKV + jnp.exp(G_BTH[:, -1, :])[:, :, None, None] * S0_BHKV
  return o_BTHV.astype(q.dtype), S_BHKV


def scan_linear_attention(q, k, v, log_decay=None, initial_state=None):
  """Token-by-token recurrence under ``lax.scan`` (kernels spec §5.1 reference 1).

  S_t = exp(g_t) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t,  S_{-1} = S_0.

  The semantic ground truth: no cumsum, no cancellation. O(T) sequential steps,
  so it is slow on accelerators; under autodiff it stores every S_t.

  Args:
    q: queries (B, T, H, Dk).
    k: keys (B, T, H, Dk).
    v: values (B, T, H, Dv).
    log_decay: log-decays g <= 0 (B, T, H), or None for no decay.
    initial_state: state S_0 entering the sequence (B, H, Dk, Dv), or None.

  Returns:
    (o, S_T): outputs (B, T, H, Dv) in q's dtype and the final state
    (B, H, Dk, Dv) in the accumulation dtype.
  """
  q, k, v, log_decay, initial_state = validate_inputs(q, k, v, log_decay, initial_state)
  q_BTHK, k_BTHK, v_BTHV, g_BTH, S0_BHKV = _prepare(q, k, v, log_decay, initial_state)

  def step(S_BHKV, x):
    q_BHK, k_BHK, v_BHV, g_BH = x
    S_BHKV = (S_BHKV * jnp.exp(g_BH)[:, :, None, None]
              + k_BHK[:, :, :, None] * v_BHV[:, :, None, :])
    return S_BHKV, jnp.einsum("bhk,bhkv->bhv", q_BHK, S_BHKV, precision=_HI)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q_BTHK, k_BTHK, v_BTHV, g_BTH))
  S_BHKV, o_TBHV = jax.lax.scan(step, S0_BHKV, xs)
  return jnp.moveaxis(o_TBHV, 0, 1).astype(q.dtype), S_BHKV
