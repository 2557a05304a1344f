"""Tokenizers: GPT-2 BPE (tiktoken, offline-capable) and a byte-level fallback.

``get_tokenizer("gpt2")`` follows QSF spec §4.1 (GPT-2 tokenizer, V = 50,257,
EOT = 50256). It is built from a local ``r50k_base.tiktoken`` when one is given
(``tokenizer_file=`` or ``$QSF_TOKENIZER_FILE``), after checking the file's
sha256; otherwise ``tiktoken.get_encoding("gpt2")`` downloads (or reads from
its cache) the vocabulary, and where that fails (no network) the copy bundled
with the package (``assets/r50k_base.tiktoken``, sha256-checked) is used, with a
log line saying so.
``gpt2`` and ``r50k_base`` are the same BPE (same ranks, regex and EOT), so
both routes give identical ids and record the same ``sha256``.

``get_tokenizer("bytes")`` needs no file and no network: ids 0..255 are the
UTF-8 bytes and 256 is ``<|endoftext|>`` (vocabulary 257).
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
from collections.abc import Callable, Sequence

from absl import logging
from typing import NamedTuple

from qsf_jax.data.errors import TokenizerHashError, TokenizerUnavailableError, UnknownTokenizerError

ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256
R50K_FILENAME = "r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
TOKENIZER_FILE_ENV = "QSF_TOKENIZER_FILE"

BYTES_VOCAB_SIZE = 257
BYTES_EOT_ID = 256
# A fixed identifier for the byte tokenizer (it has no vocabulary file).
BYTES_SHA256 = hashlib.sha256(
    b"qsf_jax bytes tokenizer v1: ids 0-255 = UTF-8 bytes, 256 = <|endoftext|>").hexdigest()

TOKENIZER_NAMES = ("gpt2", "bytes")


class Tokenizer(NamedTuple):
  """A text tokenizer with a fixed vocabulary.

  Attributes:
    name: ``"gpt2"`` or ``"bytes"``.
    vocab_size: number of token ids (ids are ``0 .. vocab_size - 1``).
    eot_id: id of ``<|endoftext|>``, used as story separator and pad id.
    encode: ``str -> list[int]``; the text is treated as plain text (a literal
      ``<|endoftext|>`` inside it is not turned into ``eot_id``).
    decode: ``Sequence[int] -> str``; ``eot_id`` decodes to ``<|endoftext|>``
      and invalid UTF-8 is replaced by U+FFFD.
    sha256: sha256 of the vocabulary file (``r50k_base.tiktoken`` for gpt2) or
      a fixed identifier for ``bytes``; checkpoints record it with ``name``.
    encode_batch: ``Sequence[str] -> list[list[int]]``, same as ``encode``
      applied to each text (multi-threaded for gpt2).
  """
  name: str
  vocab_size: int
  eot_id: int
  encode: Callable[[str], list[int]]
  decode: Callable[[Sequence[int]], str]
  sha256: str
  encode_batch: Callable[[Sequence[str]], list[list[int]]]


def file_sha256(path: str | os.PathLike) -> str:
  """The sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _bytes_tokenizer() -> Tokenizer:
  def encode(text: str) -> list[int]:
    try:
      return list(text.encode("utf-8"))
    except UnicodeEncodeError:
      # A lone surrogate (half of a pair, e.g. a "\ud83d" escape in scraped JSON) is not
      # encodable; it becomes U+FFFD, as tiktoken's GPT-2 encoder does.
      return list(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                  .encode("utf-8"))

  def decode(ids: Sequence[int]) -> str:
    parts, run = [], bytearray()
    for i in ids:
      i = int(i)
      if i == BYTES_EOT_ID:
        parts.append(run.decode("utf-8", errors="replace"))
        parts.append(ENDOFTEXT)
        run = bytearray()
      elif 0 <= i < 256:
        run.append(i)
      else:
        raise ValueError(f"token id {i} is outside the bytes vocabulary [0, {BYTES_VOCAB_SIZE})")
    parts.append(run.decode("utf-8", errors="replace"))
    return "".join(parts)

  return Tokenizer(
      name="bytes", vocab_size=BYTES_VOCAB_SIZE, eot_id=BYTES_EOT_ID, encode=encode,
      decode=decode, sha256=BYTES_SHA256, encode_batch=lambda texts: [encode(t) for t in texts])


def _ranks_sha256(enc) -> str:
  """sha256 of an encoding's ranks written in the ``.tiktoken`` file format.

  Each mergeable token is one line ``base64(token_bytes) rank`` in rank order,
  which is exactly how ``r50k_base.tiktoken`` is laid out; so an encoding
  downloaded by tiktoken gets the same identifier as one built from the file.
  """
  n = enc.n_vocab - len(enc.special_tokens_set)
  h = hashlib.sha256()
  for rank in range(n):
    h.update(base64.b64encode(enc.decode_single_token_bytes(rank)) + b" %d\n" % rank)
  return h.hexdigest()


