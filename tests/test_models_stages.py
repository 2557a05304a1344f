"""Every stage of the model zoo: causality, decode == full forward, bf16 path.

QSF spec §6.8 test 14 (causality for every stage) and the decoding contract:
one token per call with a "cache" collection reproduces the full forward pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.models import STAGES, build_model, get_config, init_cache

pytestmark = pytest.mark.usefixtures("fast_compiles")  # tiny models: compile time dominates

T = 8
BETA = 0.4  # a mid-anneal weight, so Stages III/IV mix LN and LS


def _setup(stage, **overrides):
  cfg = get_config(stage, "tiny", **overrides)
  model = build_model(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  return cfg, model, variables, tokens


def _full(model, variables, tokens):
  return jax.jit(lambda v, x: model.apply(v, x, beta=BETA))(variables, tokens)


def _decode(model, variables, tokens):
  """Logits from T single-token decode calls, (B, T, V)."""

  @jax.jit
  def step(cache, tok_B1):
    out, mut = model.apply({**variables, "cache": cache}, tok_B1, beta=BETA,
                           decode=True, mutable=["cache"])
    return out, mut["cache"]

  cache = init_cache(model, tokens.shape[0])
  outs = []
  for t in range(tokens.shape[1]):
    out, cache = step(cache, tokens[:, t:t + 1])
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


def _check_decode(model, variables, tokens, full):
  dec, cache = _decode(model, variables, tokens)
  assert dec.shape == full.shape and dec.dtype == jnp.float32
  rel = float(jnp.max(jnp.abs(dec - full)) / jnp.max(jnp.abs(full)))
  assert rel < 1e-5, rel
  return cache


def _with_variants(tokens, vocab):
  """``tokens`` (B, T), then T - 1 copies of row 0 with every token after t changed.

  One batch, so one compiled forward serves the full-forward, causality and decode
  checks.
  """
  base = np.asarray(tokens[0])
  rng = np.random.default_rng(0)
  variants = []
  for t in range(T - 1):
    v = base.copy()
    new = rng.integers(0, vocab, size=T - t - 1)
    new = np.where(new == v[t + 1:], (new + 1) % vocab, new)
    v[t + 1:] = new
    variants.append(v)
  return jnp.concatenate([tokens, jnp.asarray(np.stack(variants), tokens.dtype)], axis=0)


def _check_causal(logits, batch_size):
  """Changing tokens after t leaves logits at <= t unchanged (and changes t + 1).

  Args:
    logits: full-forward logits of ``_with_variants`` (B + T - 1, T, V).
    batch_size: B, the rows before the variants.
  """
  logits = np.asarray(logits)
  for t in range(T - 1):
    row = logits[batch_size + t]
    np.testing.assert_allclose(row[:t + 1], logits[0, :t + 1], rtol=1e-6, atol=1e-6,
                               err_msg=f"position <= {t} changed")
    assert np.max(np.abs(row[t + 1] - logits[0, t + 1])) > 1e-6, t


def _check_causal_and_decode(model, variables, tokens, vocab):
  """Full forward of tokens and their variants: causal, and equal to T decode calls."""
  batch = _with_variants(tokens, vocab)
  full = _full(model, variables, batch)
  assert full.shape == (batch.shape[0], T, vocab) and full.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(full)))
  _check_causal(full, tokens.shape[0])
  # last_only: the last position's logits alone (the head skips the others)
  last = jax.jit(lambda v, x: model.apply(v, x, beta=BETA, last_only=True))(variables, batch)
  assert last.shape == (batch.shape[0], 1, vocab)
  np.testing.assert_allclose(last, full[:, -1:], rtol=1e-6, atol=1e-6)
  return _check_decode(model, variables, batch, full)


@pytest.mark.parametrize("stage", ["koopman_attn", "wave"])
def test_last_only_is_refused_with_stats_updates_or_a_non_bool(stage):
  _, model, variables, tokens = _setup(stage)
  with pytest.raises(ValueError, match="cannot update the norm statistics"):
    model.apply(variables, tokens, update_stats=True, last_only=True, mutable=["norm_stats"])
  with pytest.raises(ValueError, match="last_only must be a bool"):
    model.apply(variables, tokens, last_only=1)


@pytest.mark.parametrize("stage", STAGES)
def test_causal_and_decode_match_full_forward(stage):
  cfg, model, variables, tokens = _setup(stage)
  cache = _check_causal_and_decode(model, variables, tokens, cfg.vocab_size)
  if stage != "wave":  # the position counter advanced once per token
    assert int(cache["index"]) == T


def test_decode_state_is_constant_size_for_linear_attention():
  """Linear-attention stages carry an O(1) state, not a cache over positions."""
  for stage in ("koopman_attn", "hamiltonian_attn", "gla"):
    cfg = get_config(stage, "tiny")
    cache = init_cache(build_model(cfg), 3)
    shapes = {k: v.shape for k, v in cache["layers"]["attn"].items()}
    H, Dh = cfg.n_heads, cfg.head_dim
    assert shapes == {"state": (cfg.n_layers, 3, H, Dh, Dh)}, (stage, shapes)


@pytest.mark.slow
@pytest.mark.parametrize("stage,overrides", [
    ("fnet", dict(fnet_postnorm=True)),
    ("koopman", dict(koopman_mixer="none")),
    ("koopman", dict(koopman_mixer="recurrent")),
    ("koopman_attn", dict(causal_include_self=False, attn_form="pull", attn_scale="none")),
    ("koopman_attn", dict(stage3_keep_ffn=True, stage3_keep_fourier=True,
                          tie_embeddings=False)),
    ("hamiltonian_attn", dict(hamiltonian_param="cayley", ls_scale="sqrt_d")),
    ("wave", dict(wave_layers=2, wave_readout="born")),
])
def test_variants_causal_and_decode(stage, overrides):
  cfg, model, variables, tokens = _setup(stage, **overrides)
  _check_causal_and_decode(model, variables, tokens, cfg.vocab_size)


@pytest.mark.parametrize("stage", ["koopman_attn", "transformer"])
def test_bf16_compute_gives_finite_float32_logits(stage):
  _, model32, variables, tokens = _setup(stage)
  model16 = build_model(get_config(stage, "tiny", dtype="bfloat16"))
  f32 = _full(model32, variables, tokens)
  b16 = _full(model16, variables, tokens)  # same float32 parameters
  assert b16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(b16)))
  # bf16 operands with f32 accumulation: within the kernels spec's bf16 bound
  # (relative RMS 1e-2, §5.2), and not bit-identical to f32 (bf16 was used).
  rel = float(jnp.linalg.norm(b16 - f32) / jnp.linalg.norm(f32))
  assert 0.0 < rel < 1e-2, rel


@pytest.mark.slow
@pytest.mark.parametrize("stage", [s for s in STAGES if s not in ("koopman_attn", "transformer")])
def test_bf16_compute_other_stages(stage):
  _, model32, variables, tokens = _setup(stage)
  model16 = build_model(get_config(stage, "tiny", dtype="bfloat16"))
  b16 = _full(model16, variables, tokens)
  assert b16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(b16)))
  f32 = _full(model32, variables, tokens)
  rel = float(jnp.linalg.norm(b16 - f32) / jnp.linalg.norm(f32))
  # The wave model keeps all its maths in float32/complex64 (rel = 0).
  assert rel < 1e-2, rel
