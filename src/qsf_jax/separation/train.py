"""Full-batch training on the exact expected cross-entropy (wave-function spec §2.3, §5).

The loss is

  L(params) = - sum_c w_c sum_k p*(k | c) log q(k | c),

over every context of the task, whose excess over the target entropy is the
expected KL divergence. Several seeds train at once (``jax.vmap`` over the
parameter pytrees); each jitted call runs ``log_every`` Adam steps in a
``jax.lax.scan``, so Python dispatch happens once per logged point.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qsf_jax import _checks
from qsf_jax.separation import bounds
from qsf_jax.separation.models import (ModelConfig, final_states, init_params, product_states,
                                       readout_log_probs, transitions)
from qsf_jax.tasks.separation import WORD_TOKEN, SeparationTask


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimiser settings.

  Attributes:
    steps: Adam steps per seed.
    lr: peak learning rate.
    log_every: steps per jitted chunk (one KL point per chunk).
    schedule: "cosine" (decay to lr * final_lr_frac) or "constant".
    final_lr_frac: final learning rate of the cosine schedule, as a fraction of lr.
    frozen: names of parameters kept at their initial value (e.g. a fixed readout).
  """
  steps: int = 3000
  lr: float = 1e-2
  log_every: int = 250
  schedule: str = "cosine"
  final_lr_frac: float = 0.01
  frozen: tuple = ()

  def __post_init__(self):
    _checks.plain_numbers(self)  # NumPy scalars -> Python numbers
    for name in ("steps", "log_every"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not (np.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"lr must be finite and > 0, got {self.lr}")
    if self.schedule not in ("cosine", "constant"):
      raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
    if not 0.0 <= self.final_lr_frac <= 1.0:
      raise ValueError(f"final_lr_frac must lie in [0, 1], got {self.final_lr_frac}")
    if (isinstance(self.frozen, str) or not isinstance(self.frozen, (tuple, list))
        or not all(isinstance(n, str) for n in self.frozen)):
      raise ValueError(f"frozen must be a tuple of parameter names, e.g. ('W_re', 'W_im'), "
                       f"got {self.frozen!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class TrainResult:
  """Outcome of training one model configuration over several seeds.

  Attributes:
    cfg: the model configuration.
    seeds: the seeds (S,).
    params: trained parameters, each leaf stacked over seeds (S, ...).
    steps_logged: step counts of the KL history (n,), starting with 0.
    kl_history: expected KL (training dtype) per seed and logged step (S, n).
    log_probs: final model log-probabilities, evaluated in float64 (S, C, K).
    kl: final expected KL per seed, float64 (S,).
    seconds: wall time of the training (compilation included).
  """
  cfg: ModelConfig
  seeds: tuple
  params: dict
  steps_logged: np.ndarray
  kl_history: np.ndarray
  log_probs: np.ndarray
  kl: np.ndarray
  seconds: float


def expected_cross_entropy(logq_CK, probs_CK, weights_C):
  """Exact expected cross-entropy L = -sum_c w_c sum_k p*(k|c) log q(k|c) (spec §2.3).

  Args:
    logq_CK: model log-probabilities (C, K).
    probs_CK: target probabilities p*(k | c) (C, K).
    weights_C: context probabilities w_c (C,).

  Returns:
    The scalar loss in nats.
  """
  return -jnp.sum(weights_C * jnp.sum(probs_CK * logq_CK, axis=-1))


def task_log_probs_fn(task: SeparationTask, cfg: ModelConfig):
  """A function params -> log q(k | c) over every context of ``task`` (spec §2.3).

  Uses the prefix-tree recurrence ``models.product_states`` when the task's
  contexts are all A^L cue sequences in lexicographic order (as ``make_task``
  builds them), else the generic per-context recurrence.

  Args:
    task: the T_N instance.
    cfg: the model configuration.

  Returns:
    A jit-friendly function of the parameters returning (C, K) log-probabilities.
  """
  A, L = task.num_cues, task.length
  full = np.asarray(list(itertools.product(range(A), repeat=L))) if A**L == task.C else None
  if full is not None and np.array_equal(task.tokens_CT[:, 1:] - 1, full) and np.all(
      task.tokens_CT[:, 0] == WORD_TOKEN):
    states = lambda T: product_states(T, A, L)
  else:
    tokens = jnp.asarray(task.tokens_CT)
    states = lambda T: final_states(T, tokens)
  return lambda params: readout_log_probs(params, states(transitions(params, cfg)), cfg)


def make_optimizer(tcfg: TrainConfig, params: dict) -> optax.GradientTransformation:
  """Adam with a constant or cosine-decayed learning rate; frozen leaves get no update.

  Args:
    tcfg: optimiser settings.
    params: the parameter dict (only its keys are used).
  """
  unknown = set(tcfg.frozen) - set(params)
  if unknown:
    raise ValueError(f"frozen names {sorted(unknown)} are not parameters {sorted(params)}")
  lr = tcfg.lr if tcfg.schedule == "constant" else optax.cosine_decay_schedule(
      tcfg.lr, tcfg.steps, alpha=tcfg.final_lr_frac)
  if not tcfg.frozen:
    return optax.adam(lr)
  labels = {k: ("frozen" if k in tcfg.frozen else "train") for k in params}
  return optax.multi_transform({"train": optax.adam(lr), "frozen": optax.set_to_zero()}, labels)


def init_params_for_seeds(cfg: ModelConfig, seeds, dtype=jnp.float32) -> dict:
  """``models.init_params`` from ``jax.random.key(s)`` for each seed, stacked (S, ...).

  The key depends on the seed only, so seed s of different rows (model kinds,
  dims, ranks) shares its random numbers: a longer draw begins with a shorter
  one (e.g. the complex model's first matrix at dim 3 is, up to its scale, the
  start of the real model's at dim 6). Rows are paired seed by seed, which suits
  comparing them; their successes are not independent samples across rows.

  Args:
    cfg: the model configuration.
    seeds: integer seeds.
    dtype: real parameter dtype.
  """
  keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
  return jax.vmap(lambda k: init_params(jax.random.wrap_key_data(k), cfg, dtype))(keys)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _stacked_log_probs(task: SeparationTask, cfg: ModelConfig, params: dict):
  """``task_log_probs_fn(task, cfg)`` vmapped over seeds, jitted.

  ``task`` (hashed by identity) and ``cfg`` are static, so the training runs
  that share both (e.g. a sweep's fixed-readout or fixed-dynamics rows and its
  all-learned row) share one compiled program.

  Args:
    task: the T_N instance.
    cfg: the model configuration.
    params: parameters stacked over seeds (S, ...).

  Returns:
    log-probabilities (S, C, K).
  """
  return jax.vmap(task_log_probs_fn(task, cfg))(params)


def train(task: SeparationTask, cfg: ModelConfig, seeds, tcfg: TrainConfig,
          dtype=jnp.float32, init=None) -> TrainResult:
  """Trains ``cfg`` on ``task`` from several seeds at once (exact expected cross-entropy).

  Args:
    task: the T_N instance.
    cfg: the model configuration (num_tokens and num_outcomes must match the task).
    seeds: non-empty sequence of integer seeds.
    tcfg: optimiser settings.
    dtype: real parameter dtype.
    init: optional parameters stacked over seeds (S, ...) to start from instead
      of a random initialisation.

  Returns:
    A ``TrainResult``.

  A seed's run agrees to rounding whichever other seeds train beside it (2 to
  16 seeds: logged KL within 2.4e-7), except alone: one seed compiles to another
  float32 program, and training amplifies that rounding (complex N=3, dim 3,
  seed 1: KL 9.3e-6 apart after 40 steps; seed 0 after 1000 steps: 0.0817
  alone, 0.0588 beside seed 1). To reproduce one seed of a sweep, train it
  beside at least one other seed.
  """
  seeds = tuple(int(s) for s in seeds)
  if not seeds:
    raise ValueError("seeds must be non-empty")
  if cfg.num_tokens != task.num_tokens or cfg.num_outcomes != task.K:
    raise ValueError(
        f"cfg (num_tokens={cfg.num_tokens}, num_outcomes={cfg.num_outcomes}) does not "
        f"match the task (num_tokens={task.num_tokens}, K={task.K})")
  start = time.perf_counter()
  probs = jnp.asarray(task.probs_CK, dtype)
  weights = jnp.asarray(task.weights_C, dtype)
  entropy = task.entropy
  logq_fn = task_log_probs_fn(task, cfg)
  loss_fn = lambda p: expected_cross_entropy(logq_fn(p), probs, weights)

  if init is None:
    params = init_params_for_seeds(cfg, seeds, dtype)
  else:
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), init)
    want = jax.eval_shape(lambda: init_params_for_seeds(cfg, seeds, dtype))
    shape = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
    if jax.tree.structure(params) != jax.tree.structure(want) or shape(params) != shape(want):
      raise ValueError(
          f"init must be the {cfg.kind} model's parameters stacked over the {len(seeds)} "
          f"seeds, shapes {shape(want)}; got {shape(params)}")
  opt = make_optimizer(tcfg, params)
  opt_state = jax.vmap(opt.init)(params)

  def step(carry, _):
    p, s = carry
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  def chunk(p, s, n):
    """n Adam steps; returns (params, state, loss at the start, loss at the end).

    The start loss is evaluated outside the scan, so the loop body, and so the
    training arithmetic, stays that of a chunk without it; the barrier keeps
    XLA from merging it with the first step's forward pass (e.g. when a
    one-step scan is inlined). The first chunk's start loss is the history's
    initial point, without a separately compiled program.
    """
    p, first = jax.lax.optimization_barrier((p, loss_fn(p)))
    (p, s), _ = jax.lax.scan(step, (p, s), None, length=n)
    return p, s, first, loss_fn(p)

  run_chunk = jax.jit(jax.vmap(chunk, in_axes=(0, 0, None)), static_argnums=2)
  history, logged = [], [0]
  done = 0
  while done < tcfg.steps:
    n = min(tcfg.log_every, tcfg.steps - done)
    params, opt_state, first, loss = run_chunk(params, opt_state, n)
    if not done:  # the loss at the initial parameters
      history.append(np.asarray(first) - entropy)
    done += n
    logged.append(done)
    history.append(np.asarray(loss) - entropy)
  with jax.enable_x64(True):  # final metrics in float64, whatever the training dtype
    params64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), params)
    logq = np.asarray(_stacked_log_probs(task, cfg, params64))
  kl = np.asarray([bounds.expected_kl(l, task.probs_CK, task.weights_C) for l in logq])
  return TrainResult(cfg=cfg, seeds=seeds, params=params, steps_logged=np.asarray(logged),
                     kl_history=np.stack(history, axis=1), log_probs=logq, kl=kl,
                     seconds=time.perf_counter() - start)
