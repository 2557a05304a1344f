"""The training loop's small pieces: which steps log, save and evaluate, the stop
agreed by every process, metrics as floats, the run folder's identity, and the
span of the normalisation anneal (D5) for the log.

Used by ``loop``; ``anneal_span`` is re-exported there.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import jax.numpy as jnp

from qsf_jax.training.checkpoint import is_primary
from qsf_jax.training.metrics import read_records


def anneal_span(steps: int, anneal_frac: float, hold_frac: float) -> str:
  """The steps over which D5's beta ramps from 0 to 1, for the log (``anneal_beta``).

  The ramp ends ``hold_frac * steps`` before the last step and lasts
  ``anneal_frac * steps``; the first and last whole steps it touches are named,
  or the one step when a short run squeezes it into one.
  """
  end = steps - hold_frac * steps
  first, last = math.ceil(end - anneal_frac * steps), math.ceil(end)
  return f"at step {last}" if first == last else f"from step {first} to {last}"


def _log(msg: str) -> None:
  if is_primary():
    print(msg, flush=True)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _due(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


def _eval_missing(workdir: str, step: int) -> bool:
  """True if ``metrics.jsonl`` has no evaluation record at ``step`` (the same on every process)."""
  missing = not any(r["step"] == step and r.get("kind") == "eval"
                    for r in read_records(os.path.join(workdir, "metrics.jsonl")))
  if jax.process_count() > 1:  # only process 0 writes the log: use its answer everywhere
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing


def _stop_agreed(requested: bool) -> bool:
  """Whether any process was asked to stop (SIGINT/SIGTERM), the same on every process.

  The stop's checkpoint save is collective: a process that saved and left the
  loop while the others went on training would hang them. With one process,
  ``requested`` itself.
  """
  if jax.process_count() == 1:
    return bool(requested)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(requested))).any())


def _scalars(metrics) -> dict[str, float]:
  """Metrics as floats; a vector metric ``v`` (e.g. alpha per layer) becomes ``v/<i>``."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
    else:
      out.update({f"{k}/{i}": float(x) for i, x in enumerate(v.ravel())})
  return out


def _folder_id(path):
  """(device, inode) of the folder ``path``, or None where it does not exist."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_dev, st.st_ino
