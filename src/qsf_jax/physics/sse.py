"""The stochastic Schrödinger equation of the hidden state (QSF §2.7, §6.7).

Euler-Maruyama integration of dx = a(x) dt + s(x) dW + sigma_K dW' with one
scalar measurement channel W (decision D19) and an optional additive vector
Koopman noise W'. With e = x - x_tgt, f = A x + b and <O> = x . e:

  "paper"    (QSF eq. 43):  a = f - ||e||^2 x / (2 sigma_m^2),            s = e / sigma_m
  "centered" (QSF eq. 42):  a = f - (x.f) x - (||e||^2 - <O>^2) x / (2 sigma_m^2),
                            s = (e - <O> x) / sigma_m
  "linear"   (QSF eq. 44, the unnormalised SSE under the reference measure):
                            a = f,                                        s = e / sigma_m

The discrete scheme is (QSF §6.7)

  x_{n+1} = x_n + a(x_n) dt + s(x_n) dW_n + sigma_K dW'_n,
  dW_n ~ N(0, dt),  dW'_n ~ N(0, dt I_d),

with x_tgt constant or piecewise constant (one target per step). The noise is
drawn by ``sse_increments`` and integrated by ``sse_integrate``, so that runs can
share their noise; ``simulate_sse`` does both and vmaps over an ensemble.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax import _checks

VARIANTS = ("paper", "centered", "linear")


def _coefficients(x_D, A_DD, b_D, xt_D, sigma_m, variant: str):
  """Drift a (d,) and measurement diffusion s (d,) of the chosen SSE variant."""
  e_D = x_D - xt_D
  f_D = A_DD @ x_D + b_D
  q = jnp.dot(e_D, e_D)
  inv_s = 1.0 / sigma_m
  if variant == "paper":
    return f_D - 0.5 * inv_s**2 * q * x_D, inv_s * e_D
  if variant == "centered":
    o = jnp.dot(x_D, e_D)
    drift_D = f_D - jnp.dot(x_D, f_D) * x_D - 0.5 * inv_s**2 * (q - o**2) * x_D
    return drift_D, inv_s * (e_D - o * x_D)
  return f_D, inv_s * e_D  # "linear"


def _check_scalar(name: str, value) -> None:
  """``ValueError`` unless ``value`` is a scalar (0-d), concrete or traced."""
  if jnp.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")


def _check_nonneg(name: str, value) -> None:
  """``ValueError`` for a concrete value that is not finite and >= 0."""
  try:
    v = np.asarray(value)
  except Exception:  # a tracer: cannot be checked at trace time
    return
  if v.dtype != object and (v.ndim != 0 or not np.isfinite(v) or v < 0):
    raise ValueError(f"{name} must be a finite scalar >= 0, got {value}")


def _validate_model(x0, A, b, x_tgt, sigma_m, variant, n_steps=None):
  """Checks shapes and values; returns the arrays in one floating dtype."""
  _checks.check_choice("variant", variant, VARIANTS)
  x0 = _checks.as_array("x0", x0)
  _checks.check_ndim("x0", x0, 1)
  d = x0.shape[0]
  A = _checks.as_array("A", A)
  _checks.check_square("A", A)
  _checks.check_shape("A", A, (d, d))
  b = _checks.as_array("b", b)
  _checks.check_shape("b", b, (d,))
  x_tgt = _checks.as_array("x_tgt", x_tgt)
  _checks.check_ndim("x_tgt", x_tgt, (1, 2))
  _checks.check_shape("x_tgt", x_tgt, (d,) if x_tgt.ndim == 1 else (n_steps, d))
  _check_scalar("sigma_m", sigma_m)
  _checks.check_positive("sigma_m", sigma_m)
  for name, v in (("x0", x0), ("A", A), ("b", b), ("x_tgt", x_tgt)):
    _checks.check_finite(name, v)  # concrete values only
  dtype = _checks.result_dtype(x0, A, b, x_tgt)
  return tuple(a.astype(dtype) for a in (x0, A, b, x_tgt)), dtype


def sse_coefficients(x, A, b, x_tgt, *, sigma_m, variant: str = "paper"):
  """Drift and measurement diffusion of the SSE (QSF eq. 43, eq. 42 or eq. 44).

    paper:    dx = [A x + b - ||e||^2 x / (2 sigma_m^2)] dt + (e / sigma_m) dW     (eq. 43)
    centered: dx = [f - (x.f) x - (||e||^2 - <O>^2) x / (2 sigma_m^2)] dt
                   + ((e - <O> x) / sigma_m) dW                                  (eq. 42)
    linear:   dx = (A x + b) dt + (e / sigma_m) dW                               (eq. 44)

  with e = x - x_tgt, f = A x + b, <O> = x . e.

  Args:
    x: state (d,).
    A: real generator (d, d).
    b: real bias (d,).
    x_tgt: measurement target (d,).
    sigma_m: measurement noise scale (> 0; inf gives the free Koopman flow).
    variant: "paper", "centered" or "linear".

  Returns:
    (drift, diffusion): (d,) and (d,).
  """
  (x, A, b, x_tgt), dtype = _validate_model(x, A, b, x_tgt, sigma_m, variant)
  _checks.check_ndim("x_tgt", x_tgt, 1)
  return _coefficients(x, A, b, x_tgt, jnp.asarray(sigma_m, dtype), variant)


def sse_increments(key, n_steps: int, d: int, dt, dtype=jnp.float32):
  """Wiener increments for ``sse_integrate`` (decision D19).

    dW_n ~ N(0, dt) (scalar measurement channel),  dW'_n ~ N(0, dt I_d) (Koopman).

  The two streams come from independent subkeys, so dW does not depend on d.

  Args:
    key: a JAX PRNG key.
    n_steps: number of steps (python int > 0).
    d: state dimension (python int > 0).
    dt: step length (> 0).
    dtype: floating dtype of the increments.

  Returns:
    (dW (n_steps,), dW_K (n_steps, d)).
  """
  _check_key(key)
  n_steps = _check_count("n_steps", n_steps)
  d = _check_count("d", d)
  _check_scalar("dt", dt)
  _checks.check_time_step("dt", dt)
  k_meas, k_koop = jax.random.split(key)
  scale = jnp.sqrt(jnp.asarray(dt, dtype))
  dW_N = scale * jax.random.normal(k_meas, (n_steps,), dtype)
  dWK_ND = scale * jax.random.normal(k_koop, (n_steps, d), dtype)
  return dW_N, dWK_ND


def sse_integrate(x0, A, b, x_tgt, dW, dW_K=None, *, sigma_m, dt, variant: str = "paper",
                  sigma_K=0.0, return_path: bool = True):
  """Euler-Maruyama for the SSE with given noise increments (QSF §6.7, eqs. 42-44).

    x_{n+1} = x_n + a(x_n; x_tgt,n) dt + s(x_n; x_tgt,n) dW_n + sigma_K dW'_n,

  with (a, s) from ``sse_coefficients``, as a ``jax.lax.scan`` over the steps.

  Args:
    x0: initial state (d,).
    A: real generator (d, d).
    b: real bias (d,).
    x_tgt: target, constant (d,) or a piecewise-constant schedule (n_steps, d).
    dW: measurement increments (n_steps,).
    dW_K: Koopman increments (n_steps, d); None means no Koopman noise.
    sigma_m: measurement noise scale (> 0; inf gives the free flow x' = A x + b).
    dt: step length (> 0).
    variant: "paper", "centered" or "linear" (static).
    sigma_K: Koopman noise scale (>= 0).
    return_path: return the whole trajectory, else only the endpoint (static).

  Returns:
    The trajectory (n_steps + 1, d) starting at x0, or the endpoint (d,).
  """
  return_path = _checks.check_flag("return_path", return_path)
  dW = _checks.as_array("dW", dW)
  _checks.check_ndim("dW", dW, 1)
  n_steps = dW.shape[0]
  (x0, A, b, x_tgt), dtype = _validate_model(x0, A, b, x_tgt, sigma_m, variant, n_steps)
  d = x0.shape[0]
  if dW_K is None:
    dW_K = jnp.zeros((n_steps, d), dtype)
  dW_K = _checks.as_array("dW_K", dW_K)
  _checks.check_shape("dW_K", dW_K, (n_steps, d))
  _check_scalar("dt", dt)
  _checks.check_time_step("dt", dt)
  _check_nonneg("sigma_K", sigma_K)
  xt_ND = jnp.broadcast_to(x_tgt, (n_steps, d)) if x_tgt.ndim == 1 else x_tgt
  sigma_m, dt, sigma_K = (jnp.asarray(v, dtype) for v in (sigma_m, dt, sigma_K))
  return _em_scan(x0, A, b, xt_ND, dW.astype(dtype), dW_K.astype(dtype), sigma_m, dt, sigma_K,
                  variant=variant, return_path=return_path)


@functools.partial(jax.jit, static_argnames=("variant", "return_path"))
def _em_scan(x0_D, A_DD, b_D, xt_ND, dW_N, dWK_ND, sigma_m, dt, sigma_K, *, variant, return_path):
  """The Euler-Maruyama scan on validated arrays (jitted, so eager calls are cached)."""

  def step(x_D, inputs):
    xt_D, dw, dwk_D = inputs
    drift_D, diff_D = _coefficients(x_D, A_DD, b_D, xt_D, sigma_m, variant)
    x_D = x_D + drift_D * dt + diff_D * dw + sigma_K * dwk_D
    return x_D, (x_D if return_path else None)

  x_end, path_ND = jax.lax.scan(step, x0_D, (xt_ND, dW_N, dWK_ND))
  if not return_path:
    return x_end
  return jnp.concatenate([x0_D[None], path_ND], axis=0)


def simulate_sse(key, x0, A, b, x_tgt, sigma_m, dt, n_steps: int, variant: str = "paper",
                 sigma_K=0.0, *, n_paths: int | None = None, return_path: bool = True):
  """Samples SSE trajectories by Euler-Maruyama (QSF §6.7; eq. 43, 42 or 44).

  The signature is spec §6.7's,
  ``simulate_sse(key, x0, A, b, x_tgt, sigma_m, dt, n_steps, variant, sigma_K)``.

    x_{n+1} = x_n + a(x_n) dt + s(x_n) dW_n + sigma_K dW'_n,
    dW_n ~ N(0, dt) scalar,  dW'_n ~ N(0, dt I_d)   (decision D19).

  Noise comes from ``sse_increments(key, ...)``; an ensemble uses
  ``jax.random.split(key, n_paths)`` and ``jax.vmap``. jit-compatible with
  ``n_steps``, ``variant``, ``n_paths`` and ``return_path`` static.

  Args:
    key: a JAX PRNG key.
    x0: initial state (d,).
    A: real generator (d, d).
    b: real bias (d,).
    x_tgt: target, constant (d,) or piecewise-constant schedule (n_steps, d).
    sigma_m: measurement noise scale (> 0; inf gives the free flow).
    dt: step length (> 0).
    n_steps: number of steps (python int > 0).
    variant: "paper" (eq. 43), "centered" (eq. 42) or "linear" (eq. 44).
    sigma_K: Koopman noise scale (>= 0; 0 by default, D19).
    n_paths: ensemble size (python int > 0), or None for one path.
    return_path: return trajectories, else endpoints.

  Returns:
    ([n_paths,] n_steps + 1, d) trajectories, or ([n_paths,] d) endpoints.
  """
  _check_key(key)
  return_path = _checks.check_flag("return_path", return_path)
  n_steps = _check_count("n_steps", n_steps)
  if n_paths is not None:
    n_paths = _check_count("n_paths", n_paths)
  (x0, A, b, x_tgt), dtype = _validate_model(x0, A, b, x_tgt, sigma_m, variant, n_steps)
  _check_scalar("dt", dt)
  _checks.check_time_step("dt", dt)
  _check_nonneg("sigma_K", sigma_K)
  sigma_m, dt, sigma_K = (jnp.asarray(v, dtype) for v in (sigma_m, dt, sigma_K))
  return _simulate(key, x0, A, b, x_tgt, sigma_m, dt, sigma_K, n_steps=n_steps,
                   variant=variant, n_paths=n_paths, return_path=return_path)


@functools.partial(jax.jit, static_argnames=("n_steps", "variant", "n_paths", "return_path"))
def _simulate(key, x0_D, A_DD, b_D, x_tgt, sigma_m, dt, sigma_K, *, n_steps, variant, n_paths,
              return_path):
  """Noise plus integration for validated arrays, vmapped over an ensemble (jitted)."""

  def one_path(k):
    dW_N, dWK_ND = sse_increments(k, n_steps, x0_D.shape[0], dt, x0_D.dtype)
    return sse_integrate(x0_D, A_DD, b_D, x_tgt, dW_N, dWK_ND, sigma_m=sigma_m, dt=dt,
                         variant=variant, sigma_K=sigma_K, return_path=return_path)

  if n_paths is None:
    return one_path(key)
  return jax.vmap(one_path)(jax.random.split(key, n_paths))


def _check_count(name: str, n) -> int:
  """``n`` as a Python int; ``ValueError`` unless it is a static int > 0 (a size).

  Python and NumPy ints and concrete 0-d integer arrays pass; a traced value is
  refused with the hint to pass it as static (``_checks.check_int``).
  """
  if isinstance(n, jax.core.Tracer):
    _checks.check_int(name, n)  # raises: asks for a static argument
  try:
    return _checks.check_int(name, n, 1)
  except ValueError:
    raise ValueError(f"{name} must be an int > 0 (static), got {n!r}") from None


def _check_key(key) -> None:
  """``ValueError`` unless ``key`` is one JAX PRNG key (typed or raw uint32)."""
  _checks.check_prng_key("key", key)
