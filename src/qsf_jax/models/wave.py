"""The wave-function language model (wave-function spec §1, §4; arXiv 2602.22255).

State psi_t in C^N, ||psi_t|| = 1, evolved by a token-dependent Hamiltonian
built from a generator mixture (spec §1.2, option 2, the LM default):

  H_t = H_0 + sum_m e_m(x_t) G_m,   e(x_t) = E[x_t] in R^M,
  H_0, G_m = (X + X^T)/2 + (i/2)(Y - Y^T)     (real X, Y; Hermitian)
  psi_{t+1} = (I + i dt H_t/2)^{-1} (I - i dt H_t/2) psi_t      (Cayley, §1.3)
  logits_t = beta |W psi_{t+1}|^2 + b,   W = W_re + i W_im      (Born-logit, §1.4)

so the logits at t see tokens <= t only. ``wave_readout="born"`` uses the
rank-one POVM readout instead: logits = log((1 - eta)|M psi|^2 + eta/V) with the
isometry M = W (W^dagger W)^{-1/2}.

Stacking (spec §1.6 "Deep", [U]): cell l + 1 takes the mixture weights
e^(l+1)_t = [Re psi^(l)_{t+1}, Im psi^(l)_{t+1}] A^(l+1) + c^(l+1) from cell l
(``wave_layers``). Each step is one batched Crank-Nicolson solve
(``cayley_step``) inside ``jax.lax.scan``: O(T B N^3), sequential in T; the
same function serves decoding, so decode and forward agree.

Every trainable leaf is real (JAX conventions §2.5). All wave maths runs in
float32/complex64 whatever ``cfg.dtype`` says (JAX conventions §2.4).
Decoding caches each cell's psi_t (as real and imaginary parts): O(N^3) per
token, independent of t.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qsf_jax import wavefunction as wf
from qsf_jax.models.config import ModelConfig
from qsf_jax.models.lm import check_last_only, check_tokens, decode_position


def _normal(std):
  return nn.initializers.normal(std)


def _f32(x):
  """A parameter as float32: the wave maths stays float32/complex64 even for float64
  parameters (e.g. perturbed with NumPy draws under jax_enable_x64), whose complex128
  states would otherwise change the decode cache's dtype inside ``generate``'s scan."""
  return jnp.asarray(x, jnp.float32)


class MixtureHamiltonian(nn.Module):
  """H = H_0 + sum_m e_m G_m from real parameters (wave-function spec §1.2, option 2).

  Parameters: ``H0_X``, ``H0_Y`` (N, N) and ``G_X``, ``G_Y`` (M, N, N), with
  H_0 = herm(H0_X, H0_Y) and G_m = herm(G_X[m], G_Y[m]),
  herm(X, Y) = (X + X^T)/2 + (i/2)(Y - Y^T). Entries start N(0, 1/N) for H_0 and
  N(0, 1/(N M)) for G, so that ||H|| = O(1) for unit-variance weights e.

  Attributes:
    cfg: model configuration (``wave_dim``, ``wave_generators``).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, e_BTM):
    """Complex Hermitian H = H_0 + sum_m e_m G_m (spec §1.2).

    Args:
      e_BTM: mixture weights e (B, T, M).

    Returns:
      H: complex64 Hermitian matrices (B, T, N, N).
    """
    N, M = self.cfg.wave_dim, self.cfg.wave_generators
    s0, sg = N ** -0.5, (N * M) ** -0.5
    H0 = wf.hermitian_from_real(_f32(self.param("H0_X", _normal(s0), (N, N), jnp.float32)),
                                _f32(self.param("H0_Y", _normal(s0), (N, N), jnp.float32)))
    G_MNN = wf.hermitian_from_real(
        _f32(self.param("G_X", _normal(sg), (M, N, N), jnp.float32)),
        _f32(self.param("G_Y", _normal(sg), (M, N, N), jnp.float32)))
    e_BTM = e_BTM.astype(jnp.float32).astype(G_MNN.dtype)
    return H0[None, None] + jnp.einsum("btm,mnk->btnk", e_BTM, G_MNN)


