"""Array-level analysis functions: spectrum summary, modes, norms, propagators, plots, report."""

import json

import jax
import numpy as np
import pytest
import scipy.linalg as sl

from qsf_jax import _checks, analysis
from qsf_jax.analysis import (forward, history, modes, propagation, report, spectrum,
                              validation)
from qsf_jax.models.config import get_config
from qsf_jax.physics import effective_gain, hamiltonian_koopman, propagate_layer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _stack(seed=0, L=3, d=12, scales=(0.5, 1.0, 2.0)):
  rng = np.random.default_rng(seed)
  return np.stack([s * rng.normal(size=(d, d)) / np.sqrt(d) for s in scales[:L]])


def _assert_png(path, min_bytes=2000):
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE
  assert len(data) > min_bytes


def test_counts_sum_and_slogdet():
  K = _stack()
  res = spectrum.spectrum_summary(K)
  n = res["n_eigenvalues"]
  assert n == 3 * 12
  for t in ("0.001", "0.01", "0.05"):
    assert sum(res["counts_by_tol"][t].values()) == n
  for r in res["layers"]:
    assert sum(r["counts"].values()) == 12
  logdet = sum(np.linalg.slogdet(k)[1] for k in K)
  assert res["gamma_net"] == pytest.approx(logdet, rel=1e-10, abs=1e-10)
  assert res["slogdet_consistent"] and res["slogdet_abs_error"] < 1e-9
  assert res["gamma_net"] == pytest.approx(res["gamma_growth"] - res["gamma_decay"], abs=1e-12)
  radii = [np.max(np.abs(np.linalg.eigvals(k))) for k in K]
  np.testing.assert_allclose(res["radius_per_layer"], radii, rtol=1e-12)
  assert res["argmax_layer"] == int(np.argmax(radii))


def test_verdict_sign():
  K = _stack(scales=(0.3, 0.3, 0.3))
  res = spectrum.spectrum_summary(K)
  assert res["net_dissipative"] and res["verdict"].startswith("net dissipative")
  grow = spectrum.spectrum_summary(np.stack([3.0 * np.eye(4), 2.0 * np.eye(4)]))
  assert not grow["net_dissipative"] and grow["verdict"].startswith("not net dissipative")
  assert grow["counts"] == {"decay": 0, "neutral": 0, "growth": 8}


def test_unit_circle_check_stage_iv(x64):
  S = np.random.default_rng(1).normal(size=(3, 16, 16))
  K = np.asarray(hamiltonian_koopman(jax.numpy.asarray(S)))
  uc = spectrum.unit_circle_check(K, tol=1e-6)
  assert uc["all_on_unit_circle"] and uc["neutral_fraction"] == 1.0
  assert uc["max_abs_log_abs"] < 1e-12
  res = spectrum.spectrum_summary(K, unit_circle=True)
  assert res["verdict"].startswith("balanced")
  off = spectrum.unit_circle_check(K * 1.01)
  assert not off["all_on_unit_circle"] and off["neutral"] == 0
  # one eigenvalue (1.5) off the circle among three is enough to fail the check
  c, s_ = np.cos(0.7), np.sin(0.7)
  one_off = sl.block_diag([[c, -s_], [s_, c]], [[1.5]])[None]
  uc1 = spectrum.unit_circle_check(one_off)
  assert not uc1["all_on_unit_circle"] and (uc1["neutral"], uc1["n_eigenvalues"]) == (2, 3)
  assert uc1["max_abs_log_abs"] == pytest.approx(np.log(1.5), rel=1e-12)


def test_verdict_balance_tolerance_scales_with_the_eigenvalue_count():
  """|Gamma_net| <= 1e-9 per eigenvalue is balanced: 100 eigenvalues with gamma = 1e-10
  each sum to 1e-8 (below 1e-7), while gamma = 1e-8 each (sum 1e-6) is net gain."""
  for g, balanced in ((1e-10, True), (1e-8, False)):
    res = spectrum.spectrum_summary(np.exp(g) * np.stack([np.eye(50)] * 2))
    assert res["gamma_net"] == pytest.approx(100 * g, rel=1e-6)
    assert res["verdict"].startswith("balanced") == balanced


def test_unit_circle_check_takes_the_largest_log_modulus():
  check = spectrum.unit_circle_check(np.diag([0.5, 1.0])[None])
  assert check["max_abs_log_abs"] == pytest.approx(np.log(2.0), rel=1e-12)


def test_spectrum_bad_inputs():
  with pytest.raises(ValueError, match="real"):
    spectrum.spectrum_summary(np.eye(3)[None] * (1 + 1j))
  with pytest.raises(ValueError, match="square"):
    spectrum.spectrum_summary(np.zeros((2, 3, 4)))
  with pytest.raises(ValueError):
    spectrum.spectrum_summary(np.eye(3))  # a single matrix, not a stack


