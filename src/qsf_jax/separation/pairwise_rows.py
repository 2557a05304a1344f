"""The sweep rows of T_N, the pairwise-phase task (wave-function spec §2.3-2.5).

  complex_hardcoded    the explicit construction of spec §2.4 (no training)
  realified_hardcoded  its realification, dimension 2N, quadratic readout
  complex              complex Cayley model, dimension N, Born readout, all learned
  complex_fixed_povm   the same with the task's POVM as a fixed readout
  complex_fixed_dynamics  the explicit dynamics of spec §2.4, fixed, with a learned
                       Born readout (is the readout alone learnable?)
  realified            real SO(2N) dynamics + learned quadratic readout (control)
  real                 real SO(D) dynamics + affine-softmax readout, for each D

"complex" and "complex_fixed_dynamics" run once per readout rank r (POVM
elements of rank <= r, ``models.ModelConfig``); rows with r > 1 are named
"complex_r{r}" and "complex_r{r}_fixed_dynamics". "complex" also runs once per
complex dimension n of ``complex_dims`` (default N); a row with n != N gets the
suffix "_d{n}", e.g. "complex_r2_d8" (more dimensions than the explicit model needs).
"""

from __future__ import annotations

import jax.numpy as jnp

from qsf_jax.separation import construction, models, train
from qsf_jax.tasks.separation import SeparationTask, num_outcomes, povm_vectors

MODEL_NAMES = ("complex_hardcoded", "realified_hardcoded", "complex", "complex_fixed_povm",
               "complex_fixed_dynamics", "realified", "real")
DEFAULT_READOUT_RANKS = (1, 2)


def default_dims(N: int) -> tuple:
  """Real state dimensions from N to past N^2: {N, 2N, N^2, K-1, 2K}, K = 2N(N-1) (spec §2.5).

  K - 1 is the rank of the centred log-target, where the Eckart-Young bound
  first reaches zero (for N >= 3 it exceeds N^2); 2K probes whether extra
  dimensions beyond the bound let cue-driven orthogonal dynamics reach zero.
  """
  K = num_outcomes(N)
  return tuple(sorted({N, 2 * N, N * N, K - 1, 2 * K}))


def hardcoded_rows(task: SeparationTask):
  """The explicit rows: (row name, builder(task, dtype=...), real dimension, readout rank)."""
  return [("complex_hardcoded", construction.hardcoded_complex, 2 * task.N, 1),
          ("realified_hardcoded", construction.hardcoded_realified, 2 * task.N, None)]


def learned_complex_name(r: int, n: int, N: int) -> str:
  """Row name of the all-learned complex model of readout rank r and complex dimension n."""
  return "complex" + ("" if r == 1 else f"_r{r}") + ("" if n == N else f"_d{n}")


def trained_rows(task: SeparationTask, dims, readout_ranks=DEFAULT_READOUT_RANKS,
                 complex_dims=None):
  """The trained rows for one task: (row name, model name, ModelConfig, real dimension).

  Args:
    task: the T_N instance.
    dims: real-model dimensions D.
    readout_ranks: POVM element ranks r of the learned complex rows.
    complex_dims: complex dimensions n of the all-learned "complex" rows (None: (N,)).
  """
  N = task.N
  base = dict(num_tokens=task.num_tokens, num_outcomes=task.K, eta=task.eta)
  jobs = []
  for n in complex_dims or (N,):
    for r in readout_ranks:
      mcfg = models.ModelConfig(kind="complex", dim=n, readout_rank=r, **base)
      jobs.append((learned_complex_name(r, n, N), "complex", mcfg, 2 * n))
  jobs.append(("complex_fixed_povm", "complex_fixed_povm",
               models.ModelConfig(kind="complex", dim=N, **base), 2 * N))
  for r in readout_ranks:
    suffix = "" if r == 1 else f"_r{r}"
    mcfg = models.ModelConfig(kind="complex", dim=N, readout_rank=r, **base)
    jobs.append((f"complex{suffix}_fixed_dynamics", "complex_fixed_dynamics", mcfg, 2 * N))
  jobs.append(("realified", "realified",
               models.ModelConfig(kind="realified", dim=2 * N, **base), 2 * N))
  jobs += [("real", "real", models.ModelConfig(kind="real", dim=D, **base), D) for D in dims]
  return jobs


def fixed_povm_init(mcfg, seeds, dtype):
  """Random dynamics with the T_N POVM rows m_k^dagger as a fixed readout (spec §2.3, §2.4).

  Args:
    mcfg: a "complex" ``ModelConfig`` of dimension N.
    seeds: integer seeds (S of them).
    dtype: real parameter dtype.

  Returns:
    Parameters stacked over seeds (S, ...), W_re/W_im equal to the POVM for every seed.
  """
  m_re, m_im = povm_vectors(mcfg.dim)
  params = train.init_params_for_seeds(mcfg, seeds, dtype)
  S = len(seeds)
  params["W_re"] = jnp.broadcast_to(jnp.asarray(m_re, dtype), (S,) + m_re.shape)
  params["W_im"] = jnp.broadcast_to(jnp.asarray(-m_im, dtype), (S,) + m_im.shape)
  return params


def fixed_dynamics_init(task, mcfg, seeds, dtype):
  """The explicit dynamics of spec §2.4 with a random Born readout, for every seed.

  Args:
    task: the T_N instance.
    mcfg: a "complex" ``ModelConfig`` of dimension N (any readout rank).
    seeds: integer seeds (S of them).
    dtype: real parameter dtype.

  Returns:
    Parameters stacked over seeds (S, ...): X, Y of ``construction.hardcoded_hamiltonians``
    for every seed, W_re/W_im drawn as ``models.init_params`` draws them.
  """
  X, Y = construction.hardcoded_hamiltonians(task, mcfg.dt)
  params = train.init_params_for_seeds(mcfg, seeds, dtype)
  S = len(seeds)
  params["X"] = jnp.broadcast_to(jnp.asarray(X, dtype), (S,) + X.shape)
  params["Y"] = jnp.broadcast_to(jnp.asarray(Y, dtype), (S,) + Y.shape)
  return params


def row_init(kind: str, task: SeparationTask, mcfg, seeds, dtype):
  """(initial parameters stacked over seeds or None, frozen parameter names) of a trained row."""
  if kind == "complex_fixed_povm":
    return fixed_povm_init(mcfg, seeds, dtype), ("W_re", "W_im")
  if kind == "complex_fixed_dynamics":
    return fixed_dynamics_init(task, mcfg, seeds, dtype), ("X", "Y")
  return None, ()
