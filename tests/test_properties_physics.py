"""Property-based tests of the QSF physics core (QSF eqs. 1, 16-20, 56-59, §2.2, §6.8), float64.

Inputs are drawn with ``hypothesis`` from strategies that are well-posed by
construction (stated at each strategy); tolerances are eps times a bound computed
from the drawn input (a norm, a condition number), never a tuned constant.
Shapes are fixed (d = 3; chains of 1 or 5 steps): each new shape compiles anew.
"""

import jax
import numpy as np
import pytest
import scipy.linalg as sl
from hypothesis import given, settings
from hypothesis import strategies as st

from qsf_jax.physics import chain as ch
from qsf_jax.physics import generators as gen
from qsf_jax.physics.propagate import measurement_update, propagate, propagate_full
from qsf_jax.physics import spectral as sp

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small arrays: compile time dominates

settings.register_profile("qsf_properties", derandomize=True, deadline=None,
                          max_examples=25, database=None, print_blob=True)
PROPS = settings.get_profile("qsf_properties")

EPS = float(np.finfo(np.float64).eps)
D = 3

seeds = st.integers(0, 2**32 - 1)


def _n2(x):
  return float(np.linalg.norm(np.asarray(x), 2))


def _maxabs(x, y=0.0):
  return float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))


def _generator(rng, radius, shift):
  """A real generator with ||A||_2 = radius + |shift| at most: a random matrix scaled
  to ||R||_2 = radius, minus shift * I (shift > 0 makes A stable when shift > radius)."""
  R = rng.standard_normal((D, D))
  return radius * R / _n2(R) - shift * np.eye(D)


def _expm_tol(norm_At):
  """Forward error bound of a scaling-and-squaring exponential (Higham 2005): the
  backward error ||E|| <= eps ||A t|| (Pade degree chosen for that), and
  ||e^{A t + E} - e^{A t}|| <= ||E|| e^{||A t||} e^{||E||}; 10x for the squarings'
  own rounding (log2 of the norm, at most a few here) and the matrix products."""
  return 10.0 * EPS * max(norm_At, 1.0) * np.exp(norm_At)


# --- Generator split (QSF eq. 1, §6.8 check 1) ----------------------------------------------

@PROPS
@given(seed=seeds, complex_a=st.booleans(), log_scale=st.floats(-3.0, 3.0))
def test_decompose_generator_reconstructs_a(seed, complex_a, log_scale):
  """A = -iH + D with H = H^dagger and D = D^dagger exactly (both built from A and
  A^dagger by exact operations: a negation, a conjugation, a halving), and the
  reconstruction to one rounding of each sum: 2 eps |A|_max."""
  rng = np.random.default_rng(seed)
  A = 10.0**log_scale * rng.standard_normal((2, D, D))
  if complex_a:
    A = A + 1j * 10.0**log_scale * rng.standard_normal((2, D, D))
  with jax.enable_x64(True):
    H, Dm = (np.asarray(x) for x in gen.decompose_generator(A))
  assert _maxabs(H, np.conj(np.swapaxes(H, -1, -2))) == 0.0
  assert _maxabs(Dm, np.conj(np.swapaxes(Dm, -1, -2))) == 0.0
  if not complex_a:
    assert Dm.dtype == np.float64
  assert _maxabs(-1j * H + Dm, A) <= 4 * EPS * np.max(np.abs(A))


# --- Free Koopman flow (QSF eq. 58) ----------------------------------------------------------

@PROPS
@given(seed=seeds, radius=st.floats(0.0, 2.0), shift=st.floats(-1.0, 2.0),
       s=st.floats(0.05, 1.0), t=st.floats(0.05, 1.0))
