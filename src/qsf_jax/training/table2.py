"""The progressive protocol and its Table-2 report (QSF spec D12, §4.2).

  I (fnet, scratch) -> II (koopman, from I) -> III (koopman_attn, from II)
                                           -> IV (hamiltonian_attn, from II)
  plus the transformer baseline (scratch), each in ``workdir/<stage>``.

Every stage trains through ``train_and_evaluate`` and so resumes exactly where
it stopped (a finished stage is a no-op); the report evaluates each final
checkpoint on the validation split and samples with the D14 settings.
"""

from __future__ import annotations

import json
import os
import time

from qsf_jax.models.config import STAGES
from qsf_jax.models.params import PAPER_TABLE2, count_params
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.errors import TrainConfigError
from qsf_jax.training.evaluation import evaluate_workdir
from qsf_jax.training.loop import train_and_evaluate
from qsf_jax.training.restore import load_run
from qsf_jax.training.sampling import sample_workdir

# stage -> the stage it is initialised from (None: scratch), in running order.
PROTOCOL = (("fnet", None), ("koopman", "fnet"), ("koopman_attn", "koopman"),
            ("hamiltonian_attn", "koopman"), ("transformer", None))
EXTRA_STAGES = ("wave", "gla")  # optional, trained from scratch


def plan(stages=None, include=()) -> list[tuple[str, str | None]]:
  """The (stage, init_from_stage) list to run, in protocol order.

  Args:
    stages: subset of the protocol's stages (None: all five). A stage whose
      parent is left out starts from scratch.
    include: extra stages (``wave``, ``gla``), appended, from scratch.
  """
  names = [s for s, _ in PROTOCOL]
  stages = names if stages is None else list(stages)
  for s in stages:
    if s not in names:
      raise TrainConfigError(f"unknown progressive stage {s!r}; choose from {names}")
  for s in include:
    if s not in EXTRA_STAGES:
      raise TrainConfigError(f"--include takes {list(EXTRA_STAGES)}, got {s!r}")
  if not stages and not include:
    raise TrainConfigError("no stage to run")
  chosen = [(s, p if p in stages else None) for s, p in PROTOCOL if s in stages]
  return chosen + [(s, None) for s in include]


def run_progressive(base: TrainConfig, workdir, *, stages=None, include=(),
                    eval_batches: int | None = None, log=print) -> dict:
  """Trains every stage of the protocol, then writes ``table2.md`` and ``table2.json``.

  Args:
    base: settings shared by all stages (its ``stage`` and ``init_from`` are
      replaced per stage).
    workdir: the folder holding one run folder per stage.
    stages: protocol stages to run (default: all five).
    include: extra stages from ``EXTRA_STAGES``.
    eval_batches: validation batches for the table (None: the whole split).
    log: progress sink.

  Returns:
    The table as a dict: ``{"rows": [...], "settings": {...}}``.
  """
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for stage, parent in plan(stages, include):
    assert stage in STAGES
    wd = os.path.join(workdir, stage)
    cfg = base.replace(stage=stage,
                       init_from=os.path.join(workdir, parent) if parent else None)
    log(f"== {stage}" + (f" (init from {parent})" if parent else " (scratch)"))
    t0 = time.time()
    result = train_and_evaluate(cfg, wd)
    wall = time.time() - t0
    if result.interrupted:
      log(f"{stage} interrupted by {result.signal}; re-run the same command to resume")
      break
    ev = evaluate_workdir(wd, max_batches=eval_batches, tokenizer_file=base.tokenizer_file)
    run = load_run(wd, tokenizer_file=base.tokenizer_file)
    sample = ""
    if base.sample_tokens:
      sample = sample_workdir(wd, base.sample_prompt, max_new_tokens=base.sample_tokens,
                              temperature=base.sample_temperature, top_k=base.sample_top_k,
                              tokenizer_file=base.tokenizer_file)
    paper = PAPER_TABLE2.get(stage, {})
    rows.append(dict(stage=stage, init_from=parent, params=count_params(run.params),
                     paper_params=paper.get("params"), val_loss=ev["val_loss"],
                     perplexity=ev["perplexity"], tokens=ev["tokens"], steps=result.step,
                     paper_val_loss=paper.get("val_loss"), paper_ppl=paper.get("ppl"),
                     wall_s_this_invocation=round(wall, 1), sample=sample))
  table = dict(rows=rows, settings=dict(base.to_dict(), stage=None, init_from=None))
  with open(os.path.join(workdir, "table2.json"), "w") as f:
    json.dump(table, f, indent=1)
  with open(os.path.join(workdir, "table2.md"), "w") as f:
    f.write(render_markdown(table))
  return table


def _fmt(x, spec):
  return "—" if x is None else format(x, spec)


def render_markdown(table: dict) -> str:
  """Table 2 of the QSF paper, ours next to the paper's reported figures."""
  s = table["settings"]
  out = [f"# Progressive training (QSF Table 2 layout)\n",
         f"preset `{s['preset']}`, data `{s['data']}`, tokenizer `{s['tokenizer']}`, "
         f"{s['steps']} steps x batch {s['batch_size']}, seed {s['seed']}. The paper's "
         "columns are its full-scale TinyStories results (§4.2), for reference only.\n",
         "| stage | init from | params | paper params | val loss | ppl | paper val loss | "
         "paper ppl | val tokens | steps |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in table["rows"]:
    out.append(
        f"| {r['stage']} | {r['init_from'] or 'scratch'} | {r['params']:,} | "
        f"{_fmt(r['paper_params'], ',')} | {r['val_loss']:.4f} | {r['perplexity']:.2f} | "
        f"{_fmt(r['paper_val_loss'], '.2f')} | {_fmt(r['paper_ppl'], '.1f')} | "
        f"{r['tokens']:,} | {r['steps']} |")
  out.append("\n## Samples (D14: temperature 0.8, top-k 50)\n")
  for r in table["rows"]:
    out.append(f"- **{r['stage']}**: {s['sample_prompt']}{r['sample']}".replace("\n", " "))
  return "\n".join(out) + "\n"
