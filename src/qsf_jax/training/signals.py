"""Graceful stop on SIGINT/SIGTERM: finish the current step, checkpoint, exit."""

from __future__ import annotations

import signal
import threading


class StopRequested:
  """Context manager that turns SIGINT/SIGTERM into a flag the loop polls.

  While active, the first signal sets ``requested`` (and records which signal);
  the training loop then saves a checkpoint and returns normally. A second
  signal of the same kind falls through to the previous handler (so a second
  Ctrl-C still interrupts at once). Outside the main thread the manager does
  nothing, since Python only delivers signals there.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.requested = False
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  def _handler(self, signum, frame):
    if self.requested:
      prev = self._previous.get(signum)
      if callable(prev):
        prev(signum, frame)
      elif prev == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
      return
    self.requested = True
    self.signum = signum

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else ""

  def __enter__(self) -> "StopRequested":
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, prev in self._previous.items():
      signal.signal(s, prev)
    self._previous.clear()
