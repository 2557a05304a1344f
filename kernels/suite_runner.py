"""Runs a sequence of commands as steps, each in its own process, within a budget.

The engine of ``gpu_suite``: a ``Step`` is ``python <argv>``; ``run_suite`` runs
steps in order, copies their output to the console and to ``suite.log``, stops a
step at its cap or at the end of the budget (SIGTERM to its process group, then
SIGKILL), skips a step whose prerequisites failed or for which too little budget
is left, and rewrites ``summary.json`` after each step. ``report`` renders a
finished run's folder as markdown.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import NamedTuple

MIN_STEP_S = 30.0  # a step is not started with less than this left of the budget


class Step(NamedTuple):
  """One step: ``python <argv>`` with ``{out}`` replaced by the output folder.

  name: the step's name (``--steps`` picks by it).
  argv: the arguments after the Python executable.
  max_s: the step's cap in seconds when the suite runs on a budget.
  needs: steps that must have passed when they ran in the same suite.
  """
  name: str
  argv: tuple[str, ...]
  max_s: float
  needs: tuple[str, ...] = ()


def step_command(step: Step, out_dir: str) -> list[str]:
  """The command line of ``step``, with its outputs under ``out_dir``."""
  return [sys.executable] + [a.replace("{out}", out_dir) for a in step.argv]


def display_command(step: Step, out_dir: str) -> str:
  """``step_command`` as one line; an inline script (``-c``) is named, not printed."""
  cmd = step_command(step, out_dir)
  if cmd[1] == "-c":
    cmd = cmd[:2] + [f"<{step.name} script, {len(cmd[2].splitlines())} lines>"]
  return " ".join(cmd)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _commit() -> str | None:
  """The git commit of this checkout, if it is one (None otherwise)."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    res = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  if res.returncode != 0:
    return None
  return res.stdout.strip() or None


def _stop(proc: subprocess.Popen) -> None:
  """Stops a step's process group: SIGTERM, then SIGKILL after 10 s (and to stragglers)."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      break
    if sig == signal.SIGTERM:
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        pass
  proc.wait()


def _run_one(cmd: list[str], limit: float | None, log) -> tuple[int | None, bool]:
  """Runs ``cmd``, copying its output to stdout and ``log``; returns (rc, timed_out)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          start_new_session=True, text=True, errors="replace")

  def copy():
    for line in proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      log.write(line)
      log.flush()

  reader = threading.Thread(target=copy, daemon=True)
  reader.start()
  timed_out = False
  try:
    proc.wait(timeout=limit)
  except subprocess.TimeoutExpired:
    timed_out = True
    _stop(proc)
  except BaseException:  # interrupted (Ctrl-C, or SIGTERM through ``main``): no orphans
    _stop(proc)
    raise
  reader.join(timeout=10)
  return proc.returncode, timed_out


def _written(paths, since: float) -> list[str]:
  """The ``paths`` that exist and were written at or after ``since`` (a time.time()),
  so that a file left by an earlier run into the same folder is not listed."""
  return sorted(p for p in paths if os.path.exists(p) and os.path.getmtime(p) >= since - 1.0)


