"""The command line of ``python -m qsf_jax.kernels.bench``: its flags and their checks.

``build_parser`` builds the parser; ``check_args`` checks every flag that needs
no device (names of impls, modes, Pallas configurations, sizes), so that a
command can be validated before any GPU time is spent (``gpu_suite`` and its
tests do this).
"""

from __future__ import annotations

import argparse
import os

import jax.numpy as jnp

from .candidates import DECAYS, DEFAULT_CONFIG, PALLAS_CONFIGS
from .timing import PIPELINE_CALLS, TIMINGS

IMPLS = ("pallas", "xla", "reference", "scan", "softmax")
MODES = ("fwd", "fwdbwd")


def build_parser() -> argparse.ArgumentParser:
  """The parser of ``python -m qsf_jax.kernels.bench``."""
  p = argparse.ArgumentParser(
      description="Benchmark of causal linear attention impls against causal softmax attention.")
  p.add_argument("--out", default=None, help="write the results as JSON to this path")
  p.add_argument("--quick", action="store_true", help="small sweep (the default on CPU)")
  p.add_argument("--full", action="store_true", help="the full sweep even on CPU")
  p.add_argument("--impls", default=None,
                 help="comma-separated impls (default pallas,xla,reference,scan,softmax; "
                      "with --goals pallas,xla,softmax)")
  p.add_argument("--modes", default="fwd,fwdbwd")
  p.add_argument("--T", default=None, help="comma-separated sequence lengths")
  p.add_argument("--D", default=None, help="comma-separated head dims")
  p.add_argument("--B", type=int, default=None, help="batch size (default 8; 2 with --quick)")
  p.add_argument("--H", type=int, default=None,
                 help="heads (default 8; 2 with --quick); e.g. --B=4 --H=64 for FLA's "
                      "benchmark shape, 512 programs instead of 128 at D=128")
  p.add_argument("--reps", type=int, default=20,
                 help="timed runs per case, after compiling; the median is reported (>= 20)")
  p.add_argument("--timing", default=None, choices=TIMINGS,
                 help="default sync, or cupti with --goals on a GPU. "
                      "sync: block after every call (end to end); pipelined: "
                      f"{PIPELINE_CALLS} calls back to back per sample; cupti: device time "
                      "of the launched kernels (GPU), with a per-kernel breakdown")
  p.add_argument("--compile_workers", type=int, default=1,
                 help="compile each (T, D)'s candidates on this many threads before timing "
                      "them (XLA and Triton compile outside the GIL; 1: compile each "
                      "candidate just before its timing)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--decay", default="logsigmoid", choices=DECAYS,
                 help="logsigmoid: g = logsigmoid(N(0, 1)) (the spec's benchmark); none: "
                      "log_decay=None (the QSF measurement term)")
  p.add_argument("--sweep_configs", action="store_true",
                 help="time every Pallas launch configuration")
  p.add_argument("--configs", default=None,
                 help="comma-separated Pallas launch configurations to time (names of "
                      "PALLAS_CONFIGS)")
  p.add_argument("--goals", action="store_true",
                 help="the sweep the performance goals need (T 1K-16K, D 64 and 128, B=H=8, "
                      "pallas/xla/softmax, both modes), then a verdict table (goals.py)")
  p.add_argument("--goal_config", default=DEFAULT_CONFIG,
                 help="the Pallas configuration the goals are judged on")
  p.add_argument("--measure_ceilings", action="store_true",
                 help="measure this device's copy bandwidth and bf16 matmul rate first and "
                      "use them as the roofline ceilings of the rows' %% roofline (the goals' "
                      "targets stay the H100's)")
  return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace):
  """Checks the flags that need no device; returns the Pallas configs to time.

  Exits through ``p.error`` on a bad flag. The device-dependent check
  (``--timing=cupti`` needs a GPU) is made by ``main``.
  """
  if a.reps < 20:
    p.error("--reps must be >= 20")
  if a.compile_workers < 1:
    p.error(f"--compile_workers must be >= 1, got {a.compile_workers}")
  for flag, val in (("--B", a.B), ("--H", a.H)):
    if val is not None and val < 1:
      p.error(f"{flag} must be a positive int, got {val}")
    if val is not None and a.goals:
      p.error(f"--goals judges the goals' shapes (B=H=8); drop {flag}")
  configs = a.configs.split(",") if a.configs else None
  if a.goal_config not in PALLAS_CONFIGS:
    p.error(f"unknown --goal_config {a.goal_config!r}; choose from {sorted(PALLAS_CONFIGS)}")
  if a.goals:  # the judged configuration is always timed
    listed = configs or (sorted(PALLAS_CONFIGS) if a.sweep_configs else [DEFAULT_CONFIG])
    configs = list(dict.fromkeys(listed + [a.goal_config]))
  unknown = sorted(set(configs or ()) - set(PALLAS_CONFIGS))
  if unknown:
    p.error(f"unknown --configs {unknown}; choose from {sorted(PALLAS_CONFIGS)}")
  for flag, val, allowed in (("--impls", a.impls, IMPLS), ("--modes", a.modes, MODES)):
    bad = sorted(set(val.split(",")) - set(allowed)) if val is not None else []
    if bad:
      p.error(f"unknown {flag} {bad}; choose from {list(allowed)}")
  try:
    jnp.dtype(a.dtype)
  except TypeError:
    p.error(f"unknown --dtype {a.dtype!r}")
  for flag, val in (("--T", a.T), ("--D", a.D)):
    if val is not None and not all(x.strip().isdigit() and int(x) > 0 for x in val.split(",")):
      p.error(f"{flag} must be comma-separated positive ints, got {val!r}")
  if a.out is not None:
    parent = os.path.dirname(os.path.abspath(a.out))
    if os.path.isdir(a.out):
      p.error(f"--out={a.out} is a folder; give a file path such as {a.out}/bench.json")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
      p.error(f"--out={a.out}: the folder {parent} does not exist or is not writable")
  return configs
