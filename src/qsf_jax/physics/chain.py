"""Multi-token chains of Gaussian propagators (QSF eq. 59, spec §6.5).

Within token interval n the generator A_n, bias b_n and target x_tgt,n are
constant (QSF §IX.3), so the free mean moves by the affine map
x <- U_n x + c_n with U_n = e^{A_n dt}, c_n = (int_0^dt e^{A_n s} ds) b_n.
Affine maps compose associatively, so the chain runs either sequentially
(``jax.lax.scan``, O(N d^2)) or in parallel over tokens
(``jax.lax.associative_scan``, O(N d^3 log N) work, O(log N) depth).

Sequence arguments accept one matrix for all steps (A (d, d), b (d,)) or one
per step (A (N, d, d), b (N, d)); N is taken from the per-step arguments, or
from ``n_steps`` when every argument is constant. The Kalman chain with
covariances and log-normalisers is in ``kalman_chain.py``.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from qsf_jax import _checks
from qsf_jax.physics.generators import _affine_squarings, koopman_affine, koopman_cov
from qsf_jax.physics.propagate import check_scalars

SCAN_METHODS = ("associative", "sequential")


def __getattr__(name):
  """``chain_filter`` and ``chain_filter_full``, defined here before, from ``kalman_chain``
  (imported lazily: ``kalman_chain`` imports this module)."""
  if name in ("chain_filter", "chain_filter_full"):
    from qsf_jax.physics import kalman_chain  # pylint: disable=g-import-not-at-top
    return getattr(kalman_chain, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve_steps(n_steps, **per_step_sizes):
  """The chain length from the per-step arguments' leading axes and ``n_steps``."""
  sizes = {k: v for k, v in per_step_sizes.items() if v is not None}
  if n_steps is not None:
    try:  # an int-like (python, numpy or concrete jax integer), never truncated
      sizes["n_steps"] = None if isinstance(n_steps, bool) else operator.index(n_steps)
    except TypeError:
      sizes["n_steps"] = None
    if sizes["n_steps"] is None:
      raise ValueError(f"n_steps must be an int (a static chain length), got {n_steps!r}")
  if not sizes:
    raise ValueError("n_steps is required when A_seq and b_seq are both constant "
                     "(no per-step axis to take the chain length from)")
  if len(set(sizes.values())) != 1:
    raise ValueError(f"inconsistent numbers of steps: {sizes}")
  n = next(iter(sizes.values()))
  if n < 1:
    raise ValueError(f"the chain needs at least one step, got {n}")
  return n


def _validate_seq(A_seq, b_seq, extra=(), n_steps=None, n_from=None):
  """Validates A_seq (d,d)|(N,d,d), b_seq (d,)|(N,d); returns arrays, d, N, dtype."""
  A = _checks.as_array("A_seq", A_seq)
  _checks.check_ndim("A_seq", A, (2, 3))
  d = _checks.check_square("A_seq", A, batch_dims=A.ndim - 2)
  b = _checks.as_array("b_seq", b_seq)
  _checks.check_ndim("b_seq", b, (1, 2))
  _checks.check_shape("b_seq", b, (None,) * (b.ndim - 1) + (d,))
  N = _resolve_steps(n_steps, A_seq=A.shape[0] if A.ndim == 3 else None,
                     b_seq=b.shape[0] if b.ndim == 2 else None, **(n_from or {}))
  dtype = _checks.result_dtype(A, b, *extra)
  _checks.check_finite("A_seq", A)  # concrete values only
  _checks.check_finite("b_seq", b)
  return A.astype(dtype), b.astype(dtype), d, N, dtype


def _affine_steps(A, b, dt):
  """``koopman_affine`` over dt for ``_per_step``, with the squaring count that the
  largest |[[A_n, b_n], [0, 0]] dt|_1 of concrete steps needs: inside the vmap the
  values are traced, and each step alone would get the traced count."""
  return functools.partial(koopman_affine, dt=dt, max_squarings=_affine_squarings(A, b, dt))


def _per_step(fn, A, b, N, *args):
  """Applies fn(A_n, b_n, *args) over the steps, broadcasting constant A or b."""
  in_axes = (0 if A.ndim == 3 else None, 0 if b.ndim == 2 else None)
  if in_axes == (None, None):
    out = fn(A, b, *args)
    return jax.tree.map(lambda o: jnp.broadcast_to(o, (N,) + o.shape), out)
  return jax.vmap(lambda a, bb: fn(a, bb, *args), in_axes=in_axes)(A, b)


