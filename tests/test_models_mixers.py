"""Token mixers against float64 NumPy: the GLA layer and the S2-c recurrent Koopman mixer.

The decode-equals-full-forward checks elsewhere compare two paths that share these
formulas; here each layer is computed independently from its docstring's equations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.models import get_config
from qsf_jax.models.gla import GatedLinearAttention
from qsf_jax.models.koopman import Koopman, frobenius_clamp, koopman_matrices

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _np(x):
  return np.asarray(x, np.float64)


def _perturbed(params, seed, scale):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def test_gla_layer_matches_its_equations():
  """g_t = log sigmoid(u w_g + c_g) / tau;  S_t = e^{g_t} S_{t-1} + k_t v_t^T;
  o_t = S_t^T q_t / sqrt(d_h);  y_t = W_O [RMSNorm_head(o_t) * swish(u W_R + c_R)] + c_O."""
  cfg = get_config("gla", "tiny")
  B, T, d, H, Dh = 2, 11, cfg.d_model, cfg.n_heads, cfg.head_dim
  u = jax.random.normal(jax.random.key(0), (B, T, d))
  layer = GatedLinearAttention(cfg)
  params = _perturbed(layer.init(jax.random.key(1), u)["params"], 2, 0.2)
  y = layer.apply({"params": params}, u)
  p = jax.tree.map(_np, params)
  un = _np(u)
  heads = lambda x: x.reshape(B, T, H, Dh)
  q = heads(un @ p["query"]["kernel"]) / np.sqrt(Dh)
  k, v = heads(un @ p["key"]["kernel"]), heads(un @ p["value"]["kernel"])
  x = un @ p["gate"]["kernel"] + p["gate"]["bias"]
  g = -np.logaddexp(0.0, -x) / cfg.gla_gate_temp            # log sigmoid(x) / tau
  assert g.min() < -0.05  # the decay is felt over a few steps
  S = np.zeros((B, H, Dh, Dh))
  o = np.zeros((B, T, H, Dh))
  for t in range(T):
    S = np.exp(g[:, t])[..., None, None] * S + np.einsum("bhi,bhj->bhij", k[:, t], v[:, t])
    o[:, t] = np.einsum("bhij,bhi->bhj", S, q[:, t])
  o = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + cfg.ln_eps) * p["head_norm"]["scale"]
  r = un @ p["out_gate"]["kernel"] + p["out_gate"]["bias"]
  want = (o.reshape(B, T, d) * r / (1 + np.exp(-r))) @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(_np(y), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_recurrent_koopman_mixer_matches_its_recurrence():
  """S2-c: s_t = K_c s_{t-1} + u_t with K_c = K min(1, r / ||K||_F), output s_t + b."""
  cfg = get_config("koopman", "tiny", koopman_mixer="recurrent")
  B, T, d = 2, 9, cfg.d_model
  u = jax.random.normal(jax.random.key(3), (B, T, d))
  layer = Koopman(cfg, mode="recurrent")
  params = layer.init(jax.random.key(4), u)["params"]
  rng = np.random.default_rng(5)
  K = rng.normal(size=(d, d)) * 0.3  # not symmetric, ||K||_F far above the radius
  assert np.linalg.norm(K) > 2 * cfg.recurrent_radius
  params = {"K": jnp.asarray(K, jnp.float32), "b": jnp.asarray(rng.normal(size=d), jnp.float32)}
  y = layer.apply({"params": params}, u)
  Kc = K * cfg.recurrent_radius / np.linalg.norm(K)
  s = np.zeros((B, d))
  want = np.zeros((B, T, d))
  for t in range(T):
    s = s @ Kc.T + _np(u)[:, t]
    want[:, t] = s + _np(params["b"])
  np.testing.assert_allclose(_np(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_koopman_matrices_report_the_clamped_recurrent_matrix():
  """S2-c applies K r / ||K||_F when ||K||_F > r; koopman_matrices (D16's eig(K)) reports
  that matrix, and the other mixers' K as stored."""
  cfg = get_config("koopman", "tiny", koopman_mixer="recurrent")
  L, d = cfg.n_layers, cfg.d_model
  K = np.random.default_rng(1).normal(size=(L, d, d)).astype(np.float32)
  K[0] *= 0.5 * cfg.recurrent_radius / np.linalg.norm(K[0])  # inside the radius: as is
  params = {"layers": {"koopman": {"K": jnp.asarray(K)}}}
  got = np.asarray(koopman_matrices(params, cfg), np.float64)
  np.testing.assert_allclose(got[0], K[0], rtol=1e-6)
  for l in range(1, L):
    assert np.linalg.norm(K[l]) > cfg.recurrent_radius
    np.testing.assert_allclose(got[l], K[l] * cfg.recurrent_radius / np.linalg.norm(K[l]),
                               rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(
      koopman_matrices(params, cfg.replace(koopman_mixer="cosine")), K)


def test_frobenius_clamp():
  K = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)), jnp.float32)
  n = float(jnp.linalg.norm(K))
  assert float(jnp.linalg.norm(frobenius_clamp(K, 0.5 * n))) == pytest.approx(0.5 * n, rel=1e-6)
  np.testing.assert_array_equal(frobenius_clamp(K, 2 * n), K)
  np.testing.assert_array_equal(frobenius_clamp(jnp.zeros((3, 3)), 1.0), jnp.zeros((3, 3)))
