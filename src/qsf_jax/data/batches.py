"""Training and evaluation batches from a ``TokenSplit``.

Batch convention (both modes): a dict of NumPy arrays

* ``inputs``  int32 (B, T): tokens the model reads;
* ``targets`` int32 (B, T): the next tokens, ``targets[:, t] = sequence[:, t+1]``;
* ``mask``    float32 (B, T): 1 where ``targets`` is a real token, 0 on padding.

The loss is ``sum(mask * CE) / sum(mask)``. Each row comes from a window of
``T + 1`` tokens, so the model sees exactly ``T`` positions; no BOS is added.

Modes:

* ``"story"`` (QSF spec D13): one story per row, ``story + EOT`` truncated to
  ``T + 1`` tokens and padded with EOT (mask 0). Rows visit the stories in a
  fresh random order each epoch (without replacement within an epoch).
* ``"packed"`` (D13 alternative): the stream ``story EOT story EOT ...`` cut at
  uniformly random offsets; the mask is all ones.

A training batch is a pure function of ``(seed, step)`` (and the split), so a
run resumes its data stream exactly from ``step``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from qsf_jax import _checks
from qsf_jax.data.cache import TokenSplit

MODES = ("story", "packed")
_STORY_STREAM, _PACKED_STREAM = 0x5709, 0x9ACC  # separate RNG streams per mode


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def _check_split(split) -> None:
  if not isinstance(split, TokenSplit):
    raise ValueError(f"split must be a TokenSplit (e.g. corpus.train), got {type(split).__name__}")


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The story order of one epoch: a permutation of ``range(n)`` (int64, (n,))."""
  order = np.random.default_rng([seed, epoch, _STORY_STREAM]).permutation(n)
  order.flags.writeable = False
  return order


def _story_rows(split: TokenSplit, story_ids: np.ndarray, seq_len: int):
  """Rows of ``seq_len + 1`` tokens, one story each, EOT-padded; and their lengths."""
  rows_BS = np.full((story_ids.shape[0], seq_len + 1), split.eot_id, np.int32)
  lens_B = np.zeros(story_ids.shape[0], np.int64)
  for b, i in enumerate(story_ids):
    start = split.offsets[i]
    stop = min(split.offsets[i + 1], start + seq_len + 1)
    rows_BS[b, :stop - start] = split.tokens[start:stop]
    lens_B[b] = stop - start
  return rows_BS, lens_B


def _to_batch(rows_BS: np.ndarray, lens_B: np.ndarray) -> dict[str, np.ndarray]:
  """Splits rows into inputs/targets; target t is real iff t + 1 < length."""
  T = rows_BS.shape[1] - 1
  mask_BT = (np.arange(T)[None, :] < (lens_B[:, None] - 1)).astype(np.float32)
  return {"inputs": np.ascontiguousarray(rows_BS[:, :-1]),
          "targets": np.ascontiguousarray(rows_BS[:, 1:]), "mask": mask_BT}