def test_eigenvalues_per_layer_roundtrip():
  K = _stack(L=2)
  eigs = spectrum.eigenvalues_per_layer(spectrum.spectrum_summary(K))
  res = spectrum.spectrum_summary(K)
  for lam, k, r in zip(eigs, K, res["layers"]):
    np.testing.assert_allclose(np.sort_complex(lam), np.sort_complex(np.linalg.eigvals(k)),
                               atol=1e-12)
    # element i is the eigenvalue whose |lambda|, gamma and omega = -arg(lambda) are
    # listed at i (a conjugated list has the same set but the wrong omega signs)
    np.testing.assert_allclose(np.abs(lam), r["abs"], rtol=1e-12)
    np.testing.assert_allclose(np.log(np.abs(lam)), r["gamma"], atol=1e-12)
    dw = np.angle(np.exp(-1j * np.angle(lam)) / np.exp(1j * np.asarray(r["omega"])))
    np.testing.assert_allclose(dw, 0.0, atol=1e-12)  # modulo 2 pi (arg -1 = +-pi)


def test_mode_weights_match_effective_gain():
  rng = np.random.default_rng(2)
  K = rng.normal(size=(10, 10)) / 3
  h = rng.normal(size=(7, 10))
  basis = modes.mode_basis(K)
  w = modes.mode_weights(basis, h)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
  g = modes.effective_gain_from_weights(basis.lam, w)
  np.testing.assert_allclose(g, effective_gain(K, h), rtol=1e-10)


def test_mode_weights_on_an_eigenvector():
  K = np.diag([3.0, 0.5, 0.2]) + np.triu(np.ones((3, 3)), 1) * 0.1
  basis = modes.mode_basis(K)
  lam, V = np.linalg.eig(K)
  k = int(np.argmax(np.abs(lam)))
  w = modes.mode_weights(basis, V[:, k].real[None])
  assert w[0, k] == pytest.approx(1.0, abs=1e-12)
  assert basis.top == (k,)
  assert modes.effective_gain_from_weights(basis.lam, w)[0] == pytest.approx(3.0)


def test_top_mode_group_pairs_conjugates():
  R = np.array([[0.0, -2.0], [2.0, 0.0]])
  K = sl.block_diag(R, np.diag([1.0, 0.5]))
  lam = np.linalg.eigvals(K)
  top = modes.top_mode_group(lam)
  assert len(top) == 2 and np.allclose(sorted(np.abs(lam[list(top)])), [2.0, 2.0])
  assert np.allclose(lam[top[0]], np.conj(lam[top[1]]))
  assert modes.top_mode_group(np.array([0.1, -4.0, 2.0])) == (1,)


def test_mode_basis_reports_the_largest_projector_norm():
  K = np.array([[0.9, 5.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.2]])  # non-normal
  lam, W, V = sl.eig(K, left=True, right=True)
  norms = [np.linalg.norm(np.outer(V[:, k], W[:, k].conj()) / (W[:, k].conj() @ V[:, k]), 2)
           for k in range(3)]
  assert modes.mode_basis(K).proj_norm == pytest.approx(max(norms), rel=1e-8)
  assert max(norms) > 10


def test_mode_basis_bad_inputs():
  with pytest.raises(ValueError, match="square"):
    modes.mode_basis(np.zeros((3, 4)))
  jordan = modes.mode_basis(np.array([[1.0, 1.0], [0.0, 1.0]]))  # one generalised eigenspace
  assert jordan.projectors.groups == ((0, 1),) and jordan.top == (0, 1)
  assert modes.mode_basis(np.array([[1.0, 1e8], [0.0, 1.01]])) is None  # modes inseparable
  with pytest.raises(ValueError, match="h_ND"):
    modes.mode_weights(modes.mode_basis(np.eye(3) * 2), np.zeros((2, 4)))


def test_token_category():
  cat = lambda text, i=5: modes.token_category(text, i, eot_id=9)
  assert cat("x", 9) == "end of text"
  assert cat("\n\n") == "newline"
  assert cat(".") == "sentence end" and cat('!"') == "sentence end"
  assert cat(" But") == "discourse marker"
  assert cat(",") is None and cat(" cat") is None and cat('"') is None


