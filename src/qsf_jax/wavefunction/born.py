"""Born-rule readouts of a wave function (wave-function spec §1.4).

Convention used throughout: a measurement matrix M (K, N) is the *analysis
operator* whose row k is the bra m_k^dagger, so that

  (M psi)_k = <m_k|psi> = m_k^dagger psi,   p_k = |(M psi)_k|^2 = psi^dagger M_k psi,
  M_k = m_k m_k^dagger,   sum_k M_k = M^dagger M.

``isometry_from_real`` returns such an M with M^dagger M = I_N, so {M_k} is a
rank-one POVM and sum_k p_k = ||psi||^2 = 1. Given measurement vectors m_k
stored as the rows of an array ``m`` (K, N), pass ``M = m.conj()``.

Batch axes: an operator is either shared by all states (M (K, N), Ms (K, N, N))
or given one per state, with the states' leading axes (M (..., K, N) for psi
(..., N)), as ``isometry_from_real`` returns for batched real pairs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qsf_jax import _checks, _checks_values
from qsf_jax.wavefunction.hermitian import complex_dtype


def _operator_and_state(name_M, M, psi, *, ndim_M=2):
  """Validates a measurement operator and psi (..., N); returns both complex.

  ``M`` has ``ndim_M`` axes of its own, ending in N, and either no batch axes or
  those of ``psi`` (``_checks.check_batch_axes``).
  """
  M = _checks.as_array(name_M, M, allow_complex=True)
  if M.ndim < ndim_M:
    raise ValueError(
        f"{name_M} must have at least {ndim_M} dimensions, got shape {tuple(M.shape)}")
  N = M.shape[-1]
  psi = _checks.as_array("psi", psi, allow_complex=True)
  if psi.ndim < 1 or psi.shape[-1] != N:
    raise ValueError(
        f"psi must have shape (..., {N}) to match {name_M} of shape "
        f"{tuple(M.shape)}, got {tuple(psi.shape)}")
  _checks.check_batch_axes(name_M, M.shape, ndim_M, "psi", psi.shape)
  _checks.check_finite(name_M, M)
  _checks.check_finite("psi", psi)
  dtype = complex_dtype(M.dtype, psi.dtype)
  return M.astype(dtype), psi.astype(dtype)


def amplitudes(M, psi):
  """Measurement amplitudes a_k = m_k^dagger psi = (M psi)_k (wave-function spec §1.4).

  Args:
    M: analysis operator, rows m_k^dagger (K, N), or one per state (..., K, N).
    psi: state(s) (..., N).

  Returns:
    a: complex amplitudes (..., K).
  """
  return _amplitudes("M", M, psi)


def _amplitudes(name_M, M, psi):
  """(M psi)_k with ``M`` validated under the caller's argument name."""
  M, psi = _operator_and_state(name_M, M, psi)
  return jnp.einsum("...kn,...n->...k", M, psi)


def born_probabilities(M, psi, eta=0.0):
  """Rank-one Born probabilities with optional unsharpness (wave-function spec §1.4).

    p_k = (1 - eta) |m_k^dagger psi|^2 + eta / K,

  which equals psi^dagger M_k^eta psi for the unsharp POVM
  M_k^eta = (1 - eta) m_k m_k^dagger + (eta/K) I at ||psi|| = 1; hence
  p_k >= eta/K and, for an isometry M, sum_k p_k = 1 with no softmax.

  Args:
    M: analysis operator, rows m_k^dagger (K, N), or one per state
      (..., K, N); an isometry for a POVM.
    psi: state(s), unit norm (..., N).
    eta: unsharpness in [0, 1] (scalar).

  Returns:
    p: real probabilities (..., K).
  """
  _checks.check_unit_interval("eta", eta)  # the shape under jit too
  a = amplitudes(M, psi)
  K = a.shape[-1]
  p = jnp.real(a) ** 2 + jnp.imag(a) ** 2
  eta = jnp.asarray(eta, p.dtype)
  return (1.0 - eta) * p + eta / K


