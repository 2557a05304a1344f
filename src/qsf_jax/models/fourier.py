"""Causal Fourier sequence mixing (QSF §3.2 Stage I, §3.3 Stage II S2-a; D2, D3).

With C_n[j, k] = cos(2 pi j k / n), S_n[j, k] = sin(2 pi j k / n) and the
lower-triangular mask M (M_ts = 1 iff s <= t), Stage I mixes

  CFM(X) = Re[(M o F_T) X F_d] / c = [(M o C_T) X C_d - (M o S_T) X S_d] / c,
  c_t = sqrt((t + 1) d),

with the DFT length fixed at T = T_max (the config's ``max_seq_len``), so that
position t never depends on the actual sequence length. Stage II (S2-a)
replaces the hidden-dimension DFT by the learnable K; since K is real only the
cosine part survives: diag(c')^{-1} (M o C_T) X K^T, c'_t = sqrt(t + 1).

The mixing is not shift-invariant (C_T[t, s] depends on t s, not on t - s), so
it has no finite recurrent state; decoding is exact with a cache of the past
mixer inputs, O(t d) work per token (:class:`PastInputs`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qsf_jax import _checks


@functools.lru_cache(maxsize=16)
def dft_matrices(n: int) -> tuple[np.ndarray, np.ndarray]:
  """C_n and S_n (QSF §3.2), exact to float64 rounding.

  The phase uses the integer j k mod n, so large n loses no accuracy.

  Args:
    n: size.

  Returns:
    (C, S): float64 (n, n) with C[j, k] = cos(2 pi j k / n), S = sin(...).
  """
  j = np.arange(n, dtype=np.int64)
  phase = 2.0 * np.pi * (np.outer(j, j) % n) / n
  return np.cos(phase), np.sin(phase)


@functools.lru_cache(maxsize=16)
def _masked_sequence_dft(t_max: int) -> tuple[np.ndarray, np.ndarray]:
  """(M o C_T, M o S_T) in float32 (t_max, t_max)."""
  C, S = dft_matrices(t_max)
  mask = np.tril(np.ones((t_max, t_max)))
  return (C * mask).astype(np.float32), (S * mask).astype(np.float32)


def _ein(spec, a, b, dtype):
  """``einsum(spec, a, b)`` with ``dtype`` operands and float32 accumulation."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32)


def _check_seq(x_BTD, t_max):
  x_BTD = _checks.as_array("x_BTD", x_BTD)
  _checks.check_ndim("x_BTD", x_BTD, 3)
  if x_BTD.shape[1] > t_max:
    raise ValueError(
        f"x_BTD has {x_BTD.shape[1]} positions (shape {tuple(x_BTD.shape)}), more than "
        f"the DFT length t_max={t_max}")
  return x_BTD


def causal_fourier_mix(x_BTD, *, t_max, scale=True, dtype=jnp.float32):
  """Stage-I causal Fourier mixing CFM(X) (QSF §3.2, decision D3).

    CFM(X)_t = [(M o C_T) X C_d - (M o S_T) X S_d]_t / sqrt((t + 1) d),

  with T = ``t_max`` (the first ``x_BTD.shape[1]`` rows and columns are used).

  Args:
    x_BTD: mixer input (B, T, d), T <= t_max.
    t_max: the fixed DFT length T_max.
    scale: apply the row scale c_t (False: original-FNet unscaled, D3 alt.).
    dtype: matmul operand dtype (accumulation is float32).

  Returns:
    (B, T, d) float32.
  """
  x_BTD = _check_seq(x_BTD, t_max)
  T, d = x_BTD.shape[1:]
  Mc, Ms = (m[:T, :T] for m in _masked_sequence_dft(t_max))
  Cd, Sd = (m.astype(np.float32) for m in dft_matrices(d))
  a_BTD = _ein("ts,bsd->btd", Mc, x_BTD, dtype)
  b_BTD = _ein("ts,bsd->btd", Ms, x_BTD, dtype)
  out_BTD = _ein("btd,de->bte", a_BTD, Cd, dtype) - _ein("btd,de->bte", b_BTD, Sd, dtype)
  if scale:
    c_1T1 = np.sqrt((np.arange(T) + 1.0) * d).astype(np.float32)[None, :, None]
    out_BTD = out_BTD / c_1T1
  return out_BTD


def causal_cosine_mix(x_BTD, *, t_max, dtype=jnp.float32):
  """Sequence part of Stage-II S2-a mixing (QSF §3.3, decision D2).

    Y_t = [(M o C_T) X]_t / sqrt(t + 1);   the layer then applies K: Y K^T.

  Args:
    x_BTD: mixer input (B, T, d), T <= t_max.
    t_max: the fixed DFT length T_max.
    dtype: matmul operand dtype (accumulation is float32).

  Returns:
    (B, T, d) float32.
  """
  x_BTD = _check_seq(x_BTD, t_max)
  T = x_BTD.shape[1]
  Mc = _masked_sequence_dft(t_max)[0][:T, :T]
  c_1T1 = np.sqrt(np.arange(T) + 1.0).astype(np.float32)[None, :, None]
  return _ein("ts,bsd->btd", Mc, x_BTD, dtype) / c_1T1


class PastInputs(nn.Module):
  """Decode cache of past mixer inputs for the exact Fourier/cosine mixing.

  Stores x_s for s <= t in a ``"cache"`` variable ``inputs`` (B, T_max, d)
  and returns the mixing of row t, identical to row t of the full forward.

  Attributes:
    t_max: T_max.
    kind: "fourier" (Stage I, with ``scale``) or "cosine" (Stage II S2-a).
    scale: Stage I row scale (D3).
    dtype: matmul operand dtype.
  """
  t_max: int
  kind: str
  scale: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_B1D, t):
    """Appends x_t to the cache and returns the mixed row t (B, 1, d) float32.

    Args:
      x_B1D: mixer input at position t (B, 1, d).
      t: position (int32 scalar, may be traced), t < t_max.
    """
    B, _, d = x_B1D.shape
    cache = self.variable("cache", "inputs",
                          lambda: jnp.zeros((B, self.t_max, d), jnp.float32))
    if self.is_initializing():
      # Creating the cache only; decoding starts from the zero cache.
      return jnp.zeros((B, 1, d), jnp.float32)
    xs_BTD = cache.value.at[:, t].set(x_B1D[:, 0].astype(jnp.float32))
    cache.value = xs_BTD
    Mc, Ms = (jnp.asarray(m) for m in _masked_sequence_dft(self.t_max))
    # Row t of the masked DFT; the mask zeroes positions s > t.
    a_BD = _ein("s,bsd->bd", Mc[t], xs_BTD, self.dtype)
    if self.kind == "cosine":
      return (a_BD / jnp.sqrt(t + 1.0))[:, None, :]
    b_BD = _ein("s,bsd->bd", Ms[t], xs_BTD, self.dtype)
    Cd, Sd = (m.astype(np.float32) for m in dft_matrices(d))
    out_BD = _ein("bd,de->be", a_BD, Cd, self.dtype) - _ein("bd,de->be", b_BD, Sd, self.dtype)
    if self.scale:
      out_BD = out_BD / jnp.sqrt((t + 1.0) * d)
    return out_BD[:, None, :]
