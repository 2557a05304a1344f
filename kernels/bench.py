"""Benchmark of causal linear attention impls against causal softmax attention.

Run as ``python -m qsf_jax.kernels.bench [--quick] [--out=PATH.json]``.

Sweeps T in {512, 1K, 2K, 4K, 8K, 16K}, D = Dk = Dv in {64, 128}, B = H = 8, bf16
inputs with float32 log-decays (kernels spec §6; ``--decay=none`` drops them, as
the QSF measurement term does), forward ("fwd") and forward + backward
("fwdbwd": ``value_and_grad`` with respect to q, k, v, g with a random
cotangent). Candidates: "pallas" (GPU only; every launch configuration of
``PALLAS_CONFIGS`` with ``--sweep_configs``), "xla" (chunked jnp, C = 64),
"reference" (O(T^2), only where its score tensors fit in memory), "scan" (short T
only) and "softmax", ``jax.nn.dot_product_attention(..., is_causal=True)`` (the
cuDNN implementation on GPU). Each time is the median of ``--reps`` (>= 20)
calls after compilation, timed end to end with ``block_until_ready``
(``--timing=pipelined``: ten calls back to back per sample; ``--timing=cupti``:
device time of the launched kernels, with a per-kernel breakdown; ``timing``),
rotating two input sets. Throughput uses the FLOP/byte model of ``roofline`` (kernels
spec §7): for every linear-attention impl the *useful* work of the chunked
algorithm, so TFLOP/s are comparable across impls. On CPU the default is the
``--quick`` sweep and Pallas is skipped. ``--goals`` runs the sweep the kernels'
performance goals need and prints a verdict per goal (``goals``); it measures
T = 4096, D = 128 (goals 1, 2 and 4) first, and on a GPU it times with CUPTI
unless ``--timing`` says otherwise (the goals' floors are device time). ``--out`` is rewritten after each
(T, D) with ``"partial": true`` until the sweep ends, so a sweep cut short keeps
what it measured.
"""

from __future__ import annotations

import datetime
import functools
import json

import jax
import jax.numpy as jnp

from . import goals, roofline
from .bench_args import build_parser, check_args
from .candidates import DECAYS, DEFAULT_CONFIG, PALLAS_CONFIGS, row_work
from .op import linear_attention
from .pallas_op import pallas_linear_attention
from .report import add_speedups, design_ranking, kernel_breakdown, markdown_table
from .timing import cupti_seconds, measure_ceilings, median_seconds, precompile

FULL = dict(T=(512, 1024, 2048, 4096, 8192, 16384), D=(64, 128), B=8, H=8)
QUICK = dict(T=(256, 512, 1024), D=(64,), B=2, H=2)
SCAN_MAX_T = {"fwd": 2048, "fwdbwd": 1024}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _inputs(seed, B, T, H, D, dtype):
  """Random bf16 q, k, v, cotangent do and float32 g = logsigmoid(N(0, 1)), on device."""
  kq, kk, kv, kd, kg = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, s: (jax.random.normal(key, (B, T, H, D)) * s).astype(dtype)
  q, k = normal(kq, D ** -0.25), normal(kk, D ** -0.25)
  v, do = normal(kv, 1.0), normal(kd, 1.0)
  g = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H)))
  return q, k, v, g, do


def _forward_fn(impl, cfg, decay="logsigmoid"):
  """(q, k, v, g) -> o for one candidate (g is ignored with ``decay="none"``)."""
  if impl == "softmax":
    kind = "cudnn" if jax.default_backend() == "gpu" else "xla"
    return lambda q, k, v, g: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                           implementation=kind)
  use = (lambda g: None) if decay == "none" else (lambda g: g)
  if impl == "pallas":
    return lambda q, k, v, g: pallas_linear_attention(q, k, v, use(g), **cfg.kwargs())[0]
  return lambda q, k, v, g: linear_attention(q, k, v, use(g), impl=impl, chunk_size=64)


def _bench_fn(impl, cfg, mode, decay="logsigmoid"):
  fwd = _forward_fn(impl, cfg, decay)
  if mode == "fwd":
    return jax.jit(lambda q, k, v, g, do: fwd(q, k, v, g))
  argnums = (0, 1, 2) if impl == "softmax" or decay == "none" else (0, 1, 2, 3)
  loss = lambda q, k, v, g, do: jnp.sum(fwd(q, k, v, g).astype(jnp.float32) * do)
  return jax.jit(jax.value_and_grad(loss, argnums=argnums))


