"""Shared plumbing of the absl entry points in ``experiments/``.

Each entry point defines its flags on a fresh ``flags.FlagValues`` (so several
can be imported and run in one process, e.g. in tests) and runs through
``main``: user errors (bad flags, missing data, a wrong tokenizer file, a
foreign checkpoint, a non-finite loss) are printed as one line on stderr with
a non-zero exit status instead of a traceback.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import pathlib
import sys
from typing import Callable, Sequence

from absl import app, flags
import numpy as np

from qsf_jax.training import checkpoint_noise

# Exceptions that mean "the user asked for something that cannot be done".
USER_ERRORS = (ValueError, OSError, ConnectionError, FloatingPointError, flags.Error)
EXIT_USER_ERROR = 1
# Each prints the entry point's flags (absl's parse errors suggest --helpshort).
HELP_FLAGS = ("-h", "-help", "--help", "-helpshort", "--helpshort", "-helpfull", "--helpfull")


def parse_overrides(items: Sequence[str] | None) -> tuple:
  """Parses ``name=value`` strings; values are Python literals, else strings.

  ``true`` and ``false`` in any case are the booleans (as on most command lines).
  Example: ``["max_seq_len=64", "attn_scale=none", "ffn_bias=false"]`` gives
  ``(("max_seq_len", 64), ("attn_scale", "none"), ("ffn_bias", False))``.
  """
  out = []
  for item in items or ():
    name, sep, raw = item.partition("=")
    if not sep or not name.strip():
      raise ValueError(f"--override expects name=value, got {item!r}")
    if raw.strip().lower() in ("true", "false"):
      value = raw.strip().lower() == "true"
    else:
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        value = raw
    out.append((name.strip(), value))
  return tuple(out)


def prepare_output_file(flag: str, path) -> pathlib.Path:
  """Makes the folder of an output file before a long run, so the result is not lost.

  Args:
    flag: the flag's name for errors, e.g. "--out".
    path: the output file.

  Raises:
    ValueError: ``path`` is a folder, or its folder cannot be made or written to.
  """
  p = pathlib.Path(path)
  if not str(path) or p.is_dir():
    raise ValueError(f"{flag}={path} is a folder; give a file path such as {p / 'results.json'}")
  try:
    p.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"{flag}={path}: cannot create the folder {p.parent} ({e})") from None
  if not os.access(p.parent, os.W_OK):
    raise ValueError(f"{flag}={path}: the folder {p.parent} is not writable")
  return p


def error_line(prog: str, e: BaseException) -> str:
  msg = str(e).strip().replace("\n", " ") or type(e).__name__
  return f"{prog}: error: {msg}"


def finite_json(x):
  """``x`` with numpy values as Python ones and NaN/inf floats as None (strict JSON).

  For ``json.dumps(..., allow_nan=False)``: bare NaN tokens are not JSON, and
  other readers refuse them.
  """
  if isinstance(x, dict):
    return {str(k): finite_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite_json(v) for v in x]
  if isinstance(x, np.ndarray):
    return finite_json(x.tolist())
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, (float, np.floating)):
    v = float(x)
    return v if math.isfinite(v) else None
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def run(define_flags: Callable[[flags.FlagValues], None],
        execute: Callable[[flags.FlagValues], int], argv: Sequence[str]) -> int:
  """Parses ``argv`` into fresh flags and executes; returns the exit status.

  While it runs, ``keep_log_record`` filters the absl logger (orbax's chatter).

  Args:
    define_flags: defines the entry point's flags on a ``FlagValues``.
    execute: runs the program from parsed flags, returns an exit status.
    argv: the command line, ``argv[0]`` being the program name.
  """
  prog = (argv[0] if argv else "qsf").rsplit("/", 1)[-1]
  fv = flags.FlagValues()
  define_flags(fv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(fv.get_help())
    return 0
  traceback = "--traceback" in argv[1:]
  logger = logging.getLogger("absl")
  logger.addFilter(keep_log_record)
  try:
    rest = fv(list(argv), known_only=True)
    rest = flags.FLAGS(rest)  # absl's own flags (e.g. --verbosity); rejects unknown ones
    if len(rest) > 1:
      raise flags.Error(f"unexpected positional arguments {rest[1:]}")
    return execute(fv)
  except USER_ERRORS as e:
    if traceback:
      raise
    print(error_line(prog, e), file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    return 130
  finally:
    logger.removeFilter(keep_log_record)


def keep_log_record(record: logging.LogRecord) -> bool:
  """Log filter of the entry points: drops orbax's INFO chatter and read-only notices."""
  if "/orbax/" not in record.pathname:
    return True
  if record.levelno < logging.WARNING:
    return False  # every checkpoint phase is logged at INFO
  if record.exc_info:
    # a failed background save logs its traceback from each of its threads (over 300
    # lines for one full disk); the error reaches the main thread, which prints it once
    return False
  return record.levelno >= logging.ERROR or not any(
      n in record.getMessage() for n in checkpoint_noise.READ_ONLY_NOTICES)


def main(define_flags, execute) -> None:
  """``app.run`` wrapper: absl logging set up, then ``run`` and exit."""
  argv = list(sys.argv)

  def _main(_):
    sys.exit(run(define_flags, execute, argv))

  app.run(_main, argv=[argv[0]], flags_parser=lambda a: flags.FLAGS(a[:1]))


def define_common(fv: flags.FlagValues) -> None:
  """Flags every entry point has."""
  flags.DEFINE_bool("traceback", False, "Show the full traceback of errors.", flag_values=fv)


def define_evaluation_flags(fv: flags.FlagValues) -> None:
  """The run, checkpoint and validation-data flags of the entry points that evaluate a
  run folder (``evaluate``, ``context_use``): ``open_evaluation``'s arguments."""
  flags.DEFINE_string("workdir", None, "Run folder written by experiments.train.", flag_values=fv)
  flags.DEFINE_string("data", None, "Validation data (default: the run's own).", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  flags.DEFINE_integer("eval_batches", None, "Use only the first N validation batches "
                       "(default or 0: all).", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Rows per batch (default: the run's).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_string("tokenizer_file", None, "Local r50k_base.tiktoken for gpt2 runs.",
                      flag_values=fv)
  flags.DEFINE_string("cache_dir", None, "Token-cache folder (default: the run's).",
                      flag_values=fv)
  flags.DEFINE_float("beta", None, "Normalisation-anneal weight in [0, 1] (QSF D5; default: "
                     "the checkpoint's own; 0 evaluates with LayerNorm).", flag_values=fv)
  define_attn_impl(fv)


def define_attn_impl(fv: flags.FlagValues) -> None:
  """``--attn_impl`` of the entry points that load a trained run."""
  from qsf_jax.kernels import IMPLS  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("attn_impl", None, list(IMPLS),
                    "Linear-attention impl to run the model with (default: the run's own; "
                    "a run trained with 'pallas' loads with 'auto' where there is no GPU). "
                    "Every impl computes the same function.", flag_values=fv)


def define_run_flags(fv: flags.FlagValues) -> None:
  """The optimisation, precision, checkpoint and model-override flags of a training run.

  Shared by ``experiments.train`` and ``experiments.progressive`` (which applies
  them to every stage); ``run_kwargs`` turns them into ``TrainConfig`` fields.
  """
  from qsf_jax.training.config import TrainConfig  # pylint: disable=g-import-not-at-top
  d = TrainConfig(stage="koopman_attn")
  i, f = flags.DEFINE_integer, flags.DEFINE_float
  i("checkpoint_every", None, "Checkpoint period in steps (0: end only; default: the preset's).",
    flag_values=fv)
  i("eval_every", None, "Validation period in steps (0: end only; default: the preset's).",
    flag_values=fv)
  i("log_every", d.log_every, "Progress-line period in steps.", flag_values=fv)
  i("max_to_keep", d.max_to_keep, "Checkpoints kept.", flag_values=fv)
  f("lr", d.lr, "OneCycle peak learning rate (D10).", flag_values=fv)
  f("weight_decay", d.weight_decay, "AdamW weight decay on matrices (D11).", flag_values=fv)
  f("clip_norm", d.clip_norm, "Global gradient-norm clip.", flag_values=fv)
  flags.DEFINE_bool("cycle_momentum", d.cycle_momentum,
                    "Cycle Adam's b1 0.95 -> 0.85 -> 0.95 against the learning rate, as "
                    "PyTorch's OneCycleLR does by default (D10); runs stored before it "
                    "resume with --nocycle_momentum.", flag_values=fv)
  i("grad_accum", d.grad_accum, "Micro-batches per update.", flag_values=fv)
  flags.DEFINE_string("dtype", None, "Compute dtype: float32 | bfloat16 (default: the "
                      "preset's).", flag_values=fv)
  flags.DEFINE_multi_string("override", [], "Model config override name=value (repeatable), "
                            "e.g. --override=max_seq_len=64.", flag_values=fv)


def run_kwargs(fv: flags.FlagValues) -> dict:
  """The ``TrainConfig`` fields of the flags ``define_run_flags`` defines."""
  return dict(checkpoint_every=fv.checkpoint_every, eval_every=fv.eval_every,
              log_every=fv.log_every, max_to_keep=fv.max_to_keep, lr=fv.lr,
              weight_decay=fv.weight_decay, clip_norm=fv.clip_norm,
              cycle_momentum=fv.cycle_momentum, grad_accum=fv.grad_accum, dtype=fv.dtype,
              model_overrides=parse_overrides(fv.override))
