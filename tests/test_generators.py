"""Tests of the generator tools (QSF eq. 1, eq. 58).

Covers spec §6.1 and §6.8 items 1, 2, 6 and 7.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl
from scipy.integrate import quad_vec, solve_ivp

from qsf_jax import decompose_generator, koopman_affine, koopman_cov, koopman_mean

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small programs: compile time dominates


def _rand(seed, d=3, scale=0.6):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(d, d)) * scale, rng.normal(size=d), rng.normal(size=d)


@pytest.mark.parametrize("complex_A", [False, True])
def test_decomposition_identities(x64, complex_A):
  rng = np.random.default_rng(0)
  A = rng.normal(size=(5, 5))
  if complex_A:
    A = A + 1j * rng.normal(size=(5, 5))
  H, D = map(np.asarray, decompose_generator(A))
  np.testing.assert_allclose(H, H.conj().T, atol=1e-14)
  np.testing.assert_allclose(D, D.conj().T, atol=1e-14)
  np.testing.assert_allclose(-1j * H + D, A, atol=1e-14)
  if not complex_A:
    assert not np.iscomplexobj(D)
    S = 0.5 * (A - A.T)
    np.testing.assert_allclose(H, 1j * S, atol=1e-14)


def test_decomposition_batch_axes(x64):
  A = np.random.default_rng(1).normal(size=(2, 3, 4, 4))
  H, D = decompose_generator(A)
  assert H.shape == D.shape == (2, 3, 4, 4)
  for i in range(2):
    for j in range(3):
      Hij, Dij = decompose_generator(A[i, j])
      np.testing.assert_allclose(H[i, j], Hij, atol=1e-14)
      np.testing.assert_allclose(D[i, j], Dij, atol=1e-14)


def test_commuting_case_moduli_are_exp_of_dissipation(x64):
  # [H, D] = 0: share an orthonormal eigenbasis; eig(A) = -i omega_k + gamma_k.
  rng = np.random.default_rng(2)
  Q, _ = np.linalg.qr(rng.normal(size=(4, 4)) + 1j * rng.normal(size=(4, 4)))
  omega, gamma = rng.normal(size=4), rng.normal(size=4) * 0.5
  A = Q @ np.diag(-1j * omega + gamma) @ Q.conj().T
  H, D = map(np.asarray, decompose_generator(A))
  assert np.linalg.norm(H @ D - D @ H) < 1e-12
  mods = np.sort(np.abs(np.linalg.eigvals(sl.expm(A))))
  np.testing.assert_allclose(mods, np.sort(np.exp(np.linalg.eigvalsh(D))), rtol=1e-12)


def test_trace_identity(x64):
  A, _, _ = _rand(3, d=6, scale=0.4)
  _, D = decompose_generator(A)
  lhs = np.sum(np.log(np.abs(np.linalg.eigvals(sl.expm(A)))))
  np.testing.assert_allclose(lhs, np.trace(np.asarray(D)), rtol=1e-12)


def test_koopman_mean_matches_inverse_formula(x64):
  A, b, x0 = _rand(4)
  A = A - 1.5 * np.eye(3)  # well away from singular
  T = 0.8
  eAT = sl.expm(A * T)
  ref = eAT @ x0 + np.linalg.solve(A, (eAT - np.eye(3)) @ b)
  np.testing.assert_allclose(koopman_mean(A, b, x0, T), ref, rtol=1e-12, atol=1e-13)
  Phi, c = koopman_affine(A, b, T)
  np.testing.assert_allclose(Phi, eAT, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(c, ref - eAT @ x0, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_koopman_mean_long_interval(dtype):
  # jax's expm gives NaN past 16 squarings (|A dt| above ~3.5e5); a stable A over a
  # long interval relaxes to the fixed point -A^{-1} b. Scaling and squaring takes
  # s ~ log2|A dt| squarings, each of which can double the rounding error, so the
  # error is bounded by about |A dt|_1 eps (3e-11 and 3e-8 measured in float64).
  A = np.array([[-1.0, 0.5], [0.0, -2.0]], dtype)
  b, x0 = np.array([0.3, -0.4], dtype), np.array([1.0, 2.0], dtype)
  fixed = -np.linalg.solve(A.astype(np.float64), b.astype(np.float64))
  with jax.enable_x64(dtype == np.float64):
    for dt in (1e6, 1e9):
      got = np.asarray(koopman_mean(A, b, x0, dt))
      assert got.dtype == dtype
      rtol = 1e-5 if dtype == np.float32 else np.abs(A).sum(0).max() * dt * np.finfo(dtype).eps
      np.testing.assert_allclose(got, fixed, rtol=rtol)


def test_koopman_mean_squarings_follow_the_one_norm(x64):
  # expm's squaring count depends on the 1-norm (largest column sum). Here one column
  # sums to 1.08e6 while every row sums to 9e4: a count from the row sums (inf-norm,
  # below the 1e5 switch) would keep 16 squarings and give NaN.
  d = 12
  A = -np.eye(d)
  A[:, 0] -= 9e4
  b, x0 = np.linspace(-1.0, 1.0, d), np.ones(d)
  aug = np.zeros((d + 1, d + 1))
  aug[:d, :d], aug[:d, d] = A, b
  E = sl.expm(aug)
  ref = E[:d, :d] @ x0 + E[:d, d]
  got = np.asarray(koopman_mean(A, b, x0, 1.0))
  np.testing.assert_allclose(got, ref, rtol=np.abs(A).sum(0).max() * np.finfo(np.float64).eps)


def test_koopman_mean_between_the_squaring_switches(x64):
  """From |A dt|_1 ~ 3.5e5, 16 squarings overflow; above the 1e5 switch expm takes 32.
  Between 3.5e5 and 1e6 the mean is still the fixed point -A^{-1} b."""
  A, b = np.array([[-1.0, 0.5], [0.0, -2.0]]), np.array([1.0, -0.5])
  for dt in (2e5, 3.2e5):
    assert 3.5e5 < np.abs(A * dt).sum(0).max() < 1e6
    np.testing.assert_allclose(np.asarray(koopman_mean(A, b, np.ones(2), dt)),
                               -np.linalg.solve(A, b), rtol=1e-9)


def test_long_intervals_under_transformations(x64):
  """Traced inputs (jit, vmap, grad) get 32 squarings, enough for |A dt|_1 up to
  ~2e10 (16 gave NaN from ~3.5e5 where the eager call was finite), and stacked
  per-step generators get the count of their largest norm, although each step is
  traced inside the chain's vmap."""
  import qsf_jax as q
  A = np.array([[-1.0, 0.5], [0.0, -2.0]])
  b, x0 = np.array([0.3, -0.4]), np.array([1.0, 2.0])
  fixed = -np.linalg.solve(A, b)
  for dt in (1e6, 1e9):
    got = jax.jit(lambda t: q.chain_mean(x0, A, b, t, n_steps=2))(dt)
    np.testing.assert_allclose(got[-1], fixed, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.vmap(lambda t: koopman_mean(A, b, x0, t)))(
        jnp.array([dt, 2 * dt])), [fixed, fixed], rtol=1e-6)
  mean = lambda a: q.propagate(x0, a, b, np.zeros(2), dt=1.0).mean
  stiff = A * 1e6
  np.testing.assert_allclose(jax.jit(mean)(stiff), mean(stiff), rtol=1e-9)
  assert np.isfinite(jax.jit(jax.grad(lambda a: mean(a).sum()))(stiff)).all()
  # past 32 squarings a traced count still gives NaN; an explicit count is honoured
  assert np.isnan(jax.jit(lambda t: koopman_affine(A, b, t)[0])(1e12)).all()
  np.testing.assert_allclose(jax.jit(lambda t: koopman_affine(A, b, t, max_squarings=64)[1])(
      1e12), fixed, rtol=1e-3)
  assert np.isnan(koopman_affine(A, b, 1e6, max_squarings=16)[0]).all()
  for bad in (-1, 2.0, "64", True):
    with pytest.raises(ValueError, match="max_squarings must be"):
      koopman_affine(A, b, 1.0, max_squarings=bad)
  # per-step generators, one of them stiff, called eagerly: each step is traced in the vmap
  A_seq = np.stack([A, A * 1e6])
  chain = np.asarray(q.chain_mean(x0, A_seq, b, 1.0))
  step1 = np.asarray(koopman_mean(A, b, x0, 1.0))
  np.testing.assert_allclose(chain[0], step1, rtol=1e-12)
  np.testing.assert_allclose(chain[1], np.asarray(koopman_mean(A * 1e6, b, step1, 1.0)),
                             rtol=1e-9)


