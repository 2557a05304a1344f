"""Tokenizers, corpora and the cached token stream for language-model training.

Typical use::

  corpus = load_corpus("auto", "gpt2", tokenizer_file=None, cache_dir=None)
  batch = get_batch(corpus.train, seed=0, step=step, batch_size=32, seq_len=512)
  for batch in iter_eval_batches(corpus.valid, batch_size=32, seq_len=512): ...
"""

from qsf_jax.data.batches import MODES, get_batch, iter_eval_batches, num_eval_batches
from qsf_jax.data.cache import (
    CACHE_DIR_ENV,
    CACHE_FORMAT_VERSION,
    TokenSplit,
    build_or_load,
    default_cache_dir,
)
from qsf_jax.data.corpus import Corpus, load_corpus
from qsf_jax.data.errors import (
    DataChangedWhileReadingError,
    DataNotFoundError,
    DataUnavailableError,
    EmptyDataError,
    TokenizerHashError,
    TokenizerUnavailableError,
    UnknownDataSpecError,
    UnknownTokenizerError,
    VocabTooLargeError,
)
from qsf_jax.data.local_files import StorySource, iter_file_stories, local_source
from qsf_jax.data.sources import (
    DATA_NAMES,
    TINYSTORIES_HUB_ID,
    hub_source,
    resolve_source,
    synthetic_source,
)
from qsf_jax.data.synthetic import synthetic_stories, synthetic_story
from qsf_jax.data.tokenizer import (
    BYTES_SHA256,
    R50K_SHA256,
    TOKENIZER_FILE_ENV,
    Tokenizer,
    file_sha256,
    get_tokenizer,
)

__all__ = [
    "BYTES_SHA256", "CACHE_DIR_ENV", "CACHE_FORMAT_VERSION", "DATA_NAMES", "MODES",
    "R50K_SHA256", "TINYSTORIES_HUB_ID", "TOKENIZER_FILE_ENV",
    "Corpus", "StorySource", "TokenSplit", "Tokenizer",
    "DataChangedWhileReadingError", "DataNotFoundError", "DataUnavailableError",
    "EmptyDataError", "TokenizerHashError", "TokenizerUnavailableError",
    "UnknownDataSpecError", "UnknownTokenizerError", "VocabTooLargeError",
    "build_or_load", "default_cache_dir", "file_sha256", "get_batch", "get_tokenizer",
    "hub_source", "iter_eval_batches", "iter_file_stories", "load_corpus", "local_source",
    "num_eval_batches", "resolve_source", "synthetic_source", "synthetic_stories",
    "synthetic_story",
]
