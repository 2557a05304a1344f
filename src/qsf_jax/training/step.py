"""The jitted train and eval steps.

A batch is a dict of ``inputs`` (int32, (B, T)), ``targets`` (int32, (B, T);
``targets[:, t]`` is the token after ``inputs[:, t]``) and ``mask`` (float32,
(B, T); 1 for real targets, 0 for padding). With gradient accumulation every
array carries a leading micro-batch axis (A, B/A, T).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qsf_jax import _checks, _checks_values
from qsf_jax.models.norms import anneal_beta, ramp_start
from qsf_jax.training.state import TrainState


def masked_xent_sum(logits_BTV, targets_BT, mask_BT):
  """Sum over tokens of the cross entropy and the token count (QSF spec D13).

    L_sum = sum_{b,t} m_{bt} (logsumexp_v z_{btv} - z_{bt y_{bt}}),  N = sum m_{bt}

  The logits are upcast to float32 first, whatever the compute dtype.

  Args:
    logits_BTV: logits (B, T, V).
    targets_BT: target ids (B, T).
    mask_BT: 1 for counted targets, 0 for padding (B, T).

  Returns:
    (L_sum, N) float32 scalars.
  """
  logits_BTV = _checks.as_array("logits_BTV", logits_BTV)
  _checks.check_ndim("logits_BTV", logits_BTV, 3)
  B, T, V = logits_BTV.shape
  targets_BT = _checks.as_array("targets_BT", targets_BT)
  mask_BT = _checks.as_array("mask_BT", mask_BT)
  _checks.check_shape("targets_BT", targets_BT, (B, T))
  _checks.check_shape("mask_BT", mask_BT, (B, T))
  if not jnp.issubdtype(targets_BT.dtype, jnp.integer):
    raise ValueError(f"targets_BT must be integer token ids, got dtype {targets_BT.dtype}")
  check_targets("targets_BT", targets_BT, mask_BT, V)
  xent_BT = token_xent(logits_BTV, targets_BT)
  mask_BT = mask_BT.astype(jnp.float32)
  return jnp.sum(xent_BT * mask_BT), jnp.sum(mask_BT)


def check_targets(name: str, targets, mask, vocab_size: int) -> None:
  """Raises ``ValueError`` for concrete target ids the loss cannot score (tracers pass).

  An id >= V gives a NaN cross entropy, which a zero mask does not remove
  (NaN * 0 = NaN); a negative id would be scored as class V + id, so it is
  refused where the mask counts it and allowed at masked positions (the usual
  ignore-index padding).
  """
  t, m = _checks_values._concrete(targets), _checks_values._concrete(mask)
  if t is None or not t.size:
    return
  hi = int(t.max())
  counted_lo = int(t[m != 0].min()) if m is not None and np.any(m != 0) else 0
  if hi >= vocab_size or counted_lo < 0:
    raise ValueError(
        f"{name} has ids in [{min(int(t.min()), counted_lo)}, {hi}], outside the vocabulary "
        f"0..{vocab_size - 1} (negative ids are allowed only where the mask is 0)")


def token_xent(logits_BTV, targets_BT):
  """Each token's cross entropy in nats, from float32 logits (QSF spec D13).

    xent_{bt} = logsumexp_v z_{btv} - z_{bt y_{bt}}

  Args:
    logits_BTV: logits (B, T, V), upcast to float32 first.
    targets_BT: integer target ids (B, T).

  Returns:
    float32 (B, T).
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                         targets_BT)


def _apply(model, params, collections, inputs, beta, update_stats: bool, mask=None):
  variables = {"params": params, **collections}
  if update_stats:
    logits, updates = model.apply(variables, inputs, beta=beta, update_stats=True,
                                  stats_mask=mask, mutable=list(collections))
    return logits, {**collections, **updates}
  return model.apply(variables, inputs, beta=beta), collections


BATCH_KEYS = ("inputs", "targets", "mask")


def check_batch(batch, grad_accum: int = 1) -> None:
  """Validates a batch at trace time (keys, ranks, matching shapes, integer ids).

  Args:
    batch: dict with ``inputs``, ``targets`` (integer) and ``mask``, each
      (B, T), or (A, B/A, T) with ``grad_accum = A > 1``.
    grad_accum: A.
  """
  if not isinstance(batch, dict) or set(batch) != set(BATCH_KEYS):
    got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(f"batch must be a dict with keys {list(BATCH_KEYS)}, got {got}")
  rank = 2 if grad_accum == 1 else 3
  shape = tuple(batch["inputs"].shape)
  for k in BATCH_KEYS:
    x = batch[k]
    _checks.check_ndim(f"batch[{k!r}]", x, rank)
    if tuple(x.shape) != shape:
      raise ValueError(f"batch[{k!r}] has shape {tuple(x.shape)}, but batch['inputs'] has "
                       f"shape {shape}")
  if rank == 3 and shape[0] != grad_accum:
    raise ValueError(f"batch arrays must have a leading micro-batch axis of {grad_accum}, "
                     f"got shape {shape}")
  for k in ("inputs", "targets"):
    if not jnp.issubdtype(batch[k].dtype, jnp.integer):
      raise ValueError(f"batch[{k!r}] must hold integer token ids, got {batch[k].dtype}")


def in_stats_window(step, total_steps: int, anneal_frac: float, stats_steps: int,
                    hold_frac: float = 0.0):
  """Whether update ``step`` collects the D5 norm statistics (traced bool).

    t0 - n_stats <= t < t0,   t0 = floor((1 - f - h) S), the start of the ramp

  as ``qsf_jax.models.norms.stats_window``, but usable inside ``jit``.
  """
  start = ramp_start(total_steps, anneal_frac, hold_frac)
  return (step >= start - stats_steps) & (step < start)


