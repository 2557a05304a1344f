"""The per-layer Koopman matrix K and its token-mixing variants (QSF §3.3-3.5; D1, D2, D8).

K is d x d, acts on the embedding dimension per token (D1), and is stored in the
mathematical orientation: the layer computes K u for a column vector u, i.e.
``u_BTD @ K.T``, so ``eig(K)`` is the spectrum the paper analyses (D16).

Parameters of the ``koopman`` submodule: ``K`` (Stages II, III) or ``S``
(Stage IV, K = expm(S - S^T)), and the bias ``b``.

Mixers (``mode``):

* ``"none"``: the per-token term u_t K^T + b (Stages III/IV; Stage II S2-b).
* ``"cosine"``: S2-a, diag(c')^{-1} (M o C_T) U K^T + b, c'_t = sqrt(t + 1).
* ``"recurrent"``: S2-c, s_t = K s_{t-1} + u_t, output s_t + b, with K rescaled
  so that ||K||_F <= ``recurrent_radius`` (which bounds the spectral radius).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from qsf_jax import _checks
from qsf_jax.models import fourier
from qsf_jax.models.config import ModelConfig
from qsf_jax.models.ffn import compute_dtype


def orthogonal_from_free(S_DD, method="expm"):
  """Stage-IV orthogonal Koopman matrix from a free S (QSF §3.5, decision D8).

    W = S - S^T,   K = expm(W)             (method "expm", default)
                   K = (I + W)^{-1}(I - W)  (method "cayley")

  Both give K in SO(d): K^T K = I and every |lambda| = 1 (D = 0, A = W).

  Args:
    S_DD: free real matrix (d, d).
    method: "expm" or "cayley".

  Returns:
    K (d, d), in float32 or wider.
  """
  S_DD = _checks.as_array("S_DD", S_DD)
  _checks.check_square("S_DD", S_DD)
  _checks.check_choice("method", method, ("expm", "cayley"))
  S_DD = S_DD.astype(jnp.promote_types(S_DD.dtype, jnp.float32))
  W_DD = S_DD - S_DD.T
  if method == "expm":
    return jsl.expm(W_DD)
  I = jnp.eye(W_DD.shape[0], dtype=W_DD.dtype)
  return jnp.linalg.solve(I + W_DD, I - W_DD)


def frobenius_clamp(K_DD, radius):
  """K * min(1, radius / ||K||_F): rho(K) <= ||K||_2 <= ||K||_F <= radius (S2-c)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(K_DD)))
  return K_DD * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-30))


def koopman_matrices(params, cfg: ModelConfig):
  """The Koopman matrices K^(l) of every layer (QSF D16: eig(K^(l))).

  Args:
    params: the model's ``params`` collection (Stages II-IV).
    cfg: its configuration.

  Returns:
    K (L, d, d) float32, in the orientation h <- h + K u.
  """
  if cfg.stage not in ("koopman", "koopman_attn", "hamiltonian_attn"):
    raise ValueError(f"stage {cfg.stage!r} has no Koopman matrices")
  if isinstance(params, dict) and "params" in params:
    raise ValueError("koopman_matrices takes the model's 'params' collection, not the whole "
                     "variables dict: pass variables['params']")
  want = "S" if cfg.stage == "hamiltonian_attn" else "K"
  try:
    kp = params["layers"]["koopman"]
    kp[want]
  except (KeyError, TypeError):
    raise ValueError(
        f"params has no layers/koopman/{want}, which a {cfg.stage} model has: are the "
        f"parameters and the configuration of the same stage?") from None
  if cfg.stage == "hamiltonian_attn":
    return jax.vmap(lambda S: orthogonal_from_free(S, cfg.hamiltonian_param))(kp["S"])
  K_LDD = jnp.asarray(kp["K"], jnp.float32)
  if cfg.stage == "koopman" and cfg.koopman_mixer == "recurrent":
    # S2-c uses the clamped matrix; report the one the model applies.
    K_LDD = jax.vmap(lambda K: frobenius_clamp(K, cfg.recurrent_radius))(K_LDD)
  return K_LDD


class Koopman(nn.Module):
  """The Koopman term mixer(u) K^T + b of one layer (QSF eq. 60; §3.3 S2-a/b/c).

  Attributes:
    cfg: model configuration.
    mode: "none", "cosine" or "recurrent" (see the module docstring).
    orthogonal: Stage IV: K = expm(S - S^T) (D8).
    decode: one token per call with a ``"cache"`` collection.
  """
  cfg: ModelConfig
  mode: str = "none"
  orthogonal: bool = False
  decode: bool = False

  def matrix(self):
    """K (d, d) float32: the free parameter ``K`` or orthogonal_from_free(``S``)."""
    cfg = self.cfg
    d = cfg.d_model
    init = nn.initializers.normal(cfg.init_std)
    if self.orthogonal:
      return orthogonal_from_free(self.param("S", init, (d, d), jnp.float32),
                                  cfg.hamiltonian_param)
    K_DD = self.param("K", init, (d, d), jnp.float32)
    if self.mode == "recurrent":
      K_DD = frobenius_clamp(K_DD, cfg.recurrent_radius)
    return K_DD

  @nn.compact
  def __call__(self, u_BTD, t=0):
    """The Koopman term for the (normalised) layer input u.

    Args:
      u_BTD: u = N(h) (B, T, d); T = 1 when decoding.
      t: decode position (int32 scalar); ignored otherwise.

    Returns:
      (B, T, d) float32.
    """
    cfg = self.cfg
    dt = compute_dtype(cfg)
    K_DD = self.matrix()
    b_D = self.param("b", nn.initializers.zeros, (cfg.d_model,), jnp.float32)
    if self.mode == "recurrent":
      return self._recurrent(u_BTD.astype(jnp.float32), K_DD) + b_D[None, None]
    if self.mode == "cosine":
      if self.decode:
        u_BTD = fourier.PastInputs(cfg.max_seq_len, "cosine", dtype=dt, name="past")(u_BTD, t)
      else:
        u_BTD = fourier.causal_cosine_mix(u_BTD, t_max=cfg.max_seq_len, dtype=dt)
    y_BTD = jnp.einsum("btd,ed->bte", u_BTD.astype(dt), K_DD.astype(dt),
                       preferred_element_type=jnp.float32)
    return y_BTD + b_D[None, None]

  def _recurrent(self, u_BTD, K_DD):
    """S2-c: s_t = K s_{t-1} + u_t, s_{-1} = 0 (QSF §3.3; eq. 59 with b inside h)."""
    B, T, d = u_BTD.shape
    state = self.variable("cache", "state", lambda: jnp.zeros((B, d), jnp.float32)) \
        if self.decode else None
    s0_BD = state.value if self.decode else jnp.zeros((B, d), jnp.float32)

    def step(s_BD, u_BD):
      s_BD = s_BD @ K_DD.T + u_BD
      return s_BD, s_BD

    sT_BD, s_TBD = jax.lax.scan(step, s0_BD, jnp.swapaxes(u_BTD, 0, 1))
    if self.decode and not self.is_initializing():
      state.value = sT_BD
    return jnp.swapaxes(s_TBD, 0, 1)
