"""Evaluation metrics and the affine-softmax lower bound (wave-function spec §2.2, §2.5).

All functions are NumPy float64: they measure results, so they should not
inherit float32 round-off from the model's dtype.
"""

from __future__ import annotations

import numpy as np


def double_centre(X_CK) -> np.ndarray:
  """Double centring J_C X J_K, J_n = I - 11^T/n (wave-function spec §2.2, fact 2).

  Removes any per-row term (the log-partition A(c)) and any per-column term (the
  bias b_k) of log p(k | c) = w_k^T h_c + b_k - A(c), so that for an affine-softmax
  model with state h_c in R^D the result has rank <= D.

  Args:
    X_CK: real matrix (C, K), e.g. log-probabilities.

  Returns:
    float64 (C, K).
  """
  X = _real_matrix("X_CK", X_CK)
  X = X - X.mean(axis=0, keepdims=True)
  return X - X.mean(axis=1, keepdims=True)


def centred_singular_values(P_CK) -> np.ndarray:
  """Singular values sigma_i of J_C log P J_K, descending (wave-function spec §2.5).

  Args:
    P_CK: probabilities, strictly positive (C, K).

  Returns:
    float64 (min(C, K),).
  """
  return np.linalg.svd(double_centre(_log_probs("P_CK", P_CK)), compute_uv=False)


def log_rank(P_CK, rtol: float = 1e-9) -> int:
  """Numerical rank of J_C log P J_K (the certificate of wave-function spec §2.5).

  For T_N on a generic set of C >= K contexts it equals K - 1 = 2N(N-1) - 1,
  which lower-bounds the state dimension D of any exact affine-softmax model.

  Args:
    P_CK: probabilities, strictly positive (C, K).
    rtol: singular values <= rtol * sigma_1 count as zero.

  Returns:
    The rank.
  """
  s = centred_singular_values(P_CK)
  return int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0


def eckart_young_bound(P_CK, dims) -> np.ndarray:
  """Lower bound on the rms double-centred log error at state dimension D (spec §2.5).

    ( ||J_C (log P_model - log P*) J_K||_F^2 / (C K) )^{1/2}
        >= ( sum_{i > D} sigma_i^2 / (C K) )^{1/2},

  for every model p = softmax(W h_c + b) with h_c in R^D (Eckart-Young: the
  model's centred log matrix has rank <= D).

  Args:
    P_CK: target probabilities, strictly positive (C, K).
    dims: state dimensions D >= 0 (scalar or (n,)).

  Returns:
    float64 bounds, same shape as ``dims``.
  """
  s = centred_singular_values(P_CK)
  C, K = np.shape(P_CK)
  dims = np.asarray(dims)
  if not np.issubdtype(dims.dtype, np.integer) or np.any(dims < 0):
    raise ValueError(f"dims must be non-negative integers, got {dims!r}")
  tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])  # tail[D] = sum_{i>D}
  return np.sqrt(tail[np.minimum(dims, s.size)] / (C * K))


def rms_centred_log_error(logQ_CK, P_CK) -> float:
  """The rms double-centred log error of a model (wave-function spec §2.5).

    ( ||J_C (log Q - log P*) J_K||_F^2 / (C K) )^{1/2}.

  Args:
    logQ_CK: model log-probabilities (C, K).
    P_CK: target probabilities, strictly positive (C, K).

  Returns:
    The rms error (float).
  """
  logQ = _real_matrix("logQ_CK", logQ_CK)
  logP = _log_probs("P_CK", P_CK)
  _same_shape(logQ, logP)
  E = double_centre(logQ - logP)
  return float(np.sqrt(np.mean(E**2)))


def expected_kl(logQ_CK, P_CK, weights_C) -> float:
  """Expected KL divergence sum_c w_c sum_k p*(k|c) log(p*(k|c) / q(k|c)) (spec §2.3).

  This is the excess of the exact expected cross-entropy over its floor, the
  expected target entropy; computed term by term to avoid cancellation.

  Args:
    logQ_CK: model log-probabilities (C, K).
    P_CK: target probabilities, strictly positive (C, K).
    weights_C: context probabilities summing to one (C,).

  Returns:
    The KL divergence in nats (float).
  """
  logQ = _real_matrix("logQ_CK", logQ_CK)
  eps = max(np.finfo(np.float64).eps, *(np.finfo(np.asarray(x).dtype).eps for x in
                                        (P_CK, weights_C)
                                        if np.issubdtype(np.asarray(x).dtype, np.floating)))
  logP = _log_probs("P_CK", P_CK)
  _same_shape(logQ, logP)
  w = np.asarray(weights_C, dtype=np.float64)
  if w.shape != (logP.shape[0],):
    raise ValueError(f"weights_C must have shape ({logP.shape[0]},), got {w.shape}")
  if not (np.all(np.isfinite(w)) and np.all(w >= 0)
          and abs(w.sum() - 1.0) <= max(1e-9, 10.0 * w.size * eps)):
    raise ValueError(f"weights_C must be non-negative and sum to 1 (a distribution over "
                     f"contexts), got sum {w.sum():.12g} and minimum {w.min():.3g}")
  row_sums = np.exp(logP).sum(axis=1)
  if np.abs(row_sums - 1.0).max() > max(1e-9, 10.0 * logP.shape[1] * eps):
    raise ValueError(f"each row of P_CK must sum to 1, got row sums in "
                     f"[{row_sums.min():.12g}, {row_sums.max():.12g}]")
  return float(w @ (np.exp(logP) * (logP - logQ)).sum(axis=1))


def _real_matrix(name, x):
  x = np.asarray(x)
  if np.iscomplexobj(x):
    raise ValueError(f"{name} must be real, got dtype {x.dtype}")
  if x.ndim != 2:
    raise ValueError(f"{name} must have 2 dimensions (C, K), got shape {x.shape}")
  return x.astype(np.float64)


def _log_probs(name, P):
  P = _real_matrix(name, P)
  if np.any(~(P > 0)):
    raise ValueError(f"{name} must be strictly positive (use eta > 0 for finite logs)")
  return np.log(P)


def _same_shape(a, b):
  if a.shape != b.shape:
    raise ValueError(f"logQ_CK and P_CK must have the same shape, got {a.shape} and {b.shape}")