def test_zero_generator_closed_forms(x64):
  _, b, x0 = _rand(5, d=3)
  T, sK = 1.7, 0.6
  np.testing.assert_allclose(koopman_mean(np.zeros((3, 3)), b, x0, T), x0 + b * T, rtol=1e-14)
  np.testing.assert_allclose(koopman_cov(np.zeros((3, 3)), sK, T), sK**2 * T * np.eye(3),
                             rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("a", [-1.3, 0.4, 2.0])
def test_scalar_closed_form(x64, a):
  T, sK = 0.9, 1.4
  got = koopman_cov(np.array([[a]]), sK, T)[0, 0]
  np.testing.assert_allclose(got, sK**2 * (np.exp(2 * a * T) - 1) / (2 * a), rtol=1e-13)
  mean = koopman_mean(np.array([[a]]), np.array([0.7]), np.array([-0.2]), T)[0]
  np.testing.assert_allclose(mean, np.exp(a * T) * -0.2 + (np.exp(a * T) - 1) / a * 0.7,
                             rtol=1e-13)


def test_singular_generator_finite_and_continuous(x64):
  # A nilpotent plus a rank-deficient part: no A^{-1} exists.
  A = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -0.5]])
  b, x0, T = np.array([0.3, -0.2, 0.1]), np.array([1.0, 2.0, -1.0]), 1.2
  mu = np.asarray(koopman_mean(A, b, x0, T))
  S = np.asarray(koopman_cov(A, 1.0, T))
  assert np.all(np.isfinite(mu)) and np.all(np.isfinite(S))
  # Closed form on the nilpotent block: x1 = x1 + T x2 + T b1 + T^2/2 b2, x2 = x2 + T b2.
  np.testing.assert_allclose(mu[:2], [1 + T * 2 + T * 0.3 + T**2 / 2 * -0.2, 2 - 0.2 * T],
                             rtol=1e-13)
  # A -> 0 limit: epsilon-perturbations converge to the singular answer, O(eps).
  E = np.random.default_rng(6).normal(size=(3, 3))
  errs = [np.max(np.abs(np.asarray(koopman_mean(A + e * E, b, x0, T)) - mu)) for e in (1e-3, 1e-4)]
  assert errs[1] < 1e-3 and 8 < errs[0] / errs[1] < 12
  errs = [np.max(np.abs(np.asarray(koopman_cov(A + e * E, 1.0, T)) - S)) for e in (1e-3, 1e-4)]
  assert errs[1] < 1e-3 and 8 < errs[0] / errs[1] < 12
  # Fully zero generator against A = eps * E.
  np.testing.assert_allclose(koopman_cov(1e-9 * E, 1.0, T), T * np.eye(3), atol=1e-8)