def povm_from_isometry(M, eta=0.0):
  """POVM elements M_k^eta = (1 - eta) m_k m_k^dagger + (eta/K) I (spec §1.4).

  Args:
    M: analysis operator, rows m_k^dagger (..., K, N).
    eta: unsharpness in [0, 1] (scalar).

  Returns:
    Ms: complex Hermitian PSD matrices (..., K, N, N);
    (Ms[..., k, :, :])_ab = conj(M_ka) M_kb.
  """
  M = _checks.as_array("M", M, allow_complex=True)
  if M.ndim < 2:
    raise ValueError(f"M must have at least 2 dimensions (K, N), got shape {tuple(M.shape)}")
  _checks.check_unit_interval("eta", eta)  # the shape under jit too
  M = M.astype(complex_dtype(M.dtype))
  K, N = M.shape[-2:]
  Ms = jnp.conj(M)[..., :, :, None] * M[..., :, None, :]
  eye = jnp.broadcast_to(jnp.eye(N, dtype=M.dtype), Ms.shape)
  eta = jnp.asarray(eta, M.real.dtype)
  return (1.0 - eta) * Ms + (eta / K) * eye


def povm_probabilities(Ms, psi):
  """General POVM Born rule p_k = psi^dagger M_k psi = Tr(M_k rho) (spec §1.4).

  With {M_k} PSD and sum_k M_k = I, p_k >= 0 and sum_k p_k = ||psi||^2. The
  imaginary part, zero for Hermitian M_k, is discarded.

  Args:
    Ms: POVM elements, Hermitian PSD (K, N, N), or one set per state (..., K, N, N).
    psi: state(s) (..., N).

  Returns:
    p: real probabilities (..., K).
  """
  Ms = _checks.as_array("Ms", Ms, allow_complex=True)
  _checks.check_square("Ms", Ms, batch_dims=None)
  Ms, psi = _operator_and_state("Ms", Ms, psi, ndim_M=3)
  _checks.check_hermitian("Ms", Ms)  # else the discarded imaginary part is not zero
  return jnp.real(jnp.einsum("...a,...kab,...b->...k", jnp.conj(psi), Ms, psi))


def born_logits(W, psi, beta=1.0, bias=None):
  """Born-logit head for large vocabularies (wave-function spec §1.4).

    logits_k = beta |(W psi)_k|^2 + b_k,   p = softmax(logits) (outside),

  the practical fallback when V >> N, since a rank-one POVM can make at most
  about N tokens near-deterministic.

  Args:
    W: complex readout, rows w_k^dagger (V, N), built from real parts by the
      caller, or one per state (..., V, N).
    psi: state(s) (..., N).
    beta: real inverse temperature (scalar; may be a traced parameter).
    bias: real bias b (V,), or None.

  Returns:
    logits: real (..., V).
  """
  a = _amplitudes("W", W, psi)
  sq = jnp.real(a) ** 2 + jnp.imag(a) ** 2
  beta = _checks.as_array("beta", beta)
  _checks.check_ndim("beta", beta, 0)
  _checks.check_finite("beta", beta)
  logits = beta.astype(sq.dtype) * sq
  if bias is not None:
    bias = _checks.as_array("bias", bias)
    _checks.check_shape("bias", bias, (logits.shape[-1],))
    _checks.check_finite("bias", bias)
    logits = logits + jnp.broadcast_to(bias.astype(sq.dtype), logits.shape)
  return logits


def normalized_born(W, psi):
  """Normalised Born readout for a non-isometric W (wave-function spec §1.4).

    p_k = |(W psi)_k|^2 / psi^dagger (W^dagger W) psi = |(W psi)_k|^2 / ||W psi||^2.

  max_psi p_k is the leverage score w_k^dagger (W^dagger W)^{-1} w_k, and the
  leverage scores sum to N.

  Args:
    W: complex readout, rows w_k^dagger (V, N), or one per state (..., V, N).
    psi: nonzero state(s) (..., N).

  Returns:
    p: real probabilities (..., V), summing to one.

  Raises:
    ValueError: for a concrete psi with W psi = 0 (psi = 0, or psi in W's
      kernel), where p is undefined.
  """
  a = _amplitudes("W", W, psi)
  sq = jnp.real(a) ** 2 + jnp.imag(a) ** 2
  total = jnp.sum(sq, axis=-1, keepdims=True)
  t = _checks_values._concrete(total)  # pylint: disable=protected-access
  if t is not None and not np.all(t > 0):
    raise ValueError("W psi = 0 for some state (psi = 0, or psi in the kernel of W): its "
                     "normalised Born probabilities are undefined")
  return sq / total
