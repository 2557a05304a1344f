"""The Born-logit variant of the separation task (wave-function spec §2.6).

The contexts and the measurement vectors are those of T_N (spec §2.3): an
ambiguous word puts the state in the uniform superposition psi_0 = 1/sqrt(N),
each cue a applies U_a = Cayley(H_a) (dt = 1), and the K = 2N(N-1) outputs
k = (j, l, m) carry the rank-one POVM elements M_k = m_k m_k^dagger. The target
is the softmax of the Born probabilities instead of the probabilities
themselves:

  p*(k | c) = softmax_k(beta Tr(M_k rho_c)),   rho_c = psi_c psi_c^dagger.

The double-centred log-target beta J_C [Tr(M_k rho_c)] J_K is then linear in
rho_c - I/N, so its rank is the dimension of the span of the context states'
traceless parts:

  contexts="phase":   H_a = diag(2 tan(theta^(a)/2)), theta^(a) ~ U(-pi, pi)^N (the
                      cue phases of ``tasks.separation.make_task`` with the same
                      seed), so psi_c = exp(-i Phi(c))/sqrt(N) and rho_c - I/N is
                      off-diagonal: rank N(N-1);
  contexts="generic": H_a = herm(X_a, Y_a), X, Y ~ N(0, 1/N): rank N^2 - 1 (the
                      POVM is informationally complete for N >= 3).

A real orthogonal model with an affine-softmax readout of exactly that dimension
solves it (the adjoint representation, ``separation.adjoint``), and none of
smaller dimension can (spec §2.5's Eckart-Young bound): a tight quadratic gap
against the complex model's N.

Everything here is NumPy float64, like ``tasks.separation``.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from qsf_jax.tasks.separation import (ContextTask, _check_int, all_contexts, check_target_size,
                                      num_outcomes, povm_vectors)

CONTEXTS = ("phase", "generic")


def hermitian_basis(N: int, *, offdiagonal_only: bool = False) -> np.ndarray:
  """Orthonormal basis of the traceless Hermitian N x N matrices (spec §2.6).

  Tr(B_i B_j) = delta_ij. For each pair j < l, in lexicographic order,

    S_jl = (E_jl + E_lj) / sqrt(2),   A_jl = i (E_lj - E_jl) / sqrt(2),

  then the N - 1 diagonal generalised Gell-Mann matrices
  diag(1, ..., 1, -n, 0, ..., 0) / sqrt(n (n + 1)), n = 1 .. N-1.

  Args:
    N: matrix size (>= 2).
    offdiagonal_only: keep only the N(N-1) off-diagonal elements S_jl, A_jl,
      which span the traceless parts of the phase states.

  Returns:
    complex128 (N^2 - 1, N, N), or (N(N-1), N, N) with ``offdiagonal_only``.
  """
  _check_int("N", N, minimum=2)
  basis = []
  for j, l in itertools.combinations(range(N), 2):
    S = np.zeros((N, N), complex)
    S[j, l] = S[l, j] = 1 / np.sqrt(2)
    A = np.zeros((N, N), complex)
    A[l, j], A[j, l] = 1j / np.sqrt(2), -1j / np.sqrt(2)
    basis += [S, A]
  if not offdiagonal_only:
    for n in range(1, N):
      d = np.zeros(N)
      d[:n], d[n] = 1.0, -float(n)
      basis.append(np.diag(d / np.sqrt(n * (n + 1))).astype(complex))
  return np.stack(basis)


def cayley(H_NN, dt: float = 1.0) -> np.ndarray:
  """U = (I + i dt H/2)^{-1} (I - i dt H/2) in float64 (wave-function spec §1.3).

  Args:
    H_NN: Hermitian matrices (..., N, N).
    dt: step length.

  Returns:
    complex128 unitary (..., N, N).
  """
  H = np.asarray(H_NN, complex)
  I = np.eye(H.shape[-1])
  return np.linalg.solve(I + 0.5j * dt * H, I - 0.5j * dt * H)


def cue_hamiltonians(N: int, num_cues: int, contexts: str, seed: int) -> np.ndarray:
  """The cue Hamiltonians H_a of the Born-logit task (spec §2.4, §2.6).

    phase:    H_a = diag(2 tan(theta^(a)/2)),  theta^(a) ~ U(-pi, pi)^N, so that
              Cayley(H_a) = diag(exp(-i theta^(a))) (the draw of ``make_task``);
    generic:  H_a = (X_a + X_a^T)/2 + i (Y_a - Y_a^T)/2,  X, Y ~ N(0, 1/N).

  Returns:
    complex128 Hermitian (A, N, N).
  """
  if contexts not in CONTEXTS:  # anything but "phase" used to give the generic draw
    raise ValueError(f"contexts must be one of {list(CONTEXTS)}, got {contexts!r}")
  _check_int("N", N, minimum=1)
  _check_int("num_cues", num_cues, minimum=1)
  _check_int("seed", seed, minimum=0)
  rng = np.random.default_rng(seed)
  if contexts == "phase":
    theta_AN = rng.uniform(-np.pi, np.pi, size=(num_cues, N))
    H = np.zeros((num_cues, N, N), complex)
    H[:, np.arange(N), np.arange(N)] = 2.0 * np.tan(0.5 * theta_AN)
    return H
  X = rng.normal(0.0, 1.0 / np.sqrt(N), size=(num_cues, N, N))
  Y = rng.normal(0.0, 1.0 / np.sqrt(N), size=(num_cues, N, N))
  sw = lambda x: np.swapaxes(x, -1, -2)
  return 0.5 * (X + sw(X)) + 0.5j * (Y - sw(Y))


def _check_beta(beta) -> None:
  if (isinstance(beta, (bool, np.bool_))
      or not isinstance(beta, (int, float, np.integer, np.floating))
      or not np.isfinite(beta) or beta <= 0):
    raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def born_logit_targets(psi_CN, beta: float) -> tuple[np.ndarray, np.ndarray]:
  """Logits beta Tr(M_k rho_c) = beta |m_k^dagger psi_c|^2 and their softmax (spec §2.6).

  Args:
    psi_CN: context states, complex (C, N).
    beta: inverse temperature (> 0).

  Returns:
    (logits_CK, probs_CK), float64.
  """
  _check_beta(beta)
  psi = np.asarray(psi_CN, complex)
  if psi.ndim != 2:
    raise ValueError(f"psi_CN must have 2 dimensions (C, N), got shape {psi.shape}")
  m_re, m_im = povm_vectors(psi.shape[1])
  logits = beta * np.abs(psi @ (m_re - 1j * m_im).T) ** 2  # row k of M is m_k^dagger
  z = logits - logits.max(axis=1, keepdims=True)
  P = np.exp(z)
  if not np.all(P > 0):  # exp underflows below about -745 in float64
    span = float(-z.min())
    raise ValueError(
        f"beta = {beta!r} is too large: the target softmax underflows to 0 (the logits of a "
        f"context span {span:.4g}, exp(-{span:.4g}) = 0 in float64), and the KL needs every "
        f"target probability > 0; use beta <= {beta * 700.0 / span:.4g}")
  return logits, P / P.sum(axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True, eq=False)
class BornLogitTask(ContextTask):
  """One instance of the Born-logit task with every context and its target (spec §2.6).

  Attributes:
    N: number of latent senses.
    num_cues: A.
    length: L.
    contexts: "phase" or "generic" (see the module docstring).
    beta: inverse temperature of the target softmax.
    seed: seed of the cue Hamiltonians.
    H_ANN: cue Hamiltonians, complex128 Hermitian (A, N, N); U_a = Cayley(H_a), dt = 1.
    tokens_CT: input sequences (w, a_1 + 1, ..., a_L + 1), int (C, L + 1).
    weights_C: context probabilities, uniform (C,).
    psi_CN: context states U_{a_L} ... U_{a_1} psi_0, complex128 (C, N).
    logits_CK: beta Tr(M_k rho_c) (C, K).
    probs_CK: the targets softmax(logits) (C, K).
  """
  N: int
  num_cues: int
  length: int
  contexts: str
  beta: float
  seed: int
  H_ANN: np.ndarray
  tokens_CT: np.ndarray
  weights_C: np.ndarray
  psi_CN: np.ndarray
  logits_CK: np.ndarray
  probs_CK: np.ndarray

  @property
  def exact_real_dim(self) -> int:
    """D* = N(N-1) (phase) or N^2 - 1 (generic): the smallest exact affine-softmax dimension."""
    return self.N * (self.N - 1) if self.contexts == "phase" else self.N**2 - 1


def make_born_logit_task(N: int, *, contexts: str = "phase", beta: float | None = None,
                         num_cues: int = 8, length: int = 3, seed: int = 0) -> BornLogitTask:
  """Builds the Born-logit task with all A^L contexts (wave-function spec §2.6).

  Args:
    N: number of latent senses (>= 2; >= 3 for generic contexts, where the
      POVM of spec §2.3 must be informationally complete).
    contexts: "phase" (the states of T_N) or "generic" (random cue Hamiltonians).
    beta: inverse temperature (> 0). None: K, which spreads the phase
      family's logits over [0, 2] (Tr(M_k rho) lies in [0, 2/K] there).
    num_cues: A (>= 1).
    length: L (>= 1).
    seed: seed of the cue Hamiltonians.

  Returns:
    A ``BornLogitTask``.
  """
  if contexts not in CONTEXTS:
    raise ValueError(f"contexts must be one of {list(CONTEXTS)}, got {contexts!r}")
  _check_int("N", N, minimum=3 if contexts == "generic" else 2)
  _check_int("num_cues", num_cues, minimum=1)
  _check_int("length", length, minimum=1)
  _check_int("seed", seed, minimum=0)
  K = num_outcomes(N)
  beta = float(K) if beta is None else beta
  _check_beta(beta)
  check_target_size(num_cues**length, K, f"the Born-logit task at N = {N}")
  cues_CL, tokens_CT = all_contexts(num_cues, length)
  H_ANN = cue_hamiltonians(N, num_cues, contexts, seed)
  U_ANN = cayley(H_ANN)
  psi_PN = np.full((1, N), 1.0 / np.sqrt(N), complex)
  for _ in range(length):  # prefix tree, contexts in lexicographic cue order
    psi_PN = np.einsum("aij,pj->pai", U_ANN, psi_PN).reshape(-1, N)
  C = cues_CL.shape[0]
  logits, probs = born_logit_targets(psi_PN, float(beta))
  return BornLogitTask(N=N, num_cues=num_cues, length=length, contexts=contexts,
                       beta=float(beta), seed=seed, H_ANN=H_ANN, tokens_CT=tokens_CT,
                       weights_C=np.full(C, 1.0 / C), psi_CN=psi_PN, logits_CK=logits,
                       probs_CK=probs)
