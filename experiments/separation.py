"""The separation experiment (wave-function spec §2): complex N vs real orthogonal D on T_N.

Trains the complex unitary Cayley model (Born readout), the realified control
and real orthogonal models with an affine-softmax readout on the pairwise-phase
disambiguation family T_N, then writes ``results.json`` and
``separation.png`` into ``--out`` and prints a summary table. ``--task=born_logit``
runs the tight variant of spec §2.6 instead (softmax of the Born probabilities;
exact real dimension D* = N(N-1), or N^2 - 1 with ``--contexts=generic``).

  python -m experiments.separation --out=runs/separation
  python -m experiments.separation --N=3,4 --dims=3,6,9,11 --steps=1000 --seeds=2 --out=runs/sep_small
  python -m experiments.separation --task=born_logit --out=runs/separation_born_logit
  python -m experiments.separation --task=born_logit --models=complex --readout_ranks=1 \
      --complex_dims=N,N+1,2N --seeds=16 --out=runs/born_logit_complex_dims
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

from absl import flags

from qsf_jax.training import cli


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum("task", "pairwise", ["pairwise", "born_logit"], "pairwise: T_N "
                    "(spec §2.3); born_logit: its tight Born-logit variant (spec §2.6)",
                    flag_values=fv)
  flags.DEFINE_enum("contexts", "phase", ["phase", "generic"], "context states of the "
                    "born_logit task: phase (those of T_N; D* = N(N-1)) or generic (random cue "
                    "Hamiltonians; D* = N^2 - 1, needs N >= 3)", flag_values=fv)
  flags.DEFINE_float("beta", None, "inverse temperature of the born_logit targets (> 0); "
                     "default K", flag_values=fv)
  flags.DEFINE_list("N", ["3", "4", "5"], "numbers of latent senses N (integers >= 2)",
                    flag_values=fv)
  flags.DEFINE_list("dims", [], "real-model state dimensions D (integers >= 1); empty: "
                    "{N, 2N, N^2, K-1, 2K} with K = 2N(N-1) for each N (pairwise), "
                    "{N, 2N, D*-1, D*, 2D*} (born_logit)", flag_values=fv)
  flags.DEFINE_integer("steps", 4000, "Adam steps per model", flag_values=fv)
  flags.DEFINE_integer("seeds", 3, "seeds per model (0 .. seeds-1); a seed's result agrees "
                       "to rounding across --seeds >= 2, not with --seeds=1 (another float32 "
                       "program)", flag_values=fv)
  flags.DEFINE_float("lr", 0.02, "peak learning rate (cosine decay to 1% of it)",
                     flag_values=fv)
  flags.DEFINE_float("eta", 0.1, "target unsharpness, in (0, 1) (pairwise task)",
                     flag_values=fv)
  flags.DEFINE_integer("num_cues", 8, "number of cue tokens A", flag_values=fv)
  flags.DEFINE_integer("length", 3, "cues per context L", flag_values=fv)
  flags.DEFINE_integer("task_seed", 0, "seed of the cue phases", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "training dtype", flag_values=fv)
  flags.DEFINE_list("readout_ranks", ["1", "2"], "ranks r of the elements of the learned "
                    "complex readouts (1 = the spec's rank-one POVM, or the plain Born-logit "
                    "head); one 'complex' and one 'complex_fixed_dynamics' row per r",
                    flag_values=fv)
  flags.DEFINE_list("complex_dims", ["N"], "complex dimensions n of the all-learned complex "
                    "rows: integers or expressions in N such as N, N+1, 2N (rows with n != N "
                    "are named complex_d<n>, complex_r2_d<n>)", flag_values=fv)
  flags.DEFINE_list("models", [], "models to run (empty: all): complex_hardcoded, "
                    "realified_hardcoded, complex, complex_fixed_povm, complex_fixed_dynamics, "
                    "realified, real (pairwise); complex_hardcoded, real_hardcoded, complex, "
                    "complex_fixed_head, complex_fixed_dynamics, real (born_logit)",
                    flag_values=fv)
  flags.DEFINE_string("out", "runs/separation", "output directory", flag_values=fv)
  cli.define_common(fv)


def parse_int_list(name: str, values) -> tuple:
  """Parses a list flag of integers; raises ``ValueError`` naming the flag."""
  out = []
  for v in values:
    try:
      out.append(int(str(v).strip()))
    except ValueError:
      raise ValueError(f"--{name} must be a comma-separated list of integers, got {v!r}") from None
  return tuple(out)


def config_from_flags(fv: flags.FlagValues):
  """Builds and validates the ``SweepConfig``; raises ``ValueError`` on bad flags."""
  from qsf_jax.separation.sweep import SweepConfig, validate_config
  Ns = parse_int_list("N", fv.N)
  if not Ns:
    raise ValueError("--N must list at least one integer")
  dims = parse_int_list("dims", fv.dims) or None
  ranks = parse_int_list("readout_ranks", fv.readout_ranks)
  if not ranks:
    raise ValueError("--readout_ranks must list at least one integer")
  names = tuple(m.strip() for m in fv.models) or None
  unused = ("eta",) if fv.task == "born_logit" else ("contexts", "beta")
  given = [f"--{name}" for name in unused if fv[name].present]
  if given:
    raise ValueError(f"{', '.join(given)} does not apply to --task={fv.task}")
  cfg = SweepConfig(Ns=Ns, dims=dims, steps=fv.steps, seeds=fv.seeds, lr=fv.lr,
                    eta=fv.eta, num_cues=fv.num_cues, length=fv.length,
                    task_seed=fv.task_seed, dtype=fv.dtype, readout_ranks=ranks,
                    models=names, task=fv.task, contexts=fv.contexts, beta=fv.beta,
                    complex_dims=tuple(d.strip() for d in fv.complex_dims))
  try:
    validate_config(cfg)
  except ValueError as e:
    raise ValueError(f"invalid flags: {e}") from None
  return cfg


def execute(fv: flags.FlagValues, argv) -> int:
  cfg = config_from_flags(fv)
  import jax
  if cfg.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  from qsf_jax.separation import plot, sweep

  out = pathlib.Path(fv.out)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # e.g. --out names an existing file
    raise ValueError(f"--out={fv.out}: cannot create the output folder ({e})") from None
  start = time.perf_counter()
  results = sweep.run_sweep(cfg, log=lambda s: print(s, flush=True))
  results["command"] = " ".join(["python -m experiments.separation"] + list(argv[1:]))
  results["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
  plot.plot_results(results, str(out / "separation.png"))
  results["total_wall_seconds"] = time.perf_counter() - start
  bad = [f"N={r['N']} {r['model']} D={r['dim']}" for r in results["runs"]
         if not all(math.isfinite(v) for v in r["kl"])]
  if bad:
    print(f"warning: {len(bad)} row(s) have a non-finite KL (training diverged: lower --lr): "
          f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; written as null",
          file=sys.stderr, flush=True)
  with open(out / "results.json", "w") as f:
    json.dump(cli.finite_json(results), f, indent=1, allow_nan=False)
  print()
  print(sweep.summary_table(results))
  print(f"\nwall time {results['total_wall_seconds']:.1f} s; wrote {out / 'results.json'} "
        f"and {out / 'separation.png'}")
  return 0


def run(argv) -> int:
  """Runs the experiment in-process on ``argv``; returns the exit status."""
  return cli.run(define_flags, lambda fv: execute(fv, argv), argv)


if __name__ == "__main__":
  cli.main(define_flags, lambda fv: execute(fv, sys.argv))
