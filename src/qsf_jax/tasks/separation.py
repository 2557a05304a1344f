"""The pairwise-phase disambiguation family T_N (wave-function spec §2.3).

N latent "senses" carry phases. An ambiguous word w puts the state in the
uniform superposition; each cue token a imprints a phase vector theta^(a) in
(-pi, pi)^N. A context c = (w, a_1, ..., a_L) therefore has the latent state

  psi_c = N^{-1/2} (exp(-i Phi_j(c)))_j,   Phi(c) = sum_l theta^(a_l),

and the K = 2N(N-1) output tokens k = (j, l, m), j < l, m in {0, 1, 2, 3}, ask
for one quadrature of the coherence rho_jl:

  p*(j,l,m | c) = (1-eta)/K (1 + cos(Phi_j - Phi_l - m pi/2)) + eta/K.

Everything here is NumPy float64 (the targets are data, computed exactly), so
that a notebook gets machine-precision targets whatever JAX's dtype mode is.
Input tokens: 0 is the ambiguous word w, 1..A are the cues.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

WORD_TOKEN = 0
MAX_CONTEXTS = 1_000_000  # every context is enumerated: A^L of them
MAX_TARGET_ENTRIES = 50_000_000  # C x K exact targets: 400 MB in float64


def check_target_size(num_contexts: int, K: int, what: str) -> None:
  """Raises ``ValueError`` before a task builds more than ``MAX_TARGET_ENTRIES``
  exact targets (C contexts x K outputs, float64), which would otherwise end in a
  MemoryError or a long stall.

  Args:
    num_contexts: C = A^L.
    K: number of output tokens.
    what: the task and its N, for the message.
  """
  if num_contexts > MAX_CONTEXTS:  # all_contexts refuses these, with its own message
    return
  if num_contexts * K > MAX_TARGET_ENTRIES:
    raise ValueError(
        f"{what} has K = {K:,} outputs and C = {num_contexts:,} contexts: its C x K target "
        f"table would hold {num_contexts * K:,} entries, more than {MAX_TARGET_ENTRIES:,} "
        f"({MAX_TARGET_ENTRIES * 8 // 10**6} MB in float64); lower N, num_cues or length")


def num_outcomes(N: int) -> int:
  """The number of output tokens K = 2 N (N - 1) of T_N (wave-function spec §2.3)."""
  _check_int("N", N, minimum=2)
  return 2 * N * (N - 1)


def distinct_contexts(num_cues: int, length: int, *, commuting: bool = True) -> int:
  """The number of distinct context states among the A^L cue sequences (spec §2.3, §2.5).

  Commuting cues (the phase cues of T_N: Phi(c) = sum_l theta^(a_l) ignores the
  order) give one state per multiset of cues, C(A + L - 1, L); generic
  non-commuting cues give A^L. The rank certificate of spec §2.5 counts
  distinct generic contexts, so it needs this number, not A^L, to be >= K.

  Args:
    num_cues: A (>= 1).
    length: L (>= 1).
    commuting: whether the cue unitaries commute.
  """
  _check_int("num_cues", num_cues, minimum=1)
  _check_int("length", length, minimum=1)
  return math.comb(num_cues + length - 1, length) if commuting else num_cues**length


def outcome_table(N: int) -> np.ndarray:
  """The output tokens k = (j, l, m) of T_N, j < l, m in {0,1,2,3} (spec §2.3).

  Ordered pair by pair (lexicographic in (j, l)), then by m.

  Args:
    N: number of latent senses (>= 2).

  Returns:
    int array (K, 3) of rows (j, l, m).
  """
  _check_int("N", N, minimum=2)
  rows = [(j, l, m) for j in range(N) for l in range(j + 1, N) for m in range(4)]
  return np.asarray(rows, dtype=np.int64)


def povm_vectors(N: int) -> tuple[np.ndarray, np.ndarray]:
  """Measurement vectors m_k of T_N as real pairs (wave-function spec §2.3).

    m_(j,l,m) = (e_j + i^m e_l) / (sqrt(2) sqrt(2 (N - 1))),

  so that sum_k m_k m_k^dagger = I (a rank-one POVM) and p(k | psi) = |m_k^dagger psi|^2.

  Args:
    N: number of latent senses (>= 2).

  Returns:
    (m_re, m_im): real and imaginary parts, each (K, N); row k is m_k.
  """
  table = outcome_table(N)
  K = table.shape[0]
  scale = 1.0 / np.sqrt(4.0 * (N - 1))
  m_re = np.zeros((K, N))
  m_im = np.zeros((K, N))
  rows = np.arange(K)
  m_re[rows, table[:, 0]] = scale
  phase = 0.5 * np.pi * table[:, 2]
  # i^m = cos(m pi / 2) + i sin(m pi / 2), rounded so that 0 stays exactly 0.
  m_re[rows, table[:, 1]] = scale * np.round(np.cos(phase))
  m_im[rows, table[:, 1]] = scale * np.round(np.sin(phase))
  return m_re, m_im


def context_phases(theta_AN, cues_CL) -> np.ndarray:
  """Accumulated phases Phi(c) = sum_l theta^(a_l) of each context (spec §2.3).

  Args:
    theta_AN: cue phase vectors theta^(a), real (A, N).
    cues_CL: cue indices a_l in 0..A-1 of each context, int (C, L).

  Returns:
    Phi_CN: float64 (C, N).
  """
  theta_AN = _real_matrix("theta_AN", theta_AN)
  cues_CL = np.asarray(cues_CL)
  if cues_CL.ndim != 2 or not np.issubdtype(cues_CL.dtype, np.integer):
    raise ValueError(f"cues_CL must be an int matrix (C, L), got {cues_CL.dtype} {cues_CL.shape}")
  if cues_CL.size and (cues_CL.min() < 0 or cues_CL.max() >= theta_AN.shape[0]):
    raise ValueError(f"cues_CL entries must lie in [0, {theta_AN.shape[0]})")
  return theta_AN[cues_CL].sum(axis=1)


def target_state(Phi_CN) -> tuple[np.ndarray, np.ndarray]:
  """The latent target psi_c = N^{-1/2} exp(-i Phi(c)) as a real pair (spec §2.3).

  Args:
    Phi_CN: accumulated phases (C, N).

  Returns:
    (psi_re_CN, psi_im_CN): float64, each (C, N), with unit norm per row.
  """
  Phi_CN = _real_matrix("Phi_CN", Phi_CN)
  N = Phi_CN.shape[1]
  return np.cos(Phi_CN) / np.sqrt(N), -np.sin(Phi_CN) / np.sqrt(N)


def target_probabilities(Phi_CN, eta: float = 0.1) -> np.ndarray:
  """Closed-form targets of T_N (wave-function spec §2.3).

    p*(j,l,m | c) = (1-eta)/(2N(N-1)) (1 + cos(Phi_j - Phi_l - m pi/2)) + eta/K.

  Args:
    Phi_CN: accumulated phases (C, N).
    eta: unsharpness in [0, 1); eta = 0 gives exact destructive zeros.

  Returns:
    P_CK: float64 (C, K); each row sums to one.
  """
  Phi_CN = _real_matrix("Phi_CN", Phi_CN)
  _check_eta(eta)
  N = Phi_CN.shape[1]
  table = outcome_table(N)
  K = table.shape[0]
  rel_CK = Phi_CN[:, table[:, 0]] - Phi_CN[:, table[:, 1]] - 0.5 * np.pi * table[:, 2]
  return (1.0 - eta) / K * (1.0 + np.cos(rel_CK)) + eta / K


def born_target_probabilities(Phi_CN, eta: float = 0.1) -> np.ndarray:
  """Targets from the Born rule, p_k = (1-eta) |m_k^dagger psi_c|^2 + eta/K (spec §1.4, §2.3).

  An independent route to ``target_probabilities``: it builds psi_c and the
  POVM and measures, instead of using the cosine closed form.

  Args:
    Phi_CN: accumulated phases (C, N).
    eta: unsharpness in [0, 1).

  Returns:
    P_CK: float64 (C, K).
  """
  psi_re, psi_im = target_state(Phi_CN)
  _check_eta(eta)
  m_re, m_im = povm_vectors(Phi_CN.shape[1])
  K = m_re.shape[0]
  # m^dagger psi = (m_re - i m_im) . (psi_re + i psi_im)
  amp_re = psi_re @ m_re.T + psi_im @ m_im.T
  amp_im = psi_im @ m_re.T - psi_re @ m_im.T
  return (1.0 - eta) * (amp_re**2 + amp_im**2) + eta / K


class ContextTask:
  """Properties shared by the tasks over all A^L contexts (T_N and its Born-logit variant).

  Subclasses hold ``num_cues``, ``tokens_CT`` (C, L + 1), ``weights_C`` (C,) and
  ``probs_CK`` (C, K).
  """

  @property
  def K(self) -> int:
    """Number of output tokens, 2N(N-1)."""
    return self.probs_CK.shape[1]

  @property
  def C(self) -> int:
    """Number of contexts, A^L."""
    return self.tokens_CT.shape[0]

  @property
  def num_tokens(self) -> int:
    """Input vocabulary size A + 1 (the word and the cues)."""
    return self.num_cues + 1

  @property
  def entropy(self) -> float:
    """Expected target entropy sum_c w_c H(p*(.|c)), the floor of the cross-entropy."""
    P = self.probs_CK
    return float(-(self.weights_C @ (P * np.log(P)).sum(axis=1)))


def all_contexts(num_cues: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Every cue sequence of length L in lexicographic order, and its input tokens (spec §2.3).

  Args:
    num_cues: A.
    length: L.

  Returns:
    (cues_CL int64 (A^L, L), tokens_CT int32 (A^L, L + 1)): tokens are
    (w, a_1 + 1, ..., a_L + 1), token 0 being the ambiguous word.
  """
  _check_int("num_cues", num_cues, minimum=1)
  _check_int("length", length, minimum=1)
  if num_cues**length > MAX_CONTEXTS:
    raise ValueError(f"num_cues**length = {num_cues**length} contexts is too many to "
                     f"enumerate (at most {MAX_CONTEXTS:,})")
  cues_CL = np.asarray(list(itertools.product(range(num_cues), repeat=length)), dtype=np.int64)
  C = cues_CL.shape[0]
  tokens_CT = np.concatenate([np.full((C, 1), WORD_TOKEN), cues_CL + 1], axis=1).astype(np.int32)
  return cues_CL, tokens_CT


