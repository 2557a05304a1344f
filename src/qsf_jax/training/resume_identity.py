"""The resume check: whether a stored run is the run a command asks for.

``IDENTITY_KEYS`` name the metadata entries that define a run; resuming with
any of them changed is refused (``CheckpointMismatchError``). The execution
entries of the model config (``models.config.EXECUTION_FIELDS``: how the same
function is computed) may change and are reported apart.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from qsf_jax.models import config as model_config
from qsf_jax.training.errors import CheckpointMismatchError


# Metadata keys that define a run: resuming with any of them changed would not
# continue the same optimisation (model, data stream or schedule differ).
IDENTITY_KEYS = ("stage", "model_config", "tokenizer", "data_source", "seed", "steps",
                 "batch_size", "seq_len", "lr", "weight_decay", "clip_norm", "cycle_momentum",
                 "grad_accum", "data_mode")


def _flatten(prefix: str, value, out: dict) -> None:
  if isinstance(value, Mapping):
    for k, v in value.items():
      _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
  else:
    out[prefix] = list(value) if isinstance(value, tuple) else value


# Model-config entries that may change on resume: they choose how the same
# function is computed (``models.config.EXECUTION_FIELDS``).
EXECUTION_KEYS = tuple(f"model_config.{f}" for f in model_config.EXECUTION_FIELDS)


def _all_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> dict:
  a, b = {}, {}
  for k in IDENTITY_KEYS:
    _flatten(k, stored.get(k), a)
    _flatten(k, requested.get(k), b)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def identity_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> dict:
  """``{key: (stored, requested)}`` for the run-identity entries that differ.

  ``EXECUTION_KEYS`` (the linear-attention impl and Pallas design) are not part
  of a run's identity; ``execution_differences`` reports them.
  """
  return {k: v for k, v in _all_differences(stored, requested).items()
          if k not in EXECUTION_KEYS}


def execution_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> dict:
  """``{key: (stored, requested)}`` for the ``EXECUTION_KEYS`` that differ."""
  return {k: v for k, v in _all_differences(stored, requested).items()
          if k in EXECUTION_KEYS}


def check_resumable(workdir: str | os.PathLike, stored: Mapping[str, Any],
                    requested: Mapping[str, Any]) -> None:
  """Raises ``CheckpointMismatchError`` unless the stored run matches the request."""
  diffs = identity_differences(stored, requested)
  if any(k.startswith("data_source.") for k in diffs):
    # The data identity is a hash; name the flags behind it that changed.
    a, b = (dict(m.get("train_config") or {}) for m in (stored, requested))
    for key in ("data", "max_train_stories"):
      if a.get(key) != b.get(key):
        diffs[f"--{key}"] = (a.get(key), b.get(key))
  if diffs:
    raise CheckpointMismatchError(str(workdir), diffs)
