r"""Samples from a run folder through the recurrent decode path.

``python -m experiments.sample --workdir=runs/s3 --prompt="Once upon a time," --max_new_tokens=40``
prints the prompt followed by the generated text (defaults: QSF spec D14,
temperature 0.8, top-k 50). An empty prompt starts from ``<|endoftext|>``; a
``--top_k`` of the vocabulary size or more keeps every token; the prompt's tokens
plus ``--max_new_tokens`` less one (the last new token is never read) must fit the
model's context (``max_seq_len``); the
seed is in [0, 2^32). ``--beta`` samples an annealed stage (QSF D5) at another
normalisation-anneal weight than its checkpoint's, as ``experiments.evaluate``
scores it: ``--beta=0`` with plain LayerNorm.
"""

from __future__ import annotations

from absl import flags

from qsf_jax.training import cli
from qsf_jax.training.sampling import sample_workdir


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Run folder written by experiments.train.", flag_values=fv)
  flags.DEFINE_string("prompt", "Once upon a time,", "Text to continue.", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 40, "Tokens to generate.", flag_values=fv)
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).", flag_values=fv)
  flags.DEFINE_integer("top_k", 50, "Sample among the k most likely tokens.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  flags.DEFINE_string("tokenizer_file", None, "Local r50k_base.tiktoken for gpt2 runs.",
                      flag_values=fv)
  flags.DEFINE_float("beta", None, "Normalisation-anneal weight in [0, 1] (QSF D5; default: "
                     "the checkpoint's own; 0 samples with LayerNorm).", flag_values=fv)
  cli.define_attn_impl(fv)
  cli.define_common(fv)


def execute(fv: flags.FlagValues) -> int:
  if not fv.workdir:
    raise flags.Error("--workdir is required")
  text = sample_workdir(fv.workdir, fv.prompt, max_new_tokens=fv.max_new_tokens,
                        temperature=fv.temperature, top_k=fv.top_k, seed=fv.seed,
                        step=fv.step, tokenizer_file=fv.tokenizer_file,
                        attn_impl=fv.attn_impl, beta=fv.beta)
  print(fv.prompt + text, flush=True)
  return 0


def run(argv) -> int:
  """Runs the entry point in-process on ``argv``; returns the exit status."""
  return cli.run(define_flags, execute, argv)


if __name__ == "__main__":
  cli.main(define_flags, execute)