def test_koopman_affine_has_the_flow_property(seed, radius, shift, s, t):
  """(Phi, c)(s + t) = (Phi, c)(t) o (Phi, c)(s): e^{A(s+t)} = e^{At} e^{As} and
  c(s+t) = e^{At} c(s) + c(t); koopman_mean composes over two steps likewise.

  Strategy: ||A||_2 <= 4 and s, t <= 1, so ||aug (s+t)|| <= 2 (4 + ||b||) stays in the
  range where the exponential is accurate to ``_expm_tol``.
  """
  rng = np.random.default_rng(seed)
  A = _generator(rng, radius, shift)
  b = rng.standard_normal(D)
  x0 = rng.standard_normal(D)
  with jax.enable_x64(True):
    Phi_s, c_s = (np.asarray(a) for a in gen.koopman_affine(A, b, s))
    Phi_t, c_t = (np.asarray(a) for a in gen.koopman_affine(A, b, t))
    Phi_st, c_st = (np.asarray(a) for a in gen.koopman_affine(A, b, s + t))
    mean_two = np.asarray(gen.koopman_mean(A, b, gen.koopman_mean(A, b, x0, s), t))
    mean_one = np.asarray(gen.koopman_mean(A, b, x0, s + t))
  # Each affine map is a block of expm([[A, b], [0, 0]] tau): its error bound applies to
  # Phi and c alike; a product of two computed maps adds the errors, scaled by the norms.
  norm_aug = max(_n2(A), np.linalg.norm(b)) * 2.0
  e = _expm_tol(norm_aug * (s + t))
  scale = max(1.0, _n2(Phi_t)) * max(1.0, _n2(Phi_s), np.linalg.norm(c_s))
  assert _maxabs(Phi_t @ Phi_s, Phi_st) <= 3 * e * scale
  assert _maxabs(Phi_t @ c_s + c_t, c_st) <= 3 * e * scale
  assert _maxabs(mean_two, mean_one) <= 3 * e * scale * max(1.0, np.linalg.norm(x0))


@PROPS
@given(seed=seeds, radius=st.floats(0.0, 2.0), excess=st.floats(0.0, 1.0),
       s=st.floats(0.05, 1.0), t=st.floats(0.05, 1.0))
def test_koopman_cov_has_the_semigroup_property(seed, radius, excess, s, t):
  """Sigma(s + t) = Sigma(t) + e^{A t} Sigma(s) e^{A^T t} (the Lyapunov flow; sigma_K = 1).

  Strategy: A = R - (radius + excess) I with ||R||_2 = radius, so the logarithmic norm
  of A is <= -excess <= 0 and ||e^{A tau}|| <= 1: the flow contracts, and no rounding
  error made along the doubling is amplified. Tolerance: Van Loan's block gives
  Sigma(h) to eps (||A||_1 h + h)/h relative, i.e. eps (1 + ||A||_1); each of the
  k + 1 doublings adds d eps ||Sigma||; k = ceil(log2(2 ||A||_1 tau)) as in
  ``koopman_cov``; three computed covariances and one exponential are compared.
  """
  rng = np.random.default_rng(seed)
  A = _generator(rng, radius, radius + excess)
  with jax.enable_x64(True):
    S_s, S_t, S_st = (np.asarray(gen.koopman_cov(A, 1.0, tau)) for tau in (s, t, s + t))
    E_t = np.asarray(gen.koopman_affine(A, np.zeros(D), t)[0])
  n1 = np.max(np.sum(np.abs(A), axis=0))
  k = max(0, int(np.ceil(np.log2(max(2 * n1 * (s + t), 1.0)))))
  tol = 10.0 * (k + 2) * D * EPS * (1.0 + n1) * _n2(S_st)
  tol += 2 * _expm_tol(_n2(A) * t) * _n2(S_s)
  err = _maxabs(S_st, S_t + E_t @ S_s @ E_t.T)
  assert err <= 3 * tol, (err, tol)
  assert np.linalg.eigvalsh(S_st).min() > 0


@PROPS
@given(seed=seeds, radius=st.floats(0.0, 2.5), shift=st.floats(-1.0, 1.0),
       dt=st.sampled_from([0.5, 1.0]))
