"""Propagators and SSE trajectories of one trained layer (QSF eqs. 42-43, 56-58; §6.2-6.4, §6.7).

``propagate_sentence`` applies the one-token Gaussian propagator of a trained
layer (K, b, W_V) to every token of a validation sentence, x0 = the layer's
Koopman input u_t and x_tgt = its attention target at t, in both forms:

* paper (QSF eqs. 57-58): prior N(mu_K, Sigma_K) then one endpoint measurement,
* exact (spec §6.3): the Kalman-Bucy marginal of the running measurement,

with the continuous variant A = logm(K) when K has a real logarithm, else the
discrete variant of spec §6.4 (prior N(K u + b, sigma_K^2 I); the two forms
then coincide). The means are compared with the layer's actual update
h^(l+1) - h^(l) (QSF eq. 60).

``sse_ensemble`` samples the SSE (QSF eq. 43, or 42) over one token interval
from the same layer's operators, measuring the state against the pre-image
of the attention target (``state_target``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax import _checks
from qsf_jax.physics.layer import continuous_bias, layer_generator
from qsf_jax.physics.propagate import exact_substeps, measurement_update, propagate
from qsf_jax.physics.sse import simulate_sse


def layer_dynamics(K, b) -> tuple[np.ndarray, np.ndarray, str]:
  """A generator and bias for a trained layer's K, b (spec §6.4, D17).

  continuous: A = logm(K) (real), b_c with phi_1(A) b_c = b, so the time-1 flow
  of x' = A x + b_c is x -> K x + b exactly. discrete (an eigenvalue of K on
  (-inf, 0]): no real generator exists, and A = K - I, b is a surrogate whose
  single unit Euler step is x -> K x + b; its exact time-1 flow is e^{K - I},
  which matches K only to first order in K - I (an eigenvalue -0.5 of K becomes
  e^{-1.5} = 0.22). The propagators of the discrete variant use K itself; only
  the SSE (``sse_ensemble``, many Euler steps) follows the surrogate, and its
  report says so.

  Args:
    K: Koopman matrix (d, d).
    b: bias (d,).

  Returns:
    (A (d, d), b (d,), variant) as float64 numpy arrays.
  """
  K = np.asarray(K, np.float64)
  b = np.asarray(b, np.float64)
  A, variant = layer_generator(K)
  if variant == "continuous":
    with jax.enable_x64(True):
      b_c = np.asarray(continuous_bias(jnp.asarray(A), jnp.asarray(b)))
    return A, b_c, variant
  return K - np.eye(K.shape[0]), b, variant


def exact_subset(n: int, exact_tokens: int | None) -> np.ndarray:
  """Evenly spaced token indices (all if ``exact_tokens`` is None or >= n)."""
  if exact_tokens is None or exact_tokens >= n:
    return np.arange(n)
  if exact_tokens < 1:
    raise ValueError(f"exact_tokens must be >= 1, got {exact_tokens}")
  return np.unique(np.round(np.linspace(0, n - 1, exact_tokens)).astype(np.int64))


def propagate_sentence(K, b, W_V, k_in_ND, x_tgt_ND, *, sigma_m: float = 1.0,
                       sigma_K: float = 1.0, step_ND=None, exact_tokens: int | None = None,
                       dynamics=None) -> dict:
  """Propagator means of one layer over a sentence, paper and exact (QSF eqs. 57-58, §6.3).

  Continuous variant (A = logm K, dt = 1, spec §6.4):
    paper:  Lambda = Sigma_K^{-1} + W_V^T W_V / sigma_m^2,
            mu = Lambda^{-1} (Sigma_K^{-1} mu_K + W_V^T x_tgt / sigma_m^2),  mu_K = K x0 + b;
    exact:  the Kalman-Bucy mean of spec §6.3.
  Discrete variant: the paper update with prior N(K x0 + b, sigma_K^2 I); exact = paper.

  The exact form needs one (2d + 2)-square matrix exponential per token (its
  Hamiltonian matrix holds x_tgt); ``exact_tokens`` bounds that cost by
  evaluating it on evenly spaced tokens only (NaN rows elsewhere).

  Args:
    K: Koopman matrix (d, d).
    b: Koopman bias (d,).
    W_V: value projection (d, d) (the measurement matrix M).
    k_in_ND: Koopman inputs x0 per token (N, d).
    x_tgt_ND: attention targets per token (N, d).
    sigma_m: measurement noise (QSF: 1).
    sigma_K: Koopman noise (QSF: 1).
    step_ND: the layer's update h^(l+1) - h^(l) per token (N, d), optional.
    exact_tokens: evaluate the exact form on at most this many tokens (None: all).
    dynamics: ``layer_dynamics(K, b)`` if already computed.

  Returns:
    ``{"variant", "prior", "paper", "exact"}`` means (N, d) float64, ``"exact_index"``
    (the tokens with an exact mean), ``"shift_ratio"`` (N,) = ||mu_paper - mu_K|| /
    ||mu_exact - mu_K||, and with ``step_ND`` the relative deviations
    ``"dev_paper"``, ``"dev_exact"``, ``"dev_prior"`` (N,) = ||mean - step|| /
    ||step|| and ``"step"`` itself.
  """
  K, b, M = (np.asarray(a, np.float64) for a in (K, b, W_V))
  X0, XT = np.asarray(k_in_ND, np.float64), np.asarray(x_tgt_ND, np.float64)
  d = K.shape[0]
  for name, arr, shape in (("K", K, (d, d)), ("b", b, (d,)), ("W_V", M, (d, d))):
    if arr.shape != shape:
      raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
  if X0.ndim != 2 or X0.shape[1] != d or XT.shape != X0.shape:
    raise ValueError(f"k_in_ND and x_tgt_ND must both be (N, {d}), got {X0.shape}, {XT.shape}")
  A, b_c, variant = layer_dynamics(K, b) if dynamics is None else dynamics
  prior = X0 @ K.T + b[None, :]
  idx = exact_subset(X0.shape[0], exact_tokens)
  with jax.enable_x64(True):
    if variant == "continuous":
      n_sub = exact_substeps(A, M, 1.0, sigma_m, sigma_K)
      # The operators are arguments, not closure constants, so that XLA does not
      # constant-fold d x d products at compile time.
      fns = {key: jax.jit(jax.vmap(
          lambda x0, xt, A_, b_, M_, mode=mode: propagate(
              x0, A_, b_, xt, M_, sigma_m=sigma_m, sigma_K=sigma_K, mode=mode,
              n_sub=n_sub).mean, in_axes=(0, 0, None, None, None)))
             for key, mode in (("paper", "paper"), ("exact", "kalman_bucy"))}
      paper = np.asarray(fns["paper"](X0, XT, A, b_c, M))
      exact = np.full_like(paper, np.nan)
      exact[idx] = np.asarray(fns["exact"](X0[idx], XT[idx], A, b_c, M))
    else:
      fn = jax.jit(jax.vmap(lambda m0, xt, cov, M_: measurement_update(
          m0, cov, xt, M_, 1.0 / sigma_m ** 2).mean, in_axes=(0, 0, None, None)))
      paper = np.asarray(fn(prior, XT, sigma_K ** 2 * np.eye(d), M))
      idx = np.arange(X0.shape[0])
      exact = paper
  out = {"variant": variant, "prior": prior, "paper": paper, "exact": exact,
         "exact_index": idx}
  with np.errstate(invalid="ignore", divide="ignore"):
    out["shift_ratio"] = (np.linalg.norm(paper - prior, axis=1)
                          / np.linalg.norm(exact - prior, axis=1))
    if step_ND is not None:
      S = np.asarray(step_ND, np.float64)
      if S.shape != X0.shape:
        raise ValueError(f"step_ND must have shape {X0.shape}, got {S.shape}")
      norm = np.linalg.norm(S, axis=1)
      out["step"] = S
      for key in ("paper", "exact", "prior"):
        out[f"dev_{key}"] = np.linalg.norm(out[key] - S, axis=1) / norm
  return out


def state_target(W_V, x_tgt, *, rcond: float = 1e-6) -> np.ndarray:
  """The minimum-norm state x* with W_V x* = x_tgt (least squares; QSF eq. 55's M = W_V).

  The attention target lives in value space (the propagators measure W_V x
  against it); the SSE of QSF eq. 43 measures the state itself, so it is given
  the state whose value is the target (the sigma_m -> 0 limit of the
  propagator mean, spec §6.8 item 5). As in eq. 55, the observation is W_V x
  with no offset: the model's values carry the bias b_V, so x_tgt also holds
  (c_i sum_j w_ij) b_V, which this comparison leaves in the target.

  Args:
    W_V: value projection (d, d).
    x_tgt: target in value space (d,).
    rcond: relative cut-off of small singular values of W_V.

  Returns:
    x* (d,) float64.
  """
  return np.linalg.lstsq(np.asarray(W_V, np.float64), np.asarray(x_tgt, np.float64),
                         rcond=rcond)[0]


SSE_MIN_STEPS, SSE_MAX_STEPS = 200, 5000


def stable_sse_steps(A, x0, x_tgt, *, sigma_m: float = 1.0, min_steps: int = SSE_MIN_STEPS,
                     max_steps: int = SSE_MAX_STEPS) -> int:
  """Euler-Maruyama steps per unit interval that keep the eq. 43 drift stable.

  The drift A x + b - ||e||^2 x / (2 sigma_m^2) has, near the path, a stiffness
  of at most s = ||A||_2 + (r + 1)^2 / (2 sigma_m^2) with r = max(||x0 - x_tgt||,
  ||x_tgt||) (the state moves between x0 and the origin, so ||e|| <= r + 1 in
  the unit-sphere scaling). Explicit Euler is stable for dt * s < 2; this
  returns n = ceil(2 s), i.e. dt * s <= 1/2, clipped to [min_steps, max_steps].
  A target far from the state (a trained W_V that is close to singular puts
  x* with W_V x* = x_tgt far away) makes the equation stiff, and a fixed
  200 steps then diverges.

  Args:
    A: generator (d, d).
    x0: start (d,) (already scaled).
    x_tgt: target (d,) (same scaling).
    sigma_m: measurement noise.
    min_steps, max_steps: bounds on the returned count.

  Returns:
    the number of steps (int).
  """
  A, x0, xt = (np.asarray(a, np.float64) for a in (A, x0, x_tgt))
  r = max(float(np.linalg.norm(x0 - xt)), float(np.linalg.norm(xt)))
  stiff = float(np.linalg.norm(A, 2)) + (r + 1.0) ** 2 / (2.0 * sigma_m ** 2)
  if not np.isfinite(stiff):
    return int(max_steps)
  return int(np.clip(math.ceil(2.0 * stiff), min_steps, max_steps))


def sse_ensemble(key, K, b, x0, x_tgt, *, n_paths: int = 32, n_steps: int | None = None,
                 sigma_m: float = 1.0, variant: str = "paper", dynamics=None) -> dict:
  """SSE trajectories over one token interval from a layer's operators (QSF eq. 43/42, §6.7).

    x_{n+1} = x_n + [A x_n + b_c - ||e_n||^2 x_n / (2 sigma_m^2)] dt + (e_n / sigma_m) dW_n,
    e_n = x_n - x_tgt,  dt = 1 / n_steps   (variant "paper", eq. 43)

  with (A, b_c) from ``layer_dynamics``. The SSE describes a normalised state,
  so x0, x_tgt and b_c are divided by ||x0|| (the start lies on the unit
  sphere; the linear part is unchanged by the scaling).

  Args:
    key: a JAX PRNG key.
    K: Koopman matrix (d, d).
    b: Koopman bias (d,).
    x0: start, the layer's Koopman input at one token (d,).
    x_tgt: the measured target in state space (d,) (see ``state_target``).
    n_paths: ensemble size.
    n_steps: Euler-Maruyama steps over the unit interval (None: ``stable_sse_steps``).
    sigma_m: measurement noise.
    variant: "paper" (eq. 43) or "centered" (eq. 42).
    dynamics: ``layer_dynamics(K, b)`` if already computed.

  Returns:
    ``{"t" (n_steps+1,), "norm" (P, n_steps+1), "dist" (P, n_steps+1) = ||x - x_tgt||,
    "free_norm", "free_dist" (n_steps+1,) of the unmeasured flow (sigma_m = inf),
    "variant_dynamics", "sse_variant", "scale" = ||x0||, "finite", "n_steps"}`` (norms
    and distances in the scaled units).
  """
  x0 = np.asarray(x0, np.float64)
  for name, v in (("x0", x0), ("x_tgt", x_tgt), ("K", K), ("b", b)):
    _checks.check_finite(name, v)
  scale = float(np.linalg.norm(x0))
  if not scale > 0:
    raise ValueError("x0 must be non-zero")
  A, b_c, dyn = layer_dynamics(K, b) if dynamics is None else dynamics
  xt = np.asarray(x_tgt, np.float64) / scale
  if xt.shape != x0.shape:
    raise ValueError(f"x_tgt must have shape {x0.shape}, got {xt.shape}")
  args = (x0 / scale, A, b_c / scale, xt)
  if n_steps is None:
    n_steps = stable_sse_steps(A, x0 / scale, xt, sigma_m=sigma_m)
  elif isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
    raise ValueError(f"n_steps must be a positive int or None (automatic), got {n_steps!r}")
  with jax.enable_x64(True):
    paths = np.asarray(simulate_sse(key, *args, sigma_m=sigma_m, dt=1.0 / n_steps,
                                    n_steps=n_steps, variant=variant, n_paths=n_paths))
    free = np.asarray(simulate_sse(key, *args, sigma_m=np.inf, dt=1.0 / n_steps,
                                   n_steps=n_steps, variant=variant))
  with np.errstate(over="ignore", invalid="ignore"):
    return {"t": np.linspace(0.0, 1.0, n_steps + 1),
            "norm": np.linalg.norm(paths, axis=-1),
            "dist": np.linalg.norm(paths - xt, axis=-1),
            "free_norm": np.linalg.norm(free, axis=-1),
            "free_dist": np.linalg.norm(free - xt, axis=-1),
            "variant_dynamics": dyn, "sse_variant": variant, "scale": scale,
            "finite": bool(np.all(np.isfinite(paths))), "n_steps": int(n_steps)}
