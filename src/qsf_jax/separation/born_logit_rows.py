"""The sweep rows of the Born-logit task (wave-function spec §2.6).

  complex_hardcoded  the complex N-dimensional Born-logit model (``adjoint.hardcoded_born_logit``)
  real_hardcoded     the real adjoint-representation model of dimension D*
                     (``adjoint.hardcoded_adjoint``), affine-softmax readout
  complex            complex Cayley model, dimension N, Born-logit head, all learned
                     (one row per readout rank r; "complex_r{r}" for r > 1), and per
                     complex dimension n of ``complex_dims`` ("_d{n}" for n != N)
  complex_fixed_head the head fixed to the explicit one (W = sqrt(beta) M, b = 0),
                     dynamics learned (are the dynamics alone learnable?)
  complex_fixed_dynamics  the explicit dynamics, fixed, with a learned head of each
                     readout rank r ("complex_r{r}_fixed_dynamics" for r > 1)
  real               real SO(D) dynamics + affine-softmax readout, for each D

D* = N(N-1) for phase contexts and N^2 - 1 for generic ones: the Eckart-Young
bound of spec §2.5 is positive below D* and zero from D* on.
"""

from __future__ import annotations

import jax.numpy as jnp

from qsf_jax.separation import adjoint, models, train
from qsf_jax.separation.pairwise_rows import learned_complex_name
from qsf_jax.tasks.born_logit import BornLogitTask

MODEL_NAMES = ("complex_hardcoded", "real_hardcoded", "complex", "complex_fixed_head",
               "complex_fixed_dynamics", "real")


def default_dims(task: BornLogitTask) -> tuple:
  """Real state dimensions around the exact one: {N, 2N, D* - 1, D*, 2 D*} (spec §2.6)."""
  N, D = task.N, task.exact_real_dim
  return tuple(sorted({N, 2 * N, D - 1, D, 2 * D}))


def hardcoded_rows(task: BornLogitTask):
  """The explicit rows: (row name, builder(task, dtype=...), real dimension, readout rank)."""
  return [("complex_hardcoded", adjoint.hardcoded_born_logit, 2 * task.N, None),
          ("real_hardcoded", adjoint.hardcoded_adjoint, task.exact_real_dim, None)]


def trained_rows(task: BornLogitTask, dims, readout_ranks=(1,), complex_dims=None):
  """The trained rows: (row name, model name, ``ModelConfig``, real dimension).

  Args:
    task: the Born-logit task.
    dims: real-model dimensions D.
    readout_ranks: ranks r of the learned complex heads' forms.
    complex_dims: complex dimensions n of the all-learned "complex" rows (None: (N,)).
  """
  N = task.N
  base = dict(num_tokens=task.num_tokens, num_outcomes=task.K)
  cfg = lambda r, n=N: models.ModelConfig(kind="born_logit", dim=n, readout_rank=r, **base)
  name = lambda r, suffix: ("complex" if r == 1 else f"complex_r{r}") + suffix
  rows = [(learned_complex_name(r, n, N), "complex", cfg(r, n), 2 * n)
          for n in complex_dims or (N,) for r in readout_ranks]
  rows.append(("complex_fixed_head", "complex_fixed_head", cfg(1), 2 * task.N))
  rows += [(name(r, "_fixed_dynamics"), "complex_fixed_dynamics", cfg(r), 2 * task.N)
           for r in readout_ranks]
  rows += [("real", "real", models.ModelConfig(kind="real", dim=D, **base), D) for D in dims]
  return rows


def row_init(kind: str, task: BornLogitTask, mcfg, seeds, dtype):
  """(initial parameters stacked over seeds or None, frozen parameter names) of a trained row.

  complex_fixed_head: random dynamics, the explicit head sqrt(beta) M, b = 0 (frozen);
  complex_fixed_dynamics: the explicit dynamics (frozen), a random head of rank r.
  """
  if kind not in ("complex_fixed_head", "complex_fixed_dynamics"):
    return None, ()
  explicit, _ = adjoint.hardcoded_born_logit(task, dt=mcfg.dt, dtype=dtype)
  params = train.init_params_for_seeds(mcfg, seeds, dtype)
  names = ("W_re", "W_im", "b") if kind == "complex_fixed_head" else ("X", "Y")
  for k in names:
    params[k] = jnp.broadcast_to(explicit[k], (len(seeds),) + explicit[k].shape)
  return params, names