def _skip_reason(impl, mode, B, T, H, D, mem_budget):
  """Why a candidate is not run at this size, or None."""
  if impl == "pallas" and jax.default_backend() != "gpu":
    return "Pallas kernels need a GPU (interpret mode is not a benchmark)"
  if impl == "scan" and T > SCAN_MAX_T[mode]:
    return f"scan only for T <= {SCAN_MAX_T[mode]}"
  if impl == "scan" and mode == "fwdbwd" and B * H * T * D * D * 4 > mem_budget:
    return "per-step states do not fit"
  if impl == "reference" and (5 if mode == "fwd" else 12) * B * H * T * T * 4 > mem_budget:
    return "O(T^2) score tensors do not fit"
  return None


def _error_line(e):
  """A failed candidate's ``skipped`` entry: "Type: first line", or None for None."""
  return None if e is None else f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def _memory_budget():
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  return 0.5 * limit if limit else 8e9


def run(Ts, Ds, B, H, *, impls, modes, reps, dtype, sweep_configs, peak=None, configs=None,
        timing="sync", decay="logsigmoid", compile_workers=1, first=None, on_rows=None):
  """Runs the sweep and returns the list of result rows (dicts).

  ``peak`` (a ``roofline.DevicePeak``) sets the roofline ceilings; None takes
  ``roofline.device_peak`` of the device kind. ``configs`` names the Pallas
  launch configurations to time (default: all with ``sweep_configs``, else the
  default one). ``timing`` is one of ``timing.TIMINGS`` (see ``timing``);
  ``decay`` one of ``DECAYS``. Each row records its ``timing``: a row whose
  CUPTI timing fails is timed "sync" instead and keeps the error in
  ``cupti_error``. ``compile_workers`` > 1 compiles the candidates
  of each (T, D) on that many threads before timing them one by one
  (``timing.precompile``); the timings are the same, the sweep shorter.
  ``first``, a (T, D) of the sweep, is measured before the others (the
  returned rows keep the sweep's order). ``on_rows(rows)`` is called with the
  rows so far after each (T, D), so a caller can save a sweep that is cut short.
  """
  if decay not in DECAYS:
    raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
  dev = jax.devices()[0]
  peak = peak or roofline.device_peak(dev.device_kind)
  budget = _memory_budget()
  elem = jnp.dtype(dtype).itemsize
  cands = []
  for impl in impls:
    if impl == "pallas":
      names = configs or (sorted(PALLAS_CONFIGS) if sweep_configs else [DEFAULT_CONFIG])
      cands += [("pallas", n, PALLAS_CONFIGS[n]) for n in names]
    else:
      cands.append((impl, "", None))
  pairs = [(T, D) for D in Ds for T in Ts]
  if first is not None:
    if tuple(first) not in pairs:
      raise ValueError(f"first={tuple(first)} is not a (T, D) of the sweep")
    pairs.remove(tuple(first))
    pairs.insert(0, tuple(first))
  rows = []
  for T, D in pairs:
    arg_sets = [_inputs(s, B, T, H, D, jnp.dtype(dtype)) for s in (0, 1)]
    todo = []  # (row, fn or None, why)
    for mode in modes:
      for impl, cfg_name, cfg in cands:
        row = dict(impl=impl, config=cfg_name, mode=mode, B=B, T=T, H=H, D=D,
                   dtype=jnp.dtype(dtype).name, decay=decay)
        why = _skip_reason(impl, mode, B, T, H, D, budget)
        todo.append((row, None if why else _bench_fn(impl, cfg, mode, decay), why))
    if compile_workers > 1:  # compile this (T, D)'s candidates side by side first
      jobs = [(fn, arg_sets[0]) for _, fn, why in todo if why is None]
      errors = iter(precompile(jobs, compile_workers))
      todo = [(row, fn, why if why else _error_line(next(errors)))
              for row, fn, why in todo]
    for row, fn, why in todo:
      impl, mode = row["impl"], row["mode"]
      row["timing"] = timing
      if why is None:
        try:
          if timing == "cupti":
            try:
              sec, kernels_ms = cupti_seconds(fn, arg_sets, reps)
              row["kernels_ms"] = kernels_ms
            except Exception as e:  # pylint: disable=broad-except
              # CUPTI can be missing or taken (Nsight); an end-to-end time is
              # still an upper bound on device time, and the row says which it is.
              row.update(timing="sync", cupti_error=_error_line(e))
              print(f"  cupti failed ({row['cupti_error']}); timing end to end", flush=True)
              sec = median_seconds(fn, arg_sets, reps, "sync")
          else:
            sec = median_seconds(fn, arg_sets, reps, timing)
        except Exception as e:  # pylint: disable=broad-except
          why = _error_line(e)
      if why is not None:
        rows.append(dict(row, skipped=why))
        continue
      flops, nbytes = row_work(impl, mode, B, T, H, D, elem)
      frac = roofline.roofline_fraction(flops, nbytes, sec, peak)
      rows.append(dict(row, ms=sec * 1e3, tflops=flops / sec / 1e12,
                       gbps=nbytes / sec / 1e9,
                       roofline_pct=None if frac is None else 100 * frac))
      print(f"  {impl:9s} {row['config']:16s} {mode:6s} T={T:5d} D={D:3d} "
            f"{sec * 1e3:9.3f} ms", flush=True)
    if on_rows is not None:
      on_rows(_in_sweep_order(rows, Ts, Ds))
  rows = _in_sweep_order(rows, Ts, Ds)
  add_speedups(rows, DEFAULT_CONFIG)
  return rows


