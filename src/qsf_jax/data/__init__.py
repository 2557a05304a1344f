"""Tokenizers, corpora and the cached token stream for language-model training."""
