"""Sampling through the recurrent decode path (QSF spec D14)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_compiled
from qsf_jax.models.config import get_config
from qsf_jax.models.lm import build_model
from qsf_jax.data import get_tokenizer
from qsf_jax.training.sampling import generate, sample_logits, sample_text, top_k_logits


pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_top_k_keeps_the_k_largest():
  z = jnp.array([[0.1, 3.0, -1.0, 2.0, 2.5]])
  out = np.asarray(top_k_logits(z, 2))
  np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, False, True]])
  np.testing.assert_array_equal(out[0, [1, 4]], [3.0, 2.5])
  np.testing.assert_array_equal(top_k_logits(z, 5), z)
  # ties at the k-th value are kept, and rows are independent (random rows against a sort)
  rng = np.random.default_rng(0)
  zz = rng.integers(-3, 4, (6, 40)).astype(np.float32)
  for k in (1, 3, 17):
    kth = -np.sort(-zz, axis=-1)[:, k - 1:k]
    np.testing.assert_array_equal(np.asarray(top_k_logits(jnp.asarray(zz), k)),
                                  np.where(zz < kth, -np.inf, zz))


def test_sample_logits_greedy_and_distribution():
  z = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
  assert int(sample_logits(jax.random.PRNGKey(0), z, 0.0, 3)[0]) == 1
  draws = jax.vmap(lambda k: sample_logits(k, z, 1.0, 3)[0])(
      jax.random.split(jax.random.PRNGKey(1), 4000))
  freq = np.bincount(np.asarray(draws), minlength=3) / 4000
  np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.03)
  # temperature 0.5 squares the probabilities: p^2 / sum p^2
  draws = jax.vmap(lambda k: sample_logits(k, z, 0.5, 3)[0])(
      jax.random.split(jax.random.PRNGKey(3), 4000))
  freq = np.bincount(np.asarray(draws), minlength=3) / 4000
  np.testing.assert_allclose(freq, np.array([0.01, 0.36, 0.09]) / 0.46, atol=0.03)
  # top-2 renormalises over the two largest: [0, 2/3, 1/3]
  draws = jax.vmap(lambda k: sample_logits(k, z, 1.0, 2)[0])(
      jax.random.split(jax.random.PRNGKey(4), 4000))
  freq = np.bincount(np.asarray(draws), minlength=3) / 4000
  np.testing.assert_allclose(freq, [0.0, 2 / 3, 1 / 3], atol=0.03)
  draws_k1 = jax.vmap(lambda k: sample_logits(k, z, 1.0, 1)[0])(
      jax.random.split(jax.random.PRNGKey(2), 200))
  assert set(np.asarray(draws_k1).tolist()) == {1}  # top-1 is greedy


@pytest.fixture(scope="module")
def model_and_params():
  model = build_model(get_config("koopman_attn", "tiny"))
  params, coll = init_compiled(model, 0, 32)
  # make the tiny model peaked enough that greedy choices are well separated
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)
  return model, params, coll


def test_greedy_decode_matches_full_forward(model_and_params):
  """Recurrent decoding (decode=True) continues like argmax of the parallel forward."""
  model, params, coll = model_and_params
  prompt = [72, 105, 33]
  new = np.asarray(generate(model, params, coll, jnp.array(prompt), max_new_tokens=6,
                            rng=jax.random.PRNGKey(0), temperature=0.0, beta=0.0, max_len=32))
  seq = np.zeros((1, 32), np.int32)
  seq[0, :3] = prompt
  fwd = jax.jit(lambda s: model.apply({"params": params, **coll}, s, beta=0.0))
  want = []
  for t in range(3, 9):  # causal: positions >= t do not affect the logits at t - 1
    nxt = int(np.argmax(np.asarray(fwd(seq))[0, t - 1]))
    want.append(nxt)
    seq[0, t] = nxt
  assert new.tolist() == want


def test_greedy_decode_fills_the_whole_context(model_and_params):
  """P + N = max_len + 1 is served: the model reads P + N - 1 = max_len tokens, the
  last new token from the logits at the context's last position. (The limit used to
  refuse it, one token short.)"""
  model, params, coll = model_and_params
  prompt = np.arange(1, 29, dtype=np.int32)  # 28 tokens + 5 new = 33 = 32 + 1
  new = np.asarray(generate(model, params, coll, jnp.asarray(prompt), max_new_tokens=5,
                            rng=jax.random.PRNGKey(0), temperature=0.0))
  seq = np.zeros((1, 32), np.int32)
  seq[0, :28] = prompt
  fwd = jax.jit(lambda s: model.apply({"params": params, **coll}, s, beta=0.0))
  for i, t in enumerate(range(28, 33)):
    nxt = int(np.argmax(np.asarray(fwd(seq))[0, t - 1]))
    assert int(new[i]) == nxt, (i, new.tolist())
    if t < 32:
      seq[0, t] = nxt


def test_sample_text_feeds_the_encoded_prompt(model_and_params):
  """sample_text continues exactly the prompt's tokens (no extra EOT before them), and an
  empty prompt starts from EOT alone."""
  model, params, coll = model_and_params
  tok = get_tokenizer("bytes")
  kw = dict(max_new_tokens=5, temperature=0.0, max_len=32)
  for prompt, ids in (("Hi!", list(b"Hi!")), ("", [tok.eot_id])):
    new = generate(model, params, coll, jnp.array(ids), rng=jax.random.PRNGKey(0), **kw)
    want = tok.decode([int(t) for t in new])
    assert sample_text(model, params, coll, tok, prompt, **kw) == want


def test_sample_text_refuses_bad_text_and_seeds(model_and_params):
  """A prompt of undecodable command-line bytes (lone surrogates) became U+FFFD without
  a word; seeds wrapped modulo 2^32 (-1 sampled as 2^32 - 1) or overflowed."""
  model, params, coll = model_and_params
  tok = get_tokenizer("bytes")
  kw = dict(max_new_tokens=2, temperature=0.0, max_len=32)
  with pytest.raises(ValueError, match="not valid UTF-8 text.*character 3"):
    sample_text(model, params, coll, tok, "caf\udce9", **kw)
  for seed, match in ((-1, ">= 0"), (1 << 32, "< 2\\^32"), (1 << 63, "< 2\\^32")):
    with pytest.raises(ValueError, match=match):
      sample_text(model, params, coll, tok, "Hi", seed=seed, **kw)
  assert sample_text(model, params, coll, tok, "Hi", seed=(1 << 32) - 1, **kw)


def test_generate_batch_seed_and_bad_inputs(model_and_params):
  model, params, coll = model_and_params
  kw = dict(max_new_tokens=4, temperature=0.8, top_k=50, max_len=32)
  a = generate(model, params, coll, jnp.array([[1, 2], [3, 4]]), rng=jax.random.PRNGKey(5), **kw)
  b = generate(model, params, coll, jnp.array([[1, 2], [3, 4]]), rng=jax.random.PRNGKey(5), **kw)
  assert a.shape == (2, 4) and a.dtype == jnp.int32
  np.testing.assert_array_equal(a, b)
  assert int(a.min()) >= 0 and int(a.max()) < 257
  with pytest.raises(ValueError, match="integer"):
    generate(model, params, coll, jnp.array([1.0, 2.0]), rng=jax.random.PRNGKey(0), **kw)
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, params, coll, jnp.zeros((1, 0), jnp.int32), rng=jax.random.PRNGKey(0), **kw)
  # 30 + 4 - 1 = 33 tokens to read (30 + 3 fits: the last new token is never read)
  with pytest.raises(ValueError, match=r"- 1 = 33 tokens for the model to read exceeds the "
                     r"model's context of 32 tokens \(at most 3 new tokens after this prompt\)"):
    generate(model, params, coll, jnp.arange(30), rng=jax.random.PRNGKey(0),
             **dict(kw, max_new_tokens=4))
  with pytest.raises(ValueError, match=r"the prompt alone is longer"):
    generate(model, params, coll, jnp.arange(33), rng=jax.random.PRNGKey(0), **kw)
  with pytest.raises(ValueError, match="top_k"):
    generate(model, params, coll, jnp.array([1]), rng=jax.random.PRNGKey(0), **dict(kw, top_k=0))
  for bad in (float("inf"), float("nan"), -0.5):  # inf gave inf/inf = NaN logits
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
      generate(model, params, coll, jnp.array([1]), rng=jax.random.PRNGKey(0),
               **dict(kw, temperature=bad))
  with pytest.raises(ValueError, match="dimension"):
    generate(model, params, coll, jnp.ones((1, 1, 1), jnp.int32), rng=jax.random.PRNGKey(0), **kw)


def test_generate_refuses_what_used_to_decode_silently(model_and_params):
  """Each of these returned tokens without an error: past the context, from ids
  outside the vocabulary (NaN logits, or a wrapped -1), or with a NaN beta."""
  model, params, coll = model_and_params
  key = jax.random.PRNGKey(0)
  kw = dict(max_new_tokens=4, temperature=0.8, top_k=50)
  # max_len left out: the model's own max_seq_len (32) is the limit.
  with pytest.raises(ValueError, match="exceeds the model's context of 32"):
    generate(model, params, coll, jnp.array([1, 2, 3]), rng=key, **dict(kw, max_new_tokens=31))
  for ids in ([1, 257, 3], [-1, 2]):
    with pytest.raises(ValueError, match=r"prompt_ids has ids in .*outside the vocabulary 0..256"):
      generate(model, params, coll, jnp.array(ids), rng=key, **kw)
  for beta in (float("nan"), 1.5, -0.1):
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
      generate(model, params, coll, jnp.array([1]), rng=key, beta=beta, **kw)
  for bad, match in ((dict(rng=0), "rng must be a JAX PRNG key"),
                     (dict(max_new_tokens=None), "max_new_tokens must be an int, got None"),
                     (dict(max_new_tokens=2.9), "max_new_tokens must be an int, got 2.9"),
                     (dict(top_k=2.7), "top_k must be an int"),
                     (dict(temperature="hot"), "temperature must be a real number")):
    with pytest.raises(ValueError, match=match):
      generate(model, params, coll, jnp.array([1]), **{**kw, "rng": key, **bad})
  with pytest.raises(ValueError, match="top_k must be >= 1"):
    top_k_logits(jnp.zeros((1, 5)), 0)
  # Concrete jax integers are counts like Python ints.
  out = generate(model, params, coll, jnp.array([1]), rng=key, max_new_tokens=jnp.int32(3),
                 top_k=jnp.int32(5), max_len=jnp.int32(30), beta=jnp.float32(0.5))
  assert out.shape == (3,)


def test_decode_without_a_cache_names_init_cache(model_and_params):
  # flax raised ScopeCollectionNotFound, with no word on how to build the cache.
  model, params, coll = model_and_params
  with pytest.raises(ValueError, match=r"decode=True needs a 'cache' collection.*init_cache"):
    model.apply({"params": params, **coll}, jnp.ones((1, 1), jnp.int32), decode=True)


def test_sample_workdir_beta_defaults_to_the_checkpoints(model_and_params, monkeypatch):
  """``sample --beta`` samples an annealed stage at another D5 weight, as ``evaluate --beta``
  scores it; out-of-range values are refused before loading, and a stage without the
  anneal takes only its own beta."""
  import dataclasses
  from qsf_jax.training import restore
  from qsf_jax.training.sampling import sample_workdir
  model, params, coll = model_and_params
  tok = get_tokenizer("bytes")
  run = restore.LoadedRun(cfg=None, model_config=model.cfg, model=model, params=params,
                          collections=coll, tokenizer=tok, meta={}, step=10, seq_len=32,
                          beta=1.0)
  loads = []
  monkeypatch.setattr(restore, "load_run", lambda *a, **kw: loads.append(a) or run)
  kw = dict(max_new_tokens=8, temperature=0.0)
  own = sample_workdir("W", "Hi", **kw)
  assert own == sample_text(model, params, coll, tok, "Hi", beta=1.0, max_len=32, **kw)
  at0 = sample_workdir("W", "Hi", beta=0.0, **kw)
  assert at0 == sample_text(model, params, coll, tok, "Hi", beta=0.0, max_len=32, **kw)
  assert at0 != own  # the weight reaches the model
  n = len(loads)
  for bad in (1.5, -0.1, float("nan"), True):
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
      sample_workdir("W", "Hi", beta=bad, **kw)
  assert len(loads) == n  # refused before loading
  plain = dataclasses.replace(run, cfg=type("Cfg", (), {"stage": "koopman"})(),
                              model_config=model.cfg.replace(stage="koopman"), beta=0.0)
  assert not plain.model_config.annealed
  monkeypatch.setattr(restore, "load_run", lambda *a, **kw: plain)
  with pytest.raises(ValueError, match="beta=0.5: the koopman stage has no normalisation anneal"):
    sample_workdir("W", "Hi", beta=0.5, **kw)
