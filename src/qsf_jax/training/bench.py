"""Training throughput, step memory and decode latency of the model zoo.

Library half of ``python -m experiments.bench_train``: every figure is a
measurement on the current device (median wall time after compilation).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from qsf_jax.models.config import get_config
from qsf_jax.models.lm import build_model, init_cache
from qsf_jax.models.params import count_params
from qsf_jax.training.optim import make_optimizer, onecycle_schedule
from qsf_jax.training.state import create_train_state, init_variables
from qsf_jax.training.step import make_train_step


def device_description() -> str:
  """``platform: device kind`` of device 0, with the CPU model and core count on CPU."""
  dev = jax.devices()[0]
  desc = f"{dev.platform}: {getattr(dev, 'device_kind', '?')}"
  if dev.platform == "cpu":
    model = ""
    try:
      with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
      pass
    desc += f" ({model + ', ' if model else ''}{os.cpu_count()} cores)"
  return desc


def _median_seconds(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def device_peak_bytes() -> int | None:
  """Device 0's ``peak_bytes_in_use`` so far in this process (None where not reported)."""
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def memory_measures(compiled, peak_before: int | None = None) -> dict:
  """Memory figures of one compiled call.

  Args:
    compiled: the compiled call, after it ran once.
    peak_before: ``device_peak_bytes()`` before it was compiled and ran.

  Returns:
    ``memory_bytes`` (the headline figure), ``memory_measure`` (what it is) and
    the parts: ``xla_temp_bytes``, ``xla_argument_bytes``, ``xla_output_bytes``,
    ``xla_alias_bytes`` from ``compiled.memory_analysis()`` (None where the
    backend has none), ``device_peak_bytes`` (the device's
    ``peak_bytes_in_use`` so far in this process; GPU/TPU only) and
    ``device_peak_is_this_call`` (whether that peak rose during this call, so
    that it is this call's peak with whatever else was live; a peak that did
    not rise belongs to an earlier, larger call). The headline is XLA's temp +
    arguments + outputs minus the outputs aliased to donated arguments (the
    train state is donated, so it would otherwise count twice), on every
    backend, so rows compare; the device peak where XLA has no analysis.
  """
  out = dict(xla_temp_bytes=None, xla_argument_bytes=None, xla_output_bytes=None,
             xla_alias_bytes=None, device_peak_bytes=device_peak_bytes(),
             device_peak_is_this_call=None)
  if out["device_peak_bytes"] is not None and peak_before is not None:
    out["device_peak_is_this_call"] = out["device_peak_bytes"] > peak_before
  try:
    m = compiled.memory_analysis()
    out.update(xla_temp_bytes=int(m.temp_size_in_bytes),
               xla_argument_bytes=int(m.argument_size_in_bytes),
               xla_output_bytes=int(m.output_size_in_bytes),
               xla_alias_bytes=int(m.alias_size_in_bytes))
  except Exception:  # backends without memory analysis  # pylint: disable=broad-except
    pass
  if out["xla_temp_bytes"] is not None:
    out.update(memory_bytes=out["xla_temp_bytes"] + out["xla_argument_bytes"]
               + out["xla_output_bytes"] - out["xla_alias_bytes"],
               memory_measure="XLA memory_analysis: temp + arguments + outputs - aliased")
  elif out["device_peak_bytes"] is not None:
    out.update(memory_bytes=out["device_peak_bytes"],
               memory_measure="device peak_bytes_in_use (process-wide peak so far)")
  else:
    out.update(memory_bytes=None, memory_measure="unavailable")
  return out


def check_overrides(overrides: Mapping[str, Any] | None) -> None:
  """Raises ValueError for an override of a field the benchmark sets itself.

  ``vocab_size`` comes from ``--vocab_size`` and ``max_seq_len`` from each row's
  T; an override of either would be listed as applied and then replaced.
  """
  fixed = sorted(set(overrides or {}) & {"vocab_size", "max_seq_len"})
  if fixed:
    raise ValueError(f"--override={fixed[0]}=...: the benchmark sets it itself (--vocab_size, "
                     "and each row's T from --seq_lens); drop the override")


