"""Explicit models that solve the Born-logit task exactly (wave-function spec §2.6).

The complex model of dimension N: the word token's rotation of spec §2.4, the
task's cue Hamiltonians, and the Born-logit head W = sqrt(beta) M (rows
m_k^dagger), b = 0, so that |W psi|^2 = beta Tr(M_k rho).

The real orthogonal model of dimension D* (the adjoint representation): with an
orthonormal basis {B_i} of the traceless Hermitian matrices spanned by the
context states (``tasks.born_logit.hermitian_basis``), the state is

  h_i = Tr(B_i (rho - I/N)) / sqrt(1 - 1/N),   ||h|| = 1 for pure rho,

a cue acts by Ad_U, h_i -> sum_j Tr(B_i U B_j U^dagger) h_j (real orthogonal,
since rho -> U rho U^dagger), and the logits are affine in h:

  beta Tr(M_k rho) = beta Tr(M_k)/N + beta sqrt(1 - 1/N) sum_i Tr(M_k B_i) h_i.

Its transitions are real Cayley maps (``construction.inverse_cayley_real``):
the word token rotates e_1 onto h(psi_0). Parameters are computed in NumPy
float64 and cast to the requested dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qsf_jax.separation.construction import inverse_cayley_real, rotation_to, word_rotation
from qsf_jax.separation.models import ModelConfig
from qsf_jax.tasks.born_logit import BornLogitTask, cayley, hermitian_basis
from qsf_jax.tasks.separation import povm_vectors


def adjoint_matrix(U_NN, basis_DNN) -> np.ndarray:
  """The adjoint representation O_ij = Tr(B_i U B_j U^dagger) (wave-function spec §2.6).

  Real and orthogonal when {B_i} is an orthonormal Hermitian basis of a
  subspace that U (. ) U^dagger maps onto itself.

  Args:
    U_NN: unitary (N, N).
    basis_DNN: orthonormal Hermitian basis (D, N, N).

  Returns:
    float64 (D, D).
  """
  U = np.asarray(U_NN, complex)
  B = np.asarray(basis_DNN, complex)
  UBU = U @ B @ U.conj().T  # (D, N, N): U B_j U^dagger
  return np.real(np.einsum("iab,jba->ij", B, UBU))


def state_coordinates(psi_CN, basis_DNN) -> np.ndarray:
  """h_i = Tr(B_i (rho - I/N)) / sqrt(1 - 1/N) = Re(psi^dagger B_i psi) / sqrt(1 - 1/N) (§2.6).

  For traceless B_i; unit norm when the basis spans rho - I/N.

  Args:
    psi_CN: unit states (C, N).
    basis_DNN: orthonormal traceless Hermitian basis (D, N, N).

  Returns:
    float64 (C, D).
  """
  psi = np.asarray(psi_CN, complex)
  N = psi.shape[-1]
  return np.real(np.einsum("ca,iab,cb->ci", psi.conj(), basis_DNN, psi)) / np.sqrt(1.0 - 1.0 / N)


def affine_readout(N: int, beta: float, basis_DNN) -> tuple[np.ndarray, np.ndarray]:
  """W, b with W h + b = beta Tr(M_k rho) for rho = I/N + sqrt(1 - 1/N) sum_i h_i B_i (§2.6).

    W_ki = beta sqrt(1 - 1/N) Tr(M_k B_i),   b_k = beta Tr(M_k) / N,   M_k = m_k m_k^dagger.

  Args:
    N: number of latent senses.
    beta: inverse temperature.
    basis_DNN: orthonormal traceless Hermitian basis (D, N, N).

  Returns:
    (W (K, D), b (K,)), float64.
  """
  m_re, m_im = povm_vectors(N)
  m = m_re + 1j * m_im  # row k is m_k
  # Tr(M_k B) = m_k^dagger B m_k
  W = np.real(np.einsum("ka,iab,kb->ki", m.conj(), basis_DNN, m))
  b = np.sum(np.abs(m) ** 2, axis=1) / N
  return beta * np.sqrt(1.0 - 1.0 / N) * W, beta * b


def task_basis(task: BornLogitTask) -> np.ndarray:
  """The basis the task's context states span: off-diagonal (phase) or all traceless (§2.6)."""
  return hermitian_basis(task.N, offdiagonal_only=task.contexts == "phase")


def hardcoded_born_logit(task: BornLogitTask, dt: float = 1.0, dtype=jnp.float64):
  """The complex N-dimensional Born-logit model that outputs p* exactly (spec §2.4, §2.6).

    H_w = i inverse_cayley(R),   H_a = (task's H_a) / dt,   W = sqrt(beta) M,   b = 0.

  Args:
    task: the Born-logit task.
    dt: Cayley step length (the task's states use dt = 1; Cayley(H, dt) depends on dt H).
    dtype: real parameter dtype.

  Returns:
    (params, cfg) for ``models.log_probs``.
  """
  N = task.N
  X = np.zeros((task.num_tokens, N, N))
  Y = np.zeros((task.num_tokens, N, N))
  Y[0] = inverse_cayley_real(word_rotation(N), dt)
  X[1:], Y[1:] = np.real(task.H_ANN) / dt, np.imag(task.H_ANN) / dt
  m_re, m_im = povm_vectors(N)
  s = np.sqrt(task.beta)
  cfg = ModelConfig(kind="born_logit", dim=N, num_tokens=task.num_tokens,
                    num_outcomes=task.K, dt=dt)
  params = {"X": X, "Y": Y, "W_re": s * m_re, "W_im": -s * m_im, "b": np.zeros(task.K)}
  return {k: jnp.asarray(v, dtype) for k, v in params.items()}, cfg


def hardcoded_adjoint(task: BornLogitTask, dt: float = 1.0, dtype=jnp.float64):
  """The real orthogonal model of dimension D* that outputs p* exactly (spec §2.6).

  D* = ``task.exact_real_dim``. Transitions: the word token rotates e_1 onto
  h(psi_0); cue a applies Ad_{U_a}; readout ``affine_readout``.

  Args:
    task: the Born-logit task.
    dt: Cayley step length of the real model.
    dtype: real parameter dtype.

  Returns:
    (params, cfg) for ``models.log_probs``: a "real" model of dim D*.
  """
  basis = task_basis(task)
  D = basis.shape[0]
  psi0 = np.full((1, task.N), 1.0 / np.sqrt(task.N), complex)
  Q = [rotation_to(state_coordinates(psi0, basis)[0])]
  Q += [adjoint_matrix(U, basis) for U in cayley(task.H_ANN)]
  S = np.stack([0.5 * inverse_cayley_real(q, dt) for q in Q])  # S - S^T = A
  W, b = affine_readout(task.N, task.beta, basis)
  cfg = ModelConfig(kind="real", dim=D, num_tokens=task.num_tokens, num_outcomes=task.K, dt=dt)
  params = {"S": S, "W": W, "b": b}
  return {k: jnp.asarray(v, dtype) for k, v in params.items()}, cfg
