"""Checkpoints: an orbax ``CheckpointManager`` holding the state and JSON metadata.

Layout: ``workdir/checkpoints/<step>/{state, meta}``. ``state`` is the
``TrainState`` as a plain dict (``StandardSave``); ``meta`` is a JSON record of
the run (full configuration, stage, data source, tokenizer name and sha256,
seed, git sha). Orbax writes each checkpoint into
``<step>.orbax-checkpoint-tmp`` and renames it only once everything is on disk,
so a save that dies half-way leaves the previous checkpoint as the latest one.

The filters for orbax's log noise live in ``checkpoint_noise``, the resume
check (``IDENTITY_KEYS``, ``check_resumable``) in ``resume_identity``; their
public names are re-exported here.
"""

from __future__ import annotations

import logging
import numbers
import os
import pathlib
import re
import subprocess
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from qsf_jax.models import config as model_config
from qsf_jax.training import config as train_config
from qsf_jax.training import sharding as shd
from qsf_jax.training.checkpoint_noise import (_RESTORED_DIRS, _drop_abandoned_read_noise,
                                               _DropReadOnlyNotices)
from qsf_jax.training.checkpoint_noise import READ_ONLY_NOTICES  # noqa: F401 (re-exported)
from qsf_jax.training.errors import CheckpointSaveError, CorruptCheckpointError, NoCheckpointError
from qsf_jax.training.resume_identity import (  # noqa: F401 (re-exported)
    EXECUTION_KEYS, IDENTITY_KEYS, check_resumable, execution_differences, identity_differences)
from qsf_jax.training.state import TrainState, abstract_state

CHECKPOINT_SUBDIR = "checkpoints"
META_FORMAT = 1


def git_sha() -> str | None:
  """The commit of the source tree this package was imported from, if known."""
  here = pathlib.Path(__file__).resolve().parent
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                         text=True, timeout=5, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  sha = out.stdout.strip()
  return sha if out.returncode == 0 and sha else None


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / CHECKPOINT_SUBDIR


def has_checkpoint(workdir: str | os.PathLike) -> bool:
  """Whether ``workdir`` holds at least one finalized checkpoint."""
  d = checkpoint_dir(workdir)
  if not d.is_dir():
    return False
  return any(p.is_dir() and p.name.isdigit() for p in d.iterdir())


