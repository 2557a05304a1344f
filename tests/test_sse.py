"""Tests for the stochastic Schrödinger equation (QSF §2.7, §6.7, §6.8 items 9-10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.physics.generators import koopman_cov, koopman_mean
from qsf_jax.physics.sse import simulate_sse, sse_coefficients, sse_increments, sse_integrate

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small programs: compile time dominates

D = 3
X0 = np.array([0.6, 0.8, 0.0])  # ||x0|| = 1
X_TGT = np.array([-0.3, 0.2, 0.5])


def _model(seed=0, scale=0.5):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(D, D)) * scale, rng.normal(size=D) * 0.3


def _norm2_rate(x1_PD, dW_P, dt):
  """Mean and standard error of (||x_1||^2 - ||x_0||^2) / dt over paths.

  The term linear in dW (zero mean, but the bulk of the variance) is removed with
  a regression control variate on the known increments dW.
  """
  y = (np.sum(np.asarray(x1_PD) ** 2, axis=-1) - np.sum(X0**2)) / dt
  z = np.asarray(dW_P) / np.sqrt(dt)
  beta = np.cov(y, z)[0, 1] / np.var(z, ddof=1)
  r = y - beta * z
  return r.mean(), r.std(ddof=2) / np.sqrt(r.size)


def test_ito_cancellation(x64):
  """QSF §6.8 item 9: with A = b = 0 and ||x0|| = 1 the drift cancels the Itô term.

  One Euler-Maruyama step has E[d||x||^2]/dt = ||e||^4 dt / (4 sigma^4) (paper,
  O(dt): ~0) and ||e||^2 / sigma^2 for the linear SSE; each Monte Carlo mean must
  match within 5 standard errors, and the two must be > 100 standard errors apart.
  """
  sigma, dt, n, key = 0.6, 1e-2, 100_000, jax.random.key(1)
  q = float(np.sum((X0 - X_TGT) ** 2)) / sigma**2  # ||x0 - x_tgt||^2 / sigma^2 ~ 3.9
  zeros = (np.zeros((D, D)), np.zeros(D))
  run = lambda variant: simulate_sse(key, X0, *zeros, X_TGT, sigma_m=sigma, dt=dt, n_steps=1,
                                     variant=variant, n_paths=n, return_path=False)
  # The measurement increments simulate_sse used (documented: split key, sse_increments).
  dW = jax.jit(jax.vmap(lambda k: sse_increments(k, 1, D, dt, jnp.float64)[0][0]))(
      jax.random.split(key, n))
  mean_p, se_p = _norm2_rate(run("paper"), dW, dt)
  mean_l, se_l = _norm2_rate(run("linear"), dW, dt)
  assert abs(mean_p - q**2 * dt / 4) < 5 * se_p and abs(mean_p) < 0.05 * q  # ~0
  assert abs(mean_l - q) < 5 * se_l
  assert q > 100 * max(se_p, se_l)  # the test can tell the two apart


def test_weak_measurement_limit_converges_to_koopman_mean(x64):
  """QSF §6.8 item 10: sigma -> inf, sigma_K = 0 gives the free mean mu_K, EM error O(dt)."""
  A, b = _model()
  mu_K = np.asarray(koopman_mean(A, b, X0, 1.0))
  ends = [np.asarray(simulate_sse(jax.random.key(0), X0, A, b, X_TGT, sigma_m=jnp.inf,
                                 dt=1.0 / n, n_steps=n, return_path=False)) for n in (20, 40)]
  errs = [np.linalg.norm(x - mu_K) for x in ends]
  assert 1.8 < errs[0] / errs[1] < 2.2  # first order: the error halves with dt
  # The O(dt) error is all EM discretisation: Richardson extrapolation removes it.
  assert np.linalg.norm(2 * ends[1] - ends[0] - mu_K) < errs[1] / 20
  # A finite sigma approaches the free flow like 1/sigma.
  run = lambda s: np.asarray(simulate_sse(jax.random.key(0), X0, A, b, X_TGT, sigma_m=s,
                                          dt=1 / 40, n_steps=40, return_path=False))
  dev = [np.abs(run(s) - ends[1]).max() for s in (1e3, 1e4)]
  assert 9 < dev[0] / dev[1] < 11
  assert dev[1] < errs[1] / 10


def test_centered_variant_preserves_the_unit_norm(x64):
  """QSF eq. 42: at ||x|| = 1 the drift and the noise are norm-preserving to first order."""
  A, b = _model(1)
  sigma = 0.7
  for variant, sig in (("centered", sigma), ("centered", jnp.inf)):
    drift, diff = sse_coefficients(X0, A, b, X_TGT, sigma_m=sig, variant=variant)
    e = X0 - X_TGT
    radial = -(e @ e - (X0 @ e) ** 2) / (2 * sigma**2) if sig == sigma else 0.0
    assert float(X0 @ np.asarray(drift)) == pytest.approx(radial, abs=1e-12)
    assert abs(float(X0 @ np.asarray(diff))) < 1e-12  # the noise is tangent
  # One step with dW = +-sqrt(dt): the two-point average is the exact Gaussian mean of
  # the quadratic d||x||^2, and dW = +sqrt(dt) alone is a pathwise check.
  def dnorm2(variant, dt, sign):
    x1 = sse_integrate(X0, A, b, X_TGT, jnp.array([sign * np.sqrt(dt)]), sigma_m=sigma, dt=dt,
                       variant=variant, return_path=False)
    return float(np.sum(np.asarray(x1) ** 2) - 1.0)
  for dt in (1e-2, 2.5e-3):
    mean_c = 0.5 * (dnorm2("centered", dt, 1) + dnorm2("centered", dt, -1)) / dt
    mean_p = 0.5 * (dnorm2("paper", dt, 1) + dnorm2("paper", dt, -1)) / dt
    drift = np.asarray(sse_coefficients(X0, A, b, X_TGT, sigma_m=sigma, variant="centered")[0])
    assert mean_c == pytest.approx(drift @ drift * dt, rel=1e-9)  # = ||a||^2 dt: O(dt)
    assert abs(mean_p) > 0.1 and abs(mean_c) < 0.1 * abs(mean_p)  # paper: O(1) when A != 0
  ratio = dnorm2("centered", 1e-2, 1) / dnorm2("centered", 2.5e-3, 1)
  assert 6 < ratio < 10  # pathwise residual O(dt^{3/2}): quartering dt divides it by 8


def test_coefficients_and_one_step_match_the_equations(x64):
  """QSF eqs. 42-44 written out in numpy, and one Euler-Maruyama step with given noise.

  The sign of the measurement diffusion (e = x - x_tgt, not x_tgt - x) and the Koopman
  noise term sigma_K dW' (not sigma_K^2 dW') are pathwise properties: no distributional
  check sees them, since dW and -dW have the same law and sigma_K = 1 hides the power.
  """
  A, b = _model(5)
  x = np.array([0.3, -1.1, 0.7])  # ||x|| != 1, so no term of eq. 42 vanishes
  sigma = 0.7
  e, f = x - X_TGT, A @ x + b
  q, o = e @ e, x @ e
  expected = {
      "paper": (f - q * x / (2 * sigma**2), e / sigma),
      "centered": (f - (x @ f) * x - (q - o**2) * x / (2 * sigma**2), (e - o * x) / sigma),
      "linear": (f, e / sigma),
  }
  dt, dw, sK = 0.05, 0.17, 0.3
  dwk = np.array([0.2, -0.05, 0.11])
  for variant, (drift, diff) in expected.items():
    got = sse_coefficients(x, A, b, X_TGT, sigma_m=sigma, variant=variant)
    np.testing.assert_allclose(got[0], drift, rtol=1e-13, atol=1e-14, err_msg=variant)
    np.testing.assert_allclose(got[1], diff, rtol=1e-13, atol=1e-14, err_msg=variant)
    x1 = sse_integrate(x, A, b, X_TGT, np.array([dw]), dwk[None], sigma_m=sigma, dt=dt,
                       variant=variant, sigma_K=sK, return_path=False)
    np.testing.assert_allclose(x1, x + drift * dt + diff * dw + sK * dwk, rtol=1e-13,
                               atol=1e-14, err_msg=variant)


def test_piecewise_schedule_equals_chained_runs(x64):
  A, b = _model(2)
  t1, t2 = X_TGT, np.array([0.4, -0.1, 0.9])
  n1, n2, dt = 7, 5, 0.05
  dW, dW_K = sse_increments(jax.random.key(3), n1 + n2, D, dt, jnp.float64)
  schedule = np.concatenate([np.tile(t1, (n1, 1)), np.tile(t2, (n2, 1))])
  for variant in ("paper", "centered", "linear"):
    kw = dict(sigma_m=0.8, dt=dt, variant=variant, sigma_K=0.3)
    full = sse_integrate(X0, A, b, schedule, dW, dW_K, **kw)
    first = sse_integrate(X0, A, b, t1, dW[:n1], dW_K[:n1], **kw)
    second = sse_integrate(first[-1], A, b, t2, dW[n1:], dW_K[n1:], **kw)
    np.testing.assert_allclose(full, np.concatenate([first, second[1:]]), rtol=0, atol=1e-14)
    assert not np.allclose(full, sse_integrate(X0, A, b, t1, dW, dW_K, **kw))
  # simulate_sse draws its noise with sse_increments(key, ...).
  sim = simulate_sse(jax.random.key(3), X0, A, b, schedule, sigma_m=0.8, dt=dt, n_steps=n1 + n2,
                     sigma_K=0.3)
  np.testing.assert_allclose(sim, sse_integrate(X0, A, b, schedule, dW, dW_K, sigma_m=0.8, dt=dt,
                                                sigma_K=0.3), rtol=0, atol=1e-14)


def test_shapes_determinism_and_jit():
  A, b = _model(3)
  key = jax.random.key(4)
  kw = dict(sigma_m=1.0, dt=0.1, n_steps=4, sigma_K=0.5)
  ens = simulate_sse(key, X0, A, b, X_TGT, n_paths=5, **kw)
  assert ens.shape == (5, 5, D) and ens.dtype == jnp.float32
  np.testing.assert_array_equal(ens[:, 0], np.tile(X0.astype(np.float32), (5, 1)))
  assert np.all(np.std(np.asarray(ens[:, -1]), axis=0) > 1e-3)  # the paths differ
  ends = simulate_sse(key, X0, A, b, X_TGT, n_paths=5, return_path=False, **kw)
  assert ends.shape == (5, D)
  np.testing.assert_allclose(ends, ens[:, -1], rtol=1e-6)
  one = simulate_sse(key, X0, A, b, X_TGT, **kw)
  assert one.shape == (5, D)
  np.testing.assert_array_equal(one, simulate_sse(key, X0, A, b, X_TGT, **kw))
  assert not np.allclose(one, simulate_sse(jax.random.key(5), X0, A, b, X_TGT, **kw))
  dW, dW_K = sse_increments(jax.random.PRNGKey(4), 4, D, 0.1)  # raw uint32 keys work too
  assert dW.shape == (4,) and dW_K.shape == (4, D)
  jitted = jax.jit(simulate_sse, static_argnames=("n_steps", "variant", "n_paths", "return_path"))
  np.testing.assert_allclose(jitted(key, X0, A, b, X_TGT, n_paths=5, **kw), ens, rtol=1e-5,
                             atol=1e-6)


def test_increments_draw_independent_channels():
  """dW (the measurement channel) and dW_K (the Koopman noise) come from split keys:
  uncorrelated, each N(0, dt)."""
  n, dt = 4000, 0.25
  for d in (1, 2):
    dW, dWK = (np.asarray(x, np.float64) for x in sse_increments(jax.random.PRNGKey(0), n, d, dt))
    for col in dWK.T:
      assert abs(np.corrcoef(dW, col)[0, 1]) < 4 / np.sqrt(n), d
      assert abs(np.var(col) / dt - 1) < 0.1
    assert abs(np.var(dW) / dt - 1) < 0.1
  assert abs(np.corrcoef(dWK[:, 0], dWK[:, 1])[0, 1]) < 4 / np.sqrt(n)


@pytest.mark.slow
def test_koopman_noise_matches_van_loan_covariance(x64):
  """QSF §6.8 item 7: sigma = inf, sigma_K = 1 gives the Van Loan Sigma_K within MC error."""
  A, b = _model(4, scale=0.4)
  A = A - np.eye(D)
  n, T, n_steps = 20_000, 1.0, 100
  ends = np.asarray(simulate_sse(jax.random.key(6), X0, A, b, X_TGT, sigma_m=jnp.inf,
                                 dt=T / n_steps, n_steps=n_steps, sigma_K=1.0, n_paths=n,
                                 return_path=False))
  cov = np.asarray(koopman_cov(A, 1.0, T))
  emp = np.cov(ends.T)
  se = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / n)  # Wishart std
  assert np.all(np.abs(emp - cov) < 5 * se + 0.02 * np.abs(cov))  # EM bias O(dt) = 1%
  mu = np.asarray(koopman_mean(A, b, X0, T))
  assert np.all(np.abs(ends.mean(0) - mu) < 5 * np.sqrt(np.diag(cov) / n) + 0.02)


def test_simulate_sse_spec_signature():
  # Spec §6.7: simulate_sse(key, x0, A, b, x_tgt, sigma_m, dt, n_steps, variant, sigma_K).
  A, b = _model()
  key = jax.random.key(4)
  pos = simulate_sse(key, X0, A, b, X_TGT, 0.8, 0.05, 6, "centered", 0.2)
  kw = simulate_sse(key, X0, A, b, X_TGT, sigma_m=0.8, dt=0.05, n_steps=6, variant="centered",
                    sigma_K=0.2)
  np.testing.assert_array_equal(pos, kw)
  assert pos.shape == (7, D)
  paper = simulate_sse(key, X0, A, b, X_TGT, 0.8, 0.05, 6)
  assert np.max(np.abs(np.asarray(paper) - np.asarray(pos))) > 1e-4


def _good():
  A, b = _model()
  return dict(key=jax.random.key(0), x0=X0, A=A, b=b, x_tgt=X_TGT, sigma_m=1.0, dt=0.1,
              n_steps=3)


@pytest.mark.parametrize("override, match", [
    ({"x0": np.ones((1, D))}, "x0 must have 1 dimension"),
    ({"x0": np.ones(D, np.complex64)}, "x0 must be real"),
    ({"A": np.ones((D, D + 1))}, "A must be a square matrix"),
    ({"A": np.eye(D + 1)}, r"A must have shape \(3, 3\)"),
    ({"b": np.ones(D + 1)}, r"b must have shape \(3,\)"),
    ({"x_tgt": np.ones(D + 1)}, r"x_tgt must have shape \(3,\)"),
    ({"x_tgt": np.ones((4, D))}, r"x_tgt must have shape \(3, 3\)"),
    ({"x_tgt": np.ones((3, D, 1))}, "x_tgt must have 1 or 2 dimension"),
    ({"variant": "ito"}, "variant must be one of"),
    ({"x0": np.array([np.nan, 0.0, 0.0])}, "x0 must be finite"),
    ({"x_tgt": np.full(D, np.inf)}, "x_tgt must be finite"),
    ({"sigma_m": 0.0}, "sigma_m must be > 0"),
    ({"dt": -0.1}, "dt must be > 0"),
    ({"dt": np.full(D, 0.1)}, r"dt must be a scalar, got shape \(3,\)"),
    ({"sigma_m": np.ones(D)}, r"sigma_m must be a scalar, got shape \(3,\)"),
    ({"sigma_K": np.ones(D)}, "sigma_K must be a finite scalar >= 0"),
    ({"sigma_K": -1.0}, "sigma_K must be a finite scalar >= 0"),
    ({"n_steps": 0}, "n_steps must be an int > 0"),
    ({"n_steps": 3.0}, "n_steps must be an int > 0"),
    ({"n_paths": 0}, "n_paths must be an int > 0"),
    ({"return_path": "no"}, "return_path must be a bool"),
    ({"return_path": 0}, "return_path must be a bool"),
    ({"key": 0}, "key must be a JAX PRNG key"),
    ({"key": jax.random.split(jax.random.key(0), 2)}, "single PRNG key"),
])
def test_simulate_sse_bad_inputs(override, match):
  kw = _good()
  kw.update(override)
  key, x0, A, b, x_tgt = (kw.pop(k) for k in ("key", "x0", "A", "b", "x_tgt"))
  with pytest.raises(ValueError, match=match):
    simulate_sse(key, x0, A, b, x_tgt, **kw)


def test_integrate_and_increments_bad_inputs():
  A, b = _model()
  with pytest.raises(ValueError, match="dW must have 1 dimension"):
    sse_integrate(X0, A, b, X_TGT, np.zeros((4, 1)), sigma_m=1.0, dt=0.1)
  with pytest.raises(ValueError, match=r"dW_K must have shape \(4, 3\)"):
    sse_integrate(X0, A, b, X_TGT, np.zeros(4), np.zeros((4, 2)), sigma_m=1.0, dt=0.1)
  with pytest.raises(ValueError, match=r"x_tgt must have shape \(4, 3\)"):
    sse_integrate(X0, A, b, np.zeros((5, D)), np.zeros(4), sigma_m=1.0, dt=0.1)
  with pytest.raises(ValueError, match="return_path must be a bool.*'no'"):
    sse_integrate(X0, A, b, X_TGT, np.zeros(4), sigma_m=1.0, dt=0.1, return_path="no")
  with pytest.raises(ValueError, match="d must be an int > 0"):
    sse_increments(jax.random.key(0), 4, 0, 0.1)
  # A concrete 0-d integer array is a count, as a Python int is (same draws).
  for n in (np.int64(4), np.array(4), jnp.int32(4)):
    np.testing.assert_array_equal(sse_increments(jax.random.key(0), n, D, 0.1)[1],
                                  sse_increments(jax.random.key(0), 4, D, 0.1)[1])
  with pytest.raises(ValueError, match="n_steps must be a Python int, but it is traced"):
    jax.jit(lambda n: sse_increments(jax.random.key(0), n, D, 0.1))(4)
  with pytest.raises(ValueError, match="x_tgt must have 1 dimension"):
    sse_coefficients(X0, A, b, np.zeros((2, D)), sigma_m=1.0)
