"""Tests for the spectral projectors and G_eff of QSF eq. 11 (physics.projectors)."""

import numpy as np
import pytest

from qsf_jax.analysis import modes
from qsf_jax.physics.projectors import effective_gain, spectral_projectors


def _similar(J, rng):
  """K = S J S^{-1} and the exact spectral projectors S E_g S^{-1} of J's diagonal blocks."""
  S = rng.normal(size=J.shape)
  S_inv = np.linalg.inv(S)
  return S @ J @ S_inv, lambda mask: S @ np.diag(mask) @ S_inv


def _reference_geff(blocks, h_ND):
  """sum_g |lambda_g| ||P_g h||^2 / sum_g ||P_g h||^2 with exact projectors P_g."""
  w = np.stack([np.sum((h_ND @ P.T) ** 2, axis=1) for _, P in blocks], axis=1)
  return (w @ np.abs([lam for lam, _ in blocks])) / w.sum(axis=1)


@pytest.mark.parametrize("jordan", [2, 3])
def test_defective_k_uses_generalised_eigenspaces(jordan):
  # A (rotated) Jordan block: the eigen-solver returns nearly parallel
  # eigenvectors (cond(V) ~ 1e8 for a 2-block), whose rank-one terms cancel.
  rng = np.random.default_rng(jordan)
  n = jordan + 2
  J = np.diag([0.7] * jordan + [1.5, 0.2]) + np.diag([1.0] * (jordan - 1) + [0.0] * 2, 1)
  for _ in range(3):
    K, proj = _similar(J, rng)
    blocks = [(0.7, proj([1.0] * jordan + [0, 0])), (1.5, proj([0.0] * jordan + [1, 0])),
              (0.2, proj([0.0] * jordan + [0, 1]))]
    h = rng.normal(size=(5, n))
    np.testing.assert_allclose(effective_gain(K, h), _reference_geff(blocks, h), rtol=1e-8)
    p = spectral_projectors(K)
    assert sorted(len(g) for g in p.groups) == [1, 1, jordan]
    for g, idx in enumerate(p.groups):
      lam = p.lam[idx[0]].real
      ref = [P for l, P in blocks if abs(l - lam) < 1e-4][0]
      np.testing.assert_allclose(p.projector(g), ref, atol=1e-6 * np.abs(ref).max())


def test_repeated_eigenvalue_is_basis_independent():
  # K = S diag(2, 2, 0.5) S^{-1} and orthogonally similar copies: G_eff is a
  # property of the eigenspaces, not of the basis the solver picks inside one.
  rng = np.random.default_rng(1)
  K, proj = _similar(np.diag([2.0, 2.0, 0.5]), rng)
  blocks = [(2.0, proj([1.0, 1, 0])), (0.5, proj([0.0, 0, 1]))]
  h = rng.normal(size=(4, 3))
  ref = _reference_geff(blocks, h)
  for _ in range(4):
    Q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    np.testing.assert_allclose(effective_gain(Q @ K @ Q.T, h @ Q.T), ref, rtol=1e-10)
  p = spectral_projectors(K)
  assert sorted(len(g) for g in p.groups) == [1, 2]
  assert p.max_spread < 1e-12


def test_projectors_resolve_the_identity_and_commute_with_k():
  rng = np.random.default_rng(2)
  J = np.diag([0.7, 0.7, 1.5, -0.4, 0.9]) + np.diag([1.0, 0, 0, 0], 1)
  K, _ = _similar(J, rng)
  p = spectral_projectors(K)
  total = np.zeros((5, 5), complex)
  for g in range(len(p.groups)):
    P = p.projector(g)
    np.testing.assert_allclose(P @ P, P, atol=1e-8)
    np.testing.assert_allclose(K @ P, P @ K, atol=1e-8)
    assert np.linalg.norm(P, 2) == pytest.approx(p.norms[g], rel=1e-8)
    total += P
  np.testing.assert_allclose(total, np.eye(5), atol=1e-8)


def test_complex_eigenvalues_simple_and_repeated():
  # Real K with a simple complex pair 1.3 e^{+-1.9i}, a repeated pair 0.9 e^{+-0.7i}
  # (two equal rotation blocks) and 0.5. For a diagonalisable K, sum_g P_g = I with
  # K P_g = P_g K = lambda_g P_g defines the projectors uniquely; the left
  # eigenvectors enter conjugated (w^dagger), and the left subspace of a group
  # belongs to conj(lambda) of K^T.
  rng = np.random.default_rng(5)
  rot = lambda r, t: r * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
  J = np.zeros((7, 7))
  J[:2, :2], J[2:4, 2:4], J[4:6, 4:6], J[6, 6] = rot(1.3, 1.9), rot(0.9, 0.7), rot(0.9, 0.7), 0.5
  K, _ = _similar(J, rng)
  p = spectral_projectors(K)
  assert sorted(len(g) for g in p.groups) == [1, 1, 1, 2, 2]
  total = np.zeros((7, 7), complex)
  for g, idx in enumerate(p.groups):
    P, lam = p.projector(g), p.lam[idx[0]]
    scale = np.linalg.norm(P, 2)
    np.testing.assert_allclose(K @ P, lam * P, atol=1e-9 * scale)
    np.testing.assert_allclose(P @ K, lam * P, atol=1e-9 * scale)
    assert np.linalg.matrix_rank(P, tol=1e-8 * scale) == len(idx)
    total += P
  np.testing.assert_allclose(total, np.eye(7), atol=1e-9)