def missing_checkpoint_error(workdir: str | os.PathLike) -> NoCheckpointError:
  """The error for a folder without a checkpoint, naming any runs in its subfolders.

  A progressive run keeps one run per stage (``workdir/<stage>``), so pointing
  ``evaluate`` at its root is an easy mistake; the message lists those runs.
  """
  root = pathlib.Path(workdir)
  msg = f"no checkpoint found in {workdir} (expected {checkpoint_dir(workdir)}/<step>)"
  try:
    runs = sorted(p.name for p in root.iterdir() if p.is_dir() and has_checkpoint(p))
  except OSError:  # not a folder, or not readable: nothing to suggest
    runs = []
  if runs:
    msg += (f"; its subfolders {', '.join(runs)} are runs: pass one of them, e.g. "
            f"{root / runs[-1]}")
  return NoCheckpointError(msg)


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for ``TrainState`` + metadata.

  Args:
    workdir: the run folder; checkpoints live in ``workdir/checkpoints``.
    max_to_keep: how many recent checkpoints to keep (None keeps all).
    async_save: write in a background thread while training continues.
    read_only: open without creating or deleting anything (evaluate, sample).
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int | None = 3,
               async_save: bool = True, read_only: bool = False):
    self.workdir = pathlib.Path(workdir)
    self.directory = checkpoint_dir(workdir)
    if read_only and not self.directory.is_dir():
      raise NoCheckpointError(f"no checkpoints found in {self.workdir}")
    quiet, absl_logger = _DropReadOnlyNotices(), logging.getLogger("absl")
    if read_only:
      absl_logger.addFilter(quiet)
    try:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
          enable_async_checkpointing=async_save)
      self._mgr = ocp.CheckpointManager(self.directory.absolute(), options=options,
                                        item_names=("state", "meta"))
    finally:
      absl_logger.removeFilter(quiet)

  def latest_step(self) -> int | None:
    """The newest finalized checkpoint's step, or None."""
    self._mgr.reload()
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    self._mgr.reload()
    return list(self._mgr.all_steps())

  def _step_or_latest(self, step: int | None) -> int:
    if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral)):
      # int(4.7) would load step 4 without a word
      raise ValueError(f"step must be an int (or None for the latest), got {step!r}")
    if step is None:
      step = self.latest_step()
      if step is None:
        raise NoCheckpointError(f"no finalized checkpoint in {self.directory}")
      return int(step)
    steps = sorted(self.all_steps())
    if int(step) not in steps:
      kept = ", ".join(map(str, steps)) if steps else "none"
      raise NoCheckpointError(f"no checkpoint at step {step} in {self.directory}; "
                              f"the checkpoints kept are at steps: {kept}")
    return int(step)

  def _restore(self, step: int, **items):
    """``CheckpointManager.restore`` of ``items``; a damaged folder is a clear error.

    Orbax reports a missing item as ``KeyError``, a truncated JSON file as a
    decode error without the path, and a truncated array file as a bare
    ``Exception`` from TensorStore; each becomes ``CorruptCheckpointError``
    naming the folder and the first line of the cause. Nothing is moved or
    deleted. (Mismatched trees are refused earlier, by ``check_resumable``.)
    """
    _drop_abandoned_read_noise()  # a failed read's siblings report from other threads
    _RESTORED_DIRS.add(str(self.directory.absolute() / str(step)))
    try:
      return self._mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      if not (self.directory / str(step)).exists():
        # Gone, not damaged: a training run in this folder keeps only its newest
        # --max_to_keep checkpoints and deleted this one during the read.
        try:
          newer = [s for s in self.all_steps() if s > step]
        except Exception:  # pylint: disable=broad-except
          newer = []
        again = (f"run the command again to use step {newer[-1]}" if newer
                 else "run the command again")
        raise NoCheckpointError(
            f"checkpoint {self.directory / str(step)} was removed while it was read (a "
            f"training run in {self.workdir} keeps only its newest checkpoints); "
            f"{again}") from e
      others = [s for s in self.all_steps() if s != step]
      hint = (f"move it out of {self.directory} to use step {others[-1]}" if others
              else "start a new --workdir")
      detail = e.args[0] if isinstance(e, KeyError) and e.args else e
      detail = (str(detail).strip().splitlines() or [""])[0]
      # orbax follows a TensorStore read error with the repr of a bound method
      detail = detail.split(" See full TensorStore details")[0][:300]
      raise CorruptCheckpointError(
          f"checkpoint {self.directory / str(step)} cannot be read ({type(e).__name__}: "
          f"{detail}); it may be incomplete or damaged and was left untouched; {hint}"
      ) from e

  def meta(self, step: int | None = None) -> dict:
    """The JSON metadata stored with checkpoint ``step`` (default: the latest).

    A stored ``model_config`` comes back with the fields added to ``ModelConfig``
    since it was written, at the values that reproduce it
    (``models.config.complete_stored``); where such a value is not today's
    default it is also added to ``train_config["model_overrides"]``, so that
    the configuration rebuilt from the train config is the stored one.
    """
    step = self._step_or_latest(step)
    meta = dict(self._restore(step, meta=ocp.args.JsonRestore()).meta)
    if isinstance(meta.get("model_config"), Mapping):
      legacy = model_config.legacy_overrides(meta["model_config"])
      meta["model_config"] = model_config.complete_stored(meta["model_config"])
      if legacy and isinstance(meta.get("train_config"), Mapping):
        tc = dict(meta["train_config"])
        tc["model_overrides"] = {**legacy, **dict(tc.get("model_overrides") or {})}
        meta["train_config"] = tc
    if isinstance(meta.get("train_config"), Mapping):  # TrainConfig fields added since
      meta["train_config"] = {**train_config.ADDED_FIELDS, **meta["train_config"]}
      for name, value in train_config.ADDED_FIELDS.items():
        meta.setdefault(name, meta["train_config"][name])
    return meta

  def save(self, step: int, state: TrainState, meta: Mapping[str, Any], *,
           wait: bool = False) -> None:
    """Saves ``state`` and ``meta`` as checkpoint ``step`` (replacing nothing).

    Args:
      step: the checkpoint's step (normally ``state.step``).
      state: the training state.
      meta: JSON-serialisable metadata; ``format`` and ``step`` are added.
      wait: block until the checkpoint is finalized.
    """
    meta = {**meta, "format": META_FORMAT, "step": int(step)}
    _drop_abandoned_read_noise()  # a failed write's sibling writes report as reads do
    try:  # an earlier asynchronous save's failure is raised here too
      self._mgr.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state.as_dict()), meta=ocp.args.JsonSave(meta)),
          force=True)
      if wait:
        self._mgr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e

  def _save_error(self, e: Exception) -> CheckpointSaveError:
    """``CheckpointSaveError`` for a failed save: the cause in a few words, and the
    checkpoint a rerun resumes from (orbax finalizes only complete ones)."""
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    code = re.search(r"os_error_code='(\d+)'", msg)  # TensorStore's errno
    if code:
      cause = os.strerror(int(code.group(1)))
    elif isinstance(e, OSError) and e.strerror:
      cause = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
      cause = f"{type(e).__name__}: {msg.split(' See full TensorStore details')[0][:300]}"
    try:
      kept = self.latest_step()
    except Exception:  # pylint: disable=broad-except
      kept = None
    if kept is not None:
      then = (f"the last complete checkpoint, step {kept}, is kept: fix that and run the "
              "same command again to resume from it")
    else:
      then = "no complete checkpoint was kept: fix that and run the same command again"
    return CheckpointSaveError(
        f"a checkpoint could not be written in {self.directory} ({cause}); {then}")

  def restore(self, template: TrainState, step: int | None = None) -> TrainState:
    """Restores checkpoint ``step`` (default: latest) into ``template``'s structure.

    Args:
      template: a state with the expected structure, shapes, dtypes and
        shardings (e.g. a freshly initialised one); its values are not used.
      step: which checkpoint; default the latest.
    """
    step = self._step_or_latest(step)
    restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state(template)))
    return TrainState.from_dict(restored.state)

  def restore_params(self, step: int | None = None, sharding=None) -> tuple[Any, dict]:
    """Restores (params, collections) without a model template, replicated.

    Used for evaluation, sampling and the progressive hand-off, which need no
    optimizer state and may build a different model than the stored one. The
    target is built from the stored shapes and dtypes, placed with
    ``sharding``, so a run loads on any number of devices: as stored, the
    arrays would keep the training run's devices (on fewer devices orbax
    refuses the topology; on more, they would sit on the old devices only).

    Args:
      step: which checkpoint; default the latest.
      sharding: where to place every array (default: replicated over all
        devices, ``sharding.replicated(sharding.make_mesh())``).
    """
    step = self._step_or_latest(step)
    if sharding is None:
      sharding = shd.replicated(shd.make_mesh())
    target = None
    try:
      stored = ocp.StandardCheckpointHandler().metadata(
          self.directory.absolute() / str(step) / "state")
    except Exception:  # pylint: disable=broad-except
      pass  # an unreadable item: the restore below names the damage
    else:
      target = jax.tree.map(
          lambda m: (jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)
                     if hasattr(m, "shape") and hasattr(m, "dtype") else m),
          getattr(stored, "tree", stored))
    restored = self._restore(step, state=ocp.args.StandardRestore(target))
    state = restored.state
    return state["params"], state.get("collections", {})

  def wait(self) -> None:
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mgr.close()


def is_primary() -> bool:
  return jax.process_index() == 0
