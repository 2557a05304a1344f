"""The language-model wrapper shared by every stage but ``wave`` (QSF §3.4 "Output").

  h_0 = E[x_t] + P[t]               (tied token embedding, learned positions)
  h_L = layers(h_0)                 (``nn.scan`` over L identical blocks)
  logits = N_f(h_L) E^T             (float32; N_f annealed in Stages III/IV)

Parameter tree: ``embed/embedding`` (V, d), ``pos_embed/embedding`` (T_max, d),
``layers/...`` (every leaf with a leading layer axis L), ``final_norm``, and
``lm_head`` only if ``tie_embeddings`` is False.

Calling convention (all stages):

* ``model.init(key, tokens_BT)`` -> ``{"params", ["norm_stats"]}``.
* ``model.apply(variables, tokens_BT, beta=b)`` -> logits (B, T, V) float32;
  ``last_only=True`` -> the last position's logits (B, 1, V), without computing
  the head at the other positions.
* ``update_stats=True`` with ``mutable=["norm_stats"]`` updates the D5 EMA,
  averaged over the positions of ``stats_mask`` (B, T) (the loss mask; the
  train step passes it) when ``cfg.ls_stats_positions="loss"``.
* ``decode=True``: tokens (B, 1), with a ``"cache"`` collection (create it with
  :func:`init_cache`) passed in and ``mutable=["cache"]``; each call consumes
  one token at the cached position and returns its logits (B, 1, V). The
  caller must not decode past ``max_seq_len`` tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qsf_jax import _checks
from qsf_jax.models.blocks import BLOCKS
from qsf_jax.models.config import ModelConfig
from qsf_jax.models.ffn import compute_dtype
from qsf_jax.models.norms import Norm


def check_tokens(tokens_BT, cfg: ModelConfig, decode: bool):
  """Validates the token array at trace time (and concrete ids); returns it as int32.

  Concrete ids outside 0..V-1 are refused. Traced ids (under ``jit``) cannot be
  checked; negative ones are mapped to V, so that every invalid id gives NaN
  logits (the embedding lookup fills out-of-range rows with NaN; the NaN can
  reach other positions of its row) instead of a negative id silently wrapping
  to a real token (-1 would read row V-1).

  Args:
    tokens_BT: token ids (B, T) integer; T = 1 when decoding, T <= max_seq_len.
    cfg: model configuration.
    decode: whether this is a decode call.
  """
  tokens_BT = _checks.as_array("tokens_BT", tokens_BT)
  _checks.check_ndim("tokens_BT", tokens_BT, 2)
  if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
    raise ValueError(f"tokens_BT must be integer token ids, got dtype {tokens_BT.dtype}")
  T = tokens_BT.shape[1]
  if decode and T != 1:
    raise ValueError(f"decode=True takes one token per call: tokens_BT must have shape "
                     f"(B, 1), got {tuple(tokens_BT.shape)}")
  if T > cfg.max_seq_len or T < 1:
    raise ValueError(f"tokens_BT has {T} positions (shape {tuple(tokens_BT.shape)}); "
                     f"the model allows 1..max_seq_len={cfg.max_seq_len}")
  _checks.check_token_ids("tokens_BT", tokens_BT, cfg.vocab_size)  # concrete ids only
  tokens_BT = tokens_BT.astype(jnp.int32)
  return jnp.where(tokens_BT < 0, cfg.vocab_size, tokens_BT)


def check_last_only(last_only, update_stats) -> None:
  """``last_only`` must be a bool, and cannot update the D5 statistics (which
  average over every position)."""
  if isinstance(last_only, jax.core.Tracer):
    raise ValueError("last_only must be a Python bool, but it is traced: under jax.jit pass "
                     "it as static (jax.jit(model.apply, static_argnames=['last_only']))")
  if not isinstance(last_only, bool):
    raise ValueError(f"last_only must be a bool, got {last_only!r}")
  if last_only and update_stats:
    raise ValueError("last_only=True cannot update the norm statistics "
                     "(update_stats=True averages over every position)")


def decode_position(module: nn.Module, decode: bool, batch_size: int):
  """The cached decode position t (int32 scalar), advanced by one per call.

  The cache also holds a (B,) marker of the batch size it was built for, so that
  a cache from ``init_cache(model, B)`` used with another batch size is refused
  by name (the layers' own shape errors would not mention the cache).
  """
  if not decode:
    return jnp.zeros((), jnp.int32)
  if (not module.is_initializing() and not module.has_variable("cache", "index")
      and not module.is_mutable_collection("cache")):  # else flax's ScopeCollectionNotFound
    raise ValueError("decode=True needs a 'cache' collection: apply with "
                     "{'params': ..., 'cache': init_cache(model, batch_size)} and "
                     "mutable=['cache'] (see training.sampling.generate)")
  marker = module.variable("cache", "batch", lambda: jnp.zeros((batch_size,), jnp.int8))
  if marker.value.shape != (batch_size,):
    raise ValueError(f"the decode cache was built for batch size {marker.value.shape[0]}, "
                     f"but tokens_BT has batch size {batch_size}: build it with "
                     f"init_cache(model, {batch_size})")
  index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
  t = index.value
  if not module.is_initializing():
    index.value = t + 1
  return t


class QSFLanguageModel(nn.Module):
  """Embedding + ``nn.scan`` over the stage's blocks + final norm + tied head.

  Attributes:
    cfg: model configuration (any stage but ``wave``).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, *, beta=0.0, update_stats=False, stats_mask=None,
               decode=False, last_only=False):
    """Next-token logits (see the module docstring).

    Args:
      tokens_BT: token ids (B, T); (B, 1) when decoding.
      beta: Stage III/IV anneal weight in [0, 1] (D5); ignored by other stages.
      update_stats: update the D5 EMA (needs ``mutable=["norm_stats"]``).
      stats_mask: weights (B, T) of the positions the D5 EMA averages over
        (the loss mask); used with ``cfg.ls_stats_positions="loss"``. None:
        every position.
      decode: consume one token using the ``"cache"`` collection.
      last_only: return the last position's logits only, (B, 1, V): the final
        norm and the head skip the other positions (not with ``update_stats``).

    Returns:
      logits (B, T, V) float32; (B, 1, V) with ``last_only``.
    """
    cfg = self.cfg
    check_last_only(last_only, update_stats)
    tokens_BT = check_tokens(tokens_BT, cfg, decode)
    T = tokens_BT.shape[1]
    init = nn.initializers.normal(cfg.init_std)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init,
                     param_dtype=jnp.float32, name="embed")
    pos = nn.Embed(cfg.max_seq_len, cfg.d_model, embedding_init=init,
                   param_dtype=jnp.float32, name="pos_embed")
    t = decode_position(self, decode, tokens_BT.shape[0])
    positions_T = (t + jnp.arange(T)) if decode else jnp.arange(T)
    h_BTD = embed(tokens_BT) + pos(positions_T)[None]
    _checks.check_unit_interval("beta", beta)  # the shape under jit too
    beta = jnp.asarray(beta, jnp.float32)
    if stats_mask is not None:
      stats_mask = _checks.as_array("stats_mask", stats_mask)
      _checks.check_shape("stats_mask", stats_mask, tokens_BT.shape)
    mask_BT = stats_mask if cfg.ls_stats_positions == "loss" else None

    Block = BLOCKS[cfg.stage]
    Stack = nn.scan(Block, variable_axes={"params": 0, "norm_stats": 0, "cache": 0},
                    split_rngs={"params": True}, in_axes=nn.broadcast,
                    length=cfg.n_layers)
    h_BTD, _ = Stack(cfg, decode=decode, update_stats=update_stats, name="layers")(
        h_BTD, (beta, t, mask_BT))

    if last_only:  # the final norm acts per position, and its stats are not updated
      h_BTD, mask_BT = h_BTD[:, -1:], None
    z_BTD = Norm(cfg, annealed=cfg.annealed, update_stats=update_stats,
                 name="final_norm")(h_BTD, beta, mask_BT)
    dt = compute_dtype(cfg)
    if cfg.tie_embeddings:
      W_VD = embed.embedding
    else:
      W_VD = self.param("lm_head", init, (cfg.vocab_size, cfg.d_model), jnp.float32)
    return jnp.einsum("btd,vd->btv", z_BTD.astype(dt), W_VD.astype(dt),
                      preferred_element_type=jnp.float32)


def build_model(cfg: ModelConfig) -> nn.Module:
  """The Flax Linen module of ``cfg.stage`` (see the module docstring for the API).

  Args:
    cfg: a ``ModelConfig`` (from ``get_config``).

  Returns:
    A module with ``__call__(tokens_BT, *, beta=0.0, update_stats=False,
    stats_mask=None, decode=False, last_only=False) -> logits_BTV``.
  """
  if not isinstance(cfg, ModelConfig):
    raise ValueError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
  if cfg.stage == "wave":
    from qsf_jax.models.wave import WaveLanguageModel  # pylint: disable=g-import-not-at-top
    return WaveLanguageModel(cfg)
  return QSFLanguageModel(cfg)


def init_cache(model: nn.Module, batch_size: int):
  """A zero ``"cache"`` collection for decoding ``batch_size`` sequences from position 0.

  Built from shapes only (``jax.eval_shape``), so no parameters are allocated.

  Args:
    model: a module from ``build_model``.
    batch_size: B.

  Returns:
    The cache pytree, to pass as ``{"params": ..., "cache": cache}``.
  """
  batch_size = _checks.check_int("batch_size", batch_size, 1)
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
