"""Training history of a run: losses and the learned alpha per layer (QSF §4.4, Fig. 1).

``metrics.jsonl`` (``qsf_jax.training.metrics``) holds one JSON record per line
with ``step`` and ``kind`` ("train", "eval", "sample"). The training loop logs
the loss, learning rate, gradient norm and anneal weight; per-layer alpha is
read from records that carry it (keys ``alpha/<l>``, ``alpha_<l>`` or a list
``alpha``) and otherwise from the run's retained checkpoints, one point per
checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import re

import jax
import numpy as np

from qsf_jax.training.checkpoint import Checkpointer, has_checkpoint
from qsf_jax.training.metrics import read_records

_ALPHA_KEY = re.compile(r"^alpha[/_.](\d+)$")


def read_metrics(workdir) -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` (empty if absent); bad lines are skipped."""
  return read_records(pathlib.Path(workdir) / "metrics.jsonl")


def loss_curves(records) -> dict:
  """Train and validation loss against step from metrics records.

  Returns:
    ``{"train": (steps, losses), "eval": (steps, val_losses)}`` as numpy arrays,
    sorted by step; a resumed run's repeated steps keep the last record.
  """
  out = {}
  for kind, key in (("train", "loss"), ("eval", "val_loss")):
    pts = {int(r["step"]): float(r[key]) for r in records
           if r.get("kind") == kind and isinstance(r.get(key), (int, float))}
    steps = np.array(sorted(pts), np.int64)
    out[kind] = (steps, np.array([pts[s] for s in steps], np.float64))
  return out


def alpha_from_metrics(records, n_layers: int):
  """Per-layer alpha logged in metrics records, or None if no record has it.

  Args:
    records: from ``read_metrics``.
    n_layers: L.

  Returns:
    (steps (S,), alpha (S, L)) or None.
  """
  pts = {}
  for r in records:
    vals = None
    if isinstance(r.get("alpha"), list) and len(r["alpha"]) == n_layers:
      vals = [float(v) for v in r["alpha"]]
    else:
      found = {int(m.group(1)): float(v) for k, v in r.items()
               if (m := _ALPHA_KEY.match(k)) and isinstance(v, (int, float))}
      if found and sorted(found) == list(range(n_layers)):
        vals = [found[l] for l in range(n_layers)]
    if vals is not None:
      pts[int(r["step"])] = vals
  if not pts:
    return None
  steps = np.array(sorted(pts), np.int64)
  return steps, np.array([pts[s] for s in steps], np.float64)


def alpha_from_checkpoints(workdir):
  """Per-layer alpha of every retained checkpoint of a Stage-III/IV run.

  Returns:
    (steps (S,), alpha (S, L)) or None when no checkpoint holds ``layers/alpha``.
  """
  if not has_checkpoint(workdir):
    return None
  ckpt = Checkpointer(workdir, read_only=True)
  steps, vals = [], []
  try:
    for step in sorted(ckpt.all_steps()):
      params, _ = ckpt.restore_params(step)
      alpha = params.get("layers", {}).get("alpha") if isinstance(params, dict) else None
      if alpha is None:
        return None
      steps.append(int(step))
      vals.append(np.asarray(jax.device_get(alpha), np.float64).reshape(-1))
  finally:
    ckpt.close()
  if not steps:
    return None
  return np.array(steps, np.int64), np.stack(vals)


def alpha_history(workdir, n_layers: int, up_to_step: int | None = None) -> dict | None:
  """alpha_l against training step (QSF Fig. 1 analogue), from metrics or checkpoints.

  The metrics log (``alpha/<l>`` keys, written every ``log_every`` steps) is the
  source unless it holds fewer than two points and the retained checkpoints
  hold more.

  Args:
    workdir: the run folder.
    n_layers: L.
    up_to_step: keep only the points at or before this step (the checkpoint
      being analysed); None keeps all.

  Returns:
    ``{"steps" (S,), "alpha" (S, L), "source": "metrics.jsonl" | "checkpoints"}``
    or None (no alpha anywhere, e.g. Stage II, or none up to ``up_to_step``).
  """
  def cut(got):
    if got is None or up_to_step is None:
      return got
    keep = np.asarray(got[0]) <= up_to_step
    return (np.asarray(got[0])[keep], np.asarray(got[1])[keep]) if keep.any() else None

  got, source = cut(alpha_from_metrics(read_metrics(workdir), n_layers)), "metrics.jsonl"
  if got is None or len(got[0]) < 2:  # no curve in the metrics: try the checkpoints
    ckpt = cut(alpha_from_checkpoints(os.fspath(workdir)))
    if ckpt is not None and (got is None or len(ckpt[0]) > len(got[0])):
      got, source = ckpt, "checkpoints"
  if got is None:
    return None
  return {"steps": got[0], "alpha": got[1], "source": source}
