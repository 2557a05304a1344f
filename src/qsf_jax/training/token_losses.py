"""Per-token validation cross entropies, their outliers and unseen inputs.

The validation loss (QSF spec D13) is a mean over tokens, so a few tokens with huge
losses can move it by nats: a linear-scaled Stage III (D5, beta = 1) was seen to lose
1.26 nats to its own LayerNorm evaluation through 0.4% of the tokens (docs/RESULTS.md,
"What the outliers are"). This module keeps each target token's cross entropy with its
row and position, counts the tokens above a threshold, and splits them by whether
every input so far occurs in the training rows at all::

  xent_t = logsumexp_v z_{t v} - z_{t y_t}     (one target token, nats)
  unseen_so_far_t = any_{s <= t} [x_s never occurs in the training rows]

``python -m experiments.evaluate --per_token`` adds ``summarize``'s dict to its JSON,
and ``--per_token_out=FILE.npz`` keeps the arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import pathlib
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax import data as qdata
from qsf_jax.training import sharding as shd
from qsf_jax.training.step import _apply, token_xent


_STORY_BLOCK = 8192  # stories per block in training_tokens
_TOKEN_BLOCK = 1 << 24  # tokens per block in training_tokens (packed mode)


@dataclasses.dataclass(frozen=True)
class TokenLosses:
  """The real target tokens of an evaluation, in evaluation order.

  Attributes:
    xent: each token's cross entropy in nats, float64 (N,).
    row: its row, counted over the evaluation batches (in story mode, the
      validation story), int64 (N,).
    position: its position t in the row: the model predicts it from the inputs
      at positions 0..t, int64 (N,).
    unseen_so_far: whether some input at positions 0..t never occurs in the
      training rows, bool (N,); None where no training token set was given.
    unseen_input_types: distinct input token ids of the evaluated rows that never
      occur in the training rows (None likewise).
    unseen_input_count: how many real inputs have such an id (None likewise).
  """
  xent: np.ndarray
  row: np.ndarray
  position: np.ndarray
  unseen_so_far: np.ndarray | None = None
  unseen_input_types: int | None = None
  unseen_input_count: int | None = None


def training_tokens(split, *, seq_len: int, mode: str, vocab_size: int) -> np.ndarray:
  """Which token ids occur in the rows that training reads (bool (V,)).

  Story mode (D13): the first ``seq_len + 1`` tokens of each story, the only ones a
  training row holds. Packed mode: the whole stream (rows start anywhere in it).
  A token seen only as a row's last target counts as seen.

  Args:
    split: the training ``TokenSplit``.
    seq_len: model positions T.
    mode: ``"story"`` or ``"packed"``.
    vocab_size: V; every id in the split must be below it.
  """
  if mode not in qdata.MODES:
    raise ValueError(f"mode must be one of {qdata.MODES}, got {mode!r}")
  if isinstance(seq_len, bool) or int(seq_len) < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len!r}")
  # In blocks, so that a full corpus (hundreds of millions of tokens, a memmap) is
  # never copied or indexed at once.
  ids = np.zeros(max(vocab_size, 1 << 16), bool)  # the split's ids are uint16
  if mode == "story":
    offsets = np.asarray(split.offsets, np.int64)
    for lo in range(0, split.n_stories, _STORY_BLOCK):
      hi = min(lo + _STORY_BLOCK, split.n_stories)
      starts = offsets[lo:hi]
      lens = np.minimum(offsets[lo + 1:hi + 1] - starts, seq_len + 1)
      first = np.cumsum(lens) - lens
      idx = np.repeat(starts, lens) + (np.arange(int(lens.sum())) - np.repeat(first, lens))
      ids[np.unique(split.tokens[idx])] = True
  else:
    for lo in range(0, split.n_tokens, _TOKEN_BLOCK):
      ids[np.unique(split.tokens[lo:lo + _TOKEN_BLOCK])] = True
  present = np.flatnonzero(ids)
  if present.size and int(present[-1]) >= vocab_size:
    raise ValueError(f"the training split holds token id {int(present[-1])}, outside the "
                     f"vocabulary of {vocab_size}")
  return ids[:vocab_size].copy()


@functools.partial(jax.jit, static_argnames=("model",))
def _batch_xent(params, collections, inputs, targets, beta, *, model):
  logits, _ = _apply(model, params, collections, inputs, beta, False)
  return token_xent(logits, targets)


def token_losses(model, params, collections, split, *, batch_size: int, seq_len: int,
                 mode: str = "story", max_batches: int | None = None, beta=0.0,
                 seen: np.ndarray | None = None, mesh=None) -> TokenLosses:
  """Each real target token's cross entropy over the evaluation batches (D13).

  The batches are ``evaluate_split``'s, so ``xent.mean()`` is its ``val_loss`` up
  to float32 summation order.

  Args:
    model, params, collections, split, batch_size, seq_len, mode, max_batches, beta,
      mesh: as for ``evaluate_split``.
    seen: ``training_tokens``'s (V,) mask, to mark unseen inputs; None skips it.
  """
  check_max_batches(max_batches)
  if seen is not None:
    seen = np.asarray(seen)
    if seen.dtype != bool or seen.ndim != 1:
      raise ValueError(f"seen must be a bool (V,) mask, got {seen.dtype} {seen.shape}")
  beta = jnp.asarray(beta, jnp.float32)
  xs, rows, positions, unseen = [], [], [], []
  unseen_ids: set[int] = set()
  unseen_count = 0
  for k, batch in enumerate(qdata.iter_eval_batches(split, batch_size=batch_size,
                                                     seq_len=seq_len, mode=mode)):
    if max_batches is not None and k >= max_batches:
      break
    placed = shd.shard_eval_batch(batch, mesh) if mesh is not None else batch
    x_BT = np.asarray(jax.device_get(_batch_xent(params, collections, placed["inputs"],
                                                 placed["targets"], beta, model=model)),
                      np.float64)
    real_BT = batch["mask"] > 0
    b_idx, t_idx = np.nonzero(real_BT)
    xs.append(x_BT[b_idx, t_idx])
    rows.append(k * batch_size + b_idx)
    positions.append(t_idx)
    if seen is not None:
      inputs_BT = batch["inputs"].astype(np.int64)
      if inputs_BT.max() >= seen.shape[0]:
        raise ValueError(f"input id {int(inputs_BT.max())} is outside the seen mask's "
                         f"{seen.shape[0]} ids")
      new_BT = ~seen[inputs_BT] & real_BT  # every real target's input is real
      unseen.append(np.logical_or.accumulate(new_BT, axis=1)[b_idx, t_idx])
      unseen_ids.update(np.unique(inputs_BT[new_BT]).tolist())
      unseen_count += int(new_BT.sum())
  if not xs:
    raise ValueError("the validation split produced no batches")
  has_seen = seen is not None
  return TokenLosses(
      xent=np.concatenate(xs), row=np.concatenate(rows).astype(np.int64),
      position=np.concatenate(positions).astype(np.int64),
      unseen_so_far=np.concatenate(unseen) if has_seen else None,
      unseen_input_types=len(unseen_ids) if has_seen else None,
      unseen_input_count=unseen_count if has_seen else None)


def check_threshold(threshold) -> None:
  """Raises unless ``threshold`` is a finite number of nats > 0."""
  if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
      or not math.isfinite(threshold) or threshold <= 0):
    raise ValueError(f"the outlier threshold must be a finite number of nats > 0, "
                     f"got {threshold!r}")


def check_max_batches(max_batches) -> None:
  """Raises unless ``max_batches`` is an int >= 1 or None (the whole split)."""
  if max_batches is not None and (isinstance(max_batches, bool)
                                  or not isinstance(max_batches, numbers.Integral)
                                  or max_batches < 1):
    raise ValueError(f"max_batches must be an int >= 1, or None for the whole split, "
                     f"got {max_batches!r}")


def check_output_path(path, name: str = "per_token_out") -> None:
  """Raises unless ``path`` ends in ``.npz``, its folder exists and it is not a folder.

  Checked before the work whose result it will hold.

  Args:
    path: the output file.
    name: the argument (and flag) that gave it, for the message.
  """
  p = pathlib.Path(path)
  if p.suffix != ".npz":
    raise ValueError(f"{name} must be an .npz file, got {str(path)!r}")
  if not p.parent.is_dir():
    raise FileNotFoundError(f"{name}: the folder {str(p.parent)!r} does not exist")
  if p.is_dir():
    raise ValueError(f"{name}={str(path)!r} is a folder, not a file")


def summarize(tl: TokenLosses, threshold: float = 20.0) -> dict:
  """Mean, median, maximum and the tokens above ``threshold`` nats.

  With ``unseen_so_far``, also the share of the tokens above the threshold (and of
  the others) that follow an input never seen in training, and the mean and share
  above the threshold where every input so far was seen. Shares of an empty group
  are None.

  Args:
    tl: ``token_losses``'s result.
    threshold: the outlier threshold in nats (> 0, finite).
  """
  check_threshold(threshold)
  x = tl.xent
  if x.size == 0:
    raise ValueError("no tokens to summarize")
  above = x > threshold

  def share(m, of):
    return float(m[of].mean()) if of.any() else None

  out = {"tokens": int(x.size), "threshold_nats": float(threshold), "mean": float(x.mean()),
         "median": float(np.median(x)), "max": float(x.max()), "above": int(above.sum()),
         "above_frac": float(above.mean()),
         "rows_with_above": int(np.unique(tl.row[above]).size),
         "mean_at_or_below": float(x[~above].mean()) if (~above).any() else None}
  if tl.unseen_so_far is not None:
    u = tl.unseen_so_far
    out.update(
        unseen_input_types=tl.unseen_input_types, unseen_input_count=tl.unseen_input_count,
        unseen_so_far_frac=float(u.mean()),
        above_unseen_so_far_frac=share(u, above), rest_unseen_so_far_frac=share(u, ~above),
        all_seen_mean=float(x[~u].mean()) if (~u).any() else None,
        all_seen_above_frac=share(above, ~u))
  return out


def save_npz(path, arrays: dict) -> None:
  """Writes ``arrays`` to ``path`` (``.npz``) atomically: a temporary file in the
  same folder, renamed over ``path`` once complete, so an interrupted write never
  leaves a partial file under the final name."""
  check_output_path(path)
  p = pathlib.Path(path)
  # open(.., "xb") rather than mkstemp: the file gets the umask's permissions (mkstemp's
  # are 0600), as np.savez_compressed(path) would give.
  tmp = p.parent / f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    with open(tmp, "xb") as f:
      np.savez_compressed(f, **arrays)
    os.replace(tmp, p)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def save(tl: TokenLosses, path) -> None:
  """Writes the arrays to ``path`` (``.npz``, atomically); None fields are left out."""
  arrays = {f.name: getattr(tl, f.name) for f in dataclasses.fields(tl)
            if getattr(tl, f.name) is not None}
  save_npz(path, arrays)
