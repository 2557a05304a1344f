"""Linear attention as the measurement target (QSF eqs. 34, 36; §3.4; D4, D6, D7).

Per head m (d_h = d / H), with q = u W_Q + b_Q, k = u W_K + b_K, v = u W_V + b_V:

  phi(z) = 1 + z                                              (QSF eq. 36)
  x_tgt,i^m = c_i sum_{j <= i} [phi(q_i^m) . phi(k_j^m)] v_j^m    (QSF eq. 34)

with no data-dependent normaliser; c_i = 1/((i + 1) d_h) (D4 default,
``attn_scale="position"``) or 1 (``"none"``, paper-literal). The heads are
concatenated with no output projection (the 29.4M count requires it). D7:
``causal_include_self=False`` sums over j < i instead (position 0 gets a zero
target), implemented by shifting phi(k) and v one step right.

The sum goes through the shared op ``qsf_jax.kernels.linear_attention``; the
feature map and c_i stay here. Decoding carries the state
S_t = sum_{j <= t} phi(k_j) v_j^T (B, H, d_h, d_h), O(1) work per token.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from qsf_jax import kernels
from qsf_jax.models.config import ModelConfig
from qsf_jax.models.ffn import compute_dtype, dense


def position_scale(positions_T, head_dim, kind="position"):
  """The QSF attention scale c_i (decision D4).

    c_i = 1 / ((i + 1) d_h)   ("position"),    c_i = 1   ("none").

  Args:
    positions_T: token positions i (T,) int.
    head_dim: d_h.
    kind: "position" or "none".

  Returns:
    c (T,) float32.
  """
  if kind == "none":
    return jnp.ones(positions_T.shape, jnp.float32)
  return 1.0 / ((positions_T.astype(jnp.float32) + 1.0) * head_dim)


def shift_right(x_BTHD):
  """x'_t = x_{t-1}, x'_0 = 0 along axis 1 (D7's exclusive range j < i)."""
  return jnp.pad(x_BTHD, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


class MeasurementAttention(nn.Module):
  """Multi-head unnormalised linear attention (QSF eqs. 34, 36), no output projection.

  Parameters: ``query``, ``key``, ``value`` (Dense d -> d with bias).

  Attributes:
    cfg: model configuration.
    decode: one token per call, carrying the state in the ``"cache"`` collection.
  """
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, u_BTD, t=0):
    """The measurement target x_tgt and the values v.

    Args:
      u_BTD: normalised layer input u (B, T, d); T = 1 when decoding.
      t: decode position (int32 scalar); ignored otherwise.

    Returns:
      (x_tgt, v): both (B, T, d) float32; v = u W_V + b_V (for D6 "pull").
    """
    cfg = self.cfg
    B, T, d = u_BTD.shape
    H, Dh = cfg.n_heads, cfg.head_dim
    dt = compute_dtype(cfg)
    split = lambda x: x.reshape(B, T, H, Dh)
    q_BTHD = split(dense(cfg, d, "query")(u_BTD))
    k_BTHD = split(dense(cfg, d, "key")(u_BTD))
    v_BTHD = split(dense(cfg, d, "value")(u_BTD))
    fq_BTHD = (1.0 + q_BTHD).astype(dt)
    fk_BTHD = (1.0 + k_BTHD).astype(dt)
    vv_BTHD = v_BTHD.astype(dt)

    if not self.decode:
      if not cfg.causal_include_self:
        fk_BTHD, vv_BTHD = shift_right(fk_BTHD), shift_right(vv_BTHD)
      o_BTHD = kernels.linear_attention(fq_BTHD, fk_BTHD, vv_BTHD, impl=cfg.attn_impl,
                                        chunk_size=cfg.attn_chunk_size,
                                        pallas_design=cfg.attn_pallas_design)
      c_T = position_scale(jnp.arange(T), Dh, cfg.attn_scale)
    else:
      S = self.variable("cache", "state", lambda: jnp.zeros((B, H, Dh, Dh), jnp.float32))
      if not cfg.causal_include_self:
        prev_k = self.variable("cache", "prev_k", lambda: jnp.zeros((B, 1, H, Dh), jnp.float32))
        prev_v = self.variable("cache", "prev_v", lambda: jnp.zeros((B, 1, H, Dh), jnp.float32))
      if self.is_initializing():
        return jnp.zeros((B, T, d), jnp.float32), v_BTHD.reshape(B, T, d).astype(jnp.float32)
      if not cfg.causal_include_self:
        cur_k, cur_v = fk_BTHD, vv_BTHD
        fk_BTHD, vv_BTHD = prev_k.value.astype(dt), prev_v.value.astype(dt)
        prev_k.value, prev_v.value = cur_k.astype(jnp.float32), cur_v.astype(jnp.float32)
      # One token: the "scan" impl is the O(1)-per-token recurrence.
      o_BTHD, S.value = kernels.linear_attention(
          fq_BTHD, fk_BTHD, vv_BTHD, initial_state=S.value, return_final_state=True,
          impl="scan")
      c_T = position_scale(jnp.reshape(t, (1,)), Dh, cfg.attn_scale)
    x_tgt_BTD = (o_BTHD.astype(jnp.float32) * c_T[None, :, None, None]).reshape(B, T, d)
    return x_tgt_BTD, v_BTHD.reshape(B, T, d).astype(jnp.float32)
