"""``train_and_evaluate``: the training loop behind ``python -m experiments.train``.

One run folder (``workdir``) holds ``checkpoints/``, ``metrics.jsonl`` and
TensorBoard files under ``tb/``. Calling ``train_and_evaluate`` again on the
same folder resumes from the latest checkpoint; since a batch is a pure
function of ``(seed, step)``, the resumed run is the uninterrupted one.

The loop's small helpers (what is due at a step, the stop agreed across
processes, ``anneal_span``) live in ``loop_helpers``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Callable

import jax

from qsf_jax import data as qdata
from qsf_jax.models.norms import anneal_beta
from qsf_jax.training import setup
from qsf_jax.training import sharding as shd
from qsf_jax.training.checkpoint import Checkpointer, has_checkpoint, is_primary
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.errors import (CheckpointSaveError, NonFiniteLossError,
                                     RunFolderGoneError)
from qsf_jax.training.evaluation import evaluate_split
from qsf_jax.training.loop_helpers import (_all_finite, _due, _eval_missing, _folder_id, _log,
                                           _scalars, _stop_agreed, anneal_span)
from qsf_jax.training.metrics import MetricWriter, ProgressMeter
from qsf_jax.training.optim import make_optimizer, onecycle_schedule
from qsf_jax.training.progressive import init_from_checkpoint
from qsf_jax.training.resume_identity import check_resumable, execution_differences
from qsf_jax.training.sampling import new_token_room, sample_text
from qsf_jax.training.signals import StopRequested
from qsf_jax.training.state import create_train_state, init_variables
from qsf_jax.training.step import make_train_step


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """Outcome of ``train_and_evaluate``.

  Attributes:
    step: the step reached (== ``cfg.steps`` unless interrupted).
    loss: the last training loss seen (nan if no step ran).
    eval: the last validation record (``val_loss``, ``perplexity``, ...) or None.
    interrupted: a SIGINT/SIGTERM stopped the run (a checkpoint was saved).
    signal: the signal's name when interrupted.
    resumed_from: the checkpoint step the run resumed from, or None.
  """
  step: int
  loss: float
  eval: dict | None
  interrupted: bool = False
  signal: str = ""
  resumed_from: int | None = None


def train_and_evaluate(cfg: TrainConfig, workdir: str | os.PathLike, *,
                       devices=None,
                       step_callback: Callable[[int, dict], None] | None = None) -> TrainResult:
  """Trains ``cfg.stage`` for ``cfg.steps`` updates in ``workdir``, resuming if possible.

  QSF spec §4.1 / D10-D14: AdamW + OneCycle, decay on matrices, clip 1.0,
  validation loss/perplexity and a D14 sample every ``eval_every`` steps.

  Args:
    cfg: the run configuration.
    workdir: the run folder (created if missing).
    devices: devices of the data mesh (default: all).
    step_callback: called as ``step_callback(step, metrics)`` after each update
      whose metrics have been read (``step`` = updates done); for tests and hooks.

  Returns:
    A ``TrainResult``.

  Raises:
    TrainConfigError: unknown stage/preset, inconsistent flags.
    CheckpointMismatchError: ``workdir`` holds another run's checkpoint (untouched).
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint stays).
    Data errors from ``qsf_jax.data`` (missing/empty data, bad tokenizer file).
    WorkdirInUseError: another training process is running in ``workdir``.
  """
  with contextlib.ExitStack() as held:  # the workdir lock, taken once the data are loaded
    return _train_and_evaluate(cfg, os.fspath(workdir), devices, step_callback, held)


def _train_and_evaluate(cfg: TrainConfig, workdir: str, devices,
                        step_callback: Callable[[int, dict], None] | None,
                        held: contextlib.ExitStack) -> TrainResult:
  """``train_and_evaluate``'s body; ``held`` keeps the workdir lock until it returns."""
  setup.check_stage_and_preset(cfg.stage, cfg.preset)
  setup.check_output_folder("--workdir", workdir)  # before the data are loaded
  tokenizer = setup.load_tokenizer(cfg)
  mcfg = setup.make_model_config(cfg, tokenizer.vocab_size)
  setup.check_attn_backend(mcfg)
  seq_len = setup.resolve_seq_len(cfg, mcfg)
  mesh = shd.make_mesh(devices)
  shd.check_batch_divisible(cfg.batch_size, cfg.grad_accum, mesh)
  corpus = setup.load_corpus(cfg, tokenizer)
  setup.warn_if_story_mode_wastes_data(cfg, corpus.train, seq_len, _log)
  meta = setup.run_metadata(cfg, mcfg, corpus, seq_len, mesh.devices.size)

  if is_primary():  # before anything is read from or written into workdir
    held.enter_context(setup.workdir_lock(workdir))
  resume = has_checkpoint(workdir)
  if resume:  # refuse a different run before anything is written into workdir
    probe = Checkpointer(workdir, read_only=True)
    try:
      stored = probe.meta()
      check_resumable(workdir, stored, meta)
    finally:
      probe.close()
    for key, (was, now) in execution_differences(stored, meta).items():
      _log(f"resuming with {key.rsplit('.', 1)[-1]}={now!r} (the run used {was!r}; "
           "same function, another way to compute it)")

  model = setup.build_model(mcfg)
  tx = make_optimizer(cfg.steps, max_lr=cfg.lr, weight_decay=cfg.weight_decay,
                      clip_norm=cfg.clip_norm, cycle_momentum=cfg.cycle_momentum)
  schedule = onecycle_schedule(cfg.steps, cfg.lr)
  params, collections = jax.jit(init_variables, static_argnums=(0, 1, 2))(
      model, cfg.seed, seq_len)
  if not resume:
    params = setup.initial_params(params, mcfg, corpus, log=_log)
  if cfg.init_from and not resume:
    params, rep = init_from_checkpoint(params, cfg.init_from, stage=cfg.stage,
                                       tokenizer=meta["tokenizer"], data=meta["data"],
                                       log=_log)
    meta["init_source"] = {"path": os.path.abspath(cfg.init_from), "stage": rep.src_stage,
                           "step": rep.src_step}
  elif cfg.init_from:
    _log(f"resuming {workdir}; --init_from={cfg.init_from} is ignored")
  if resume:  # provenance: where the run's parameters first came from, not this request
    meta = setup.keep_provenance(meta, stored)
  state = shd.replicate(create_train_state(params, collections, tx, cfg.seed), mesh)

  ckpt = Checkpointer(workdir, max_to_keep=cfg.max_to_keep)
  resumed_from = None
  if resume:
    resumed_from = ckpt.latest_step()
    state = ckpt.restore(state, resumed_from)
    _log(f"resumed from step {resumed_from} in {workdir}")
  # A run that stopped before its first checkpoint (a full disk, a kill) left records of
  # the steps this one trains again from 0: they go, as a resume drops those past its step.
  restart = resumed_from if resume else (
      0 if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else None)
  writer = MetricWriter(workdir, enabled=is_primary(), resumed_from=restart)
  # The folder itself: a save checks it is still there. Process 0 made it (its lock);
  # another host may not see it yet, and then skips the check.
  home = _folder_id(workdir)

  common = dict(schedule=schedule, total_steps=cfg.steps, anneal_frac=mcfg.anneal_frac,
                anneal_shape=mcfg.anneal_shape, anneal_hold_frac=mcfg.anneal_hold_frac,
                grad_accum=cfg.grad_accum)
  collects_stats = mcfg.annealed and mcfg.ls_scale == "ema" and "norm_stats" in collections
  train_step = make_train_step(
      model, tx, stats_steps=mcfg.stats_steps if collects_stats else None, **common)

  def eval_and_sample(step: int) -> dict:
    p, c = state.params, state.collections
    beta = float(anneal_beta(step, cfg.steps, anneal_frac=mcfg.anneal_frac,
                             shape=mcfg.anneal_shape, hold_frac=mcfg.anneal_hold_frac)
                 ) if mcfg.annealed else 0.0
    rec = evaluate_split(model, p, c, corpus.valid, batch_size=cfg.batch_size,
                         seq_len=seq_len, mode=cfg.data_mode, max_batches=cfg.eval_batches,
                         beta=beta, mesh=mesh)
    writer.write(step, rec, kind="eval")
    _log(f"eval step {step} | val_loss {rec['val_loss']:.4f} | ppl {rec['perplexity']:.2f} "
         f"| {rec['tokens']} tokens" + (f" | beta {beta:.2f}" if mcfg.annealed else ""))
    if cfg.sample_tokens > 0:
      n_prompt = len(tokenizer.encode(cfg.sample_prompt)) or 1
      n_new = min(cfg.sample_tokens, new_token_room(mcfg.max_seq_len, n_prompt))
      if n_new > 0:
        text = sample_text(model, p, c, tokenizer, cfg.sample_prompt, max_new_tokens=n_new,
                           seed=(cfg.seed + step) % (1 << 32),
                           temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                           beta=beta, max_len=mcfg.max_seq_len)
        writer.write_text(step, cfg.sample_prompt + text)
        _log(f"sample: {json.dumps(cfg.sample_prompt + text, ensure_ascii=False)}")
    return rec

  start = int(jax.device_get(state.step))
  meter = ProgressMeter(cfg.steps, cfg.batch_size * seq_len, start)
  last_loss, last_eval, pending = float("nan"), None, None
  last_saved = resumed_from

  def read_pending():
    """Fetches the previous update's metrics; stops on a non-finite loss."""
    nonlocal pending, last_loss
    if pending is None:
      return
    step, m = pending
    pending = None
    m = _scalars(jax.device_get(m))
    for key, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
      if not math.isfinite(m[key]):
        ckpt.wait()
        raise NonFiniteLossError(step - 1, m[key], last_saved, what=what)
    last_loss = m["loss"]
    if step == start + 1:
      meter.mark(step)  # exclude compilation from the throughput
    if _due(step, cfg.log_every, cfg.steps):
      _log(meter.line(step, m["loss"], m["lr"]))
      tps, _ = meter.rates(step)
      writer.write(step, dict(m, tokens_per_s=tps))
    if step_callback is not None:
      step_callback(step, m)

  def save_checkpoint(step):
    nonlocal last_saved
    if home is not None and _folder_id(workdir) != home:
      # orbax would make a new folder there, holding this checkpoint but none of the
      # run's metrics (they went into the removed files), and report success
      try:
        ckpt.wait()
      except CheckpointSaveError:
        pass  # a save still running when the folder went: said below
      kept = (f"the last checkpoint saved there was step {last_saved}"
              if last_saved is not None else "no checkpoint had been written yet")
      raise RunFolderGoneError(
          f"the run folder {workdir} was moved, removed or replaced during training; "
          f"stopped at step {step} without writing there ({kept})")
    if not bool(_all_finite(state.params)):  # never save a broken state
      ckpt.wait()
      raise NonFiniteLossError(step - 1, float("nan"), last_saved,
                               what="parameters after the update")
    ckpt.save(step, state, meta)
    last_saved = step

  if start >= cfg.steps:
    _log(f"nothing to train: the run in {workdir} already reached its {cfg.steps} steps")
  else:
    span = f"for {cfg.steps} steps" if start == 0 else f"from step {start} to {cfg.steps}"
    _log(f"training {cfg.stage}/{cfg.preset} {span} in {workdir} "
         f"({mesh.devices.size} device(s), batch {cfg.batch_size} x {seq_len}, "
         f"grad_accum {cfg.grad_accum}, {mcfg.dtype})")
    if mcfg.annealed:
      _log(f"normalisation anneal (D5): LayerNorm -> linear scaling "
           f"{anneal_span(cfg.steps, mcfg.anneal_frac, mcfg.anneal_hold_frac)}; the loss can "
           f"rise there, and `experiments.evaluate --beta=0` scores the weights with LayerNorm")
  interrupted = None
  try:
    if (resumed_from is not None and _due(resumed_from, cfg.eval_every, cfg.steps)
        and _eval_missing(workdir, resumed_from)):
      _log(f"the evaluation at step {resumed_from} was not recorded (the run stopped during "
           "it); evaluating now")
      last_eval = eval_and_sample(resumed_from)
    with StopRequested() as stop:
      step = start
      while step < cfg.steps:
        batch = qdata.get_batch(corpus.train, seed=cfg.seed, step=step,
                                batch_size=cfg.batch_size, seq_len=seq_len, mode=cfg.data_mode)
        state, metrics = train_step(state, shd.shard_batch(batch, mesh, cfg.grad_accum))
        read_pending()  # the previous step's metrics, read while this one runs
        step += 1
        pending = (step, metrics)
        save = _due(step, cfg.checkpoint_every, cfg.steps)
        evaluate = _due(step, cfg.eval_every, cfg.steps)
        # Several processes agree on a stop at steps where they sync anyway (an
        # agreement per step would wait for every step's end); one process polls each step.
        poll = jax.process_count() == 1 or save or evaluate or _due(step, cfg.log_every,
                                                                   cfg.steps)
        save = save or (poll and _stop_agreed(stop.requested))
        if save or evaluate or step_callback is not None:
          read_pending()
        if save:
          save_checkpoint(step)
        if evaluate:
          last_eval = eval_and_sample(step)
        # it may have come during the metrics read or the evaluation
        if poll and _stop_agreed(stop.requested):
          if last_saved != step:
            save_checkpoint(step)
          interrupted = stop.signal_name or "a stop signal to another process"
          break
      read_pending()
    ckpt.wait()
  finally:
    try:
      ckpt.close()  # may raise a failed save's error again
    finally:
      writer.close()
  step = int(jax.device_get(state.step))
  if interrupted:
    _log(f"{interrupted} received: stopped at step {step}, checkpoint saved in {workdir}; "
         "run the same command again to resume")
  else:
    _log(f"done: step {step}, final checkpoint in {workdir}")
  return TrainResult(step=step, loss=last_loss, eval=last_eval, interrupted=bool(interrupted),
                     signal=interrupted or "", resumed_from=resumed_from)
