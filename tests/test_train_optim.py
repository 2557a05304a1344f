"""Optimizer, schedule and weight-decay mask (QSF spec §4.1, D10, D11)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsf_jax.models.config import get_config
from qsf_jax.models.lm import build_model
from qsf_jax.training.optim import decay_mask, make_optimizer, onecycle_momentum, onecycle_schedule


def _torch_two_phase(step, total, pct_start, v0, v1, v2):
  """PyTorch ``OneCycleLR``'s two cos phases v0 -> v1 -> v2, transcribed from ``get_lr``."""
  phases = [(float(pct_start * total) - 1, v0, v1), (float(total) - 1, v1, v2)]
  start_step = 0.0
  for i, (end_step, start, end) in enumerate(phases):
    if step <= end_step or i == len(phases) - 1:
      pct = (step - start_step) / (end_step - start_step)
      return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    start_step = end_step
  raise AssertionError


def torch_onecycle(step, total, max_lr, pct_start=0.3, div_factor=25.0, final_div=1e4):
  """PyTorch ``OneCycleLR`` learning rate (two phases, cos)."""
  initial = max_lr / div_factor
  return _torch_two_phase(step, total, pct_start, initial, max_lr, initial / final_div)


@pytest.mark.parametrize("total", [2, 3, 10, 97, 20000])
def test_onecycle_matches_pytorch(total):
  sched = onecycle_schedule(total, 1e-3)
  steps = sorted(s for s in {0, 1, int(0.3 * total) - 1, int(0.3 * total), total // 2,
                             total - 2, total - 1} | set(range(0, total, max(1, total // 37)))
                 if 0 <= s < total)
  got = np.array([float(sched(s)) for s in steps])
  want = np.array([torch_onecycle(s, total, 1e-3) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_onecycle_landmarks():
  sched = onecycle_schedule(1000, 1e-3)
  assert float(sched(0)) == pytest.approx(1e-3 / 25, rel=1e-6)
  assert float(sched(299)) == pytest.approx(1e-3, rel=1e-6)
  assert float(sched(999)) == pytest.approx(1e-3 / 25 / 1e4, rel=1e-4)
  lrs = np.array([float(sched(s)) for s in range(1000)])
  assert np.all(np.diff(lrs[:300]) > 0) and np.all(np.diff(lrs[299:]) < 0)
  # jit-compatible with a traced count
  assert float(jax.jit(sched)(jnp.int32(299))) == pytest.approx(1e-3, rel=1e-6)
  # past the last step (a count beyond total_steps) the schedule holds its final value
  # instead of climbing back up the cosine
  assert [float(sched(s)) for s in (1000, 1500, 10**6)] == [float(sched(999))] * 3
  mom = onecycle_momentum(1000)
  assert [float(mom(s)) for s in (1000, 10**6)] == [float(mom(999))] * 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_steps=1), "total_steps must be >= 2"),
    (dict(total_steps=2.5), "total_steps must be an int"),
    (dict(total_steps=100, pct_start=0.0), "pct_start must be in"),
    (dict(total_steps=100, max_lr=-1.0), "max_lr must be > 0"),
    (dict(total_steps=100, max_lr=float("nan")), "max_lr must be a finite number"),
    (dict(total_steps=100, div_factor=-1.0), "div_factor must be > 0"),
    (dict(total_steps=100, final_div_factor=float("inf")), "final_div_factor must be a finite"),
])
def test_onecycle_rejects_bad_settings(kwargs, match):
  total = kwargs.pop("total_steps")
  with pytest.raises(ValueError, match=match):
    onecycle_schedule(total, **kwargs)


def _named(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in p): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_decay_mask_on_stage3_parameters():
  """D11: decay E, K, W_* (matrices); not biases, norm params or alpha, even stacked."""
  cfg = get_config("koopman_attn", "tiny")
  params = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  mask = _named(decay_mask(params))
  shapes = {k: v.shape for k, v in _named(params).items()}
  assert mask["embed/embedding"] and mask["pos_embed/embedding"]
  decayed = {k for k, v in mask.items() if v}
  exempt = {k for k, v in mask.items() if not v}
  for k in decayed:  # every decayed leaf is a (possibly layer-stacked) matrix
    assert len(shapes[k]) >= 2, k
    assert not any(w in k.lower() for w in ("bias", "norm", "alpha", "scale")), k
  for k in exempt:
    leaf = k.rsplit("/", 1)[-1].lower()
    assert ("norm" in k.lower() or leaf in ("bias", "b", "scale", "alpha")
            or len(shapes[k]) < 2), k
  assert any("alpha" in k for k in exempt)
  assert any("norm" in k.lower() for k in exempt)
  # a layer-stacked LayerNorm scale has rank 2 and must still be exempt
  assert any("norm" in k.lower() and len(shapes[k]) == 2 for k in exempt)
  assert len(decayed) >= 4


def test_weight_decay_only_on_matrices_and_clipping():
  params = {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "alpha": jnp.ones(())}
  tx = make_optimizer(100, max_lr=1e-2, weight_decay=0.1, cycle_momentum=False)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  lr0 = 1e-2 / 25
  np.testing.assert_allclose(updates["dense"]["kernel"], -lr0 * 0.1 * np.ones((3, 3)), rtol=1e-5)
  np.testing.assert_array_equal(updates["dense"]["bias"], np.zeros(3))
  np.testing.assert_array_equal(updates["alpha"], 0.0)
  # global-norm clipping (spec: 1.0): Adam's first moment sees the clipped gradient
  g = jax.tree.map(lambda p: 0.03 * jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + 0.01,
                   params)
  g_big = jax.tree.map(lambda x: 1e6 * x, g)
  _, st = tx.update(g_big, state, params)
  adam_state = st[1][0]
  norm = float(optax.tree.norm(g_big))
  for mu, gb in zip(jax.tree.leaves(adam_state.mu), jax.tree.leaves(g_big)):
    np.testing.assert_allclose(mu, 0.1 * np.asarray(gb) / norm, rtol=1e-5)
  _, st_small = tx.update(g, state, params)  # ||g|| < 1: unchanged
  assert float(optax.tree.norm(g)) < 1.0
  for mu, gs in zip(jax.tree.leaves(st_small[1][0].mu), jax.tree.leaves(g)):
    np.testing.assert_allclose(mu, 0.1 * np.asarray(gs), rtol=1e-5)


def torch_onecycle_momentum(step, total, pct_start=0.3, base=0.85, top=0.95):
  """PyTorch ``OneCycleLR`` momentum (``cycle_momentum=True``): top -> base -> top."""
  return _torch_two_phase(step, total, pct_start, top, base, top)


@pytest.mark.parametrize("total", [3, 10, 97, 20000])
def test_onecycle_momentum_matches_pytorch(total):
  sched = onecycle_momentum(total)
  steps = sorted({0, 1, int(0.3 * total) - 1, int(0.3 * total), total // 2, total - 1}
                 | set(range(0, total, max(1, total // 37))))
  steps = [t for t in steps if 0 <= t < total]
  np.testing.assert_allclose([float(sched(t)) for t in steps],
                             [torch_onecycle_momentum(t, total) for t in steps], rtol=1e-6)
  with pytest.raises(ValueError, match="base_momentum"):
    onecycle_momentum(10, base_momentum=0.96)


def test_cycled_adamw_matches_a_pytorch_transcription():
  """clip -> AdamW with OneCycle lr and b1, against torch.optim.AdamW's update rule:
  g *= min(1, c / ||g||);  theta *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
  theta -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps),  b1 = b1(t - 1)."""
  S, lr_max, wd = 12, 3e-2, 0.1
  rng = np.random.default_rng(0)
  params = {"w": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
            "b": {"bias": jnp.asarray(rng.normal(size=2), jnp.float32)}}
  clip = 1.0
  tx = make_optimizer(S, max_lr=lr_max, weight_decay=wd, clip_norm=clip)
  state = tx.init(params)
  ref = {k: np.asarray(v, np.float64) for k, v in
         {"w": params["w"]["kernel"], "b": params["b"]["bias"]}.items()}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v2 = {k: np.zeros_like(v) for k, v in ref.items()}
  for t in range(1, S + 1):
    scale = 0.1 if t % 3 == 0 else 3.0  # a third of the steps under the clip norm
    g = {"w": scale * rng.normal(size=(3, 2)), "b": scale * rng.normal(size=2)}
    grads = {"w": {"kernel": jnp.asarray(g["w"], jnp.float32)},
             "b": {"bias": jnp.asarray(g["b"], jnp.float32)}}
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    lr, b1 = torch_onecycle(t - 1, S, lr_max), torch_onecycle_momentum(t - 1, S)
    for k, decay in (("w", wd), ("b", 0.0)):
      ref[k] = ref[k] * (1 - lr * decay)
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v2[k] = 0.999 * v2[k] + 0.001 * g[k] ** 2
      denom = np.sqrt(v2[k]) / math.sqrt(1 - 0.999**t) + 1e-8
      ref[k] = ref[k] - lr / (1 - b1**t) * m[k] / denom
  np.testing.assert_allclose(params["w"]["kernel"], ref["w"], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(params["b"]["bias"], ref["b"], rtol=2e-5, atol=1e-6)


def test_make_optimizer_rejects_bad_settings():
  with pytest.raises(ValueError, match="clip_norm"):
    make_optimizer(100, clip_norm=0.0)
  with pytest.raises(ValueError, match="weight_decay"):
    make_optimizer(100, weight_decay=-0.1)
  # Non-finite or out-of-range Adam settings turned every parameter into NaN.
  for kwargs, match in ((dict(weight_decay=float("nan")), "weight_decay must be a finite"),
                        (dict(weight_decay=float("inf")), "weight_decay must be a finite"),
                        (dict(b1=float("nan"), cycle_momentum=False), "b1 must be a finite"),
                        (dict(b2=-0.5), "b2 must be >= 0"), (dict(b2=1.0), "b2 must be < 1"),
                        (dict(eps=-1e-8), "eps must be >= 0"),
                        (dict(clip_norm=float("nan")), "clip_norm must be a finite number"),
                        (dict(cycle_momentum="no"), "cycle_momentum must be a bool")):
    with pytest.raises(ValueError, match=match):
      make_optimizer(100, **kwargs)
  # jax and numpy scalars, an infinite clip (no clipping) and eps = 0 are settings.
  make_optimizer(jnp.int32(100), max_lr=jnp.float32(1e-3), weight_decay=np.float32(0.1),
                 clip_norm=float("inf"), eps=0.0, b2=jnp.bfloat16(0.99))
