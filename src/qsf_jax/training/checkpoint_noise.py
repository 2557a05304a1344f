"""The log noise of orbax that the checkpoints filter out.

Orbax's read-only notices (every read-only open: evaluate, sample, analyze,
``load_run``, the resume check), and what a failed restore or save leaves
behind: unraisable exceptions of abandoned coroutines and asyncio's
"exception was never retrieved" for their futures. ``checkpoint.Checkpointer``
installs these filters; everything else passes through.
"""

from __future__ import annotations

import logging
import sys


# Orbax's warnings that a checkpoint folder was opened read-only, which is what
# evaluate, sample, analyze, ``load_run`` and the resume check ask for.
READ_ONLY_NOTICES = ("read_only=True", "directory is read only")


_ABANDONED_READ = "_read_array_index_and_device_put"  # orbax's per-array restore coroutine
_ABANDONED_WRITE = "write_fragment"  # orbax's per-array save coroutine (a failed save)


def _is_abandoned_read_noise(args) -> bool:
  """Whether an unraisable exception is what a failed orbax restore leaves behind.

  When one array of a restore cannot be read, orbax's event loop closes while the
  other arrays' TensorStore reads are still running: each then fails to call back
  into the closed loop ("Event loop is closed", reported with no object), and its
  coroutine, never awaited, reports the read error again when it is collected.
  """
  if args.exc_type is RuntimeError and args.object is None:
    return str(args.exc_value) == "Event loop is closed"
  code = getattr(args.object, "cr_code", None)
  return code is not None and code.co_name in (_ABANDONED_READ, _ABANDONED_WRITE)


def _drop_abandoned_read_noise() -> None:
  """Installs (once) an unraisable hook that drops ``_is_abandoned_read_noise`` and
  passes every other unraisable exception to the hook it replaces.

  Installed before the first restore (the leftovers can report while the failed
  restore is still unwinding): without it a damaged checkpoint printed tens to a
  thousand lines of tracebacks around the one-line error, at random moments,
  from TensorStore's threads and at interpreter exit.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_qsf_drops_abandoned_reads", False):
    return

  def hook(args):
    if not _is_abandoned_read_noise(args):
      previous(args)

  hook._qsf_drops_abandoned_reads = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_DropAbandonedFutures())


# Checkpoint folders this process has restored from (for _DropAbandonedFutures).
_RESTORED_DIRS: set[str] = set()


class _DropAbandonedFutures(logging.Filter):
  """Drops asyncio's "exception was never retrieved" about a checkpoint folder this
  process restored from: the read errors of a failed restore's other arrays,
  reported again when their futures are collected (``CorruptCheckpointError``
  has already said the folder cannot be read)."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not ("exception was never retrieved" in msg
                and any(d in msg for d in _RESTORED_DIRS))


class _DropReadOnlyNotices(logging.Filter):
  """Drops orbax's read-only notices from the ``absl`` logger (nothing else)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(n in record.getMessage() for n in READ_ONLY_NOTICES)
