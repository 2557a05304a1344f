"""Tests of the one-interval Gaussian propagators (QSF eqs. 16-22, 56-58).

Covers spec §6.2-6.3 and §6.8 items 3-6, 11 and 12.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl
from scipy.integrate import solve_ivp

from conftest import count_lowerings
from qsf_jax import (GaussianState, chain_filter_full, chain_measured_mean, exact_substeps,
                     kalman_bucy_step, koopman_cov, koopman_mean, measurement_update, propagate,
                     propagate_full)

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small programs: compile time dominates

FORMS = ("gain", "information")


def _setup(seed=0, d=3):
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(d, d)) * 0.5 - 0.3 * np.eye(d)
  M = rng.normal(size=(d, d)) * 0.5 + np.eye(d)
  return dict(A=A, b=rng.normal(size=d), x0=rng.normal(size=d), x_tgt=rng.normal(size=d), M=M)


def _np_prior(A, b, x0, T, sK):
  """Koopman prior from the A^{-1} formula and a Lyapunov solve (independent of Van Loan)."""
  d = len(x0)
  eAT = sl.expm(A * T)
  mu_K = eAT @ x0 + np.linalg.solve(A, (eAT - np.eye(d)) @ b)
  Q = sK**2 * np.eye(d)
  return mu_K, sl.solve_continuous_lyapunov(A, eAT @ Q @ eAT.T - Q)


def _np_posterior(mu0, S0, M, y, r):
  """Bayes' rule (QSF eqs. 16-17, 19) with plain numpy inverses."""
  S0inv = np.linalg.inv(S0)
  Lam = S0inv + r * M.T @ M
  return np.linalg.solve(Lam, S0inv @ mu0 + r * M.T @ y), Lam


def _log_gauss(x, mu, P):
  diff = x - mu
  return -0.5 * (diff @ np.linalg.solve(P, diff) + np.linalg.slogdet(2 * np.pi * P)[1])


def test_completing_the_square_remainder_is_constant(x64):
  rng = np.random.default_rng(1)
  B = rng.normal(size=(4, 4))
  Lam, eta = B @ B.T + 0.5 * np.eye(4), rng.normal(size=4)
  xs = rng.normal(size=(6, 4)) * 3
  m = np.linalg.solve(Lam, eta)
  rem = [(-0.5 * x @ Lam @ x + x @ eta) + 0.5 * (x - m) @ Lam @ (x - m) for x in xs]
  np.testing.assert_allclose(rem, 0.5 * eta @ m, rtol=1e-12)
  # The library's posterior: log prior + log weight - log posterior = log Z for every x.
  s = _setup(1)
  T, sig, sK = 0.7, 0.8, 1.3
  mu_K, S_K = _np_prior(s["A"], s["b"], s["x0"], T, sK)
  for form in FORMS:
    out = propagate_full(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], dt=T, sigma_m=sig,
                         sigma_K=sK, form=form)
    rems = [_log_gauss(x, mu_K, S_K) - T / (2 * sig**2) * np.sum((s["M"] @ x - s["x_tgt"])**2)
            - _log_gauss(x, np.asarray(out.mean), np.asarray(out.covariance)) for x in xs[:, :3]]
    np.testing.assert_allclose(rems, float(out.log_normalizer), rtol=1e-10)


@pytest.mark.parametrize("form", FORMS + ("auto",))
def test_paper_propagator_is_bayesian_posterior(x64, form):
  s = _setup(2)
  T, sig, sK = 0.7, 0.8, 1.3
  mu_K, S_K = _np_prior(s["A"], s["b"], s["x0"], T, sK)
  mu, Lam = _np_posterior(mu_K, S_K, s["M"], s["x_tgt"], T / sig**2)
  st = propagate(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], dt=T, sigma_m=sig, sigma_K=sK,
                 form=form)
  assert isinstance(st, GaussianState)
  np.testing.assert_allclose(st.mean, mu, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(st.precision, Lam, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T,sig", [(1.0, 1.0), (1e-3, 0.5), (0.5, 1e3), (2.0, 0.1)])
def test_information_form_equals_gain_form(x64, T, sig):
  s = _setup(3)
  outs = [propagate_full(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], dt=T, sigma_m=sig,
                         form=f) for f in FORMS]
  for field in ("mean", "precision", "covariance", "log_normalizer"):
    a, b = (np.asarray(getattr(o, field)) for o in outs)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * np.max(np.abs(b)), err_msg=field)


