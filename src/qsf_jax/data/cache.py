"""Tokenize once into a memory-mapped uint16 token stream, cached on disk.

A cache entry is a directory ``<cache_dir>/<source>-<tokenizer>-<key>/`` holding

* ``train.bin``, ``valid.bin``: raw uint16 token ids, little-endian;
* ``train_offsets.npy``, ``valid_offsets.npy``: int64 story offsets;
* ``meta.json``: the key's inputs, token and story counts;
* ``builder.json``: the host and process id that built it.

Each split is the concatenation ``story_0 EOT story_1 EOT ...``; story ``i`` is
``tokens[offsets[i]:offsets[i+1]]`` and ends with its EOT. So both one story
per example (QSF spec D13) and packed windows come from the same arrays.

The key hashes the source identity (file sha256s, hub fingerprints or
synthetic settings), the tokenizer name and sha256, the story limit and
``CACHE_FORMAT_VERSION``. An entry is written into a temporary directory and
renamed into place in one step, so an interrupted run never leaves a partial
entry behind. The temporary directory names its builder (host and process id,
in ``builder.json``, on which the builder holds an exclusive ``flock`` while it
works); a build removes the temporary directories of builders on this host
that no longer run (killed before they could clean up, e.g. by SIGKILL or an
out-of-memory kill), so their partial tokens do not pile up. A builder counts
as gone only if its process id is not running here and its lock is free, so a
live build in another process namespace (a container sharing the folder and
the host name) is never removed. Entries are made with the permissions the
umask allows, so a cache folder can be shared between users.

An entry whose files are damaged (truncated, emptied, unreadable as arrays,
offsets that do not partition the tokens) is moved aside and rebuilt, with a
warning; an entry this user cannot read is an error that says so.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import pathlib
import secrets
import shutil
import socket
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from qsf_jax.data.cache_builds import _BUILDER_FILE, _move_aside, fcntl, remove_abandoned_builds
from qsf_jax.data.errors import DataChangedWhileReadingError, EmptyDataError, VocabTooLargeError
from qsf_jax.data.local_files import StorySource
from qsf_jax.data.tokenizer import Tokenizer

# Part of every cache key: bump it whenever the cached tokens of the same files would
# differ (how stories are parsed, stripped, split or tokenized, or the file layout).
CACHE_FORMAT_VERSION = 1
CACHE_DIR_ENV = "QSF_CACHE_DIR"
UINT16_LIMIT = 1 << 16
_ENCODE_CHUNK = 1024  # stories per encode_batch call
_TOKEN_DTYPE = np.dtype("<u2")  # uint16, little-endian on every machine


class TokenSplit(NamedTuple):
  """One split's token stream.

  Attributes:
    tokens: uint16 token ids, stories separated by EOT (N,); a read-only memmap.
    offsets: int64 story boundaries (S+1,), ``offsets[0] = 0``, ``offsets[-1] = N``.
    eot_id: the EOT id (story separator and pad id).
  """
  tokens: np.ndarray
  offsets: np.ndarray
  eot_id: int

  @property
  def n_tokens(self) -> int:
    """Number of tokens N, EOTs included."""
    return int(self.tokens.shape[0])

  @property
  def n_stories(self) -> int:
    """Number of stories S."""
    return int(self.offsets.shape[0]) - 1

  def story(self, i: int) -> np.ndarray:
    """Tokens of story ``i``, ending with EOT (uint16, (L,))."""
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """``cache_dir``, else ``$QSF_CACHE_DIR``, else ``~/.cache/qsf_jax``."""
  if cache_dir is None:
    cache_dir = os.environ.get(CACHE_DIR_ENV) or "~/.cache/qsf_jax"
  return pathlib.Path(cache_dir).expanduser()


def check_vocab_fits(tokenizer: Tokenizer) -> None:
  """Raises ``VocabTooLargeError`` if ids can exceed the uint16 range."""
  if tokenizer.vocab_size > UINT16_LIMIT:
    raise VocabTooLargeError(
        f"tokenizer {tokenizer.name!r} has vocab_size {tokenizer.vocab_size}; the token "
        f"cache stores uint16 ids, so vocab_size must be <= {UINT16_LIMIT}")


def cache_key(source: StorySource, tokenizer: Tokenizer, max_train_stories: int | None) -> dict:
  """The JSON-serialisable inputs of the cache key, and their sha256 as ``"key"``."""
  inputs = {
      "format_version": CACHE_FORMAT_VERSION,
      "source": source.identity,
      "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256,
                    "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id},
      "max_train_stories": max_train_stories,
  }
  blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
  return {"key": hashlib.sha256(blob).hexdigest(), "inputs": inputs}


def _write_split(stories: Iterable[str], tokenizer: Tokenizer, bin_path: pathlib.Path,
                 offsets_path: pathlib.Path, split: str, where: str) -> tuple[int, int]:
  """Tokenizes ``stories`` (each + EOT) into ``bin_path``; returns (stories, tokens)."""
  offsets, n_tokens = [0], 0
  id_limit = min(tokenizer.vocab_size, UINT16_LIMIT)
  eot = np.array([tokenizer.eot_id], _TOKEN_DTYPE)
  it = iter(stories)
  with open(bin_path, "wb") as f:
    while chunk := list(itertools.islice(it, _ENCODE_CHUNK)):
      for ids in tokenizer.encode_batch(chunk):
        ids_L = np.asarray(ids, dtype=np.int64)
        if ids_L.size and (ids_L.min() < 0 or ids_L.max() >= id_limit):
          raise VocabTooLargeError(
              f"tokenizer {tokenizer.name!r} produced ids in [{ids_L.min()}, {ids_L.max()}], "
              f"outside [0, {id_limit})")
        f.write(ids_L.astype(_TOKEN_DTYPE).tobytes())
        f.write(eot.tobytes())
        n_tokens += ids_L.size + 1
        offsets.append(n_tokens)
    f.flush()
    os.fsync(f.fileno())
  if len(offsets) == 1:
    raise EmptyDataError(f"{where}: the {split} split holds no stories")
  with open(offsets_path, "wb") as f:
    np.save(f, np.asarray(offsets, np.int64))
    f.flush()
    os.fsync(f.fileno())
  return len(offsets) - 1, n_tokens


class _CorruptEntry(Exception):
  """A cache entry whose files are damaged (internal: the entry is rebuilt)."""


def _open_split(entry: pathlib.Path, split: str, eot_id: int) -> TokenSplit:
  """Opens one split of an entry; ``_CorruptEntry`` if its files are damaged."""
  try:
    tokens = np.memmap(entry / f"{split}.bin", dtype=_TOKEN_DTYPE, mode="r")
    offsets = np.load(entry / f"{split}_offsets.npy", allow_pickle=False)
  except PermissionError:
    raise
  except (OSError, ValueError) as e:  # missing, empty, odd-sized or not an array
    raise _CorruptEntry(f"{split}: {e}") from e
  if (offsets.dtype != np.int64 or offsets.ndim != 1 or offsets.size < 2
      or offsets[0] != 0 or offsets[-1] != tokens.shape[0]
      or not np.all(np.diff(offsets) > 0)):
    raise _CorruptEntry(f"{split}: the story offsets do not partition the tokens")
  return TokenSplit(tokens=tokens, offsets=offsets, eot_id=eot_id)


def _read_meta(entry: pathlib.Path, key: str) -> dict | None:
  """The entry's metadata if it is complete and for ``key``, else None.

  Raises ``PermissionError`` (with the fix) for an entry this user cannot read.
  """
  try:
    meta = json.loads((entry / "meta.json").read_text())
  except PermissionError as e:
    raise PermissionError(
        f"the token cache entry {entry} is not readable by this user (made by another "
        f"user without group/other read permission?); ask its owner to open it, delete "
        f"it, or set --cache_dir / ${CACHE_DIR_ENV} to a folder of your own") from e
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) and meta.get("cache_key") == key else None


def build_or_load(source: StorySource, tokenizer: Tokenizer, *,
                  cache_dir: str | os.PathLike | None = None,
                  max_train_stories: int | None = None):
  """Returns ``(train, valid, meta, cache_hit)``, tokenizing only on a cache miss.

  Args:
    source: where the stories come from.
    tokenizer: the tokenizer (``vocab_size`` <= 65536).
    cache_dir: cache root (see ``default_cache_dir``).
    max_train_stories: keep only the first this many training stories (QSF
      spec D13 uses the first 500,000); None keeps all.

  Raises:
    VocabTooLargeError: ids do not fit uint16.
    EmptyDataError: a split holds no stories.
    DataChangedWhileReadingError: local files changed while they were read.
  """
  check_vocab_fits(tokenizer)
  if max_train_stories is not None and max_train_stories < 1:
    raise ValueError(f"max_train_stories must be >= 1 or None, got {max_train_stories}")
  key = cache_key(source, tokenizer, max_train_stories)
  root = default_cache_dir(cache_dir)
  for folder in (root, *root.parents):  # mkdir would raise a bare FileExistsError
    if folder.exists():
      if not folder.is_dir():
        raise ValueError(f"the token cache folder {root} cannot be created: {folder} is a "
                         f"file (set cache_dir, --cache_dir or ${CACHE_DIR_ENV} to a folder)")
      break
  kind = source.identity.get("kind", "data")
  entry = root / f"{kind}-{tokenizer.name}-{key['key'][:24]}"
  for attempt in (1, 2):
    meta = _read_meta(entry, key["key"])
    hit = meta is not None
    if not hit:
      if entry.exists():  # no complete metadata: a damaged entry, not one being built
        _move_aside(entry, "its meta.json is missing or unreadable")
      meta = _build(entry, source, tokenizer, key, max_train_stories, root)
    try:
      train = _open_split(entry, "train", tokenizer.eot_id)
      valid = _open_split(entry, "valid", tokenizer.eot_id)
    except _CorruptEntry as e:
      if attempt == 2:
        raise ValueError(f"the token cache entry {entry} was damaged again right after it "
                         f"was rebuilt ({e}); check the disk, or set --cache_dir / "
                         f"${CACHE_DIR_ENV} to another folder") from e
      _move_aside(entry, str(e))
      continue
    return train, valid, dict(meta, cache_path=str(entry)), hit
  raise AssertionError("unreachable")


def _build(entry: pathlib.Path, source: StorySource, tokenizer: Tokenizer, key: dict,
           max_train_stories: int | None, root: pathlib.Path) -> dict:
  """Tokenizes ``source`` into a temporary folder and renames it to ``entry``; the meta."""
  try:
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(root)
    while True:  # not mkdtemp: its folders are 0700, which other users cannot read
      tmp = root / f".{entry.name}.tmp-{secrets.token_hex(6)}"
      try:
        tmp.mkdir()  # the umask decides, as for any other folder
        break
      except FileExistsError:
        continue
  except OSError as e:
    raise OSError(e.errno, f"cannot write the token cache in {root} ({e.strerror}); set "
                  f"--cache_dir / ${CACHE_DIR_ENV} to a writable folder") from e
  try:
    with open(tmp / _BUILDER_FILE, "w") as lock:
      if fcntl is not None:  # held until the build ends (taken before the file says who
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # builds): a live build is never removed
      lock.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
      lock.flush()
      train_stories = source.train()
      if max_train_stories is not None:
        train_stories = itertools.islice(train_stories, max_train_stories)
      counts = {}
      for split, stories in (("train", train_stories), ("valid", source.valid())):
        counts[split] = _write_split(stories, tokenizer, tmp / f"{split}.bin",
                                     tmp / f"{split}_offsets.npy", split, source.description)
      if source.recheck is not None and source.recheck() != source.identity:
        raise DataChangedWhileReadingError(
            f"{source.description}: the files changed while they were read (a copy still "
            "being written?); nothing was cached; run again once they are complete")
      meta = {
          "cache_key": key["key"], "key_inputs": key["inputs"],
          "source": source.name, "source_description": source.description,
          "train_stories": counts["train"][0], "train_tokens": counts["train"][1],
          "valid_stories": counts["valid"][0], "valid_tokens": counts["valid"][1],
      }
      with open(tmp / "meta.json", "w") as f:
        f.write(json.dumps(meta, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
      try:
        os.rename(tmp, entry)  # atomic: the entry appears complete or not at all
      except OSError as e:
        # A concurrent run may have renamed an identical entry into place first.
        if _read_meta(entry, key["key"]) is None:
          raise ValueError(
              f"cache entry {entry} exists but is unreadable; delete it and retry") from e
  except OSError as e:
    if isinstance(e, PermissionError) or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                                          errno.EFBIG):
      raise
    raise OSError(e.errno, f"cannot write the token cache in {root} ({e.strerror}); free "
                  f"space or set --cache_dir / ${CACHE_DIR_ENV} to another folder") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return meta
