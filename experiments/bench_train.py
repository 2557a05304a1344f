r"""Training throughput, step memory and decode latency per stage.

  python -m experiments.bench_train [--out=runs/bench_train.json] [--stages=...]
      [--seq_lens=256,1024,4096] [--preset=small] [--batch_size=1] [--steps=5]
      [--decode_stages=koopman_attn,transformer] [--decode_contexts=256,4096]
      [--override=attn_pallas_design=bv64_w8_s3_chunkbwd ...]

Prints a markdown table and writes JSON: tokens/s and the memory of one train
step per stage at each T (same d and L; the preset's context raised to T), and
the per-token decode latency at context 256 vs 4096 for ``koopman_attn`` and
``transformer`` (cache filled to the context through ``decode=True``, then the
median of single-token steps at position C, each with C tokens in the cache;
the stages and contexts timed in interleaved rounds). Memory is XLA's compiled
memory analysis of the train step; on a GPU the table adds the device's
process-wide peak, marked where an earlier row set it. The JSON is rewritten
after every train row, so a failure late in a long run keeps the rows before it.
``--override`` changes the model configuration of the train rows, e.g. to time
training with another Pallas design of the linear-attention kernels (decoding
runs the token recurrence and ignores it).
"""

from __future__ import annotations

import datetime
import json
import os

from absl import flags
import jax

from qsf_jax.models.config import PRESETS, STAGES, get_config
from qsf_jax.training import bench, cli, setup


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("out", "runs/bench_train.json",
                      "JSON output path (its folder is created).", flag_values=fv)
  flags.DEFINE_list("stages", ["fnet", "koopman", "koopman_attn", "hamiltonian_attn",
                               "transformer", "gla", "wave"], "Stages to time.", flag_values=fv)
  flags.DEFINE_list("seq_lens", ["256", "1024", "4096"], "Sequence lengths.", flag_values=fv)
  flags.DEFINE_list("decode_stages", ["koopman_attn", "transformer"],
                    "Stages whose decode latency is timed.", flag_values=fv)
  flags.DEFINE_list("decode_contexts", ["256", "4096"], "Decode contexts.", flag_values=fv)
  flags.DEFINE_integer("decode_reps", 50, "Timed decode steps per context and round.",
                       flag_values=fv)
  flags.DEFINE_integer("decode_rounds", 3, "Interleaved decode timing rounds (median over all).",
                       flag_values=fv)
  flags.DEFINE_string("preset", "small", "Model preset (tiny, small, paper).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 1, "Sequences per train step.", flag_values=fv)
  flags.DEFINE_integer("steps", 5, "Timed train steps (median).", flag_values=fv)
  flags.DEFINE_integer("vocab_size", 50257, "Vocabulary (GPT-2: 50257).", flag_values=fv)
  flags.DEFINE_multi_string("override", [], "Model config override name=value for the train "
                            "rows (repeatable), e.g. "
                            "--override=attn_pallas_design=bv64_w8_s3_chunkbwd.",
                            flag_values=fv)
  cli.define_common(fv)


def _ints(name, values):
  try:
    out = [int(v) for v in values]
  except ValueError as e:
    raise flags.Error(f"--{name} takes integers, got {values}") from e
  if not out or min(out) < 1:
    raise flags.Error(f"--{name} needs positive integers, got {values}")
  return out


def execute(fv: flags.FlagValues) -> int:
  for s in list(fv.stages) + list(fv.decode_stages):
    if s not in STAGES:
      raise flags.Error(f"unknown stage {s!r}; choose from {list(STAGES)}")
  seq_lens, contexts = _ints("seq_lens", fv.seq_lens), _ints("decode_contexts", fv.decode_contexts)
  for name in ("batch_size", "steps", "decode_reps", "decode_rounds"):
    if getattr(fv, name) < 1:
      raise flags.Error(f"--{name} must be >= 1, got {getattr(fv, name)}")
  if fv.preset not in PRESETS:
    raise flags.Error(f"unknown preset {fv.preset!r}; choose from {list(PRESETS)}")
  overrides = dict(cli.parse_overrides(fv.override))
  if overrides and not fv.stages:
    raise flags.Error("--override changes the train rows' model, and --stages is empty")
  bench.check_overrides(overrides)
  for stage in fv.stages:  # bad names or values fail here, before anything is timed
    setup.check_attn_backend(get_config(stage, fv.preset, **overrides))
  out = cli.prepare_output_file("--out", fv.out)
  device = bench.device_description()
  load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  train_rows, decode_rows, tg = [], [], {}

  def save():  # after every row, so a failure late in a long run keeps the rows before it
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(dict(device=device, date=date, jax=jax.__version__,
                                   load_avg_at_start=load, overrides=overrides,
                                   train=train_rows, decode=decode_rows, targets=tg), indent=1))
    os.replace(tmp, out)

  for stage in fv.stages:
    for T in seq_lens:
      r = bench.train_throughput(stage, fv.preset, T, batch_size=fv.batch_size, steps=fv.steps,
                                 vocab_size=fv.vocab_size, overrides=overrides)
      print(f"train {stage:<17} T={T:<5} {r['step_s']:.3f} s/step {r['tokens_per_s']:.0f} tok/s",
            flush=True)
      train_rows.append(r)
      save()
  pairs = [(stage, C) for stage in fv.decode_stages for C in contexts]
  if pairs:
    decode_rows = bench.decode_latencies(pairs, fv.preset, reps=fv.decode_reps,
                                         rounds=fv.decode_rounds, vocab_size=fv.vocab_size)
  for r in decode_rows:
    print(f"decode {r['stage']:<16} context={r['context']:<5} {r['ms_per_token']:.3f} ms/token",
          flush=True)
  tg = bench.targets(train_rows, decode_rows)
  save()
  print("\n" + bench.as_markdown(train_rows, decode_rows, tg, device, date, load, overrides))
  return 0


def run(argv) -> int:
  """Runs the entry point in-process on ``argv``; returns the exit status."""
  return cli.run(define_flags, execute, argv)


if __name__ == "__main__":
  cli.main(define_flags, execute)
