"""Causal softmax multi-head attention, the baseline's mixer (QSF §3.6).

  o = softmax(q k^T / sqrt(d_h) + causal mask) v,   y = o W_O + b_O,

with ``jax.nn.dot_product_attention(..., is_causal=True)``. Decoding keeps a KV
cache (B, T_max, H, d_h) and attends to positions <= t with an explicit mask.

Parameters: ``query``, ``key``, ``value``, ``out`` (Dense d -> d with bias).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qsf_jax.models.config import ModelConfig
from qsf_jax.models.ffn import compute_dtype, dense


class SoftmaxAttention(nn.Module):
  """GPT-2 style causal self-attention with an optional KV cache.

  Attributes:
    cfg: model configuration.
    decode: one token per call with keys and values cached in ``"cache"``.
  """
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, u_BTD, t=0):
    """Attends (B, T, d) -> (B, T, d) float32; ``t`` is the decode position."""
    cfg = self.cfg
    B, T, d = u_BTD.shape
    H, Dh = cfg.n_heads, cfg.head_dim
    dt = compute_dtype(cfg)
    split = lambda x: x.reshape(B, T, H, Dh).astype(dt)
    q_BTHD = split(dense(cfg, d, "query")(u_BTD))
    k_BTHD = split(dense(cfg, d, "key")(u_BTD))
    v_BTHD = split(dense(cfg, d, "value")(u_BTD))
    if not self.decode:
      o_BTHD = jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, is_causal=True)
    else:
      shape = (B, cfg.max_seq_len, H, Dh)
      ck = self.variable("cache", "cached_key", lambda: jnp.zeros(shape, dt))
      cv = self.variable("cache", "cached_value", lambda: jnp.zeros(shape, dt))
      if self.is_initializing():
        o_BTHD = jnp.zeros((B, T, H, Dh), dt)
      else:
        ck.value = ck.value.at[:, t].set(k_BTHD[:, 0])
        cv.value = cv.value.at[:, t].set(v_BTHD[:, 0])
        mask_11TS = (jnp.arange(cfg.max_seq_len) <= t)[None, None, None, :]
        o_BTHD = jax.nn.dot_product_attention(q_BTHD, ck.value, cv.value, mask=mask_11TS)
    return dense(cfg, d, "out")(o_BTHD.reshape(B, T, d)).astype(jnp.float32)