@pytest.mark.parametrize("mode,form", [("paper", "gain"), ("paper", "information"),
                                       ("kalman_bucy", "auto")])
def test_no_measurement_limit(x64, mode, form):
  s = _setup(4)
  T, sK = 0.9, 0.7
  mu_K, S_K = _np_prior(s["A"], s["b"], s["x0"], T, sK)
  out = propagate_full(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], dt=T, sigma_m=jnp.inf,
                       sigma_K=sK, mode=mode, form=form)
  np.testing.assert_allclose(out.mean, mu_K, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(out.precision, np.linalg.inv(S_K), rtol=1e-9)
  np.testing.assert_allclose(out.log_normalizer, 0.0, atol=1e-12)
  # sigma large but finite approaches the same limit at rate 1/sigma^2.
  big = propagate(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], dt=T, sigma_m=1e4, sigma_K=sK,
                  mode=mode, form=form)
  err = np.max(np.abs(np.asarray(big.mean) - mu_K))
  assert 0 < err < 1e-7
  # d/dsigma_m at inf is 0 (the measurement term falls as 1/sigma_m^2), not 0 * inf = NaN,
  # so a vmap(grad) over a sigma_m grid may include "no measurement"
  n_sub = {"n_sub": 2} if mode == "kalman_bucy" else {}
  loss = lambda sig: propagate_full(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], dt=T,
                                    sigma_m=sig, sigma_K=sK, mode=mode, form=form,
                                    **n_sub).log_normalizer + propagate(
      s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], dt=T, sigma_m=sig, sigma_K=sK, mode=mode,
      form=form, **n_sub).mean.sum()
  # (one jitted program instead of one compile per primitive)
  g_inf, grads = jax.jit(lambda sig: (jax.grad(loss)(jnp.inf), jax.vmap(jax.grad(loss))(sig)))(
      jnp.array([1e3, jnp.inf]))
  assert float(g_inf) == 0.0
  assert np.all(np.isfinite(grads)) and 0 < abs(float(grads[0])) < 1e-4


@pytest.mark.parametrize("form", FORMS)
def test_strong_measurement_limit(x64, form):
  s = _setup(5)
  target = np.linalg.solve(s["M"], s["x_tgt"])
  errs = []
  for sig in (1e-3, 1e-4, 1e-7):
    st = propagate(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], sigma_m=sig, form=form)
    errs.append(np.max(np.abs(np.asarray(st.mean) - target)))
  assert errs[2] < 1e-10
  np.testing.assert_allclose(errs[0] / errs[1], 100.0, rtol=1e-3)  # O(sigma^2) approach


def test_singular_generator(x64):
  s = _setup(6)
  T, sig, sK = 1.3, 0.9, 1.1
  A0 = np.zeros((3, 3))
  st = propagate(s["x0"], A0, s["b"], s["x_tgt"], s["M"], dt=T, sigma_m=sig, sigma_K=sK)
  mu, Lam = _np_posterior(s["x0"] + s["b"] * T, sK**2 * T * np.eye(3), s["M"], s["x_tgt"],
                          T / sig**2)
  np.testing.assert_allclose(st.mean, mu, rtol=1e-12)
  np.testing.assert_allclose(st.precision, Lam, rtol=1e-12)
  nil = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  for mode in ("paper", "kalman_bucy"):
    out = propagate_full(s["x0"], nil, s["b"], s["x_tgt"], s["M"], dt=T, mode=mode)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in out)
    base = propagate(s["x0"], A0, s["b"], s["x_tgt"], s["M"], dt=T, mode=mode)
    E = np.random.default_rng(0).normal(size=(3, 3))
    errs = [np.max(np.abs(np.asarray(propagate(s["x0"], e * E, s["b"], s["x_tgt"], s["M"],
                                               dt=T, mode=mode).mean) - base.mean))
            for e in (1e-3, 1e-4)]
    assert errs[1] < 1e-3 and 8 < errs[0] / errs[1] < 12  # continuous, O(eps)


