"""Exceptions raised by the data and tokenizer pipeline.

Every class derives from a standard exception (``ValueError`` for bad input,
``ConnectionError`` for an unreachable network resource), so callers can catch
either the dedicated class or the standard one.
"""

from __future__ import annotations


class TokenizerHashError(ValueError):
  """A local vocabulary file does not have the expected sha256.

  Attributes:
    path: the file that was checked.
    expected: the sha256 that the tokenizer requires.
    actual: the sha256 of the file's bytes.
  """

  def __init__(self, path: str, expected: str, actual: str):
    self.path, self.expected, self.actual = str(path), expected, actual
    super().__init__(
        f"tokenizer file {self.path} has the wrong sha256: expected {expected}, "
        f"got {actual}. The file is corrupt or is not the GPT-2 r50k_base "
        "vocabulary; use an unmodified r50k_base.tiktoken")


class UnknownTokenizerError(ValueError):
  """The tokenizer name is not one of the supported names."""


class TokenizerUnavailableError(ConnectionError):
  """The tokenizer's vocabulary could not be fetched (e.g. no network)."""


class UnknownDataSpecError(ValueError):
  """The ``data`` string is neither a known source name nor a path."""


class DataChangedWhileReadingError(ValueError):
  """Local data files changed between their hashing and their tokenization (a copy
  still being written): the token cache would hold other stories than its key names."""


class DataNotFoundError(ValueError, FileNotFoundError):
  """A data path does not exist or holds no readable data files."""


class EmptyDataError(ValueError):
  """A data source holds no stories (or a split ended up empty)."""


class DataUnavailableError(ConnectionError):
  """A hub dataset was requested explicitly but could not be loaded."""


class VocabTooLargeError(ValueError):
  """The tokenizer's ids do not fit the uint16 token cache."""
