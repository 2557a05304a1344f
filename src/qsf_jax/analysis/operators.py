"""A trained layer's linear operators in float64 (QSF §3.3-3.5, §6.4; decisions D15, D16).

Reads, from a model's ``params`` tree (see ``qsf_jax.models.params``), the
objects the QSF analysis works with, per layer l:

  K^(l)    Koopman matrix, orientation h <- h + K u (D16: eig(K) is "the" spectrum);
           Stage IV rebuilds K = expm(S - S^T) from S in float64 (D8), Stage II
           S2-c applies the Frobenius clamp the model applies;
  b^(l)    Koopman bias (a coherent displacement, QSF §2.3);
  W_V^(l)  value projection in column form, v = W_V u + b_V (the measurement
           matrix M of QSF eq. 55; ``None`` for Stage II, which measures nothing);
  alpha_l  measurement strength (Stages III/IV).

Everything is returned as float64 numpy arrays (host analysis, D15).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from qsf_jax.models.config import ModelConfig
from qsf_jax.models.koopman import frobenius_clamp, orthogonal_from_free

KOOPMAN_STAGES = ("koopman", "koopman_attn", "hamiltonian_attn")


def check_koopman_stage(stage: str) -> None:
  """Raises ``ValueError`` unless ``stage`` has Koopman matrices (Stages II-IV)."""
  if stage not in KOOPMAN_STAGES:
    raise ValueError(
        f"stage {stage!r} has no Koopman operator to analyse; the spectral analysis "
        f"needs a checkpoint of one of {list(KOOPMAN_STAGES)}")


@dataclasses.dataclass(frozen=True)
class LayerOperators:
  """Float64 operators of every layer (leading axis L).

  Attributes:
    K: Koopman matrices (L, d, d).
    b: Koopman biases (L, d).
    W_V: value projections in column form (L, d, d), or None (Stage II).
    alpha: measurement strengths (L,), or None (Stage II).
    K_model: the Koopman matrices as the model evaluates them (float32 maths
      for Stage IV), (L, d, d) float64; equal to ``K`` for Stages II/III.
  """
  K: np.ndarray
  b: np.ndarray
  W_V: np.ndarray | None
  alpha: np.ndarray | None
  K_model: np.ndarray

  @property
  def n_layers(self) -> int:
    return int(self.K.shape[0])

  @property
  def dim(self) -> int:
    return int(self.K.shape[-1])


def _f64(x) -> np.ndarray:
  return np.asarray(jax.device_get(x), dtype=np.float64)


def layer_operators(params, cfg: ModelConfig) -> LayerOperators:
  """The operators (K, b, W_V, alpha) of every layer in float64 (QSF §6.4, D15, D16).

  Stage III: K = ``layers/koopman/K``. Stage IV: K = expm(S - S^T) evaluated in
  float64 from ``layers/koopman/S`` (D8; ``cfg.hamiltonian_param`` selects the
  Cayley form), so that |lambda| = 1 holds to float64 round-off. Stage II with
  the S2-c mixer: K scaled by min(1, r / ||K||_F) as in the model. W_V is the
  transpose of the ``value`` Dense kernel (v = u @ kernel + b_V).

  Args:
    params: the model's ``params`` collection (nested dicts of arrays).
    cfg: its ``ModelConfig``.

  Returns:
    A ``LayerOperators``.

  Raises:
    ValueError: for a stage without Koopman matrices or a tree without them.
  """
  check_koopman_stage(cfg.stage)
  try:
    kp = params["layers"]["koopman"]
  except (KeyError, TypeError) as e:
    raise ValueError("params has no 'layers/koopman' subtree; is it a Koopman-stage "
                     "parameter tree?") from e
  if cfg.stage == "hamiltonian_attn":
    S_LDD = _f64(kp["S"])
    with jax.enable_x64(True):
      K = np.stack([_f64(orthogonal_from_free(S, cfg.hamiltonian_param)) for S in S_LDD])
    K_model = np.stack([_f64(orthogonal_from_free(S.astype(np.float32), cfg.hamiltonian_param))
                        for S in S_LDD])
  else:
    K = _f64(kp["K"])
    if cfg.stage == "koopman" and cfg.koopman_mixer == "recurrent":
      with jax.enable_x64(True):
        K = np.stack([_f64(frobenius_clamp(Kl, cfg.recurrent_radius)) for Kl in K])
    K_model = K
  b = _f64(kp["b"])
  W_V = alpha = None
  if cfg.stage != "koopman":
    W_V = np.swapaxes(_f64(params["layers"]["attn"]["value"]["kernel"]), -1, -2)
    alpha = _f64(params["layers"]["alpha"]).reshape(-1)
  return LayerOperators(K=K, b=b, W_V=W_V, alpha=alpha, K_model=K_model)
