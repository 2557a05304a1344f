"""AdamW with a OneCycle schedule, decay on matrices only, global-norm clipping.

QSF spec §4.1: AdamW, weight decay 0.1, gradient clipping at global norm 1.0,
OneCycle schedule. Decision D10 fixes the unknown details to PyTorch's
``OneCycleLR`` defaults (max LR 1e-3, ``pct_start=0.3``, cosine annealing,
``div_factor=25``, ``final_div_factor=1e4``); decision D11 applies the weight
decay to matrices only (embeddings, Koopman matrices, projections, FFN), never
to biases, normalisation parameters or the attention strengths alpha. PyTorch's
``OneCycleLR`` also cycles Adam's b1 by default (0.95 -> 0.85 -> 0.95), and so
does ``make_optimizer`` (``cycle_momentum``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qsf_jax import _checks, _checks_values
from qsf_jax.models.params import weight_decay_mask


def onecycle_schedule(total_steps: int, max_lr: float = 1e-3, *,
                      pct_start: float = 0.3, div_factor: float = 25.0,
                      final_div_factor: float = 1e4) -> Callable[[Any], jax.Array]:
  """PyTorch ``OneCycleLR`` (two phases, cosine annealing), QSF spec D10.

  With ``lr_0 = max_lr / div_factor``, ``lr_min = lr_0 / final_div_factor``,
  ``s_1 = pct_start * S - 1`` and ``s_2 = S - 1`` (S = ``total_steps``)::

    lr(t) = cos_anneal(lr_0, max_lr, t / s_1)                  for t <= s_1
    lr(t) = cos_anneal(max_lr, lr_min, (t - s_1) / (s_2 - s_1)) otherwise
    cos_anneal(a, b, p) = b + (a - b) / 2 * (1 + cos(pi p))

  exactly as ``torch.optim.lr_scheduler.OneCycleLR`` with
  ``three_phase=False, anneal_strategy="cos"``; step t is the number of
  optimizer updates already applied. Steps past ``S - 1`` keep ``lr_min``.

  Args:
    total_steps: S, the number of optimizer updates (>= 2).
    max_lr: the peak learning rate.
    pct_start: fraction of the steps spent increasing the learning rate.
    div_factor: ``max_lr / lr_0``.
    final_div_factor: ``lr_0 / lr_min``.

  Returns:
    A schedule ``count -> lr`` (float32 scalar), usable inside ``jit``.
  """
  _check_real("max_lr", max_lr, lo=0.0)
  _check_real("div_factor", div_factor, lo=0.0)
  _check_real("final_div_factor", final_div_factor, lo=0.0)
  s_1, s_2, up_span = _phases(total_steps, pct_start)
  lr_0 = max_lr / div_factor
  lr_min = lr_0 / final_div_factor

  def schedule(count):
    t = jnp.minimum(jnp.asarray(count, jnp.float32), s_2)
    up = _cos_anneal(lr_0, max_lr, t, up_span)
    down = _cos_anneal(max_lr, lr_min, t - s_1, s_2 - s_1)
    return jnp.where(t <= s_1, up, down).astype(jnp.float32)

  return schedule


def onecycle_momentum(total_steps: int, *, pct_start: float = 0.3,
                      base_momentum: float = 0.85,
                      max_momentum: float = 0.95) -> Callable[[Any], jax.Array]:
  """PyTorch ``OneCycleLR``'s momentum cycle (``cycle_momentum=True``), QSF spec D10.

  In the phases of ``onecycle_schedule``, Adam's b1 moves inversely to the
  learning rate::

    b1(t) = cos_anneal(max_momentum, base_momentum, t / s_1)                 t <= s_1
    b1(t) = cos_anneal(base_momentum, max_momentum, (t - s_1) / (s_2 - s_1))  otherwise

  as PyTorch sets ``betas[0]`` for Adam/AdamW (defaults 0.85 and 0.95).

  Args:
    total_steps: S, the number of optimizer updates (>= 2).
    pct_start: fraction of the steps spent increasing the learning rate.
    base_momentum: b1 at the learning-rate peak.
    max_momentum: b1 at the start and the end.

  Returns:
    A schedule ``count -> b1`` (float32 scalar), usable inside ``jit``.
  """
  for name, value in (("base_momentum", base_momentum), ("max_momentum", max_momentum)):
    _check_real(name, value)
  if not 0.0 <= base_momentum <= max_momentum < 1.0:
    raise ValueError(f"need 0 <= base_momentum <= max_momentum < 1, got {base_momentum}, "
                     f"{max_momentum}")
  s_1, s_2, up_span = _phases(total_steps, pct_start)

  def schedule(count):
    t = jnp.minimum(jnp.asarray(count, jnp.float32), s_2)
    up = _cos_anneal(max_momentum, base_momentum, t, up_span)
    down = _cos_anneal(base_momentum, max_momentum, t - s_1, s_2 - s_1)
    return jnp.where(t <= s_1, up, down).astype(jnp.float32)

  return schedule


def _check_real(name: str, value, *, lo: float | None = None, lo_closed: bool = False,
                hi: float | None = None, hi_closed: bool = False,
                allow_inf: bool = False) -> float:
  """``value`` as a float; ``ValueError`` unless it is a finite real in the given range.

  Python and NumPy numbers and concrete 0-d jax or numpy arrays (bfloat16 too)
  pass; ``allow_inf`` also lets +inf through.
  """
  v = None if isinstance(value, str) else _checks_values._concrete(value)
  ok = (v is not None and v.ndim == 0 and v.dtype != np.bool_
        and (jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)))
  if ok:
    value = float(v)
  if not ok or not (math.isfinite(value) or (allow_inf and value == math.inf)):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  if lo is not None and (value < lo if lo_closed else value <= lo):
    raise ValueError(f"{name} must be {'>=' if lo_closed else '>'} {lo:g}, got {value}")
  if hi is not None and (value > hi if hi_closed else value >= hi):
    raise ValueError(f"{name} must be {'<=' if hi_closed else '<'} {hi:g}, got {value}")
  return float(value)


def _phases(total_steps: int, pct_start: float) -> tuple[float, float, float]:
  """(s_1, s_2, warm-up span) of PyTorch's two-phase OneCycle."""
  total_steps = _checks.check_int("total_steps", total_steps)
  if total_steps < 2:
    raise ValueError(f"total_steps must be >= 2 for a OneCycle schedule, got {total_steps}")
  _check_real("pct_start", pct_start)
  if not (0.0 < pct_start < 1.0):
    raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
  s_1 = float(pct_start * total_steps) - 1.0
  s_2 = float(total_steps) - 1.0
  # For very short runs s_1 < 0: like PyTorch, the warm-up phase is skipped.
  # (At s_1 == 0 PyTorch divides by zero; here step 0 then gets the start value.)
  return s_1, s_2, max(s_1, 1e-9)