def test_koopman_generator_inverts_the_exponential(seed, radius, shift, dt):
  """koopman_generator(expm(A dt), dt) == A, with a real logarithm (D17).

  Strategy: A dt = R - shift I with ||R||_2 = radius <= 2.5 < pi and a real shift, so
  every eigenvalue of A dt has |Im| <= ||R||_2 < pi and the principal logarithm of
  e^{A dt} is A dt itself; K = e^{A dt} has no eigenvalue on (-inf, 0]. Tolerance: the logarithm's absolute condition number is ||L_exp(A dt)^{-1}||_2,
  the inverse of the exponential's Frechet derivative (computed below in Kronecker
  form), times the perturbation of K: the exponential's and the logarithm's errors,
  each ``_expm_tol``-sized relative to ||K||.
  """
  rng = np.random.default_rng(seed)
  A = _generator(rng, radius / dt, shift / dt)
  X = A * dt
  K = sl.expm(X)
  A2, info = sp.koopman_generator(K, dt)
  L = np.zeros((D * D, D * D))
  for j in range(D * D):
    E = np.zeros(D * D)
    E[j] = 1.0
    L[:, j] = sl.expm_frechet(X, E.reshape(D, D), compute_expm=False).ravel()
  cond_log = 1.0 / np.linalg.svd(L, compute_uv=False).min()
  tol = cond_log * 2 * _expm_tol(_n2(X)) * max(1.0, _n2(K)) / dt
  assert info["logm_real"] and info["nonpositive_real_eigenvalues"] == 0
  assert A2.dtype == np.float64
  assert _maxabs(A2, A) <= tol, (_maxabs(A2, A), tol)


# --- Propagator (QSF eqs. 16-20, 56-58; §6.8 checks 4, 5) -----------------------------------

def _spd(rng, log_kappa):
  """An SPD matrix with eigenvalues log-uniform in [1, 10^log_kappa] (condition number
  at most 10^log_kappa) in a random orthonormal basis."""
  Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
  lam = 10.0 ** (log_kappa * rng.uniform(size=D))
  S = (Q * lam) @ Q.T
  return 0.5 * (S + S.T)


@PROPS
@given(seed=seeds, log_kappa=st.floats(0.0, 4.0), log_r=st.floats(-4.0, 2.0))
def test_measurement_update_gain_form_equals_information_form(seed, log_kappa, log_r):
  """Gain form (QSF eq. 20) == information form (QSF eqs. 16-19): mean, covariance,
  precision and log-normaliser.

  Strategy: Sigma_0 SPD with kappa <= 1e4, M = I + N(0, 1/4) (well conditioned),
  r in [1e-4, 1e2]. Tolerance: the information form inverts Sigma_0 and Lambda
  (Cholesky: forward errors ~ d eps kappa each), the gain form solves with
  B = r M Sigma_0 M^T + I (kappa(B)); errors add and are scaled by the size of the
  compared quantity.
  """
  rng = np.random.default_rng(seed)
  S0 = _spd(rng, log_kappa)
  mu0, y = rng.standard_normal(D), rng.standard_normal(D)
  M = np.eye(D) + 0.5 * rng.standard_normal((D, D))
  r = 10.0**log_r
  with jax.enable_x64(True):
    g = measurement_update(mu0, S0, y, M, r, form="gain")
    i = measurement_update(mu0, S0, y, M, r, form="information")
  Lam = np.linalg.inv(S0) + r * M.T @ M
  B = r * M @ S0 @ M.T + np.eye(D)
  kappa = np.linalg.cond(S0) + np.linalg.cond(Lam) + np.linalg.cond(B)
  tol = 10.0 * D * EPS * kappa
  P = np.asarray(i.covariance)
  assert _maxabs(g.mean, i.mean) <= tol * max(np.linalg.norm(mu0), np.linalg.norm(y)) * (
      1 + r * _n2(M) * _n2(S0) * _n2(M))
  assert _maxabs(g.covariance, P) <= tol * _n2(P)
  assert _maxabs(g.precision, i.precision) <= tol * _n2(i.precision)
  quad = 1.0 + np.linalg.norm(mu0) ** 2 * _n2(np.linalg.inv(S0)) + r * np.linalg.norm(y) ** 2
  assert abs(float(g.log_normalizer) - float(i.log_normalizer)) <= tol * quad