def train_throughput(stage: str, preset: str, seq_len: int, *, batch_size: int = 1,
                     steps: int = 5, vocab_size: int = 50257, seed: int = 0,
                     overrides: Mapping[str, Any] | None = None) -> dict:
  """Tokens/s and memory of one jitted train step (AdamW, donated state) at ``seq_len``.

  The model is the preset's with ``max_seq_len`` raised to ``seq_len`` where
  needed (same d, L); the step is the training loop's (``make_train_step``).

  Args:
    stage: model stage.
    preset: model size preset.
    seq_len: tokens per sequence T.
    batch_size: sequences per step B.
    steps: timed steps (the median is reported) after one warm-up step.
    vocab_size: vocabulary V (random tokens).
    seed: init and data seed.
    overrides: other ``ModelConfig`` fields (e.g. ``attn_pallas_design``).

  Returns:
    ``{stage, preset, seq_len, batch_size, step_s, tokens_per_s, params,
    compile_s}`` plus the fields of :func:`memory_measures`.
  """
  check_overrides(overrides)
  base = get_config(stage, preset, **(overrides or {}))
  cfg = base.replace(max_seq_len=max(seq_len, base.max_seq_len), vocab_size=vocab_size)
  model = build_model(cfg)
  init = jax.jit(init_variables, static_argnums=(0, 1, 2))
  params, collections = init(model, seed, seq_len)
  total = steps + 1
  tx = make_optimizer(total)
  state = create_train_state(params, collections, tx, seed)
  collects_stats = cfg.annealed and cfg.ls_scale == "ema" and "norm_stats" in collections
  step = make_train_step(model, tx, schedule=onecycle_schedule(total, 1e-3), total_steps=total,
                         anneal_frac=cfg.anneal_frac, anneal_shape=cfg.anneal_shape,
                         anneal_hold_frac=cfg.anneal_hold_frac,
                         stats_steps=cfg.stats_steps if collects_stats else None)
  tok = jax.random.randint(jax.random.PRNGKey(seed), (batch_size, seq_len + 1), 0, vocab_size)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:],
           "mask": jnp.ones((batch_size, seq_len), jnp.float32)}
  peak_before = device_peak_bytes()
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  mem = memory_measures(compiled, peak_before)  # after a run: a device peak includes it
  holder = [state]

  def one():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics
  sec = _median_seconds(one, steps)
  return dict(stage=stage, preset=preset, seq_len=seq_len, batch_size=batch_size,
              step_s=sec, tokens_per_s=batch_size * seq_len / sec, compile_s=compile_s,
              params=count_params(params), **mem)


class DecodeTimer:
  """One stage's ``decode=True`` model with its cache holding ``context`` tokens.

  The cache is filled by ``context`` single-token decode steps (one
  ``lax.scan``). Every step after that, the ``warmup`` untimed ones (the first
  compiles) and the timed ones, decodes the token at position ``context``:
  it writes that slot and consumes the previous step's cache (donated, as in
  generation), and the cache's position is then set back to ``context``. So
  every step sees exactly ``context`` earlier tokens, and the model's
  ``max_seq_len`` is ``context + 1``: the transformer's KV cache holds the
  context and its per-token work grows with it (it attends over every slot
  under a mask), while the recurrent stages carry a fixed-size state.

  Args:
    stage: model stage.
    preset: model size preset (its ``max_seq_len`` is replaced).
    context: tokens in the cache before each timed step.
    warmup: untimed steps after the fill, >= 1.
    vocab_size: vocabulary V.
    seed: init and token seed.
  """

  def __init__(self, stage: str, preset: str, context: int, *, warmup: int = 5,
               vocab_size: int = 50257, seed: int = 0):
    if warmup < 1 or context < 1:
      raise ValueError(f"context and warmup must be >= 1, got {context} and {warmup}")
    self.stage, self.preset, self.context = stage, preset, context
    self.max_len = context + 1
    cfg = get_config(stage, preset, max_seq_len=self.max_len, vocab_size=vocab_size)
    model = build_model(cfg)
    params, collections = jax.jit(init_variables, static_argnums=(0, 1, 2))(model, seed, 1)
    self._variables = {"params": params, **collections}
    beta = 1.0 if cfg.annealed else 0.0

    def apply(variables, cache, tok_B1):
      logits, upd = model.apply({**variables, "cache": cache}, tok_B1, beta=beta, decode=True,
                                mutable=["cache"])
      return upd["cache"], logits

    def step_at_context(variables, cache, tok_B1):
      new, logits = apply(variables, cache, tok_B1)
      return {**new, "index": cache["index"]}, logits  # back to position `context`

    def prefill(variables, toks_N):
      body = lambda cache, t: (apply(variables, cache, t.reshape(1, 1))[0], None)
      return jax.lax.scan(body, init_cache(model, 1), toks_N)[0]

    self._step = jax.jit(step_at_context, donate_argnums=(1,))
    toks = jax.random.randint(jax.random.PRNGKey(seed), (context,), 0, vocab_size)
    self._cache = jax.block_until_ready(jax.jit(prefill)(self._variables, toks))
    if int(self._cache["index"]) != context:
      raise AssertionError(f"the prefill left the cache at position "
                           f"{int(self._cache['index'])}, not {context}")
    self._tok = toks[:1].reshape(1, 1)
    for _ in range(warmup):
      self._advance()

  def _advance(self):
    self._cache, logits = self._step(self._variables, self._cache, self._tok)
    jax.block_until_ready(logits)

  def time_steps(self, n: int) -> list[float]:
    """Seconds of each of ``n`` single-token decode steps at position ``context``."""
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      self._advance()
      times.append(time.perf_counter() - t0)
    return times


