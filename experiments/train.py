r"""Trains one stage: ``python -m experiments.train --stage=koopman_attn --workdir=runs/s3``.

Re-running the same command on the same ``--workdir`` resumes from its latest
checkpoint. A SIGINT/SIGTERM saves a checkpoint and exits with status 130 (as an
interrupted ``experiments.progressive`` does), so ``train && evaluate`` stops there. The
progressive protocol (QSF spec D12)::

  python -m experiments.train --stage=fnet --workdir=runs/s1
  python -m experiments.train --stage=koopman --workdir=runs/s2 --init_from=runs/s1
  python -m experiments.train --stage=koopman_attn --workdir=runs/s3 --init_from=runs/s2
  python -m experiments.train --stage=hamiltonian_attn --workdir=runs/s4 --init_from=runs/s2
"""

from __future__ import annotations

from absl import flags

from qsf_jax.training import cli
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.loop import train_and_evaluate
from qsf_jax.training.sharding import maybe_initialize_distributed


def define_flags(fv: flags.FlagValues) -> None:
  """The training flags (defaults: QSF spec §4.1 and decisions D10-D14)."""
  d = TrainConfig(stage="koopman_attn")
  s, i = flags.DEFINE_string, flags.DEFINE_integer
  s("stage", "koopman_attn", "Model stage (fnet, koopman, koopman_attn, hamiltonian_attn, "
    "transformer, wave, gla).", flag_values=fv)
  s("preset", d.preset, "Model size preset (tiny, small, paper).", flag_values=fv)
  s("data", d.data, "auto | tinystories | synthetic | PATH (.txt/.jsonl/.parquet or folder).",
    flag_values=fv)
  s("tokenizer", d.tokenizer, "gpt2 | bytes.", flag_values=fv)
  s("tokenizer_file", None, "Local r50k_base.tiktoken for gpt2 (sha256-checked).",
    flag_values=fv)
  s("cache_dir", None, "Token-cache folder (default $QSF_CACHE_DIR or ~/.cache/qsf_jax).",
    flag_values=fv)
  s("data_mode", d.data_mode, "story (one story per row, D13) | packed.", flag_values=fv)
  i("max_train_stories", None, "Use only the first N training stories (D13: 500000).",
    flag_values=fv)
  s("workdir", None, "Run folder: checkpoints, metrics.jsonl, tb/.", flag_values=fv)
  i("steps", None, "Optimizer updates in this stage (default: the preset's; paper 20000, "
    "small 500, tiny 100).", flag_values=fv)
  i("batch_size", None, "Global batch size in sequences (default: the preset's; paper 32, "
    "small 16, tiny 8).", flag_values=fv)
  i("seq_len", None, "Tokens per sequence (default: the model's max_seq_len).", flag_values=fv)
  i("seed", d.seed, "Seed of init, step RNG and batch order.", flag_values=fv)
  s("init_from", None, "Previous stage's run folder for the progressive hand-off (D12).",
    flag_values=fv)
  i("eval_batches", d.eval_batches, "Validation batches per evaluation (0: whole split).",
    lower_bound=0, flag_values=fv)
  i("sample_tokens", d.sample_tokens, "Tokens of the D14 sample at each evaluation (0: none).",
    flag_values=fv)
  cli.define_run_flags(fv)
  s("coordinator_address", None, "Multi-host: host:port of process 0.", flag_values=fv)
  i("num_processes", None, "Multi-host: number of processes.", flag_values=fv)
  i("process_id", None, "Multi-host: this process's index.", flag_values=fv)
  cli.define_common(fv)


def config_from_flags(fv: flags.FlagValues) -> TrainConfig:
  """Builds the ``TrainConfig`` from parsed flags."""
  if not fv.workdir:
    raise flags.Error("--workdir is required")
  return TrainConfig(
      stage=fv.stage, preset=fv.preset, data=fv.data, tokenizer=fv.tokenizer,
      tokenizer_file=fv.tokenizer_file, cache_dir=fv.cache_dir, data_mode=fv.data_mode,
      max_train_stories=fv.max_train_stories, steps=fv.steps, batch_size=fv.batch_size,
      seq_len=fv.seq_len, seed=fv.seed, init_from=fv.init_from,
      eval_batches=fv.eval_batches or None, sample_tokens=fv.sample_tokens,
      **cli.run_kwargs(fv))


def execute(fv: flags.FlagValues) -> int:
  cfg = config_from_flags(fv)
  maybe_initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
  result = train_and_evaluate(cfg, fv.workdir)
  # An interrupted run (SIGINT/SIGTERM; its checkpoint is saved) exits like
  # experiments.progressive, with 130, so `train && evaluate` stops there.
  return 130 if result.interrupted else 0


def run(argv) -> int:
  """Runs the entry point in-process on ``argv``; returns the exit status."""
  return cli.run(define_flags, execute, argv)


if __name__ == "__main__":
  cli.main(define_flags, execute)