def run_suite(out_dir: str, steps, budget_s: float | None = None) -> dict:
  """Runs ``steps`` in order; returns (and writes to ``out_dir``) the summary.

  A second run into the same folder appends to its suite.log and rewrites its
  summary.json and the JSON of the steps it runs.

  Args:
    out_dir: folder for suite.log, summary.json and the steps' JSON (created).
    steps: the ``Step``s to run, in order.
    budget_s: wall-clock seconds for the whole suite, or None for no limit
      (then no step is cut off).

  Returns:
    the summary: dict with started, finished, budget_s, commit and steps, a list
    of dicts (name, command, status in passed / failed / timed_out / skipped,
    rc, wall_s, limit_s, reason, outputs). An interrupted suite (Ctrl-C, or
    SIGTERM under ``main``) stops the running step, records it as
    "interrupted" in summary.json and re-raises ``KeyboardInterrupt``.
  """
  if budget_s is not None and not budget_s > 0:
    raise ValueError(f"budget_s must be > 0 or None, got {budget_s}")
  names = [s.name for s in steps]
  if len(set(names)) != len(names):
    raise ValueError(f"step names must be unique, got {names}")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"--out {out_dir!r} exists and is not a folder")
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.monotonic()
  summary = dict(started=_now(), finished=None, budget_s=budget_s, commit=_commit(), steps=[])
  status = {}

  def save():
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)

  with open(os.path.join(out_dir, "suite.log"), "a", encoding="utf-8") as log:
    for step in steps:
      cmd = step_command(step, out_dir)
      rec = dict(name=step.name, command=cmd, status="skipped", rc=None, wall_s=0.0,
                 limit_s=None, reason=None, outputs=[])
      left = None if budget_s is None else budget_s - (time.monotonic() - t0)
      unmet = [n for n in step.needs if status.get(n, "passed") != "passed"]
      if unmet:
        rec["reason"] = f"needs {', '.join(unmet)} to pass ({', '.join(status[n] for n in unmet)})"
      elif left is not None and left < MIN_STEP_S:
        rec["reason"] = f"budget: {max(left, 0.0):.0f} s left, a step needs {MIN_STEP_S:.0f} s"
      else:
        limit = None if left is None else min(step.max_s, left)
        rec["limit_s"] = limit
        head = f"=== {step.name} ({_now()}, limit {'none' if limit is None else f'{limit:.0f} s'})"
        for stream in (sys.stdout, log):
          stream.write(f"{head}: {display_command(step, out_dir)}\n")
          stream.flush()
        start, start_wall = time.monotonic(), time.time()
        try:
          rc, timed_out = _run_one(cmd, limit, log)
        except KeyboardInterrupt:
          rec.update(status="interrupted", wall_s=round(time.monotonic() - start, 1))
          summary["steps"].append(rec)
          save()
          raise
        rec.update(rc=rc, wall_s=round(time.monotonic() - start, 1),
                   status="timed_out" if timed_out else ("passed" if rc == 0 else "failed"))
        rec["outputs"] = _written([a.split("=", 1)[1] for a in cmd if a.startswith("--out=")],
                                  since=start_wall)
      if rec["status"] == "skipped":
        line = f"=== {step.name}: skipped, {rec['reason']}\n"
      else:
        line = f"=== {step.name}: {rec['status']} (rc {rec['rc']}) in {rec['wall_s']:.1f} s\n"
      for stream in (sys.stdout, log):
        stream.write(line)
        stream.flush()
      status[step.name] = rec["status"]
      summary["steps"].append(rec)
      save()
  summary["finished"] = _now()
  save()
  return summary


def markdown(summary: dict) -> str:
  """The summary as a markdown table."""
  lines = [f"GPU suite, started {summary['started']}, commit {summary['commit'] or '?'}, "
           f"budget {summary['budget_s'] or 'none'}", "",
           "| step | status | wall (s) | limit (s) | note |", "|---|---|---|---|---|"]
  for r in summary["steps"]:
    limit = "–" if r["limit_s"] is None else f"{r['limit_s']:.0f}"
    note = r["reason"] or ", ".join(os.path.basename(p) for p in r["outputs"]) or ""
    lines.append(f"| {r['name']} | {r['status']} | {r['wall_s']:.1f} | {limit} | {note} |")
  return "\n".join(lines)


def report(out_dir: str) -> str:
  """Markdown of a finished (or cut-short) suite: the step table, then each
  benchmark step's tables and goal verdicts, read back from ``out_dir``.

  The folder may have moved since the run: outputs are looked up by file name.

  Raises:
    ValueError: if ``out_dir`` holds no readable summary.json or a listed output
      is missing or unreadable.
  """
  from .report import results_markdown  # pylint: disable=import-outside-toplevel (imports jax)

  def load(path):
    try:
      with open(path, encoding="utf-8") as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from None

  summary = load(os.path.join(out_dir, "summary.json"))
  if not isinstance(summary, dict) or not isinstance(summary.get("steps"), list):
    raise ValueError(f"{os.path.join(out_dir, 'summary.json')} is not a gpu_suite summary")
  parts = [markdown(summary)]
  for rec in summary["steps"]:
    for path in rec["outputs"]:
      data = load(os.path.join(out_dir, os.path.basename(path)))
      try:
        parts.append(f"### {rec['name']}\n\n{results_markdown(data)}")
      except ValueError as e:
        raise ValueError(f"{os.path.basename(path)}: {e}") from None
  return "\n\n".join(parts)


def select(steps, names: str | None):
  """The steps named in the comma-separated ``names`` (all if None), in plan order."""
  if names is None:
    return tuple(steps)
  wanted = [n.strip() for n in names.split(",") if n.strip()]
  known = [s.name for s in steps]
  unknown = [n for n in wanted if n not in known]
  if unknown or not wanted:
    raise ValueError(f"--steps must name steps from {known}, got {names!r}")
  return tuple(s for s in steps if s.name in wanted)
