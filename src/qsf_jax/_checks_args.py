"""Checks of plain (non-array) arguments: ints, seeds, flags, PRNG keys, choices.

Also the conversion of NumPy scalars in config fields to the plain Python
numbers their checks and JSON see. Part of the input validation in
``qsf_jax._checks``, which re-exports every public name here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._checks_values import _concrete, _real, check_scalar


def plain_number(value):
  """A NumPy scalar or 0-d array as the Python int, float or bool it holds; a 1-d
  NumPy array or a tuple/list holding NumPy scalars as a tuple/list of those; any
  other value unchanged. Config fields pass through it so that their checks and
  JSON (run metadata, results files) see plain numbers."""
  if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
    return value.item()
  if isinstance(value, np.ndarray) and value.ndim == 1:
    return tuple(value.tolist())
  if isinstance(value, (tuple, list)) and any(isinstance(v, np.generic) for v in value):
    return type(value)(v.item() if isinstance(v, np.generic) else v for v in value)
  return value


def plain_numbers(config) -> None:
  """Applies ``plain_number`` to every field of a (frozen) dataclass, in place."""
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    plain = plain_number(value)
    if plain is not value:
      object.__setattr__(config, f.name, plain)


def check_int(name: str, value, minimum: int | None = None) -> int:
  """Returns ``value`` as a Python int; ``ValueError`` unless it is an int >= ``minimum``.

  Python and NumPy integers and concrete integer scalars of jax or numpy (0-d
  arrays) pass; floats (even 2.0), booleans, strings and tracers do not, so a
  fractional count is never truncated silently.
  """
  if (isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0
      and jnp.issubdtype(value.dtype, jnp.integer) and _concrete(value) is not None):
    value = int(value)
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be a Python int, but it is traced: under jax.jit pass "
                     f"it as a static argument (static_argnames=[{name!r}])")
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def check_seed(name: str, value, key: str = "PRNG key") -> int:
  """Returns a seed as a Python int; ``ValueError`` unless it is an int in [0, 2^32).

  ``jax.random.PRNGKey``/``key`` keep 32 bits of a seed: 2^32 would give seed
  0's numbers, and a negative seed wraps too. ``key`` names the key in the error.
  """
  value = check_int(name, value, 0)
  if value >= 1 << 32:
    raise ValueError(f"{name} must be < 2^32 = {1 << 32} (the {key} holds 32 bits), "
                     f"got {value}")
  return value


def check_unit_interval(name: str, value) -> None:
  """Raises ``ValueError`` unless a concrete ``value`` is a real scalar in [0, 1] (tracers pass)."""
  check_scalar(name, value)
  v = _concrete(value)
  if v is not None and not (0.0 <= float(_real(name, value, v)) <= 1.0):
    raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def check_prng_key(name: str, key) -> None:
  """Raises ``ValueError`` unless ``key`` is one JAX PRNG key (typed, or raw uint32 (2,))."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if key.ndim != 0:
      raise ValueError(f"{name} must be a single PRNG key, got shape {tuple(key.shape)}")
    return
  if dtype != jnp.uint32 or getattr(key, "ndim", None) != 1:
    raise ValueError(
        f"{name} must be a JAX PRNG key (jax.random.key or jax.random.PRNGKey), got "
        f"{type(key).__name__} with dtype {dtype}")


def check_flag(name: str, value) -> bool:
  """Returns ``value`` as a Python bool; raises ``ValueError`` unless it is a bool.

  A truthy stand-in such as the string "no" or the int 2 is refused, not read as
  True.
  """
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be a Python bool, but it is traced: under jax.jit pass "
                     f"it as a static argument (static_argnames=[{name!r}])")
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
  return bool(value)


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