def step_maps(A_seq, b_seq, dt=1.0, *, n_steps=None):
  """Per-token free affine maps (U_n, c_n) of the chain (QSF eq. 59).

    U_n = e^{A_n dt},  c_n = (int_0^dt e^{A_n s} ds) b_n   (finite for singular A_n).

  Args:
    A_seq: generators, (d, d) shared or (N, d, d) per step.
    b_seq: biases, (d,) shared or (N, d) per step.
    dt: token step, scalar > 0.
    n_steps: N, needed only when A_seq and b_seq are both shared.

  Returns:
    (U_NDD, c_ND): (N, d, d) and (N, d).
  """
  A, b, _, N, _ = _validate_seq(A_seq, b_seq, n_steps=n_steps)
  _checks.check_time_step("dt", dt)
  return _per_step(_affine_steps(A, b, dt), A, b, N)


def compose_affine(earlier, later):
  """Composition of affine maps, 'later after earlier' (QSF eq. 59's time ordering).

    (U_2, c_2) o (U_1, c_1) = (U_2 U_1, U_2 c_1 + c_2),

  the associative operator of the parallel scan; works on batches (..., d, d), (..., d).

  Args:
    earlier: (U_1 (..., d, d), c_1 (..., d)).
    later: (U_2 (..., d, d), c_2 (..., d)).

  Returns:
    (U (..., d, d), c (..., d)).
  """
  arrays = []
  for name, pair in (("earlier", earlier), ("later", later)):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f"{name} must be a pair (U, c), got {type(pair).__name__}")
    U = _checks.as_array(f"{name}[0] (U)", pair[0])
    c = _checks.as_array(f"{name}[1] (c)", pair[1])
    d = _checks.check_square(f"{name}[0] (U)", U, batch_dims=None)
    if c.ndim < 1 or c.shape[-1] != d:
      raise ValueError(f"{name}[1] (c) must have shape (..., {d}) to match U of shape "
                       f"{tuple(U.shape)}, got {tuple(c.shape)}")
    arrays += [U, c]
  if arrays[0].shape[-1] != arrays[2].shape[-1]:
    raise ValueError(f"earlier and later act on different dimensions: U of shapes "
                     f"{tuple(arrays[0].shape)} and {tuple(arrays[2].shape)}")
  dtype = _checks.result_dtype(*arrays)
  U1, c1, U2, c2 = (a.astype(dtype) for a in arrays)
  return _compose(U1, c1, U2, c2)


def _compose(U1, c1, U2, c2):
  """``compose_affine`` on arrays (the associative scan's operator)."""
  return U2 @ U1, jnp.einsum("...ij,...j->...i", U2, c1) + c2


def scan_affine(x0, U_NDD, c_ND, *, method="associative"):
  """All iterates x_n = U_n x_{n-1} + c_n, n = 1..N, of an affine chain (QSF eq. 59).

  The associative method forms the prefix compositions
  x_n = (U_n ... U_1) x0 + sum_{m<=n} (U_n ... U_{m+1}) c_m with
  ``jax.lax.associative_scan``; the sequential one iterates with ``jax.lax.scan``.

  Args:
    x0: initial state (d,).
    U_NDD: linear parts (N, d, d).
    c_ND: offsets (N, d).
    method: "associative" or "sequential" (static).

  Returns:
    x_ND: the states after each step (N, d); x_ND[-1] is the chain's end point.
  """
  _checks.check_choice("method", method, SCAN_METHODS)
  U_NDD = _checks.as_array("U_NDD", U_NDD)
  d = _checks.check_square("U_NDD", U_NDD, batch_dims=1)
  c_ND, x0 = _checks.as_array("c_ND", c_ND), _checks.as_array("x0", x0)
  _checks.check_shape("c_ND", c_ND, (U_NDD.shape[0], d))
  _checks.check_shape("x0", x0, (d,))
  dtype = _checks.result_dtype(x0, U_NDD, c_ND)
  return _scan_affine(x0.astype(dtype), U_NDD.astype(dtype), c_ND.astype(dtype),
                      method=method)


@functools.partial(jax.jit, static_argnames=("method",))
def _scan_affine(x0, U_NDD, c_ND, *, method):
  """``scan_affine``'s numerics on validated arrays of one dtype (compiled once per
  shape, dtype and method rather than on every eager call)."""
  if method == "sequential":
    def step(x_D, Uc):
      x_D = Uc[0] @ x_D + Uc[1]
      return x_D, x_D
    return jax.lax.scan(step, x0, (U_NDD, c_ND))[1]
  Ucum_NDD, ccum_ND = jax.lax.associative_scan(
      lambda earlier, later: _compose(*earlier, *later), (U_NDD, c_ND))
  return jnp.einsum("nij,j->ni", Ucum_NDD, x0) + ccum_ND


