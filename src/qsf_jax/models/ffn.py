"""Position-wise feed-forward sub-block (QSF §3.2, §3.6) and shared Dense helpers."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from qsf_jax.models.config import ModelConfig


def compute_dtype(cfg: ModelConfig):
  """The matmul operand dtype of ``cfg.dtype`` (conventions §2.4)."""
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def dense(cfg: ModelConfig, features: int, name: str, *, use_bias: bool = True):
  """A Dense layer with float32 parameters, N(0, init_std^2) kernel, zero bias.

  Args:
    cfg: model configuration (``init_std``, ``dtype``).
    features: output width.
    name: parameter name (stable across stages, see ``params.shared_param_paths``).
    use_bias: whether to add a bias.
  """
  return nn.Dense(features, use_bias=use_bias, name=name,
                  kernel_init=nn.initializers.normal(cfg.init_std),
                  bias_init=nn.initializers.zeros,
                  dtype=compute_dtype(cfg), param_dtype=jnp.float32)


class FFN(nn.Module):
  """FFN(u) = W_2 GELU(W_1 u + c_1) + c_2, d -> ffn_dim -> d (QSF §3.2).

  Parameters ``wi`` and ``wo``; biases only if ``cfg.ffn_bias``.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, u_BTD):
    """Applies the FFN to (B, T, d); returns (B, T, d) float32."""
    cfg = self.cfg
    a_BTF = dense(cfg, cfg.ffn_dim, "wi", use_bias=cfg.ffn_bias)(u_BTD)
    a_BTF = nn.gelu(a_BTF)
    return dense(cfg, cfg.d_model, "wo", use_bias=cfg.ffn_bias)(a_BTF).astype(jnp.float32)
