"""Token-driven sequence models for the separation experiment (wave-function spec §2, §4).

Four model kinds, all with real trainable parameters and token-only
(state-independent) transitions, so that one transition matrix per input token
is precomputed and the recurrence is a mat-vec inside ``jax.lax.scan`` (spec §1.6):

  "complex":   psi in C^N,  U_v = Cayley(H_v), H_v = herm(X_v, Y_v),
               p_k = (1-eta) |(M psi_T)_k|^2 + eta/K      (Born readout, spec §1.4, §2.4)
               or, with readout_rank r > 1, the general Born rule
               p_k = (1-eta) Tr(E_k rho_T) + eta/K, E_k of rank <= r (spec §1.4)
  "real":      h in R^D,    Q_v = Cayley_real(S_v - S_v^T) in SO(D),
               p = softmax(W h_T + b)                     (affine-softmax, spec §2.2, §2.5)
  "realified": h in R^{2N}, Q_v as "real" with D = 2N,
               p_k = (1-eta) ||R_k h_T||^2 + eta/K        (quadratic readout, spec §2.2 fact 1)
  "born_logit": psi in C^N as "complex",
               p = softmax(|W psi_T|^2 + b), W in C^{K x N} free  (Born-logit head, spec §2.6)
               or, with readout_rank r > 1, logits_k = sum_{i<r} |(W psi_T)_{k r + i}|^2 + b_k

The realified control has rank-two real POVM elements R_k^T R_k (R_k: 2 x 2N
rows of a real isometry R), the real form of the complex Born rule; it
contains the realified complex model and is therefore exact on T_N.
The initial state is e_1; the ambiguous-word token's transition moves it
(spec §2.4: "produced from e_1 by the ambiguous-word token").
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qsf_jax import _checks
from qsf_jax.separation.elimination import cayley_unitary_elim, orthogonal_cayley_elim
from qsf_jax.wavefunction.born import amplitudes, born_logits, born_probabilities
from qsf_jax.wavefunction.cayley import cayley_unitary, orthogonal_cayley
from qsf_jax.wavefunction.hermitian import hermitian_from_real, isometry_from_real, skew_from_real

KINDS = ("complex", "real", "realified", "born_logit")
COMPLEX_KINDS = ("complex", "born_logit")
SOLVERS = ("elimination", "core")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyper-parameters of a separation model (hashable: a jit static argument).

  Attributes:
    kind: one of ``KINDS``.
    dim: state dimension: N (complex dimension) for "complex" and "born_logit",
      D for "real", 2N for "realified" (must be even).
    num_tokens: input vocabulary size V (the word and the cues).
    num_outcomes: K, the number of output tokens.
    eta: unsharpness of the Born / quadratic readouts (ignored by "real" and
      "born_logit").
    dt: Cayley step length.
    solver: how the Cayley maps are computed: "elimination" (plain XLA
      Gauss-Jordan, ``separation.elimination``; safe in jitted, vmapped
      training on jaxlib 0.10.2 CPU) or "core" (the shared LAPACK-based
      ``wavefunction.cayley`` functions).
    readout_rank: r, the rank bound of each POVM element of a "complex" model's
      Born readout. 1 (the spec's rank-one POVM, E_k = m_k m_k^dagger) or more:
      E_k = sum_{i<r} m_{k,i} m_{k,i}^dagger, where rows k r .. k r + r - 1 of
      one isometry M (K r, N) hold the bras m_{k,i}^dagger.
      Every r gives a Born rule on the same N-dimensional state; r > 1 only
      widens the readout. A "born_logit" model's logits likewise become
      psi^dagger E_k psi + b_k with E_k = sum_{i<r} w_{k,i} w_{k,i}^dagger (W: K r x N,
      not an isometry). Other kinds need 1.
  """
  kind: str
  dim: int
  num_tokens: int
  num_outcomes: int
  eta: float = 0.0
  dt: float = 1.0
  solver: str = "elimination"
  readout_rank: int = 1

  def __post_init__(self):
    _checks.plain_numbers(self)  # NumPy scalars -> Python numbers
    _checks.check_choice("kind", self.kind, KINDS)
    _checks.check_choice("solver", self.solver, SOLVERS)
    for name in ("dim", "num_tokens", "num_outcomes", "readout_rank"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if self.kind == "realified" and self.dim % 2:
      raise ValueError(f"a realified model needs an even dim = 2N, got {self.dim}")
    if self.kind not in COMPLEX_KINDS and self.readout_rank != 1:
      raise ValueError(
          f"readout_rank applies to the complex Born readouts only; a {self.kind} model "
          f"needs readout_rank=1, got {self.readout_rank}")
    if self.kind == "complex" and self.num_outcomes * self.readout_rank < self.dim:
      raise ValueError(
          f"a Born readout needs num_outcomes * readout_rank >= dim (an isometry), got "
          f"num_outcomes={self.num_outcomes}, readout_rank={self.readout_rank}, dim={self.dim}")
    if self.kind == "realified" and 2 * self.num_outcomes < self.dim:
      raise ValueError(
          f"a quadratic readout needs 2 * num_outcomes >= dim, got "
          f"num_outcomes={self.num_outcomes}, dim={self.dim}")
    if not 0.0 <= self.eta < 1.0:
      raise ValueError(f"eta must lie in [0, 1), got {self.eta}")
    _checks.check_time_step("dt", self.dt)


def init_params(key, cfg: ModelConfig, dtype=jnp.float32) -> dict:
  """Random real parameters (wave-function spec §1.2 initialisation).

  Generators X, Y (complex) or S (real) have N(0, 1/dim) entries, so that the
  per-step phases are O(1); readout matrices have N(0, 1) entries, the bias is 0.

  Args:
    key: PRNG key.
    cfg: the model configuration.
    dtype: real parameter dtype (float32, or float64 with x64 enabled).

  Returns:
    A dict of real arrays; keys depend on ``cfg.kind``:
    complex {X, Y (V, N, N), W_re, W_im (K r, N)} with r = ``cfg.readout_rank``;
    real {S (V, D, D), W (K, D), b (K,)}; realified {S (V, 2N, 2N), R (2K, 2N)};
    born_logit {X, Y (V, N, N), W_re, W_im (K r, N), b (K,)}.
  """
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a real floating dtype, got {dtype}")
  V, D, K = cfg.num_tokens, cfg.dim, cfg.num_outcomes
  Kr = K * cfg.readout_rank
  k1, k2, k3, k4 = jax.random.split(key, 4)
  scale = 1.0 / D**0.5
  # Drawn flat and reshaped: the same values as a draw of ``shape`` (the PRNG
  # counters run in row-major order), but a flat draw compiles several times
  # faster on CPU, and draws of equal size share one compiled program.
  normal = lambda k, shape: jax.random.normal(k, (math.prod(shape),), dtype).reshape(shape)
  if cfg.kind == "complex":
    return {"X": scale * normal(k1, (V, D, D)), "Y": scale * normal(k2, (V, D, D)),
            "W_re": normal(k3, (Kr, D)), "W_im": normal(k4, (Kr, D))}
  if cfg.kind == "born_logit":  # |W psi|^2 has mean 2 for unit psi: O(1) logits
    return {"X": scale * normal(k1, (V, D, D)), "Y": scale * normal(k2, (V, D, D)),
            "W_re": normal(k3, (Kr, D)), "W_im": normal(k4, (Kr, D)),
            "b": jnp.zeros((K,), dtype)}
  if cfg.kind == "real":
    return {"S": scale * normal(k1, (V, D, D)), "W": normal(k3, (K, D)),
            "b": jnp.zeros((K,), dtype)}
  return {"S": scale * normal(k1, (V, D, D)), "R": normal(k3, (2 * K, D))}


def transitions(params: dict, cfg: ModelConfig) -> jax.Array:
  """One transition matrix per input token (wave-function spec §1.3, §1.6).

    complex, born_logit: U_v = (I + i dt H_v/2)^{-1}(I - i dt H_v/2), H_v = herm(X_v, Y_v)
    real, realified:    Q_v = (I - dt A_v/2)^{-1}(I + dt A_v/2),     A_v = S_v - S_v^T

  Args:
    params: parameters from ``init_params``.
    cfg: the model configuration.

  Returns:
    complex unitary (V, N, N) or real orthogonal (V, D, D).
  """
  _check_params(params, cfg)
  core = cfg.solver == "core"
  if cfg.kind in COMPLEX_KINDS:
    H_VNN = hermitian_from_real(params["X"], params["Y"])
    return (cayley_unitary if core else cayley_unitary_elim)(H_VNN, cfg.dt)
  A_VDD = skew_from_real(params["S"])
  return (orthogonal_cayley if core else orthogonal_cayley_elim)(A_VDD, cfg.dt)


def final_states(T_VDD, tokens_CT) -> jax.Array:
  """Runs the token-driven recurrence h_{t+1} = T_{x_t} h_t from h_0 = e_1 (spec §1.6).

  Args:
    T_VDD: per-token transition matrices, real or complex (V, D, D).
    tokens_CT: input tokens of each context, int (C, T).

  Returns:
    h_T: final states (C, D), dtype of ``T_VDD``.
  """
  T_VDD = _checks.as_array("T_VDD", T_VDD, allow_complex=True)
  _checks.check_square("T_VDD", T_VDD, batch_dims=1)
  tokens_CT = jnp.asarray(tokens_CT)
  if tokens_CT.ndim != 2 or not jnp.issubdtype(tokens_CT.dtype, jnp.integer):
    raise ValueError(f"tokens_CT must be an int matrix (C, T), got {tokens_CT.dtype} "
                     f"{tuple(tokens_CT.shape)}")
  # Concrete ids outside 0..V-1 would be clamped by the gather, silently.
  _checks.check_token_ids("tokens_CT", tokens_CT, T_VDD.shape[0])
  C, D = tokens_CT.shape[0], T_VDD.shape[-1]
  h0_CD = jnp.zeros((C, D), T_VDD.dtype).at[:, 0].set(1)

  def step(h_CD, tok_C):
    return jnp.einsum("cij,cj->ci", T_VDD[tok_C], h_CD), None

  h_CD, _ = jax.lax.scan(step, h0_CD, tokens_CT.T)
  return h_CD


def product_states(T_VDD, num_cues: int, length: int) -> jax.Array:
  """Final states of all A^L contexts (w, a_1, ..., a_L) by a prefix tree (spec §1.6, §2.3).

  Same result as ``final_states`` on ``SeparationTask.tokens_CT`` (contexts in
  lexicographic order, token 0 = word, token a + 1 = cue a), but each distinct
  prefix is propagated once, by batched mat-mats instead of per-context gathers:

    h^(0) = T_w e_1,   h^(l)_{(p, a)} = T_{a+1} h^(l-1)_p,   l = 1..L.

  Args:
    T_VDD: per-token transition matrices (A + 1, D, D).
    num_cues: A.
    length: L.

  Returns:
    h_T: final states (A^L, D), dtype of ``T_VDD``.
  """
  T_VDD = _checks.as_array("T_VDD", T_VDD, allow_complex=True)
  _checks.check_square("T_VDD", T_VDD, batch_dims=1)
  if T_VDD.shape[0] != num_cues + 1:
    raise ValueError(f"T_VDD must hold num_cues + 1 = {num_cues + 1} matrices, got "
                     f"shape {tuple(T_VDD.shape)}")
  h_PD = T_VDD[0][:, 0][None, :]  # T_w e_1
  T_ADD = T_VDD[1:]
  for _ in range(length):
    h_PD = jnp.einsum("aij,pj->pai", T_ADD, h_PD).reshape(-1, T_VDD.shape[-1])
  return h_PD


def readout_log_probs(params: dict, h_CD, cfg: ModelConfig) -> jax.Array:
  """Output log-probabilities from final states (wave-function spec §1.4, §2.2).

    complex:    p_k = (1-eta) |(M psi)_k|^2 + eta/K,   M = W (W^dagger W)^{-1/2}
                (readout_rank r > 1: p_k = (1-eta) sum_{i<r} |(M psi)_{k r + i}|^2 + eta/K
                = (1-eta) Tr(E_k rho) + eta/K, with M (K r, N) and sum_k E_k = M^dagger M = I)
    real:       log p = log_softmax(W h + b)
    realified:  p_k = (1-eta) ||R_k h||^2 + eta/K,     R = polar(R_raw), R^T R = I
    born_logit: log p = log_softmax(|W psi|^2 + b),     W = W_re + i W_im (spec §2.6)
                (readout_rank r > 1: logits_k = sum_{i<r} |(W psi)_{k r + i}|^2 + b_k)

  Args:
    params: parameters from ``init_params``.
    h_CD: final states (C, D), complex for "complex" and "born_logit", real otherwise.
    cfg: the model configuration.

  Returns:
    log-probabilities, real (C, K).
  """
  _check_params(params, cfg)
  K = cfg.num_outcomes
  if cfg.kind == "complex":
    M = isometry_from_real(params["W_re"], params["W_im"])
    if cfg.readout_rank == 1:
      return jnp.log(born_probabilities(M, h_CD, cfg.eta))
    a_CKr = amplitudes(M, h_CD).reshape(h_CD.shape[0], K, cfg.readout_rank)
    p_CK = jnp.sum(jnp.real(a_CKr)**2 + jnp.imag(a_CKr)**2, axis=-1)
    return jnp.log((1.0 - cfg.eta) * p_CK + cfg.eta / K)
  if cfg.kind == "real":
    return jax.nn.log_softmax(h_CD @ params["W"].T + params["b"][None, :], axis=-1)
  if cfg.kind == "born_logit":
    W = jax.lax.complex(params["W_re"], params["W_im"])
    sq_CKr = born_logits(W, h_CD, 1.0).reshape(h_CD.shape[0], K, cfg.readout_rank)
    return jax.nn.log_softmax(jnp.sum(sq_CKr, axis=-1) + params["b"][None, :], axis=-1)
  R = params["R"]
  R_KD = jnp.real(isometry_from_real(R, jnp.zeros_like(R)))
  amp_CK2 = (h_CD @ R_KD.T).reshape(h_CD.shape[0], K, 2)
  p_CK = (1.0 - cfg.eta) * jnp.sum(amp_CK2**2, axis=-1) + cfg.eta / K
  return jnp.log(p_CK)


def log_probs(params: dict, tokens_CT, cfg: ModelConfig) -> jax.Array:
  """The model's log p(k | context) for every context (wave-function spec §2.3-2.5).

  Args:
    params: parameters from ``init_params``.
    tokens_CT: input tokens of each context, int (C, T).
    cfg: the model configuration.

  Returns:
    log-probabilities, real (C, K).
  """
  return readout_log_probs(params, final_states(transitions(params, cfg), tokens_CT), cfg)


def _check_params(params, cfg):
  V, D, K = cfg.num_tokens, cfg.dim, cfg.num_outcomes
  Kr = K * cfg.readout_rank
  shapes = {
      "complex": {"X": (V, D, D), "Y": (V, D, D), "W_re": (Kr, D), "W_im": (Kr, D)},
      "real": {"S": (V, D, D), "W": (K, D), "b": (K,)},
      "realified": {"S": (V, D, D), "R": (2 * K, D)},
      "born_logit": {"X": (V, D, D), "Y": (V, D, D), "W_re": (Kr, D), "W_im": (Kr, D),
                     "b": (K,)},
  }[cfg.kind]
  if not isinstance(params, dict) or set(params) != set(shapes):
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f"params of a {cfg.kind} model must have keys {sorted(shapes)}, got {got}")
  for name, shape in shapes.items():
    arr = _checks.as_array(f"params[{name!r}]", params[name])
    _checks.check_shape(f"params[{name!r}]", arr, shape)
