"""Autoregressive sampling through the model's recurrent ``decode=True`` path.

QSF spec D14: samples use the prompt "Once upon a time,", temperature 0.8,
top-k 50 and 40 new tokens. Each call of the model in decode mode consumes one
token and updates the ``"cache"`` collection (an O(1) recurrent state for the
linear-attention stages, a KV cache for the transformer), so generation costs
O(1) per token for the recurrent stages.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qsf_jax import _checks, _checks_values
from qsf_jax.models.lm import init_cache


def top_k_logits(logits_BV, top_k: int):
  """Keeps the ``top_k`` largest logits of each row, setting the rest to -inf.

  Args:
    logits_BV: logits (B, V).
    top_k: k >= 1; k >= V keeps every logit.
  """
  top_k = _checks.check_int("top_k", top_k, 1)
  V = logits_BV.shape[-1]
  if top_k >= V:
    return logits_BV
  # the k-th largest as the min of the top k: slicing the last column made XLA's CPU
  # backend sort every row in full (B = 1, V = 50257, k = 50: 15 ms a call; this: 0.2 ms)
  kth_B1 = jnp.min(jax.lax.top_k(logits_BV, top_k)[0], axis=-1, keepdims=True)
  return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def new_token_room(max_len: int, n_prompt: int) -> int:
  """How many new tokens fit after an ``n_prompt``-token prompt in a context of ``max_len``.

  The model reads the prompt and every new token but the last (which is never fed
  back), so P + N - 1 <= max_len: N <= max_len - P + 1 (0 or less: none fit).
  """
  return max_len - n_prompt + 1


def sample_logits(rng, logits_BV, temperature, top_k: int):
  """Draws one token per row: softmax(top_k(z) / temperature); greedy at temperature 0.

  Args:
    rng: PRNG key.
    logits_BV: logits (B, V).
    temperature: T >= 0 (scalar, may be traced).
    top_k: k >= 1.

  Returns:
    int32 token ids (B,).
  """
  logits_BV = top_k_logits(logits_BV.astype(jnp.float32), top_k)
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  t = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  drawn_B = jax.random.categorical(rng, logits_BV / t, axis=-1).astype(jnp.int32)
  return jnp.where(jnp.asarray(temperature) > 0, drawn_B, greedy_B)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k"))
def _generate(params, collections, prompt_BP, rng, temperature, beta, *, model,
              max_new_tokens: int, top_k: int):
  B, P = prompt_BP.shape
  cache = init_cache(model, B)
  variables = {"params": params, **collections}

  def body(carry, i):
    cache, tok_B1, rng = carry
    logits_B1V, updates = model.apply({**variables, "cache": cache}, tok_B1, beta=beta,
                                      decode=True, mutable=["cache"])
    rng, sub = jax.random.split(rng)
    drawn_B = sample_logits(sub, logits_B1V[:, -1, :], temperature, top_k)
    forced_B = prompt_BP[:, jnp.minimum(i + 1, P - 1)]
    next_B = jnp.where(i + 1 < P, forced_B, drawn_B)
    return (updates["cache"], next_B[:, None], rng), next_B

  n = P + max_new_tokens - 1
  _, toks_NB = jax.lax.scan(body, (cache, prompt_BP[:, :1], rng), jnp.arange(n))
  return jnp.transpose(toks_NB)[:, P - 1:]


def generate(model, params, collections, prompt_ids, *, max_new_tokens: int,
             rng, temperature: float = 0.8, top_k: int = 50, beta: float = 0.0,
             max_len: int | None = None):
  """Continues ``prompt_ids`` by ``max_new_tokens`` sampled tokens (QSF spec D14).

  The prompt is fed one token per step through ``decode=True``; after its last
  token every step samples from ``softmax(top_k(logits) / temperature)``.

  Args:
    model: the Flax module (its ``__call__`` supports ``decode=True``).
    params: parameters.
    collections: the model's other persistent collections (e.g. norm_stats).
    prompt_ids: prompt token ids, (P,) or (B, P), P >= 1.
    max_new_tokens: N >= 1 tokens to generate.
    rng: PRNG key.
    temperature: sampling temperature (0 = greedy).
    top_k: keep the k most likely tokens (>= 1).
    beta: the normalisation-anneal weight the model is evaluated at, in [0, 1] (D5).
    max_len: the context limit: the model reads the prompt and every new token
      but the last, so P + N - 1 must not exceed it (at most max_len - P + 1 new
      tokens). None: the model's ``cfg.max_seq_len`` (positions past it were
      never trained, and the learned position tables would be indexed out of
      range).

  Raises:
    ValueError: for prompt ids outside the model's vocabulary, a request past
      the context, a bad count, temperature, beta or key.

  Returns:
    int32 array of the new tokens, (N,) or (B, N) matching ``prompt_ids``.
  """
  prompt = _checks.as_array("prompt_ids", prompt_ids)
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt_ids must be integer token ids, got dtype {prompt.dtype}")
  _checks.check_ndim("prompt_ids", prompt, (1, 2))
  squeeze = prompt.ndim == 1
  prompt_BP = prompt[None] if squeeze else prompt
  if prompt_BP.shape[1] < 1:
    raise ValueError("prompt_ids must hold at least one token")
  cfg = getattr(model, "cfg", None)
  if cfg is not None:
    _checks.check_token_ids("prompt_ids", prompt_BP, cfg.vocab_size)
    if max_len is None:
      max_len = cfg.max_seq_len
  max_new_tokens = _checks.check_int("max_new_tokens", max_new_tokens, 1)
  top_k = _checks.check_int("top_k", top_k, 1)
  _checks.check_scalar("temperature", temperature)
  t = _checks_values._concrete(temperature)
  if t is not None and not (
      math.isfinite(float(_checks_values._real("temperature", temperature, t))) and t >= 0):
    raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
  _checks.check_unit_interval("beta", beta)
  _checks.check_prng_key("rng", rng)
  if max_len is not None:
    max_len = _checks.check_int("max_len", max_len, 1)
  P = prompt_BP.shape[1]
  read = P + max_new_tokens - 1  # the last new token is never fed back
  if max_len is not None and read > max_len:
    room = (f"at most {new_token_room(max_len, P)} new tokens after this prompt"
            if P <= max_len else "the prompt alone is longer")
    raise ValueError(
        f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) - 1 = {read} tokens for "
        f"the model to read exceeds the model's context of {max_len} tokens ({room})")
  out = _generate(params, collections, prompt_BP.astype(jnp.int32), rng,
                  jnp.float32(temperature), jnp.float32(beta), model=model,
                  max_new_tokens=max_new_tokens, top_k=top_k)
  return out[0] if squeeze else out


def sample_text(model, params, collections, tokenizer, prompt: str, *, max_new_tokens: int,
                seed: int = 0, temperature: float = 0.8, top_k: int = 50, beta: float = 0.0,
                max_len: int | None = None) -> str:
  """Encodes ``prompt``, generates, and decodes the continuation (QSF spec D14).

  An empty prompt starts from ``<|endoftext|>``, the story separator. ``seed``
  is in [0, 2^32): the sampling key holds 32 bits, so seeds beyond would repeat.

  Raises:
    ValueError: for a prompt that is not valid Unicode text (e.g. non-UTF-8 bytes
      on a command line: the tokenizer would see U+FFFD instead), a seed outside
      [0, 2^32), and the errors of ``generate``.
  """
  if not isinstance(prompt, str):
    raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
  try:
    prompt.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"the prompt is not valid UTF-8 text ({e.object[e.start:e.end]!r} at "
                     f"character {e.start}; undecodable bytes on a command line?)") from None
  seed = _checks.check_seed("seed", seed, "sampling key")
  ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
  new = generate(model, params, collections, jnp.asarray(ids, jnp.int32),
                 max_new_tokens=max_new_tokens, rng=jax.random.PRNGKey(seed),
                 temperature=temperature, top_k=top_k, beta=beta, max_len=max_len)
  return tokenizer.decode([int(t) for t in new])


def sample_workdir(workdir, prompt: str, *, max_new_tokens: int = 40, temperature: float = 0.8,
                   top_k: int = 50, seed: int = 0, step: int | None = None,
                   tokenizer_file: str | None = None, attn_impl: str | None = None,
                   beta: float | None = None) -> str:
  """Generates a continuation of ``prompt`` from a run folder's checkpoint (D14).

  Args:
    workdir: the run folder.
    prompt: the text to continue.
    max_new_tokens: tokens to generate.
    temperature: sampling temperature (0 = greedy).
    top_k: keep the k most likely tokens.
    seed: sampling seed.
    step: checkpoint step (default: the latest).
    tokenizer_file: local vocabulary for gpt2 runs.
    attn_impl: linear-attention impl to run the model with (default: the run's
      own; see ``load_run``).
    beta: the normalisation-anneal weight to sample at, in [0, 1] (QSF §3.4,
      D5; default: the checkpoint's own). ``beta=0`` samples an annealed
      stage's weights with plain LayerNorm, as ``evaluate --beta=0`` scores them.

  Returns:
    The generated continuation (without the prompt).

  Raises:
    ValueError: for a beta outside [0, 1] (checked before loading), one other
      than the checkpoint's own for a stage without the anneal, and the errors
      of ``sample_text``.
  """
  from qsf_jax.training.restore import check_beta, load_run, run_beta  # pylint: disable=g-import-not-at-top

  check_beta(beta)
  run = load_run(workdir, step=step, tokenizer_file=tokenizer_file, attn_impl=attn_impl)
  return sample_text(run.model, run.params, run.collections, run.tokenizer, prompt,
                     max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                     top_k=top_k, beta=run_beta(run, beta),
                     max_len=run.model_config.max_seq_len)
