"""Two-level split of the sequence for the fused Pallas kernels (state passing).

The fused kernels run one program per (value block, head, batch row), each
sequential over its T / C chunks. At B = H = 8 that is 128 programs for 132 SMs
(kernels spec §7, "Parallelism is the catch"). Splitting the padded sequence
into S segments of L = T / S tokens gives S times more programs: each segment
starts from the state that enters it, computed here in XLA (spec §7 remedy
"two-level split-T design", Mamba-2 "state passing"):

  local state   U_s = sum_{t in s} exp(gamma_s - G^s_t) k_t v_t^T,
  segment decay gamma_s = sum_{t in s} g_t,
  entering      S_0 = S_in,  S_{s+1} = exp(gamma_s) S_s + U_s,

where G^s_t is the cumsum of g inside segment s, and gamma_s - G^s_t =
sum_{r in s, r > t} g_r is taken as an exclusive reverse cumsum (no
cancellation of two large cumsums). The kernels then run on (B S) rows of L
tokens with initial states S_s; S_S is the final state. Everything here is
differentiable, so gradients flow through the kernels' ``custom_vjp`` (which
returns d initial_state) and through these few XLA ops.

Measured on an H200 (WORKSPACE.md, "Pallas kernels on GPU"), the split did not
pay at B = H = 8, T = 4096: the XLA state passing costs more than the extra
programs save, so ``pallas_linear_attention`` defaults to one segment and the
split is an option (``num_segments``) for shapes with very few programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def entering_states(k_BTHK, v_BTHV, g_BTH, h0_BHKV, num_segments: int, precision=None):
  """States entering each of S equal segments, and the final state.

  Args:
    k_BTHK: keys (B, T, H, K), T a multiple of S.
    v_BTHV: values (B, T, H, V).
    g_BTH: log-decays (B, T, H), or None (no decay: U_s = sum_t k_t v_t^T and
      S_{s+1} = S_s + U_s).
    h0_BHKV: the state entering the sequence (B, H, K, V), or None (zeros).
    num_segments: S.
    precision: dot precision (HIGHEST for float32 operands).

  Returns:
    (S_in (B, S, H, K, V) float32, S_T (B, H, K, V) float32): S_in[:, s] is the
    state entering segment s (S_in[:, 0] = h0), S_T the state after the last.
  """
  B, T, H, K = k_BTHK.shape
  V = v_BTHV.shape[-1]
  S = num_segments
  L = T // S
  kd_BSLHK = k_BTHK.reshape(B, S, L, H, K)
  if g_BTH is None:
    gamma_BSH = jnp.zeros((B, S, H), _F32)
  else:
    g_BSLH = g_BTH.astype(_F32).reshape(B, S, L, H)
    # Inclusive reverse cumsum within each segment; its shift is sum_{r > t} g_r.
    rc_BSLH = jnp.flip(jnp.cumsum(jnp.flip(g_BSLH, 2), axis=2), 2)
    gamma_BSH = rc_BSLH[:, :, 0, :]
    after_BSLH = jnp.concatenate([rc_BSLH[:, :, 1:, :], jnp.zeros_like(rc_BSLH[:, :, :1, :])],
                                 axis=2)
    kd_BSLHK = (kd_BSLHK.astype(_F32) * jnp.exp(after_BSLH)[..., None]).astype(k_BTHK.dtype)
  U_BSHKV = jnp.einsum("bslhk,bslhv->bshkv", kd_BSLHK, v_BTHV.reshape(B, S, L, H, V),
                       precision=precision, preferred_element_type=_F32)
  S0_BHKV = jnp.zeros((B, H, K, V), _F32) if h0_BHKV is None else h0_BHKV.astype(_F32)

  def step(S_BHKV, x):
    U_BHKV, gamma_BH = x
    return S_BHKV * jnp.exp(gamma_BH)[:, :, None, None] + U_BHKV, S_BHKV

  S_T, S_in_SBHKV = jax.lax.scan(step, S0_BHKV, (jnp.moveaxis(U_BSHKV, 1, 0),
                                                 jnp.moveaxis(gamma_BSH, 1, 0)))
  return jnp.moveaxis(S_in_SBHKV, 0, 1), S_T


def fold(x, num_segments: int):
  """(B, T, ...) -> (B S, T / S, ...): segments become batch rows."""
  B, T = x.shape[:2]
  return x.reshape((B * num_segments, T // num_segments) + x.shape[2:])


def unfold(x, batch: int):
  """(B S, L, ...) -> (B, S L, ...), the inverse of :func:`fold`."""
  return x.reshape((batch, -1) + x.shape[2:])