def make_train_step(model, tx: optax.GradientTransformation, *,
                    schedule: Callable[[Any], jax.Array], total_steps: int,
                    anneal_frac: float = 0.15, anneal_shape: str = "linear",
                    anneal_hold_frac: float = 0.0, grad_accum: int = 1,
                    stats_steps: int | None = None):
  """Builds ``train_step(state, batch) -> (state, metrics)``, jitted, state donated.

  One call applies one optimizer update. With ``grad_accum = A`` the batch
  holds A micro-batches; their gradients of the *summed* token loss are added
  in float32 and divided by the total token count, so the update equals the
  one on the whole batch at once. So does the D5 statistics update: every
  micro-batch runs with the step's statistics, and their EMA updates are
  averaged with the micro-batches' token counts as weights (the update is
  affine in the masked mean it adds), one EMA step per optimizer update.

  Args:
    model: Flax module, ``apply(variables, tokens_BT, beta=...) -> logits_BTV``.
    tx: the optimizer.
    schedule: the learning-rate schedule (for logging).
    total_steps: S, for the normalisation anneal (D5).
    anneal_frac: final fraction of steps over which beta ramps to 1.
    anneal_shape: "linear" or "cosine".
    anneal_hold_frac: final fraction of steps held at beta = 1 after the ramp.
    grad_accum: number of micro-batches A.
    stats_steps: for models with a ``norm_stats`` collection (D5), the length
      of the window before the anneal in which the statistics are updated;
      the model always runs with ``update_stats=True`` and the new statistics
      are kept only inside the window, so one compiled step serves all steps.
      None: the collections are never updated.

  Returns:
    The jitted step. Metrics: ``loss`` (mean token CE), ``tokens``,
    ``grad_norm`` (before clipping), ``lr``, ``beta``.
  """

  update_stats = stats_steps is not None

  def micro_loss(params, collections, batch, beta):
    logits, new_coll = _apply(model, params, collections, batch["inputs"], beta, update_stats,
                              batch["mask"])
    l_sum, n = masked_xent_sum(logits, batch["targets"], batch["mask"])
    return l_sum, (n, new_coll)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch: dict):
    check_batch(batch, grad_accum)
    beta = anneal_beta(state.step, total_steps, anneal_frac=anneal_frac, shape=anneal_shape,
                       hold_frac=anneal_hold_frac)
    if grad_accum == 1:
      (l_sum, (n, collections)), g_sum = grad_fn(state.params, state.collections, batch, beta)
    else:
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

      def body(carry, micro):
        g_acc, l_acc, n_acc, d_acc = carry
        # every micro-batch starts from the step's statistics, as the whole batch does
        (l, (n, coll)), g = grad_fn(state.params, state.collections, micro, beta)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        d_acc = jax.tree.map(lambda a, new, old: a + n * (new - old), d_acc, coll,
                             state.collections)
        return (g_acc, l_acc + l, n_acc + n, d_acc), None

      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
              jax.tree.map(jnp.zeros_like, state.collections))
      (g_sum, l_sum, n, d_sum), _ = jax.lax.scan(body, init, batch)
      # The EMA update is affine in the batch's masked mean, so the token-weighted mean of
      # the micro-batches' updates is the whole batch's update (the count advances by 1).
      collections = jax.tree.map(lambda old, d: old + d / jnp.maximum(n, 1.0),
                                 state.collections, d_sum)
    if update_stats:
      keep = in_stats_window(state.step, total_steps, anneal_frac, stats_steps,
                             anneal_hold_frac)
      collections = jax.tree.map(lambda new, old: jnp.where(keep, new, old),
                                 collections, state.collections)
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        rng=jax.random.split(state.rng)[0], collections=collections)
    metrics = {"loss": l_sum / denom, "tokens": n, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step), "beta": beta}
    layers = params.get("layers", {}) if isinstance(params, dict) else {}
    if isinstance(layers, dict) and "alpha" in layers:  # QSF Fig. 1: alpha_l over training
      metrics["alpha"] = jnp.ravel(layers["alpha"]).astype(jnp.float32)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0)


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_step(params, collections, batch, beta, *, model):
  logits, _ = _apply(model, params, collections, batch["inputs"], beta, False)
  return masked_xent_sum(logits, batch["targets"], batch["mask"])


def check_eval_batch(model, batch: dict, beta) -> None:
  """The checks of ``eval_step``: the batch's keys and shapes, its concrete ids
  against the model's vocabulary (``check_targets`` for the targets) and beta in
  [0, 1]. Run it on the host batch, before sharding, to avoid a device copy."""
  check_batch(batch)
  cfg = getattr(model, "cfg", None)
  if cfg is not None:
    _checks.check_token_ids("batch['inputs']", batch["inputs"], cfg.vocab_size)
    check_targets("batch['targets']", batch["targets"], batch["mask"], cfg.vocab_size)
  _checks.check_unit_interval("beta", beta)


def eval_step(model, params, collections, batch: dict, beta) -> tuple[jax.Array, jax.Array]:
  """Summed token cross entropy and token count of one batch (QSF spec D13).

  Args:
    model: the Flax module (hashable; a jit static argument).
    params: parameters.
    collections: the model's other collections.
    batch: ``inputs``, ``targets``, ``mask`` (B, T).
    beta: the anneal weight to evaluate at, in [0, 1].

  Raises:
    ValueError: for a malformed batch, concrete ids outside the model's
      vocabulary (``check_eval_batch``), or beta outside [0, 1].
  """
  check_eval_batch(model, batch, beta)
  return _eval_step(params, collections, batch, jnp.asarray(beta, jnp.float32), model=model)
