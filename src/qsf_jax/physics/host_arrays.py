"""Host-side argument checks of the spectral tools, which run in float64 on the
host (decision D15): a concrete real array as float64 numpy, a tolerance as a
python float. Shared by ``spectral``, ``koopman_log``, ``layer`` and
``projectors``.
"""

from __future__ import annotations

import jax
import numpy as np


def refuse_tracer(name: str, x) -> None:
  """Refuses a tracer by name: the host-side tools need concrete values."""
  if isinstance(x, jax.core.Tracer):
    raise ValueError(
        f"{name} is traced (under jax.jit, vmap or grad), but this function runs on the "
        "host in float64 and returns numbers to read, not to differentiate: call it "
        "outside the transformation, on concrete arrays")


def host_real(name: str, x) -> np.ndarray:
  """Converts a finite real numeric array-like (numpy or jax) to float64 numpy.

  A tracer (the argument of a function under jit, vmap or grad) is refused by
  name: the spectral tools run on the host and return numbers to read.
  """
  if x is None:
    raise ValueError(f"{name} must be an array, got None")
  refuse_tracer(name, x)
  arr = np.asarray(x)
  if np.iscomplexobj(arr):
    raise ValueError(
        f"{name} must be real (got dtype {arr.dtype}): a Koopman matrix is a real map")
  if arr.dtype.kind in "bOSUMm":
    raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
  try:
    arr = arr.astype(np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}") from e
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} has non-finite entries (NaN or inf)")
  return arr


def _nonneg(name: str, t) -> float:
  """A finite real number >= 0 as a python float, else ``ValueError``."""
  try:
    v = float(t)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a finite number >= 0, got {t!r}") from e
  if not (np.isfinite(v) and v >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {t!r}")
  return v
