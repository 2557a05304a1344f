"""One residual layer per stage (QSF §3.2-3.6), scanned over depth by ``lm.py``.

Every block maps ``(h_BTD, ctx) -> (h_BTD, None)`` with ``ctx = (beta, t)`` or
``(beta, t, stats_mask_BT)``: the D5 anneal weight and the decode position (both
scalars), and optionally the positions the D5 statistics average over (B, T),
all broadcast over layers.
Sub-module names are shared across stages where the spec's progressive init
maps them (``norm1``, ``norm2``, ``ffn``, ``koopman``; see ``params.py``).
"""

from __future__ import annotations

import flax.linen as nn

from qsf_jax.models import fourier
from qsf_jax.models.config import ModelConfig
from qsf_jax.models.ffn import FFN, compute_dtype
from qsf_jax.models.gla import GatedLinearAttention
from qsf_jax.models.koopman import Koopman
from qsf_jax.models.measurement import MeasurementAttention
from qsf_jax.models.norms import Norm


def unpack_ctx(ctx):
  """(beta, t, stats_mask_BT or None) from a block context of 2 or 3 entries."""
  if len(ctx) == 2:
    return ctx[0], ctx[1], None
  beta, t, mask = ctx
  return beta, t, mask
from qsf_jax.models.softmax_attention import SoftmaxAttention


class FNetBlock(nn.Module):
  """Stage I (QSF §3.2, D3).

  Pre-norm (default):  h <- h + CFM(LN_1 h);  h <- h + FFN(LN_2 h).
  Post-norm (``fnet_postnorm``, original FNet, unscaled mixing):
  h <- LN_1(h + CFM'(h));  h <- LN_2(h + FFN(h)).
  """
  cfg: ModelConfig
  decode: bool = False
  update_stats: bool = False

  @nn.compact
  def __call__(self, h_BTD, ctx):
    """Applies the layer (see the class docstring).

    Args:
      h_BTD: residual stream h (B, T, d) float32.
      ctx: (beta, t[, stats_mask_BT]): D5 anneal weight and decode position
        (scalars), and the positions of the D5 statistics (see module docstring).

    Returns:
      (h_BTD, None): the updated stream (the ``nn.scan`` carry) and no output.
    """
    cfg = self.cfg
    _, t, _ = unpack_ctx(ctx)
    post = cfg.fnet_postnorm
    norm1, norm2 = Norm(cfg, name="norm1"), Norm(cfg, name="norm2")
    x_BTD = h_BTD if post else norm1(h_BTD)
    if self.decode:
      mix_BTD = fourier.PastInputs(cfg.max_seq_len, "fourier", scale=not post,
                                   dtype=compute_dtype(cfg), name="mixer")(x_BTD, t)
    else:
      mix_BTD = fourier.causal_fourier_mix(x_BTD, t_max=cfg.max_seq_len, scale=not post,
                                           dtype=compute_dtype(cfg))
    ffn = FFN(cfg, name="ffn")
    if post:
      h_BTD = norm1(h_BTD + mix_BTD)
      return norm2(h_BTD + ffn(h_BTD)), None
    h_BTD = h_BTD + mix_BTD
    return h_BTD + ffn(norm2(h_BTD)), None


class KoopmanBlock(nn.Module):
  """Stage II (QSF §3.3, D2), default S2-a:

    h <- h + diag(c')^{-1} (M o C_T) (LN_1 h) K^T + b;   h <- h + FFN(LN_2 h).
  """
  cfg: ModelConfig
  decode: bool = False
  update_stats: bool = False

  @nn.compact
  def __call__(self, h_BTD, ctx):
    """Applies the layer (see the class docstring).

    Args:
      h_BTD: residual stream h (B, T, d) float32.
      ctx: (beta, t[, stats_mask_BT]): D5 anneal weight and decode position
        (scalars), and the positions of the D5 statistics (see module docstring).

    Returns:
      (h_BTD, None): the updated stream (the ``nn.scan`` carry) and no output.
    """
    cfg = self.cfg
    _, t, _ = unpack_ctx(ctx)
    u_BTD = Norm(cfg, name="norm1")(h_BTD)
    h_BTD = h_BTD + Koopman(cfg, mode=cfg.koopman_mixer, decode=self.decode,
                            name="koopman")(u_BTD, t)
    return h_BTD + FFN(cfg, name="ffn")(Norm(cfg, name="norm2")(h_BTD)), None