def get_batch(split: TokenSplit, *, seed: int, step: int, batch_size: int, seq_len: int,
              mode: str = "story") -> dict[str, np.ndarray]:
  """Training batch ``step`` of a split (QSF spec D13: one story per example + EOT).

  Story mode: row ``b`` is example ``g = step * B + b``; with ``S`` stories,
  it is story ``perm_e[g mod S]`` where ``e = g // S`` and ``perm_e`` is a
  permutation drawn from ``np.random.default_rng((seed, e, stream))``. Packed
  mode: row starts are drawn from ``np.random.default_rng((seed, step, stream))``
  (``stream`` a fixed constant per mode, so the two never share a sequence).

  Args:
    split: the token stream (e.g. ``corpus.train``).
    seed: data seed (>= 0).
    step: training step (>= 0).
    batch_size: rows B (>= 1).
    seq_len: model positions T (>= 1).
    mode: ``"story"`` or ``"packed"``.

  Returns:
    ``{"inputs": int32 (B, T), "targets": int32 (B, T), "mask": float32 (B, T)}``.
  """
  _check_split(split)
  seed, step = _check_int("seed", seed, 0), _check_int("step", step, 0)
  B, T = _check_int("batch_size", batch_size, 1), _check_int("seq_len", seq_len, 1)
  _checks.check_choice("mode", mode, MODES)
  if mode == "story":
    S = split.n_stories
    if S < 1:
      raise ValueError("story mode needs at least one story; the split holds none")
    g_B = step * B + np.arange(B, dtype=np.int64)
    epoch_B, pos_B = g_B // S, g_B % S
    ids_B = np.array([_epoch_order(seed, int(e), S)[p] for e, p in zip(epoch_B, pos_B)], np.int64)
    return _to_batch(*_story_rows(split, ids_B, T))
  N = split.n_tokens
  if N < T + 1:
    raise ValueError(f"packed mode needs at least seq_len + 1 = {T + 1} tokens; "
                     f"the split holds {N}")
  rng = np.random.default_rng([seed, step, _PACKED_STREAM])
  start_B = rng.integers(0, N - T - 1, size=B, endpoint=True)
  rows_BS = np.stack([np.asarray(split.tokens[s:s + T + 1], np.int32) for s in start_B])
  return _to_batch(rows_BS, np.full(B, T + 1))


def num_eval_batches(split: TokenSplit, *, batch_size: int, seq_len: int,
                     mode: str = "story") -> int:
  """Number of batches ``iter_eval_batches`` yields for these arguments."""
  _check_split(split)
  B, T = _check_int("batch_size", batch_size, 1), _check_int("seq_len", seq_len, 1)
  _checks.check_choice("mode", mode, MODES)
  rows = split.n_stories if mode == "story" else -(-(split.n_tokens - 1) // T)
  return -(-rows // B)


def iter_eval_batches(split: TokenSplit, *, batch_size: int, seq_len: int,
                      mode: str = "story") -> Iterator[dict[str, np.ndarray]]:
  """Deterministic evaluation batches covering the whole split once, in order.

  Story mode: stories ``0, 1, ..., S-1`` in order, one per row, as in
  ``get_batch`` (truncated to ``T + 1`` tokens, QSF spec D13). Packed mode:
  consecutive windows ``tokens[kT : kT + T + 1]``, so every token after the
  first is a target exactly once. The last batch is padded with all-masked
  rows, so every batch has shape (B, T) and a jitted eval step compiles once.

  Args:
    split: the token stream (e.g. ``corpus.valid``).
    batch_size: rows B (>= 1).
    seq_len: model positions T (>= 1).
    mode: ``"story"`` or ``"packed"``.

  Yields:
    Batches in the ``get_batch`` format.
  """
  n_batches = num_eval_batches(split, batch_size=batch_size, seq_len=seq_len, mode=mode)
  B, T = batch_size, seq_len
  n_rows = split.n_stories if mode == "story" else -(-(split.n_tokens - 1) // T)
  for k in range(n_batches):
    ids = np.arange(k * B, min((k + 1) * B, n_rows), dtype=np.int64)
    if mode == "story":
      rows_BS, lens_B = _story_rows(split, ids, T)
    else:
      rows_BS = np.full((ids.shape[0], T + 1), split.eot_id, np.int32)
      lens_B = np.zeros(ids.shape[0], np.int64)
      for b, r in enumerate(ids):
        window = split.tokens[r * T:r * T + T + 1]
        rows_BS[b, :window.shape[0]] = window
        lens_B[b] = window.shape[0]
    pad = B - ids.shape[0]
    if pad:
      rows_BS = np.concatenate([rows_BS, np.full((pad, T + 1), split.eot_id, np.int32)])
      lens_B = np.concatenate([lens_B, np.zeros(pad, np.int64)])
    yield _to_batch(rows_BS, lens_B)