def _cos_anneal(a, b, done, span):
  """PyTorch's b + (a - b)/2 (1 + cos(pi p)), p = done / span.

  Written as a cos^2(pi p / 2) + b sin^2(pi p / 2), each weight evaluated from
  whichever of p and 1 - p = (span - done) / span is small (both exact for
  integer steps), so float32 keeps full relative precision at both ends.
  """
  p, q = done / span, (span - done) / span
  near_start = p <= 0.5
  w_a = jnp.where(near_start, jnp.cos(0.5 * jnp.pi * p), jnp.sin(0.5 * jnp.pi * q)) ** 2
  w_b = jnp.where(near_start, jnp.sin(0.5 * jnp.pi * p), jnp.cos(0.5 * jnp.pi * q)) ** 2
  return a * w_a + b * w_b


def decay_mask(params) -> Any:
  """Which leaves get weight decay (QSF spec D11): matrices only.

  Delegates to the model zoo's naming convention
  (``qsf_jax.models.weight_decay_mask``): E, P, K, S, every Dense ``kernel``
  and readout matrices decay; biases, norm parameters, alpha and the
  wave-function generators do not. The rule goes by name, not rank, because
  layers stacked by ``nn.scan`` give every leaf a leading layer axis.

  Args:
    params: the parameter pytree.

  Returns:
    A pytree of Python bools with the structure of ``params``.
  """
  return weight_decay_mask(params)


def make_optimizer(total_steps: int, *, max_lr: float = 1e-3, weight_decay: float = 0.1,
                   clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, pct_start: float = 0.3, cycle_momentum: bool = True,
                   base_momentum: float = 0.85,
                   max_momentum: float = 0.95) -> optax.GradientTransformation:
  """The QSF optimizer (spec §4.1, D10, D11): clip -> AdamW(OneCycle), masked decay.

  Updates are ``-lr(t) * (adam_b1(t)(g_clip) + wd * mask * theta)`` with
  ``g_clip = g * min(1, clip_norm / ||g||_2)`` (global norm over all leaves),
  PyTorch AdamW's defaults ``b2=0.999, eps=1e-8``, and b1 cycled between 0.95
  and 0.85 by ``onecycle_momentum`` as PyTorch's ``OneCycleLR`` does by
  default (``cycle_momentum=True``; Adam's bias correction 1 - b1(t)^(t+1)
  uses the current b1, as PyTorch's). With ``cycle_momentum=False`` b1 is fixed.

  Args:
    total_steps: number of optimizer updates in the run (the schedule length).
    max_lr: OneCycle peak learning rate (D10: 1e-3).
    weight_decay: decoupled weight decay on matrices (D11: 0.1).
    clip_norm: global gradient-norm threshold (spec: 1.0).
    b1: Adam first-moment decay when ``cycle_momentum`` is False.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    pct_start: OneCycle warm-up fraction (D10: 0.3).
    cycle_momentum: cycle b1 inversely to the learning rate (D10, PyTorch).
    base_momentum: b1 at the learning-rate peak.
    max_momentum: b1 at the start and end of the cycle.

  Returns:
    An ``optax.GradientTransformation``.
  """
  _check_real("clip_norm", clip_norm, lo=0.0, allow_inf=True)  # inf: no clipping
  _check_real("weight_decay", weight_decay, lo=0.0, lo_closed=True)
  _check_real("b1", b1, lo=0.0, lo_closed=True, hi=1.0)
  _check_real("b2", b2, lo=0.0, lo_closed=True, hi=1.0)
  _check_real("eps", eps, lo=0.0, lo_closed=True)
  cycle_momentum = _checks.check_flag("cycle_momentum", cycle_momentum)
  schedule = onecycle_schedule(total_steps, max_lr, pct_start=pct_start)
  if not cycle_momentum:
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=decay_mask),
    )
  momentum = onecycle_momentum(total_steps, pct_start=pct_start, base_momentum=base_momentum,
                               max_momentum=max_momentum)
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.inject_hyperparams(optax.scale_by_adam)(b1=momentum, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, decay_mask),
      optax.scale_by_learning_rate(schedule),
  )
