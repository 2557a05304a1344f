"""Tests of the token chains and the trained-layer propagator (QSF eq. 59).

Covers spec §6.4-6.5 and §6.8 item 13.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl

from conftest import count_lowerings
from qsf_jax import (chain_filter, chain_filter_full, chain_mean, chain_measured_mean,
                     compose_affine, continuous_bias, kalman_bucy_step, koopman_mean,
                     layer_generator, propagate, propagate_full, propagate_layer, scan_affine,
                     step_maps)

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small programs: compile time dominates

N, D = 5, 3


def _seq(seed=0):
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(N, D, D)) * 0.4 - 0.5 * np.eye(D)
  return dict(A=A, b=rng.normal(size=(N, D)), x0=rng.normal(size=D),
              y=rng.normal(size=(N, D)), M=rng.normal(size=(D, D)) * 0.4 + np.eye(D))


def _np_step(A, b, dt, sK=1.0):
  """U, c (A^{-1} formula) and Sigma_K (Lyapunov solve) without the library's Van Loan."""
  U = sl.expm(A * dt)
  Q = sK**2 * np.eye(len(b))
  return U, np.linalg.solve(A, (U - np.eye(len(b))) @ b), sl.solve_continuous_lyapunov(
      A, U @ Q @ U.T - Q)


def _np_update(mu0, S0, y, M, r):
  S0inv = np.linalg.inv(S0)
  Lam = S0inv + r * M.T @ M
  return np.linalg.solve(Lam, S0inv @ mu0 + r * M.T @ y), np.linalg.inv(Lam)


@pytest.mark.parametrize("method", ["associative", "sequential"])
def test_product_formula_equals_iterated_steps(x64, method):
  s = _seq(0)
  dt = 0.8
  steps = [_np_step(s["A"][n], s["b"][n], dt)[:2] for n in range(N)]
  x, iterated = s["x0"], []
  for U, c in steps:
    x = U @ x + c
    iterated.append(x)
  prod = np.eye(D)
  for U, _ in steps:
    prod = U @ prod  # U_N ... U_1, later factors on the left
  total = prod @ s["x0"]
  for n in range(N):
    tail = np.eye(D)
    for m in range(n + 1, N):
      tail = steps[m][0] @ tail
    total = total + tail @ steps[n][1]
  means = chain_mean(s["x0"], s["A"], s["b"], dt, method=method)
  assert means.shape == (N, D)
  np.testing.assert_allclose(means, np.array(iterated), rtol=1e-11, atol=1e-12)
  np.testing.assert_allclose(means[-1], total, rtol=1e-11, atol=1e-12)


def test_associative_equals_sequential_for_every_layout(x64):
  s = _seq(1)
  layouts = [(s["A"], s["b"], None), (s["A"][0], s["b"], None), (s["A"], s["b"][0], None),
             (s["A"][0], s["b"][0], N)]
  for A, b, n in layouts:
    a = chain_mean(s["x0"], A, b, 0.7, n_steps=n, method="associative")
    q = chain_mean(s["x0"], A, b, 0.7, n_steps=n, method="sequential")
    assert a.shape == (N, D)
    np.testing.assert_allclose(a, q, rtol=1e-12, atol=1e-13)


def test_compose_affine_is_associative(x64):
  rng = np.random.default_rng(2)
  f, g, h = [(rng.normal(size=(D, D)), rng.normal(size=D)) for _ in range(3)]
  left = compose_affine(compose_affine(f, g), h)
  right = compose_affine(f, compose_affine(g, h))
  for a, b in zip(left, right):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
  x = rng.normal(size=D)
  U, c = compose_affine(f, g)
  np.testing.assert_allclose(U @ x + c, g[0] @ (f[0] @ x + f[1]) + g[1], rtol=1e-12)
  # Lists are arrays; a malformed pair or mismatched dimensions are named.
  U_l, c_l = compose_affine((np.eye(2).tolist(), [1.0, 2.0]), (np.eye(2).tolist(), [0.5, 0.5]))
  np.testing.assert_allclose(c_l, [1.5, 2.5])
  with pytest.raises(ValueError, match=r"later must be a pair \(U, c\)"):
    compose_affine((np.eye(2), np.ones(2)), np.eye(2))
  with pytest.raises(ValueError, match=r"earlier\[1\] \(c\) must have shape \(\.\.\., 2\)"):
    compose_affine((np.eye(2), np.ones(3)), (np.eye(2), np.ones(2)))
  with pytest.raises(ValueError, match="act on different dimensions"):
    compose_affine((np.eye(2), np.ones(2)), (np.eye(3), np.ones(3)))


