"""Statistics of a trained model on validation tokens (QSF §2.4, §4.4; eq. 11, D9).

* Final hidden-state norms (decision D9): per token RMS(z) = ||z|| / sqrt(d) of
  the final-normalised state z = N_f(h_L), averaged per sequence; reported as
  mean, std and max over sequences (the paper: 1.02 +- 0.08 over 10,000
  validation sequences). The raw RMS(h_L) before the final norm too.
* G_eff (QSF eq. 11) of each layer's Koopman input over the tokens, and the
  occupancy of each layer's top mode per token id (``modes.TokenOccupancy``).
* The states of the first validation sequence at every layer, for the
  propagator plots.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from qsf_jax.analysis import forward, modes


def valid_inputs(mask_BT) -> np.ndarray:
  """Which input positions hold real tokens: t <= n_b with n_b = sum_t mask_bt > 0.

  A row of length n + 1 tokens has n targets (``mask``) and n + 1 inputs
  positions 0..n (its final EOT is an input without a target); all-padding
  rows (n = 0) have none. Positions are capped at T - 1.

  Args:
    mask_BT: target mask of a ``qsf_jax.data`` batch (B, T).

  Returns:
    (B, T) bool.
  """
  mask_BT = np.asarray(mask_BT)
  n_B = mask_BT.sum(axis=1)
  t_T = np.arange(mask_BT.shape[1])
  return (t_T[None, :] <= n_B[:, None]) & (n_B[:, None] > 0)


def sequence_rms(x_BTD, valid_BT) -> np.ndarray:
  """Per-sequence mean over valid tokens of RMS(x_t) = ||x_t|| / sqrt(d) (D9).

  Args:
    x_BTD: states (B, T, d).
    valid_BT: valid tokens (B, T) bool.

  Returns:
    (B',) float64 for the B' rows with at least one valid token.
  """
  x_BTD = np.asarray(x_BTD, np.float64)
  valid_BT = np.asarray(valid_BT, bool)
  if x_BTD.ndim != 3 or valid_BT.shape != x_BTD.shape[:2]:
    raise ValueError(f"x_BTD (B, T, d) and valid_BT (B, T) disagree: {x_BTD.shape}, "
                     f"{valid_BT.shape}")
  with np.errstate(over="ignore", invalid="ignore"):
    rms_BT = np.sqrt(np.mean(np.square(x_BTD), axis=-1))
  n_B = valid_BT.sum(axis=1)
  keep = n_B > 0
  return (np.sum(np.where(valid_BT, rms_BT, 0.0), axis=1)[keep] / n_B[keep])


def norm_statistics(per_sequence) -> dict:
  """Mean, std (population), min and max of per-sequence values (D9).

  Non-finite values (a model whose states overflow) are counted in
  ``non_finite`` and left out of the statistics, which are None if none is
  finite.

  Args:
    per_sequence: (S,) values, S >= 1.

  Returns:
    ``{"sequences", "non_finite", "mean", "std", "min", "max"}``.
  """
  v = np.asarray(per_sequence, np.float64).reshape(-1)
  if v.size == 0:
    raise ValueError("norm_statistics needs at least one sequence")
  ok = v[np.isfinite(v)]
  stats = {"sequences": int(v.size), "non_finite": int(v.size - ok.size)}
  if ok.size == 0:
    return dict(stats, mean=None, std=None, min=None, max=None)
  return dict(stats, mean=float(ok.mean()), std=float(ok.std()), min=float(ok.min()),
              max=float(ok.max()))


@dataclasses.dataclass
class SentenceTrace:
  """The first validation sequence at every layer (float64 host arrays).

  Attributes:
    tokens: token ids (n,).
    k_in: Koopman inputs (L, n, d).
    x_tgt: measurement targets (L, n, d), or None (Stage II).
    step: the layer's update h_out - h_in (L, n, d).
  """
  tokens: np.ndarray
  k_in: np.ndarray
  x_tgt: np.ndarray | None
  step: np.ndarray


def _trim(inputs_BT: np.ndarray, valid_BT: np.ndarray, multiple: int):
  """Drops the padding tail: T' = min(T, ceil(last / m) m); exact for a causal model."""
  T = valid_BT.shape[1]
  last = int(np.max(np.nonzero(valid_BT.any(axis=0))[0])) + 1
  T2 = min(T, multiple * math.ceil(last / multiple))
  return inputs_BT[:, :T2], valid_BT[:, :T2]


def validation_statistics(params, collections, cfg, bases, batches, *, beta=0.0,
                          max_sequences: int = 64, sentence_tokens: int = 48,
                          decode=None, eot_id: int = 0, trim_multiple: int = 128) -> dict:
  """Norm statistics (D9), G_eff (eq. 11) and top-mode token occupancy per layer.

  Args:
    params: model parameters (Stage II-IV).
    collections: its other collections.
    cfg: its ``ModelConfig``.
    bases: per layer a ``modes.ModeBasis`` of K^(l), or None (defective K).
    batches: an iterable of validation batches (``inputs``, ``mask``).
    beta: the normalisation-anneal weight (D5).
    max_sequences: stop after this many non-empty sequences.
    sentence_tokens: tokens of the first sequence kept for ``sentence``.
    decode: ``decode([id]) -> str`` for the token table (None: ids only).
    eot_id: the EOT id.
    trim_multiple: positions are trimmed to a multiple of this (fewer compiles).

  Returns:
    ``{"sequences", "tokens", "z_rms", "h_rms", "layers": [occupancy summary
    per layer, with "g_eff_mean"/"g_eff_max" and "top_modes"], "sentence":
    SentenceTrace}``.
  """
  if max_sequences < 1:
    raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
  if len(bases) != cfg.n_layers:
    raise ValueError(f"bases has {len(bases)} entries for {cfg.n_layers} layers")
  occ = [modes.TokenOccupancy(cfg.vocab_size) for _ in range(cfg.n_layers)]
  z_rms, h_rms, sentence, seen, n_tokens = [], [], None, 0, 0
  for batch in batches:
    valid_BT = valid_inputs(batch["mask"])
    rows = np.nonzero(valid_BT.any(axis=1))[0][:max_sequences - seen]
    if rows.size == 0:
      continue
    inputs_BT, valid_BT = _trim(np.asarray(batch["inputs"])[rows], valid_BT[rows],
                                trim_multiple)
    ids_N = inputs_BT[valid_BT].astype(np.int64)
    h_BTD = None
    for step in forward.iter_layers(params, collections, cfg, inputs_BT, beta):
      k_in = np.asarray(jax.device_get(step.k_in), np.float64)
      if sentence is None:
        n = int(min(sentence_tokens, int(valid_BT[0].sum())))
        sentence = {"tokens": np.asarray(inputs_BT[0, :n], np.int64), "k_in": [], "x_tgt": [],
                    "step": []}
      if len(sentence["k_in"]) < cfg.n_layers:
        n = sentence["tokens"].size
        sentence["k_in"].append(k_in[0, :n])
        sentence["step"].append(np.asarray(step.h_out - step.h_in, np.float64)[0, :n])
        if step.x_tgt is not None:
          sentence["x_tgt"].append(np.asarray(step.x_tgt, np.float64)[0, :n])
      basis = bases[step.layer]
      if basis is not None:
        w_ND = modes.mode_weights(basis, k_in[valid_BT])
        occ[step.layer].update(ids_N, w_ND[:, list(basis.top)].sum(axis=1),
                               modes.effective_gain_from_weights(basis.lam, w_ND))
      h_BTD = step.h_out
    z_BTD = forward.final_states(params, collections, cfg, h_BTD, beta)
    z_rms.append(sequence_rms(np.asarray(z_BTD), valid_BT))
    h_rms.append(sequence_rms(np.asarray(h_BTD), valid_BT))
    seen += int(rows.size)
    n_tokens += int(ids_N.size)
    if seen >= max_sequences:
      break
  if seen == 0:
    raise ValueError("the validation data produced no non-empty sequence")
  decode = decode or (lambda ids: f"<{ids[0]}>")
  layers = []
  for l, acc in enumerate(occ):
    rec = acc.summary(decode, eot_id)
    rec["top_modes"] = None if bases[l] is None else [
        [float(bases[l].lam[k].real), float(bases[l].lam[k].imag)] for k in bases[l].top]
    rec["projector_norm"] = None if bases[l] is None else bases[l].proj_norm
    layers.append(rec)
  trace = SentenceTrace(tokens=sentence["tokens"], k_in=np.stack(sentence["k_in"]),
                        x_tgt=np.stack(sentence["x_tgt"]) if sentence["x_tgt"] else None,
                        step=np.stack(sentence["step"]))
  return {"sequences": seen, "tokens": n_tokens,
          "z_rms": norm_statistics(np.concatenate(z_rms)),
          "h_rms": norm_statistics(np.concatenate(h_rms)), "layers": layers,
          "sentence": trace}