@PROPS
@given(seed=seeds, radius=st.floats(0.0, 2.0), shift=st.floats(0.5, 3.0),
       log_sigma_m=st.floats(-1.0, 1.0), log_dt=st.floats(-2.0, 0.5),
       form=st.sampled_from(["gain", "information"]))
def test_propagate_full_covariance_is_symmetric_psd_and_inverts_the_precision(
    seed, radius, shift, log_sigma_m, log_dt, form):
  """P = P^T, P >= 0 (eigenvalues >= -d eps ||P||), Lambda = Lambda^T and
  P Lambda = I to d eps kappa(P).

  Strategy: ||A||_2 <= 2 + shift and dt <= 3: Sigma_K is finite, and SPD with a
  condition number bounded by e^{2 ||A|| dt} / (1 - e^{-2...}) (computed below).
  """
  rng = np.random.default_rng(seed)
  A = _generator(rng, radius, shift)
  b, x0, y = (rng.standard_normal(D) for _ in range(3))
  M = np.eye(D) + 0.5 * rng.standard_normal((D, D))
  dt = 10.0**log_dt
  with jax.enable_x64(True):
    out = propagate_full(x0, A, b, y, M, dt=dt, sigma_m=10.0**log_sigma_m, form=form)
    state = propagate(x0, A, b, y, M, dt=dt, sigma_m=10.0**log_sigma_m, form=form)
  P, Lam = np.asarray(out.covariance), np.asarray(out.precision)
  assert _maxabs(P, P.T) == 0.0 and _maxabs(Lam, Lam.T) == 0.0
  assert np.linalg.eigvalsh(P).min() >= -D * EPS * _n2(P)
  assert _maxabs(P @ Lam, np.eye(D)) <= 10 * D * EPS * np.linalg.cond(P)
  assert _maxabs(state.mean, out.mean) == 0.0 and _maxabs(state.precision, Lam) == 0.0


@PROPS
@given(seed=seeds, radius=st.floats(0.0, 2.0), shift=st.floats(0.5, 3.0),
       log_sigma_m=st.floats(4.0, 8.0), log_dt=st.floats(-2.0, 0.5))
def test_propagator_tends_to_the_free_koopman_propagator_as_sigma_m_grows(
    seed, radius, shift, log_sigma_m, log_dt):
  """sigma_m -> inf: mu -> mu_K, Lambda -> Sigma_K^{-1} (QSF §6.8 check 5); sigma_m = inf
  gives them exactly.

  The rate is that of the measurement precision r = dt / sigma_m^2:
  mu - mu_K = G e with G = r Sigma_K M^T (r M Sigma_K M^T + I)^{-1}, ||G|| <= r ||Sigma_K|| ||M||,
  e = x_tgt - M mu_K; Lambda - Sigma_K^{-1} = r M^T M. Plus rounding: d eps kappa(Sigma_K)
  relative (the covariance is inverted for the precision).
  """
  rng = np.random.default_rng(seed)
  A = _generator(rng, radius, shift)
  b, x0, y = (rng.standard_normal(D) for _ in range(3))
  M = np.eye(D) + 0.5 * rng.standard_normal((D, D))
  dt, sigma_m = 10.0**log_dt, 10.0**log_sigma_m
  with jax.enable_x64(True):
    out = propagate_full(x0, A, b, y, M, dt=dt, sigma_m=sigma_m)
    free = propagate_full(x0, A, b, y, M, dt=dt, sigma_m=np.inf)
    mu_K = np.asarray(gen.koopman_mean(A, b, x0, dt))
    S_K = np.asarray(gen.koopman_cov(A, 1.0, dt))
  r = dt / sigma_m**2
  kappa = np.linalg.cond(S_K)
  e = np.linalg.norm(y - M @ mu_K)
  assert _maxabs(free.mean, mu_K) <= 10 * D * EPS * max(1.0, np.linalg.norm(mu_K))
  assert _maxabs(free.covariance, S_K) <= 10 * D * EPS * _n2(S_K)
  assert _maxabs(out.mean, mu_K) <= (r * _n2(S_K) * _n2(M) * e
                                     + 10 * D * EPS * kappa * max(1.0, np.linalg.norm(mu_K)))
  Lam_K = np.linalg.inv(S_K)
  assert _maxabs(out.precision, Lam_K) <= (r * _n2(M.T @ M)
                                           + 10 * D * EPS * kappa * _n2(Lam_K))


