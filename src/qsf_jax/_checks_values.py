"""Trace-time checks of argument values: scalars, finite and positive numbers,
time steps, and the structure of matrices (Hermitian, unitary, covariance).

A concrete value is checked where it is given; a tracer (inside ``jax.jit``)
passes unchecked, except for shapes, which are static. Part of the input
validation in ``qsf_jax._checks``, which re-exports every public name here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _concrete(value) -> np.ndarray | None:
  """``value`` as a numpy array, or None for a tracer (not checkable at trace time)."""
  try:
    v = np.asarray(value)
  except Exception:  # a tracer
    return None
  return None if v.dtype == object else v


def _real(name: str, value, v: np.ndarray) -> np.ndarray:
  """``v`` if it holds real numbers; a complex, string or boolean value is an error."""
  if v.dtype == np.bool_ or not (jnp.issubdtype(v.dtype, jnp.floating)  # bfloat16 too
                                 or jnp.issubdtype(v.dtype, jnp.integer)):
    raise ValueError(f"{name} must be a real number, got {value!r} (dtype {v.dtype})")
  return v


def check_scalar(name: str, value) -> None:
  """Raises ``ValueError`` unless ``value`` is a scalar (tracers too: shapes are static).

  A per-dimension array where the equations take one number would broadcast
  against the matrices it scales and give a wrong result without an error.
  """
  shape = np.shape(value)
  if shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {shape}")


def check_positive(name: str, value) -> None:
  """Raises ``ValueError`` for a concrete value that is not > 0 (+inf allowed; tracers pass)."""
  v = _concrete(value)
  if v is None:
    return
  v = _real(name, value, v)
  if np.any(~np.isfinite(v)) and not np.all(np.isinf(v) & (v > 0)):
    raise ValueError(f"{name} must be finite and > 0, got {value}")
  if np.any(v <= 0):
    raise ValueError(f"{name} must be > 0, got {value}")


def check_time_step(name: str, value) -> None:
  """Raises ``ValueError`` unless ``value`` is a scalar, and (when concrete) finite and > 0.

  The shape is checked for tracers too: an array time step would broadcast
  against the matrices it scales and give wrong results without an error.
  """
  check_scalar(name, value)
  v = _concrete(value)
  if v is not None and not (np.isfinite(_real(name, value, v)) and v > 0):
    raise ValueError(f"{name} must be > 0 and finite, got {value}")


def check_covariance(name: str, value) -> None:
  """Raises ``ValueError`` for a concrete matrix that is not symmetric positive semi-definite.

  Tolerances are relative to the largest entry: asymmetry up to 1e-6 and
  eigenvalues down to -1e-6 times it pass (rounding of a computed covariance).
  Tracers pass unchecked.
  """
  v = _concrete(value)
  if v is None:
    return
  v = v.astype(np.float64)
  scale = float(np.max(np.abs(v))) if v.size else 0.0
  if not np.all(np.isfinite(v)):
    raise ValueError(f"{name} must be finite, got non-finite entries")
  if np.max(np.abs(v - np.swapaxes(v, -1, -2)), initial=0.0) > 1e-6 * scale:
    raise ValueError(f"{name} must be a symmetric covariance matrix, got an asymmetric one")
  lo = float(np.min(np.linalg.eigvalsh(v), initial=0.0)) if v.size else 0.0
  if lo < -1e-6 * scale:
    raise ValueError(f"{name} must be positive semi-definite, got an eigenvalue {lo:.3g}")


def _structure_tol(v: np.ndarray) -> float:
  """sqrt(eps) of ``v``'s precision: rounding passes, a wrong structure does not."""
  dt = v.real.dtype if np.issubdtype(v.dtype, np.inexact) else np.float64
  return float(np.sqrt(np.finfo(dt).eps))


def check_hermitian(name: str, value, *, anti: bool = False) -> None:
  """Raises ``ValueError`` for a concrete matrix (batch) that is not finite and Hermitian.

  max |X - X^dagger| (or |X + X^dagger| with ``anti``, for an antisymmetric /
  anti-Hermitian X) may be at most sqrt(eps) times max |X|, eps that of the
  input's precision. Tracers pass unchecked.
  """
  v = _concrete(value)
  if v is None or v.size == 0:
    return
  if not np.all(np.isfinite(v)):
    raise ValueError(f"{name} has non-finite entries (NaN or inf)")
  vh = np.conj(np.swapaxes(v, -1, -2))
  dev = float(np.max(np.abs(v + vh if anti else v - vh)))
  scale = float(np.max(np.abs(v)))
  if dev > _structure_tol(v) * scale:
    kind = "antisymmetric (A^T = -A)" if anti else "Hermitian (H^dagger = H)"
    raise ValueError(f"{name} must be {kind}, but max |deviation| = {dev:.3g} for max |entry| "
                     f"{scale:.3g}")


