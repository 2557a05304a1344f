r"""Runs the QSF progressive protocol and writes a Table-2-style report.

  python -m experiments.progressive --workdir=runs/progressive [--preset=small]

Trains I (fnet) -> II (koopman) -> III (koopman_attn) and IV (hamiltonian_attn,
from II), plus the transformer baseline (QSF spec D12), each in
``--workdir/<stage>``; re-running the same command resumes. Writes
``table2.md`` and ``table2.json`` (parameters, val loss, perplexity, tokens
evaluated, steps, training wall time, a D14 sample per stage, and the paper's
reported figures beside ours) and ``loss_curves.png`` (training and
validation loss of every stage), for the stages of this invocation: a
``--stages`` subset rewrites them with that subset's rows. ``--include=wave,gla``
adds those stages (from scratch). The optimiser, checkpoint and ``--override`` flags of
``experiments.train`` apply to every stage (runs stored before D10's momentum
cycle resume with ``--nocycle_momentum``). Exit status 130 when a SIGINT/SIGTERM stopped a stage (its
checkpoint is saved; the same command resumes).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from qsf_jax.analysis.history import loss_curves, read_metrics
from qsf_jax.analysis.plots_dynamics import plot_stage_losses
from qsf_jax.training import cli
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.table2 import run_progressive


def define_flags(fv: flags.FlagValues) -> None:
  s, i = flags.DEFINE_string, flags.DEFINE_integer
  s("workdir", None, "Folder for the per-stage run folders and the tables.", flag_values=fv)
  s("preset", "small", "Model size preset (tiny, small, paper).", flag_values=fv)
  s("data", "auto", "auto | tinystories | synthetic | PATH.", flag_values=fv)
  s("tokenizer", "gpt2", "gpt2 | bytes.", flag_values=fv)
  s("tokenizer_file", None, "Local r50k_base.tiktoken for gpt2 (sha256-checked).",
    flag_values=fv)
  s("cache_dir", None, "Token-cache folder.", flag_values=fv)
  s("data_mode", "story", "story (one story per row, D13) | packed.", flag_values=fv)
  i("max_train_stories", None, "Use only the first N training stories (D13: 500000; "
    "default: all).", flag_values=fv)
  i("steps", None, "Steps per stage (default: the preset's).", flag_values=fv)
  i("batch_size", None, "Global batch size (default: the preset's).", flag_values=fv)
  i("seq_len", None, "Tokens per sequence (default: the model's maximum).", flag_values=fv)
  i("seed", 0, "Seed of every stage.", flag_values=fv)
  i("eval_batches", None, "Validation batches for the table (default or 0: the whole "
    "split).", lower_bound=0, flag_values=fv)
  i("sample_tokens", 40, "Tokens per D14 sample (0: none).", flag_values=fv)
  flags.DEFINE_list("stages", None, "Protocol stages to run (default: fnet, koopman, "
                    "koopman_attn, hamiltonian_attn, transformer).", flag_values=fv)
  flags.DEFINE_list("include", [], "Extra stages trained from scratch: wave, gla.",
                    flag_values=fv)
  cli.define_run_flags(fv)  # every stage's optimiser, checkpoints and --override
  cli.define_common(fv)


def execute(fv: flags.FlagValues) -> int:
  if not fv.workdir:
    raise flags.Error("--workdir is required")
  base = TrainConfig(stage="koopman_attn", preset=fv.preset, data=fv.data,
                     tokenizer=fv.tokenizer, tokenizer_file=fv.tokenizer_file,
                     cache_dir=fv.cache_dir, data_mode=fv.data_mode,
                     max_train_stories=fv.max_train_stories, steps=fv.steps,
                     batch_size=fv.batch_size, seq_len=fv.seq_len, seed=fv.seed,
                     sample_tokens=fv.sample_tokens, **cli.run_kwargs(fv))
  table = run_progressive(base, fv.workdir, stages=fv.stages, include=fv.include,
                          eval_batches=fv.eval_batches or None)
  print(f"wrote {fv.workdir}/table2.md and table2.json ({len(table['rows'])} stages)")
  if table["rows"]:
    curves = {r["stage"]: loss_curves(read_metrics(os.path.join(fv.workdir, r["stage"])))
              for r in table["rows"]}
    path = os.path.join(fv.workdir, "loss_curves.png")
    plot_stage_losses(curves, title=f"progressive training, preset {fv.preset}", path=path)
    print(f"wrote {path}")
  if table["interrupted"]:
    print(f"interrupted during {table['interrupted']}; run the same command again to resume",
          file=sys.stderr)
    return 130
  return 0


def run(argv) -> int:
  """Runs the entry point in-process on ``argv``; returns the exit status."""
  return cli.run(define_flags, execute, argv)


if __name__ == "__main__":
  cli.main(define_flags, execute)
