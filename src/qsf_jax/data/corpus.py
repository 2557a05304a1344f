"""``load_corpus``: the single entry point the training code calls."""

from __future__ import annotations

import os
from typing import NamedTuple

from absl import logging

from qsf_jax.data.cache import CACHE_FORMAT_VERSION, TokenSplit, build_or_load
from qsf_jax.data.sources import TINYSTORIES_HUB_ID, resolve_source
from qsf_jax.data.tokenizer import Tokenizer, get_tokenizer


class Corpus(NamedTuple):
  """Tokenized train and validation streams with their provenance.

  Attributes:
    train: training token stream.
    valid: validation token stream.
    tokenizer: the tokenizer that produced them.
    metadata: JSON-serialisable dict: ``source`` (``"tinystories"``,
      ``"synthetic"`` or ``"path:<abs>"``), ``source_description``,
      ``tokenizer``, ``tokenizer_sha256``, ``vocab_size``, ``eot_id``,
      ``train_stories``, ``train_tokens``, ``valid_stories``,
      ``valid_tokens``, ``cache_key``, ``cache_path``, ``cache_hit``,
      ``format_version``, ``key_inputs``.
  """
  train: TokenSplit
  valid: TokenSplit
  tokenizer: Tokenizer
  metadata: dict


def load_corpus(data: str = "auto", tokenizer: Tokenizer | str = "gpt2", *,
                cache_dir: str | os.PathLike | None = None,
                tokenizer_file: str | os.PathLike | None = None,
                max_train_stories: int | None = None,
                valid_fraction: float = 0.05,
                synthetic_seed: int = 0,
                synthetic_train_stories: int = 20000,
                synthetic_valid_stories: int = 1000,
                hub_dataset: str = TINYSTORIES_HUB_ID,
                hub_revision: str | None = None) -> Corpus:
  """Loads (tokenizing once, then from the cache) a train/validation corpus.

  Follows QSF spec §4.1 and D13: TinyStories, GPT-2 BPE, one story per
  example; ``max_train_stories=500_000`` reproduces "the first 500,000 train
  stories".

  Args:
    data: ``"auto"`` (TinyStories if the hub answers, else synthetic),
      ``"tinystories"``, ``"synthetic"``, or a local file/directory PATH (see
      ``qsf_jax.data.local_files``).
    tokenizer: a ``Tokenizer`` or a name for ``get_tokenizer``.
    cache_dir: cache root; default ``$QSF_CACHE_DIR`` or ``~/.cache/qsf_jax``.
    tokenizer_file: local ``r50k_base.tiktoken`` when ``tokenizer`` is a name.
    max_train_stories: keep only the first this many training stories.
    valid_fraction: share held out when a PATH has no validation file.
    synthetic_seed: seed of the synthetic corpus.
    synthetic_train_stories: synthetic training stories.
    synthetic_valid_stories: synthetic validation stories.
    hub_dataset: hub dataset id for ``tinystories``/``auto``.
    hub_revision: hub revision, or None for the default.

  Returns:
    A ``Corpus``.
  """
  if isinstance(tokenizer, str):
    tokenizer = get_tokenizer(tokenizer, tokenizer_file=tokenizer_file)
  elif not isinstance(tokenizer, Tokenizer):
    raise ValueError(f"tokenizer must be a Tokenizer or a name, got {type(tokenizer).__name__}")
  source = resolve_source(
      data, valid_fraction=valid_fraction, synthetic_seed=synthetic_seed,
      synthetic_train_stories=synthetic_train_stories,
      synthetic_valid_stories=synthetic_valid_stories, hub_dataset=hub_dataset,
      hub_revision=hub_revision)
  train, valid, meta, hit = build_or_load(
      source, tokenizer, cache_dir=cache_dir, max_train_stories=max_train_stories)
  # The cache entry is shared by every path with the same contents (its key holds the
  # file hashes and the names below PATH): name this source, not the first one cached.
  metadata = dict(
      meta, source=source.name, source_description=source.description,
      cache_hit=hit, format_version=CACHE_FORMAT_VERSION, tokenizer=tokenizer.name,
      tokenizer_sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size,
      eot_id=tokenizer.eot_id)
  logging.info(
      "data: %s; %s tokenizer; train %d stories / %d tokens, valid %d stories / %d tokens "
      "(%s %s)", source.description, tokenizer.name, metadata["train_stories"],
      metadata["train_tokens"], metadata["valid_stories"], metadata["valid_tokens"],
      "cache hit" if hit else "tokenized into", metadata["cache_path"])
  return Corpus(train=train, valid=valid, tokenizer=tokenizer, metadata=metadata)
