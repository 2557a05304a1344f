"""Trace-time input validation shared by the whole library.

Every public function validates its arguments with these helpers before any
computation, so that a bad input fails at trace time with a ``ValueError`` that
names the argument and its shape, instead of broadcasting silently.

This module holds the array and shape checks; the value checks
(``_checks_values``) and plain-argument checks (``_checks_args``) are
re-exported here, so every caller reaches them as ``_checks.<name>``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._checks_args import (  # noqa: F401 (re-exported)
    check_choice, check_flag, check_int, check_prng_key, check_seed, check_unit_interval,
    plain_number, plain_numbers)
from ._checks_values import (  # noqa: F401 (re-exported)
    check_covariance, check_finite, check_finite_nonneg, check_hermitian, check_overflow,
    check_positive, check_scalar, check_time_step, check_token_ids, check_unitary,
    koopman_cov_message, obs_precision_message)


def as_array(name: str, x, *, allow_complex: bool = False) -> jnp.ndarray:
  """Converts ``x`` to a jnp array; rejects complex input unless allowed.

  Args:
    name: the argument's name, used in error messages.
    x: array-like.
    allow_complex: whether complex dtypes are acceptable.
  """
  if x is None:
    raise ValueError(f"{name} must be an array, got None")
  _check_integer_range(name, x)
  try:
    arr = jnp.asarray(x)
  except (TypeError, OverflowError) as e:  # a list of mixed types; a Python int past int32
    raise ValueError(f"{name} could not be converted to an array: {e}") from e
  if not allow_complex and jnp.iscomplexobj(arr):
    raise ValueError(
        f"{name} must be real (got dtype {arr.dtype}); qsf-jax keeps every "
        "parameter real and builds complex quantities inside the computation")
  if not (jnp.issubdtype(arr.dtype, jnp.floating)
          or jnp.issubdtype(arr.dtype, jnp.complexfloating)
          or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
  return arr


def _check_integer_range(name: str, x) -> None:
  """Refuses a NumPy integer array whose values JAX's default int width cannot hold.

  Without ``jax_enable_x64``, ``jnp.asarray`` narrows int64/uint64 to 32 bits by
  wrapping, silently: token id 2**32 + 5 became the valid id 5, after which no
  range check can see it.
  """
  if not isinstance(x, (np.ndarray, np.generic)) or x.dtype.kind not in "iu" or not x.size:
    return
  target = jax.dtypes.canonicalize_dtype(x.dtype)
  if target == x.dtype:
    return
  info = np.iinfo(target)
  lo, hi = x.min(), x.max()
  if lo < info.min or hi > info.max:
    raise ValueError(
        f"{name} has integers in [{lo}, {hi}] (dtype {x.dtype}), outside {target}'s range "
        f"[{info.min}, {info.max}]: without jax_enable_x64 JAX would wrap them to 32 bits")


# Appended where an argument has more leading axes than the function takes.
VMAP_HINT = "; for a batch, map over its leading axis with jax.vmap"


def check_ndim(name: str, x, ndim: int | Sequence[int]) -> None:
  """Raises ``ValueError`` unless ``x.ndim`` is ``ndim`` (or one of them)."""
  allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
  if x.ndim not in allowed:
    raise ValueError(
        f"{name} must have {' or '.join(map(str, allowed))} dimension(s), "
        f"got shape {tuple(x.shape)}" + (VMAP_HINT if x.ndim > max(allowed) else ""))


def check_shape(name: str, x, shape: Sequence[int | None]) -> None:
  """Raises ``ValueError`` unless ``x.shape`` matches ``shape`` (None = any)."""
  if x.ndim != len(shape) or any(
      s is not None and s != xs for s, xs in zip(shape, x.shape)):
    parts = ["?" if s is None else str(s) for s in shape]
    want = "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
    batched = x.ndim > len(shape) and all(
        s is None or s == xs for s, xs in zip(shape[::-1], x.shape[::-1]))
    raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}"
                     + (VMAP_HINT if batched else ""))


def check_square(name: str, x, *, batch_dims: int | None = 0) -> int:
  """Checks that the last two axes of ``x`` are square; returns their size.

  Args:
    name: argument name for the error message.
    x: array.
    batch_dims: number of leading batch axes required (None = any number).
  """
  if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
    raise ValueError(f"{name} must be a square matrix, got shape {tuple(x.shape)}")
  if batch_dims is not None and x.ndim != 2 + batch_dims:
    raise ValueError(
        f"{name} must have {2 + batch_dims} dimensions (square matrix"
        f"{' with batch axes' if batch_dims else ''}), got shape {tuple(x.shape)}"
        + (VMAP_HINT if x.ndim > 2 + batch_dims else ""))
  return x.shape[-1]


def check_batch_axes(name: str, shape, core_ndim: int, state_name: str, state_shape) -> None:
  """Checks an operator shared by all states or batched like them.

  The wave-function functions take an operator whose last ``core_ndim`` axes
  are its own (an (N, N) Hamiltonian, a (K, N) readout) either without batch
  axes, shared by every state, or with exactly the leading axes of the
  state(s) (..., N), one operator per state.

  Args:
    name: the operator's argument name for the error message.
    shape: the operator's shape (..., *core), at least ``core_ndim`` long.
    core_ndim: number of trailing axes that belong to one operator.
    state_name: the states' argument name.
    state_shape: the states' shape (..., N).
  """
  shape, state_shape = tuple(shape), tuple(state_shape)
  batch = shape[:len(shape) - core_ndim]
  if batch and batch != state_shape[:-1]:
    raise ValueError(
        f"batched {name} of shape {shape} needs {state_name} with the same leading "
        f"axes, shape {batch + state_shape[-1:]}, got {state_shape}; pass one {name} "
        f"of shape {shape[-core_ndim:]} to share it across states")


def result_dtype(*arrays) -> jnp.dtype:
  """The common floating dtype of real arrays: float32 or float64.

  Ints and 16-bit floats (bfloat16, float16) promote to float32: the physics
  core's linear algebra (LU solves, eigendecompositions, expm) has no 16-bit
  kernels.
  """
  dt = jnp.result_type(*arrays)
  if not jnp.issubdtype(dt, jnp.inexact) or jnp.finfo(dt).bits < 32:
    dt = jnp.result_type(dt, jnp.float32)
  return dt