def chain_mean(x0, A_seq, b_seq, dt=1.0, *, n_steps=None, method="associative"):
  """Free Koopman mean along the token chain (QSF eq. 59).

    x_N = (prod_{n=1}^N U_n) x0 + sum_{n=1}^N (prod_{m=n+1}^N U_m) c_n,
    prod_n U_n = U_N ... U_1 (later factors on the left).

  Args:
    x0: initial state (d,).
    A_seq: generators (d, d) or (N, d, d).
    b_seq: biases (d,) or (N, d).
    dt: token step, scalar > 0.
    n_steps: N when A_seq and b_seq are both shared.
    method: "associative" (parallel prefix) or "sequential" (static).

  Returns:
    means (N, d): x_1, ..., x_N; the last row is eq. 59's x_N.
  """
  _checks.check_choice("method", method, SCAN_METHODS)
  x0 = _checks.as_array("x0", x0)
  A, b, d, N, dtype = _validate_seq(A_seq, b_seq, extra=[x0], n_steps=n_steps)
  _checks.check_shape("x0", x0, (d,))
  _checks.check_finite("x0", x0)
  _checks.check_time_step("dt", dt)
  U_NDD, c_ND = _per_step(_affine_steps(A, b, dt), A, b, N)
  return scan_affine(x0.astype(dtype), U_NDD, c_ND, method=method)


def _validate_measured(x0, A_seq, b_seq, x_tgt_seq, M, dt, sigma_m, sigma_K):
  """Shared validation of the measured chains; returns cast arrays and N."""
  y = _checks.as_array("x_tgt_seq", x_tgt_seq)
  _checks.check_ndim("x_tgt_seq", y, 2)
  extra = [y] + ([] if M is None else [_checks.as_array("M", M)])
  x0 = _checks.as_array("x0", x0)
  A, b, d, N, dtype = _validate_seq(A_seq, b_seq, extra=extra + [x0],
                                    n_from={"x_tgt_seq": y.shape[0]})
  _checks.check_shape("x_tgt_seq", y, (N, d))
  _checks.check_shape("x0", x0, (d,))
  M = jnp.eye(d, dtype=dtype) if M is None else extra[1]
  _checks.check_shape("M", M, (d, d))
  check_scalars(dt, sigma_m, sigma_K)
  for name, v in (("x0", x0), ("x_tgt_seq", y), ("M", M)):
    _checks.check_finite(name, v)
  r = jnp.asarray(dt, dtype) * (1.0 / jnp.asarray(sigma_m, dtype)) ** 2  # d/dsigma_m 0 at inf
  _checks.check_overflow(r, _checks.obs_precision_message(dt, sigma_m, dtype))
  return x0.astype(dtype), A, b, y.astype(dtype), M.astype(dtype), N, r


def chain_measured_mean(x0, A_seq, b_seq, x_tgt_seq, M=None, *, dt=1.0, sigma_m=1.0,
                        sigma_K=1.0, method="associative"):
  """Chain of paper propagator means, each step restarted at the last mean (QSF eqs. 57-59).

  Step n applies QSF eqs. 57-58 to the point x_{n-1} with target x_tgt,n. Its
  mean is affine in x_{n-1} (gain form, spec §6.2):

    x_n = (I - G_n M)(U_n x_{n-1} + c_n) + G_n x_tgt,n,
    G_n = r Sigma_K,n M^T (r M Sigma_K,n M^T + I)^{-1},  r = dt/sigma_m^2,

  so the chain is again eq. 59's affine composition and can use the parallel scan.

  Args:
    x0: initial state (d,).
    A_seq: generators (d, d) or (N, d, d).
    b_seq: biases (d,) or (N, d).
    x_tgt_seq: targets per token (N, d).
    M: measurement matrix, the value projection W_V (d, d), or None (identity).
    dt: token step > 0.
    sigma_m: measurement noise > 0 (inf: no measurement, = ``chain_mean``).
    sigma_K: Koopman noise, finite > 0.
    method: "associative" or "sequential" (static).

  Returns:
    means (N, d).
  """
  _checks.check_choice("method", method, SCAN_METHODS)
  x0, A, b, y, M, N, r = _validate_measured(x0, A_seq, b_seq, x_tgt_seq, M, dt,
                                            sigma_m, sigma_K)
  d = x0.shape[0]

  squarings = _affine_squarings(A, b, dt)  # from every step's values, outside the vmap

  def step_map(A_DD, b_D):
    U, c = koopman_affine(A_DD, b_D, dt, max_squarings=squarings)
    S = koopman_cov(A_DD, sigma_K, dt)
    cB = jsl.cho_factor(r * (M @ S @ M.T) + jnp.eye(d, dtype=x0.dtype), lower=True)
    G = jsl.cho_solve(cB, r * (M @ S)).T
    IGM = jnp.eye(d, dtype=x0.dtype) - G @ M
    return IGM @ U, IGM @ c, G

  V_NDD, IGMc_ND, G_NDD = _per_step(step_map, A, b, N)
  # Sigma_K is formed inside the per-step map; a growing mode can overflow it.
  _checks.check_overflow(G_NDD, _checks.koopman_cov_message(x0.dtype))
  off_ND = IGMc_ND + jnp.einsum("nij,nj->ni", G_NDD, y)
  return scan_affine(x0, V_NDD, off_ND, method=method)