def test_token_ids_outside_the_vocabulary_are_refused():
  acc = modes.TokenOccupancy(vocab_size=4)
  for bad in ([9], [-1]):
    with pytest.raises(ValueError, match="outside the vocabulary 0..3"):
      acc.update(np.array(bad), np.array([0.5]), np.array([1.0]))
  assert acc.n == 0 and acc.geff_sum == 0.0  # nothing counted
  params = {"embed": {"embedding": np.zeros((4, 2), np.float32)},
            "pos_embed": {"embedding": np.zeros((8, 2), np.float32)}}
  with pytest.raises(ValueError, match=r"tokens_BT has ids in \[-1, 2\], outside the vocabulary 0..3"):
    forward.embed(params, np.array([[0, 2, -1]]))
  assert forward.embed(params, np.array([[0, 3]])).shape == (1, 2, 2)


def test_token_occupancy_summary():
  acc = modes.TokenOccupancy(vocab_size=6)
  ids = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 5])
  occ = np.array([0.9, 0.7, 0.8, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, np.nan])
  geff = np.arange(10.0)  # the last one goes with the NaN occupancy
  acc.update(ids, occ, geff)
  texts = {0: ".", 1: " cat", 2: " But", 5: "?"}
  s = acc.summary(lambda ids_: texts[ids_[0]], eot_id=4, top=2, min_count=3)
  assert s["tokens"] == 9  # the NaN occupancy is dropped
  mean = occ[:9].mean()
  assert s["mean_occupancy"] == pytest.approx(mean)
  assert [r["id"] for r in s["top_tokens"]] == [0, 2]
  assert s["top_tokens"][0]["mean_occupancy"] == pytest.approx(0.8)
  assert s["categories"]["sentence end"]["enrichment"] == pytest.approx(0.8 / mean)
  assert s["categories"]["discourse marker"]["share"] == pytest.approx(3 / 9)
  assert s["categories"]["end of text"]["mean_occupancy"] is None
  # G_eff over the 9 kept tokens: mean of 0..8, max 8 (the dropped token's 9 is not counted)
  assert s["g_eff_mean"] == pytest.approx(4.0) and s["g_eff_max"] == 8.0
  # ranked by mean occupancy, not by its sum over many occurrences
  acc = modes.TokenOccupancy(vocab_size=5)
  acc.update(np.array([1] * 20 + [2] * 3), np.array([0.2] * 20 + [0.9] * 3), np.ones(23))
  assert [r["id"] for r in acc.summary(lambda i: f"t{i[0]}", 0)["top_tokens"]][:2] == [2, 1]