def test_van_loan_equals_lyapunov_ode(x64):
  A, _, _ = _rand(7)
  sK, T = 0.8, 1.3

  def rhs(t, s):
    S = s.reshape(3, 3)
    return (A @ S + S @ A.T + sK**2 * np.eye(3)).ravel()

  sol = solve_ivp(rhs, (0, T), np.zeros(9), method="DOP853", rtol=1e-12, atol=1e-14)
  S_ode = sol.y[:, -1].reshape(3, 3)
  S = np.asarray(koopman_cov(A, sK, T))
  np.testing.assert_allclose(S, S_ode, rtol=1e-7, atol=1e-10)
  np.testing.assert_allclose(S, S.T, atol=0)
  assert np.all(np.linalg.eigvalsh(S) > 0)


def test_van_loan_equals_euler_maruyama_covariance(x64):
  """Free SDE dx = A x dt + sigma_K dW (sigma_m = inf): empirical vs Van Loan covariance."""
  A = np.array([[-0.6, 0.8, 0.0], [-0.5, -0.3, 0.2], [0.1, 0.0, -0.9]])
  T, n_steps, n_paths, sK = 1.0, 200, 20000, 1.0
  h = T / n_steps
  key = jax.random.PRNGKey(0)

  def step(x, k):
    return x + h * x @ A.T + sK * np.sqrt(h) * jax.random.normal(k, x.shape), None

  xT = np.asarray(jax.lax.scan(step, jnp.zeros((n_paths, 3)),
                               jax.random.split(key, n_steps))[0])
  prods = xT[:, :, None] * xT[:, None, :]  # x0 = 0, b = 0: the mean is exactly 0
  emp, se = prods.mean(0), prods.std(0) / np.sqrt(n_paths)
  S = np.asarray(koopman_cov(A, sK, T))
  # Euler-Maruyama's own covariance (deterministic recursion): its O(h) bias is
  # part of the allowed error, the rest must be Monte Carlo noise (4 standard errors).
  Ih = np.eye(3) + h * A
  S_em = np.zeros((3, 3))
  for _ in range(n_steps):
    S_em = Ih @ S_em @ Ih.T + h * sK**2 * np.eye(3)
  bias = np.abs(S_em - S)
  assert np.max(bias) < 0.5 * np.min(se)  # the step is fine enough for the test to bite
  assert np.all(np.abs(emp - S) <= 4 * se + bias), (emp, S, se)