def _gpt2_from_file(path: pathlib.Path):
  """Builds the GPT-2 ``tiktoken.Encoding`` from a verified local file."""
  import tiktoken
  from tiktoken_ext.openai_public import r50k_pat_str

  if path.is_dir():
    path = path / R50K_FILENAME
  if not path.is_file():
    what = "is not a regular file" if path.exists() else "does not exist"
    raise FileNotFoundError(
        f"tokenizer file {path} {what}; point tokenizer_file (or "
        f"${TOKENIZER_FILE_ENV}) at a local {R50K_FILENAME} (sha256 {R50K_SHA256})")
  data = path.read_bytes()  # hashed and parsed as one read: it cannot change in between
  actual = hashlib.sha256(data).hexdigest()
  if actual != R50K_SHA256:
    raise TokenizerHashError(str(path), R50K_SHA256, actual)
  ranks = {}
  for line in data.splitlines():
    if line:
      token, rank = line.split()
      ranks[base64.b64decode(token)] = int(rank)
  return tiktoken.Encoding(
      name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
      special_tokens={ENDOFTEXT: GPT2_EOT_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)


BUNDLED_R50K = pathlib.Path(__file__).resolve().parent / "assets" / "r50k_base.tiktoken"
# Why tiktoken could not load the vocabulary in this process (None: not tried, or it
# worked). Once set, later loads take the bundled copy without another download attempt
# (e.g. the several loads of one progressive run), and without another warning.
_tiktoken_failure: str | None = None


def _gpt2_from_tiktoken():
  """``tiktoken.get_encoding("gpt2")`` with an actionable error when offline."""
  import tiktoken
  try:
    return tiktoken.get_encoding("gpt2")
  except Exception as e:  # requests/urllib errors, or a failed hash check after a download
    raise TokenizerUnavailableError(
        f"could not load the GPT-2 vocabulary with tiktoken ({type(e).__name__}: {e}). "
        f"Without network, point at a local copy: get_tokenizer('gpt2', "
        f"tokenizer_file='/path/to/{R50K_FILENAME}') or set "
        f"{TOKENIZER_FILE_ENV}=/path/to/{R50K_FILENAME} (sha256 {R50K_SHA256}), "
        "or use the 'bytes' tokenizer") from e


def _gpt2_online_or_bundled():
  """tiktoken's GPT-2 vocabulary, or the bundled copy once tiktoken has failed.

  Returns:
    (``tiktoken.Encoding``, sha256): of tiktoken's ranks re-serialised in the
    r50k format (``_ranks_sha256``), or of the bundled file (verified).
  """
  global _tiktoken_failure
  if _tiktoken_failure is None:
    try:
      enc = _gpt2_from_tiktoken()
      return enc, _ranks_sha256(enc)
    except TokenizerUnavailableError as e:
      if not BUNDLED_R50K.is_file():
        raise
      cause = e.__cause__ or e
      first_line = (str(cause).splitlines() or [""])[0][:160]
      _tiktoken_failure = f"{type(cause).__name__}: {first_line}"
      logging.warning("GPT-2 vocabulary not available from tiktoken (%s); using the bundled "
                      "copy %s (sha256 verified) for the rest of this process",
                      _tiktoken_failure, BUNDLED_R50K)
  elif not BUNDLED_R50K.is_file():
    raise TokenizerUnavailableError(
        f"could not load the GPT-2 vocabulary with tiktoken ({_tiktoken_failure}) and the "
        f"bundled copy {BUNDLED_R50K} is missing. Point at a local copy: get_tokenizer('gpt2', "
        f"tokenizer_file='/path/to/{R50K_FILENAME}') or set "
        f"{TOKENIZER_FILE_ENV}=/path/to/{R50K_FILENAME} (sha256 {R50K_SHA256}), "
        "or use the 'bytes' tokenizer")
  return _gpt2_from_file(BUNDLED_R50K), R50K_SHA256


def get_tokenizer(name: str = "gpt2", *,
                  tokenizer_file: str | os.PathLike | None = None) -> Tokenizer:
  """Returns a tokenizer by name (QSF spec §4.1: GPT-2 BPE, V = 50,257, EOT 50256).

  Args:
    name: ``"gpt2"`` (GPT-2 BPE) or ``"bytes"`` (256 byte ids + EOT).
    tokenizer_file: for ``gpt2``, a local ``r50k_base.tiktoken`` (or a folder
      holding one); defaults to ``$QSF_TOKENIZER_FILE``. Without either,
      tiktoken downloads the vocabulary, falling back to the bundled copy
      offline. Ignored for ``bytes``.

  Raises:
    UnknownTokenizerError: ``name`` is not supported.
    TokenizerHashError: the local file's sha256 is not ``R50K_SHA256``.
    FileNotFoundError: the local file does not exist.
    TokenizerUnavailableError: no local file, tiktoken's download failed and
      the bundled copy is missing.
  """
  if name == "bytes":
    return _bytes_tokenizer()
  if name != "gpt2":
    raise UnknownTokenizerError(
        f"unknown tokenizer {name!r}; choose one of {list(TOKENIZER_NAMES)}")
  if tokenizer_file is None or str(tokenizer_file) == "":  # "" (an empty flag) means unset
    tokenizer_file = os.environ.get(TOKENIZER_FILE_ENV) or None
  if tokenizer_file is not None:
    enc = _gpt2_from_file(pathlib.Path(tokenizer_file).expanduser())
    sha = R50K_SHA256  # verified above
  else:
    enc, sha = _gpt2_online_or_bundled()
  if enc.n_vocab != GPT2_VOCAB_SIZE or enc.eot_token != GPT2_EOT_ID:
    raise ValueError(
        f"GPT-2 encoding has n_vocab {enc.n_vocab} and eot {enc.eot_token}; "
        f"expected {GPT2_VOCAB_SIZE} and {GPT2_EOT_ID}")

  def decode(ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < enc.n_vocab]  # tiktoken: KeyError / OverflowError
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the gpt2 vocabulary [0, {enc.n_vocab})")
    return enc.decode(ids, errors="replace")

  return Tokenizer(
      name="gpt2", vocab_size=enc.n_vocab, eot_id=enc.eot_token, encode=enc.encode_ordinary,
      decode=decode, sha256=sha, encode_batch=enc.encode_ordinary_batch)
