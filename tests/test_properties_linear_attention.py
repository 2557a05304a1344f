"""Property-based tests of causal linear attention (kernels spec §1.1, §1.2, §5.1), float64.

  o_t = sum_{s<=t} exp(G_t - G_s)(q_t . k_s) v_s + q_t^T exp(G_t) S_0,   G_t = sum_{r<=t} g_r.

The impls "reference" (masked O(T^2)), "scan" (token recurrence) and "xla"
(chunked) must agree for any T (1, below, at and across chunk boundaries), any
per-step decay g <= 0 (no decay, mild, strong, a full reset g = -inf) and any
initial state; chunked prefill (return_final_state, then continuing from S_T)
must equal one call.

Tolerance: every term has a weight 0 <= exp(G_t - G_s) <= 1. Each impl sums the
exponent directly over at most T terms (no difference of cumsums), so a weight
w = e^{-x} carries an absolute error <= w T eps x <= T eps; each output sums at most
T + 1 terms of Dk-term dot products. So |o_t - o_t'| <= 2 (T + Dk + 4) eps bound_t with
bound_t = sum_{s<=t} ||q_t|| ||k_s|| ||v_s||_inf + ||q_t|| ||S_0||_2 (x2: both sides
are computed); likewise for S_T with ||k_s|| ||v_s|| + ||S_0||.
"""

import warnings

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsf_jax.kernels import linear_attention

pytestmark = pytest.mark.usefixtures("fast_compiles")  # small arrays: compile time dominates

settings.register_profile("qsf_properties", derandomize=True, deadline=None,
                          max_examples=25, database=None, print_blob=True)
PROPS = settings.get_profile("qsf_properties")

EPS = float(np.finfo(np.float64).eps)
B, H, DK, DV = 1, 2, 3, 2
CHUNK = 8
# T = 1; T < C; T = 2C (a multiple); T = 2C + 3 (padded last chunk).
TS = (1, 5, 16, 19)

# One log-decay value: none, mild, strong (the weight underflows within a step or
# two), or a full reset.
decays = st.one_of(st.just(0.0), st.floats(-2.0, 0.0), st.floats(-1000.0, -20.0),
                   st.just(-np.inf))


@st.composite
def problems(draw, Ts=TS):
  """(q, k, v, g, S_0): T drawn from the fixed set ``Ts``; q, k, v, S_0 Gaussian
  (seeded), g drawn value by value from ``decays`` (B, T, H); S_0 None or not."""
  T = draw(st.sampled_from(Ts))
  seed = draw(st.integers(0, 2**32 - 1))
  g = np.array(draw(st.lists(decays, min_size=B * T * H, max_size=B * T * H)))
  g = g.reshape(B, T, H)
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, H, DK))
  k = rng.standard_normal((B, T, H, DK))
  v = rng.standard_normal((B, T, H, DV))
  S0 = rng.standard_normal((B, H, DK, DV)) if draw(st.booleans()) else None
  return q, k, v, g, S0


def _bounds(q, k, v, S0):
  """(bound_t (B, T, H), bound_S (B, H)): see the module docstring."""
  nq = np.linalg.norm(q, axis=-1)                       # (B, T, H)
  kv = np.linalg.norm(k, axis=-1) * np.max(np.abs(v), axis=-1)
  nS = 0.0 if S0 is None else np.linalg.norm(S0, 2, axis=(-2, -1))[:, None, :]
  bound_t = nq * (np.cumsum(kv, axis=1) + nS)
  kvf = np.linalg.norm(k, axis=-1) * np.linalg.norm(v, axis=-1)
  bound_S = np.sum(kvf, axis=1) + (0.0 if S0 is None else np.linalg.norm(S0, 2, axis=(-2, -1)))
  return bound_t, bound_S


