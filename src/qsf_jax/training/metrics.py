"""Metric sinks: a JSONL log, TensorBoard scalars and a one-line progress report."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

from qsf_jax.training.tensorboard import SummaryWriter


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


class MetricWriter:
  """Writes metrics to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``).

  Only process 0 of a multi-host run writes; other processes get a writer that
  does nothing.

  Args:
    workdir: the run folder.
    enabled: False on non-primary processes.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(os.fspath(workdir), "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tb"))

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
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    self._tb.scalars(step, {f"{kind}/{k}": v for k, v in values.items() if math.isfinite(v)})
    self._tb.flush()

  def write_text(self, step: int, text: str, *, kind: str = "sample") -> None:
    """Appends a text record (e.g. a generated sample) to the JSONL log."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), "kind": kind, "time": time.time(),
                                  "text": text}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
