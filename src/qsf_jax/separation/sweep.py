"""The separation sweep: complex N vs real orthogonal D on T_N (wave-function spec §2, §5).

For each N it builds the task, certifies the rank of the centred log-target,
and evaluates or trains the task's rows:

  task "pairwise"    T_N (spec §2.3): the rows of ``pairwise_rows`` (explicit
                     complex and realified models; learned complex Born models of
                     each readout rank, with fixed POVM or fixed dynamics; the
                     realified control; real models of each dimension D);
  task "born_logit"  the tight variant (spec §2.6): the rows of ``born_logit_rows``
                     (explicit complex Born-logit and real adjoint models; learned
                     complex Born-logit models of each readout rank, with fixed
                     head or fixed dynamics; real models of each D).

Every row records the expected KL, the rms double-centred log error and, for
real models, the Eckart-Young lower bound of spec §2.5.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax import _checks
from qsf_jax.separation import born_logit_rows, bounds, models, pairwise_rows, train
from qsf_jax.separation.pairwise_rows import (DEFAULT_READOUT_RANKS, MODEL_NAMES, default_dims,
                                              fixed_dynamics_init, fixed_povm_init)  # noqa: F401
from qsf_jax.tasks.born_logit import CONTEXTS, make_born_logit_task
from qsf_jax.tasks.separation import (MAX_CONTEXTS, check_target_size, distinct_contexts,
                                     make_task, num_outcomes)

DEFAULT_NS = (3, 4, 5)
TASKS = ("pairwise", "born_logit")
SUCCESS_KL = 1e-4


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """Settings of one sweep.

  Attributes:
    Ns: numbers of senses N (each >= 2; >= 3 for generic Born-logit contexts).
    dims: real-model state dimensions D; None picks ``default_dims(N)`` per N
      (``born_logit_rows.default_dims`` on the Born-logit task).
    steps: Adam steps per model.
    seeds: number of seeds (0 .. seeds-1) per model.
    lr: peak learning rate.
    log_every: steps per logged KL point.
    eta: target unsharpness (T_N only).
    num_cues: A.
    length: L.
    task_seed: seed of the cue phases.
    dtype: "float32" or "float64" training dtype (metrics are float64 either way).
    readout_ranks: ranks r of the learned complex readouts' elements (POVM
      elements on T_N, Born-logit forms on the Born-logit task): one "complex"
      and one "complex_fixed_dynamics" row each per r.
    models: the subset of the task's model names to run (None: all): ``MODEL_NAMES``
      on T_N, ``born_logit_rows.MODEL_NAMES`` on the Born-logit task.
    task: "pairwise" (T_N, spec §2.3) or "born_logit" (the tight variant, spec §2.6).
    contexts: "phase" or "generic" context states of the Born-logit task.
    beta: inverse temperature of the Born-logit targets; None: K.
    complex_dims: complex dimensions n of the all-learned "complex" rows, each
      an integer or an expression in N ("N", "2N", "N+1", "2N-1"; see
      ``resolve_complex_dims``). The default ("N",) is the explicit models'
      dimension; more probe whether extra complex dimensions help training.
  """
  Ns: tuple = DEFAULT_NS
  dims: tuple | None = None
  steps: int = 4000
  seeds: int = 3
  lr: float = 0.02
  log_every: int = 250
  eta: float = 0.1
  num_cues: int = 8
  length: int = 3
  task_seed: int = 0
  dtype: str = "float32"
  readout_ranks: tuple = DEFAULT_READOUT_RANKS
  models: tuple | None = None
  task: str = "pairwise"
  contexts: str = "phase"
  beta: float | None = None
  complex_dims: tuple = ("N",)

  def __post_init__(self):
    _checks.plain_numbers(self)  # np.arange(3, 6) -> (3, 4, 5): results.json takes them


_DIM_EXPR = re.compile(r"(\d*)N([+-]\d+)?")


def resolve_complex_dims(specs, N: int) -> tuple:
  """The complex dimensions that ``specs`` name for N senses.

  Args:
    specs: entries that are integers (>= 1) or expressions "aN+b" in N, with a
      and b optional integers: "N", "2N", "N+1", "3N-2", or a plain "8".
    N: number of senses.

  Returns:
    a tuple of ints, in the order given.

  Raises:
    ValueError: an entry that is neither, or one that gives a dimension < 1 or
      repeats another's for this N.
  """
  if specs is None or isinstance(specs, (str, bytes)) or len(specs) == 0:
    raise ValueError(f"complex_dims must be a non-empty list, got {specs!r}")
  dims = []
  for spec in specs:
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
      n = int(spec)
    elif isinstance(spec, str) and re.fullmatch(r"[+-]?\d+", spec.strip()):
      n = int(spec.strip())
    elif isinstance(spec, str) and (m := _DIM_EXPR.fullmatch(spec.replace(" ", ""))):
      n = int(m.group(1) or 1) * N + int(m.group(2) or 0)
    else:
      raise ValueError(f"each entry of complex_dims must be an integer or an expression "
                       f"like N, 2N or N+1, got {spec!r}")
    if n < 1:
      raise ValueError(f"complex_dims entry {spec!r} gives dimension {n} < 1 for N = {N}")
    if n in dims:
      raise ValueError(f"complex_dims entry {spec!r} repeats dimension {n} for N = {N}")
    dims.append(n)
  return tuple(dims)


def validate_config(cfg: SweepConfig) -> None:
  """Raises ``ValueError`` with a clear message for an invalid sweep configuration."""
  def check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < minimum:
      raise ValueError(f"{name} must be >= {minimum}, got {v}")

  def check_list(name, values, minimum):
    if values is None or isinstance(values, (str, bytes)) or len(values) == 0:
      raise ValueError(f"{name} must be a non-empty list of integers, got {values!r}")
    for v in values:
      check_int(f"each entry of {name}", v, minimum)

  if cfg.task not in TASKS:
    raise ValueError(f"task must be one of {list(TASKS)}, got {cfg.task!r}")
  if cfg.contexts not in CONTEXTS:
    raise ValueError(f"contexts must be one of {list(CONTEXTS)}, got {cfg.contexts!r}")
  if cfg.beta is not None and (isinstance(cfg.beta, bool)
                               or not isinstance(cfg.beta, (int, float, np.integer, np.floating))
                               or not np.isfinite(cfg.beta) or cfg.beta <= 0):
    raise ValueError(f"beta must be a finite number > 0 (or None: K), got {cfg.beta!r}")
  generic = cfg.task == "born_logit" and cfg.contexts == "generic"
  check_list("N", cfg.Ns, 3 if generic else 2)
  if cfg.dims is not None:
    check_list("dims", cfg.dims, 1)
  for name, values in (("N", cfg.Ns), ("dims", cfg.dims or ())):
    if len(set(values)) != len(values):
      raise ValueError(f"{name} must not repeat a value, got {tuple(values)}")
  check_int("steps", cfg.steps, 1)
  check_int("seeds", cfg.seeds, 1)
  check_int("log_every", cfg.log_every, 1)
  check_int("num_cues", cfg.num_cues, 1)
  check_int("length", cfg.length, 1)
  check_int("task_seed", cfg.task_seed, 0)
  if cfg.num_cues ** cfg.length > MAX_CONTEXTS:
    raise ValueError(f"num_cues**length = {cfg.num_cues ** cfg.length} contexts, more than "
                     f"the {MAX_CONTEXTS:,} the task enumerates: lower num_cues or length")
  if not (np.isfinite(cfg.lr) and cfg.lr > 0):
    raise ValueError(f"lr must be finite and > 0, got {cfg.lr}")
  if not 0.0 < cfg.eta < 1.0:
    raise ValueError(f"eta must lie in (0, 1) (finite log-probabilities), got {cfg.eta}")
  check_list("readout_ranks", cfg.readout_ranks, 1)
  if len(set(cfg.readout_ranks)) != len(cfg.readout_ranks):
    raise ValueError(f"readout_ranks must not repeat a rank, got {tuple(cfg.readout_ranks)}")
  if cfg.models is not None:
    names = task_model_names(cfg.task)
    if isinstance(cfg.models, (str, bytes)) or len(cfg.models) == 0:
      raise ValueError(f"models must be a non-empty list of names from {list(names)}, "
                       f"got {cfg.models!r}")
    unknown = [m for m in cfg.models if m not in names]
    if unknown:
      raise ValueError(f"unknown models {unknown} for task {cfg.task!r}; choose from "
                       f"{list(names)} (rows such as complex_r2 come from 'complex' and "
                       f"readout_ranks)")
  if cfg.dtype not in ("float32", "float64"):
    raise ValueError(f"dtype must be 'float32' or 'float64', got {cfg.dtype!r}")
  for N in cfg.Ns:
    check_target_size(cfg.num_cues ** cfg.length, num_outcomes(N), f"the task at N = {N}")
    for n in resolve_complex_dims(cfg.complex_dims, N):
      if cfg.task == "pairwise" and num_outcomes(N) * min(cfg.readout_ranks) < n:
        raise ValueError(
            f"complex dimension {n} at N = {N} exceeds K * r = {num_outcomes(N)} * "
            f"{min(cfg.readout_ranks)}: the Born readout is an isometry onto the K r outputs")
    C = distinct_contexts(cfg.num_cues, cfg.length, commuting=not generic)
    if cfg.task == "pairwise":
      need, what = num_outcomes(N), f"K = {num_outcomes(N)} outputs"
    else:
      rank = N * (N - 1) if cfg.contexts == "phase" else N * N - 1
      need, what = rank + 1, f"the log-target rank {rank} + 1"
    if C < need:
      order = "" if generic else " (the cue phases commute, so only the multiset of cues counts)"
      raise ValueError(
          f"num_cues = {cfg.num_cues}, length = {cfg.length} give {C} distinct contexts"
          f"{order}, fewer than {what} for N = {N}; the rank certificate of spec §2.5 needs "
          f"that many generic contexts: raise num_cues or length")
    if cfg.task == "born_logit":  # its targets (cheap) refuse a beta they underflow at
      make_born_logit_task(N, contexts=cfg.contexts, beta=cfg.beta, num_cues=cfg.num_cues,
                           length=cfg.length, seed=cfg.task_seed)


def task_model_names(task: str) -> tuple:
  """The model names a sweep of ``task`` ("pairwise" or "born_logit") can run."""
  return MODEL_NAMES if task == "pairwise" else born_logit_rows.MODEL_NAMES


def _metrics(logq_SCK, task):
  kl = [bounds.expected_kl(l, task.probs_CK, task.weights_C) for l in logq_SCK]
  rms = [bounds.rms_centred_log_error(l, task.probs_CK) for l in logq_SCK]
  return kl, rms


def _record(N, model, dim, real_dim, kl, rms, bound, seconds, result=None, readout_rank=None):
  rec = {"N": N, "model": model, "dim": dim, "real_dim": real_dim, "readout_rank": readout_rank,
         "kl": [float(x) for x in kl], "rms_log_err": [float(x) for x in rms],
         "bound": None if bound is None else float(bound), "seconds": float(seconds)}
  if result is not None:
    rec["seeds"] = list(result.seeds)
    rec["steps_logged"] = result.steps_logged.tolist()
    rec["kl_history"] = result.kl_history.tolist()
  return rec


def run_sweep(cfg: SweepConfig, log=print) -> dict:
  """Runs the sweep; returns a JSON-serialisable results dict.

  Args:
    cfg: the sweep settings (validated here).
    log: function receiving one progress line per model.

  Returns:
    {"config", "environment", "tasks": {N: ...}, "runs": [...], "wall_seconds"}.
  """
  validate_config(cfg)
  start = time.perf_counter()
  dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("dtype float64 needs jax_enable_x64")
  tcfg = train.TrainConfig(steps=cfg.steps, lr=cfg.lr, log_every=min(cfg.log_every, cfg.steps))
  seeds = tuple(range(cfg.seeds))
  wanted = lambda name: cfg.models is None or name in cfg.models
  out = {"config": dataclasses.asdict(cfg), "tasks": {}, "runs": [],
         "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                         "machine": platform.machine(), "python": platform.python_version()}}
  for N in cfg.Ns:
    task, dims, hardcoded, jobs = _plan(cfg, N)
    curve_dims = np.arange(0, max(max(dims), task.K) + 1)
    out["tasks"][str(N)] = {
        "K": task.K, "C": task.C, "entropy": task.entropy,
        "rank": bounds.log_rank(task.probs_CK), "dims": list(dims),
        "bound_dims": curve_dims.tolist(),
        "bound": bounds.eckart_young_bound(task.probs_CK, curve_dims).tolist()}
    if cfg.task == "born_logit":
      out["tasks"][str(N)].update(contexts=task.contexts, beta=task.beta,
                                  exact_real_dim=task.exact_real_dim)
    log(f"N={N}: K={task.K}, C={task.C}, rank(J log P* J)={out['tasks'][str(N)]['rank']}")

    with jax.enable_x64(True):
      for name, build, real_dim, rank in hardcoded:
        if not wanted(name):
          continue
        t0 = time.perf_counter()
        params, mcfg = build(task, dtype=jnp.float64)
        logq = np.asarray(jax.jit(train.task_log_probs_fn(task, mcfg))(params))[None]
        kl, rms = _metrics(logq, task)
        bound = bounds.eckart_young_bound(task.probs_CK, real_dim) if mcfg.kind == "real" else None
        out["runs"].append(_record(N, name, mcfg.dim, real_dim, kl, rms, bound,
                                   time.perf_counter() - t0, readout_rank=rank))
        log(f"  {name:26s} dim={mcfg.dim:3d}  KL={kl[0]:.2e}")

    for name, kind, mcfg, real_dim in jobs:
      if not wanted(kind):
        continue
      rows = born_logit_rows if cfg.task == "born_logit" else pairwise_rows
      init, frozen = rows.row_init(kind, task, mcfg, seeds, dtype)
      job_tcfg = dataclasses.replace(tcfg, frozen=frozen) if frozen else tcfg
      result = train.train(task, mcfg, seeds, job_tcfg, dtype=dtype, init=init)
      kl, rms = _metrics(result.log_probs, task)
      bound = bounds.eckart_young_bound(task.probs_CK, real_dim) if kind == "real" else None
      rank = mcfg.readout_rank if mcfg.kind in models.COMPLEX_KINDS else None
      out["runs"].append(_record(N, name, mcfg.dim, real_dim, kl, rms, bound, result.seconds,
                                 result, readout_rank=rank))
      extra = "" if bound is None else f"  bound={bound:.3f}"
      log(f"  {name:26s} dim={mcfg.dim:3d}  KL median={np.median(kl):.2e} "
          f"min={np.min(kl):.2e}  rms={np.median(rms):.3f}{extra}  ({result.seconds:.1f}s)")
  out["wall_seconds"] = time.perf_counter() - start
  return out


def _plan(cfg: SweepConfig, N: int):
  """The task for N, its real dimensions, explicit rows and trained rows."""
  if cfg.task == "born_logit":
    task = make_born_logit_task(N, contexts=cfg.contexts, beta=cfg.beta, num_cues=cfg.num_cues,
                                length=cfg.length, seed=cfg.task_seed)
    dims = tuple(cfg.dims) if cfg.dims is not None else born_logit_rows.default_dims(task)
    return (task, dims, born_logit_rows.hardcoded_rows(task),
            born_logit_rows.trained_rows(task, dims, cfg.readout_ranks,
                                         resolve_complex_dims(cfg.complex_dims, N)))
  task = make_task(N, num_cues=cfg.num_cues, length=cfg.length, eta=cfg.eta, seed=cfg.task_seed)
  dims = tuple(cfg.dims) if cfg.dims is not None else default_dims(N)
  return (task, dims, pairwise_rows.hardcoded_rows(task),
          pairwise_rows.trained_rows(task, dims, cfg.readout_ranks,
                                     resolve_complex_dims(cfg.complex_dims, N)))


def summary_table(results: dict) -> str:
  """A plain-text table: one row per (N, model, dimension)."""
  head = (f"{'N':>2} {'model':<25} {'dim':>4} {'real D':>6} {'KL median':>10} {'KL min':>9} "
          f"{'KL max':>9} {'ok':>5} {'rms log err':>11} {'EY bound':>9}")
  lines = [head, "-" * len(head)]
  for r in results["runs"]:
    kl = np.asarray(r["kl"])
    ok = f"{int(np.sum(kl < SUCCESS_KL))}/{kl.size}"
    bound = "" if r["bound"] is None else f"{r['bound']:.3f}"
    lines.append(
        f"{r['N']:>2} {r['model']:<25} {r['dim']:>4} {r['real_dim']:>6} {np.median(kl):>10.2e} "
        f"{kl.min():>9.2e} {kl.max():>9.2e} {ok:>5} {np.median(r['rms_log_err']):>11.3f} "
        f"{bound:>9}")
  lines.append(f"ok = seeds with KL < {SUCCESS_KL:g}; rms log err = rms of the double-centred "
               "log-probability error; EY bound = its Eckart-Young lower bound at D (spec §2.5).")
  return "\n".join(lines)
