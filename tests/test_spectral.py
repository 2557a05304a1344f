"""Tests for the Koopman spectrum and energy budget (QSF §2.2-2.4, §6.6, §6.8 item 8)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl

from qsf_jax.physics.layer import layer_generator
from qsf_jax.physics.projectors import effective_gain
from qsf_jax.physics.spectral import (commutator_norm, hamiltonian_koopman, koopman_generator,
                                      spectral_analysis)


def _rng(seed=0):
  return np.random.default_rng(seed)


def _with_eigenvalues(lam_real, rng, pairs=()):
  """A non-normal real matrix with real eigenvalues ``lam_real`` and pairs r e^{+-i t}."""
  blocks = [np.array([[x]]) for x in lam_real]
  blocks += [r * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) for r, t in pairs]
  B = sl.block_diag(*blocks)
  Q = rng.normal(size=B.shape) + 3 * np.eye(B.shape[0])
  return Q @ B @ np.linalg.inv(Q)


def _plain(obj):
  """True if obj only holds python scalars, str, None, lists and str-keyed dicts."""
  if isinstance(obj, dict):
    return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
  if isinstance(obj, list):
    return all(_plain(v) for v in obj)
  return obj is None or type(obj) in (bool, int, float, str)


def test_hamiltonian_koopman_float64_is_orthogonal_and_neutral(x64):
  S_LDD = jnp.asarray(_rng(1).normal(size=(3, 8, 8)))
  K_LDD = hamiltonian_koopman(S_LDD)
  assert K_LDD.dtype == jnp.float64
  K = np.asarray(K_LDD)
  for K_DD in K:
    np.testing.assert_allclose(K_DD.T @ K_DD, np.eye(8), atol=1e-12)
  # The generator is S - S^T itself (decision D8), not a rescaled skew part.
  for S_DD, K_DD in zip(np.asarray(S_LDD), K):
    np.testing.assert_allclose(K_DD, sl.expm(S_DD - S_DD.T), rtol=0, atol=1e-12)
  r = spectral_analysis(K_LDD, tol=1e-6)
  for rec in r["layers"]:
    np.testing.assert_allclose(rec["abs"], 1.0, atol=1e-12)
  assert r["counts"] == {"decay": 0, "neutral": 24, "growth": 0}
  assert abs(r["gamma_net"]) < 1e-12 and r["gamma_decay"] < 1e-12 and r["gamma_growth"] < 1e-12
  assert r["slogdet_consistent"] and abs(r["slogdet_gamma_net"]) < 1e-12


def test_hamiltonian_koopman_float32():
  S = jnp.asarray(_rng(2).normal(size=(16, 16)), jnp.float32)
  K = hamiltonian_koopman(S)
  assert K.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(K.T @ K), np.eye(16), atol=1e-5)
  r = spectral_analysis([K], tol=1e-5)
  np.testing.assert_allclose(r["layers"][0]["abs"], 1.0, atol=1e-5)
  assert r["counts"]["neutral"] == 16


def test_hamiltonian_koopman_rejects_bad_input():
  with pytest.raises(ValueError, match="S must be a square matrix"):
    hamiltonian_koopman(jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="S must be real"):
    hamiltonian_koopman(jnp.zeros((3, 3), jnp.complex64))


def test_classification_thresholds_on_diagonal_K():
  g = np.array([-0.2, -0.03, -0.005, 0.0, 0.005, 0.03, 0.2, 0.5])
  K1 = np.diag(np.exp(g))
  K2 = sl.block_diag(np.diag(np.exp(g[:-1]))[:5, :5], 0.5 * np.array([[0.0, -1.0], [1.0, 0.0]]),
                     [[-np.exp(0.6)]])
  r = spectral_analysis([K1, K2], tol=1e-2, dt=1.0)
  l1 = r["layers"][0]
  np.testing.assert_allclose(sorted(l1["gamma"]), g, atol=1e-14)
  assert l1["counts"] == {"decay": 2, "neutral": 3, "growth": 3}
  assert l1["counts_by_tol"]["0.001"] == {"decay": 3, "neutral": 1, "growth": 4}
  assert l1["counts_by_tol"]["0.05"] == {"decay": 1, "neutral": 5, "growth": 2}
  assert l1["classes"][0] == "growth" and l1["classes"][-1] == "decay"  # sorted by |lambda|
  # Eqs. 6-8: Gamma_decay is a magnitude, Gamma_net = Gamma_growth - Gamma_decay.
  assert l1["gamma_decay"] == pytest.approx(0.235, abs=1e-14)
  assert l1["gamma_growth"] == pytest.approx(0.735, abs=1e-14)
  assert l1["gamma_net"] == pytest.approx(0.5, abs=1e-14)
  assert l1["gamma_by_class"] == pytest.approx({"decay": -0.23, "neutral": 0.0, "growth": 0.73})
  assert sum(l1["gamma_by_class"].values()) == pytest.approx(l1["gamma_net"], abs=1e-14)
  l2 = r["layers"][1]
  omega = dict(zip(np.round(l2["abs"], 12), l2["omega"]))
  assert omega[np.round(np.exp(0.6), 12)] == pytest.approx(-np.pi)  # lambda < 0: arg = pi
  pair = sorted(w for a, w in zip(l2["abs"], l2["omega"]) if abs(a - 0.5) < 1e-12)
  np.testing.assert_allclose(pair, [-np.pi / 2, np.pi / 2], atol=1e-14)
  assert r["argmax_layer"] == 1
  assert r["spectral_radius"] == pytest.approx(np.exp(0.6))
  assert r["min_abs_eigenvalue"] == pytest.approx(0.5)
  assert r["gamma_net"] == pytest.approx(0.5 - 0.23 + 2 * np.log(0.5) + 0.6, abs=1e-13)
  assert r["net_dissipative"] is True  # eq. 9: Gamma_net < 0
  assert r["layers"][0]["net_dissipative"] is False
  # The boundary |gamma| = tol is neutral (decay iff gamma < -tol, growth iff gamma > tol).
  edge = spectral_analysis([np.diag([0.5, 2.0, 1.0])], tol=float(np.log(2.0)))
  assert edge["counts"] == {"decay": 0, "neutral": 3, "growth": 0}
  # dt rescales the rates: gamma = ln|lambda| / dt, omega = -arg / dt.
  r2 = spectral_analysis([K1, K2], tol=2e-2, dt=2.0)
  np.testing.assert_allclose(r2["layers"][0]["gamma"], np.asarray(l1["gamma"]) / 2, atol=1e-14)
  assert r2["layers"][0]["counts"] == {"decay": 1, "neutral": 5, "growth": 2}
  assert r2["gamma_net"] == pytest.approx(r["gamma_net"] / 2)


def test_class_sums_and_labels_at_the_boundary():
  # gamma = ln 4, ln 2, ln 1.1, 0, ln 0.25 with tol = ln 2 (exact in float64): the boundary
  # mode ln 2 is neutral in counts, labels and sums, and the neutral modes do not sum
  # to zero, so every class sum tells the classes apart.
  ln2 = float(np.log(2.0))
  r = spectral_analysis([np.diag([0.25, 1.0, 2.0, 1.1, 4.0])], tol=ln2)
  rec = r["layers"][0]
  assert rec["classes"] == ["growth", "neutral", "neutral", "neutral", "decay"]
  assert rec["counts"] == {"decay": 1, "neutral": 3, "growth": 1}
  assert rec["gamma_by_class"] == pytest.approx(
      {"decay": -2 * ln2, "neutral": ln2 + np.log(1.1), "growth": 2 * ln2}, abs=1e-14)
  assert sum(rec["gamma_by_class"].values()) == pytest.approx(rec["gamma_net"], abs=1e-14)
  # Eq. 9 is strict: Gamma_net = 0 (the identity layer) is not net-dissipative, and
  # neither is a unitary K from expm, whose Gamma_net is round-off of either sign
  # (-2e-14 here), as the report's verdict ("balanced") says.
  ident = spectral_analysis([np.eye(3)])
  assert ident["gamma_net"] == 0.0 and ident["net_dissipative"] is False
  S = _rng(0).normal(size=(16, 16))
  unitary = spectral_analysis([sl.expm(S - S.T)])
  assert 0 < abs(unitary["gamma_net"]) < 1e-12
  assert unitary["net_dissipative"] is False and unitary["layers"][0]["net_dissipative"] is False
  assert spectral_analysis([np.diag([1.0, 1.0 - 1e-6])])["net_dissipative"] is True


def test_counts_sum_and_budget_identities():
  rng = _rng(3)
  K = rng.normal(size=(5, 7, 7)) / np.sqrt(7) + 0.5 * np.eye(7)
  r = spectral_analysis(K)
  assert sum(r["counts"].values()) == r["n_eigenvalues"] == 35
  for counts in r["counts_by_tol"].values():
    assert sum(counts.values()) == 35
  for rec in r["layers"]:
    assert sum(rec["counts"].values()) == 7 and len(rec["eigenvalues"]) == 7
  assert r["gamma_decay"] >= 0 and r["gamma_growth"] >= 0
  assert r["gamma_net"] == pytest.approx(r["gamma_growth"] - r["gamma_decay"], abs=1e-12)
  assert r["gamma_net"] == pytest.approx(sum(x["gamma_net"] for x in r["layers"]), abs=1e-12)
  assert r["net_dissipative"] == (r["gamma_net"] < 0)
  np.testing.assert_allclose(
      np.sort_complex([complex(*z) for z in r["layers"][2]["eigenvalues"]]),
      np.sort_complex(np.linalg.eigvals(K[2])), atol=1e-12)


def test_gamma_net_matches_slogdet_and_trace():
  rng = _rng(4)
  A = rng.normal(size=(6, 6)) * 0.4
  K_exp = sl.expm(A)  # QSF §6.8 item 2: sum ln|lambda(e^A)| = Tr A = Tr D
  K_neg = _with_eigenvalues([-0.7, 1.3, 0.9, 2.0], rng, pairs=[(0.8, 1.0)])
  U, _, Vt = np.linalg.svd(rng.normal(size=(6, 6)))
  K_sing = U @ np.diag([3.0, 2.0, 1.0, 0.5, 1e-3, 1e-9]) @ Vt  # near-singular
  r = spectral_analysis([K_exp, K_neg, K_sing])
  assert r["layers"][0]["gamma_net"] == pytest.approx(np.trace(A), abs=1e-12)
  assert r["layers"][1]["counts"]["decay"] == 4  # -0.7, 0.9 and the pair 0.8 e^{+-i}
  assert r["layers"][2]["min_abs_eigenvalue"] < 1e-8
  logdets = [np.linalg.slogdet(K)[1] for K in (K_exp, K_neg, K_sing)]
  for rec, ld in zip(r["layers"], logdets):
    assert rec["slogdet_consistent"]
    assert rec["gamma_net"] == pytest.approx(ld, abs=1e-6 * max(1, np.sum(np.abs(rec["gamma"]))))
  assert r["slogdet_consistent"]
  assert r["slogdet_gamma_net"] == pytest.approx(sum(logdets), rel=1e-12)
  assert r["gamma_net"] == pytest.approx(sum(logdets), rel=1e-6)
  # dt divides both sides.
  r2 = spectral_analysis([K_exp, K_neg, K_sing], dt=0.5)
  assert r2["slogdet_consistent"] and r2["gamma_net"] == pytest.approx(2 * r["gamma_net"])


def test_exactly_singular_layer_uses_floor():
  K = np.diag([2.0, 0.5, 0.0])
  r = spectral_analysis([K], floor=1e-200)
  assert min(r["layers"][0]["gamma"]) == pytest.approx(np.log(1e-200))
  assert r["slogdet_gamma_net"] is None and r["slogdet_consistent"] is False
  assert r["min_abs_eigenvalue"] == 0.0 and r["counts"]["decay"] == 2
  json.dumps(spectral_analysis([K], commutator=True), allow_nan=False)


def test_json_round_trip_and_plain_types():
  rng = _rng(5)
  K = [rng.normal(size=(5, 5)), _with_eigenvalues([-0.5, 1.1, 0.9], rng, pairs=[(1.2, 0.4)])]
  r = spectral_analysis(K, commutator=True)
  assert _plain(r)
  assert json.loads(json.dumps(r, allow_nan=False)) == r
  assert set(r) >= {"counts", "counts_by_tol", "spectral_radius", "min_abs_eigenvalue",
                    "argmax_layer", "gamma_decay", "gamma_growth", "gamma_net",
                    "slogdet_gamma_net", "slogdet_consistent", "net_dissipative", "tol", "dt",
                    "n_layers", "dim", "layers"}
  assert r["n_layers"] == 2 and r["dim"] == 5


def test_list_tuple_and_stacked_inputs_agree_and_ignore_x64_flag():
  K64 = _rng(6).normal(size=(3, 4, 4))
  K32 = K64.astype(np.float32)
  ref = spectral_analysis(list(K32))
  assert spectral_analysis(jnp.asarray(K32)) == ref
  assert spectral_analysis(tuple(jnp.asarray(K32))) == ref
  assert spectral_analysis([jnp.asarray(k) for k in K32]) == ref
  out = spectral_analysis(K64, commutator=True)
  with jax.enable_x64(True):
    assert spectral_analysis(K64, commutator=True) == out
    assert spectral_analysis(jnp.asarray(K64), commutator=True) == out
  assert not jnp.ones(1).dtype == jnp.float64  # the flag was restored


def test_commutator_zero_for_commuting_parts_and_positive_otherwise():
  rng = _rng(7)
  # Rotation blocks with a scalar rate per block: [S, D] = 0 (QSF §2.2).
  blocks = [np.array([[a, -w], [w, a]]) for a, w in [(-0.3, 0.7), (0.2, 1.9), (0.05, 0.3)]]
  A = sl.block_diag(*blocks)
  Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  A = Q @ A @ Q.T  # an orthogonal change of basis keeps S and D commuting
  r = spectral_analysis([sl.expm(A)], commutator=True)
  gen = r["layers"][0]["generator"]
  assert gen["logm_real"] and gen["nonpositive_real_eigenvalues"] == 0
  assert gen["commutator"] < 1e-12
  assert gen["trace_D"] == pytest.approx(r["gamma_net"], abs=1e-12)
  # QSF §6.8 item 1: in the commuting case |eig(e^A)| = e^{eig(D)}.
  np.testing.assert_allclose(np.sort(r["layers"][0]["abs"]),
                             np.exp(np.linalg.eigvalsh(0.5 * (A + A.T))), rtol=1e-12)
  A_nc = rng.normal(size=(6, 6)) * 0.3
  K_nc = sl.expm(A_nc)
  A_rec, info = koopman_generator(K_nc)
  np.testing.assert_allclose(A_rec, A_nc, atol=1e-12)
  assert info["logm_rel_error"] < 1e-12
  r_nc = spectral_analysis([sl.expm(A), K_nc], commutator=True)
  expected = commutator_norm(0.5 * (A_nc - A_nc.T), 0.5 * (A_nc + A_nc.T))
  assert r_nc["layers"][1]["generator"]["commutator"] == pytest.approx(expected, rel=1e-9)
  assert expected > 0.05 and r_nc["commutator_max"] == pytest.approx(expected, rel=1e-9)


def test_commutator_norm_edge_cases():
  assert commutator_norm(np.zeros((2, 2)), np.eye(2)) == 0.0
  H, Dm = np.array([[0.0, 1.0], [1.0, 0.0]]), np.diag([1.0, -1.0])
  assert commutator_norm(H, Dm) == pytest.approx(np.sqrt(8.0) / 2.0)  # ||[X, Z]|| = ||2iY||
  with pytest.raises(ValueError, match=r"D must have shape \(2, 2\)"):
    commutator_norm(H, np.eye(3))


def test_generator_flags_negative_real_eigenvalues():
  K = _with_eigenvalues([-0.5, 1.2, 0.8], _rng(8))
  A, info = koopman_generator(K, dt=2.0)
  assert not info["logm_real"] and info["nonpositive_real_eigenvalues"] == 1
  assert np.iscomplexobj(A)
  np.testing.assert_allclose(sl.expm(2.0 * A), K, atol=1e-10)
  A0, info0 = koopman_generator(np.diag([1.0, 0.0]))
  assert A0 is None and info0["nonpositive_real_eigenvalues"] == 1
  # A Jordan block at -1 has no real logarithm; the eigen-solver splits it into
  # -1 +- 1e-8 i, which an exact test of Im(lambda) == 0 missed, and the real part of
  # the (complex) logarithm, returned as "real", was no logarithm of K (error 2).
  Q = np.linalg.qr(_rng(1).normal(size=(3, 3)))[0]
  K_j = Q @ np.array([[-1.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.5]]) @ Q.T
  A_j, info_j = koopman_generator(K_j)
  assert not info_j["logm_real"] and np.iscomplexobj(A_j)
  assert info_j["logm_rel_error"] < 1e-6
  rec = spectral_analysis([K_j], commutator=True)["layers"][0]["generator"]
  assert rec["logm_real"] is False


def test_generator_tests_are_relative_to_the_spectral_radius():
  """koopman_generator and layer_generator decide "real logarithm" relative to rho(K):
  the same K scaled by 1e-10 or 1e10 gets the same answer."""
  K = np.array([[1.0, 0.2], [0.0, 0.5]])
  for c in (1e-10, 1.0, 1e10):
    A, info = koopman_generator(c * K)
    assert info["logm_real"] and not np.iscomplexobj(A), c
    A2, variant = layer_generator(c * K)
    assert variant == "continuous", c
    np.testing.assert_allclose(A2, sl.logm(c * K).real, rtol=1e-10, atol=1e-12)


def test_slogdet_check_holds_for_non_normal_layers_at_small_dt():
  """The slogdet cross-check of Gamma_net scales its tolerance with sum |gamma|, which
  is large at small dt: non-normal K at dt = 1e-6 are consistent (their absolute
  differences, up to 6e-6, are round-off of rates ~1e5)."""
  rng = np.random.default_rng(1)
  K = []
  for _ in range(5):  # Schur forms with large off-diagonal parts, rotated
    T = np.triu(rng.normal(size=(8, 8)) * 3, 1) + np.diag(rng.uniform(0.5, 1.5, 8))
    Q = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    K.append(Q @ T @ Q.T)
  rep = spectral_analysis(K, dt=1e-6)
  assert rep["slogdet_consistent"] and all(l["slogdet_consistent"] for l in rep["layers"])


def test_effective_gain():
  rng = _rng(9)
  K = _with_eigenvalues([0.3, 1.0, 4.0, 27.9], rng)
  lam, V = np.linalg.eig(K)
  G = effective_gain(K, V.real.T)  # each row an eigenvector: G = |lambda_k|
  np.testing.assert_allclose(G, np.abs(lam), rtol=1e-10)
  h = rng.normal(size=(2, 3, 4))
  G = effective_gain(jnp.asarray(K, jnp.float32), h)
  assert G.shape == (2, 3) and np.all((G >= 0.3 - 1e-5) & (G <= 27.9 + 1e-4))
  # A normal K: a weighted mean of |lambda| with weights |<v_k, h>|^2.
  D = np.diag([0.5, 2.0, 8.0])
  np.testing.assert_allclose(effective_gain(D, np.array([1.0, 1.0, np.sqrt(2.0)])),
                             (0.5 + 2.0 + 16.0) / 4.0, rtol=1e-12)
  # A Jordan block is one generalised eigenspace: P = I, G_eff = |lambda|.
  np.testing.assert_allclose(effective_gain(np.array([[0.5, 1.0], [0.0, 0.5]]), np.ones(2)),
                             0.5, rtol=1e-12)
  with pytest.raises(ValueError, match=r"h must have shape \(\.\.\., 4\)"):
    effective_gain(K, np.ones(3))


@pytest.mark.parametrize("K_list, match", [
    ([], "empty list"),
    (np.zeros((0, 3, 3)), "non-empty"),
    ([np.zeros((3, 4))], r"K_list\[0\] must be a square matrix"),
    ([np.eye(3), np.eye(4)], r"K_list\[1\] has shape \(4, 4\)"),
    (np.eye(3), "single matrix of shape"),
    (np.zeros((2, 2, 3, 3)), "K_list must have 3 dimensions"),
    (np.zeros((2, 3, 4)), "K_list must be a square matrix"),
    ([np.eye(2, dtype=np.complex128)], r"K_list\[0\] must be real"),
    (jnp.eye(2, dtype=jnp.complex64)[None], "K_list must be real"),
    ([np.full((2, 2), np.nan)], "non-finite"),
    ([np.eye(2, dtype=bool)], "real numeric"),
    (None, "must be an array"),
])
def test_bad_matrices_raise(K_list, match):
  with pytest.raises(ValueError, match=match):
    spectral_analysis(K_list)


@pytest.mark.parametrize("kwargs, match", [
    ({"tol": -1e-3}, "tol must be a finite number >= 0"),
    ({"tol": "x"}, "tol must be a finite number >= 0"),
    ({"tols": (1e-3, float("nan"))}, r"tols\[1\]"),
    ({"dt": 0.0}, "dt must be > 0"),
    ({"floor": -1.0}, "floor must be > 0"),
    ({"floor": float("inf")}, "floor must be finite and > 0"),  # gave gamma_net = inf
    ({"slogdet_rtol": float("inf")}, "slogdet_rtol must be finite and > 0"),
    ({"tols": 0.1}, r"tols must be a sequence of tolerances, e.g. \(1e-3, 1e-2\)"),
    ({"dt": "1"}, "dt must be a real number"),
])
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    spectral_analysis([np.eye(2)], **kwargs)


@pytest.mark.parametrize("fn", [lambda K: spectral_analysis([K])["spectral_radius"],
                                lambda K: spectral_analysis(K[None])["spectral_radius"],
                                koopman_generator,
                                lambda K: effective_gain(K, jnp.ones(3)),
                                lambda K: commutator_norm(1j * K, K),
                                lambda K: commutator_norm(np.eye(3), K)],
                         ids=["list", "stacked", "koopman_generator", "effective_gain",
                              "commutator_norm", "commutator_norm_D"])
def test_host_tools_refuse_tracers_by_name(fn):
  """Under jit, vmap or grad these host-side tools say so, instead of jax's generic
  TracerArrayConversionError."""
  K = 0.5 * jnp.eye(3)
  fn(K)  # concrete: fine
  for transform in (jax.jit, jax.vmap):
    with pytest.raises(ValueError, match=r"is traced \(under jax.jit, vmap or grad\).*outside"):
      transform(fn)(K if transform is jax.jit else K[None])


def test_commutator_of_parts_at_round_off_is_zero():
  """A unitary K's logarithm has D ~ 1e-14 from rounding: [H, D] / (||H|| ||D||) of
  those parts was noise up to ~1; such a part counts as 0 (H and D = 0 commute)."""
  S = 0.3 * _rng(11).normal(size=(8, 8))
  r = spectral_analysis([sl.expm(S - S.T)], commutator=True)
  gen = r["layers"][0]["generator"]
  assert gen["logm_real"] and 0 < gen["norm_D"] < 1e-10 * gen["norm_H"]
  assert gen["commutator"] == 0.0 and r["commutator_max"] == 0.0
  H, Dm = np.array([[0.0, 1.0], [1.0, 0.0]]), np.diag([1.0, -1.0])
  assert commutator_norm(H, 1e-12 * Dm) == 0.0 and commutator_norm(1e-12 * H, Dm) == 0.0
  assert commutator_norm(H, 1e-12 * Dm, rtol=0) == pytest.approx(np.sqrt(2.0))
  with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
    commutator_norm(H, Dm, rtol=-1.0)


def test_commutator_aggregates_skip_layers_without_a_real_logarithm():
  """A layer with an eigenvalue on (-inf, 0] is split from the complex principal log;
  its record stays (logm_real False) but it is not in commutator_max / _mean."""
  rng = _rng(12)
  A_nc = 0.3 * rng.normal(size=(4, 4))
  K_neg = _with_eigenvalues([-0.5, 0.9], rng, pairs=[(0.8, 0.6)])
  r = spectral_analysis([sl.expm(A_nc), K_neg], commutator=True)
  good, bad = (l["generator"] for l in r["layers"])
  assert good["logm_real"] and not bad["logm_real"] and bad["commutator"] is not None
  assert r["commutator_layers"] == 1
  assert r["commutator_max"] == r["commutator_mean"] == pytest.approx(good["commutator"])
  r_bad = spectral_analysis([K_neg], commutator=True)
  assert r_bad["commutator_layers"] == 0 and r_bad["commutator_max"] is None
