"""Training throughput, step memory and decode latency of the model zoo.

Library half of ``python -m experiments.bench_train``: every figure is a
measurement on the current device (median wall time after compilation).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax.models.config import get_config
from qsf_jax.models.lm import build_model, init_cache
from qsf_jax.training.optim import make_optimizer, onecycle_schedule
from qsf_jax.training.state import create_train_state, init_variables
from qsf_jax.training.step import make_train_step


def _median_seconds(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _memory_bytes(compiled) -> tuple[int | None, str]:
  """Peak memory of one compiled call, and which measure it is."""
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  try:
    m = compiled.memory_analysis()
    total = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)
    return int(total), "XLA memory_analysis (temp + arguments + outputs - aliased)"
  except Exception:  # backends without memory analysis
    return None, "unavailable"


def train_throughput(stage: str, preset: str, seq_len: int, *, batch_size: int = 1,
                     steps: int = 5, vocab_size: int = 50257, seed: int = 0) -> dict:
  """Tokens/s and step memory of one jitted train step at ``seq_len``.

  The model is the preset's with ``max_seq_len`` raised to ``seq_len`` (same d, L).
  """
  cfg = get_config(stage, preset, max_seq_len=max(seq_len, get_config(stage, preset).max_seq_len),
                   vocab_size=vocab_size)
  model = build_model(cfg)
  params, collections = init_variables(model, seed, seq_len)
  total = steps + 1
  tx = make_optimizer(total)
  state = create_train_state(params, collections, tx, seed)
  step = make_train_step(model, tx, schedule=onecycle_schedule(total, 1e-3), total_steps=total,
                         anneal_frac=cfg.anneal_frac, stats_steps=cfg.stats_steps)
  tok = jax.random.randint(jax.random.PRNGKey(seed), (batch_size, seq_len + 1), 0, vocab_size)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:],
           "mask": jnp.ones((batch_size, seq_len), jnp.float32)}
  compiled = step.lower(state, batch).compile()
  mem, mem_kind = _memory_bytes(compiled)
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  holder = [state]

  def one():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics
  sec = _median_seconds(one, steps)
  return dict(stage=stage, preset=preset, seq_len=seq_len, batch_size=batch_size,
              step_s=sec, tokens_per_s=batch_size * seq_len / sec, memory_bytes=mem,
              memory_measure=mem_kind, params=int(sum(x.size for x in jax.tree.leaves(params))))


def decode_latency(stage: str, preset: str, context: int, *, max_len: int, reps: int = 20,
                   vocab_size: int = 50257, seed: int = 0) -> dict:
  """Seconds per decoded token after ``context`` tokens, through ``decode=True``.

  The cache is filled by ``context`` recurrent decode steps (one ``lax.scan``),
  then a single-token step from that cache is timed (the cache is not donated,
  so every timed call does identical work).
  """
  cfg = get_config(stage, preset, max_seq_len=max_len, vocab_size=vocab_size)
  model = build_model(cfg)
  params, collections = init_variables(model, seed, 8)
  variables = {"params": params, **collections}
  beta = 1.0 if cfg.annealed else 0.0

  @jax.jit
  def step(cache, tok_B1):
    logits, upd = model.apply({**variables, "cache": cache}, tok_B1, beta=beta, decode=True,
                              mutable=["cache"])
    return upd["cache"], logits

  @jax.jit
  def prefill(toks_N):
    def body(cache, t):
      cache, _ = step(cache, t.reshape(1, 1))
      return cache, None
    return jax.lax.scan(body, init_cache(model, 1), toks_N)[0]

  toks = jax.random.randint(jax.random.PRNGKey(seed), (context,), 0, vocab_size)
  cache = jax.block_until_ready(prefill(toks))
  nxt = toks[:1].reshape(1, 1)
  jax.block_until_ready(step(cache, nxt))
  sec = _median_seconds(lambda: step(cache, nxt), reps)
  return dict(stage=stage, preset=preset, context=context, max_len=max_len,
              ms_per_token=sec * 1e3)


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


def as_markdown(train_rows, decode_rows, tg, device: str, date: str) -> str:
  lines = [f"device: {device}; date: {date}", "",
           "| stage | T | batch | step (s) | tokens/s | memory (MiB) |", "|---|---|---|---|---|---|"]
  for r in train_rows:
    mem = "—" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.0f}"
    lines.append(f"| {r['stage']} | {r['seq_len']} | {r['batch_size']} | {r['step_s']:.3f} | "
                 f"{r['tokens_per_s']:.0f} | {mem} |")
  if train_rows:
    lines.append(f"\nmemory: {train_rows[0]['memory_measure']}")
  if decode_rows:
    lines += ["", "| stage | context | ms / token |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['context']} | {r['ms_per_token']:.3f} |" for r in decode_rows]
  if tg:
    lines += ["", "targets: " + ", ".join(
        f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in tg.items())]
  return "\n".join(lines)
