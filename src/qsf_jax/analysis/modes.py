"""Mode occupancy, G_eff and the "special tokens" of the top modes (QSF eq. 11, §4.4).

For a Koopman matrix K = V diag(lambda) V^{-1} (unit right eigenvectors v_k),
the oblique spectral projectors P_k = v_k w_k^dagger give ||P_k h|| = |c_k| with
c = V^{-1} h, and the *occupancy* of mode k by the state h is

  w_k(h) = |c_k|^2 / sum_j |c_j|^2,        G_eff(h) = sum_k |lambda_k| w_k(h)   (eq. 11).

Repeated and (nearly) defective eigenvalues are grouped, with one projector
onto their (generalised) eigenspace whose weight the group's eigenvalues share
(``physics.projectors``).

The paper says the largest-|lambda| modes "concentrate on special tokens"
(paragraph boundaries, sentence ends, discourse markers; QSF §2.4, §4.4).
``TokenOccupancy`` accumulates, over validation tokens, the occupancy of the
top mode group (the largest-|lambda| eigenvalue with its complex-conjugate
partner) per token id, and compares token categories with the average.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qsf_jax import _checks
from qsf_jax.physics.projectors import SpectralProjectors, spectral_projectors

# Single-word discourse markers of TinyStories prose (this project's proxy list).
DISCOURSE_MARKERS = frozenset({
    "but", "then", "so", "because", "however", "suddenly", "finally", "later", "after",
    "when", "once", "one"})
CATEGORIES = ("end of text", "newline", "sentence end", "discourse marker")


@dataclasses.dataclass(frozen=True)
class ModeBasis:
  """Spectral projectors of one K for the projections of eq. 11.

  Attributes:
    lam: eigenvalues (d,) complex128.
    projectors: the ``SpectralProjectors`` of K (eigenvalue groups and the
      coordinates giving ||P_g h||).
    top: indices of the top mode group (the largest |lambda|, its conjugate
      partner, and any eigenvalue sharing a (generalised) eigenspace with them).
    proj_norm: the largest spectral-projector norm ||P_g||_2 (1 for normal K);
      large values mean strongly non-normal modes.
  """
  lam: np.ndarray
  projectors: SpectralProjectors
  top: tuple
  proj_norm: float


def top_mode_group(lam, groups=None) -> tuple:
  """The largest-|lambda| eigenvalue and, if complex, its conjugate partner.

  Args:
    lam: eigenvalues (d,) complex.
    groups: optional eigenvalue groups (``SpectralProjectors.groups``); the
      members of the groups of the eigenvalues above are added.

  Returns:
    A sorted tuple of indices into ``lam`` (one or two without ``groups``).
  """
  lam = np.asarray(lam)
  k = int(np.argmax(np.abs(lam)))
  scale = max(abs(lam[k]), 1e-300)
  out = {k}
  if abs(lam[k].imag) > 1e-12 * scale:
    dist = np.abs(lam - np.conj(lam[k]))
    dist[k] = np.inf
    j = int(np.argmin(dist))
    if dist[j] <= 1e-8 * scale:
      out.add(j)
  if groups is not None:
    for idx in groups:
      if out.intersection(idx):
        out.update(idx)
  return tuple(sorted(out))


def mode_basis(K, *, proj_max: float = 1e6, spread_max: float = 1e-3) -> ModeBasis | None:
  """Spectral projectors of K (float64), or None if its modes cannot be separated.

  Repeated and (nearly) defective eigenvalues share one projector onto their
  (generalised) eigenspace (``physics.spectral_projectors``); K is refused
  (None) when that grouping joins eigenvalues whose |lambda| differ by more
  than ``spread_max``, as ``effective_gain`` refuses it.

  Args:
    K: real matrix (d, d).
    proj_max: largest accepted projector norm before groups are merged.
    spread_max: largest accepted relative |lambda| spread inside a group.
  """
  K = np.asarray(K, np.float64)
  if K.ndim != 2 or K.shape[0] != K.shape[1]:
    raise ValueError(f"K must be a square matrix, got shape {K.shape}")
  proj = spectral_projectors(K, proj_max=proj_max)
  if not proj.max_spread <= spread_max:
    return None
  return ModeBasis(lam=proj.lam, projectors=proj, top=top_mode_group(proj.lam, proj.groups),
                   proj_norm=float(np.max(proj.norms)))


def mode_weights(basis: ModeBasis, h_ND) -> np.ndarray:
  """Occupancies w_k(h) = ||P_g h||^2 / (|g| sum_g' ||P_g' h||^2), k in group g (QSF eq. 11).

  For a simple eigenvalue ||P_k h|| = |c_k|, c = V^{-1} h on unit right
  eigenvectors; a group's share is split equally among its eigenvalues.

  Args:
    basis: from ``mode_basis``.
    h_ND: real states (N, d).

  Returns:
    w (N, d) float64, rows summing to 1 (NaN rows where h = 0).
  """
  h_ND = np.asarray(h_ND, np.float64)
  d = basis.lam.shape[0]
  if h_ND.ndim != 2 or h_ND.shape[1] != d:
    raise ValueError(f"h_ND must have shape (N, {d}), got {h_ND.shape}")
  with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    c2 = basis.projectors.weights(h_ND)
    return c2 / np.sum(c2, axis=1, keepdims=True)


def effective_gain_from_weights(lam, w_ND) -> np.ndarray:
  """G_eff = sum_k |lambda_k| w_k per state (QSF eq. 11). Shapes (d,), (N, d) -> (N,)."""
  return w_ND @ np.abs(np.asarray(lam))


def token_category(text: str, token_id: int, eot_id: int) -> str | None:
  """The "special token" category of a decoded token (QSF §4.4), or None.

  end of text: the EOT id; newline: contains a line break (paragraph
  boundary); sentence end: only punctuation/quotes/space with one of . ! ?;
  discourse marker: a word of ``DISCOURSE_MARKERS`` (case-insensitive).
  """
  if token_id == eot_id:
    return "end of text"
  if "\n" in text:
    return "newline"
  s = text.strip()
  if s and any(c in s for c in ".!?") and all(c in ".!?\"'" for c in s):
    return "sentence end"
  if s.lower() in DISCOURSE_MARKERS:
    return "discourse marker"
  return None


class TokenOccupancy:
  """Running sums of the top-mode occupancy per token id, for one layer.

  Args:
    vocab_size: V.
  """

  def __init__(self, vocab_size: int):
    self.sum_V = np.zeros(vocab_size, np.float64)
    self.count_V = np.zeros(vocab_size, np.int64)
    self.geff_sum = 0.0
    self.geff_max = -np.inf
    self.n = 0

  def update(self, ids_N, occ_N, geff_N) -> None:
    """Adds tokens ``ids_N`` with top-mode occupancies ``occ_N`` and G_eff ``geff_N``."""
    V = self.sum_V.shape[0]
    ids_N = np.asarray(ids_N)
    _checks.check_token_ids("ids_N", ids_N, V)
    ok = np.isfinite(occ_N) & np.isfinite(geff_N)
    ids_N, occ_N, geff_N = ids_N[ok], occ_N[ok], geff_N[ok]
    self.sum_V += np.bincount(ids_N, weights=occ_N, minlength=V)[:V]
    self.count_V += np.bincount(ids_N, minlength=V)[:V]
    if geff_N.size:
      self.geff_sum += float(np.sum(geff_N))
      self.geff_max = max(self.geff_max, float(np.max(geff_N)))
    self.n += int(ids_N.size)

  def summary(self, decode, eot_id: int, *, top: int = 10, min_count: int = 3) -> dict:
    """Mean occupancy overall, per category, and the top token ids.

    Args:
      decode: ``decode([id]) -> str``.
      eot_id: the EOT id.
      top: rows of the token table.
      min_count: tokens seen fewer times are left out of the table.

    Returns:
      ``{"tokens", "mean_occupancy", "g_eff_mean", "g_eff_max", "categories":
      {name: {"tokens", "share", "mean_occupancy", "enrichment"}}, "top_tokens":
      [{"id", "text", "count", "mean_occupancy", "enrichment"}]}``; enrichment is
      the mean occupancy over the overall mean.
    """
    n = int(self.count_V.sum())
    if n == 0:
      return {"tokens": 0, "mean_occupancy": None, "g_eff_mean": None, "g_eff_max": None,
              "categories": {}, "top_tokens": []}
    mean = float(self.sum_V.sum() / n)
    seen = np.nonzero(self.count_V)[0]
    texts = {int(i): decode([int(i)]) for i in seen}
    cats = {c: [] for c in CATEGORIES}
    for i in seen:
      c = token_category(texts[int(i)], int(i), eot_id)
      if c is not None:
        cats[c].append(int(i))
    ratio = lambda m: (m / mean) if mean > 0 else None
    categories = {}
    for c, ids in cats.items():
      cnt = int(self.count_V[ids].sum()) if ids else 0
      m = float(self.sum_V[ids].sum() / cnt) if cnt else None
      categories[c] = {"tokens": cnt, "share": cnt / n, "mean_occupancy": m,
                       "enrichment": None if m is None else ratio(m)}
    cand = seen[self.count_V[seen] >= min_count]
    per_tok = self.sum_V[cand] / self.count_V[cand]
    order = cand[np.argsort(-per_tok, kind="stable")][:top]
    rows = [{"id": int(i), "text": texts[int(i)], "count": int(self.count_V[i]),
             "mean_occupancy": float(self.sum_V[i] / self.count_V[i]),
             "enrichment": ratio(float(self.sum_V[i] / self.count_V[i]))} for i in order]
    return {"tokens": n, "mean_occupancy": mean, "g_eff_mean": self.geff_sum / self.n,
            "g_eff_max": self.geff_max, "categories": categories, "top_tokens": rows}
