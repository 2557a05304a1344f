r"""Benchmark of the physics core: propagators, chains and the Cayley scan.

  python -m experiments.bench_core [--out=runs/bench_core.json] [--repeats=10] [--quick]

Prints a markdown table (time per call after compilation, the median over
``--repeats`` calls, or over max(2, repeats // 5) for the Cayley scan at
N >= 256, each row saying how many; device and load average) and writes the
same rows as JSON:

* ``propagate`` over one interval at d=320 (the paper's width), paper and exact;
* a 512-token chain at d=320: free means (QSF eq. 59) and measured means
  (eqs. 57-59) with the sequential ``lax.scan`` against ``lax.associative_scan``,
  and the full Kalman chain (``chain_filter``, sequential);
* the same functions called eagerly at d=3 (8 tokens), as in a notebook: the
  latency of one call after the first;
* the Cayley scan (wave-function spec §1.3) at N in {16, 64, 256} over 4096
  steps, and its associative twin at N <= 16 only (O(N^3 T log T)).

Timings are measurements of this machine; record them with device and date.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp

import qsf_jax as q
from qsf_jax.training import cli
from qsf_jax.training.bench import device_description


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("out", "runs/bench_core.json",
                      "Where to write the JSON rows (its folder is created).", flag_values=fv)
  flags.DEFINE_integer("repeats", 10, "Timed calls per case (median reported).",
                       flag_values=fv)
  flags.DEFINE_bool("quick", False, "Small sizes (d=64, 128 tokens, 512 Cayley steps).",
                    flag_values=fv)
  cli.define_common(fv)


def _time(fn, *args, repeats: int) -> float:
  """Median wall time of ``fn(*args)`` in seconds after one compiling call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _problem(key, d: int, n_tok: int):
  """A stable random generator A, bias, start state, targets and W_V."""
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  A = jax.random.normal(k1, (d, d)) / jnp.sqrt(d) - 1.5 * jnp.eye(d)
  b = jax.random.normal(k2, (d,))
  x0 = jax.random.normal(k3, (d,))
  x_tgt = jax.random.normal(k4, (n_tok, d))
  W_V = jax.random.normal(k5, (d, d)) / jnp.sqrt(d)
  return A, b, x0, x_tgt, W_V


def run_cases(d: int, n_tok: int, cayley_dims, cayley_steps: int, repeats: int):
  rows = []

  def add(case, size, seconds, note="", calls=repeats):
    rows.append(dict(case=case, size=size, ms=seconds * 1e3, calls=calls, note=note))
    print(f"  {case:<40} {size:<18} {seconds * 1e3:10.3f} ms (median of {calls}) {note}",
          flush=True)

  A, b, x0, x_tgt, W_V = _problem(jax.random.PRNGKey(0), d, n_tok)
  for mode in ("paper", "kalman_bucy"):
    f = jax.jit(lambda x0, xt, m=mode: q.propagate(x0, A, b, xt, W_V, mode=m))
    add(f"propagate ({mode})", f"d={d}", _time(f, x0, x_tgt[0], repeats=repeats))

  for method in ("sequential", "associative"):
    f = jax.jit(lambda x0, m=method: q.chain_mean(x0, A, b, n_steps=n_tok, method=m))
    add(f"chain_mean ({method})", f"d={d} N={n_tok}", _time(f, x0, repeats=repeats))
  for method in ("sequential", "associative"):
    f = jax.jit(lambda x0, xt, m=method: q.chain_measured_mean(x0, A, b, xt, W_V, method=m))
    add(f"chain_measured_mean ({method})", f"d={d} N={n_tok}",
        _time(f, x0, x_tgt, repeats=repeats))
  f = jax.jit(lambda x0, xt: q.chain_filter(x0, A, b, xt, W_V))
  add("chain_filter (Kalman, sequential)", f"d={d} N={n_tok}",
      _time(f, x0, x_tgt, repeats=repeats))

  # Notebook use: the public functions called eagerly (no jax.jit around them) at
  # d=3, as in docs/NOTEBOOK.md; each call validates its inputs on the host and then
  # runs one compiled program.
  A3, b3, x03, xt3, W3 = _problem(jax.random.PRNGKey(3), 3, 8)
  eager = {
      "propagate (paper), eager": ("d=3", lambda: q.propagate(x03, A3, b3, xt3[0], W3)),
      "propagate (kalman_bucy), eager": (
          "d=3", lambda: q.propagate(x03, A3, b3, xt3[0], W3, mode="kalman_bucy")),
      "chain_mean (associative), eager": (
          "d=3 N=8", lambda: q.chain_mean(x03, A3, b3, n_steps=8)),
      "chain_filter (paper), eager": ("d=3 N=8", lambda: q.chain_filter(x03, A3, b3, xt3, W3)),
      "chain_filter (kalman_bucy), eager": (
          "d=3 N=8", lambda: q.chain_filter(x03, A3, b3, xt3, W3, mode="kalman_bucy")),
  }
  for case, (size, fn) in eager.items():
    add(case, size, _time(fn, repeats=repeats))

  for N in cayley_dims:
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(N), 3)
    scale = 1.0 / jnp.sqrt(N)
    H_seq = jax.jit(lambda kx, ky: q.hermitian_from_real(
        scale * jax.random.normal(kx, (cayley_steps, N, N)),
        scale * jax.random.normal(ky, (cayley_steps, N, N))))(kx, ky)
    psi0 = jnp.zeros((N,), jnp.complex64).at[0].set(1.0)
    reps = max(2, repeats // 5) if N >= 256 else repeats
    f = jax.jit(lambda H, p: q.cayley_scan(H, p, return_states=False)[0])
    add("cayley_scan (lax.scan)", f"N={N} T={cayley_steps}", _time(f, H_seq, psi0, repeats=reps),
        calls=reps)
    if N <= 16:  # the associative twin is O(N^3 T log T): small N only
      f = jax.jit(lambda H, p: q.cayley_scan_parallel(H, p)[0])
      add("cayley_scan_parallel (associative)", f"N={N} T={cayley_steps}",
          _time(f, H_seq, psi0, repeats=reps), calls=reps)
    del H_seq
  return rows


def execute(fv: flags.FlagValues) -> int:
  if fv.repeats < 1:
    raise ValueError("--repeats must be >= 1")
  cli.prepare_output_file("--out", fv.out)
  device = device_description()
  load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
  if fv.quick:
    d, n_tok, dims, steps = 64, 128, (16, 64), 512
  else:
    d, n_tok, dims, steps = 320, 512, (16, 64, 256), 4096
  print(f"bench_core on {device} ({jax.device_count()} device(s)), float32, median of "
        f"{fv.repeats} calls per case (of {max(2, fv.repeats // 5)} for the Cayley scan at "
        f"N >= 256)")
  rows = run_cases(d, n_tok, dims, steps, fv.repeats)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  print("\n| case | size | time per call (ms) | calls (median of) |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['case']} | {r['size']} | {r['ms']:.3f} | {r['calls']} |")
  print(f"\ndevice: {device}; date: {stamp}; jax {jax.__version__}"
        + (f"; load average at start: {', '.join(str(x) for x in load)}" if load else ""))
  with open(fv.out, "w") as f:
    json.dump(dict(device=device, date=stamp, jax=jax.__version__, load_avg_at_start=load,
                   rows=rows), f, indent=1)
  return 0


def run(argv) -> int:
  """Runs the benchmark in-process on ``argv``; returns the exit status."""
  return cli.run(define_flags, execute, argv)


if __name__ == "__main__":
  cli.main(define_flags, execute)
