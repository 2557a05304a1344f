"""Layer-by-layer forward pass exposing each layer's QSF quantities (QSF eq. 60, §6.4).

The language model scans its blocks over depth (``nn.scan``), which hides the
per-layer states. ``iter_layers`` replays the same computation one block at a
time with the model's own modules (``qsf_jax.models.blocks``) and yields, per
layer l,

  h_in   = h^(l), the residual stream entering the layer,
  k_in   = the vector K^(l) multiplies: u = N_beta(h) for Stages III/IV (eq. 60),
           the causal cosine mixing of u for Stage II S2-a, s_{t-1} for S2-c,
  x_tgt  = the linear-attention measurement target (QSF eq. 34; Stages III/IV),
  h_out  = h^(l+1).

``final_states`` applies the final norm, z = N_f(h_L); logits = z E^T, so the
replay can be checked against ``model.apply``.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax import _checks
from qsf_jax.analysis.operators import check_koopman_stage
from qsf_jax.models import fourier
from qsf_jax.models.blocks import BLOCKS
from qsf_jax.models.config import ModelConfig
from qsf_jax.models.ffn import compute_dtype
from qsf_jax.models.measurement import shift_right
from qsf_jax.models.norms import STATS, Norm

_CAPTURED = ("norm1", "koopman", "attn")


class LayerStep(NamedTuple):
  """One layer of the replay (all float32 arrays (B, T, d)).

  Attributes:
    layer: the layer index l (0-based).
    h_in: h^(l).
    k_in: the input of K^(l).
    x_tgt: the measurement target, or None (Stage II).
    h_out: h^(l+1).
  """
  layer: int
  h_in: jax.Array
  k_in: jax.Array
  x_tgt: jax.Array | None
  h_out: jax.Array


def _koopman_mode(cfg: ModelConfig) -> str:
  if cfg.stage == "koopman":
    return cfg.koopman_mixer
  return "cosine" if cfg.stage3_keep_fourier else "none"


def koopman_input(cfg: ModelConfig, u_BTD, kterm_BTD, b_D):
  """The vector the Koopman matrix multiplies (QSF §3.3-3.4, D2).

    none:      u                      (K term = u K^T + b)
    cosine:    diag(c')^{-1}(M o C_T) u   (S2-a)
    recurrent: s_{t-1}, s_t = K s_{t-1} + u_t = (K term - b)_t, s_{-1} = 0   (S2-c)

  Args:
    cfg: model configuration.
    u_BTD: the normalised layer input (B, T, d).
    kterm_BTD: the Koopman sub-module's output (B, T, d).
    b_D: its bias (d,).
  """
  mode = _koopman_mode(cfg)
  if mode == "none":
    return u_BTD
  if mode == "cosine":
    return fourier.causal_cosine_mix(u_BTD, t_max=cfg.max_seq_len, dtype=compute_dtype(cfg))
  s_BTD = kterm_BTD - b_D[None, None, :]
  return shift_right(s_BTD[:, :, None, :])[:, :, 0, :]


def _captured(mdl, method_name: str) -> bool:
  return method_name == "__call__" and mdl.name in _CAPTURED


@functools.partial(jax.jit, static_argnames=("cfg",))
def _layer(p_l, stats_l, h_BTD, beta, *, cfg: ModelConfig):
  """One block with its intermediates: (h_out, k_in, x_tgt or None)."""
  variables = {"params": p_l}
  if stats_l is not None:
    variables[STATS] = stats_l
  ctx = (beta, jnp.zeros((), jnp.int32))
  (h_out, _), state = BLOCKS[cfg.stage](cfg).apply(
      variables, h_BTD, ctx, capture_intermediates=_captured, mutable=["intermediates"])
  inter = state["intermediates"]
  u_BTD = inter["norm1"]["__call__"][0]
  kterm_BTD = inter["koopman"]["__call__"][0]
  k_in = koopman_input(cfg, u_BTD, kterm_BTD, p_l["koopman"]["b"])
  x_tgt = inter["attn"]["__call__"][0][0] if "attn" in inter else None
  return h_out, k_in.astype(jnp.float32), x_tgt


def embed(params, tokens_BT):
  """h^(0) = E[x_t] + P[t] (the model's input, ``qsf_jax.models.lm``).

  Args:
    params: the model's parameters.
    tokens_BT: token ids (B, T) integer.

  Returns:
    (B, T, d) float32.
  """
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  if tokens_BT.ndim != 2:
    raise ValueError(f"tokens_BT must have shape (B, T), got {tuple(tokens_BT.shape)}")
  T = tokens_BT.shape[1]
  P_TD = params["pos_embed"]["embedding"]
  if T > P_TD.shape[0]:
    raise ValueError(f"tokens_BT has {T} positions; the model allows {P_TD.shape[0]}")
  E_VD = jnp.asarray(params["embed"]["embedding"])
  _checks.check_token_ids("tokens_BT", tokens_BT, E_VD.shape[0])
  return E_VD[tokens_BT] + jnp.asarray(P_TD)[:T][None]


def _layer_stats(collections, l: int):
  stats = (collections or {}).get(STATS, {}).get("layers")
  return None if stats is None else jax.tree.map(lambda x: np.asarray(x)[l], stats)


def iter_layers(params, collections, cfg: ModelConfig, tokens_BT, beta=0.0
                ) -> Iterator[LayerStep]:
  """Replays the model one layer at a time (QSF eq. 60 per layer).

  Args:
    params: model parameters (Stage II-IV).
    collections: the other collections (``norm_stats`` for Stages III/IV).
    cfg: the ``ModelConfig``.
    tokens_BT: token ids (B, T).
    beta: normalisation-anneal weight (D5).

  Yields:
    A ``LayerStep`` per layer, in order.
  """
  check_koopman_stage(cfg.stage)
  h_BTD = embed(params, tokens_BT)
  beta = jnp.asarray(beta, jnp.float32)
  layers = jax.device_get(params["layers"])  # host slicing: no dispatch per leaf and layer
  for l in range(cfg.n_layers):
    p_l = jax.tree.map(lambda x, l=l: x[l], layers)
    h_out, k_in, x_tgt = _layer(p_l, _layer_stats(collections, l), h_BTD, beta, cfg=cfg)
    yield LayerStep(l, h_BTD, k_in, x_tgt, h_out)
    h_BTD = h_out


def final_states(params, collections, cfg: ModelConfig, h_BTD, beta=0.0):
  """z = N_f(h_L), the final-normalised state (QSF §3.4 "Output", D9).

  Args:
    params: model parameters.
    collections: the other collections.
    cfg: the ``ModelConfig``.
    h_BTD: h_L (B, T, d).
    beta: normalisation-anneal weight.

  Returns:
    z (B, T, d) float32.
  """
  variables = {"params": params["final_norm"]}
  stats = (collections or {}).get(STATS, {}).get("final_norm")
  if stats is not None:
    variables[STATS] = stats
  norm = Norm(cfg, annealed=cfg.annealed)
  return norm.apply(variables, h_BTD, jnp.asarray(beta, jnp.float32))