# --- Chain (QSF eq. 59, §6.8 check 13) ------------------------------------------------------

@PROPS
@given(seed=seeds, radius=st.floats(0.0, 2.0), shift=st.floats(-0.5, 2.0),
       n=st.sampled_from([1, 5]), shared=st.booleans())
def test_chain_mean_associative_equals_sequential(seed, radius, shift, n, shared):
  """The parallel prefix (associativity of compose_affine) equals step-by-step iteration.

  Tolerance: both sides are sums of products of the same maps in different orders;
  each product of m factors carries ~m d eps relative error, scaled by the largest
  partial product norm B = max_{i<=j} ||U_j ... U_i|| times (|x0| + sum |c_n|).
  """
  rng = np.random.default_rng(seed)
  if shared:
    A_seq, b_seq = _generator(rng, radius, shift), rng.standard_normal(D)
  else:
    A_seq = np.stack([_generator(rng, radius, shift) for _ in range(n)])
    b_seq = rng.standard_normal((n, D))
  x0 = rng.standard_normal(D)
  kw = dict(n_steps=n) if shared else {}
  with jax.enable_x64(True):
    par = np.asarray(ch.chain_mean(x0, A_seq, b_seq, 0.5, method="associative", **kw))
    seq = np.asarray(ch.chain_mean(x0, A_seq, b_seq, 0.5, method="sequential", **kw))
    U, c = (np.asarray(a) for a in ch.step_maps(A_seq, b_seq, 0.5, **kw))
  assert par.shape == seq.shape == (n, D)
  Bmax = 1.0
  for i in range(n):
    P = np.eye(D)
    for j in range(i, n):
      P = U[j] @ P
      Bmax = max(Bmax, _n2(P))
  tol = 10.0 * n * D * EPS * Bmax * (np.linalg.norm(x0) + np.sum(np.linalg.norm(c, axis=-1)))
  assert _maxabs(par, seq) <= tol
  # and the sequential chain is the iterated affine map
  x = x0
  for j in range(n):
    x = U[j] @ x + c[j]
    assert _maxabs(seq[j], x) <= tol


# --- Spectral budget (QSF §2.2, eqs. 6-9, D17, D18; §6.8 check 2) ---------------------------

@PROPS
@given(seed=seeds, radius=st.floats(0.0, 2.0), shift=st.floats(-1.0, 1.0),
       tol=st.sampled_from([0.0, 1e-2, 0.5]), dt=st.sampled_from([0.5, 1.0]))
