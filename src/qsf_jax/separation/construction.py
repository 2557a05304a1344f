"""Explicit parameters that solve T_N exactly (wave-function spec §2.4, §1.3 realification).

The complex model of dimension N:
  * word token: H_w = i A_w with A_w = (2/dt)(R - I)(R + I)^{-1}, where R is the
    plane rotation taking e_1 to the uniform superposition 1/sqrt(N) (angle
    arccos(1/sqrt(N)) < pi/2, so R has no eigenvalue -1 and the inverse Cayley
    map exists); then Cayley(H_w) e_1 = 1/sqrt(N);
  * cue a: H_a = diag(lambda^(a)), lambda_j = (2/dt) tan(theta^(a)_j / 2), so that
    Cayley(H_a) = diag(exp(-i theta^(a)));
  * readout: the POVM of spec §2.3, rows m_k^dagger, with the task's eta.
The realified control of dimension 2N uses A_v = realify(-i H_v), for which
Cayley_real(A_v) = realify(Cayley(H_v)), and the real rows of realify(m_k^dagger).
Parameters are computed in NumPy float64 and cast to the requested dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qsf_jax.separation.models import ModelConfig
from qsf_jax.tasks.separation import SeparationTask, povm_vectors


def rotation_to(u_D) -> np.ndarray:
  """Rotation R in SO(D) with R e_1 = u, acting in span(e_1, u) (spec §2.4, §2.6).

    R = I + (cos a - 1)(e_1 e_1^T + v v^T) + sin a (v e_1^T - e_1 v^T),
    cos a = u_1,   v = (u - e_1 cos a) / sin a   (R = I when u = e_1).

  The angle a is below pi when u_1 > -1, so R has no eigenvalue -1 and a real
  Cayley generator (``inverse_cayley_real``).

  Args:
    u_D: unit vector (D,), D >= 2, with u_1 > -1.

  Returns:
    float64 (D, D).
  """
  u = np.asarray(u_D, np.float64)
  if u.ndim != 1 or u.size < 2 or abs(np.linalg.norm(u) - 1.0) > 1e-12:
    raise ValueError(f"u_D must be a unit vector of length >= 2, got shape {u.shape}")
  if u[0] <= -1.0 + 1e-12:
    raise ValueError("u_D = -e_1 needs a rotation by pi, which has no Cayley generator")
  D = u.size
  e1 = np.eye(D)[0]
  cos_a = u[0]
  sin_a = np.linalg.norm(u - cos_a * e1)
  if sin_a == 0.0:
    return np.eye(D)
  v = (u - cos_a * e1) / sin_a
  return (np.eye(D) + (cos_a - 1.0) * (np.outer(e1, e1) + np.outer(v, v))
          + sin_a * (np.outer(v, e1) - np.outer(e1, v)))


def word_rotation(N: int) -> np.ndarray:
  """Rotation R in SO(N) with R e_1 = 1/sqrt(N), acting in span(e_1, 1) (spec §2.4).

  ``rotation_to`` the uniform superposition, cos a = 1/sqrt(N).

  Args:
    N: dimension (>= 2).

  Returns:
    float64 (N, N).
  """
  if N < 2:
    raise ValueError(f"N must be >= 2, got {N}")
  return rotation_to(np.full(N, 1.0 / np.sqrt(N)))


def inverse_cayley_real(Q_DD, dt: float = 1.0) -> np.ndarray:
  """The skew A with (I - dt A/2)^{-1}(I + dt A/2) = Q (inverse of spec §1.3's real Cayley map).

    A = (2/dt) (Q - I)(Q + I)^{-1},

  defined when Q has no eigenvalue -1. A complex model uses H = i A, for which
  Cayley(H) = Q.

  Args:
    Q_DD: real orthogonal matrix (D, D), float64.
    dt: Cayley step length.

  Returns:
    float64 antisymmetric (D, D).
  """
  in_eps = (np.finfo(np.asarray(Q_DD).dtype).eps
            if np.issubdtype(np.asarray(Q_DD).dtype, np.floating) else 0.0)
  Q = np.asarray(Q_DD, np.float64)
  if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
    raise ValueError(f"Q_DD must be a square matrix, got shape {Q.shape}")
  if not (np.isfinite(dt) and dt > 0):
    raise ValueError(f"dt must be finite and > 0, got {dt!r}")
  I = np.eye(Q.shape[-1])
  err = float(np.abs(Q.T @ Q - I).max()) if Q.size else 0.0
  tol = max(1e-8, 100.0 * Q.shape[0] * in_eps)  # float32 input: its own rounding
  if not err <= tol:  # a non-orthogonal Q gave a skew A whose Cayley map is not Q
    raise ValueError(f"Q_DD must be orthogonal (max |Q^T Q - I| = {err:.3g} > {tol:.2g})")
  if np.linalg.cond(Q + I) > 1e12:
    raise ValueError("Q has an eigenvalue -1 (a rotation by pi): no real Cayley generator")
  A = (2.0 / dt) * np.linalg.solve((Q + I).T, (Q - I).T).T  # (Q - I)(Q + I)^{-1}
  return 0.5 * (A - A.T)  # exact antisymmetry (it is antisymmetric up to rounding)


def hardcoded_hamiltonians(task: SeparationTask, dt: float = 1.0):
  """Per-token Hamiltonians H_v = X_v + i Y_v of the exact complex model (spec §2.4).

    H_w = i (2/dt)(R - I)(R + I)^{-1},   H_a = diag((2/dt) tan(theta^(a) / 2)).

  Args:
    task: the T_N instance (cue phases must lie in (-pi, pi)).
    dt: Cayley step length.

  Returns:
    (X_VNN, Y_VNN): float64 symmetric and antisymmetric parts, each (A + 1, N, N).
  """
  N, A = task.N, task.num_cues
  if np.any(np.abs(task.theta_AN) >= np.pi):
    raise ValueError("cue phases must lie in (-pi, pi) for the Cayley construction")
  X = np.zeros((A + 1, N, N))
  Y = np.zeros((A + 1, N, N))
  Y[0] = inverse_cayley_real(word_rotation(N), dt)
  lam_AN = (2.0 / dt) * np.tan(0.5 * task.theta_AN)
  X[1:, np.arange(N), np.arange(N)] = lam_AN
  return X, Y


def hardcoded_complex(task: SeparationTask, dt: float = 1.0, dtype=jnp.float64):
  """The complex N-dimensional model that outputs p* exactly (wave-function spec §2.4).

  Args:
    task: the T_N instance.
    dt: Cayley step length.
    dtype: real parameter dtype.

  Returns:
    (params, cfg): parameters for ``models.log_probs`` and their ``ModelConfig``.
  """
  X, Y = hardcoded_hamiltonians(task, dt)
  m_re, m_im = povm_vectors(task.N)
  cfg = ModelConfig(kind="complex", dim=task.N, num_tokens=task.num_tokens,
                    num_outcomes=task.K, eta=task.eta, dt=dt)
  params = {"X": X, "Y": Y, "W_re": m_re, "W_im": -m_im}  # rows m_k^dagger
  return {k: jnp.asarray(v, dtype) for k, v in params.items()}, cfg


def hardcoded_realified(task: SeparationTask, dt: float = 1.0, dtype=jnp.float64):
  """The realified 2N-dimensional control that outputs p* exactly (spec §1.3, §2.2).

    A_v = realify(-i H_v) = [[Y_v, X_v], [-X_v, Y_v]]   (H_v = X_v + i Y_v),
    R_k = [[Re m_k, Im m_k], [-Im m_k, Re m_k]]   (real form of m_k^dagger).

  Args:
    task: the T_N instance.
    dt: Cayley step length.
    dtype: real parameter dtype.

  Returns:
    (params, cfg): parameters for ``models.log_probs`` and their ``ModelConfig``.
  """
  X, Y = hardcoded_hamiltonians(task, dt)
  A_v = np.concatenate([np.concatenate([Y, X], axis=2), np.concatenate([-X, Y], axis=2)],
                       axis=1)
  m_re, m_im = povm_vectors(task.N)
  R = np.stack([np.concatenate([m_re, m_im], axis=1),
                np.concatenate([-m_im, m_re], axis=1)], axis=1).reshape(2 * task.K, 2 * task.N)
  cfg = ModelConfig(kind="realified", dim=2 * task.N, num_tokens=task.num_tokens,
                    num_outcomes=task.K, eta=task.eta, dt=dt)
  params = {"S": 0.5 * A_v, "R": R}  # skew_from_real(S) = S - S^T = A_v
  return {k: jnp.asarray(v, dtype) for k, v in params.items()}, cfg