class QSFBlock(nn.Module):
  """Stages III and IV: the hybrid layer, QSF eq. 60 (§3.4, §3.5; D5, D6).

    u = N_beta(h),   h <- h + u K^T + b + alpha x_tgt(u)       (attn_form "add")
                     h <- h + u K^T + b + alpha (x_tgt(u) - v(u))   ("pull")

  with K free (Stage III) or expm(S - S^T) (Stage IV), x_tgt the measurement
  attention (QSF eqs. 34, 36) and alpha a learned scalar (``alpha``).
  ``stage3_keep_ffn`` adds h <- h + FFN(N'_beta h); ``stage3_keep_fourier``
  mixes u over positions (S2-a) before K.
  """
  cfg: ModelConfig
  decode: bool = False
  update_stats: bool = False

  @nn.compact
  def __call__(self, h_BTD, ctx, x_tgt_BTD=None):
    """One layer of QSF eq. 60 (see the class docstring).

    Args:
      h_BTD: residual stream h (B, T, d) float32.
      ctx: (beta, t[, stats_mask_BT]): D5 anneal weight and decode position
        (scalars), and the positions of the D5 statistics (see module docstring).
      x_tgt_BTD: if given (B, T, d), replaces the attention target; a fixed
        target makes the layer affine in h at beta = 1 (D20).

    Returns:
      (h_BTD, None): the updated stream (the ``nn.scan`` carry) and no output.
    """
    cfg = self.cfg
    beta, t, mask_BT = unpack_ctx(ctx)
    u_BTD = Norm(cfg, annealed=True, update_stats=self.update_stats, name="norm1")(
        h_BTD, beta, mask_BT)
    mode = "cosine" if cfg.stage3_keep_fourier else "none"
    k_term = Koopman(cfg, mode=mode, orthogonal=cfg.stage == "hamiltonian_attn",
                     decode=self.decode, name="koopman")(u_BTD, t)
    tgt_BTD, v_BTD = MeasurementAttention(cfg, decode=self.decode, name="attn")(u_BTD, t)
    if x_tgt_BTD is not None:
      tgt_BTD = x_tgt_BTD
    alpha = self.param("alpha", nn.initializers.constant(cfg.alpha_init), (), "float32")
    meas_BTD = tgt_BTD - v_BTD if cfg.attn_form == "pull" else tgt_BTD
    h_BTD = h_BTD + k_term + alpha * meas_BTD
    if cfg.stage3_keep_ffn:
      n2 = Norm(cfg, annealed=True, update_stats=self.update_stats, name="norm2")
      h_BTD = h_BTD + FFN(cfg, name="ffn")(n2(h_BTD, beta, mask_BT))
    return h_BTD, None


class MixerFFNBlock(nn.Module):
  """Pre-norm block h <- h + Mixer(LN_1 h); h <- h + FFN(LN_2 h).

  The mixer is causal softmax attention (``transformer``, QSF §3.6) or gated
  linear attention (``gla``), both named ``attn``.
  """
  cfg: ModelConfig
  decode: bool = False
  update_stats: bool = False

  @nn.compact
  def __call__(self, h_BTD, ctx):
    """Applies the layer (see the class docstring).

    Args:
      h_BTD: residual stream h (B, T, d) float32.
      ctx: (beta, t[, stats_mask_BT]): D5 anneal weight and decode position
        (scalars), and the positions of the D5 statistics (see module docstring).

    Returns:
      (h_BTD, None): the updated stream (the ``nn.scan`` carry) and no output.
    """
    cfg = self.cfg
    _, t, _ = unpack_ctx(ctx)
    mixer = SoftmaxAttention if cfg.stage == "transformer" else GatedLinearAttention
    h_BTD = h_BTD + mixer(cfg, decode=self.decode, name="attn")(Norm(cfg, name="norm1")(h_BTD), t)
    return h_BTD + FFN(cfg, name="ffn")(Norm(cfg, name="norm2")(h_BTD)), None


BLOCKS = {
    "fnet": FNetBlock,
    "koopman": KoopmanBlock,
    "koopman_attn": QSFBlock,
    "hamiltonian_attn": QSFBlock,
    "transformer": MixerFFNBlock,
    "gla": MixerFFNBlock,
}
