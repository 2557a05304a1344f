"""Gated linear attention (Yang et al. 2024, "GLA") through the shared op.

Per head, with data-dependent log-decay g_t <= 0 (one scalar per head and step:
the "simple GLA" form the shared op supports, kernels spec §1.1):

  g_t = log sigmoid(u_t w_g + c_g) / tau
  S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T (q_t / sqrt(d_h))
  y_t = W_O [ RMSNorm_head(o_t) * swish(u_t W_R + c_R) ]

The original GLA gates each key channel separately (g_t in R^{d_k}); the shared
``linear_attention`` op takes a scalar log-decay per head, so this layer uses
the scalar gate (as in Gated RetNet / Mamba-2 style simple GLA). Decoding
carries S (B, H, d_h, d_h): O(1) work per token.

Parameters: ``query``, ``key``, ``value`` (no bias), ``gate`` (d -> H),
``out_gate`` (d -> d), ``out`` (d -> d), ``head_norm`` (scale (d_h,)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qsf_jax import kernels
from qsf_jax.models.config import ModelConfig
from qsf_jax.models.ffn import compute_dtype, dense


def gla_log_decay(gate_logits, tau):
  """GLA gate in log space: g = log sigmoid(x) / tau <= 0 (Yang et al. eq. for alpha_t).

  Args:
    gate_logits: pre-activations x (B, T, H).
    tau: temperature tau > 0 (16 in the GLA paper).

  Returns:
    g (B, T, H) float32, finite and <= 0.
  """
  return jax.nn.log_sigmoid(gate_logits.astype(jnp.float32)) / tau


class GatedLinearAttention(nn.Module):
  """Multi-head GLA token mixer (scalar gate per head), see the module docstring.

  Attributes:
    cfg: model configuration.
    decode: one token per call with the state in the ``"cache"`` collection.
  """
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, u_BTD, t=0):
    """Mixes (B, T, d) -> (B, T, d) float32; ``t`` is unused (no position scale)."""
    del t
    cfg = self.cfg
    B, T, d = u_BTD.shape
    H, Dh = cfg.n_heads, cfg.head_dim
    dt = compute_dtype(cfg)
    split = lambda x: x.reshape(B, T, H, Dh).astype(dt)
    q_BTHD = split(dense(cfg, d, "query", use_bias=False)(u_BTD) * (Dh ** -0.5))
    k_BTHD = split(dense(cfg, d, "key", use_bias=False)(u_BTD))
    v_BTHD = split(dense(cfg, d, "value", use_bias=False)(u_BTD))
    g_BTH = gla_log_decay(dense(cfg, H, "gate")(u_BTD), cfg.gla_gate_temp)
    if not self.decode:
      o_BTHD = kernels.linear_attention(q_BTHD, k_BTHD, v_BTHD, g_BTH, impl=cfg.attn_impl,
                                        chunk_size=cfg.attn_chunk_size,
                                        pallas_design=cfg.attn_pallas_design)
    else:
      S = self.variable("cache", "state", lambda: jnp.zeros((B, H, Dh, Dh), jnp.float32))
      if self.is_initializing():
        o_BTHD = jnp.zeros((B, T, H, Dh), dt)
      else:
        o_BTHD, S.value = kernels.linear_attention(
            q_BTHD, k_BTHD, v_BTHD, g_BTH, initial_state=S.value, return_final_state=True,
            impl="scan")
    o_BTHD = nn.RMSNorm(epsilon=cfg.ln_eps, name="head_norm", dtype=jnp.float32,
                        param_dtype=jnp.float32)(o_BTHD.astype(jnp.float32))
    r_BTD = nn.swish(dense(cfg, d, "out_gate")(u_BTD).astype(jnp.float32))
    y_BTD = o_BTHD.reshape(B, T, d) * r_BTD
    return dense(cfg, d, "out")(y_BTD).astype(jnp.float32)
