"""The builders of token-cache entries: who builds, and the cleanup after killed ones.

A build works in a temporary directory ``<cache_dir>/.<entry>.tmp-<hex>/`` whose
``builder.json`` names its host and process id; the builder holds an exclusive
``flock`` on that file while it works. ``remove_abandoned_builds`` removes the
temporary directories of builders on this host that no longer run (killed
before they could clean up, e.g. by SIGKILL or an out-of-memory kill), and
damaged entries moved aside (``_move_aside``). Used by ``cache``, which
re-exports ``remove_abandoned_builds``.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import socket

from absl import logging

try:
  import fcntl
except ImportError:  # not on POSIX: builds are told apart by process id only
  fcntl = None


def _move_aside(entry: pathlib.Path, why: str) -> None:
  """Removes a damaged entry (renamed first, so no reader sees it half-deleted)."""
  logging.warning("token cache entry %s is damaged (%s); rebuilding it", entry, why)
  aside = entry.with_name(f".{entry.name}.damaged-{os.getpid()}")
  try:
    os.rename(entry, aside)
  except FileNotFoundError:  # another run moved it first
    return
  shutil.rmtree(aside, ignore_errors=True)


_BUILDER_FILE = "builder.json"


def _process_exists(pid: int) -> bool:
  """Whether a process with this id runs on this host (one owned by another user counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  except (OverflowError, ValueError):
    return False
  return True


def _lock_is_free(path: pathlib.Path) -> bool:
  """Whether no process holds a ``flock`` on ``path`` (True where flock is unavailable)."""
  if fcntl is None:
    return True
  try:
    with open(path, "rb") as f:
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        return False
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)
      return True
  except OSError:
    return False


def remove_abandoned_builds(root: pathlib.Path) -> list[pathlib.Path]:
  """Removes the temporary build directories left by killed builders; returns them.

  Only directories whose ``builder.json`` names this host, a process id that is
  not running (as this process sees them) and no ``flock`` holder are removed:
  builds running here, in another process namespace or on another host sharing
  the folder, and directories without a readable builder file, are left alone.
  """
  removed = []
  host = socket.gethostname()
  for tmp in itertools.chain(root.glob(".*.tmp-*"), root.glob(".*.damaged-*")):
    if ".damaged-" in tmp.name:  # a damaged entry moved aside (nobody reads it)
      shutil.rmtree(tmp, ignore_errors=True)
      removed.append(tmp)
      continue
    try:
      builder = json.loads((tmp / _BUILDER_FILE).read_text())
      pid = int(builder["pid"])
      ours = builder["host"] == host
    except (OSError, ValueError, KeyError, TypeError):
      continue
    if ours and not _process_exists(pid) and _lock_is_free(tmp / _BUILDER_FILE):
      shutil.rmtree(tmp, ignore_errors=True)
      removed.append(tmp)
  return removed
