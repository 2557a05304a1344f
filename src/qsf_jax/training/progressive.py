"""Progressive initialisation across stages (QSF spec D12: II <- I, III/IV <- II).

The shared parameters are those of the model zoo's documented mapping
(``qsf_jax.models.shared_param_paths``): II <- I copies the embeddings,
positions, norms and FFN; III <- II copies the embeddings, positions,
``norm1``, K, b and the final norm (attention and alpha are new); IV <- II the
same without K (S is new, so K ~ I); any stage may also start from a
checkpoint of itself. Non-parameter collections (the D5 norm statistics) are
never copied: they are collected afresh. The optimizer and the schedule start
fresh (D12).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from qsf_jax.models.params import transfer_params
from qsf_jax.training.checkpoint import Checkpointer, has_checkpoint
from qsf_jax.training.errors import NoCheckpointError, TrainConfigError


def path_name(path) -> str:
  """A pytree key path as ``"a/b/c"``."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def flatten_named(tree) -> dict[str, Any]:
  """``{"a/b/c": leaf}`` for every leaf of ``tree``."""
  return {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@dataclasses.dataclass(frozen=True)
class InitReport:
  """What the hand-off did, by parameter path.

  Attributes:
    src_stage: the stage of the source checkpoint.
    src_step: its step.
    copied: paths filled from the source checkpoint.
    new: paths that kept their fresh initialisation.
    dropped: source paths the new stage does not use.
  """
  src_stage: str
  src_step: int
  copied: tuple
  new: tuple
  dropped: tuple

  def summary(self) -> str:
    return (f"{len(self.copied)} parameter arrays copied, {len(self.new)} new "
            f"({', '.join(self.new) or '-'}), {len(self.dropped)} dropped "
            f"({', '.join(self.dropped) or '-'})")


def load_source_params(init_from: str) -> tuple[Any, dict]:
  """(params, meta) of the latest checkpoint in the run folder ``init_from``."""
  if not has_checkpoint(init_from):
    raise NoCheckpointError(f"--init_from={init_from} holds no checkpoint")
  ckpt = Checkpointer(init_from, read_only=True)
  try:
    meta = ckpt.meta()
    params, _ = ckpt.restore_params()
  finally:
    ckpt.close()
  return params, meta


def init_from_checkpoint(target_params, init_from: str, *, stage: str,
                         tokenizer: dict | None = None, data: dict | None = None,
                         log: Callable[[str], None] = print):
  """Initialises ``target_params`` from the run folder ``init_from`` (QSF spec D12).

  Args:
    target_params: the new stage's freshly initialised parameters.
    init_from: the previous stage's run folder.
    stage: the new stage.
    tokenizer: the new run's tokenizer record (``{"name", "sha256"}``, as in the
      run metadata); the checkpoint's must be the same, since the embedding
      rows are indexed by token id. None skips the check.
    data: the new run's data record (``{"source", "cache_key", ...}``, as in the
      run metadata): a checkpoint trained on other data (another token-cache
      key) gets a warning, since D12 hands off along one corpus. None skips it.
    log: where to report what was copied, new and dropped.

  Returns:
    (params with the structure and dtypes of ``target_params``, ``InitReport``).

  Raises:
    NoCheckpointError: ``init_from`` holds no checkpoint.
    TrainConfigError: the stage pair is not a D12 hand-off, a shared
      parameter has another shape (e.g. another model size or vocabulary), or
      the checkpoint was trained with another tokenizer.
  """
  source, meta = load_source_params(init_from)
  src_stage = meta.get("stage")
  stored = meta.get("tokenizer")
  if tokenizer is not None and stored is not None and (
      stored.get("name"), stored.get("sha256")) != (tokenizer.get("name"),
                                                    tokenizer.get("sha256")):
    raise TrainConfigError(
        f"--init_from={init_from} was trained with the tokenizer {stored.get('name')!r} "
        f"(sha256 {str(stored.get('sha256'))[:12]}...), this run uses "
        f"{tokenizer.get('name')!r} (sha256 {str(tokenizer.get('sha256'))[:12]}...): its "
        "embedding rows would stand for other tokens")
  try:
    merged, rep = transfer_params(source, target_params, src_stage, stage)
  except ValueError as e:
    raise TrainConfigError(f"--init_from={init_from}: {e}") from e
  if not rep["copied"]:
    raise TrainConfigError(
        f"--init_from={init_from}: no parameter of the {src_stage} checkpoint is shared "
        f"with the {stage} model")
  # keep the target's container types and dtypes
  merged_flat = flatten_named(merged)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target_params)
  params = jax.tree_util.tree_unflatten(
      treedef, [jax.numpy.asarray(merged_flat[path_name(p)], leaf.dtype) for p, leaf in leaves])
  report = InitReport(src_stage=src_stage, src_step=int(meta.get("step", -1)),
                      copied=tuple(rep["copied"]), new=tuple(rep["new"]),
                      dropped=tuple(rep["dropped"]))
  log(f"init_from {init_from} (stage {src_stage}, step {report.src_step}): {report.summary()}")
  was = meta.get("data") or {}
  if data is not None and was.get("cache_key") and data.get("cache_key") and (
      was["cache_key"] != data["cache_key"]):
    log(f"warning: the {src_stage} run in {init_from} was trained on other data "
        f"({was.get('source_description') or was.get('source')}) than this run "
        f"({data.get('source_description') or data.get('source')}); the D12 protocol hands "
        "off along one corpus")
  total = (meta.get("train_config") or {}).get("steps")
  if isinstance(total, int) and 0 <= report.src_step < total:
    log(f"warning: the {src_stage} run in {init_from} stopped at step {report.src_step} of "
        f"its {total}: this stage starts from an unfinished one (resume it there first for "
        "the D12 hand-off of a trained stage)")
  return params, report
