"""Trace-time input validation shared by the whole library.

Every public function validates its arguments with these helpers before any
computation, so that a bad input fails at trace time with a ``ValueError`` that
names the argument and its shape, instead of broadcasting silently.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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