def check_unitary(name: str, value, *, no_minus_one: bool = False) -> None:
  """Raises ``ValueError`` for a concrete matrix (batch) that is not finite and unitary.

  max |U^dagger U - I| may be at most sqrt(eps) (input precision). With
  ``no_minus_one`` the condition number of I + U must also stay below
  1/sqrt(eps): an eigenvalue at (or rounding-close to) -1 has no inverse
  Cayley image. Tracers pass unchecked.
  """
  v = _concrete(value)
  if v is None or v.size == 0:
    return
  if not np.all(np.isfinite(v)):
    raise ValueError(f"{name} has non-finite entries (NaN or inf)")
  tol = _structure_tol(v)
  w = v.astype(np.complex128)
  eye = np.eye(v.shape[-1])
  dev = float(np.max(np.abs(np.conj(np.swapaxes(w, -1, -2)) @ w - eye)))
  if dev > tol:
    raise ValueError(f"{name} must be unitary, but max |U^dagger U - I| = {dev:.3g}")
  if no_minus_one:
    cond = float(np.max(np.linalg.cond(eye + w)))
    if not cond <= 1.0 / tol:
      raise ValueError(
          f"{name} has an eigenvalue at or near -1 (cond(I + U) = {cond:.3g} > "
          f"{1.0 / tol:.3g}): the inverse Cayley map H = -(2i/dt)(I - U)(I + U)^-1 "
          "does not exist there")


def check_token_ids(name: str, ids, vocab_size: int) -> None:
  """Raises ``ValueError`` for concrete ids outside 0..vocab_size-1 (tracers pass).

  jnp indexing would clamp or wrap them silently.
  """
  v = _concrete(ids)
  if v is not None and v.size and (v.min() < 0 or v.max() >= vocab_size):
    raise ValueError(f"{name} has ids in [{v.min()}, {v.max()}], outside the vocabulary "
                     f"0..{vocab_size - 1}")


def check_finite(name: str, value) -> None:
  """Raises ``ValueError`` for a concrete array with a NaN or inf entry (tracers pass)."""
  v = _concrete(value)
  if v is None:
    return
  if not np.all(np.isfinite(v)):
    raise ValueError(f"{name} must be finite; it has {int(np.sum(~np.isfinite(v)))} "
                     f"non-finite entries of {v.size}")


def check_finite_nonneg(name: str, value) -> None:
  """Raises ``ValueError`` for a concrete value that is not a finite scalar >= 0."""
  v = _concrete(value)
  if v is None:
    return
  if v.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
  if not np.isfinite(_real(name, value, v)) or v < 0:
    raise ValueError(f"{name} must be finite and >= 0, got {value}")


def check_overflow(value, message) -> None:
  """Raises ``ValueError(message)`` for a concrete result with a non-finite entry.

  For quantities the functions compute from valid inputs that can still
  overflow the working precision (dt/sigma_m^2, a covariance of a fast-growing
  mode); ``message`` (a string, or a function giving one, called only on
  failure) says which argument to change. Tracers pass.
  """
  v = _concrete(value)
  if v is not None and not np.all(np.isfinite(v)):
    raise ValueError(message() if callable(message) else message)


def obs_precision_message(dt, sigma_m, dtype) -> str:
  """The error for r = dt/sigma_m^2 overflowing ``dtype``."""
  return (f"dt/sigma_m^2 overflows {jnp.dtype(dtype).name} (dt={dt}, sigma_m={sigma_m}): "
          "use a larger sigma_m (jnp.inf switches the measurement off) or float64")


def koopman_cov_message(dtype) -> str:
  """The error for a Koopman covariance that overflowed ``dtype``."""
  return (f"the Koopman covariance Sigma_K overflowed {jnp.dtype(dtype).name}: A has a mode "
          "that grows too fast over dt for this precision (Sigma_K grows like e^{2 Re(lambda) "
          "dt}); use float64 or a shorter dt")
