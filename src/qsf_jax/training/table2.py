"""The progressive protocol and its Table-2 report (QSF spec D12, §4.2).

  I (fnet, scratch) -> II (koopman, from I) -> III (koopman_attn, from II)
                                           -> IV (hamiltonian_attn, from II)
  plus the transformer baseline (scratch), each in ``workdir/<stage>``.

Every stage trains through ``train_and_evaluate`` and so resumes exactly where
it stopped (a finished stage is a no-op); the report evaluates each final
checkpoint on the validation split and samples with the D14 settings. The
training wall time of each stage is summed over invocations in
``workdir/wall_times.json``, each added when its ``train_and_evaluate``
returns (a SIGINT/SIGTERM included): the time of an invocation killed outright
(SIGKILL, an out-of-memory kill) is lost.

The tables are rewritten by each invocation and hold its stages only, so a
``--stages`` subset writes a table of that subset.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from qsf_jax.models.config import EXECUTION_FIELDS, STAGES, get_config
from qsf_jax.models.lm import build_model
from qsf_jax.models.params import PAPER_TABLE2, count_params, paper_param_counts
from qsf_jax.training import setup
from qsf_jax.training.checkpoint import Checkpointer, has_checkpoint
from qsf_jax.training.cli import finite_json
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.errors import TrainConfigError
from qsf_jax.training.evaluation import evaluate_workdir
from qsf_jax.training.loop import train_and_evaluate
from qsf_jax.training.restore import load_run
from qsf_jax.training.sampling import new_token_room, sample_text

# stage -> the stage it is initialised from (None: scratch), in running order.
PROTOCOL = (("fnet", None), ("koopman", "fnet"), ("koopman_attn", "koopman"),
            ("hamiltonian_attn", "koopman"), ("transformer", None))
EXTRA_STAGES = ("wave", "gla")  # optional, trained from scratch
WALL_TIMES = "wall_times.json"
COLUMNS = ("stage", "init_from", "params", "params_paper_preset", "paper_params", "val_loss",
           "perplexity", "paper_val_loss", "paper_ppl", "tokens", "steps", "train_wall_s",
           "sample", "sample_tokens")


def plan(stages=None, include=()) -> list[tuple[str, str | None]]:
  """The (stage, init_from_stage) list to run, in protocol order.

  Args:
    stages: subset of the protocol's stages (None: all five). A stage whose
      parent is left out gets None here (``run_progressive`` still starts it
      from the parent's run folder when that holds a checkpoint).
    include: extra stages (``wave``, ``gla``), appended, from scratch.

  Raises:
    TrainConfigError: an unknown stage (listing the choices) or nothing to run.
  """
  names = [s for s, _ in PROTOCOL]
  stages = names if stages is None else list(stages)
  for s in stages:
    if s in EXTRA_STAGES:
      raise TrainConfigError(f"{s!r} is not a protocol stage: add it with --include={s} "
                             "(trained from scratch)")
    if s not in names:
      raise TrainConfigError(f"unknown progressive stage {s!r}; choose from {names}")
  for s in include:
    if s not in EXTRA_STAGES:
      raise TrainConfigError(f"--include takes {list(EXTRA_STAGES)}, got {s!r}")
  if not stages and not include:
    raise TrainConfigError("no stage to run")
  chosen = [(s, p if p in stages else None) for s, p in PROTOCOL if s in stages]
  return chosen + [(s, None) for s in dict.fromkeys(include)]


# Model fields a preset sets for its scale: a run's overrides of these do not carry to
# the paper-preset count (its other overrides, e.g. ffn_dim=1280 with ffn_bias=False, do).
SIZE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "wave_dim",
               "wave_generators")


def paper_overrides(model_overrides) -> tuple:
  """The overrides of a run that shape its model at the ``paper`` preset too (sorted pairs).

  Sizes (``SIZE_FIELDS``) are the preset's; how the model is computed
  (``EXECUTION_FIELDS``, ``dtype``) does not change its parameters.
  """
  skip = SIZE_FIELDS + EXECUTION_FIELDS + ("dtype",)
  return tuple(sorted((k, v) for k, v in dict(model_overrides).items() if k not in skip))


@functools.lru_cache(maxsize=None)
def paper_preset_count(stage: str, overrides: tuple = ()) -> int:
  """Parameters of our ``stage`` model at the ``paper`` preset (V = 50257), from shapes only.

  Args:
    stage: the model stage.
    overrides: ``(name, value)`` pairs applied on top of the preset
      (``paper_overrides`` of the run's).
  """
  cfg = get_config(stage, "paper", **dict(overrides))
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return count_params(jax.eval_shape(build_model(cfg).init, jax.random.key(0), tokens)["params"])


def _load_wall_times(workdir) -> dict[str, float]:
  path = os.path.join(workdir, WALL_TIMES)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return {str(k): float(v) for k, v in json.load(f).items()}
  except (ValueError, AttributeError, TypeError) as e:
    raise ValueError(f"{path} is not a JSON object of stage -> seconds ({e}); fix or delete "
                     "it (the table's wall times then count from this invocation)") from e


def _save_wall_times(workdir, walls: dict[str, float]) -> None:
  path = os.path.join(workdir, WALL_TIMES)
  with open(path + ".tmp", "w") as f:
    json.dump(walls, f, indent=1)
  os.replace(path + ".tmp", path)


def init_label(meta: dict) -> str | None:
  """The stage a stored run was initialised from (None: scratch), from its metadata.

  Read from the run itself, not from this invocation's plan: a finished run that
  is resumed keeps the origin it was trained with (``--init_from`` is ignored
  then). Runs stored before ``init_source`` was kept fall back on their stored
  ``train_config.init_from`` folder name.
  """
  if "init_source" in meta:
    src = meta["init_source"]
    return None if src is None else src["stage"]
  path = (meta.get("train_config") or {}).get("init_from")
  return os.path.basename(os.path.normpath(path)) if path else None


def _report_row(stage, wd, base: TrainConfig, eval_batches, wall_s) -> dict:
  """Evaluates and samples one finished stage; the row of ``table2.json``.

  The D14 sample has ``base.sample_tokens`` new tokens, fewer where the
  prompt and they would not fit the model's context (``sample_tokens`` says).
  """
  ev = evaluate_workdir(wd, max_batches=eval_batches, tokenizer_file=base.tokenizer_file)
  run = load_run(wd, tokenizer_file=base.tokenizer_file)
  parent = init_label(run.meta)
  max_len = run.model_config.max_seq_len
  n_new = min(base.sample_tokens,
              new_token_room(max_len, len(run.tokenizer.encode(base.sample_prompt)) or 1))
  sample = ""
  if n_new > 0:
    sample = sample_text(run.model, run.params, run.collections, run.tokenizer,
                         base.sample_prompt, max_new_tokens=n_new, seed=base.seed,
                         temperature=base.sample_temperature, top_k=base.sample_top_k,
                         beta=run.beta, max_len=max_len)
  paper = PAPER_TABLE2.get(stage, {})
  return dict(stage=stage, init_from=parent, params=count_params(run.params),
              params_paper_preset=paper_preset_count(
                  stage, paper_overrides(base.model_overrides)),
              paper_params=paper_param_counts().get(stage), val_loss=ev["val_loss"],
              perplexity=ev["perplexity"], paper_val_loss=paper.get("val_loss"),
              paper_ppl=paper.get("ppl"), tokens=ev["tokens"], steps=run.step,
              train_wall_s=round(wall_s, 1), sample=sample, sample_tokens=max(n_new, 0))


def run_progressive(base: TrainConfig, workdir, *, stages=None, include=(),
                    eval_batches: int | None = None, log=print) -> dict:
  """Trains every stage of the protocol, then writes ``table2.md`` and ``table2.json``.

  A stage already trained to ``base.steps`` is not retrained, one stopped part
  way resumes from its latest checkpoint, and a stage whose parent was not
  selected starts from the parent's run folder if that holds a checkpoint.

  Args:
    base: settings shared by all stages (its ``stage`` and ``init_from`` are
      replaced per stage).
    workdir: the folder holding one run folder per stage.
    stages: protocol stages to run (default: all five).
    include: extra stages from ``EXTRA_STAGES``.
    eval_batches: validation batches for the table (None: the whole split).
    log: progress sink.

  Returns:
    The table as a dict: ``{"rows": [...], "settings": {...}, "interrupted": stage or None}``;
    after a SIGINT/SIGTERM only the stages finished before it have rows.
  """
  workdir = os.fspath(workdir)
  steps = plan(stages, include)  # bad stage names fail here, before any folder is made
  _check_before_training(base, workdir, [s for s, _ in steps])
  os.makedirs(workdir, exist_ok=True)
  parents = dict(PROTOCOL)
  rows, interrupted = [], None
  walls = _load_wall_times(workdir)
  for stage, parent in steps:
    assert stage in STAGES
    wd = os.path.join(workdir, stage)
    if parent is None and parents.get(stage):
      if has_checkpoint(os.path.join(workdir, parents[stage])):
        parent = parents[stage]
      elif not has_checkpoint(wd):
        log(f"warning: {stage} trains from scratch: {parents[stage]} was not selected and "
            f"{os.path.join(workdir, parents[stage])} holds no checkpoint (the D12 protocol "
            f"starts {stage} from {parents[stage]})")
    cfg = base.replace(stage=stage,
                       init_from=os.path.join(workdir, parent) if parent else None)
    log(f"== {stage}" + (f" (init from {parent})" if parent else " (scratch)"))
    t0 = time.time()
    result = train_and_evaluate(cfg, wd)
    if result.resumed_from is not None:
      probe = Checkpointer(wd, read_only=True)
      try:
        origin = init_label(probe.meta())
      finally:
        probe.close()
      if origin != parent:
        log(f"{stage} resumed a run initialised from {origin or 'scratch'}, not "
            f"{parent or 'scratch'}; the table says {origin or 'scratch'} (empty "
            f"{wd} to retrain it from {parent or 'scratch'})")
    if result.resumed_from is None or result.resumed_from < result.step:  # it trained
      # a run from step 0 (a new or emptied folder) starts its sum afresh
      earlier = 0.0 if result.resumed_from is None else walls.get(stage, 0.0)
      walls[stage] = earlier + time.time() - t0
      _save_wall_times(workdir, walls)
    if result.interrupted:
      log(f"{stage} interrupted by {result.signal}; re-run the same command to resume")
      interrupted = stage
      break
    rows.append(_report_row(stage, wd, base, eval_batches, walls.get(stage, 0.0)))
  table = dict(rows=rows, settings=dict(base.to_dict(), stage=None, init_from=None,
                                        eval_batches=eval_batches),
               interrupted=interrupted)
  with open(os.path.join(workdir, "table2.json"), "w") as f:
    json.dump(finite_json(table), f, indent=1, allow_nan=False)
  with open(os.path.join(workdir, "table2.md"), "w") as f:
    f.write(render_markdown(table))
  return table


def _check_before_training(base: TrainConfig, workdir: str, stages) -> None:
  """Every check that would stop a later stage, before the first one trains.

  The stage and preset names, the folder, the tokenizer, each stage's model
  configuration (``--override``), its attention backend and ``--seq_len``, and the
  data path: each raises before any folder is made.
  """
  for stage in stages:
    setup.check_stage_and_preset(stage, base.preset)
  setup.check_output_folder("--workdir", workdir)
  if has_checkpoint(workdir):
    raise TrainConfigError(
        f"--workdir={workdir} holds a single run's checkpoint; the progressive protocol "
        "needs a folder of its own for the stage folders")
  tokenizer = setup.load_tokenizer(base)
  for stage in stages:
    cfg = base.replace(stage=stage, init_from=None)
    mcfg = setup.make_model_config(cfg, tokenizer.vocab_size)
    setup.check_attn_backend(mcfg)
    setup.resolve_seq_len(cfg, mcfg)
  setup.check_data_path(base.data)


def _fmt(x, spec):
  return "—" if x is None else format(x, spec)


def _override_text(settings: dict) -> str:
  pairs = paper_overrides(settings.get("model_overrides") or ())
  return ", ".join(f"`{k}={v}`" for k, v in pairs)


def render_markdown(table: dict) -> str:
  """Table 2 of the QSF paper (§4.2), ours next to the paper's reported figures."""
  s = table["settings"]
  evals = "the whole validation split" if s.get("eval_batches") is None else (
      f"{s['eval_batches']} validation batches")
  out = ["# Progressive training (QSF Table 2 layout)\n",
         f"preset `{s['preset']}`, data `{s['data']}`, tokenizer `{s['tokenizer']}`, "
         + (f"first {s['max_train_stories']:,} training stories, "
            if s.get("max_train_stories") else "")
         + f"{s['steps']} steps x batch {s['batch_size']}, seed {s['seed']}; evaluated on "
         f"{evals}. *params @ paper* is our model at the `paper` preset (V = 50257)"
         + (f" with this run's {_override_text(s)}" if _override_text(s) else "")
         + ", comparable with the paper's count; the paper's columns are its full-scale "
         "TinyStories results (§4.2), for reference only.\n",
         "| stage | init from | params | params @ paper | paper params | val loss | ppl | "
         "paper val loss | paper ppl | val tokens | steps | train wall (s) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in table["rows"]:
    out.append(
        f"| {r['stage']} | {r['init_from'] or 'scratch'} | {r['params']:,} | "
        f"{r['params_paper_preset']:,} | {_fmt(r['paper_params'], ',')} | "
        f"{r['val_loss']:.4f} | {r['perplexity']:.2f} | "
        f"{_fmt(r['paper_val_loss'], '.2f')} | {_fmt(r['paper_ppl'], '.1f')} | "
        f"{r['tokens']:,} | {r['steps']} | {r['train_wall_s']:.1f} |")
  if table.get("interrupted"):
    out.append(f"\nInterrupted during `{table['interrupted']}`: re-run the same command "
               "to resume.")
  if not s["sample_tokens"]:  # --sample_tokens=0: no samples were drawn
    return "\n".join(out) + "\n"
  out.append(f"\n## Samples (D14: temperature {s['sample_temperature']}, "
             f"top-k {s['sample_top_k']}, {s['sample_tokens']} tokens)\n")
  for r in table["rows"]:
    short = (f" *({r['sample_tokens']} tokens: the model's context)*"
             if r["sample_tokens"] < s["sample_tokens"] else "")
    out.append(f"- **{r['stage']}**: {s['sample_prompt']}{r['sample']}".replace("\n", " ")
               + short)
  return "\n".join(out) + "\n"
