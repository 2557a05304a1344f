"""Correctness of the compiled Pallas kernels on a GPU, at production shapes.

Run as ``python -m qsf_jax.kernels.gpu_check [--quick] [--backward=chunked]
[--configs=NAME,...]`` on a machine with a GPU
(kernels spec §5.3, "GPU (when available)"). The unit tests run the same kernels
in interpret mode on CPU; this checks what only a GPU shows: Triton's own
compilation, TF32 defaults, races and out-of-bounds accesses. For each case the
Pallas forward, final state and all five gradients (random cotangents) are
compared with the "xla" impl evaluated in float32 (``precision=HIGHEST``) on the
same (upcast) inputs, using the relative RMS tolerances of spec §5.2. Each
Pallas call runs twice; results that differ between runs indicate a race.
Exits with status 1 if any check fails, and 2, checking nothing, where jax has no
GPU backend (argparse's own status for a bad flag is 2 as well).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from .candidates import PALLAS_CONFIGS, Candidate
from .chunked_xla import chunked_linear_attention
from .pallas_op import DEFAULT_BWD, DEFAULT_FWD, pallas_linear_attention
from .testing import TOL, random_inputs, rel_rms_error
from .timing import precompile

CASES = [  # (B, T, H, Dk, Dv, dtype, gate)
    (8, 4096, 8, 128, 128, "bfloat16", "medium"),
    (8, 4096, 8, 64, 64, "bfloat16", "strong"),
    (2, 4096, 4, 128, 128, "float32", "medium"),
    (2, 1000, 4, 64, 128, "float32", "weak"),
    (4, 333, 2, 96, 40, "bfloat16", "extreme"),
    (4, 1, 8, 64, 64, "float32", "medium"),
    (8, 4096, 8, 128, 128, "bfloat16", "none"),  # no decay: the QSF measurement term
]
QUICK_CASES = [CASES[1], CASES[3], CASES[5], CASES[6]]


def _grad_fn(fn):
  """Jitted value_and_grad of <o, do> + <S_T, dS> in (q, k, v, g, S0).

  Called as ``f(q, k, v, g, S0, do, dS)``. The cotangents are jit arguments, not
  closed-over constants: as constants XLA constant-folds their reshapes at
  compile time (seconds per case at T=4096). Build it once and call it twice,
  so that the race check does not compile again.
  """
  def loss(q, k, v, g, S0, do, dS):
    o, S_T = fn(q, k, v, g, S0)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S_T * dS)
  return jax.jit(jax.value_and_grad(loss, argnums=range(5)))


def check_case(B, T, H, Dk, Dv, dtype, gate, *, chunk=64, fwd_config=None, bwd_config=None,
               num_segments=1, backward="fused", forward="fused", split_sweeps=False,
               decay_grad="difference", seed=0, interpret=False, compile_workers=1):
  """Compares Pallas with the float32 "xla" impl for one case.

  Args:
    B, T, H, Dk, Dv: sizes.
    dtype: q/k/v dtype name.
    gate: gate family of ``testing.random_inputs`` ("none": no log_decay, and
      no dg).
    chunk: Pallas chunk size.
    fwd_config, bwd_config: ``KernelConfig`` of each direction, or None for the
      defaults.
    num_segments: segments of the two-level split (1 = none).
    backward: the backward design, "fused" or "chunked".
    forward: the forward design, "fused" or "chunked".
    split_sweeps: the backward's two sweeps in separate programs.
    decay_grad: the backward's dG form, "difference" or "pairs".
    seed: integer seed.
    interpret: run the kernels in interpret mode (for a CPU smoke test).
    compile_workers: > 1 compiles the case's four functions (Pallas and
      reference, forward and gradients) on that many threads first
      (``timing.precompile``).

  Returns:
    A list of (name, relative RMS error, bound) for o, S_T, dq, dk, dv, dg
    (not for gate "none") and dh0.

  Raises:
    AssertionError: if two identical Pallas runs give different results.
  """
  args = random_inputs(seed, B, T, H, Dk, Dv, dtype=jnp.dtype(dtype), gate=gate)
  rng = np.random.default_rng([seed, 1])  # a stream of its own: not seed + 1's inputs
  do = jnp.asarray(rng.standard_normal((B, T, H, Dv)).astype(np.float32))
  dS = jnp.asarray(rng.standard_normal((B, H, Dk, Dv)).astype(np.float32))
  kw = dict(interpret=interpret, num_segments=num_segments, backward=backward, forward=forward,
            split_sweeps=split_sweeps, decay_grad=decay_grad)
  kw.update({n: c for n, c in (("fwd_config", fwd_config), ("bwd_config", bwd_config)) if c})
  pallas = lambda *a: pallas_linear_attention(*a, chunk_size=chunk, return_final_state=True,
                                              **kw)
  xla = lambda *a: chunked_linear_attention(
      *(None if x is None else x.astype(jnp.float32) for x in a), chunk_size=64)
  fwd, pallas_grads = jax.jit(pallas), _grad_fn(pallas)
  xla_fwd, xla_grads = jax.jit(xla), _grad_fn(xla)
  if compile_workers > 1:
    jobs = [(f, args) for f in (fwd, xla_fwd)]
    jobs += [(f, (*args, do, dS)) for f in (pallas_grads, xla_grads)]
    for e in precompile(jobs, compile_workers):
      if e is not None:
        raise e
  o1, S1 = fwd(*args)
  o2, S2 = fwd(*args)
  (_, g1), (_, g2) = pallas_grads(*args, do, dS), pallas_grads(*args, do, dS)
  if not (np.array_equal(np.asarray(o1), np.asarray(o2))
          and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(g1, g2))):
    raise AssertionError(f"results differ between two identical runs (race?): {B, T, H, Dk, Dv}")
  o_ref, S_ref = xla_fwd(*args)
  _, g_ref = xla_grads(*args, do, dS)
  tol = TOL[dtype]
  out = [("o", rel_rms_error(o1, o_ref), tol["o"]), ("S_T", rel_rms_error(S1, S_ref), tol["o"])]
  for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), g1, g_ref):
    if a is None and b is None:  # dg without decay
      continue
    finite = bool(np.all(np.isfinite(np.asarray(a).astype(np.float32))))
    err = rel_rms_error(a, b) if finite else float("inf")
    out.append((name, err, tol["dg" if name == "dg" else "grad"]))
  return out


def build_parser() -> argparse.ArgumentParser:
  """The command line of ``python -m qsf_jax.kernels.gpu_check``."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="the QUICK_CASES only, at the default config")
  p.add_argument("--backward", default="fused", choices=("fused", "chunked"),
                 help="backward design of the cases at the default config")
  p.add_argument("--configs", default=None,
                 help="comma-separated PALLAS_CONFIGS names to check at the first case "
                      "(default: all, unless --quick)")
  p.add_argument("--compile_workers", type=int, default=1,
                 help="compile each case's Pallas and reference functions on this many "
                      "threads first (1: one after another)")
  return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> list[str]:
  """Checks the flags (no device needed); returns the configs to check at CASES[0].

  Exits through ``p.error`` on a bad flag.
  """
  if a.compile_workers < 1:
    p.error(f"--compile_workers must be >= 1, got {a.compile_workers}")
  names = a.configs.split(",") if a.configs else ([] if a.quick else sorted(PALLAS_CONFIGS))
  unknown = sorted(set(names) - set(PALLAS_CONFIGS))
  if unknown:
    p.error(f"unknown --configs {unknown}; choose from {sorted(PALLAS_CONFIGS)}")
  return names


def main(argv=None):
  p = build_parser()
  a = p.parse_args(argv)
  names = check_args(p, a)
  if jax.default_backend() != "gpu":
    print("gpu_check needs a GPU backend; found", jax.default_backend())
    return 2
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__)
  base = Candidate(64, DEFAULT_FWD, DEFAULT_BWD, backward=a.backward)
  runs = [(c, f"default, {a.backward} backward", base)
          for c in (QUICK_CASES if a.quick else CASES)]
  # benchmarked launch configurations at one production shape
  runs += [(CASES[0], n, PALLAS_CONFIGS[n]) for n in names]
  failed = 0
  for case, name, cand in runs:
    kw = cand.kwargs()
    res = check_case(*case, chunk=kw.pop("chunk_size"), compile_workers=a.compile_workers, **kw)
    bad = [(n, e, b) for n, e, b in res if not e <= b]
    failed += bool(bad)
    errs = " ".join(f"{n}={e:.1e}" for n, e, _ in res)
    print(f"{'FAIL' if bad else 'ok  '} {case} {name}: {errs}", flush=True)
  print(f"{len(runs) - failed}/{len(runs)} cases passed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
