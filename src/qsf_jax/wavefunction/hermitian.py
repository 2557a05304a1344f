"""Hermitian, skew and isometric matrices built from real parameters.

Every trainable quantity of the wave-function model is real (wave-function spec
§1.6): complex matrices are assembled from real pairs inside the computation,
so that ``jax.grad`` of a real loss returns ordinary real gradients and optax
applies them correctly (the complex-gradient trap of the JAX conventions, §2.5).

  hermitian_from_real:  H = (X + X^T)/2 + (i/2)(Y - Y^T)        (spec §1.2)
  skew_from_real:       A = S - S^T                              (spec §1.3)
  isometry_from_real:   M = W (W^dagger W)^{-1/2}, W = W_re + i W_im   (spec §1.4)
  realify:              U -> [[Re U, -Im U], [Im U, Re U]]      (spec §1.3)

Complex precision follows the real inputs: float32 -> complex64, float64 ->
complex128 (the latter only with x64 enabled).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax import _checks


def mT(x):
  """Swaps the last two axes (matrix transpose of a batch of matrices)."""
  return jnp.swapaxes(x, -1, -2)


def dagger(x):
  """Conjugate transpose of the last two axes, x^dagger.

  Args:
    x: matrices (..., M, N), real or complex.

  Returns:
    x^dagger: (..., N, M).
  """
  return jnp.conj(mT(x))


def complex_dtype(*dtypes) -> jnp.dtype:
  """The complex dtype with the precision of ``dtypes`` (f32 -> c64, f64 -> c128)."""
  return jnp.result_type(*dtypes, jnp.complex64)


def eye_like(x_MN):
  """Identity matrices broadcast to ``x_MN.shape`` (..., N, N), without rank promotion."""
  n = x_MN.shape[-1]
  return jnp.broadcast_to(jnp.eye(n, dtype=x_MN.dtype), x_MN.shape)


def _real_pair(name_a, a, name_b, b, *, min_ndim=2):
  """Validates two real arrays of equal shape; returns them in a common float dtype."""
  a = _checks.as_array(name_a, a)
  b = _checks.as_array(name_b, b)
  if a.ndim < min_ndim:
    raise ValueError(
        f"{name_a} must have at least {min_ndim} dimensions, got shape {tuple(a.shape)}")
  if a.shape != b.shape:
    raise ValueError(
        f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} "
        f"and {tuple(b.shape)}")
  dtype = _checks.result_dtype(a, b)
  return a.astype(dtype), b.astype(dtype)


def hermitian_from_real(X, Y):
  """Complex Hermitian matrix from two real matrices (wave-function spec §1.2).

    H = (X + X^T)/2 + (i/2)(Y - Y^T),   H^dagger = H by construction.

  Args:
    X: real matrix giving the (symmetric) real part (..., N, N).
    Y: real matrix giving the (antisymmetric) imaginary part (..., N, N).

  Returns:
    H: complex Hermitian (..., N, N); complex64 for float32 input, complex128
    for float64 input.
  """
  X, Y = _real_pair("X", X, "Y", Y)
  _checks.check_square("X", X, batch_dims=None)
  re = 0.5 * (X + mT(X))
  im = 0.5 * (Y - mT(Y))
  return jax.lax.complex(re, im)


def skew_from_real(S):
  """Real antisymmetric matrix A = S - S^T (wave-function spec §1.3).

  A is the generator of the real orthogonal baseline: with H = iA the Cayley
  cell becomes Q = (I - dt A/2)^{-1}(I + dt A/2) in SO(D).

  Args:
    S: real matrix (..., D, D).

  Returns:
    A: real antisymmetric (..., D, D), A^T = -A.
  """
  S = _checks.as_array("S", S)
  _checks.check_square("S", S, batch_dims=None)
  S = S.astype(_checks.result_dtype(S))
  return S - mT(S)


@jax.custom_jvp
def _inv_sqrt_psd(G_NN):
  """G^{-1/2} for a Hermitian positive-definite G (..., N, N), via ``eigh``."""
  lam, V = jnp.linalg.eigh(G_NN)
  r = jax.lax.rsqrt(lam).astype(V.dtype)
  return (V * r[..., None, :]) @ dagger(V)


@_inv_sqrt_psd.defjvp
def _inv_sqrt_psd_jvp(primals, tangents):
  """Daleckii-Krein derivative of f(G) = G^{-1/2}, finite for repeated eigenvalues.

  d f(G) = V (F o (V^dagger dG V)) V^dagger with the divided differences
  F_ij = (f(l_i) - f(l_j)) / (l_i - l_j) = -1 / (s_i s_j (s_i + s_j)),  s = sqrt(l).
  The closed form has no 0/0 at l_i = l_j, where it equals f'(l_i), so the
  gradient stays finite when W is already an isometry (G = I).
  """
  (G_NN,), (dG_NN,) = primals, tangents
  lam, V = jnp.linalg.eigh(G_NN)
  s = jnp.sqrt(lam)
  r = (1.0 / s).astype(V.dtype)
  out = (V * r[..., None, :]) @ dagger(V)
  F_NN = -1.0 / (s[..., :, None] * s[..., None, :] * (s[..., :, None] + s[..., None, :]))
  dG_NN = 0.5 * (dG_NN + dagger(dG_NN))  # tangent of a Hermitian input
  inner = F_NN.astype(V.dtype) * (dagger(V) @ dG_NN @ V)
  return out, V @ inner @ dagger(V)


def isometry_from_real(W_re, W_im):
  """Isometry M with M^dagger M = I_N from a real pair (wave-function spec §1.4).

    W = W_re + i W_im,   M = W (W^dagger W)^{-1/2}   (polar factor of W).

  Convention: row k of M is the bra m_k^dagger, so (M psi)_k = <m_k|psi> and the
  rank-one POVM elements are M_k = m_k m_k^dagger, with sum_k M_k = M^dagger M = I_N
  (see ``born.born_probabilities``). The inverse square root uses ``eigh`` of
  the N x N Gram matrix with a custom derivative that is finite even for
  repeated eigenvalues (W already an isometry). W must have full column rank:
  a concrete W that is not finite is refused, and so is one whose result is not
  an isometry to 30 sqrt(eps) (max |M^dagger M - I|: 1e-2 in float32, 5e-7 in
  float64), which happens when W^dagger W is singular in W's precision (no
  polar factor; the result is NaN, or finite and wrong). Traced values are not
  checked. An ill-conditioned W gives a less accurate M.

  Args:
    W_re: real part of W (..., K, N), K >= N.
    W_im: imaginary part of W (..., K, N).

  Returns:
    M: complex isometry (..., K, N).
  """
  W_re, W_im = _real_pair("W_re", W_re, "W_im", W_im)
  K, N = W_re.shape[-2:]
  if K < N:
    raise ValueError(
        f"W_re must have at least as many rows as columns (K >= N) to give an "
        f"isometry, got shape {tuple(W_re.shape)}")
  _checks.check_finite("W_re", W_re)
  _checks.check_finite("W_im", W_im)
  W_KN = jax.lax.complex(W_re, W_im)
  G_NN = dagger(W_KN) @ W_KN
  M_KN = W_KN @ _inv_sqrt_psd(G_NN)
  if not isinstance(M_KN, jax.core.Tracer):  # concrete (inside jit even constants trace)
    N = W_re.shape[-1]
    gram = dagger(M_KN) @ M_KN
    eye = jnp.broadcast_to(jnp.eye(N, dtype=gram.dtype), gram.shape)
    err = float(jnp.max(jnp.abs(gram - eye), initial=0.0))  # NaN propagates
    tol = 30.0 * float(np.sqrt(jnp.finfo(W_re.dtype).eps))
    if not err <= tol:
      raise ValueError(
          f"W_re + i W_im must have full column rank (N={N}) for an isometry: W^dagger W "
          f"is singular in {W_re.dtype} precision, and the result has max |M^dagger M - I| "
          f"= {err:.3g} > {tol:.2g} (shape {tuple(W_re.shape)})")
  return M_KN


def realify(U):
  """Real 2N x 2N form of a complex matrix (wave-function spec §1.3).

    realify(U) = [[Re U, -Im U], [Im U, Re U]],

  an algebra homomorphism (realify(U1 U2) = realify(U1) realify(U2)) that maps
  U(N) into SO(2N); it acts on ``realify_state(psi) = [Re psi, Im psi]``.

  Args:
    U: complex (or real) matrix (..., N, N).

  Returns:
    R: real (..., 2N, 2N).
  """
  U = _checks.as_array("U", U, allow_complex=True)
  _checks.check_square("U", U, batch_dims=None)
  U = U.astype(complex_dtype(U.dtype))
  re, im = jnp.real(U), jnp.imag(U)
  top = jnp.concatenate([re, -im], axis=-1)
  bottom = jnp.concatenate([im, re], axis=-1)
  return jnp.concatenate([top, bottom], axis=-2)


def realify_state(psi):
  """Real 2N form of a complex state, [Re psi, Im psi] (wave-function spec §1.3).

  Args:
    psi: complex (or real) state (..., N).

  Returns:
    x: real (..., 2N), with realify(U) x == realify_state(U psi).
  """
  psi = _checks.as_array("psi", psi, allow_complex=True)
  if psi.ndim < 1:
    raise ValueError(f"psi must have shape (..., N), got {tuple(psi.shape)}")
  psi = psi.astype(complex_dtype(psi.dtype))
  return jnp.concatenate([jnp.real(psi), jnp.imag(psi)], axis=-1)


def random_hermitian(key, N: int, scale=None, dtype=jnp.float32, *, batch_shape=()):
  """Random Hermitian matrix with the spec's initialisation (wave-function spec §1.2).

    H = (X + X^T)/2 + (i/2)(Y - Y^T),   X_ij, Y_ij ~ N(0, scale^2),
  with scale = 1/sqrt(N) by default, so that ||H|| = O(1).

  Args:
    key: PRNG key.
    N: Hilbert-space dimension.
    scale: standard deviation of the entries of X and Y (default 1/sqrt(N)).
    dtype: real dtype of X and Y (float32 -> complex64 output; 16-bit floats
      draw X and Y in that precision and give complex64).
    batch_shape: leading batch shape of the result (non-negative ints).

  Returns:
    H: complex Hermitian (*batch_shape, N, N).
  """
  _checks.check_prng_key("key", key)
  N = _checks.check_int("N", N, 1)  # a static size; numpy ints pass, tracers are named
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a real floating dtype, got {dtype}")
  scale = 1.0 / N ** 0.5 if scale is None else scale
  _checks.check_positive("scale", scale)
  try:
    batch = tuple(_checks.check_int("batch_shape entry", n, 0) for n in batch_shape)
  except TypeError:
    raise ValueError(f"batch_shape must be a tuple of ints, got {batch_shape!r}") from None
  kx, ky = jax.random.split(key)
  shape = batch + (N, N)
  X = scale * jax.random.normal(kx, shape, dtype)
  Y = scale * jax.random.normal(ky, shape, dtype)
  return hermitian_from_real(X, Y)