class CayleyCell(nn.Module):
  """One Cayley cell with an input-dependent Hamiltonian (wave-function spec §1.2-1.3).

  Parameters: ``hamiltonian/...`` (see :class:`MixtureHamiltonian`) and
  ``psi0_re``, ``psi0_im`` (N,) (psi_0 = psi0 / ||psi0||).

  Attributes:
    cfg: model configuration (``wave_dim``, ``wave_generators``, ``wave_dt``).
    decode: one step per call with psi cached in ``"cache"``.
  """
  cfg: ModelConfig
  decode: bool = False

  def initial_state(self):
    """psi_0 = psi0 / ||psi0||, complex (N,), initialised to the uniform 1/sqrt(N)."""
    N = self.cfg.wave_dim
    re = _f32(self.param("psi0_re", nn.initializers.constant(N ** -0.5), (N,), jnp.float32))
    im = _f32(self.param("psi0_im", nn.initializers.zeros, (N,), jnp.float32))
    psi = jax.lax.complex(re, im)
    return psi / jnp.linalg.norm(psi)

  @nn.compact
  def __call__(self, e_BTM, t=0):
    """States psi_1..psi_T (B, T, N) complex64 after absorbing each input.

    Args:
      e_BTM: mixture weights e(x_t) (B, T, M).
      t: decode position (int32 scalar); ignored unless decoding.
    """
    B, T, _ = e_BTM.shape
    N, dt = self.cfg.wave_dim, self.cfg.wave_dt
    H_BTNN = MixtureHamiltonian(self.cfg, name="hamiltonian")(e_BTM)
    psi0_N = self.initial_state()
    if self.decode:
      re = self.variable("cache", "psi_re", lambda: jnp.zeros((B, N), jnp.float32))
      im = self.variable("cache", "psi_im", lambda: jnp.zeros((B, N), jnp.float32))
      if self.is_initializing():
        return jnp.broadcast_to(psi0_N, (B, T, N))
      prev_BN = jnp.where(t == 0, jnp.broadcast_to(psi0_N, (B, N)),
                          jax.lax.complex(re.value, im.value))
      psi_BN = wf.cayley_step(H_BTNN[:, 0], prev_BN, dt)
      re.value, im.value = jnp.real(psi_BN), jnp.imag(psi_BN)
      return psi_BN[:, None]
    # One Crank-Nicolson solve per step, batched over B (``cayley_step``).
    def step(psi_BN, H_BNN):
      psi_BN = wf.cayley_step(H_BNN, psi_BN, dt)
      return psi_BN, psi_BN

    psi0_BN = jnp.broadcast_to(psi0_N, (B, N))
    _, psi_TBN = jax.lax.scan(step, psi0_BN, jnp.swapaxes(H_BTNN, 0, 1))
    return jnp.swapaxes(psi_TBN, 0, 1)


class BornReadout(nn.Module):
  """Born-logit head beta |W psi|^2 + b, or log unsharp POVM probabilities (spec §1.4).

  Parameters: ``W_re``, ``W_im`` (V, N); ``bias`` (V,) and ``beta`` () for
  the Born-logit head.

  Attributes:
    cfg: model configuration (``wave_readout``, ``wave_eta``).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, psi_BTN):
    """Born readout of unit states (spec §1.4): log p (``born``) or Born logits.

    Args:
      psi_BTN: unit-norm states psi (B, T, N), complex64.

    Returns:
      logits: float32 (B, T, V); for ``born`` they are log-probabilities.
    """
    cfg = self.cfg
    V, N = cfg.vocab_size, cfg.wave_dim
    # Entries N(0, 1/2) for Re and Im: E|(W psi)_k|^2 = 1 at ||psi|| = 1.
    W_re = _f32(self.param("W_re", _normal(0.5 ** 0.5), (V, N), jnp.float32))
    W_im = _f32(self.param("W_im", _normal(0.5 ** 0.5), (V, N), jnp.float32))
    if cfg.wave_readout == "born":
      M_VN = wf.isometry_from_real(W_re, W_im)
      return jnp.log(wf.born_probabilities(M_VN, psi_BTN, cfg.wave_eta))
    bias = _f32(self.param("bias", nn.initializers.zeros, (V,), jnp.float32))
    scale = _f32(self.param("beta", nn.initializers.ones, (), jnp.float32))
    return wf.born_logits(jax.lax.complex(W_re, W_im), psi_BTN, scale, bias)


class WaveLanguageModel(nn.Module):
  """Stacked Cayley cells with a Born readout; see the module docstring.

  Parameters: ``embed/embedding`` (V, M); ``cell_<l>/...``; ``lift_<l>``
  (Dense 2N -> M, for l >= 1); ``readout/...``.

  Attributes:
    cfg: model configuration with ``stage="wave"``.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, *, beta=0.0, update_stats=False, stats_mask=None,
               decode=False, return_states=False, last_only=False):
    """Next-token logits (B, T, V) float32 (same API as the other stages).

    Args:
      tokens_BT: token ids (B, T); (B, 1) when decoding.
      beta: unused (no LayerNorm anneal in this model).
      update_stats: unused.
      stats_mask: unused.
      decode: one token per call with psi cached in ``"cache"``.
      return_states: return the list of every cell's states psi_1..psi_T
        (B, T, N) complex64 instead of the logits (for diagnostics and tests).
      last_only: return the last position's logits only, (B, 1, V).
    """
    check_last_only(last_only, update_stats)
    del beta, update_stats, stats_mask
    cfg = self.cfg
    tokens_BT = check_tokens(tokens_BT, cfg, decode)
    t = decode_position(self, decode, tokens_BT.shape[0])
    e_BTM = nn.Embed(cfg.vocab_size, cfg.wave_generators, embedding_init=_normal(1.0),
                     dtype=jnp.float32, param_dtype=jnp.float32, name="embed")(tokens_BT)
    states = []
    for layer in range(cfg.wave_layers):
      if layer:
        prev_BTN = states[-1]
        feats_BTF = jnp.concatenate([jnp.real(prev_BTN), jnp.imag(prev_BTN)], axis=-1)
        # [Re psi, Im psi] has unit norm, so weights of std 1 give e unit variance per
        # entry, as the embedding gives the first cell.
        e_BTM = nn.Dense(cfg.wave_generators, kernel_init=_normal(1.0),
                         dtype=jnp.float32, param_dtype=jnp.float32,
                         name=f"lift_{layer}")(feats_BTF)
      states.append(CayleyCell(cfg, decode=decode, name=f"cell_{layer}")(e_BTM, t))
    if return_states:
      return states
    return BornReadout(cfg, name="readout")(states[-1][:, -1:] if last_only else states[-1])
