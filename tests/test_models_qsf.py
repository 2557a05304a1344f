"""QSF layers against independent float64 formulas (QSF §3.2-3.5; D3-D8, D20)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from conftest import perturbed
from qsf_jax.models import build_model, get_config, koopman_matrices, orthogonal_from_free
from qsf_jax.models.blocks import QSFBlock
from qsf_jax.models.fourier import causal_cosine_mix, causal_fourier_mix
from qsf_jax.models.measurement import MeasurementAttention
from qsf_jax.models.norms import Norm

pytestmark = pytest.mark.usefixtures("fast_compiles")  # tiny models: compile time dominates


def _np(x):
  return np.asarray(x, np.float64)


def _dense(p, u):
  return u @ _np(p["kernel"]) + _np(p["bias"])


# --- Stage I / II mixing (QSF §3.2, §3.3; D3) -------------------------------------------


def test_causal_fourier_mix_matches_complex_dft_formula():
  """CFM(X) = Re[(M o F_T) X F_d] / sqrt((t+1) d), F_n = exp(-2 pi i jk/n), T = t_max."""
  t_max, T, d = 16, 10, 6
  x = np.random.default_rng(0).normal(size=(2, T, d))
  F = lambda n: np.exp(-2j * np.pi * np.outer(np.arange(n), np.arange(n)) / n)
  MF = np.tril(F(t_max))[:T, :T]
  want = np.real(np.einsum("ts,bsd,de->bte", MF, x, F(d)))
  want /= np.sqrt((np.arange(T) + 1.0) * d)[None, :, None]
  got = causal_fourier_mix(jnp.asarray(x, jnp.float32), t_max=t_max)
  np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-5)
  # The DFT length is T_max, so a prefix does not depend on the sequence length.
  short = causal_fourier_mix(jnp.asarray(x[:, :4], jnp.float32), t_max=t_max)
  np.testing.assert_allclose(_np(short), _np(got)[:, :4], rtol=1e-6, atol=1e-6)


def test_causal_cosine_mix_matches_formula():
  """S2-a sequence part: [(M o C_T) X]_t / sqrt(t + 1)."""
  t_max, T, d = 12, 7, 5
  x = np.random.default_rng(1).normal(size=(3, T, d))
  C = np.cos(2 * np.pi * np.outer(np.arange(t_max), np.arange(t_max)) / t_max)
  want = np.einsum("ts,bsd->btd", np.tril(C)[:T, :T], x) / np.sqrt(np.arange(T) + 1.0)[None, :, None]
  got = causal_cosine_mix(jnp.asarray(x, jnp.float32), t_max=t_max)
  np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-5)


def test_mixing_rejects_bad_inputs():
  with pytest.raises(ValueError, match="x_BTD"):
    causal_fourier_mix(jnp.zeros((4, 3)), t_max=8)
  with pytest.raises(ValueError, match="t_max"):
    causal_cosine_mix(jnp.zeros((1, 9, 3)), t_max=8)
  with pytest.raises(ValueError, match="real"):
    causal_fourier_mix(jnp.zeros((1, 4, 3), jnp.complex64), t_max=8)


# --- Measurement attention (QSF eqs. 34, 36; D4, D7) ------------------------------------


@pytest.mark.parametrize("include_self,scale", [(True, "position"), (False, "position"),
                                                (True, "none")])
def test_measurement_attention_matches_eq34(include_self, scale):
  """x_tgt,i = c_i sum_{j<=i (or j<i)} [phi(q_i) . phi(k_j)] v_j per head, phi(z) = 1 + z."""
  cfg = get_config("koopman_attn", "tiny", causal_include_self=include_self, attn_scale=scale,
                   attn_impl="xla")
  T, d, H, Dh = 9, cfg.d_model, cfg.n_heads, cfg.head_dim
  u = jax.random.normal(jax.random.key(3), (2, T, d))
  layer = MeasurementAttention(cfg)
  params = layer.init(jax.random.key(4), u)["params"]
  # Non-zero biases so that every term of eq. 36 is exercised.
  params = perturbed(params, 5, 0.1)
  x_tgt, v_out = layer.apply({"params": params}, u)
  un = _np(u)
  q, k, v = (_dense(params[n], un).reshape(2, T, H, Dh) for n in ("query", "key", "value"))
  w = np.einsum("bihd,bjhd->bhij", 1 + q, 1 + k)
  mask = np.tril(np.ones((T, T)), 0 if include_self else -1)
  o = np.einsum("bhij,bjhd->bihd", w * mask, v)
  c = 1.0 / ((np.arange(T) + 1.0) * Dh) if scale == "position" else np.ones(T)
  want = (o * c[None, :, None, None]).reshape(2, T, d)
  np.testing.assert_allclose(_np(x_tgt), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(_np(v_out), v.reshape(2, T, d), rtol=1e-5, atol=1e-6)


# --- Stage III/IV hybrid layer (QSF eq. 60; D5, D6, D20) ---------------------------------


def _block_setup(stage, **overrides):
  cfg = get_config(stage, "tiny", **overrides)
  d = cfg.d_model
  block = QSFBlock(cfg)
  h = jax.random.normal(jax.random.key(0), (2, 6, d))
  ctx = (jnp.float32(0.0), jnp.int32(0))
  variables = block.init(jax.random.key(1), h, ctx)
  params = perturbed(variables["params"], 2, 0.3)
  # A non-trivial frozen scale: s_bar = ema / (1 - 0.99^1) = 1.7.
  stats = {"norm1": {"ema": jnp.float32(1.7 * (1 - cfg.ls_ema_decay)), "count": jnp.float32(1.0)}}
  return cfg, block, {"params": params, "norm_stats": stats}


@pytest.mark.parametrize("stage", ["koopman_attn", "hamiltonian_attn"])
def test_layer_is_affine_in_h_after_anneal(stage):
  """D20: at beta = 1, with a frozen target, f(h1 + h2) - f(h2) = h1 + (gamma h1 / s_bar) K^T."""
  cfg, block, variables = _block_setup(stage)
  rng = np.random.default_rng(7)
  h1, h2, tgt = (jnp.asarray(rng.normal(size=(2, 6, cfg.d_model)), jnp.float32) for _ in range(3))
  f = lambda h, beta: block.apply(variables, h, (jnp.float32(beta), jnp.int32(0)),
                                  x_tgt_BTD=tgt)[0]
  p = variables["params"]
  gamma = _np(p["norm1"]["scale"])
  if stage == "hamiltonian_attn":
    S = _np(p["koopman"]["S"])
    K = scipy.linalg.expm(S - S.T)  # independent of the model's expm
  else:
    K = _np(p["koopman"]["K"])
  lin = _np(h1) + (gamma * _np(h1) / 1.7) @ K.T
  diff = _np(f(h1 + h2, 1.0)) - _np(f(h2, 1.0))
  np.testing.assert_allclose(diff, lin, rtol=1e-4, atol=1e-4)
  # Before the anneal (LayerNorm) the layer is not affine.
  diff0 = _np(f(h1 + h2, 0.0)) - _np(f(h2, 0.0))
  assert np.max(np.abs(diff0 - lin)) > 1e-2


def test_attention_form_pull_subtracts_values():
  """D6 "pull": h <- h + u K^T + b + alpha (x_tgt - v)."""
  _, add_block, variables = _block_setup("koopman_attn")
  cfg_pull = get_config("koopman_attn", "tiny", attn_form="pull")
  h = jax.random.normal(jax.random.key(9), (2, 6, cfg_pull.d_model))
  ctx = (jnp.float32(0.5), jnp.int32(0))
  out_add = add_block.apply(variables, h, ctx)[0]
  out_pull = QSFBlock(cfg_pull).apply(variables, h, ctx)[0]
  u = Norm(cfg_pull, annealed=True).apply(
      {"params": variables["params"]["norm1"], "norm_stats": variables["norm_stats"]["norm1"]},
      h, 0.5)
  v = _dense(variables["params"]["attn"]["value"], _np(u))
  alpha = float(variables["params"]["alpha"])
  np.testing.assert_allclose(_np(out_add) - _np(out_pull), alpha * v, rtol=1e-4, atol=1e-5)


def test_stage4_koopman_is_orthogonal():
  """QSF §3.5 / §6.8 test 8: K = expm(S - S^T) has K^T K = I and |lambda| = 1 (1e-5, f32)."""
  cfg = get_config("hamiltonian_attn", "tiny")
  model = build_model(cfg)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  L, d = cfg.n_layers, cfg.d_model
  assert variables["params"]["layers"]["koopman"]["S"].shape == (L, d, d)
  assert "K" not in variables["params"]["layers"]["koopman"]
  # A generic S far from 0 (the trained regime), not the K ~ I of the init.
  S = jax.random.normal(jax.random.key(1), (L, d, d)) / np.sqrt(d)
  params = {"layers": {"koopman": {"S": S}}}
  for method in ("expm", "cayley"):
    K = _np(koopman_matrices(params, cfg.replace(hamiltonian_param=method)))
    for Kl in K:
      np.testing.assert_allclose(Kl.T @ Kl, np.eye(d), atol=1e-5)
      np.testing.assert_allclose(np.abs(np.linalg.eigvals(Kl)), 1.0, atol=1e-5)
      assert abs(np.linalg.det(Kl) - 1.0) < 1e-4
      assert np.max(np.abs(Kl - np.eye(d))) > 0.1
  K_expm = _np(orthogonal_from_free(S[0]))
  W = _np(S[0]) - _np(S[0]).T
  np.testing.assert_allclose(K_expm, scipy.linalg.expm(W), atol=1e-5)
  # D8's Cayley orientation, K = (I + W)^{-1}(I - W): its transpose is orthogonal with
  # det 1 too, so only the formula tells them apart
  want = np.linalg.solve(np.eye(d) + W, np.eye(d) - W)
  np.testing.assert_allclose(_np(orthogonal_from_free(S[0], "cayley")), want, atol=1e-5)
  np.testing.assert_allclose(
      _np(koopman_matrices(params, cfg.replace(hamiltonian_param="cayley")))[0], want, atol=1e-5)


def test_koopman_matrices_rejects_stage_without_k():
  with pytest.raises(ValueError, match="no Koopman"):
    koopman_matrices({}, get_config("transformer", "tiny"))
  K = {"layers": {"koopman": {"K": jnp.zeros((2, 4, 4))}}}
  with pytest.raises(ValueError, match=r"not the whole variables dict"):
    koopman_matrices({"params": K}, get_config("koopman", "tiny"))
  with pytest.raises(ValueError, match="no layers/koopman/S, which a hamiltonian_attn model has"):
    koopman_matrices(K, get_config("hamiltonian_attn", "tiny"))
  with pytest.raises(ValueError, match="method"):
    orthogonal_from_free(jnp.zeros((3, 3)), method="svd")
  with pytest.raises(ValueError, match="S_DD"):
    orthogonal_from_free(jnp.zeros((3, 4)))


# --- D5 norm statistics -----------------------------------------------------------------


def test_norm_anneal_and_ema_statistics():
  """N_beta = (1-beta) LN + beta LS; s_bar is the bias-corrected EMA of per-token std (D5)."""
  cfg = get_config("koopman_attn", "tiny")
  d = cfg.d_model
  u = jax.random.normal(jax.random.key(0), (3, 5, d)) * 2.5 + 0.3
  norm = Norm(cfg, annealed=True)
  variables = norm.init(jax.random.key(1), u, 0.0)
  assert float(variables["norm_stats"]["count"]) == 0.0
  params = {"scale": jnp.linspace(0.5, 1.5, d), "bias": jnp.linspace(-0.2, 0.2, d)}
  variables = {"params": params, "norm_stats": variables["norm_stats"]}
  upd = Norm(cfg, annealed=True, update_stats=True)
  stats = variables["norm_stats"]
  for _ in range(3):
    _, mut = upd.apply({"params": params, "norm_stats": stats}, u, 0.0, mutable=["norm_stats"])
    stats = mut["norm_stats"]
  assert float(stats["count"]) == 3.0
  std = float(np.mean(np.std(_np(u), axis=-1)))
  s_bar = float(stats["ema"]) / (1 - cfg.ls_ema_decay ** 3)
  np.testing.assert_allclose(s_bar, std, rtol=1e-5)
  # beta = 1 is the linear scaling with the frozen s_bar; beta = 0 is LayerNorm.
  out1 = norm.apply({"params": params, "norm_stats": stats}, u, 1.0)
  np.testing.assert_allclose(_np(out1), _np(params["scale"]) * _np(u) / s_bar
                             + _np(params["bias"]), rtol=1e-5, atol=1e-5)
  out0 = norm.apply({"params": params, "norm_stats": stats}, u, 0.0)
  gamma, bias = _np(params["scale"]), _np(params["bias"])

  def ln(x):
    return ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + cfg.ln_eps)
            * gamma + bias)

  np.testing.assert_allclose(_np(out0), ln(_np(u)), rtol=1e-4, atol=1e-4)
  # in between, the blend is linear in beta (QSF §3.4)
  for beta in (0.25, 0.5):
    out = norm.apply({"params": params, "norm_stats": stats}, u, beta)
    np.testing.assert_allclose(_np(out), (1 - beta) * ln(_np(u)) + beta * _np(out1),
                               rtol=1e-5, atol=1e-5)
  # the epsilon counts where a token's variance is small (std 1e-3: var 1e-6 < eps)
  quiet = u * 4e-4
  np.testing.assert_allclose(_np(norm.apply({"params": params, "norm_stats": stats}, quiet,
                                            0.0)), ln(_np(quiet)), rtol=1e-5, atol=1e-5)
  # before any update (count 0) s_bar is 1: LS is gamma u + b
  fresh = norm.apply({"params": params, "norm_stats": variables["norm_stats"]}, u, 1.0)
  np.testing.assert_allclose(_np(fresh), gamma * _np(u) + bias, rtol=1e-5, atol=1e-5)


def test_norm_stats_average_over_the_loss_positions():
  """D5's s_bar averages the per-token std over the positions the loss counts.

  The same real tokens followed by padding give the same EMA with the loss
  mask ("loss", default), and a different one with ``ls_stats_positions="all"``.
  """
  rng = np.random.default_rng(0)
  real = rng.integers(1, 250, size=(2, 6))
  padded = np.concatenate([real, np.zeros((2, 10), np.int64)], axis=1)
  mask = np.concatenate([np.ones((2, 6)), np.zeros((2, 10))], axis=1).astype(np.float32)
  # The forward passes jitted (eager flax compiles every primitive for each shape).
  # stage3_keep_ffn keeps the FFN and its annealed norm2, whose statistics need the
  # mask as well.
  for positions, keep_ffn in (("loss", False), ("all", False), ("loss", True)):
    cfg = get_config("koopman_attn", "tiny", ls_stats_positions=positions,
                     stage3_keep_ffn=keep_ffn)
    model = build_model(cfg)
    variables = jax.jit(model.init)(jax.random.key(1), jnp.asarray(padded))
    stats = jax.jit(lambda x, m, model=model, variables=variables: model.apply(
        variables, x, update_stats=True, stats_mask=m, mutable=["norm_stats"])[1]["norm_stats"])
    a, b = stats(jnp.asarray(real), np.ones((2, 6), np.float32)), stats(jnp.asarray(padded), mask)
    paths = [("layers", "norm1"), ("final_norm",)] + [("layers", "norm2")] * keep_ffn
    assert ("norm2" in a["layers"]) == keep_ffn
    for path in paths:
      ea, eb = a, b
      for key in path:
        ea, eb = ea[key], eb[key]
      assert np.all(_np(ea["count"]) == 1.0) and np.all(_np(eb["count"]) == 1.0)
      if positions == "loss":  # causal: the real positions see the same u
        np.testing.assert_allclose(_np(ea["ema"]), _np(eb["ema"]), rtol=1e-5)
      else:
        assert np.all(np.abs(_np(ea["ema"]) / _np(eb["ema"]) - 1) > 1e-3)
  # a batch without counted positions leaves the EMA and its count unchanged
  cfg = get_config("koopman_attn", "tiny")
  model = build_model(cfg)
  variables = jax.jit(model.init)(jax.random.key(1), jnp.asarray(padded))
  _, mut = jax.jit(lambda x, m: model.apply(variables, x, update_stats=True, stats_mask=m,
                                            mutable=["norm_stats"]))(jnp.asarray(padded),
                                                                     np.zeros_like(mask))
  np.testing.assert_array_equal(_np(mut["norm_stats"]["final_norm"]["count"]), 0.0)
  np.testing.assert_array_equal(_np(mut["norm_stats"]["layers"]["norm1"]["ema"]), 0.0)
  with pytest.raises(ValueError, match="stats_mask"):
    model.apply(variables, jnp.asarray(padded), update_stats=True, stats_mask=mask[:, :3],
                mutable=["norm_stats"])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    model.apply(variables, jnp.asarray(padded) + cfg.vocab_size)


def test_model_updates_norm_stats_only_when_asked():
  cfg = get_config("koopman_attn", "tiny")
  model = build_model(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
  variables = jax.jit(model.init)(jax.random.key(1), tokens)
  L = cfg.n_layers
  assert variables["norm_stats"]["layers"]["norm1"]["ema"].shape == (L,)
  apply = jax.jit(lambda v, x, upd: model.apply(v, x, update_stats=upd, mutable=["norm_stats"]),
                  static_argnums=2)
  _, same = apply(variables, tokens, False)
  np.testing.assert_array_equal(same["norm_stats"]["layers"]["norm1"]["count"], np.zeros(L))
  _, new = apply(variables, tokens, True)
  np.testing.assert_array_equal(new["norm_stats"]["layers"]["norm1"]["count"], np.ones(L))
  assert float(new["norm_stats"]["final_norm"]["count"]) == 1.0
  assert np.all(_np(new["norm_stats"]["layers"]["norm1"]["ema"]) > 0)
  with pytest.raises(ValueError, match="norm_stats"):
    model.apply({"params": variables["params"]}, tokens)
  with pytest.raises(ValueError, match=r"update_stats=True .* mutable=\['norm_stats'\]"):
    model.apply(variables, tokens, update_stats=True)
