"""Spectral projectors of a Koopman matrix and the effective gain (QSF eq. 11, §2.4).

Eq. 11 weighs each mode by ||P_k h||^2, with P_k the spectral projector onto
eigenspace k of K; for non-normal K these are the oblique projectors
P_k = v_k w_k^dagger / (w_k^dagger v_k) from right (v) and left (w) eigenvectors.
That form needs care in two cases, both handled here by grouping eigenvalues:

* a *repeated* eigenvalue has one eigenspace, and its projector is the sum of
  the rank-one terms of a basis of it; a single term depends on the basis the
  eigen-solver happened to return;
* a *defective* (or nearly defective) eigenvalue has no eigenvector basis: the
  solver returns nearly parallel vectors for slightly split eigenvalues, and
  the rank-one terms are huge and cancel. The projector onto the generalised
  eigenspace (the Riesz projector) is well defined and well conditioned when
  the group is separated from the rest of the spectrum.

Eigenvalues closer than ``cluster_rtol * ||K||_2`` form one group, and a group
whose projector norm exceeds ``proj_max`` (a sign of near-defectiveness) is
merged with its nearest eigenvalue until every projector is bounded. A group's
projector is P_g = Q (Y^dagger Q)^{-1} Y^dagger, with Q and Y orthonormal bases
of its right and left invariant subspaces (ordered complex Schur forms of K
and K^dagger). Everything runs on the host in float64 (decision D15).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import scipy.linalg as sl

from qsf_jax import _checks
from qsf_jax.physics.host_arrays import host_real


@dataclasses.dataclass(frozen=True)
class SpectralProjectors:
  """The spectral projectors of one K, by eigenvalue group (QSF eq. 11).

  Attributes:
    lam: eigenvalues (d,) complex128.
    groups: tuple of index tuples into ``lam``: the eigenspaces (one index per
      simple eigenvalue; several for a repeated or defective one).
    coords: complex128 (d, d). For each group g, ||P_g h||^2 = sum over the
      rows ``coords[g]`` of |coords[i] . h|^2 (each row belongs to one group).
    basis: complex128 (d, d), orthonormal columns ``basis[:, g]`` spanning the
      (generalised) eigenspace of group g, so P_g = basis[:, g] @ coords[g].
    norms: ||P_g||_2 per group (n_groups,); 1 for an orthogonal projector.
    max_spread: largest | |lambda_i| - |lambda_j| | within one group, relative
      to max(1, spectral radius); eq. 11 gives a group the mean |lambda|.
  """
  lam: np.ndarray
  groups: tuple
  coords: np.ndarray
  basis: np.ndarray
  norms: np.ndarray
  max_spread: float

  def group_of(self) -> np.ndarray:
    """The group index of each eigenvalue (d,) int."""
    out = np.empty(self.lam.shape[0], np.int64)
    for g, idx in enumerate(self.groups):
      out[list(idx)] = g
    return out

  def projector(self, g: int) -> np.ndarray:
    """The spectral projector P_g of group g (d, d) complex128."""
    idx = list(self.groups[g])
    return self.basis[:, idx] @ self.coords[idx]

  def weights(self, h_ND) -> np.ndarray:
    """Per-eigenvalue occupancy ||P_g h||^2 / |g| for k in g, unnormalised (N, d).

    A group's weight is shared equally by its eigenvalues, so that sums over a
    group, and G_eff, do not depend on the basis chosen inside an eigenspace.
    """
    c = np.asarray(h_ND, np.float64) @ self.coords.T
    c2 = c.real**2 + c.imag**2
    for idx in self.groups:
      if len(idx) > 1:
        idx = list(idx)
        c2[:, idx] = np.sum(c2[:, idx], axis=1, keepdims=True) / len(idx)
    return c2


def spectral_projectors(K, *, cluster_rtol: float = 1e-6,
                        proj_max: float = 1e6) -> SpectralProjectors:
  """Spectral projectors of a real K onto its (generalised) eigenspaces (QSF eq. 11).

    P_k = v_k w_k^dagger / (w_k^dagger v_k)           (simple eigenvalue k),
    P_g = Q_g (Y_g^dagger Q_g)^{-1} Y_g^dagger        (group g of eigenvalues),

  with sum_g P_g = I and K P_g = P_g K.

  Args:
    K: real matrix (d, d), finite.
    cluster_rtol: eigenvalues within cluster_rtol * ||K||_2 share a group.
    proj_max: largest accepted projector norm before a group is merged with
      its nearest eigenvalue.

  Returns:
    A ``SpectralProjectors``.

  Raises:
    ValueError: for a bad K, or if an invariant subspace cannot be separated.
  """
  K = host_real("K", K)
  d = _checks.check_square("K", K)
  if d == 0:
    raise ValueError("K must be at least 1 x 1")
  if not (np.isfinite(cluster_rtol) and cluster_rtol >= 0):
    raise ValueError(f"cluster_rtol must be a finite number >= 0, got {cluster_rtol!r}")
  if not (proj_max >= 1):
    raise ValueError(f"proj_max must be >= 1, got {proj_max!r}")
  lam, W, V = sl.eig(K, left=True, right=True)
  scale = max(float(np.linalg.norm(K, 2)), np.finfo(np.float64).tiny)
  groups = _initial_groups(lam, cluster_rtol * scale)
  while True:
    parts = [_group_projector(K, lam, W, V, idx) for idx in groups]
    bad = [g for g, (*_, n) in enumerate(parts) if not n <= proj_max]
    if not bad or len(groups) == 1:
      break
    groups = _merge_nearest(lam, groups, max(bad, key=lambda g: parts[g][-1]))
  if not all(np.isfinite(n) for *_, n in parts):
    raise ValueError("K's invariant subspaces could not be separated (singular projector)")
  coords = np.empty((d, d), np.complex128)
  basis = np.empty((d, d), np.complex128)
  for idx, (cols, rows, _) in zip(groups, parts):
    coords[list(idx)] = rows
    basis[:, list(idx)] = cols
  radius = max(1.0, float(np.max(np.abs(lam))))
  spread = max(float(np.ptp(np.abs(lam[list(idx)]))) for idx in groups) / radius
  return SpectralProjectors(lam=lam, groups=tuple(groups), coords=coords, basis=basis,
                            norms=np.array([n for *_, n in parts]), max_spread=spread)


def _initial_groups(lam, atol) -> list:
  """Connected components of |lambda_i - lambda_j| <= atol, as sorted index tuples."""
  d = lam.shape[0]
  parent = list(range(d))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  close = np.abs(lam[:, None] - lam[None, :]) <= atol
  for i, j in zip(*np.nonzero(np.triu(close, 1))):
    parent[find(i)] = find(j)
  comps = {}
  for i in range(d):
    comps.setdefault(find(i), []).append(i)
  return sorted(tuple(c) for c in comps.values())


def _merge_nearest(lam, groups, g) -> list:
  """Merges group g with the group holding the eigenvalue nearest to it."""
  inside = list(groups[g])
  others = [h for h in range(len(groups)) if h != g]
  dist = [np.min(np.abs(lam[inside][:, None] - lam[list(groups[h])][None, :])) for h in others]
  h = others[int(np.argmin(dist))]
  merged = tuple(sorted(groups[g] + groups[h]))
  return sorted([groups[i] for i in range(len(groups)) if i not in (g, h)] + [merged])


def _group_projector(K, lam, W, V, idx):
  """(cols (d, m), rows (m, d), ||P||_2) with P_g = cols @ rows, cols orthonormal."""
  d = K.shape[0]
  if len(idx) == 1:
    k = idx[0]
    v, w = V[:, k] / np.linalg.norm(V[:, k]), W[:, k] / np.linalg.norm(W[:, k])
    s = np.vdot(w, v)  # w^dagger v
    if s == 0:
      return v[:, None], np.full((1, d), np.nan + 0j), np.inf
    return v[:, None], (w.conj() / s)[None, :], float(1.0 / abs(s))
  if len(idx) == d:
    eye = np.eye(d, dtype=np.complex128)
    return eye, eye, 1.0
  Q = _invariant_subspace(K, lam, idx)
  Y = _invariant_subspace(K.T, np.conj(lam), idx)  # K^dagger = K^T for real K
  G = Y.conj().T @ Q
  smin = np.linalg.svd(G, compute_uv=False)[-1]
  if smin == 0:
    return Q, np.full((len(idx), d), np.nan + 0j), np.inf
  return Q, np.linalg.solve(G, Y.conj().T), float(1.0 / smin)


def _invariant_subspace(K, lam, idx):
  """Orthonormal basis (d, m) of the invariant subspace of K for eigenvalues lam[idx]."""
  members = np.zeros(lam.shape[0], bool)
  members[list(idx)] = True
  select = lambda x: bool(members[int(np.argmin(np.abs(lam - x)))])
  try:
    _, Z, sdim = sl.schur(K.astype(np.complex128), output="complex", sort=select)
  except (sl.LinAlgError, ValueError) as e:
    raise ValueError(f"K's invariant subspace for the eigenvalue group near "
                     f"{lam[idx[0]]:.6g} could not be separated: {e}") from e
  if sdim != len(idx):
    raise ValueError(
        f"K's invariant subspace for the eigenvalue group near {lam[idx[0]]:.6g} could not "
        f"be separated ({sdim} Schur eigenvalues selected for {len(idx)} eigenvalues)")
  return Z[:, :sdim]


def effective_gain(K, h, *, cluster_rtol: float = 1e-6, proj_max: float = 1e6,
                   spread_max: float = 1e-3) -> np.ndarray:
  """Effective amplification of a state under K (QSF eq. 11, confidence [C]).

    G_eff(h) = sum_k |lambda_k| ||P_k h||^2 / sum_k ||P_k h||^2,

  with P_k the spectral projectors onto the eigenspaces of K (oblique for
  non-normal K; ``spectral_projectors``). A repeated or (nearly) defective
  eigenvalue counts once, with the projector onto its whole (generalised)
  eigenspace, so the result does not depend on an eigenvector basis. Eq. 11 is
  a weak reconstruction of the paper; its token average is the paper's
  "expectation over tokens". Computed on the host in float64.

  Args:
    K: real Koopman matrix (d, d).
    h: hidden states (..., d).
    cluster_rtol, proj_max: eigenvalue grouping (``spectral_projectors``).
    spread_max: largest accepted spread of |lambda| inside one group (relative
      to max(1, spectral radius)); past it the modes cannot be separated well
      enough for eq. 11 and a ValueError is raised.

  Returns:
    G_eff (...,) float64, between min |lambda| and max |lambda|; NaN where h = 0.
  """
  if (isinstance(spread_max, bool) or not isinstance(spread_max, numbers.Real)
      or not 0 <= spread_max < math.inf):
    raise ValueError(f"spread_max must be a finite number >= 0, got {spread_max!r}")
  proj = spectral_projectors(K, cluster_rtol=cluster_rtol, proj_max=proj_max)
  d = proj.lam.shape[0]
  h = host_real("h", h)
  if h.ndim < 1 or h.shape[-1] != d:
    raise ValueError(f"h must have shape (..., {d}) to match K, got {h.shape}")
  if not proj.max_spread <= spread_max:
    raise ValueError(
        f"K is too close to defective: its eigenvalues can only be separated into groups "
        f"whose |lambda| differ by {proj.max_spread:.3g} > spread_max = {spread_max:g}, so "
        "eq. 11's projectors are not well defined")
  w = proj.weights(h.reshape(-1, d))
  with np.errstate(invalid="ignore"):
    g = (w @ np.abs(proj.lam)) / np.sum(w, axis=-1)
  return g.reshape(h.shape[:-1])
