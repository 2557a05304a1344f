"""A tiny on-disk story corpus with a private token cache, for training tests."""

import contextlib
import os
import pathlib

from qsf_jax import data as qdata
from qsf_jax.data.synthetic import synthetic_stories


@contextlib.contextmanager
def story_corpus(root: pathlib.Path, n_stories: int, seed: int):
  """Writes ``root/stories.txt`` (synthetic stories, EOT-separated) and points the
  token cache at ``root/cache`` for the duration; yields the corpus path."""
  corpus = root / "stories.txt"
  corpus.write_text("\n<|endoftext|>\n".join(synthetic_stories(n_stories, seed=seed)))
  old = os.environ.get(qdata.CACHE_DIR_ENV)
  os.environ[qdata.CACHE_DIR_ENV] = str(root / "cache")
  try:
    yield corpus
  finally:
    if old is None:
      os.environ.pop(qdata.CACHE_DIR_ENV, None)
    else:
      os.environ[qdata.CACHE_DIR_ENV] = old