def test_generic_k_matches_the_eigenvector_formula():
  rng = np.random.default_rng(3)
  K = rng.normal(size=(40, 40)) / np.sqrt(40)
  h = rng.normal(size=(6, 40))
  lam, V = np.linalg.eig(K)
  w = np.abs(np.linalg.solve(V, h.T).T) ** 2
  np.testing.assert_allclose(effective_gain(K, h), (w @ np.abs(lam)) / w.sum(axis=1),
                             rtol=1e-10)
  p = spectral_projectors(K)
  assert len(p.groups) == 40 and p.max_spread == 0.0


def test_grouping_is_relative_to_the_size_of_k():
  """Eigenvalues are grouped within cluster_rtol ||K||_2, so scaling K keeps the groups
  and scales G_eff; the |lambda| spread of a group is relative to max(1, rho)."""
  K, h = np.diag([1.0, 1.0 + 1e-9, 0.3]), np.array([1.0, 0.0, 1.0])
  for c in (1e-6, 1.0, 1e6):
    assert spectral_projectors(c * K).groups == ((0, 1), (2,)), c
    np.testing.assert_allclose(effective_gain(c * K, h) / c, 0.65, rtol=1e-8)
  K = np.diag([100.0, 100.005, 1.0])
  proj = spectral_projectors(K, cluster_rtol=1e-4)
  assert proj.groups == ((0, 1), (2,))
  np.testing.assert_allclose(proj.max_spread, 0.005 / 100.005, rtol=1e-6)
  np.testing.assert_allclose(effective_gain(K, np.ones(3), cluster_rtol=1e-4),
                             (100.0 + 100.005 + 1.0) / 3, rtol=1e-12)
  # cluster_rtol = 0: exactly equal eigenvalues still form one group
  assert spectral_projectors(np.diag([2.0, 2.0, 0.5]), cluster_rtol=0.0).groups == ((0, 1), (2,))


def test_inseparable_modes_are_refused():
  # eigenvalues 1 and 1.01 with nearly parallel eigenvectors: projector norm
  # ~1e10, so the two are merged and their |lambda| differ by 1e-2.
  K = np.array([[1.0, 1e8], [0.0, 1.01]])
  with pytest.raises(ValueError, match="too close to defective"):
    effective_gain(K, np.ones(2))
  assert modes.mode_basis(K) is None
  # a looser spread bound accepts the merged group (P = I: the mean |lambda|)
  np.testing.assert_allclose(effective_gain(K, np.ones(2), spread_max=0.1), 1.005)


def test_mode_basis_groups_defective_top_modes():
  rng = np.random.default_rng(4)
  J = np.diag([3.0, 3.0, 1.0, 0.5]) + np.diag([1.0, 0, 0], 1)
  K, proj = _similar(J, rng)
  basis = modes.mode_basis(K)
  assert len(basis.top) == 2 and np.allclose(np.abs(basis.lam[list(basis.top)]), 3.0, rtol=1e-6)
  h = rng.normal(size=(5, 4))
  w = modes.mode_weights(basis, h)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
  top_ref = np.sum((h @ proj([1.0, 1, 0, 0]).T) ** 2, axis=1)
  all_ref = sum(np.sum((h @ proj(m).T) ** 2, axis=1)
                for m in ([1.0, 1, 0, 0], [0.0, 0, 1, 0], [0.0, 0, 0, 1]))
  np.testing.assert_allclose(w[:, list(basis.top)].sum(axis=1), top_ref / all_ref, rtol=1e-8)
  np.testing.assert_allclose(modes.effective_gain_from_weights(basis.lam, w), effective_gain(K, h),
                             rtol=1e-10)


@pytest.mark.parametrize("K, kwargs, match", [
    (np.zeros((2, 3)), {}, "square"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), {}, "non-finite"),
    (np.eye(2) * 1j, {}, "must be real"),
    (np.eye(2), dict(cluster_rtol=-1.0), "cluster_rtol"),
    (np.eye(2), dict(proj_max=0.5), "proj_max"),
])
def test_bad_inputs(K, kwargs, match):
  with pytest.raises(ValueError, match=match):
    spectral_projectors(K, **kwargs)
  with pytest.raises(ValueError, match="non-finite"):
    effective_gain(np.eye(2), np.array([np.inf, 1.0]))
  for bad in (-1.0, float("nan"), float("inf"), "1e-3", True):  # not "K is too close to defective"
    with pytest.raises(ValueError, match="spread_max must be a finite number >= 0"):
      effective_gain(np.diag([0.5, 0.9]), np.ones(2), spread_max=bad)