def decode_latencies(pairs, preset: str, *, reps: int = 50, rounds: int = 3, warmup: int = 5,
                     vocab_size: int = 50257, seed: int = 0) -> list[dict]:
  """Per-token decode latency for each (stage, context) in ``pairs``, interleaved.

  Every pair gets a ``DecodeTimer``; then ``rounds`` rounds each time ``reps``
  steps of every pair in turn, so load changes on a shared machine hit all
  pairs alike. The median over all ``rounds * reps`` steps is reported.

  Args:
    pairs: (stage, context) pairs.
    preset: model size preset.
    reps: timed steps per pair and round.
    rounds: interleaved rounds.
    warmup: untimed steps after the cache fill.
    vocab_size: vocabulary V.
    seed: init and token seed.

  Returns:
    One dict per pair: ``{stage, preset, context, max_len, reps, rounds,
    ms_per_token, ms_min, ms_round_medians}``.
  """
  if reps < 1 or rounds < 1:
    raise ValueError(f"reps and rounds must be >= 1, got {reps} and {rounds}")
  timers = [DecodeTimer(s, preset, c, warmup=warmup, vocab_size=vocab_size, seed=seed)
            for s, c in pairs]
  times = [[] for _ in timers]
  for _ in range(rounds):
    for t, acc in zip(timers, times):
      acc.append(t.time_steps(reps))
  return [dict(stage=t.stage, preset=preset, context=t.context, max_len=t.max_len, reps=reps,
               rounds=rounds, ms_per_token=statistics.median(sum(acc, [])) * 1e3,
               ms_min=min(sum(acc, [])) * 1e3,
               ms_round_medians=[statistics.median(r) * 1e3 for r in acc])
          for t, acc in zip(timers, times)]


def targets(train_rows, decode_rows) -> dict:
  """The issue's CPU targets, evaluated on measured rows (None where not measured)."""
  by = {(r["stage"], r["seq_len"]): r["step_s"] for r in train_rows}
  dec = {(r["stage"], r["context"]): r["ms_per_token"] for r in decode_rows}
  out = {}
  a, b = by.get(("koopman_attn", 4096)), by.get(("transformer", 4096))
  if a and b:
    out["koopman_attn_step_T4096_over_transformer"] = a / b
    out["koopman_attn_step_T4096_le_0.5x"] = bool(a / b <= 0.5)
  lo, hi = dec.get(("koopman_attn", 256)), dec.get(("koopman_attn", 4096))
  if lo and hi:
    out["koopman_attn_decode_4096_over_256"] = hi / lo
    out["koopman_attn_decode_4096_le_1.2x"] = bool(hi / lo <= 1.2)
  lo, hi = dec.get(("transformer", 256)), dec.get(("transformer", 4096))
  if lo and hi:
    out["transformer_decode_4096_over_256"] = hi / lo
  return out


def as_markdown(train_rows, decode_rows, tg, device: str, date: str, load=None,
                overrides=None) -> str:
  """The benchmark as markdown tables (train: per stage and T; decode: per context)."""
  head = f"device: {device}; date: {date}"
  if load is not None:
    head += f"; load average at start: {', '.join(str(x) for x in load)}"
  if overrides:
    head += "; train overrides: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
  lines = [head]
  peaks = any(r.get("device_peak_bytes") is not None for r in train_rows)
  if train_rows:
    lines += ["", "| stage | T | batch | step (s) | tokens/s | memory (MiB) |"
              + (" device peak (MiB) |" if peaks else ""),
              "|---|---|---|---|---|---|" + ("---|" if peaks else "")]
  mib = lambda b: "—" if b is None else f"{b / 2**20:.1f}"
  for r in train_rows:
    line = (f"| {r['stage']} | {r['seq_len']} | {r['batch_size']} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {mib(r['memory_bytes'])} |")
    if peaks:  # a peak that did not rise in this row is an earlier row's
      rose = r.get("device_peak_is_this_call")
      line += (f" {mib(r.get('device_peak_bytes'))} |" if rose or rose is None
               else f" <= {mib(r.get('device_peak_bytes'))} (earlier row's) |")
    lines.append(line)
  if train_rows:
    lines.append(f"\nmemory: {train_rows[0]['memory_measure']}")
    if peaks:
      lines.append("device peak: peak_bytes_in_use of the process, including what earlier "
                   "rows left live; where it did not rise, this row's own peak is at most that")
  if decode_rows:
    lines += ["", "| stage | context | ms / token (median) | min |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['context']} | {r['ms_per_token']:.3f} | {r['ms_min']:.3f} |"
              for r in decode_rows]
    lines.append("\ndecode: each step decodes position C with C tokens in the cache "
                 "(max_seq_len C + 1)")
  if tg:
    lines += ["", "targets: " + ", ".join(
        f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in tg.items())]
  return "\n".join(lines)
