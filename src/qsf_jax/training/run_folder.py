"""The run folder: its lock while a run trains there, and the check that an
output folder can be written before any work starts."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile

from qsf_jax.training.errors import WorkdirInUseError


try:
  import fcntl
except ImportError:  # not on POSIX: no lock
  fcntl = None


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds an exclusive ``flock`` on the folder ``workdir`` while a run trains there.

  A second ``train`` (or ``progressive`` stage) on the same folder, e.g. one
  launched twice by mistake, is refused with ``WorkdirInUseError`` instead of
  both writing checkpoints and ``metrics.jsonl`` into it. The lock is on the
  folder itself, so nothing is written for it; it goes with the process (a
  killed run holds nothing). Where the file system has no ``flock`` (some
  network mounts), nothing is locked.
  """
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(workdir, os.O_RDONLY)
  try:
    if fcntl is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise WorkdirInUseError(
            f"{workdir} is in use by another training process (it holds the folder's lock); "
            "wait for it to end, or use another --workdir") from None
      except OSError:  # no flock here: train unlocked, as before
        pass
    yield
  finally:
    os.close(fd)  # releases the flock


def check_output_folder(name: str, path) -> None:
  """Raises ``ValueError`` before any work when ``path`` cannot be a folder to write in.

  ``path`` may not exist yet (it is made later); then its nearest existing
  ancestor must be a writable folder. Writability is tried, not only read from
  the permission bits (which pass everything for root, even on a read-only file
  system): an empty folder is made there and removed at once. Nothing else is
  created.

  Args:
    name: the argument or flag, for the message (e.g. "--workdir").
    path: the folder.
  """
  p = pathlib.Path(path)
  if not str(path):
    raise ValueError(f"{name} must name a folder, got an empty path")
  if p.exists() and not p.is_dir():
    raise ValueError(f"{name}={path} is a file, not a folder")
  ancestor = p.absolute()
  while not ancestor.exists():
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise ValueError(f"{name}={path}: {ancestor} is a file, not a folder")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise ValueError(f"{name}={path}: the folder {ancestor} is not writable")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".qsf-write-check-", dir=ancestor))
  except OSError as e:
    raise ValueError(f"{name}={path}: cannot write in the folder {ancestor} "
                     f"({e.strerror or e})") from e
