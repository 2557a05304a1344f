r"""The restart test of a run folder: ``python -m experiments.context_use --workdir=RUN``.

For the targets at ``--positions=lo:hi`` of the validation rows, the model is fed only
the last k inputs before each target as a fresh row (``--contexts``), and the mean
cross entropy is compared with the whole row's and with a unigram model of the run's
training split (``qsf_jax.training.context_use``). Prints a markdown table, then as its
last line one JSON object: ``targets``, ``positions`` (the first and last target
position scored, both inclusive, where ``--positions`` excludes hi), ``restart`` ({k: nats}),
``whole_row``, ``unigram``, ``step``, ``stage``, ``data``, ``trained_on``, ``beta`` and
``batch_size``.
``--out=FILE.npz`` keeps each target's losses, token id, row and position.
"""

from __future__ import annotations

import json

from absl import flags

from qsf_jax.training import cli
from qsf_jax.training.context_use import context_use_workdir, markdown_table


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_evaluation_flags(fv)
  flags.DEFINE_list("contexts", ["1", "2", "4", "8", "16", "32", "64"],
                    "Window lengths k: the last k inputs before each target.", flag_values=fv)
  flags.DEFINE_string("positions", None, "Target positions lo:hi (lo <= t < hi <= the row "
                      "length; lo: runs to the end of the row). Default: from the largest k "
                      "to the end of the row.", flag_values=fv)
  flags.DEFINE_string("out", None, "Write the per-target arrays to this .npz file.",
                      flag_values=fv)
  cli.define_common(fv)


def parse_positions(text: str | None):
  """``"lo:hi"`` -> (lo, hi); ``"lo:"`` -> (lo, None), the end of the row; None -> None."""
  if text is None:
    return None
  lo, sep, hi = text.partition(":")
  try:
    if not sep:
      raise ValueError
    return int(lo), (int(hi) if hi.strip() else None)
  except ValueError:
    raise flags.Error(f"--positions expects lo:hi or lo:, got {text!r}") from None


def execute(fv: flags.FlagValues) -> int:
  if not fv.workdir:
    raise flags.Error("--workdir is required")
  try:
    contexts = [int(k) for k in fv.contexts]
  except ValueError:
    raise flags.Error(f"--contexts expects integers, got {','.join(fv.contexts)!r}") from None
  rec = context_use_workdir(fv.workdir, contexts=contexts,
                            positions=parse_positions(fv.positions), data=fv.data,
                            step=fv.step, max_batches=fv.eval_batches or None,
                            batch_size=fv.batch_size, tokenizer_file=fv.tokenizer_file,
                            cache_dir=fv.cache_dir, beta=fv.beta, attn_impl=fv.attn_impl,
                            out=fv.out)
  print(markdown_table(rec), flush=True)
  print(json.dumps(cli.finite_json(rec), allow_nan=False), flush=True)
  return 0


def run(argv) -> int:
  """Runs the entry point in-process on ``argv``; returns the exit status."""
  return cli.run(define_flags, execute, argv)


if __name__ == "__main__":
  cli.main(define_flags, execute)
