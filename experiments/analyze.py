r"""Analyses a Koopman checkpoint: ``python -m experiments.analyze --workdir=runs/s3``.

Writes ``report.md``, PNG figures and ``spectrum.json`` into ``--out`` (default
``WORKDIR/analysis``): the float64 spectrum of every layer's Koopman matrix
(QSF Fig. 2 analogue, eqs. 4-9), alpha over training (Fig. 1), hidden-state
norm statistics (D9), G_eff (eq. 11), the tokens occupying the largest-|lambda|
modes, and the propagators (eqs. 57-58, exact form) and SSE (eq. 43) of one
trained layer. Works for the stages koopman, koopman_attn and
hamiltonian_attn; any other run folder, or one without a checkpoint, is a
one-line error with a non-zero exit status.
"""

from __future__ import annotations

import os

# The host linear algebra (eig, slogdet, logm of d x d matrices, d <= 320) gains
# little from several BLAS threads and loses much when the cores are shared
# with XLA's own thread pool or other processes; one thread unless set.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import flags

from qsf_jax.analysis.pipeline import analyze_workdir
from qsf_jax.training import cli


def define_flags(fv: flags.FlagValues) -> None:
  """The analysis flags."""
  s, i = flags.DEFINE_string, flags.DEFINE_integer
  s("workdir", None, "Run folder written by experiments.train (Stage II-IV).", flag_values=fv)
  s("out", None, "Output folder (default: WORKDIR/analysis).", flag_values=fv)
  s("data", None, "Validation data (default: the run's own).", flag_values=fv)
  i("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  i("max_sequences", 64, "Validation sequences for the hidden-state statistics.",
    flag_values=fv)
  i("batch_size", 8, "Sequences per forward pass.", flag_values=fv)
  i("sentence_tokens", 48, "Tokens of the sentence the propagators are applied to.",
    flag_values=fv)
  i("exact_tokens", 12, "Tokens (evenly spaced) on which the exact propagator is evaluated "
    "(one (2d+2)-square matrix exponential each).", flag_values=fv)
  i("layer", None, "Layer for the propagators and the SSE (default: the largest spectral "
    "radius among layers with a real log K, or among all layers if none has one).",
    flag_values=fv)
  i("sse_paths", 32, "SSE ensemble size.", flag_values=fv)
  i("sse_steps", 0, "SSE Euler-Maruyama steps per token interval (0: as many as a stable "
    "explicit step needs, 200 to 5000).", flag_values=fv)
  i("seed", 0, "SSE noise seed, in [0, 2^32).", flag_values=fv)
  s("tokenizer_file", None, "Local r50k_base.tiktoken for gpt2 runs.", flag_values=fv)
  s("cache_dir", None, "Token-cache folder (default: the run's).", flag_values=fv)
  flags.DEFINE_bool("commutator", False, "Also report logm K, its (H, D) split and "
                    "||[H, D]|| per layer (one matrix logarithm per layer).", flag_values=fv)
  cli.define_attn_impl(fv)
  cli.define_common(fv)


def execute(fv: flags.FlagValues) -> int:
  if not fv.workdir:
    raise flags.Error("--workdir is required")
  for name in ("max_sequences", "batch_size", "sentence_tokens", "exact_tokens", "sse_paths"):
    if getattr(fv, name) < 1:
      raise flags.Error(f"--{name} must be >= 1, got {getattr(fv, name)}")
  if fv.sse_steps < 0:
    raise flags.Error(f"--sse_steps must be >= 0 (0: automatic), got {fv.sse_steps}")
  analyze_workdir(fv.workdir, out=fv.out, data=fv.data, step=fv.step,
                  max_sequences=fv.max_sequences, batch_size=fv.batch_size,
                  sentence_tokens=fv.sentence_tokens, exact_tokens=fv.exact_tokens,
                  layer=fv.layer, sse_paths=fv.sse_paths,
                  sse_steps=fv.sse_steps or None, seed=fv.seed, tokenizer_file=fv.tokenizer_file,
                  cache_dir=fv.cache_dir, commutator=fv.commutator, attn_impl=fv.attn_impl,
                  log=lambda msg: print(msg, flush=True))
  return 0


def run(argv) -> int:
  """Runs the entry point in-process on ``argv``; returns the exit status."""
  return cli.run(define_flags, execute, argv)


if __name__ == "__main__":
  cli.main(define_flags, execute)