def test_valid_inputs_and_rms_statistics():
  mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
  valid = validation.valid_inputs(mask)
  np.testing.assert_array_equal(valid, [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
  x = np.zeros((3, 4, 2))
  x[0, :3] = [[3.0, 4.0], [0.0, 2.0], [1.0, 1.0]]
  x[2] = 2.0
  per_seq = validation.sequence_rms(x, valid)
  want0 = np.mean([np.sqrt(12.5), np.sqrt(2.0), 1.0])
  np.testing.assert_allclose(per_seq, [want0, 2.0])
  st = validation.norm_statistics(per_seq)
  assert st["mean"] == pytest.approx((want0 + 2.0) / 2)
  assert st["std"] == pytest.approx(abs(want0 - 2.0) / 2)
  assert st["max"] == pytest.approx(max(want0, 2.0)) and st["non_finite"] == 0
  nan = validation.norm_statistics([1.0, np.nan, 3.0])
  assert nan["non_finite"] == 1 and nan["mean"] == 2.0
  with pytest.raises(ValueError):
    validation.sequence_rms(x, valid[:, :3])
  with pytest.raises(ValueError):
    validation.norm_statistics([])


def _layer(seed, d=6, negative=False):
  rng = np.random.default_rng(seed)
  A = 0.3 * rng.normal(size=(d, d))
  K = sl.expm(A)
  if negative:
    K = K @ np.diag([-1.0] + [1.0] * (d - 1))  # a real negative eigenvalue: no real log
  return K, 0.1 * rng.normal(size=d), rng.normal(size=(d, d)), rng.normal(size=(4, d)), \
      rng.normal(size=(4, d))


@pytest.mark.parametrize("negative", [pytest.param(False, marks=pytest.mark.slow), True])
def test_propagate_sentence_matches_propagate_layer(x64, negative):
  K, b, W, X0, XT = _layer(3, negative=negative)
  steps = 0.5 * X0
  prop = propagation.propagate_sentence(K, b, W, X0, XT, step_ND=steps, exact_tokens=2)
  assert prop["variant"] == ("discrete" if negative else "continuous")
  if not negative:  # the exact form only on evenly spaced tokens 0 and 3
    np.testing.assert_array_equal(prop["exact_index"], [0, 3])
    assert np.all(np.isnan(prop["exact"][1:3])) and np.all(np.isnan(prop["dev_exact"][1:3]))
  np.testing.assert_allclose(prop["prior"], X0 @ K.T + b, atol=1e-12)
  for key, mode in (("paper", "paper"), ("exact", "kalman_bucy")):
    for t in (0, 3):
      ref, variant = propagate_layer(K, b, W, X0[t], XT[t], mode=mode)
      assert variant == prop["variant"]
      np.testing.assert_allclose(prop[key][t], np.asarray(ref.mean), rtol=1e-8, atol=1e-10)
  dev = np.linalg.norm(prop["paper"] - steps, axis=1) / np.linalg.norm(steps, axis=1)
  np.testing.assert_allclose(prop["dev_paper"], dev)
  if negative:
    np.testing.assert_array_equal(prop["paper"], prop["exact"])
  else:
    assert not np.allclose(prop["paper"], prop["exact"])


def test_propagate_sentence_closed_forms_at_other_sigmas(x64):
  """The discrete variant's mean at sigma_m = 2, sigma_K = 0.5 (QSF eq. 57):
  Lambda^{-1}(prior / sigma_K^2 + W^T x_tgt / sigma_m^2), Lambda = I / sigma_K^2 +
  W^T W / sigma_m^2; and shift_ratio is |paper - prior| / |exact - prior| per token."""
  rng = np.random.default_rng(0)
  d, sm, sK = 3, 2.0, 0.5
  b, W = rng.normal(size=d), rng.normal(size=(d, d))
  X0, XT = rng.normal(size=(2, d)), rng.normal(size=(2, d))
  K = np.diag([-0.5, 0.8, 0.9])  # an eigenvalue on (-inf, 0]: the discrete variant
  out = propagation.propagate_sentence(K, b, W, X0, XT, sigma_m=sm, sigma_K=sK)
  assert out["variant"] == "discrete"
  prior = X0 @ K.T + b
  lam = np.eye(d) / sK**2 + W.T @ W / sm**2
  want = np.linalg.solve(lam, (prior / sK**2 + XT @ W / sm**2).T).T
  np.testing.assert_allclose(out["paper"], want, atol=1e-10)
  out = propagation.propagate_sentence(np.array([[0.9, 0.1, 0.0], [0.0, 0.8, 0.0],
                                                 [0.0, 0.0, 0.7]]), b, W, X0, XT)
  assert out["variant"] == "continuous"
  np.testing.assert_allclose(out["shift_ratio"],
                             np.linalg.norm(out["paper"] - out["prior"], axis=1)
                             / np.linalg.norm(out["exact"] - out["prior"], axis=1), rtol=1e-12)
  assert not np.allclose(out["shift_ratio"], 1.0)


def test_exact_subset():
  np.testing.assert_array_equal(propagation.exact_subset(5, None), np.arange(5))
  np.testing.assert_array_equal(propagation.exact_subset(5, 9), np.arange(5))
  np.testing.assert_array_equal(propagation.exact_subset(7, 3), [0, 3, 6])
  with pytest.raises(ValueError):
    propagation.exact_subset(7, 0)


def test_propagate_sentence_bad_shapes():
  K, b, W, X0, XT = _layer(4)
  with pytest.raises(ValueError, match="W_V"):
    propagation.propagate_sentence(K, b, W[:, :3], X0, XT)
  with pytest.raises(ValueError, match="k_in_ND"):
    propagation.propagate_sentence(K, b, W, X0, XT[:3])


def test_layer_dynamics_reproduces_the_layer(x64):
  K, b, *_ = _layer(5)
  A, b_c, variant = propagation.layer_dynamics(K, b)
  assert variant == "continuous"
  aug = np.zeros((7, 7))
  aug[:6, :6], aug[:6, 6] = A, b_c
  flow = sl.expm(aug)  # time-1 flow of x' = A x + b_c
  np.testing.assert_allclose(flow[:6, :6], K, atol=1e-10)
  np.testing.assert_allclose(flow[:6, 6], b, atol=1e-10)
  Kn, bn, *_ = _layer(5, negative=True)
  A, b2, variant = propagation.layer_dynamics(Kn, bn)
  assert variant == "discrete"
  np.testing.assert_allclose(A + np.eye(6), Kn)
  np.testing.assert_array_equal(b2, bn)
  # the surrogate's flow is e^{K - I}, not K: the SSE report must say so
  assert not np.allclose(sl.expm(A), Kn, atol=1e-2)
  assert "surrogate A = K - I" in report._sse_generator("discrete")
  assert "logm(K)" in report._sse_generator("continuous")


def test_state_target_and_sse_ensemble(x64):
  K, b, W, X0, _ = _layer(6)
  x_star_true = np.random.default_rng(0).normal(size=6)
  x_star = propagation.state_target(W, W @ x_star_true)
  np.testing.assert_allclose(x_star, x_star_true, rtol=1e-9)
  sse = propagation.sse_ensemble(jax.random.key(0), K, b, X0[0], x_star, n_paths=5, n_steps=50)
  assert sse["norm"].shape == (5, 51) and sse["finite"]
  assert sse["norm"][:, 0] == pytest.approx(1.0)  # starts on the unit sphere
  # the unmeasured (sigma = inf) path is Euler for x' = A x + b_c: ends near K x0 + b
  scale = np.linalg.norm(X0[0])
  want = np.linalg.norm((K @ X0[0] + b) / scale)
  assert sse["free_norm"][-1] == pytest.approx(want, rel=0.05)
  # distances are to the target in the same scaled units: at t = 0, ||x0 - x*|| / ||x0||
  d0 = np.linalg.norm(X0[0] - x_star) / scale
  np.testing.assert_allclose(sse["dist"][:, 0], d0, rtol=1e-12)
  assert sse["free_dist"][0] == pytest.approx(d0, rel=1e-12)
  # with a bias as large as the state: b is rescaled with x0 (b_c / ||x0||)
  rng = np.random.default_rng(1)
  K3, b3 = np.array([[0.9, 0.2, 0.0], [-0.1, 0.8, 0.0], [0.0, 0.0, 0.7]]), np.array([1.0, -2.0, 0.5])
  x3 = 3 * rng.normal(size=3)
  free = propagation.sse_ensemble(jax.random.key(0), K3, b3, x3, np.zeros(3), n_paths=2,
                                  n_steps=2000)["free_norm"][-1]
  assert free == pytest.approx(np.linalg.norm(K3 @ x3 + b3) / np.linalg.norm(x3), rel=2e-3)
  with pytest.raises(ValueError, match="non-zero"):
    propagation.sse_ensemble(jax.random.key(0), K, b, np.zeros(6), x_star)
  # Non-finite inputs name themselves instead of giving NaN paths (or "non-zero").
  for name, args in (("x0", (K, b, np.full(6, np.nan), x_star)),
                     ("x_tgt", (K, b, X0[0], np.where(np.arange(6) == 2, np.inf, x_star))),
                     ("b", (K, np.full(6, np.nan), X0[0], x_star))):
    with pytest.raises(ValueError, match=f"{name} must be finite"):
      propagation.sse_ensemble(jax.random.key(0), *args)


def test_propagate_layer_refuses_non_finite_inputs(x64):
  K, b, W, X0, XT = _layer(4)
  nan = np.full(6, np.nan)
  for name, args in (("x0", (K, b, W, nan, XT[0])), ("x_tgt", (K, b, W, X0[0], nan)),
                     ("b", (K, nan, W, X0[0], XT[0])),
                     ("W_V", (K, b, np.where(np.eye(6) > 0, np.nan, W), X0[0], XT[0]))):
    with pytest.raises(ValueError, match=f"{name} must be finite; it has"):
      propagate_layer(*args)
  # Under jit the check cannot see values: a traced NaN passes it.
  traced = jax.jit(lambda x: (_checks.check_finite("x", x), x)[1])(np.array([np.nan]))
  assert np.isnan(traced[0])


def test_pick_layer():
  from qsf_jax.analysis.pipeline import pick_layer  # pylint: disable=g-import-not-at-top
  neg = np.array([-2.0, 0.5])  # an eigenvalue on (-inf, 0]: no real log
  pos = np.array([0.9, 0.5])
  assert pick_layer([neg, pos, pos], [2.0, 0.9, 0.8]) == 1  # a real log beats a larger radius
  assert pick_layer([neg, neg], [1.0, 3.0]) == 1  # none has one: the largest radius
  assert pick_layer([pos, pos], [1.0, 1.0 + 1e-13]) == 1  # round-off ties: the deepest
  assert pick_layer([pos, pos], [1.0, 1.0], candidates=[0]) == 0
  assert pick_layer([pos], [1.0], candidates=[]) is None


def test_plots_write_pngs(tmp_path):
  K = _stack()
  res = spectrum.spectrum_summary(K)
  eigs = spectrum.eigenvalues_per_layer(res)
  analysis.plot_spectrum(eigs, path=tmp_path / "s.png")
  analysis.plot_log_abs_histogram(eigs, path=tmp_path / "h.png")
  analysis.plot_layer_budget(res["radius_per_layer"], [r["gamma_decay"] for r in res["layers"]],
                             [r["gamma_growth"] for r in res["layers"]],
                             res["gamma_net_per_layer"], g_eff_L=[0.5, 0.6, 0.7],
                             path=tmp_path / "l.png")
  analysis.plot_alpha(np.array([1, 2, 3]), np.ones((3, 4)) + 0.1, path=tmp_path / "a.png")
  analysis.plot_losses({"train": (np.arange(5), np.linspace(5, 3, 5)),
                        "eval": (np.array([4]), np.array([3.2]))}, path=tmp_path / "c.png")
  for name in ("s", "h", "l", "a", "c"):
    _assert_png(tmp_path / f"{name}.png")
  with pytest.raises(ValueError):
    analysis.plot_alpha(np.array([1, 2]), np.ones((3, 4)))
  with pytest.raises(ValueError):
    analysis.plot_layer_budget([1.0, 2.0], [0.0], [0.0, 0.0], [0.0, 0.0])
  with pytest.raises(ValueError):
    analysis.plot_spectrum([])


def _legend(ax):
  return [t.get_text() for t in ax.get_legend().get_texts()]


def _texts(ax):
  return " ".join(t.get_text() for t in ax.texts)


def test_spectrum_plots_show_what_the_analysis_classifies(tmp_path):
  """Review findings: the histogram classified at dt = 1 whatever the analysis's dt; a
  zero eigenvalue stretched the log axes to -300; round-off about the unit circle filled
  the log panel and the budget bars; a few large |lambda| shrank the complex plane."""
  from qsf_jax.physics.spectral import ROUNDOFF_PER_MODE, spectral_analysis
  lam = np.array([0.99, 0.999, 1.002, 1.02])  # gamma at dt = 0.1: -0.1, -0.01, 0.02, 0.2
  res = spectral_analysis([np.diag(lam)], tol=1e-2, dt=0.1)
  fig = analysis.plot_log_abs_histogram([lam], tol=1e-2, dt=0.1)
  c = res["counts"]
  assert _legend(fig.axes[0]) == [f"decay ({c['decay']})", f"neutral ({c['neutral']})",
                                  f"growth ({c['growth']})"]
  for bad in (dict(tol=-0.01), dict(tol=float("nan")), dict(dt=0.0)):
    with pytest.raises(ValueError, match="must be a finite number"):
      analysis.plot_log_abs_histogram([lam], **bad)
  for f in (analysis.plot_spectrum, analysis.plot_log_abs_histogram):
    with pytest.raises(ValueError, match="layer 1 has 1 non-finite eigenvalue"):
      f([lam, np.array([0.5, np.nan])])
  # an exact zero is drawn a decade below the smallest nonzero |lambda|, and said so
  zero = [np.array([0.0, 0.5, 1.0, 2.0])]
  fig = analysis.plot_spectrum(zero)
  assert fig.axes[1].get_ylim()[0] > -3 and "λ = 0 (1)" in _texts(fig.axes[1])
  fig = analysis.plot_log_abs_histogram(zero)
  assert fig.axes[0].get_xlim()[0] > -3 and "λ = 0: 1" in _texts(fig.axes[0])
  assert _legend(fig.axes[0])[0] == "decay (2)"
  # a unitary K: the log panel spans the neutral band, the budget axis the round-off
  unitary = [np.exp(1j * np.linspace(-3, 3, 8)) * (1 + 1e-15 * np.arange(8))]
  fig = analysis.plot_spectrum(unitary, tol=1e-2)
  band = 1e-2 / np.log(10)
  lo, hi = fig.axes[1].get_ylim()
  assert lo <= -band and hi >= band and hi < 10 * band
  roundoff = ROUNDOFF_PER_MODE * 8
  fig = analysis.plot_layer_budget([1.0], [2e-14], [1e-14], [-1e-14], roundoff=roundoff)
  assert fig.axes[1].get_ylim() == pytest.approx((-roundoff, roundoff))
  assert "zero to round-off" in _texts(fig.axes[1])
  fig = analysis.plot_layer_budget([1.0], [0.5], [0.0], [-0.5], roundoff=roundoff)
  assert fig.axes[1].get_ylim()[0] < -0.4 and not fig.axes[1].texts
  with pytest.raises(ValueError, match=r"g_eff_L must have shape \(1,\)"):
    analysis.plot_layer_budget([1.0], [0.5], [0.0], [-0.5], g_eff_L=[1.0, 2.0])
  # 2 of 400 eigenvalues far out: the plane is cut near the bulk and counts them
  rng = np.random.default_rng(0)
  bulk = 0.9 * np.exp(2j * np.pi * rng.random(398))
  fig = analysis.plot_spectrum([np.concatenate([bulk, [25.0, -27.9]])])
  assert fig.axes[0].get_xlim()[1] < 2 and "2 beyond the axes (|λ| up to 27.9)" in _texts(
      fig.axes[0])
  # one layer: no colour bar running 0-1
  assert len(analysis.plot_spectrum([lam]).axes) == 2
  assert len(analysis.plot_spectrum([lam, lam]).axes) == 3
  # the extension sets the format, and missing folders are made
  analysis.plot_spectrum([lam], path=tmp_path / "new" / "s.pdf")
  assert (tmp_path / "new" / "s.pdf").read_bytes()[:4] == b"%PDF"


def test_loss_plot_marks_an_earlier_analysed_step():
  curves = {"train": (np.arange(1, 61), np.linspace(5, 3, 60)),
            "eval": (np.array([20, 40, 60]), np.array([4.0, 3.5, 3.1]))}
  assert "analysed step 20" in _legend(analysis.plot_losses(curves, mark_step=20).axes[0])
  assert not any("analysed" in t for t in
                 _legend(analysis.plot_losses(curves, mark_step=60).axes[0]))


def test_history_parsing(tmp_path):
  lines = [{"step": 1, "kind": "train", "loss": 5.0, "alpha/0": 1.0, "alpha/1": 1.1},
           {"step": 2, "kind": "train", "loss": 4.0, "alpha/0": 1.2, "alpha/1": 1.3},
           {"step": 2, "kind": "eval", "val_loss": 4.5}]
  text = "\n".join(json.dumps(r) for r in lines) + "\nnot json\n"
  (tmp_path / "metrics.jsonl").write_text(text)
  recs = history.read_metrics(tmp_path)
  assert len(recs) == 3
  steps, alpha = history.alpha_from_metrics(recs, 2)
  np.testing.assert_array_equal(steps, [1, 2])
  np.testing.assert_allclose(alpha, [[1.0, 1.1], [1.2, 1.3]])
  assert history.alpha_from_metrics(recs, 3) is None  # not every layer logged
  curves = history.loss_curves(recs)
  np.testing.assert_allclose(curves["train"][1], [5.0, 4.0])
  # a resumed run logs a step again: its last record counts
  again = recs + [{"step": 2, "kind": "train", "loss": 3.0, "alpha/0": 2.2, "alpha/1": 2.3}]
  np.testing.assert_allclose(history.loss_curves(again)["train"][1], [5.0, 3.0])
  np.testing.assert_allclose(history.alpha_from_metrics(again, 2)[1], [[1.0, 1.1], [2.2, 2.3]])
  np.testing.assert_allclose(curves["eval"][1], [4.5])
  got = history.alpha_history(tmp_path, 2)
  assert got["source"] == "metrics.jsonl"
  assert history.alpha_history(tmp_path / "missing", 2) is None
  # An earlier checkpoint's analysis sees alpha only up to its step.
  got = history.alpha_history(tmp_path, 2, up_to_step=1)
  np.testing.assert_array_equal(got["steps"], [1])
  np.testing.assert_allclose(got["alpha"], [[1.0, 1.1]])
  assert history.alpha_history(tmp_path, 2, up_to_step=0) is None


def test_report_from_synthetic_results(tmp_path):
  K = _stack()
  res = spectrum.spectrum_summary(K)
  results = {"run": {"stage": "koopman_attn", "preset": "synthetic", "step": 0},
             "spectrum": res, "alpha": {"steps": np.array([1, 2]), "alpha": np.ones((2, 3)),
                                        "source": "test"},
             "figures": {"spectrum": "spectrum.png"}, "notes": ["a note"],
             "bad": float("nan")}
  path = analysis.write_report(tmp_path, results)
  text = path.read_text()
  for needle in ("## Spectrum", "| 0.01 |", "Gamma_net", "**Verdict:** net", "![",
                 "## Measurement strength", "- a note", "Alpha at step 2: min 1"):
    assert needle in text
  # With the analysed checkpoint's own alpha (an earlier --step), that is the one named.
  results["alpha"].update(step=1, at_step=[0.5, 0.7, 0.9])
  text = analysis.write_report(tmp_path, results).read_text()
  assert "Alpha at step 1 (this checkpoint): min 0.5" in text
  # Without it, the last logged step's alpha; the unit-circle fraction in percent.
  del results["alpha"]["step"], results["alpha"]["at_step"]
  results["alpha"]["alpha"] = np.array([[1.0, 1.0, 1.0], [0.4, 0.6, 2.5]])
  results["spectrum"] = dict(res, unit_circle=dict(
      tol=0.01, neutral=18, n_eigenvalues=36, neutral_fraction=0.5, max_abs_log_abs=0.7,
      all_on_unit_circle=False))
  text = analysis.write_report(tmp_path, results).read_text()
  assert "Alpha at step 2: min 0.4, max 2.5" in text and "18/36 neutral (50.00%)" in text
  results["spectrum"] = res
  # The validation table names each layer's largest projector norm and warns above 100.
  acc = modes.TokenOccupancy(vocab_size=6)
  acc.update(np.array([0, 1, 1, 2]), np.array([0.9, 0.1, 0.2, 0.3]), np.full(4, 0.5))
  layer = dict(acc.summary(lambda ids: f"<{ids[0]}>", eot_id=5), top_modes=[[0.5, 0.0]],
               projector_norm=12.0)
  n_layers = len(res["radius_per_layer"])
  z = dict(mean=1.0, std=0.1, max=1.2)
  results["validation"] = dict(sequences=2, tokens=4, z_rms=z, h_rms=z, layers=[
      dict(layer, projector_norm=6.0e4)] + [layer] * (n_layers - 1))
  text = analysis.write_report(tmp_path, results).read_text()
  assert "| max projector norm |" in text and "| 6e+04 |" in text and "| 12 |" in text
  assert "Layers [0] have a spectral projector of norm > 100" in text
  radii = res["radius_per_layer"]
  assert len(set(radii)) == n_layers  # each row shows its own layer's radius
  for l in range(n_layers):  # (the spectrum's own table starts its rows the same way)
    assert f"| {l} | {report._f(radii[l])} | {report._f(layer['g_eff_mean'])} | " in text
  jpath = analysis.write_json(tmp_path / "spectrum.json", results)
  back = json.loads(jpath.read_text())
  assert back["bad"] is None and back["spectrum"]["n_eigenvalues"] == 36


def test_operators_w_v_is_the_value_dense_in_column_form():
  """W_V u = the value Dense layer's output without its bias (flax: u @ kernel), per layer;
  K, b and alpha are the stored ones."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  cfg = get_config("koopman_attn", "tiny")
  L, d = cfg.n_layers, cfg.d_model
  rng = np.random.default_rng(3)
  kern = rng.normal(size=(L, d, d)).astype(np.float32)  # not symmetric
  params = {"layers": {"koopman": {"K": rng.normal(size=(L, d, d)).astype(np.float32),
                                   "b": rng.normal(size=(L, d)).astype(np.float32)},
                       "attn": {"value": {"kernel": kern, "bias": np.zeros((L, d), np.float32)}},
                       "alpha": rng.normal(size=(L, 1)).astype(np.float32)}}
  ops = analysis.layer_operators(params, cfg)
  u = rng.normal(size=(3, d)).astype(np.float32)
  for l in range(L):
    v = np.asarray(nn.Dense(d).apply({"params": {"kernel": kern[l], "bias": np.zeros(d)}}, u))
    np.testing.assert_allclose(u @ ops.W_V[l].T, v, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ops.K[l], params["layers"]["koopman"]["K"][l])
  np.testing.assert_array_equal(ops.alpha, params["layers"]["alpha"][:, 0])


def test_operators_reject_other_stages():
  with pytest.raises(ValueError, match="no Koopman operator"):
    analysis.layer_operators({}, get_config("fnet", "tiny"))
  with pytest.raises(ValueError, match="layers/koopman"):
    analysis.layer_operators({"layers": {}}, get_config("koopman_attn", "tiny"))


def test_sse_step_count_keeps_a_stiff_ensemble_finite():
  """A far measured target makes eq. 43 stiff: 200 explicit steps diverge, the automatic
  count (dt * stiffness <= 1/2) stays finite and bounded."""
  K, b = 0.5 * np.eye(4), np.zeros(4)
  x0, far = np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.0, 40.0, 0.0, 0.0])
  fixed = propagation.sse_ensemble(jax.random.key(0), K, b, x0, far, n_paths=8, n_steps=200)
  assert not fixed["finite"] and fixed["n_steps"] == 200
  auto = propagation.sse_ensemble(jax.random.key(0), K, b, x0, far, n_paths=8)
  A = np.log(0.5) * np.eye(4)
  want = int(np.ceil(2 * (abs(np.log(0.5)) + (np.hypot(1.0, 40.0) + 1.0) ** 2 / 2)))
  assert auto["n_steps"] == want == propagation.stable_sse_steps(A, x0, far)
  assert auto["finite"] and np.all(auto["norm"] < 2 * np.linalg.norm(far))  # no blow-up
  near = np.array([0.0, 0.5, 0.0, 0.0])  # not stiff: the floor of 200 steps
  assert propagation.stable_sse_steps(A, x0, near) == propagation.SSE_MIN_STEPS
  assert propagation.stable_sse_steps(A, x0, 1e6 * far) == propagation.SSE_MAX_STEPS
  for bad in (0, -3, 2.5):
    with pytest.raises(ValueError, match="n_steps must be a positive int or None"):
      propagation.sse_ensemble(jax.random.key(0), K, b, x0, far, n_steps=bad)
