"""The kernels' GPU checks and benchmarks, in order, within a time budget.

Run as ``python -m qsf_jax.kernels.gpu_suite --out=DIR [--budget_s=540]
[--steps=NAME,...] [--list]`` on a machine with a GPU. Where jax with CUDA is
already installed and nothing can be fetched, install this checkout first with
``pip install --no-deps --no-build-isolation -e .``.

Each step is one run of ``gpu_check`` or ``bench`` (or the environment report)
in its own process, so a step that crashes or hangs cannot take the others down,
and each starts with the whole GPU memory (the suite's own process starts no jax
backend). The steps run in ``PLAN``'s order, which puts first what the kernels
are judged on:

  env            versions of Python, jax, the CUDA plugin and Triton; the GPU
  check          ``gpu_check --quick``: the default kernels at production shapes
  goals          ``bench --goals --measure_ceilings``: the four performance goals
  check_designs  ``gpu_check`` of the chunked and split designs
  designs        the designs side by side at T=4096 (pipelined timing)
  no_decay       the same without decay (the QSF measurement term), with cuDNN
  cupti          device time per kernel at T=4096 D=128
  programs       FLA's shape B=4 H=64: bound by programs or by the chunk loop?

A timing step needs ``check`` to have passed when ``check`` ran in the same
suite (timing kernels that give wrong answers says nothing). With
``--budget_s``, each step runs for at most its own cap (``Step.max_s``) and
never past the budget; a step is skipped when less than ``MIN_STEP_S`` is left.
A step cut off by its limit is stopped (SIGTERM, then SIGKILL); ``bench``
rewrites its JSON after each (T, D), so the rows it measured are kept.

Everything a step prints goes to the console and to ``DIR/suite.log``;
``DIR/summary.json`` (rewritten after each step) says what ran, for how long
and how it ended; the benchmark steps write ``DIR/<step>.json``. Exits with
status 1 if a step failed or was cut off, 0 otherwise (a step skipped for lack
of budget is not a failure; the summary names it). Ctrl-C or SIGTERM stops the
running step and its processes, records it as "interrupted" and exits with 130.
"""

from __future__ import annotations

import argparse
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

# The designs compared at T=4096 (WORKSPACE.md, "Next steps"): the default
# (c64_bv64_w4_s2), its split backward and 3-stage variant, the chunked
# backward and forward designs, and their C=128 forms.
DESIGNS = ("c64_bv64_w4_s2,c64_bv64_w4_s2_split,c64_bv64_w4_s3,c64_bv64_w8_s3_chunkbwd,"
           "c64_bv64_w8_s3_chunkbwd_split,c64_bv128_w8_s3_chunkbwd,c128_bv64_w8_s2_chunkbwd,"
           "c64_bv64_w4_s3_chunkfwd,c128_bv64_w8_s2_chunkfwd")
CHECKED_DESIGNS = ("c64_bv64_w8_s3_chunkbwd,c64_bv128_w8_s3_chunkbwd,c64_bv64_w4_s3_chunkfwd,"
                   "c64_bv64_w4_s2_split,c64_bv64_w8_s3_chunkbwd_split")

ENV_SCRIPT = """\
import importlib.metadata as md, platform, shutil, subprocess
print("python", platform.python_version())
for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "triton"):
  try:
    print(name, md.version(name))
  except md.PackageNotFoundError:
    pass
if shutil.which("nvidia-smi"):
  print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
import jax
print("backend", jax.default_backend(), [d.device_kind for d in jax.devices()])
"""


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


def _tool(module: str, *args: str) -> tuple[str, ...]:
  return ("-m", f"qsf_jax.kernels.{module}", *args)


_W = "--compile_workers=8"
PLAN = (
    Step("env", ("-c", ENV_SCRIPT), 60),
    Step("check", _tool("gpu_check", "--quick", _W), 150),
    Step("goals", _tool("bench", "--goals", "--measure_ceilings", _W,
                        "--out={out}/goals.json"), 300, ("check",)),
    Step("check_designs", _tool("gpu_check", "--quick", "--backward=chunked", _W,
                                f"--configs={CHECKED_DESIGNS}"), 150),
    Step("designs", _tool("bench", "--impls=pallas", "--T=4096", "--D=64,128",
                          f"--configs={DESIGNS}", "--timing=pipelined", _W,
                          "--out={out}/designs.json"), 240, ("check",)),
    Step("no_decay", _tool("bench", "--decay=none", "--impls=pallas,softmax", "--T=4096",
                           "--D=128", f"--configs={DESIGNS}", "--timing=pipelined", _W,
                           "--out={out}/no_decay.json"), 180, ("check",)),
    Step("cupti", _tool("bench", "--timing=cupti", "--impls=pallas,xla,softmax", "--T=4096",
                        "--D=128", _W, "--out={out}/cupti.json"), 150, ("check",)),
    Step("programs", _tool("bench", "--B=4", "--H=64", "--T=4096", "--D=128", "--modes=fwd",
                           "--impls=pallas", _W, "--out={out}/programs.json"), 120, ("check",)),
)


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


def run_suite(out_dir: str, steps=PLAN, budget_s: float | None = None) -> dict:
  """Runs ``steps`` in order; returns (and writes to ``out_dir``) the summary.

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
        start = time.monotonic()
        try:
          rc, timed_out = _run_one(cmd, limit, log)
        except KeyboardInterrupt:
          rec.update(status="interrupted", wall_s=round(time.monotonic() - start, 1))
          summary["steps"].append(rec)
          save()
          raise
        rec.update(rc=rc, wall_s=round(time.monotonic() - start, 1),
                   status="timed_out" if timed_out else ("passed" if rc == 0 else "failed"))
        rec["outputs"] = sorted(a.split("=", 1)[1] for a in cmd
                                if a.startswith("--out=") and os.path.exists(a.split("=", 1)[1]))
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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="output folder (created)")
  p.add_argument("--budget_s", type=float, default=None,
                 help="wall-clock seconds for the whole suite (default: no limit)")
  p.add_argument("--steps", default=None,
                 help=f"comma-separated steps to run (default all: {','.join(s.name for s in PLAN)})")
  p.add_argument("--list", action="store_true", help="print the plan and run nothing")
  a = p.parse_args(argv)
  try:
    steps = select(PLAN, a.steps)
  except ValueError as e:
    p.error(str(e))
  if a.budget_s is not None and not a.budget_s > 0:
    p.error(f"--budget_s must be > 0, got {a.budget_s}")
  if a.list:
    for s in steps:
      needs = f" (needs {', '.join(s.needs)})" if s.needs else ""
      print(f"{s.name}: cap {s.max_s:.0f} s{needs}\n  {display_command(s, a.out or 'OUT')}")
    return 0
  if a.out is None:
    p.error("--out is required (a folder for the log, the summary and the JSON)")
  def interrupt(signum, frame):  # SIGTERM stops the running step as Ctrl-C does
    raise KeyboardInterrupt(f"signal {signum}")

  signal.signal(signal.SIGTERM, interrupt)
  try:
    summary = run_suite(a.out, steps, a.budget_s)
  except ValueError as e:
    p.error(str(e))
  except KeyboardInterrupt:
    print(f"interrupted; the steps so far are in {os.path.join(a.out, 'summary.json')}")
    return 130
  print("\n" + markdown(summary))
  bad = [r["name"] for r in summary["steps"] if r["status"] in ("failed", "timed_out")]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
