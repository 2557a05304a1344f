"""LayerNorm, its anneal to a linear scaling, and the anneal schedule (QSF §3.4, D5).

During the final ``anneal_frac`` of Stage III/IV training (or the ``anneal_frac``
before a final ``anneal_hold_frac`` held at beta = 1) every norm interpolates

  N_beta(u) = (1 - beta) LN(u) + beta LS(u),   LS(u) = gamma * u / s_bar + beta_LN,

with gamma, beta_LN the LayerNorm's own affine parameters and s_bar a frozen
scalar per norm layer. At beta = 1 the norm is affine in u, so each layer is
affine in h given the attention target (D20; the paper's "exact
eigendecomposition").

s_bar (D5, ``ls_scale="ema"``) is the stop-gradient EMA (decay 0.99) of the
per-token standard deviation of u, averaged over the positions the loss counts
(``ls_stats_positions="loss"``; padding would otherwise dominate short stories)
and collected in the ``"norm_stats"`` collection
while the caller passes ``update_stats=True`` (the ``stats_steps`` steps before
the anneal, see :func:`stats_window`) and frozen afterwards. The EMA starts at
zero and is bias-corrected, s_bar = ema / (1 - decay^n) after n updates, so it is
unbiased even when fewer than 1/(1 - decay) updates were made; before any update
s_bar = 1.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from qsf_jax import _checks, _checks_values
from qsf_jax.models.config import ModelConfig

STATS = "norm_stats"


def _lead(p_D, u):
  """Reshapes a (d,) parameter to (1, ..., 1, d) for explicit broadcasting against u."""
  return p_D.reshape((1,) * (u.ndim - 1) + p_D.shape)


def layer_norm(u, gamma, bias, eps):
  """LN(u) = gamma * (u - mean(u)) / sqrt(var(u) + eps) + bias over the last axis.

  Args:
    u: input (..., d), any float dtype (computed in float32 or wider).
    gamma: scale (d,).
    bias: shift (d,).
    eps: variance epsilon.

  Returns:
    (..., d) in float32 (float64 for float64 input).
  """
  u = u.astype(jnp.promote_types(u.dtype, jnp.float32))
  mean = jnp.mean(u, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(u - mean), axis=-1, keepdims=True)
  return (u - mean) * jax.lax.rsqrt(var + eps) * _lead(gamma, u) + _lead(bias, u)


def linear_scaling(u, gamma, bias, s_bar):
  """LS(u) = gamma * u / s_bar + bias (QSF §3.4, decision D5): affine in u.

  Args:
    u: input (..., d).
    gamma: the LayerNorm scale (d,).
    bias: the LayerNorm shift (d,).
    s_bar: frozen scalar scale (scalar > 0).

  Returns:
    (..., d) in float32 (float64 for float64 input).
  """
  u = u.astype(jnp.promote_types(u.dtype, jnp.float32))
  return _lead(gamma, u) * (u / s_bar) + _lead(bias, u)


class Norm(nn.Module):
  """LayerNorm with parameters ``scale`` and ``bias``; optionally annealed (D5).

  Attributes:
    cfg: the model configuration (``ln_eps``, ``ls_scale``, ``ls_ema_decay``).
    annealed: whether this norm interpolates to LS with ``beta`` (Stages III/IV).
    update_stats: update the EMA of the per-token std (needs
      ``mutable=["norm_stats"]``).
  """
  cfg: ModelConfig
  annealed: bool = False
  update_stats: bool = False

  @nn.compact
  def __call__(self, u_BTD, beta=0.0, mask_BT=None):
    """N_beta(u) = (1 - beta) LN(u) + beta LS(u) (QSF §3.4); plain LN if not annealed.

    Args:
      u_BTD: norm input (B, T, d).
      beta: anneal weight in [0, 1] (scalar, may be traced).
      mask_BT: weights (B, T) of the positions the D5 statistics average over
        (the loss mask, so padding does not count); None: every position.

    Returns:
      (B, T, d) float32.
    """
    d = u_BTD.shape[-1]
    gamma = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    ln = layer_norm(u_BTD, gamma, bias, self.cfg.ln_eps)
    if not self.annealed:
      return ln
    ls = linear_scaling(u_BTD, gamma, bias, self.s_bar(u_BTD, mask_BT))
    beta = jnp.asarray(beta, ln.dtype)
    return (1.0 - beta) * ln + beta * ls

  def s_bar(self, u_BTD, mask_BT=None):
    """The frozen scale s_bar of LS (D5), updating its EMA if ``update_stats``.

    The update averages the per-token std of u over the positions with
    ``mask_BT`` > 0 (all positions if None); a batch without any such position
    leaves the EMA and its count unchanged.
    """
    cfg = self.cfg
    d = u_BTD.shape[-1]
    if cfg.ls_scale == "one":
      return jnp.float32(1.0)
    if cfg.ls_scale == "sqrt_d":
      return jnp.float32(math.sqrt(d))
    if not (self.has_variable(STATS, "ema") or self.is_mutable_collection(STATS)):
      raise ValueError(
          f"stage {cfg.stage!r} keeps the linear-scaling scale s_bar (D5) in the "
          f"{STATS!r} collection: pass the {STATS!r} variables returned by "
          "model.init along with 'params'")
    if self.update_stats and not (self.is_initializing() or self.is_mutable_collection(STATS)):
      raise ValueError(  # else flax's ModifyScopeVariableError, deep inside the layer scan
          f"update_stats=True updates the linear-scaling statistics s_bar (D5) of stage "
          f"{cfg.stage!r}: apply with mutable=[{STATS!r}] and keep the returned "
          f"{STATS!r} variables")
    ema = self.variable(STATS, "ema", lambda: jnp.zeros((), jnp.float32))
    count = self.variable(STATS, "count", lambda: jnp.zeros((), jnp.float32))
    decay = jnp.float32(cfg.ls_ema_decay)
    n = count.value
    corr = jnp.where(n > 0, 1.0 - decay ** n, 1.0)
    s_bar = jnp.where(n > 0, ema.value / corr, 1.0)
    if self.update_stats and not self.is_initializing():
      u32 = jax.lax.stop_gradient(u_BTD.astype(jnp.float32))
      std_BT = jnp.std(u32, axis=-1)
      if mask_BT is None:
        seen, mean = jnp.float32(1.0), jnp.mean(std_BT)
      else:
        w_BT = jax.lax.stop_gradient(jnp.asarray(mask_BT, jnp.float32))
        total = jnp.sum(w_BT)
        seen = (total > 0).astype(jnp.float32)
        mean = jnp.sum(std_BT * w_BT) / jnp.maximum(total, 1e-30)
      ema.value = jnp.where(seen > 0, decay * ema.value + (1.0 - decay) * mean, ema.value)
      count.value = n + seen
    return s_bar


def anneal_beta(step, total_steps, *, anneal_frac=0.15, shape="linear", hold_frac=0.0):
  """The anneal weight beta_t (QSF §3.4, decision D5).

    beta_t = clip((t - (1 - f - h) S) / (f S), 0, 1)    (shape "linear")
    beta_t = (1 - cos(pi * beta_t^lin)) / 2              (shape "cosine")

  With h = 0 (the spec) the ramp ends at the last step; h > 0 holds beta = 1
  for the final h S steps (``ModelConfig.anneal_hold_frac``).

  Args:
    step: training step t (int or traced scalar).
    total_steps: S, the total number of steps of the stage.
    anneal_frac: f, the fraction of steps of the ramp (0.15).
    shape: "linear" or "cosine".
    hold_frac: h, the final fraction of steps held at beta = 1 (0).

  Returns:
    beta in [0, 1] (float32 scalar).

  Raises:
    ValueError: for a concrete total_steps < 1, f outside (0, 1], h outside
      [0, 1 - f] or an unknown shape (the ramp would be NaN or lie outside the
      run). Traced values are not checked.
  """
  if shape not in ("linear", "cosine"):
    raise ValueError(f"shape must be one of ['linear', 'cosine'], got {shape!r}")
  vals = {}
  for name, value in (("total_steps", total_steps), ("anneal_frac", anneal_frac),
                      ("hold_frac", hold_frac)):
    _checks.check_scalar(name, value)
    v = _checks_values._concrete(value)
    if v is not None:
      vals[name] = float(_checks_values._real(name, value, v))
  if not vals.get("total_steps", 1.0) >= 1:  # NaN too
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  f, h = vals.get("anneal_frac", 0.5), vals.get("hold_frac", 0.0)
  if not 0.0 < f <= 1.0:
    raise ValueError(f"anneal_frac must be in (0, 1], got {anneal_frac}")
  if not (0.0 <= h and f + h <= 1.0):
    raise ValueError(f"hold_frac must be in [0, 1 - anneal_frac] = [0, {1.0 - f:g}], "
                     f"got {hold_frac}")
  # = (t - (1 - f - h) S) / (f S), written so that t = (1 - h) S gives exactly 1 in
  # float32 (and t = (1 - f - h) S exactly 0 where f S and h S are integers)
  ramp = jnp.float32(anneal_frac * total_steps)
  end = jnp.float32(total_steps) - jnp.float32(hold_frac * total_steps)
  beta = jnp.clip(1.0 - (end - jnp.float32(step)) / ramp, 0.0, 1.0)
  if shape == "cosine":
    beta = 0.5 * (1.0 - jnp.cos(jnp.pi * beta))
  return beta


def stats_window(step, total_steps, *, anneal_frac=0.15, stats_steps=500, hold_frac=0.0):
  """Whether step t collects the D5 statistics: t0 - stats_steps <= t < t0.

  t0 = floor((1 - f - h) S), the first step of the ramp.

  Args:
    step: training step t (int).
    total_steps: S.
    anneal_frac: f.
    stats_steps: length of the collection window (500).
    hold_frac: h, the final fraction of steps held at beta = 1 (0).

  Returns:
    bool.
  """
  start = ramp_start(total_steps, anneal_frac, hold_frac)
  return start - stats_steps <= int(step) < start


def ramp_start(total_steps, anneal_frac, hold_frac=0.0) -> int:
  """t0 = floor((1 - f - h) S), the step at which the D5 ramp starts."""
  return int(math.floor((1.0 - anneal_frac - hold_frac) * total_steps))