@dataclasses.dataclass(frozen=True, eq=False)
class SeparationTask(ContextTask):
  """One instance of T_N with every context and its exact target (spec §2.3).

  Attributes:
    N: number of latent senses.
    num_cues: A, the number of cue tokens.
    length: L, the number of cues per context.
    eta: unsharpness of the targets.
    seed: seed of the cue phases.
    theta_AN: cue phase vectors, uniform in (-pi, pi) (A, N).
    tokens_CT: input sequences (w, a_1 + 1, ..., a_L + 1), int (C, L + 1);
      token 0 is the ambiguous word, token a + 1 is cue a.
    weights_C: probability of each context (uniform over all A^L), (C,).
    Phi_CN: accumulated phases of each context (C, N).
    probs_CK: exact targets p*(k | c) (C, K).
  """
  N: int
  num_cues: int
  length: int
  eta: float
  seed: int
  theta_AN: np.ndarray
  tokens_CT: np.ndarray
  weights_C: np.ndarray
  Phi_CN: np.ndarray
  probs_CK: np.ndarray

  @property
  def outcomes(self) -> np.ndarray:
    """The (j, l, m) row of each output token (K, 3)."""
    return outcome_table(self.N)


def make_task(N: int, *, num_cues: int = 8, length: int = 3, eta: float = 0.1,
              seed: int = 0) -> SeparationTask:
  """Builds T_N with all A^L contexts and exact targets (wave-function spec §2.3).

  theta^(a)_j ~ Uniform(-pi, pi) i.i.d.; contexts are all A^L cue sequences in
  lexicographic order, each preceded by the word token, with equal weights.
  The rank certificate of spec §2.5 needs K generic contexts, and the phases
  ignore the cue order, so only ``distinct_contexts(A, L)`` = C(A + L - 1, L)
  of the A^L rows differ (120 of 512 at A = 8, L = 3): the centred log-target
  has rank min(K, C(A + L - 1, L)) - 1.

  Args:
    N: number of latent senses (>= 2).
    num_cues: A (>= 1).
    length: L (>= 1).
    eta: unsharpness in [0, 1).
    seed: seed of the cue phases.

  Returns:
    A ``SeparationTask``.
  """
  _check_int("N", N, minimum=2)
  _check_int("num_cues", num_cues, minimum=1)
  _check_int("length", length, minimum=1)
  _check_int("seed", seed, minimum=0)
  _check_eta(eta)
  check_target_size(num_cues**length, num_outcomes(N), f"T_{N}")
  cues_CL, tokens_CT = all_contexts(num_cues, length)
  C = cues_CL.shape[0]
  rng = np.random.default_rng(seed)
  theta_AN = rng.uniform(-np.pi, np.pi, size=(num_cues, N))
  Phi_CN = context_phases(theta_AN, cues_CL)
  return SeparationTask(
      N=N, num_cues=num_cues, length=length, eta=float(eta), seed=seed,
      theta_AN=theta_AN, tokens_CT=tokens_CT, weights_C=np.full(C, 1.0 / C),
      Phi_CN=Phi_CN, probs_CK=target_probabilities(Phi_CN, eta))


def _check_int(name, value, *, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_eta(eta):
  if (isinstance(eta, (bool, np.bool_)) or not isinstance(eta, (int, float, np.integer, np.floating))
      or not np.isfinite(eta) or not 0.0 <= eta < 1.0):
    raise ValueError(f"eta must be a real number in [0, 1), got {eta!r}")


def _real_matrix(name, x):
  x = np.asarray(x)
  if np.iscomplexobj(x):
    raise ValueError(f"{name} must be real, got dtype {x.dtype}")
  if x.ndim != 2:
    raise ValueError(f"{name} must have 2 dimensions, got shape {x.shape}")
  return x.astype(np.float64)
