"""Metric sinks: a JSONL log, TensorBoard scalars and a one-line progress report."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
from typing import Mapping

from qsf_jax.training.tensorboard import SummaryWriter

_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # errors that freeing space mends


def format_duration(seconds: float) -> str:
  """Formats seconds as ``1h02m``, ``3m05s`` or ``12s``."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f"{h}h{m:02d}m"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


def format_tokens_per_s(x: float) -> str:
  if x >= 1e6:
    return f"{x / 1e6:.2f}M"
  if x >= 1e3:
    return f"{x / 1e3:.1f}k"
  return f"{x:.0f}"


class ProgressMeter:
  """Tokens per second and ETA over the steps run in this process.

  Args:
    total_steps: the run's last step.
    tokens_per_step: tokens consumed by one optimizer step.
    start_step: the step this process started (or resumed) from.
  """

  def __init__(self, total_steps: int, tokens_per_step: int, start_step: int):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self._t_step, self._t_time = start_step, None

  def mark(self, step: int) -> None:
    """Starts the clock at ``step`` (call once the first step has compiled)."""
    self._t_step, self._t_time = step, time.perf_counter()

  def rates(self, step: int) -> tuple[float, float]:
    """Returns (tokens/s, seconds remaining) measured since the last ``mark``."""
    if self._t_time is None or step <= self._t_step:
      return float("nan"), float("nan")
    dt = time.perf_counter() - self._t_time
    steps_per_s = (step - self._t_step) / max(dt, 1e-9)
    return steps_per_s * self.tokens_per_step, (self.total_steps - step) / steps_per_s

  def line(self, step: int, loss: float, lr: float) -> str:
    """The progress line: ``step 120/2000 | loss 3.41 | lr 4.0e-04 | 41.2k tok/s | eta 3m05s``."""
    tps, eta = self.rates(step)
    tps_s = "? tok/s" if not math.isfinite(tps) else f"{format_tokens_per_s(tps)} tok/s"
    return (f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tps_s} | eta {format_duration(eta)}")


def read_records(path: str | os.PathLike) -> list[dict]:
  """The JSON records of a ``metrics.jsonl`` file that carry a ``step`` (none if absent)."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return []
  out = []
  for line in lines:
    rec = _parse(line)
    if rec is not None:
      out.append(rec)
  return out


def _parse(line: str) -> dict | None:
  try:
    rec = json.loads(line)
  except ValueError:
    return None
  return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def drop_records_after(path: str | os.PathLike, step: int) -> int:
  """Removes the records past ``step`` from a ``metrics.jsonl`` file; returns how many.

  Lines that are not records are kept, apart from a torn last line (a write cut
  off by a kill). The file is replaced atomically, and left untouched when
  nothing is removed and it ends with a newline.
  """
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    return 0
  lines = text.splitlines()
  torn = bool(lines) and not text.endswith("\n") and _parse(lines[-1]) is None
  keep, dropped = [], 0
  for i, line in enumerate(lines):
    rec = _parse(line)
    if (rec is not None and rec["step"] > step) or (torn and i == len(lines) - 1):
      dropped += 1
    else:
      keep.append(line)
  if dropped or (text and not text.endswith("\n")):  # a later append starts a new line
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
      with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(x + "\n" for x in keep))
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return dropped


class MetricWriter:
  """Writes metrics to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``).

  Only process 0 of a multi-host run writes; other processes get a writer that
  does nothing.

  A run resumed from checkpoint step N repeats the steps after N, so the writer
  first drops the records of ``metrics.jsonl`` past step N (those a killed run
  wrote after its last checkpoint; the resumed run writes them again, with the
  same values) and marks step N + 1 as a restart in TensorBoard, which then drops
  its earlier records from N + 1 on. ``metrics.jsonl`` is rewritten through a
  temporary file and an atomic rename; a line that is not a JSON record is kept,
  except a torn last line.

  Args:
    workdir: the run folder.
    enabled: False on non-primary processes.
    resumed_from: the checkpoint step a resumed run restarts from, or None.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               resumed_from: int | None = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(os.fspath(workdir), "metrics.jsonl")
      if resumed_from is not None:
        drop_records_after(path, resumed_from)
      self._jsonl = open(path, "a")
      self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tb"))
      if resumed_from is not None:
        self._tb.session_start(resumed_from + 1)
        self._tb.flush()

  def write(self, step: int, metrics: Mapping[str, float], *, kind: str = "train") -> None:
    """Appends one record ``{"step", "kind", "time", **metrics}`` to both sinks.

    Non-finite values are ``null`` in the JSONL file and left out of TensorBoard.
    """
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    # strict JSON has no NaN/Infinity: non-finite values are written as null
    rec = {"step": int(step), "kind": kind, "time": time.time(),
           **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    with self._named(self._jsonl.name):
      self._jsonl.write(json.dumps(rec) + "\n")
      self._jsonl.flush()
    with self._named(self._tb.path):
      self._tb.scalars(step, {f"{kind}/{k}": v for k, v in values.items() if math.isfinite(v)})
      self._tb.flush()

  @staticmethod
  @contextlib.contextmanager
  def _named(path):
    """A failed write (a full disk, a file-size limit) as one error naming the file."""
    try:
      yield
    except OSError as e:
      fix = "free space and " if e.errno in _FULL_DISK else "fix that and "
      raise OSError(e.errno, f"cannot write {path} ({e.strerror or e}); training stopped; "
                    f"{fix}run the same command again to resume from the last "
                    "checkpoint") from e

  def write_text(self, step: int, text: str, *, kind: str = "sample") -> None:
    """Appends a text record (e.g. a generated sample) to the JSONL log."""
    if not self.enabled:
      return
    with self._named(self._jsonl.name):
      self._jsonl.write(json.dumps({"step": int(step), "kind": kind, "time": time.time(),
                                    "text": text}) + "\n")
      self._jsonl.flush()

  def close(self) -> None:
    """Closes both files. Every record was flushed when written, so a close that fails
    can only retry a write whose failure ``write`` has raised already: it is ignored."""
    if self.enabled:
      for f in (self._jsonl, self._tb):
        try:
          f.close()
        except OSError:
          pass