def _in_sweep_order(rows, Ts, Ds):
  """``rows`` sorted by (D, T) in the order of the sweep (stable within a (T, D))."""
  return sorted(rows, key=lambda r: (Ds.index(r["D"]), Ts.index(r["T"])))


def main(argv=None):
  p = build_parser()
  a = p.parse_args(argv)
  configs = check_args(p, a)
  quick = not a.goals and (a.quick or (jax.default_backend() == "cpu" and not a.full))
  sizes = dict(FULL, **goals.GOAL_SWEEP) if a.goals else dict(QUICK if quick else FULL)
  impls = a.impls or ("pallas,xla,softmax" if a.goals else "pallas,xla,reference,scan,softmax")
  if a.T:
    sizes["T"] = tuple(int(x) for x in a.T.split(","))
  if a.D:
    sizes["D"] = tuple(int(x) for x in a.D.split(","))
  sizes.update({k: v for k, v in (("B", a.B), ("H", a.H)) if v is not None})
  dev = jax.devices()[0]
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {date}")
  # The goals' floors are device time: on a GPU, --goals times with CUPTI unless told.
  timing = a.timing or ("cupti" if a.goals and jax.default_backend() == "gpu" else "sync")
  if timing == "cupti" and jax.default_backend() != "gpu":
    p.error(f"--timing=cupti needs a GPU (CUPTI); this backend is {jax.default_backend()!r}")
  peak = roofline.device_peak(dev.device_kind)
  if a.measure_ceilings:
    try:
      peak = measure_ceilings(timing=timing)
    except Exception as e:  # pylint: disable=broad-except
      if timing != "cupti":
        raise
      # as for the rows: without CUPTI, end-to-end times still bound the ceilings
      print(f"cupti failed for the ceilings ({_error_line(e)}); timing them end to end")
      peak = measure_ceilings(timing="sync")
  if peak is not None:
    print(f"ceilings: {peak.bandwidth / 1e12:.2f} TB/s, {peak.flops / 1e12:.0f} TFLOP/s "
          f"({peak.source})")

  def judge(rows):
    return goals.evaluate(rows, device_kind=dev.device_kind, timing=timing,
                          config=a.goal_config, peak=peak)

  def save(rows, partial):
    """Writes ``--out``; a partial file (rows so far) after each (T, D)."""
    rows = [dict(r) for r in rows]
    add_speedups(rows, DEFAULT_CONFIG)
    verdicts = judge(rows) if a.goals else None
    with open(a.out, "w", encoding="utf-8") as f:
      json.dump(dict(date=date, device=dev.device_kind, platform=dev.platform,
                     jax_version=jax.__version__, quick=quick, reps=a.reps, timing=timing,
                     decay=a.decay, partial=partial, goal_config=a.goal_config,
                     default_config=DEFAULT_CONFIG,
                     peak=None if peak is None else peak.__dict__, rows=rows,
                     goals=verdicts), f, indent=1)

  # With --goals the shape of goals 1, 2 and 4 is measured first, so a sweep cut
  # short (and saved after each (T, D)) still holds them.
  first = (4096, 128) if a.goals and 4096 in sizes["T"] and 128 in sizes["D"] else None
  rows = run(sizes["T"], sizes["D"], sizes["B"], sizes["H"], impls=impls.split(","),
             modes=a.modes.split(","), reps=a.reps, dtype=jnp.dtype(a.dtype),
             sweep_configs=a.sweep_configs, peak=peak, configs=configs, timing=timing,
             decay=a.decay, compile_workers=a.compile_workers, first=first,
             on_rows=(lambda rows: save(rows, True)) if a.out else None)
  header = (f"Causal linear attention, {dev.device_kind}, B={sizes['B']} H={sizes['H']} "
            f"{a.dtype}, decay {a.decay}, median of {a.reps}, {timing} timing, {date}")
  print("\n" + markdown_table(rows, header))
  if timing == "cupti":
    print("\n" + kernel_breakdown(rows))
  ranking = design_ranking(rows, DEFAULT_CONFIG)
  if ranking:
    print("\nFastest Pallas configuration per row:\n\n" + ranking)
  verdicts = None
  if a.goals:
    verdicts = judge(rows)
    print("\n" + goals.markdown(verdicts, goals.header(a.goal_config, a.decay,
                                                        dev.device_kind, timing, date)))
  if a.out:
    save(rows, False)
    print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
