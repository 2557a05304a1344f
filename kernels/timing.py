"""How the kernel benchmark times a jitted function (kernels spec §6, "Timing").

Three methods, each the median over ``reps`` samples after compilation,
rotating the given input sets:

* ``"sync"``: one call, then ``block_until_ready``; end to end (dispatch, host
  round trip and device time).
* ``"pipelined"``: PIPELINE_CALLS calls issued back to back and blocked once,
  divided by their number; hides the per-call host round trip.
* ``"cupti"``: device time of every kernel the call launches, from CUPTI
  (``jax.experimental.mosaic.gpu.profiler.measure``, GPU only), summed per
  call; the time the roofline floors of spec §7 compare with. It also gives
  the median time of each kernel by name (the Pallas kernels are named
  ``linear_attention_*``; the rest are XLA's fusions: padding, cumsums, sums).
  CUPTI takes a single subscriber, so it cannot run alongside Nsight tools.

``measure_ceilings`` times the device's copy bandwidth and matmul rate, the
ceilings of the roofline (spec §7), with any of the three.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import statistics
import time

import jax
import jax.numpy as jnp

from . import roofline

PIPELINE_CALLS = 10  # back-to-back calls per sample with "pipelined"
TIMINGS = ("sync", "pipelined", "cupti")


def median_seconds(f, arg_sets, reps, timing="sync"):
  """Median seconds per call of ``f`` ("sync" or "pipelined", see the module docstring).

  Args:
    f: a jitted function.
    arg_sets: a list of argument tuples; sample i uses arg_sets[i % len].
    reps: number of samples.
    timing: "sync" or "pipelined".

  Returns:
    the median seconds per call.
  """
  if timing not in ("sync", "pipelined"):
    raise ValueError(f"median_seconds times 'sync' or 'pipelined', got {timing!r}")
  jax.block_until_ready(f(*arg_sets[0]))  # compile
  for a in arg_sets[1:]:
    jax.block_until_ready(f(*a))
  calls = PIPELINE_CALLS if timing == "pipelined" else 1
  times = []
  for i in range(reps):
    t0 = time.perf_counter()
    outs = [f(*arg_sets[(i * calls + j) % len(arg_sets)]) for j in range(calls)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times)


def precompile(jobs, workers):
  """Compiles jitted functions ahead of their timing, ``workers`` at a time.

  ``f.lower(*args).compile()`` fills the cache that ``f(*args)`` dispatches
  through, so the timed calls that follow compile nothing. Tracing holds the
  GIL, but XLA's compilation (and Triton's, for Pallas kernels) releases it,
  so threads overlap the slow part. Nothing runs on the device.

  Args:
    jobs: a list of (jitted function, argument tuple).
    workers: threads (1 compiles in order on this thread).

  Returns:
    a list aligned with ``jobs``: None, or the exception a compilation raised.
  """
  def one(job):
    f, args = job
    try:
      f.lower(*args).compile()
    except Exception as e:  # pylint: disable=broad-except
      return e
    return None

  if workers <= 1:
    return [one(j) for j in jobs]
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(one, jobs))


def summarize_kernel_timings(iterations):
  """Median device time per call and per kernel from CUPTI records.

  Args:
    iterations: one list per call of (kernel name, milliseconds) records, as
      ``profiler.measure(f, aggregate=False, iterations=n)`` returns them.

  Returns:
    (median seconds per call, {kernel name: median milliseconds per call}),
    where a kernel launched several times in one call counts with its sum.

  Raises:
    ValueError: for no calls, or a call that launched no kernel.
  """
  if not iterations:
    raise ValueError("no CUPTI records: the function was not called")
  totals, per_kernel = [], collections.defaultdict(list)
  for records in iterations:
    if not records:
      raise ValueError("a call launched no GPU kernel (CUPTI recorded nothing)")
    by_name = collections.defaultdict(float)
    for name, ms in records:
      by_name[name] += ms
    totals.append(sum(by_name.values()))
    for name, ms in by_name.items():
      per_kernel[name].append(ms)
  n = len(iterations)
  breakdown = {name: statistics.median(v + [0.0] * (n - len(v)))
               for name, v in per_kernel.items()}
  return statistics.median(totals) / 1e3, breakdown


def cupti_seconds(f, arg_sets, reps):
  """CUPTI device time of ``f``: (median seconds per call, per-kernel median ms).

  Runs ``reps`` calls in all, split over the input sets (one CUPTI session per
  set; ``measure`` compiles and warms up first).

  Raises:
    RuntimeError: where CUPTI profiling is unavailable (no GPU).
  """
  if jax.default_backend() != "gpu":
    raise RuntimeError("cupti timing needs a GPU backend, found "
                       f"{jax.default_backend()!r}")
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=import-outside-toplevel
  per_set = -(-reps // len(arg_sets))
  iterations = []
  for args in arg_sets:
    _, timings = profiler.measure(f, aggregate=False, iterations=per_set)(*args)
    if timings is None:
      raise RuntimeError("CUPTI recorded no kernel launch")
    iterations += timings if per_set > 1 else [timings]
  return summarize_kernel_timings(iterations)


def measure_ceilings(reps=20, copy_bytes=2 << 30, gemm_n=8192, timing="sync"):
  """Measures this device's two roofline ceilings (kernels spec §7, "Ceilings").

  Bandwidth: a jitted elementwise pass over ``copy_bytes`` of bf16 (read once,
  written once), counting bytes read plus bytes written. Matmul: an
  ``gemm_n``^3 bf16 product on random data (2 n^3 FLOP). Each is the median of
  ``reps`` calls after compilation, rotating two input sets, timed with
  ``timing`` (one of ``TIMINGS``; "cupti" gives device time, as the
  benchmark's rows then have).

  Returns:
    a ``roofline.DevicePeak`` with the measured figures.
  """
  if timing not in TIMINGS:
    raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
  seconds = ((lambda f, args: cupti_seconds(f, args, reps)[0]) if timing == "cupti"
             else (lambda f, args: median_seconds(f, args, reps, timing)))
  n = copy_bytes // 2
  xs = [jax.random.normal(jax.random.key(s), (n,), jnp.bfloat16) for s in (0, 1)]
  t_copy = seconds(jax.jit(lambda x: x * 2), [(x,) for x in xs])
  del xs
  mats = [tuple(jax.random.normal(k, (gemm_n, gemm_n), jnp.bfloat16)
                for k in jax.random.split(jax.random.key(s), 2)) for s in (2, 3)]
  t_mm = seconds(jax.jit(lambda a, b: a @ b), mats)
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  return roofline.DevicePeak(2 * gemm_n ** 3 / t_mm, 2 * copy_bytes / t_copy,
                             f"measured by bench --measure_ceilings ({timing} timing), {date}")
