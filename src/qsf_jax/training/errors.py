"""Exceptions raised by the training library.

Each derives from a standard exception, so callers may catch either the
dedicated class or the standard one. The entry points in ``experiments/``
print these as one line and exit with a non-zero status.
"""

from __future__ import annotations


class TrainConfigError(ValueError):
  """Inconsistent or out-of-range training settings (flags)."""


class CheckpointMismatchError(ValueError):
  """The work directory holds a checkpoint of a different run configuration.

  Attributes:
    workdir: the run folder.
    differences: ``{key: (stored value, requested value)}``.
  """

  def __init__(self, workdir: str, differences: dict):
    self.workdir, self.differences = str(workdir), dict(differences)
    diffs = "; ".join(f"{k}: stored {a!r}, requested {b!r}"
                      for k, (a, b) in sorted(self.differences.items()))
    hint = ""
    if "steps" in self.differences:  # the schedule's length is part of the run
      hint = (f". To train on from its weights with a new schedule, use a new --workdir "
              f"with --init_from={self.workdir}")
    super().__init__(
        f"{self.workdir} holds a checkpoint of a different run ({diffs}); it was left "
        f"untouched. Use a new --workdir, or the stored settings to resume{hint}")


class DataChangedError(ValueError):
  """A run's own data no longer match the ones it was trained on (evaluate, analyze)."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (a full disk, a file-size limit, its folder gone)."""


class RunFolderGoneError(OSError):
  """The run folder was moved, removed or replaced while a run trained in it."""


class WorkdirInUseError(ValueError):
  """Another training process holds the run folder (``train``, ``progressive``)."""


class NoCheckpointError(FileNotFoundError):
  """A checkpoint was required (evaluate, sample, init_from) but none was found."""


class CorruptCheckpointError(ValueError):
  """A checkpoint folder exists but cannot be read (incomplete or damaged)."""


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite.

  Attributes:
    step: the optimizer step whose loss was not finite (0-based; the message
      counts from 1, as the progress lines and metrics.jsonl do).
    loss: the offending value.
    last_checkpoint: the step of the last good checkpoint, or None.
  """

  def __init__(self, step: int, loss: float, last_checkpoint: int | None,
               what: str = "training loss"):
    self.step, self.loss, self.last_checkpoint = int(step), float(loss), last_checkpoint
    kept = (f"the last good checkpoint (step {last_checkpoint}) is kept"
            if last_checkpoint is not None else "no checkpoint had been written yet")
    super().__init__(
        f"non-finite {what} ({loss}) at step {self.step + 1}; training stopped and {kept}")
