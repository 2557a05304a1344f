"""The kernels' GPU checks and benchmarks, in order, within a time budget.

Run as ``python -m qsf_jax.kernels.gpu_suite --out=DIR [--budget_s=540]
[--steps=NAME,...] [--list]`` on a machine with a GPU; ``--report=DIR`` prints
the tables of a finished run's folder again (anywhere, no GPU needed). Where jax with CUDA is
already installed and nothing can be fetched, install this checkout first with
``pip install --no-deps --no-build-isolation -e .``.

Each step is one run of ``gpu_check`` or ``bench`` (or the environment report)
in its own process, so a step that crashes or hangs cannot take the others down,
and each starts with the whole GPU memory (the suite's own process starts no jax
backend). The steps run in ``PLAN``'s order, which puts first what the kernels
are judged on:

  env            versions of Python, jax, the CUDA plugin and Triton; the GPU
  check          ``gpu_check --quick``: the default kernels at production shapes
  goals          ``bench --goals --timing=cupti --measure_ceilings``: the four
                 performance goals on device time, with the time of each kernel
  check_designs  ``gpu_check`` of every other design that ``designs`` times
  designs        the designs side by side at T=4096 (pipelined timing)
  no_decay       the same without decay (the QSF measurement term), with cuDNN
  end_to_end     end-to-end (sync) times at T=4096 D=128: with ``goals``' device
                 times, the fixed per-call cost
  programs       FLA's shape B=4 H=64: bound by programs or by the chunk loop?

A timing step needs ``check`` to have passed when ``check`` ran in the same
suite (timing kernels that give wrong answers says nothing). With
``--budget_s``, each step runs for at most its own cap (``Step.max_s``) and
never past the budget; a step is skipped when less than
``suite_runner.MIN_STEP_S`` is left. A step cut off by its limit is stopped
(SIGTERM, then SIGKILL); ``bench`` rewrites its JSON after each (T, D), so the
rows it measured are kept.

Everything a step prints goes to the console and to ``DIR/suite.log``;
``DIR/summary.json`` (rewritten after each step) says what ran, for how long
and how it ended; the benchmark steps write ``DIR/<step>.json``. Exits with
status 1 if a step failed or was cut off, 0 otherwise (a step skipped for lack
of budget is not a failure; the summary names it). Ctrl-C or SIGTERM stops the
running step and its processes, records it as "interrupted" and exits with 130.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .designs import DEFAULT_DESIGN
from .suite_runner import Step, display_command, markdown, report, run_suite, select

# The designs compared at T=4096 (WORKSPACE.md, "Next steps"): the default
# (c64_bv64_w4_s2), its split backward and 3-stage variant, the chunked
# backward and forward designs, and their C=128 forms.
# c64_bv64_w4_s2_pairs is the default with decay_grad="pairs": its time against the
# default's is what that form costs (kernels/op.py; not yet timed on a GPU).
DESIGNS = ("c64_bv64_w4_s2,c64_bv64_w4_s2_pairs,c64_bv64_w4_s2_split,c64_bv64_w4_s3,"
           "c64_bv64_w8_s3_chunkbwd,"
           "c64_bv64_w8_s3_chunkbwd_split,c64_bv128_w8_s3_chunkbwd,c128_bv64_w8_s2_chunkbwd,"
           "c64_bv64_w4_s3_chunkfwd,c128_bv64_w8_s2_chunkfwd")
# Without decay "pairs" changes nothing (there is no dG): the no-decay step skips it.
NO_DECAY_DESIGNS = ",".join(d for d in DESIGNS.split(",") if not d.endswith("_pairs"))
DEFAULT = f"c64_{DEFAULT_DESIGN}"  # what pallas_linear_attention runs by default
# The designs whose values are checked before they are timed: every design of
# DESIGNS but the default, which the "check" step checks (a different pipeline depth
# is a different Triton compilation, so c64_bv64_w4_s3 is checked too).
CHECKED_DESIGNS = ",".join(d for d in DESIGNS.split(",") if d != DEFAULT)

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


def _tool(module: str, *args: str) -> tuple[str, ...]:
  return ("-m", f"qsf_jax.kernels.{module}", *args)


_W = "--compile_workers=8"
PLAN = (
    Step("env", ("-c", ENV_SCRIPT), 60),
    Step("check", _tool("gpu_check", "--quick", _W), 150),
    Step("goals", _tool("bench", "--goals", "--timing=cupti", "--measure_ceilings", _W,
                        "--out={out}/goals.json"), 300, ("check",)),
    Step("check_designs", _tool("gpu_check", "--quick", "--backward=chunked", _W,
                                f"--configs={CHECKED_DESIGNS}"), 240),
    Step("designs", _tool("bench", "--impls=pallas", "--T=4096", "--D=64,128",
                          f"--configs={DESIGNS}", "--timing=pipelined", _W,
                          "--out={out}/designs.json"), 240, ("check",)),
    Step("no_decay", _tool("bench", "--decay=none", "--impls=pallas,softmax", "--T=4096",
                           "--D=128", f"--configs={NO_DECAY_DESIGNS}", "--timing=pipelined",
                           _W, "--out={out}/no_decay.json"), 180, ("check",)),
    Step("end_to_end", _tool("bench", "--timing=sync", "--impls=pallas,xla,softmax",
                             "--T=4096", "--D=128", _W, "--out={out}/end_to_end.json"), 150,
         ("check",)),
    Step("programs", _tool("bench", "--B=4", "--H=64", "--T=4096", "--D=128", "--modes=fwd",
                           "--impls=pallas", _W, "--out={out}/programs.json"), 120, ("check",)),
)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="output folder (created)")
  p.add_argument("--budget_s", type=float, default=None,
                 help="wall-clock seconds for the whole suite (default: no limit)")
  p.add_argument("--steps", default=None,
                 help=f"comma-separated steps to run (default all: {','.join(s.name for s in PLAN)})")
  p.add_argument("--list", action="store_true", help="print the plan and run nothing")
  p.add_argument("--report", default=None, metavar="DIR",
                 help="print the markdown tables of an earlier run's folder and run nothing")
  a = p.parse_args(argv)
  if a.report is not None:
    try:
      print(report(a.report))
    except ValueError as e:
      p.error(str(e))
    return 0
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