def _check_close(o, o_ref, S, S_ref, q, k, v, S0):
  T = q.shape[1]
  gam = 2.0 * (T + DK + 4) * EPS
  bound_t, bound_S = _bounds(q, k, v, S0)
  err_o = np.max(np.abs(np.asarray(o) - np.asarray(o_ref)), axis=-1)   # (B, T, H)
  assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(S)))
  assert np.all(err_o <= gam * bound_t), np.max(err_o / (gam * bound_t))
  err_S = np.max(np.abs(np.asarray(S) - np.asarray(S_ref)), axis=(-2, -1))  # (B, H)
  assert np.all(err_S <= gam * bound_S), np.max(err_S / (gam * bound_S))


@PROPS
@given(p=problems(), impl=st.sampled_from(["xla", "scan"]))
def test_impls_agree_with_the_reference(p, impl):
  q, k, v, g, S0 = p
  with jax.enable_x64(True):
    o_ref, S_ref = linear_attention(q, k, v, g, initial_state=S0, return_final_state=True,
                                    impl="reference")
    o, S = linear_attention(q, k, v, g, initial_state=S0, return_final_state=True,
                            impl=impl, chunk_size=CHUNK)
  assert o.dtype == np.float64 and S.dtype == np.float64
  _check_close(o, o_ref, S, S_ref, q, k, v, S0)


# Split points: inside the first chunk, at a chunk boundary, and inside the second
# chunk. An empty part (m = 0 or m = T) is outside the op's domain (it refuses
# T = 0 by contract), so 1 <= m <= T - 1, and T = 1 is not split.
SPLITS = (1, 3, CHUNK, CHUNK + 3)


@PROPS
@given(p=problems(Ts=TS[1:]), split=st.sampled_from(SPLITS),
       impl=st.sampled_from(["xla", "scan"]))
def test_chunked_prefill_equals_one_call(p, split, impl):
  """linear_attention(x[:m]) then linear_attention(x[m:], initial_state=S_m) == one call."""
  q, k, v, g, S0 = p
  T = q.shape[1]
  m = min(split, T - 1)
  with jax.enable_x64(True):
    o_all, S_all = linear_attention(q, k, v, g, initial_state=S0, return_final_state=True,
                                    impl=impl, chunk_size=CHUNK)
    o1, S1 = linear_attention(q[:, :m], k[:, :m], v[:, :m], g[:, :m], initial_state=S0,
                              return_final_state=True, impl=impl, chunk_size=CHUNK)
    o2, S2 = linear_attention(q[:, m:], k[:, m:], v[:, m:], g[:, m:], initial_state=S1,
                              return_final_state=True, impl=impl, chunk_size=CHUNK)
  o = np.concatenate([np.asarray(o1), np.asarray(o2)], axis=1)
  _check_close(o, o_all, S2, S_all, q, k, v, S0)


@PROPS
@given(g_pos=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
       g_neg=st.floats(min_value=-np.finfo(np.float64).max, max_value=0.0))
def test_log_decay_domain_check_in_the_inputs_precision(g_pos, g_neg):
  """Every positive float64 log-decay is refused (the domain is g <= 0), and every
  finite g <= 0 is accepted without a warning: the check compares the values as
  given, not rounded to float32 (where 1e-300 is 0 and -1e308 overflows)."""
  q = np.ones((1, 2, 1, 2))
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match="log_decay must be <= 0.*1 positive"):
      linear_attention(q, q, q, np.array([g_pos, g_neg]).reshape(1, 2, 1), impl="reference")
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      o = linear_attention(q, q, q, np.array([g_neg, 0.0]).reshape(1, 2, 1), impl="reference")
  assert np.all(np.isfinite(np.asarray(o)))


def test_log_decay_below_float32_resolution_is_refused_when_positive():
  """Regression: g = 1e-300 > 0 (float64) was accepted, rounded to 0 by a float32 cast,
  and g = -1e308 raised an overflow RuntimeWarning in that cast."""
  q = np.ones((1, 2, 1, 2))
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match="log_decay must be <= 0.*1 positive"):
      linear_attention(q, q, q, np.array([1e-300, 0.0]).reshape(1, 2, 1), impl="reference")
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      linear_attention(q, q, q, np.array([-1e308, 0.0]).reshape(1, 2, 1), impl="reference")