def _kb_ode(A, b, x0, y, M, T, sig, sK, P0=None):
  """Kalman-Bucy mean, covariance and log Z by a tight adaptive ODE solve (spec §6.3)."""
  d = len(x0)
  P0 = np.zeros((d, d)) if P0 is None else P0
  R = M.T @ M / sig**2

  def rhs(t, z):
    m, P = z[:d], z[d:-1].reshape(d, d)
    dm = A @ m + b + P @ M.T @ (y - M @ m) / sig**2
    dP = A @ P + P @ A.T + sK**2 * np.eye(d) - P @ R @ P
    dlogz = -0.5 * (np.sum((M @ m - y)**2) / sig**2 + np.trace(R @ P))
    return np.concatenate([dm, dP.ravel(), [dlogz]])

  z0 = np.concatenate([x0, P0.ravel(), [0.0]])
  z = solve_ivp(rhs, (0, T), z0, method="DOP853", rtol=1e-12, atol=1e-14).y[:, -1]
  return z[:d], z[d:-1].reshape(d, d), z[-1]


@pytest.mark.parametrize("T", [0.05, 0.7, 2.0])
def test_exact_matches_kalman_bucy_ode(x64, T):
  s = _setup(7)
  sig, sK = 0.8, 1.3
  m, P, logz = _kb_ode(s["A"], s["b"], s["x0"], s["x_tgt"], s["M"], T, sig, sK)
  out = propagate_full(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], dt=T, sigma_m=sig,
                       sigma_K=sK, mode="kalman_bucy")
  np.testing.assert_allclose(out.mean, m, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(out.covariance, P, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(out.precision @ P, np.eye(3), atol=1e-8)
  np.testing.assert_allclose(out.log_normalizer, logz, rtol=1e-9)


def test_exact_step_from_gaussian_start_and_substeps(x64):
  s = _setup(7)
  args = (s["A"], s["b"], s["x_tgt"], s["M"])
  P0 = np.array([[0.5, 0.1, 0.0], [0.1, 0.3, 0.05], [0.0, 0.05, 0.2]])
  m, P, logz = _kb_ode(s["A"], s["b"], s["x0"], s["x_tgt"], s["M"], 0.8, 0.7, 1.2, P0=P0)
  for n_sub in (1, 4):
    out = kalman_bucy_step(s["x0"], P0, *args, dt=0.8, sigma_m=0.7, sigma_K=1.2, n_sub=n_sub)
    np.testing.assert_allclose(out.mean, m, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(out.covariance, P, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.log_normalizer, logz, rtol=1e-9)
  # M=None is the identity, as in propagate and the chains.
  eye, none = (kalman_bucy_step(s["x0"], P0, *args[:3], M, dt=0.8, sigma_m=0.7, sigma_K=1.2,
                                n_sub=1) for M in (np.eye(3), None))
  np.testing.assert_array_equal(none.mean, eye.mean)
  # Strong measurement over a long interval: one exponential e^{Hh dt} is too
  # ill-conditioned (nu dt ~ 50); exact sub-steps restore full accuracy.
  m, P, logz = _kb_ode(s["A"], s["b"], s["x0"], s["x_tgt"], s["M"], 5.0, 0.1, 1.0)
  for n_sub in (16, "auto"):
    out = propagate_full(s["x0"], *args, dt=5.0, sigma_m=0.1, mode="kalman_bucy", n_sub=n_sub)
    np.testing.assert_allclose(out.mean, m, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(out.covariance, P, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.log_normalizer, logz, rtol=1e-9)
  one = propagate_full(s["x0"], *args, dt=5.0, sigma_m=0.1, mode="kalman_bucy", n_sub=1)
  assert np.max(np.abs(np.asarray(one.mean) - m)) > 1e-6  # why "auto" is the default


def test_auto_substeps_rule_and_traced_arguments(x64):
  # nu = |A|_2 + sigma_K |M|_2 / sigma_m, n_sub = ceil(nu dt / 8) (at least 1).
  s = _setup(8)
  nu = np.linalg.norm(s["A"], 2) + 1.5 * np.linalg.norm(s["M"], 2) / 0.05
  assert exact_substeps(s["A"], s["M"], 2.0, 0.05, 1.5) == int(np.ceil(nu * 2.0 / 8.0)) > 1
  assert exact_substeps(np.zeros((3, 3)), None, 1.0, np.inf, 1.0) == 1
  per_token = np.stack([s["A"], 10.0 * s["A"]])
  assert (exact_substeps(per_token, None, 1.0, np.inf, 1.0)
          == int(np.ceil(10.0 * np.linalg.norm(s["A"], 2) / 8.0)))
  args = (s["A"], s["b"], s["x_tgt"], s["M"])
  f = jax.jit(lambda A: propagate(s["x0"], A, *args[1:], mode="kalman_bucy").mean)
  with pytest.raises(ValueError, match="A is traced here.*pass an int n_sub"):
    f(s["A"])
  with pytest.raises(ValueError, match="A and M must be finite"):
    exact_substeps(np.full((3, 3), np.nan))
  # The paper mode needs no sub-steps and stays traceable with the default.
  g = jax.jit(lambda A: propagate(s["x0"], A, *args[1:]).mean)
  np.testing.assert_allclose(g(s["A"]), propagate(s["x0"], *args[:1], *args[1:]).mean,
                             rtol=1e-12)


def test_exact_scalar_closed_form(x64):
  # A = 0, b = 0, M = I, sigma = sigma_K = 1: P' = 1 - P^2 gives P = tanh t, the
  # mean relaxes as (x0 - y)/cosh t, and log Z = -d/2 log cosh T - 1/2 tanh T |x0 - y|^2.
  x0, y, T = np.array([0.3, -1.2, 0.0]), np.array([1.0, 0.5, 2.0]), 1.0
  out = propagate_full(x0, np.zeros((3, 3)), np.zeros(3), y, mode="kalman_bucy", dt=T)
  np.testing.assert_allclose(out.mean, y + (x0 - y) / np.cosh(T), rtol=1e-12)
  np.testing.assert_allclose(out.covariance, np.tanh(T) * np.eye(3), rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(out.log_normalizer,
                             -1.5 * np.log(np.cosh(T)) - 0.5 * np.tanh(T) * np.sum((x0 - y)**2),
                             rtol=1e-12)


def test_exact_is_limit_of_fine_measurement_chain(x64):
  """Measuring every dt/N (N paper steps: a Riemann sum of S_meas) tends to Kalman-Bucy, O(1/N)."""
  s = _setup(8)
  T, sig, sK = 1.0, 0.7, 1.2
  ex = propagate_full(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], dt=T, sigma_m=sig,
                      sigma_K=sK, mode="kalman_bucy")
  errs = []
  for N in (50, 100):
    ch = chain_filter_full(s["x0"], s["A"], s["b"], np.tile(s["x_tgt"], (N, 1)), s["M"],
                           dt=T / N, sigma_m=sig, sigma_K=sK)
    errs.append([np.max(np.abs(ch.mean[-1] - ex.mean)) / np.max(np.abs(ex.mean)),
                 np.max(np.abs(ch.covariance[-1] - ex.covariance)) / np.max(ex.covariance),
                 abs(float(jnp.sum(ch.log_normalizer)) / float(ex.log_normalizer) - 1)])
  errs = np.array(errs)  # relative errors
  assert np.all(errs[1] < 2e-2)
  np.testing.assert_allclose(errs[0] / errs[1], 2.0, rtol=0.05)


def test_exact_matches_importance_weighted_path_integral(x64):
  """Spec §6.8 item 11: free-SDE paths weighted by exp(-S_meas) reproduce Kalman-Bucy.

  Paths use the exact free transition on a grid of n steps and the Riemann sum
  S_meas ~ (h/2 sigma^2) sum_k |M x_k - y|^2 at the grid's right end points, whose
  exact answer is the N = n measurement chain. The Monte Carlo estimates must lie
  within 4 standard errors (self-normalised importance sampling, delta method)
  of that chain, and within 4 standard errors plus the grid bias of the exact form.
  """
  s = _setup(9)
  T, sig, sK, n, n_paths = 1.0, 1.0, 1.0, 100, 20000
  A, b, M, x0, y = s["A"], s["b"], s["M"], s["x0"], s["x_tgt"]
  h = T / n
  aug = np.zeros((4, 4))
  aug[:3, :3], aug[:3, 3] = A, b
  E = sl.expm(aug * h)
  Phi, c = E[:3, :3], E[:3, 3]
  L = np.linalg.cholesky(sl.solve_continuous_lyapunov(A, Phi @ Phi.T - np.eye(3)) * sK**2)
  rng = np.random.default_rng(0)
  x = np.tile(x0, (n_paths, 1))
  S = np.zeros(n_paths)
  for _ in range(n):
    x = x @ Phi.T + c + rng.normal(size=(n_paths, 3)) @ L.T
    S += h / (2 * sig**2) * np.sum((x @ M.T - y)**2, axis=1)
  w = np.exp(-(S - S.min()))
  w /= w.sum()
  mean = w @ x
  dev = x - mean
  cov = np.einsum("n,ni,nj->ij", w, dev, dev)
  se_mean = np.sqrt(w**2 @ dev**2)
  se_cov = np.sqrt(np.einsum("n,nij->ij", w**2, (dev[:, :, None] * dev[:, None, :] - cov)**2))
  ess = 1 / np.sum(w**2)
  assert ess > 0.1 * n_paths
  ex = propagate_full(x0, A, b, y, M, dt=T, sigma_m=sig, sigma_K=sK, mode="kalman_bucy")
  ch = chain_filter_full(x0, A, b, np.tile(y, (n, 1)), M, dt=h, sigma_m=sig, sigma_K=sK)
  disc_mean, disc_cov = np.asarray(ch.mean[-1]), np.asarray(ch.covariance[-1])
  assert np.all(np.abs(mean - disc_mean) <= 4 * se_mean)
  assert np.all(np.abs(cov - disc_cov) <= 4 * se_cov)
  bias_mean, bias_cov = np.abs(disc_mean - ex.mean), np.abs(disc_cov - ex.covariance)
  assert np.all(np.abs(mean - ex.mean) <= 4 * se_mean + bias_mean)
  assert np.all(np.abs(cov - ex.covariance) <= 4 * se_cov + bias_cov)
  assert np.max(bias_mean / se_mean) < 1 and np.max(bias_cov / se_cov) < 1
  # ... and it bites: the paper form's endpoint mean is many standard errors off.
  paper = propagate(x0, A, b, y, M, dt=T, sigma_m=sig, sigma_K=sK)
  assert np.max(np.abs(mean - paper.mean) / se_mean) > 10


def _shift_ratio(s, T):
  """|mu_paper - mu_K| / |mu_exact - mu_K| with M = I, sigma = sigma_K = 1."""
  kw = dict(dt=T, sigma_m=1.0, sigma_K=1.0)
  free = propagate(s["x0"], s["A"], s["b"], s["x_tgt"], dt=T, sigma_m=jnp.inf)
  paper = propagate(s["x0"], s["A"], s["b"], s["x_tgt"], **kw)
  exact = propagate(s["x0"], s["A"], s["b"], s["x_tgt"], mode="kalman_bucy", **kw)
  return np.linalg.norm(paper.mean - free.mean) / np.linalg.norm(exact.mean - free.mean)


def test_paper_to_exact_mean_shift_ratio(x64):
  """Spec §6.3, §6.8 item 12: the paper form's mean shift is twice the exact one as dt -> 0."""
  for seed in (10, 11):
    assert abs(_shift_ratio(_setup(seed), 0.01) - 2.0) < 1e-2
  # A = 0, b = 0, M = I, sigma = sigma_K = 1 in closed form: paper shift fraction
  # T^2/(1 + T^2), exact 1 - sech T; ratio 1.9999 (T = 0.01), 1.9884 (0.1), 1.4207 (1).
  s = dict(A=np.zeros((3, 3)), b=np.zeros(3), x0=np.zeros(3), x_tgt=np.array([1.0, 0.0, -0.5]))
  for T in (0.01, 0.1, 1.0):
    np.testing.assert_allclose(_shift_ratio(s, T), T**2 / (1 + T**2) / (1 - 1 / np.cosh(T)),
                               rtol=1e-8)


def test_float32_path():
  s = _setup(12)
  s32 = {k: v.astype(np.float32) for k, v in s.items()}
  T, sig, sK = 0.7, 0.8, 1.3
  mu_K, S_K = _np_prior(s32["A"].astype(np.float64), s32["b"].astype(np.float64),
                        s32["x0"].astype(np.float64), T, sK)
  mu, Lam = _np_posterior(mu_K, S_K, s32["M"].astype(np.float64),
                          s32["x_tgt"].astype(np.float64), T / sig**2)
  st = propagate(s32["x0"], s32["A"], s32["b"], s32["x_tgt"], s32["M"], dt=T, sigma_m=sig,
                 sigma_K=sK)
  assert st.mean.dtype == jnp.float32 and st.precision.dtype == jnp.float32
  np.testing.assert_allclose(st.mean, mu, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(st.precision, Lam, rtol=1e-4, atol=1e-4)
  ex = propagate(s32["x0"], s32["A"], s32["b"], s32["x_tgt"], s32["M"], dt=T, sigma_m=sig,
                 sigma_K=sK, mode="kalman_bucy")
  m, P, _ = _kb_ode(*(s32[k].astype(np.float64) for k in ("A", "b", "x0", "x_tgt", "M")),
                    T, sig, sK)
  assert ex.mean.dtype == jnp.float32
  np.testing.assert_allclose(ex.mean, m, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.inv(np.asarray(ex.precision, np.float64)), P,
                             rtol=1e-4, atol=1e-5)


def test_jit_and_vmap(x64):
  s = _setup(13)
  args = (s["x0"], s["A"], s["b"], s["x_tgt"], s["M"])
  X0 = np.random.default_rng(0).normal(size=(4, 3))
  n_sub = exact_substeps(s["A"], s["M"], 0.6, 0.9)
  for mode in ("paper", "kalman_bucy"):
    f = jax.jit(jax.vmap(lambda x, dt, sig: propagate(x, *args[1:], dt=dt, sigma_m=sig,
                                                      mode=mode, n_sub=n_sub),
                         in_axes=(0, None, None)))
    batched = f(X0, 0.6, 0.9)
    eager = propagate(X0[3], *args[1:], dt=0.6, sigma_m=0.9, mode=mode)
    np.testing.assert_allclose(batched.mean[3], eager.mean, rtol=1e-12)
    np.testing.assert_allclose(batched.precision[3], eager.precision, rtol=1e-12)


def test_repeated_eager_calls_reuse_their_programs(x64):
  # A notebook calling the propagators in a loop (new values, same shapes) must not
  # re-trace and re-lower them on every call (the scans and loops once did, 0.1-0.4 s
  # a call at d = 3).
  first, second = _setup(21), _setup(22)
  calls = {
      "paper": lambda s: propagate_full(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"], dt=0.7),
      "information": lambda s: propagate_full(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"],
                                              dt=0.7, form="information"),
      "kalman_bucy": lambda s: propagate_full(s["x0"], s["A"], s["b"], s["x_tgt"], s["M"],
                                              dt=0.7, mode="kalman_bucy", n_sub=2),
      "update": lambda s: measurement_update(s["x0"], np.eye(3) + 0.1 * s["M"] @ s["M"].T,
                                             s["x_tgt"], s["M"], 0.5),
      "koopman_cov": lambda s: koopman_cov(s["A"], 0.8, 0.7),
      "koopman_mean": lambda s: koopman_mean(s["A"], s["b"], s["x0"], 0.7),
  }
  for name, call in calls.items():
    a, _ = count_lowerings(lambda: call(first))
    b, lowered = count_lowerings(lambda: call(second))
    assert lowered == 0, (name, lowered)
    assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0]), name


def test_spec_signature_positional_order(x64):
  # Spec §6.2: propagate(x0, A, b, x_tgt, M=W_V, dt=1, sigma_m=1, sigma_K=1, mode="paper").
  s = _setup(15)
  args = (s["x0"], s["A"], s["b"], s["x_tgt"], s["M"])
  for mode in ("paper", "kalman_bucy"):
    pos = propagate_full(*args, 0.7, 0.5, 1.3, mode)
    kw = propagate_full(*args, dt=0.7, sigma_m=0.5, sigma_K=1.3, mode=mode)
    for got, want in zip(pos, kw):
      np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(propagate(*args, 0.7, 0.5, 1.3, mode).mean, kw.mean)
  paper = propagate(*args, 0.7, 0.5, 1.3)
  exact = propagate(*args, 0.7, 0.5, 1.3, "kalman_bucy")
  assert np.max(np.abs(np.asarray(paper.mean) - np.asarray(exact.mean))) > 1e-3
  with pytest.raises(TypeError):
    propagate(*args, 0.7, 0.5, 1.3, "paper", "gain")  # form and n_sub are keyword-only


def test_measurement_update_derivatives_at_zero_precision(x64):
  """P(r) = (Sigma_0^{-1} + r M^T M)^{-1} is smooth at r = 0 (no measurement): the gain
  form's Joseph term must not differentiate a sqrt(r) there (inf * 0 = NaN)."""
  rng = np.random.default_rng(1)
  S0 = rng.normal(size=(3, 3))
  S0 = S0 @ S0.T + np.eye(3)
  M, mu0, y = rng.normal(size=(3, 3)), rng.normal(size=3), rng.normal(size=3)
  cov = lambda r: measurement_update(mu0, S0, y, M, r).covariance
  dP = jax.jacfwd(cov)(0.0)
  np.testing.assert_allclose(dP, -S0 @ M.T @ M @ S0, rtol=1e-12)  # d/dr (S^-1 + r M^T M)^-1
  np.testing.assert_allclose(jax.grad(lambda r: cov(r).sum())(0.0), dP.sum(), rtol=1e-12)


def test_measurement_update_prior_with_singular_covariance(x64):
  # Gain form needs no Sigma_0^{-1}: a degenerate prior direction keeps its mean.
  S0 = np.diag([1.0, 0.0])
  out = measurement_update(np.array([0.5, 2.0]), S0, np.array([1.5, 0.0]), np.eye(2), 1.0)
  np.testing.assert_allclose(out.mean, [1.0, 2.0], rtol=1e-12)
  np.testing.assert_allclose(out.covariance, np.diag([0.5, 0.0]), atol=1e-15)


def test_bad_inputs():
  s = _setup(14)
  x0, A, b, y, M = s["x0"], s["A"], s["b"], s["x_tgt"], s["M"]
  cases = [
      (dict(x0=np.zeros(4)), r"x0 must have shape \(3,\), got \(4,\)"),
      (dict(x0=np.zeros((5, 3))), r"got \(5, 3\): the propagators take one state; map over "
                                  r"a batch with jax.vmap"),
      (dict(A=np.zeros((3, 4))), r"A must be a square matrix, got shape \(3, 4\)"),
      (dict(A=np.zeros((2, 3, 3))), r"A must have 2 dimensions"),
      (dict(b=np.zeros((3, 1))), r"b must have shape \(3,\), got \(3, 1\)"),
      (dict(x_tgt=np.zeros(2)), r"x_tgt must have shape \(3,\), got \(2,\)"),
      (dict(M=np.zeros((2, 3))), r"M must have shape \(3, 3\), got \(2, 3\)"),
      (dict(A=A + 0j), "A must be real"),
      (dict(x_tgt=y * 1j), "x_tgt must be real"),
      (dict(dt=0.0), "dt must be > 0 and finite"),
      (dict(dt=jnp.inf), "dt must be > 0 and finite"),
      (dict(dt=np.full(3, 0.5)), r"dt must be a scalar, got shape \(3,\)"),
      (dict(sigma_m=-1.0), "sigma_m must be > 0"),
      (dict(sigma_K=jnp.inf), "sigma_K must be finite"),
      # a per-dimension noise would broadcast into a wrong answer (or fail deep in jnp)
      (dict(sigma_m=np.ones(3)), r"sigma_m must be a scalar, got shape \(3,\)"),
      (dict(sigma_m=np.ones(3), mode="kalman_bucy"), r"sigma_m must be a scalar"),
      (dict(sigma_m=np.ones(3), mode="kalman_bucy", n_sub=1), r"sigma_m must be a scalar"),
      (dict(sigma_K=np.ones(3)), r"sigma_K must be a scalar, got shape \(3,\)"),
      (dict(sigma_K=1j), r"sigma_K must be a real number, got 1j"),
      (dict(dt="1"), r"dt must be a real number, got '1'"),
      # NaN in, NaN out before: a concrete non-finite input is refused by name
      (dict(A=np.where(np.eye(3) > 0, np.nan, 0.0)), "A must be finite; it has 3 non-finite"),
      (dict(x0=np.array([0.0, np.inf, 0.0])), "x0 must be finite"),
      (dict(M=np.full((3, 3), np.nan)), "M must be finite"),
      (dict(x_tgt=np.array([np.nan, 0.0, 0.0]), mode="kalman_bucy", n_sub=1),
       "x_tgt must be finite"),
      (dict(mode="kalman"), "mode must be one of"),
      (dict(form="joseph"), "form must be one of"),
      (dict(n_sub=0), "n_sub must be 'auto' or an integer >= 1"),
      (dict(n_sub=2.5), "n_sub must be 'auto' or an integer >= 1"),
      (dict(n_sub="many"), "n_sub must be 'auto' or an integer >= 1"),
  ]
  base = dict(x0=x0, A=A, b=b, x_tgt=y, M=M)
  for override, msg in cases:
    kw = {**base, **override}
    with pytest.raises(ValueError, match=msg):
      propagate(kw.pop("x0"), kw.pop("A"), kw.pop("b"), kw.pop("x_tgt"), **kw)
  with pytest.raises(ValueError, match=r"prior_cov must have shape \(3, 3\)"):
    measurement_update(x0, np.eye(2), y, M, 1.0)
  with pytest.raises(ValueError, match=r"obs_precision must have shape \(\)"):
    measurement_update(x0, np.eye(3), y, M, np.ones(3))
  for r in (-0.5, np.inf, np.nan):  # gave NaN, or a log-normaliser > 0
    with pytest.raises(ValueError, match="obs_precision must be finite and >= 0"):
      measurement_update(x0, np.eye(3), y, M, r)
  for cov, msg in ((-np.eye(3), "prior_cov must be positive semi-definite"),
                   (np.triu(np.ones((3, 3))), "prior_cov must be a symmetric covariance"),
                   (np.full((3, 3), np.nan), "prior_cov must be finite")):
    with pytest.raises(ValueError, match=msg):
      measurement_update(x0, cov, y, M, 1.0)


def test_paper_mode_refuses_an_overflowing_prior_or_precision():
  # Concrete inputs whose r = dt/sigma_m^2 or Sigma_K overflows float32 are refused, with
  # errors that name the arguments the user passed (not internal names such as
  # obs_precision or prior_cov); the paper mode must not turn them into silent NaN, and
  # neither may the chains.
  s = _setup(16)
  x0, A, b, y, M = (np.asarray(s[k], np.float32) for k in ("x0", "A", "b", "x_tgt", "M"))
  y_N = np.tile(y, (3, 1))
  grow = 60.0 * np.eye(3, dtype=np.float32)  # e^{60 * 2} overflows
  for form in ("gain", "information"):
    for dt, sigma_m in ((1.0, 1e-30), (1e30, 1e-10)):
      msg = re.escape(f"dt/sigma_m^2 overflows float32 (dt={dt}, sigma_m={sigma_m}): use a "
                      "larger sigma_m")
      with pytest.raises(ValueError, match=msg):
        propagate_full(x0, A, b, y, M, dt, sigma_m, form=form)
      with pytest.raises(ValueError, match=msg):
        chain_filter_full(x0, A, b, y_N, M, dt=dt, sigma_m=sigma_m, form=form)
    with pytest.raises(ValueError, match="Koopman covariance Sigma_K overflowed float32"):
      propagate_full(x0, grow, b, y, M, 2.0, form=form)
  with pytest.raises(ValueError, match=r"dt/sigma_m\^2 overflows float32"):
    chain_measured_mean(x0, A, b, y_N, M, sigma_m=1e-30)
  for call in (lambda: chain_measured_mean(x0, grow, b, y_N, M, dt=2.0),
               lambda: chain_filter_full(x0, grow, b, y_N, M, dt=2.0),
               lambda: chain_filter_full(x0, np.stack([grow] * 3), np.tile(b, (3, 1)), y_N, M,
                                         dt=2.0)):
    with pytest.raises(ValueError, match="Koopman covariance Sigma_K overflowed float32"):
      call()
  # Without measurement a growing mode compounds over the tokens until the means overflow.
  with pytest.raises(ValueError, match="the chain's means overflowed float32 over the tokens"):
    chain_filter_full(x0, 30.0 * np.eye(3, dtype=np.float32), b, np.tile(y, (40, 1)), M,
                      dt=0.1, sigma_m=np.inf)


def test_scalar_checks_take_every_real_dtype_and_refuse_the_rest():
  from qsf_jax import _checks  # pylint: disable=import-outside-toplevel
  for v in (0.5, 2, np.float16(0.5), jnp.bfloat16(0.5), np.int64(2), jnp.float32(1.0)):
    _checks.check_time_step("dt", v)
    _checks.check_positive("sigma_m", v)
    _checks.check_finite_nonneg("sigma_K", v)
  for bad in (True, np.bool_(False), 1j, "1", np.complex64(1.0)):
    for check in (_checks.check_time_step, _checks.check_positive, _checks.check_finite_nonneg):
      with pytest.raises(ValueError, match="x must be a real number"):
        check("x", bad)
