"""How much of its context a trained LM uses: its loss when restarted on the last k tokens.

For each real target y_t of the evaluation rows with ``lo <= t < hi`` (the model
predicts it from the inputs x_0..x_t), the model is restarted, i.e. fed the window
``x_{t-k+1..t}`` as a fresh row (the wave LM from psi_0, a recurrent mixer from a
zero state, a position-dependent layer from position 0), and its last logits z
predict y_t::

  L(k) = mean_t [logsumexp_v z_v(x_{t-k+1..t}) - z_{y_t}(x_{t-k+1..t})]

next to the whole-row loss at the same targets (the evaluation's own per-token
losses, ``token_losses``) and a unigram model of the training split, the one
``wave_bias_init="unigram"`` starts from (``setup.unigram_log_probs``):
log p(v) = log((n_v + 1/2) / sum_u (n_u + 1/2)).
A model that uses its context gains from k = 1 to the whole row; one whose loss does
not move reads little beyond the last token (docs/RESULTS.md, "The wave-function LM
and GLA at the same scale"). A restarted window also starts the model somewhere it
never starts in training (mid-story), so the test mixes that with what the state
encodes.

``python -m experiments.context_use --workdir=RUN`` prints the table.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax import data as qdata
from qsf_jax.training import token_losses
from qsf_jax.training.step import token_xent

TOKEN_BUDGET = 1 << 14  # window tokens per forward call
LOGIT_BUDGET = 1 << 24  # logits per forward call (64 MB in float32): V = 50257 gives 333 windows


@dataclasses.dataclass(frozen=True)
class ContextLosses:
  """Per-target losses of the restart test, in evaluation order.

  Attributes:
    contexts: the window lengths k, increasing (K,).
    restart: each target's cross entropy in nats from the last k inputs alone,
      float64 (K, N).
    whole_row: its cross entropy from the whole row, float64 (N,).
    unigram: its cross entropy under the training unigram model, float64 (N,);
      None where none was given.
    target: the target token id y_t, int64 (N,).
    row: its row, counted over the evaluation batches, int64 (N,).
    position: its position t in the row, int64 (N,).
  """
  contexts: tuple
  restart: np.ndarray
  whole_row: np.ndarray
  unigram: np.ndarray | None
  target: np.ndarray
  row: np.ndarray
  position: np.ndarray


def check_contexts(contexts, positions=None) -> tuple[tuple, tuple | None]:
  """Validates window lengths and the target position range ``[lo, hi)``.

  Every window must fit in its row (k <= lo + 1), so each k sees exactly k tokens
  at every target. ``hi`` None means the end of the row.

  Returns:
    ``(sorted unique contexts, (lo, hi))``; ``(contexts, None)`` when
    ``positions`` is None (only the contexts are checked).
  """
  try:
    given = list(contexts)
  except TypeError:
    given = None
  if not given or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1
                      for k in given):
    raise ValueError(f"contexts must be a non-empty list of ints >= 1, got {contexts!r}")
  ks = tuple(sorted({int(k) for k in given}))
  if positions is None:
    return ks, None
  def is_int(p):
    return not isinstance(p, bool) and isinstance(p, numbers.Integral)

  if (not isinstance(positions, (tuple, list)) or len(positions) != 2
      or not is_int(positions[0]) or not (positions[1] is None or is_int(positions[1]))):
    raise ValueError(f"positions must be a pair (lo, hi) of ints (hi None: the end of the "
                     f"row), got {positions!r}")
  lo, hi = int(positions[0]), (None if positions[1] is None else int(positions[1]))
  if lo < 0 or (hi is not None and hi <= lo):
    raise ValueError(f"positions must satisfy 0 <= lo < hi, got {positions!r}")
  if ks[-1] > lo + 1:
    raise ValueError(f"context {ks[-1]} does not fit before position {lo} (windows hold "
                     f"inputs t-k+1..t, so k <= lo + 1 = {lo + 1}); raise lo or drop it")
  return ks, (lo, hi)


def _last_logits(model, params, collections, windows_NK, beta):
  return model.apply({"params": params, **collections}, windows_NK, beta=beta, last_only=True)


@functools.partial(jax.jit, static_argnames=("model",))
def _last_xent(params, collections, windows_NK, targets_N, beta, *, model):
  logits_N1V = _last_logits(model, params, collections, windows_NK, beta)
  return token_xent(logits_N1V, targets_N[:, None])[:, 0]


def context_losses(model, params, collections, split, *, batch_size: int, seq_len: int,
                   contexts=(1, 2, 4, 8, 16, 32, 64), positions=None,
                   mode: str = "story", max_batches: int | None = None, beta=0.0,
                   unigram_log_p: np.ndarray | None = None,
                   token_budget: int = TOKEN_BUDGET) -> ContextLosses:
  """The restart test over the evaluation batches (module docstring), on the
  devices of ``params`` (no data mesh; ``context_use_workdir`` puts them on one).

  Args:
    model, params, collections, split, batch_size, seq_len, mode, max_batches, beta:
      as for ``evaluate_split``.
    contexts: window lengths k (each <= lo + 1).
    positions: the target positions ``(lo, hi)``, lo <= t < hi <= seq_len (hi None:
      the end of the row; default: from the largest k to the end of the row).
    unigram_log_p: log unigram probabilities (V,) for the unigram column
      (``setup.unigram_log_probs``); None skips it.
    token_budget: window tokens per forward call (windows x k); only each
      window's last position reaches the head (``last_only``), and at most
      ``LOGIT_BUDGET`` / V windows go into one call (at k = 1 a large vocabulary,
      not the window tokens, sets the memory).
  """
  if positions is None:
    lo = max(check_contexts(contexts)[0])
    if lo >= seq_len:
      fits = (f"; the largest context fits the targets from position {lo - 1} on "
              f"(--positions={lo - 1}:)" if lo - 1 < seq_len else "")
      raise ValueError(f"the default positions start at the largest context, {lo}, but rows "
                       f"have only {seq_len} positions{fits}; or pass smaller contexts "
                       f"(--contexts)")
    positions = (lo, seq_len)
  ks, (lo, hi) = check_contexts(contexts, positions)
  if lo >= seq_len:
    raise ValueError(f"positions start at {lo}, but rows have only {seq_len} positions")
  if hi is None:
    hi = seq_len
  elif hi > seq_len:
    raise ValueError(f"positions end at {hi}, but rows have only {seq_len} positions; pass "
                     f"hi <= {seq_len}, or hi None (--positions={lo}:) for the rest of the row")
  token_losses.check_max_batches(max_batches)
  if isinstance(token_budget, bool) or not isinstance(token_budget, numbers.Integral) \
      or token_budget < 1:
    raise ValueError(f"token_budget must be an int >= 1, got {token_budget!r}")
  log_p = None
  if unigram_log_p is not None:
    log_p = np.asarray(unigram_log_p, np.float64)
    if log_p.ndim != 1:
      raise ValueError(f"unigram_log_p must be a (V,) array, got shape {log_p.shape}")
  beta = jnp.asarray(beta, jnp.float32)
  inputs, whole, tgt, row, pos = [], [], [], [], []
  for b_k, batch in enumerate(qdata.iter_eval_batches(split, batch_size=batch_size,
                                                       seq_len=seq_len, mode=mode)):
    if max_batches is not None and b_k >= max_batches:
      break
    x_BT = token_losses._batch_xent(params, collections, batch["inputs"], batch["targets"],
                                    beta, model=model)
    x_BT = np.asarray(jax.device_get(x_BT), np.float64)
    m_BT = batch["mask"] > 0
    m_BT[:, :lo] = False
    m_BT[:, hi:] = False
    b_idx, t_idx = np.nonzero(m_BT)
    whole.append(x_BT[b_idx, t_idx])
    tgt.append(batch["targets"][b_idx, t_idx])
    inputs.append(batch["inputs"])  # each row once; windows are cut from it per call
    row.append(b_k * batch_size + b_idx)
    pos.append(t_idx)
  if not whole:
    raise ValueError("the validation split produced no batches")
  inputs_RT = np.concatenate(inputs)
  targets_N, pos_N = np.concatenate(tgt), np.concatenate(pos).astype(np.int64)
  row_N = np.concatenate(row).astype(np.int64)
  n = targets_N.shape[0]
  if n == 0:
    raise ValueError(f"no real target tokens at positions {lo}..{hi - 1}")
  if log_p is not None and int(targets_N.max()) >= log_p.shape[0]:
    raise ValueError(f"target id {int(targets_N.max())} is outside unigram_log_p's "
                     f"{log_p.shape[0]} ids")
  restart = np.empty((len(ks), n), np.float64)
  # each window's last position gives V logits (a model without a config: no cap)
  vocab = getattr(getattr(model, "cfg", None), "vocab_size", None) or 1
  for i, k in enumerate(ks):
    per_call = int(min(n, max(1, token_budget // k), max(1, LOGIT_BUDGET // int(vocab))))
    for s in range(0, n, per_call):
      # window j holds inputs t_j-k+1 .. t_j of its row
      t_N = pos_N[s:s + per_call]
      w = inputs_RT[row_N[s:s + per_call, None], t_N[:, None] + np.arange(1 - k, 1)[None, :]]
      y = targets_N[s:s + per_call]
      got = w.shape[0]
      if got < per_call:  # one compiled shape per k: pad with the first window
        w = np.concatenate([w, np.repeat(w[:1], per_call - got, 0)])
        y = np.concatenate([y, np.repeat(y[:1], per_call - got, 0)])
      x = _last_xent(params, collections, w, y, beta, model=model)
      restart[i, s:s + got] = np.asarray(jax.device_get(x), np.float64)[:got]
  return ContextLosses(
      contexts=ks, restart=restart, whole_row=np.concatenate(whole),
      unigram=None if log_p is None else -log_p[targets_N.astype(np.int64)],
      target=targets_N.astype(np.int64), row=row_N, position=pos_N)


def summarize(cl: ContextLosses) -> dict:
  """Token-weighted means: ``{"targets", "positions", "restart": {k: L(k)},
  "whole_row", "unigram"}``. ``"positions"`` is [first, last] target position
  scored, both inclusive; ``"unigram"`` is None without a unigram model."""
  return {"targets": int(cl.whole_row.size),
          "positions": [int(cl.position.min()), int(cl.position.max())],
          "restart": {str(k): float(x.mean()) for k, x in zip(cl.contexts, cl.restart)},
          "whole_row": float(cl.whole_row.mean()),
          "unigram": None if cl.unigram is None else float(cl.unigram.mean())}


def markdown_table(summary: dict) -> str:
  """One row of losses: each k, the whole row and the unigram model."""
  ks = list(summary["restart"])
  head = ["context k", *ks, "whole row"] + (["unigram"] if summary["unigram"] is not None
                                             else [])
  vals = [summary["restart"][k] for k in ks] + [summary["whole_row"]]
  if summary["unigram"] is not None:
    vals.append(summary["unigram"])
  return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                    "| loss (nats) | " + " | ".join(f"{v:.3f}" for v in vals) + " |"])


def save(cl: ContextLosses, path) -> None:
  """Writes the arrays to ``path`` (``.npz``, atomically); a None ``unigram`` is left out."""
  arrays = {f.name: np.asarray(getattr(cl, f.name)) for f in dataclasses.fields(cl)
            if getattr(cl, f.name) is not None}
  token_losses.save_npz(path, arrays)


def context_use_workdir(workdir, *, contexts=(1, 2, 4, 8, 16, 32, 64), positions=None,
                        data: str | None = None, step: int | None = None,
                        max_batches: int | None = None, batch_size: int | None = None,
                        tokenizer_file: str | None = None, cache_dir: str | None = None,
                        beta: float | None = None, attn_impl: str | None = None,
                        out=None) -> dict:
  """The restart test on a run folder's checkpoint (module docstring).

  The unigram column counts the run's own training split, whatever ``data`` is.

  Args:
    workdir, data, step, max_batches, batch_size, tokenizer_file, cache_dir, beta,
      attn_impl: as for ``evaluate_workdir``.
    contexts: window lengths k.
    positions: target positions ``(lo, hi)``, hi <= the run's row length or None
      for the end of the row (default: from the largest k to the end of the row).
    out: an ``.npz`` path for the per-target arrays (None: not kept).

  Returns:
    ``summarize``'s dict with ``"step", "stage", "data", "trained_on", "beta",
    "batch_size"``.
  """
  from qsf_jax.training import setup  # pylint: disable=g-import-not-at-top
  from qsf_jax.training.evaluation import open_evaluation  # pylint: disable=g-import-not-at-top
  # checked before loading and evaluating, which can take minutes
  ks, _ = check_contexts(contexts, positions)
  if out is not None:
    token_losses.check_output_path(out, "out")
  ev = open_evaluation(workdir, data=data, step=step, max_batches=max_batches,
                       batch_size=batch_size, tokenizer_file=tokenizer_file,
                       cache_dir=cache_dir, beta=beta, attn_impl=attn_impl)
  run, mode = ev.run, ev.cfg.data_mode
  log_p = setup.unigram_log_probs(ev.train_split("the unigram baseline"),
                                  run.tokenizer.vocab_size)
  # context_losses feeds unsharded windows: with the params replicated over every
  # device (as load_run restores them) each device would repeat the whole work.
  one = jax.local_devices()[0]
  params, collections = jax.device_put((run.params, run.collections), one)
  cl = context_losses(run.model, params, collections, ev.corpus.valid,
                      batch_size=ev.batch_size, seq_len=run.seq_len, contexts=ks,
                      positions=positions,
                      mode=mode, max_batches=max_batches, beta=ev.beta, unigram_log_p=log_p)
  if out is not None:
    save(cl, out)
  return dict(summarize(cl), **ev.record())