def test_spectral_analysis_trace_identity_and_class_counts(seed, radius, shift, tol, dt):
  """sum_k gamma_k = ln|det K| / dt = Tr A (K = e^{A dt}); class counts sum to d;
  Gamma_growth - Gamma_decay = Gamma_net; the class sums add up to Gamma_net.

  Strategy: K = expm(A dt) with ||A|| <= 3, so K is invertible (det K = e^{Tr A dt}).
  Tolerance: ln|lambda_k| is accurate to eps ||K|| c_k / |lambda_k| (Wilkinson; c_k the
  eigenvalue condition number from left and right eigenvectors), slogdet to
  d eps kappa(K); the exponential to ``_expm_tol`` relative to ||K||, i.e. a change of
  ln det K of at most d kappa(K) times that.
  """
  rng = np.random.default_rng(seed)
  A = _generator(rng, radius, shift)
  K = sl.expm(A * dt)
  Ks = [K, K @ K]  # layers e^{A dt} and e^{2 A dt} (the latter to rounding of one product)
  rep = sp.spectral_analysis(Ks, tol=tol, dt=dt)
  expm_abs = _expm_tol(_n2(A) * dt)  # ||K_computed - e^{A dt}||
  total = 0.0
  for rec, Kl, mult in zip(rep["layers"], Ks, (1, 2)):
    assert sum(rec["counts"].values()) == D
    for counts in rec["counts_by_tol"].values():
      assert sum(counts.values()) == D
    lam, vl, vr = sl.eig(Kl, left=True, right=True)
    cond_k = 1.0 / np.abs(np.sum(vl.conj() * vr, axis=0))  # vl, vr have unit columns
    eig_err = 10.0 * EPS * _n2(Kl) * np.sum(cond_k / np.abs(lam))
    Kinv = _n2(np.linalg.inv(Kl))
    slog_err = 10.0 * D * EPS * _n2(Kl) * Kinv
    # |d ln det K| <= d ||K^{-1}|| ||dK||: dK the exponential's error, times mult for K^2
    # (plus the product's rounding d eps ||K||^2).
    exp_err = D * Kinv * mult * (expm_abs * _n2(K) + D * EPS * _n2(K) ** 2)
    gn, ref = rec["gamma_net"], mult * np.trace(A)
    assert abs(gn - ref) <= (eig_err + exp_err) / dt, (gn, ref)
    assert abs(rec["slogdet_gamma_net"] - ref) <= (slog_err + exp_err) / dt
    total += (eig_err + exp_err) / dt
    g_abs = np.sum(np.abs(rec["gamma"]))
    assert abs(rec["gamma_growth"] - rec["gamma_decay"] - gn) <= 4 * D * EPS * g_abs
    assert abs(sum(rec["gamma_by_class"].values()) - gn) <= 4 * D * EPS * g_abs
  assert sum(rep["counts"].values()) == 2 * D
  assert rep["n_eigenvalues"] == 2 * D
  assert abs(rep["gamma_net"] - 3 * np.trace(A)) <= total


@PROPS
@given(seed=seeds, log_scale=st.floats(-3.0, 3.0), dt=st.sampled_from([0.5, 1.0]))
def test_spectral_trace_identity_for_any_invertible_k(seed, log_scale, dt):
  """sum_k ln|lambda_k| = ln|det K| for any real K (negative and complex eigenvalues
  included; D17 uses |lambda| only), and the report flags it consistent.

  Strategy: Gaussian K scaled by 10^log_scale: invertible with probability 1, with
  real negative eigenvalues for about half the draws. Tolerance: Wilkinson's
  eigenvalue bound eps ||K|| c_k / |lambda_k| per log, and d eps kappa(K) for slogdet.
  """
  rng = np.random.default_rng(seed)
  K = 10.0**log_scale * rng.standard_normal((D, D))
  rep = sp.spectral_analysis([K], dt=dt)
  lam, vl, vr = sl.eig(K, left=True, right=True)
  cond_k = 1.0 / np.abs(np.sum(vl.conj() * vr, axis=0))
  tol = (10.0 * EPS * _n2(K) * np.sum(cond_k / np.abs(lam))
         + 10.0 * D * EPS * np.linalg.cond(K)) / dt
  assert abs(rep["gamma_net"] - np.linalg.slogdet(K)[1] / dt) <= tol
  assert abs(rep["slogdet_gamma_net"] - np.linalg.slogdet(K)[1] / dt) <= tol
  assert sum(rep["counts"].values()) == D
  # the documented acceptance rule: |difference| <= slogdet_rtol (1e-6) max(1, sum |gamma|)
  g_abs = float(np.sum(np.abs(rep["layers"][0]["gamma"])))
  assert rep["slogdet_consistent"] == (
      abs(rep["gamma_net"] - rep["slogdet_gamma_net"]) <= 1e-6 * max(1.0, g_abs))
