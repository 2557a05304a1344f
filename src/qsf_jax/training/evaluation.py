"""Validation loss and perplexity (QSF spec D13): mean token CE in nats, ppl = e^CE."""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax import _checks
from qsf_jax import data as qdata
from qsf_jax.training import sharding as shd
from qsf_jax.training import token_losses
from qsf_jax.training.errors import DataChangedError
from qsf_jax.training.step import _eval_step, check_eval_batch


def perplexity(loss: float) -> float:
  """ppl = exp(CE) (QSF spec §4.2, D13); inf when it overflows."""
  try:
    return math.exp(loss)
  except OverflowError:
    return float("inf")


def evaluate_split(model, params, collections, split, *, batch_size: int, seq_len: int,
                   mode: str = "story", max_batches: int | None = None, beta=0.0,
                   mesh=None) -> dict:
  """Mean token cross entropy over the deterministic validation batches (D13).

    CE = sum_{b,t} m_bt xent_bt / sum_{b,t} m_bt,   ppl = exp(CE)

  Args:
    model: the Flax module.
    params: parameters.
    collections: the model's other collections.
    split: the validation ``TokenSplit``.
    batch_size: rows per batch.
    seq_len: tokens per row.
    mode: ``"story"`` (one story per row) or ``"packed"``.
    max_batches: evaluate only the first batches (None: the whole split).
    beta: the normalisation-anneal weight (D5).
    mesh: data mesh to shard batches over (None: default placement); a batch
      is padded with all-masked rows to a multiple of its device count
      (``sharding.shard_eval_batch``), so the figures do not depend on it.

  Returns:
    ``{"val_loss", "perplexity", "tokens", "batches"}``.
  """
  token_losses.check_max_batches(max_batches)
  batches = qdata.iter_eval_batches(split, batch_size=batch_size, seq_len=seq_len, mode=mode)
  if max_batches is not None:
    batches = itertools.islice(batches, max_batches)
  # Each batch's float32 sums stay on the device (no sync per batch); the totals are
  # taken on the host in float64, so the token count stays exact past 2^24 tokens.
  sums = []
  for batch in batches:
    check_eval_batch(model, batch, beta)  # on the host batch: no device copy
    if mesh is not None:
      batch = shd.shard_eval_batch(batch, mesh)
    sums.append(_eval_step(params, collections, batch, jnp.asarray(beta, jnp.float32),
                           model=model))
  n_batches = len(sums)
  l_n = np.asarray(jax.device_get(sums), np.float64).reshape(n_batches, 2)
  tokens = int(round(float(l_n[:, 1].sum())))
  if tokens == 0:
    raise ValueError("the validation split produced no target tokens")
  loss = float(l_n[:, 0].sum()) / tokens
  return {"val_loss": loss, "perplexity": perplexity(loss), "tokens": tokens,
          "batches": n_batches}


def evaluate_workdir(workdir, *, data: str | None = None, step: int | None = None,
                     max_batches: int | None = None, batch_size: int | None = None,
                     tokenizer_file: str | None = None, cache_dir: str | None = None,
                     beta: float | None = None, attn_impl: str | None = None,
                     per_token: bool = False, outlier_nats: float = 20.0,
                     per_token_out=None) -> dict:
  """Validation loss and perplexity of a run folder's checkpoint (QSF spec D13).

  Args:
    workdir: the run folder.
    data: validation data (default: the run's own ``data``).
    step: checkpoint step (default: the latest).
    max_batches: evaluate only this many batches (default: the whole split).
    batch_size: rows per batch (default: the run's batch size).
    tokenizer_file: local vocabulary for gpt2 runs.
    cache_dir: token-cache folder (default: the run's).
    beta: the normalisation-anneal weight to evaluate at, in [0, 1] (QSF §3.4,
      D5; default: the checkpoint's own, 1 after a finished Stage III/IV).
      ``beta=0`` evaluates an annealed stage's weights with plain LayerNorm;
      another value for a stage without the anneal is an error.
    attn_impl: linear-attention impl to run the model with (default: the run's
      own; see ``load_run``).
    per_token: also summarise the per-token cross entropies (a second pass over
      the batches; ``token_losses.summarize``): median, maximum, the tokens above
      ``outlier_nats``, and how many follow an input that never occurs in the rows
      the run trained on (its own training split, whatever ``data`` is). When
      ``data`` is given and the run's own files changed since training, those
      counts are omitted, with a warning and ``"unseen_inputs_omitted"`` saying why.
    outlier_nats: the per-token outlier threshold in nats.
    per_token_out: an ``.npz`` path for the per-token arrays (implies
      ``per_token``).

  Returns:
    ``{"val_loss", "perplexity", "tokens", "batches", "step", "stage", "data",
    "trained_on", "beta", "batch_size"}``, and ``"per_token"`` (a dict) with ``per_token``.

  Raises:
    DataChangedError: ``data`` is None and the run's own data changed since it
      was trained (``setup.load_run_corpus``); pass ``data`` to use them anyway.
  """
  per_token = _checks.check_flag("per_token", per_token) or per_token_out is not None
  if per_token:  # checked before loading and evaluating, which can take minutes
    token_losses.check_threshold(outlier_nats)
    if per_token_out is not None:
      token_losses.check_output_path(per_token_out)
  ev = open_evaluation(workdir, data=data, step=step, max_batches=max_batches,
                       batch_size=batch_size, tokenizer_file=tokenizer_file,
                       cache_dir=cache_dir, beta=beta, attn_impl=attn_impl)
  run, cfg, corpus, mesh, bs, beta = ev.run, ev.cfg, ev.corpus, ev.mesh, ev.batch_size, ev.beta
  rec = evaluate_split(run.model, run.params, run.collections, corpus.valid, batch_size=bs,
                       seq_len=run.seq_len, mode=cfg.data_mode, max_batches=max_batches,
                       beta=beta, mesh=mesh)
  rec = dict(rec, **ev.record())
  if per_token:
    try:
      train = ev.train_split("the unseen-input counts of the per-token summary")
    except DataChangedError as e:  # other data evaluated, the run's own files changed
      omitted = f"unseen-input counts omitted: {e}"
      logging.warning("%s", omitted)
      seen = None
    else:
      omitted = None
      seen = token_losses.training_tokens(train, seq_len=run.seq_len, mode=cfg.data_mode,
                                          vocab_size=run.tokenizer.vocab_size)
    tl = token_losses.token_losses(run.model, run.params, run.collections, corpus.valid,
                                   batch_size=bs, seq_len=run.seq_len, mode=cfg.data_mode,
                                   max_batches=max_batches, beta=beta, seen=seen, mesh=mesh)
    if per_token_out is not None:
      token_losses.save(tl, per_token_out)
    rec["per_token"] = token_losses.summarize(tl, outlier_nats)
    if omitted is not None:
      rec["per_token"]["unseen_inputs_omitted"] = omitted
  return rec


