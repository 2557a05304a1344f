r"""Evaluates a run folder: ``python -m experiments.evaluate --workdir=runs/s3``.

Prints progress, then as its last line one JSON object with ``val_loss`` (mean
token cross entropy in nats), ``perplexity`` (= e^val_loss, QSF spec D13),
``tokens``, ``batches``, ``step``, ``stage``, ``data``, ``trained_on``, ``beta``
(the normalisation-anneal weight it was evaluated at; ``--beta`` overrides the
checkpoint's) and ``batch_size`` (rows per batch: ``--batch_size``, or the run's,
at most the split's rows; the same on any number of devices). ``--per_token`` adds ``per_token``: the median, the maximum and the
tokens above ``--outlier_nats``, and how many of them follow an input that never
occurs in the run's training rows (``qsf_jax.training.token_losses``);
``--per_token_out=FILE.npz`` also keeps each token's cross entropy, row and position.
The JSON is strict: a loss that overflowed (NaN or inf) is written as ``null``.
"""

from __future__ import annotations

import json

from absl import flags

from qsf_jax.training import cli
from qsf_jax.training.evaluation import evaluate_workdir


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_evaluation_flags(fv)
  flags.DEFINE_bool("per_token", False, "Also summarise the per-token cross entropies "
                    "(outliers, unseen inputs); a second pass over the batches.",
                    flag_values=fv)
  flags.DEFINE_float("outlier_nats", 20.0, "Per-token outlier threshold in nats.",
                     flag_values=fv)
  flags.DEFINE_string("per_token_out", None, "Write the per-token arrays to this .npz "
                      "file (implies --per_token).", flag_values=fv)
  cli.define_common(fv)


def execute(fv: flags.FlagValues) -> int:
  if not fv.workdir:
    raise flags.Error("--workdir is required")
  rec = evaluate_workdir(fv.workdir, data=fv.data, step=fv.step,
                         max_batches=fv.eval_batches or None,
                         batch_size=fv.batch_size, tokenizer_file=fv.tokenizer_file,
                         cache_dir=fv.cache_dir, beta=fv.beta, attn_impl=fv.attn_impl,
                         per_token=fv.per_token, outlier_nats=fv.outlier_nats,
                         per_token_out=fv.per_token_out)
  # strict JSON: an overflowing perplexity (or loss) is null, not Infinity
  rec = cli.finite_json(rec)
  print(json.dumps(rec, allow_nan=False), flush=True)
  return 0


def run(argv) -> int:
  """Runs the entry point in-process on ``argv``; returns the exit status."""
  return cli.run(define_flags, execute, argv)


if __name__ == "__main__":
  cli.main(define_flags, execute)