def test_bad_inputs():
  with pytest.raises(ValueError, match="A must be a square matrix"):
    koopman_affine(np.zeros((3, 2)), np.zeros(3))
  with pytest.raises(ValueError, match=r"b must have shape \(3,\)"):
    koopman_affine(np.zeros((3, 3)), np.zeros(4))
  with pytest.raises(ValueError, match=r"x0 must have shape \(3,\)"):
    koopman_mean(np.zeros((3, 3)), np.zeros(3), np.zeros((3, 1)))
  with pytest.raises(ValueError, match="A must be real"):
    koopman_cov(np.eye(2) * 1j)
  with pytest.raises(ValueError, match="dt must be > 0"):
    koopman_cov(np.eye(2), 1.0, 0.0)
  with pytest.raises(ValueError, match="A must be a square matrix"):
    decompose_generator(np.zeros((2, 3)))
  nan_eye = np.where(np.eye(2) > 0, np.nan, 0.0)
  with pytest.raises(ValueError, match="A must be finite"):
    koopman_affine(nan_eye, np.zeros(2))
  with pytest.raises(ValueError, match="b must be finite"):
    koopman_affine(np.eye(2), np.array([np.inf, 0.0]))
  with pytest.raises(ValueError, match="x0 must be finite"):
    koopman_mean(np.eye(2), np.zeros(2), np.array([np.nan, 0.0]))
  with pytest.raises(ValueError, match="A must be finite"):
    koopman_cov(nan_eye)
  # A vector sigma_K is refused under jit too (its shape is static).
  for cov in (koopman_cov, jax.jit(koopman_cov)):
    with pytest.raises(ValueError, match=r"sigma_K must be a scalar, got shape \(3,\)"):
      cov(-np.eye(2), jnp.ones(3), 0.5)
  with pytest.raises(ValueError, match="Koopman covariance Sigma_K overflowed float32"):
    koopman_cov(60.0 * np.eye(2, dtype=np.float32))  # Sigma ~ e^{120} / 120


def test_koopman_mean_keeps_the_precision_of_x0(x64):
  """A float64 start point is not rounded to float32 A and b (as in propagate)."""
  A, b = np.float32(-np.eye(2)), np.zeros(2, np.float32)
  x0 = np.array([1.0 + 1e-12, 1.0])
  mu = koopman_mean(A, b, x0, 0.5)
  assert mu.dtype == jnp.float64 and float(mu[0] - mu[1]) > 0


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_koopman_cov_rejects_bad_sigma_K(bad):
  with pytest.raises(ValueError, match="sigma_K"):
    koopman_cov(jnp.zeros((2, 2)), bad, 1.0)


@pytest.mark.parametrize("a,dt", [(-10.0, 3.0), (-20.0, 2.0), (-30.0, 3.0), (-200.0, 1.0)])
def test_koopman_cov_stiff_generator(x64, a, dt):
  # A fast-decaying mode next to a growing one: Van Loan's single exponential
  # holds e^{-A dt} ~ e^{|a| dt} and cancels (7% error at a = -20, dt = 2, NaN at
  # a = -30, dt = 3); the doubled form stays exact. Symmetric A has the closed form
  # Sigma = (2A)^{-1} (e^{2 A dt} - I).
  A = np.array([[a, 1.0], [1.0, 0.5]])
  want = np.linalg.solve(2.0 * A, sl.expm(2.0 * A * dt) - np.eye(2))
  got = np.asarray(koopman_cov(A, 1.0, dt))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13 * np.abs(want).max())
  assert np.linalg.eigvalsh(got).min() > 0


def test_koopman_cov_stiff_float32_and_grad():
  # float32 at a = -8, dt = 3 was indefinite before the doubling; now within 1e-5.
  A = np.array([[-8.0, 1.0], [1.0, 0.5]])
  want = np.linalg.solve(2.0 * A, sl.expm(2.0 * A * 3.0) - np.eye(2))
  got = np.asarray(koopman_cov(jnp.asarray(A, jnp.float32), 1.0, 3.0), np.float64)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  # Differentiable through the value-dependent doubling count (jit and grad).
  f = jax.jit(lambda A: jnp.trace(koopman_cov(A, 1.0, 3.0)))
  g = np.asarray(jax.grad(f)(jnp.asarray(A, jnp.float32)), np.float64)
  def tr(X):  # tr Sigma_K by quadrature, for any (non-symmetric) X
    return quad_vec(lambda s: np.sum(sl.expm(X * s) ** 2), 0.0, 3.0, epsrel=1e-12)[0]

  eps, fd = 1e-4, np.zeros_like(A)
  for i in range(2):
    for j in range(2):
      E = np.zeros_like(A)
      E[i, j] = eps
      fd[i, j] = (tr(A + E) - tr(A - E)) / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())


def test_koopman_cov_rejects_array_dt():
  with pytest.raises(ValueError, match=r"dt must be a scalar, got shape \(2,\)"):
    koopman_cov(np.eye(2), 1.0, np.ones(2))
  with pytest.raises(ValueError, match="dt must be > 0 and finite"):
    koopman_cov(np.eye(2), 1.0, np.inf)