@dataclasses.dataclass(frozen=True)
class OpenedRun:
  """A run folder's checkpoint and data, ready to evaluate (``open_evaluation``).

  Attributes:
    run: the ``LoadedRun``.
    cfg: its ``TrainConfig`` (with the ``cache_dir`` asked for).
    corpus: the corpus whose ``valid`` split is evaluated.
    data: the ``data`` asked for (None: the run's own).
    trained_on: the source the run was trained on (from its metadata).
    mesh: the data mesh.
    batch_size: rows per batch (each padded with all-masked rows to a
      multiple of the mesh's device count when it is sharded).
    beta: the normalisation-anneal weight to evaluate at (D5).
  """
  run: Any
  cfg: Any
  corpus: Any
  data: str | None
  trained_on: str | None
  mesh: Any
  batch_size: int
  beta: float

  def record(self) -> dict:
    """``{"step", "stage", "data", "trained_on", "beta", "batch_size"}`` of the JSON
    records."""
    return {"step": self.run.step, "stage": self.cfg.stage,
            "data": self.corpus.metadata.get("source"), "trained_on": self.trained_on,
            "beta": self.beta, "batch_size": self.batch_size}

  def train_split(self, needed_for: str):
    """The run's own training split (whatever ``data`` was evaluated).

    Args:
      needed_for: the figure that needs it, for the ``DataChangedError`` raised
        when the run's own files changed since training.
    """
    from qsf_jax.training import setup  # pylint: disable=g-import-not-at-top
    if self.data is None:
      return self.corpus.train
    return setup.load_run_corpus(self.run, cache_dir=self.cfg.cache_dir,
                                 needed_for=needed_for)[1].train


def open_evaluation(workdir, *, data: str | None = None, step: int | None = None,
                    max_batches: int | None = None, batch_size: int | None = None,
                    tokenizer_file: str | None = None, cache_dir: str | None = None,
                    beta: float | None = None, attn_impl: str | None = None) -> OpenedRun:
  """Checks the arguments, then loads a run folder's checkpoint and validation data.

  Arguments as for ``evaluate_workdir``; ``max_batches`` is only checked.
  """
  from qsf_jax.training import setup  # pylint: disable=g-import-not-at-top
  from qsf_jax.training.restore import check_beta, load_run, run_beta  # pylint: disable=g-import-not-at-top

  check_beta(beta)

  for name, value in (("batch_size", batch_size), ("max_batches", max_batches)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                              or value < 1):
      raise ValueError(f"{name} must be an int >= 1, or None for the default, got {value!r}")
  run = load_run(workdir, step=step, tokenizer_file=tokenizer_file, attn_impl=attn_impl)
  beta = run_beta(run, beta)
  cfg, corpus = setup.load_run_corpus(run, data=data, cache_dir=cache_dir, where=str(workdir))
  trained_on = (run.meta.get("data") or {}).get("source")
  mesh = shd.make_mesh()
  bs = batch_size or cfg.batch_size
  # Rows past the split's are all-masked padding: a batch larger than the split
  # changes no figure but allocates (and computes) every padded row.
  rows = qdata.num_eval_batches(corpus.valid, batch_size=1, seq_len=run.seq_len,
                                mode=cfg.data_mode)
  bs = max(1, min(bs, rows))
  return OpenedRun(run=run, cfg=cfg, corpus=corpus, data=data, trained_on=trained_on,
                   mesh=mesh, batch_size=bs, beta=beta)
