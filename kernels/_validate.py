"""Trace-time validation and padding shared by every linear-attention impl.

Every impl of the op sees arrays that already passed :func:`validate_inputs`:
q, k and v share one floating dtype, all shapes agree, and the log-decay and the
initial state are real. The padding functions keep padded positions inert:
zero k and v and zero log-decay add nothing to the state (S = e^0 S + 0 0^T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax import _checks, _checks_values

_FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def compute_dtype(dtype) -> jnp.dtype:
  """The accumulation/state dtype for an input dtype: f64 for f64, else f32."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _check_float(name: str, x) -> None:
  if x.dtype not in [jnp.dtype(d) for d in _FLOATS]:
    raise ValueError(
        f"{name} must have a floating dtype (float16, bfloat16, float32 or "
        f"float64), got {x.dtype} with shape {tuple(x.shape)}")


def _check_log_decay_domain(log_decay) -> None:
  """Raises ``ValueError`` if a concrete log-decay has a NaN or an entry > 0.

  The op's domain is g <= 0, with g = -inf a full reset; a positive g (growth)
  can overflow the chunked forms, and NaN spreads to every later output.
  Tracers pass: their values are unknown at trace time.
  """
  g = _checks_values._concrete(log_decay)
  if g is None or g.size == 0:
    return
  # float64 holds every floating value exactly (bfloat16 and float16 included): a cast
  # to a narrower type would round a tiny positive g to 0 (accepting it) and overflow
  # a large negative float64 g to -inf (with a RuntimeWarning).
  g = g.astype(np.float64)
  n_nan, n_pos = int(np.isnan(g).sum()), int((g > 0).sum())
  if n_nan or n_pos:
    worst = float(np.nanmax(g)) if n_pos else float("nan")
    raise ValueError(
        f"log_decay must be <= 0 (-inf allowed: a full reset), with no NaN; got "
        f"{n_nan} NaN and {n_pos} positive entries of {g.size}"
        + (f" (largest {worst:.4g})" if n_pos else "")
        + f", shape {tuple(log_decay.shape)}")


def decay_floor(dtype) -> float:
  """The lowest log-decay the chunked impls use: 2 ln eps of the accumulation dtype.

  Args:
    dtype: the q/k/v dtype (float64 accumulates in float64, the rest in float32).

  Returns:
    -31.9 (float32 accumulation) or -72.1 (float64).
  """
  acc = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
  return 2.0 * float(np.log(jnp.finfo(acc).eps))


def floor_log_decay(log_decay, dtype):
  """``max(g, decay_floor(dtype))``, or None for None: the chunked impls' log-decay.

  A reset g = -inf then scales a term by e^{floor} (below the accumulation's
  resolution) instead of giving inf - inf = NaN in the chunk-local cumsums.
  """
  return None if log_decay is None else jnp.maximum(log_decay, decay_floor(dtype))


def validate_inputs(q, k, v, log_decay, initial_state):
  """Checks the op's arguments and returns them as arrays.

  Args:
    q: queries (B, T, H, Dk).
    k: keys (B, T, H, Dk), same dtype as q.
    v: values (B, T, H, Dv), same dtype as q.
    log_decay: per-step log-decays g <= 0 (B, T, H), or None.
    initial_state: the state entering the sequence (B, H, Dk, Dv), or None.

  Returns:
    (q, k, v, log_decay, initial_state) as jnp arrays (None stays None).

  Raises:
    ValueError: naming the argument and the shapes, for complex or non-floating
      input, wrong ranks, mismatched shapes or mismatched q/k/v dtypes, and for
      a concrete log_decay with an entry that is NaN or > 0 (traced values are
      not checked).
  """
  q = _checks.as_array("q", q)
  k = _checks.as_array("k", k)
  v = _checks.as_array("v", v)
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.check_ndim(name, x, 4)
    _check_float(name, x)
  B, T, H, Dk = q.shape
  if T < 1:
    raise ValueError(f"q must have at least one time step, got shape {tuple(q.shape)}")
  if k.shape != q.shape:
    raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
  if v.shape[:3] != (B, T, H):
    raise ValueError(
        f"v must have shape ({B}, {T}, {H}, Dv) to match q {tuple(q.shape)}, "
        f"got {tuple(v.shape)}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(
        f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype} "
        f"(shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})")
  Dv = v.shape[3]
  if log_decay is not None:
    log_decay = _checks.as_array("log_decay", log_decay)
    _check_float("log_decay", log_decay)
    _checks.check_shape("log_decay", log_decay, (B, T, H))
    _check_log_decay_domain(log_decay)
  if initial_state is not None:
    initial_state = _checks.as_array("initial_state", initial_state)
    _check_float("initial_state", initial_state)
    _checks.check_shape("initial_state", initial_state, (B, H, Dk, Dv))
  return q, k, v, log_decay, initial_state


def check_chunk_size(chunk_size, *, power_of_two: bool) -> int:
  """Validates ``chunk_size`` (a positive int; a power of two >= 16 for Pallas).

  Python and NumPy integers and concrete integer 0-d arrays are accepted; the
  result is a Python int (a static argument of the jitted kernels).
  """
  if isinstance(chunk_size, jax.core.Tracer):
    raise ValueError("chunk_size must be a Python int, but it is traced: under jax.jit pass "
                     "it as a static argument (static_argnames=['chunk_size'])")
  if (isinstance(chunk_size, (np.ndarray, jax.Array)) and chunk_size.ndim == 0
      and jnp.issubdtype(chunk_size.dtype, jnp.integer)):
    chunk_size = int(chunk_size)
  if (isinstance(chunk_size, (bool, np.bool_))
      or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  chunk_size = int(chunk_size)
  if power_of_two and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
    raise ValueError(
        f"chunk_size must be a power of two >= 16 for impl='pallas' "
        f"(Triton tile sizes), got {chunk_size}")
  return chunk_size


def pad_axis(x, axis: int, new_size: int):
  """Zero-pads ``x`` at the end of ``axis`` up to ``new_size`` (no-op if equal)."""
  extra = new_size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def round_up(n: int, m: int) -> int:
  """The smallest multiple of ``m`` that is >= ``n``."""
  return -(-n // m) * m


def next_power_of_two(n: int) -> int:
  """The smallest power of two >= ``n`` (n >= 1)."""
  return 1 << (int(n) - 1).bit_length()