def test_semigroup_property(x64):
  """For constant A, b: n steps of dt equal one free step of length n dt (QSF eq. 59)."""
  s = _seq(3)
  A, b, dt = s["A"][0], s["b"][0], 0.35
  means = chain_mean(s["x0"], A, b, dt, n_steps=N)
  for n in range(N):
    np.testing.assert_allclose(means[n], koopman_mean(A, b, s["x0"], (n + 1) * dt),
                               rtol=1e-11, atol=1e-12)
  U, c = step_maps(A, b, dt, n_steps=N)
  assert U.shape == (N, D, D) and c.shape == (N, D)
  np.testing.assert_allclose(U[2], sl.expm(A * dt), rtol=1e-12)


def test_chain_filter_with_zero_start_covariance_begins_with_propagate(x64):
  s = _seq(4)
  kw = dict(dt=0.9, sigma_m=0.7, sigma_K=1.2)
  st = chain_filter(s["x0"], s["A"], s["b"], s["y"], s["M"], **kw)
  assert st.mean.shape == (N, D) and st.precision.shape == (N, D, D)
  one = propagate(s["x0"], s["A"][0], s["b"][0], s["y"][0], s["M"], **kw)
  np.testing.assert_allclose(st.mean[0], one.mean, rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(st.precision[0], one.precision, rtol=1e-12)


@pytest.mark.parametrize("form", ["auto", "information"])
def test_chain_filter_matches_numpy_kalman_chain(x64, form):
  s = _seq(5)
  dt, sig, sK = 0.9, 0.7, 1.2
  P0 = np.diag([0.3, 0.1, 0.5])
  out = chain_filter_full(s["x0"], s["A"], s["b"], s["y"], s["M"], dt=dt, sigma_m=sig,
                          sigma_K=sK, P0=P0, form=form)
  m, P = s["x0"], P0
  for n in range(N):
    U, c, S = _np_step(s["A"][n], s["b"][n], dt, sK)
    m, P = _np_update(U @ m + c, U @ P @ U.T + S, s["y"][n], s["M"], dt / sig**2)
    np.testing.assert_allclose(out.mean[n], m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.covariance[n], P, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.precision[n], np.linalg.inv(P), rtol=1e-9)


def test_chain_filter_shares_one_generator_like_a_per_token_stack(x64):
  """One (d, d) generator for every token gives the chain of the stacked generators, in
  both chain modes; A is non-normal, so a transposed A would change its covariance."""
  s = _seq(7)
  A = s["A"][0]
  assert np.abs(A @ A.T - A.T @ A).max() > 0.1
  kw = dict(dt=0.7, sigma_m=0.7, sigma_K=1.2, P0=np.diag([0.3, 0.1, 0.5]))
  for mode in ("paper", "kalman_bucy"):
    shared = chain_filter_full(s["x0"], A, s["b"], s["y"], s["M"], mode=mode, **kw)
    tiled = chain_filter_full(s["x0"], np.broadcast_to(A, (N, D, D)), s["b"], s["y"], s["M"],
                              mode=mode, **kw)
    np.testing.assert_allclose(shared.mean, tiled.mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(shared.covariance, tiled.covariance, rtol=1e-12, atol=1e-13)


def test_chain_filter_without_measurement_is_free_chain(x64):
  s = _seq(6)
  dt, sK = 0.5, 0.8
  out = chain_filter_full(s["x0"], s["A"], s["b"], s["y"], s["M"], dt=dt, sigma_m=jnp.inf,
                          sigma_K=sK)
  np.testing.assert_allclose(out.mean, chain_mean(s["x0"], s["A"], s["b"], dt),
                             rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(out.log_normalizer, 0.0, atol=1e-13)
  P = np.zeros((D, D))
  for n in range(N):
    U, _, S = _np_step(s["A"][n], s["b"][n], dt, sK)
    P = U @ P @ U.T + S
  np.testing.assert_allclose(out.covariance[-1], P, rtol=1e-10)
  # d/dsigma_m at inf is 0, not 0 * inf = NaN
  for fn in (lambda sig: chain_measured_mean(s["x0"], s["A"], s["b"], s["y"], s["M"], dt=dt,
                                             sigma_m=sig, sigma_K=sK).sum(),
             lambda sig: chain_filter_full(s["x0"], s["A"], s["b"], s["y"], s["M"], dt=dt,
                                           sigma_m=sig, sigma_K=sK).log_normalizer.sum()):
    assert float(jax.grad(fn)(jnp.inf)) == 0.0


def test_exact_chain_composes_exactly(x64):
  """Kalman-Bucy tokens with a constant target compose into one long exact interval;
  the paper chain (one endpoint measurement per token) does not."""
  s = _seq(12)
  A, b, y = s["A"][0], s["b"][0], s["y"][0]
  kw = dict(sigma_m=0.8, sigma_K=1.1)
  chain = chain_filter_full(s["x0"], A, b, np.tile(y, (N, 1)), s["M"], dt=0.3,
                            mode="kalman_bucy", **kw)
  one = propagate_full(s["x0"], A, b, y, s["M"], dt=N * 0.3, mode="kalman_bucy", **kw)
  np.testing.assert_allclose(chain.mean[-1], one.mean, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(chain.covariance[-1], one.covariance, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(jnp.sum(chain.log_normalizer), one.log_normalizer, rtol=1e-10)
  paper = chain_filter(s["x0"], A, b, np.tile(y, (N, 1)), s["M"], dt=0.3, **kw)
  assert np.max(np.abs(np.asarray(paper.mean[-1]) - np.asarray(one.mean))) > 1e-2


@pytest.mark.parametrize("method", ["associative", "sequential"])
def test_measured_mean_chain_iterates_propagate(x64, method):
  s = _seq(7)
  kw = dict(dt=0.8, sigma_m=0.6, sigma_K=1.1)
  got = chain_measured_mean(s["x0"], s["A"], s["b"], s["y"], s["M"], method=method, **kw)
  x = s["x0"]
  for n in range(N):
    x = propagate(x, s["A"][n], s["b"][n], s["y"][n], s["M"], **kw).mean
    np.testing.assert_allclose(got[n], x, rtol=1e-11, atol=1e-12)


def test_chains_jit(x64):
  s = _seq(8)
  f = jax.jit(chain_mean, static_argnames=("method", "n_steps"))
  np.testing.assert_allclose(f(s["x0"], s["A"], s["b"], 0.7),
                             chain_mean(s["x0"], s["A"], s["b"], 0.7), rtol=1e-12)
  g = jax.jit(lambda y: chain_filter(s["x0"], s["A"], s["b"], y, s["M"]).mean)
  np.testing.assert_allclose(g(s["y"]), chain_filter(s["x0"], s["A"], s["b"], s["y"],
                                                     s["M"]).mean, rtol=1e-12)


def test_repeated_eager_chains_reuse_their_programs(x64):
  # New values, same shapes: no re-trace or re-lowering of the chains' scans.
  first, second = _seq(31), _seq(32)
  calls = {
      "mean_associative": lambda s: chain_mean(s["x0"], s["A"], s["b"], 0.7),
      "mean_sequential": lambda s: chain_mean(s["x0"], s["A"], s["b"], 0.7,
                                              method="sequential"),
      "measured_mean": lambda s: chain_measured_mean(s["x0"], s["A"], s["b"], s["y"], s["M"]),
      "filter_paper": lambda s: chain_filter_full(s["x0"], s["A"], s["b"], s["y"], s["M"]),
      "filter_exact": lambda s: chain_filter_full(s["x0"], s["A"], s["b"], s["y"], s["M"],
                                                  mode="kalman_bucy", n_sub=2),
  }
  for name, call in calls.items():
    a, _ = count_lowerings(lambda: call(first))
    b, lowered = count_lowerings(lambda: call(second))
    assert lowered == 0, (name, lowered)
    assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0]), name


def test_kalman_chain_still_importable_from_chain_module():
  # chain_filter(_full) moved to kalman_chain.py; code importing them from chain.py
  # (their home before) keeps working.
  from qsf_jax.physics.chain import chain_filter as cf, chain_filter_full as cff  # pylint: disable=g-import-not-at-top
  assert cf is chain_filter and cff is chain_filter_full
  import qsf_jax.physics.chain as chain_module  # pylint: disable=g-import-not-at-top
  with pytest.raises(AttributeError):
    chain_module.no_such_function  # pylint: disable=pointless-statement


def test_chain_bad_inputs():
  s = _seq(9)
  x0, A, b, y = s["x0"], s["A"], s["b"], s["y"]
  with pytest.raises(ValueError, match="inconsistent numbers of steps"):
    chain_mean(x0, A, np.zeros((N + 1, D)))
  with pytest.raises(ValueError, match="inconsistent numbers of steps"):
    chain_mean(x0, A, b, n_steps=N + 2)
  with pytest.raises(ValueError, match="n_steps is required"):
    chain_mean(x0, A[0], b[0])
  for bad in (2.5, True, "3"):  # not truncated or coerced to a length
    with pytest.raises(ValueError, match="n_steps must be an int"):
      chain_mean(x0, A[0], b[0], n_steps=bad)
  assert chain_mean(x0, A[0], b[0], n_steps=np.int64(2)).shape == (2, D)
  with pytest.raises(ValueError, match=r"A_seq must have 2 or 3 dimension\(s\).*jax.vmap"):
    chain_mean(x0, A[None], b)
  # a batch of start states: the error points to vmap (shape errors of other kinds do not)
  with pytest.raises(ValueError, match=rf"x0 must have shape \({D},\), got \(2, {D}\); "
                                       "for a batch, map over its leading axis with jax.vmap"):
    chain_mean(np.stack([x0, x0]), A, b)
  with pytest.raises(ValueError, match=r"x0 must have shape") as info:
    chain_mean(x0[:-1], A, b)
  assert "vmap" not in str(info.value)
  with pytest.raises(ValueError, match="A_seq must be a square matrix"):
    chain_mean(x0, A[:, :, :2], b)
  with pytest.raises(ValueError, match=r"b_seq must have shape \(\?, 3\)"):
    chain_mean(x0, A, np.zeros((N, 2)))
  with pytest.raises(ValueError, match=r"x0 must have shape \(3,\)"):
    chain_mean(np.zeros(2), A, b)
  # One measurement noise per chain: a (d,) sigma_m used to broadcast silently.
  for fn in (chain_measured_mean, chain_filter):
    with pytest.raises(ValueError, match=r"sigma_m must be a scalar, got shape \(3,\)"):
      fn(x0, A, b, y, sigma_m=np.array([0.5, 1.0, 2.0]))
  with pytest.raises(ValueError, match=r"sigma_m must be a scalar"):
    chain_filter(x0, A, b, y, sigma_m=np.ones(3), mode="kalman_bucy")
  nan_x0 = np.array([np.nan, 0.0, 0.0])
  with pytest.raises(ValueError, match="x0 must be finite"):
    chain_mean(nan_x0, A, b)
  with pytest.raises(ValueError, match="A_seq must be finite"):
    chain_mean(x0, np.where(A == A[0, 0, 0], np.nan, A), b)
  for fn in (chain_measured_mean, chain_filter):
    with pytest.raises(ValueError, match="x_tgt_seq must be finite"):
      fn(x0, A, b, np.where(y == y[0, 0], np.inf, y))
  # values under jit are traced and not checked (the documented price of trace-time checks)
  assert np.isnan(np.asarray(jax.jit(chain_mean)(jnp.asarray(nan_x0), A, b))).all(axis=1).any()
  with pytest.raises(ValueError, match="A_seq must be real"):
    chain_mean(x0, A * 1j, b)
  with pytest.raises(ValueError, match="method must be one of"):
    chain_mean(x0, A, b, method="parallel")
  with pytest.raises(ValueError, match=r"x_tgt_seq must have shape \(5, 3\)"):
    chain_filter(x0, A, b, np.zeros((N, 2)))
  with pytest.raises(ValueError, match="inconsistent numbers of steps"):
    chain_filter(x0, A, b, y[:3])
  with pytest.raises(ValueError, match=r"P0 must have shape \(3, 3\)"):
    chain_filter(x0, A, b, y, P0=np.eye(2))
  with pytest.raises(ValueError, match="P0 must be positive semi-definite"):
    chain_filter(x0, A, b, y, P0=-np.eye(3))
  with pytest.raises(ValueError, match="P0 must be a symmetric covariance"):
    chain_filter(x0, A, b, y, P0=np.eye(3) + np.triu(np.ones((3, 3)), 1))
  with pytest.raises(ValueError, match="P must be positive semi-definite"):
    kalman_bucy_step(x0, -np.eye(3), A[0], b[0], y[0], np.eye(3), dt=1.0, sigma_m=1.0,
                     sigma_K=1.0)
  with pytest.raises(ValueError, match=r"M must have shape \(3, 3\)"):
    chain_measured_mean(x0, A, b, y, np.eye(2))
  with pytest.raises(ValueError, match="sigma_m must be > 0"):
    chain_filter(x0, A, b, y, sigma_m=0.0)
  with pytest.raises(ValueError, match="mode must be one of"):
    chain_filter(x0, A, b, y, mode="exact")
  with pytest.raises(ValueError, match=r"c_ND must have shape \(5, 3\)"):
    scan_affine(x0, A, b[:4])


def _layer_setup(seed=10):
  rng = np.random.default_rng(seed)
  return rng.normal(size=D), rng.normal(size=D), rng.normal(size=D), \
      rng.normal(size=(D, D)) * 0.4 + np.eye(D)


def test_layer_continuous_variant_recovers_generator(x64):
  b, x0, y, W = _layer_setup()
  A = np.array([[-0.3, 0.9, 0.1], [-0.7, 0.2, 0.0], [0.2, -0.1, 0.4]])  # |Im eig| < pi
  K = sl.expm(A)
  A_rec, variant = layer_generator(K)
  assert variant == "continuous"
  np.testing.assert_allclose(A_rec, A, atol=1e-10)
  kw = dict(sigma_m=0.8, sigma_K=1.1)
  st, variant = propagate_layer(K, b, W, x0, y, **kw)
  assert variant == "continuous"
  ref = propagate(x0, A, continuous_bias(A, b), y, W, dt=1.0, **kw)
  np.testing.assert_allclose(st.mean, ref.mean, rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(st.precision, ref.precision, rtol=1e-9)
  # Without measurement the prior mean is the layer's own map K x0 + b.
  free, _ = propagate_layer(K, b, W, x0, y, sigma_m=jnp.inf, sigma_K=1.1)
  np.testing.assert_allclose(free.mean, K @ x0 + b, rtol=1e-10, atol=1e-12)
  exact, variant = propagate_layer(K, b, W, x0, y, mode="kalman_bucy", **kw)
  assert variant == "continuous" and np.all(np.isfinite(np.asarray(exact.mean)))
  assert np.max(np.abs(np.asarray(exact.mean) - np.asarray(st.mean))) > 1e-3


def test_layer_discrete_variant(x64):
  b, x0, y, W = _layer_setup(11)
  Q = np.random.default_rng(12).normal(size=(D, D))
  K = Q @ np.diag([-0.5, 0.8, 1.3]) @ np.linalg.inv(Q)  # a negative real eigenvalue
  sig, sK = 0.8, 1.1
  st, variant = propagate_layer(K, b, W, x0, y, sigma_m=sig, sigma_K=sK)
  assert variant == "discrete"
  mu, P = _np_update(K @ x0 + b, sK**2 * np.eye(D), y, W, 1 / sig**2)
  np.testing.assert_allclose(st.mean, mu, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(st.precision, np.linalg.inv(P), rtol=1e-10)
  # A singular K, and a rotation by pi (eigenvalues -1, -1), have no real logarithm either.
  assert layer_generator(np.diag([0.0, 1.0, 2.0]))[1] == "discrete"
  rot = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
  assert layer_generator(rot) == (None, "discrete")
  assert propagate_layer(rot, b, None, x0, y)[1] == "discrete"


def test_layer_bad_inputs():
  b, x0, y, W = _layer_setup()
  with pytest.raises(ValueError, match="K must be a square matrix"):
    propagate_layer(np.zeros((3, 2)), b, W, x0, y)
  with pytest.raises(ValueError, match=r"W_V must have shape \(3, 3\)"):
    propagate_layer(np.eye(3), b, np.eye(2), x0, y)
  with pytest.raises(ValueError, match="K must be real"):
    propagate_layer(np.eye(3) * 1j, b, W, x0, y)
  with pytest.raises(ValueError, match="mode must be one of"):
    propagate_layer(np.eye(3), b, W, x0, y, mode="exact")


def test_continuous_bias_checks_its_arguments(x64):
  A = -np.eye(2) + 0.1 * np.array([[0.0, 1.0], [-1.0, 0.0]])
  # Lists are arrays; the time-1 flow of b_c adds b (QSF eq. 58).
  b_c = continuous_bias(A.tolist(), [1.0, 2.0])
  np.testing.assert_allclose(koopman_mean(A, b_c, np.zeros(2), 1.0), [1.0, 2.0], atol=1e-12)
  with pytest.raises(ValueError, match=r"b must have shape \(2,\), got \(2, 2\)"):
    continuous_bias(A, np.zeros((2, 2)))  # used to return a (2, 2) array
  with pytest.raises(ValueError, match="A must have 2 dimensions.*jax.vmap"):
    continuous_bias(np.stack([A, A]), np.zeros(2))
  with pytest.raises(ValueError, match="A must be finite"):
    continuous_bias(np.full((2, 2), np.nan), np.zeros(2))
