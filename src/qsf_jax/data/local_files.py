"""Stories from local files: ``.txt``, ``.jsonl``/``.json`` and ``.parquet``.

File formats (UTF-8, a leading byte-order mark dropped; one story per record;
every story is stripped of surrounding whitespace and empty stories are dropped):

* ``.txt``: stories separated by ``<|endoftext|>`` (TinyStories' own layout).
* ``.jsonl`` / ``.json``: JSON Lines, one object per line with a ``text`` field.
* ``.parquet``: a ``text`` column.

A data PATH is either one such file or a directory. In a directory, every
supported file below it (recursively, sorted by relative path) is classified by
the words of its path below the directory, folder names included (split at
non-alphanumerics, case-insensitive, trailing digits dropped, so ``val1`` is
the word ``val``):

* a file whose path has a word ``valid``, ``validation``, ``val``, ``dev``,
  ``valset`` or ``devset`` is validation data (``TinyStories-valid.txt``,
  ``validation-00000.parquet``, ``valid/part0.txt``, ``val1.txt``);
* a file whose path has a word ``test``, ``testing``, ``testset``, ``eval`` or
  ``evaluation`` (and none of the above) is held-out data of another kind:
  never trained on, ignored;
* a file whose path has a word ``train``, ``training`` or ``trainset`` is
  training data (``train2.txt``);
* if no file is named ``train``, every other file is training data; otherwise
  files named none of these ways are ignored. The description names the
  training, validation and ignored files (the first three of each).

When no validation file exists (a single file, or a directory without one), a
deterministic ``valid_fraction`` of the training stories, evenly spaced through
the file order, is held out for validation.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from qsf_jax.data.errors import DataNotFoundError, EmptyDataError, UnknownDataSpecError
from qsf_jax.data.tokenizer import ENDOFTEXT, file_sha256

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_VALID_WORDS = frozenset({"valid", "validation", "val", "dev", "valset", "devset"})
_HELD_OUT_WORDS = frozenset({"test", "testing", "testset", "eval", "evaluation"})  # never trained on
_TRAIN_WORDS = frozenset({"train", "training", "trainset"})


class StorySource(NamedTuple):
  """A source of train and validation stories.

  Attributes:
    name: ``"tinystories"``, ``"synthetic"`` or ``"path:<absolute path>"``.
    description: one human-readable line.
    identity: JSON-serialisable dict that identifies the content (file hashes,
      dataset fingerprints or generator settings); part of the cache key.
    train: callable returning an iterable of training stories.
    valid: callable returning an iterable of validation stories.
    recheck: callable returning the identity computed afresh (local files: their
      hashes again), or None; the token cache compares it with ``identity`` after
      reading the stories, so that files changed meanwhile are not cached under
      the old hashes.
  """
  name: str
  description: str
  identity: dict
  train: Callable[[], Iterable[str]]
  valid: Callable[[], Iterable[str]]
  recheck: Callable[[], dict] | None = None


# A UTF-8 byte-order mark (some Windows editors write one) is not text: "utf-8-sig"
# drops it at the start of a file (it stayed on the first story before).
_UTF8_BOM = b"\xef\xbb\xbf"


def _starts_with_bom(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    return f.read(len(_UTF8_BOM)) == _UTF8_BOM


def _iter_txt(path: pathlib.Path, chunk_chars: int = 1 << 20) -> Iterator[str]:
  """The ENDOFTEXT-separated pieces of a file, read in chunks of ``chunk_chars``.

  The text since the last separator is kept as a list of chunks and joined only
  when a separator arrives, so a long story (a book without separators) costs
  linear time, not a re-split of everything read so far at every chunk.
  """
  keep = len(ENDOFTEXT) - 1  # a separator can straddle two chunks by this much
  with open(path, encoding="utf-8-sig") as f:
    pending: list[str] = []
    tail = ""
    for chunk in iter(lambda: f.read(chunk_chars), ""):
      if ENDOFTEXT not in tail + chunk:
        pending.append(chunk)
        tail = (tail + chunk)[-keep:]
        continue
      parts = "".join(pending + [chunk]).split(ENDOFTEXT)
      pending = [parts.pop()]
      tail = pending[0][-keep:]
      yield from parts
    yield "".join(pending)


def _iter_jsonl(path: pathlib.Path) -> Iterator[str]:
  with open(path, encoding="utf-8-sig") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not a JSON object per line ({e})") from e
      if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}:{lineno}: each line must be an object with a string 'text' field")
      yield record["text"]


def _iter_parquet(path: pathlib.Path) -> Iterator[str]:
  import pyarrow.parquet as pq
  pf = pq.ParquetFile(path)
  if "text" not in pf.schema_arrow.names:
    raise ValueError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
  for batch in pf.iter_batches(columns=["text"], batch_size=4096):
    for text in batch.column(0).to_pylist():
      if text is not None:
        yield text


def iter_file_stories(path: str | pathlib.Path) -> Iterator[str]:
  """Yields the stripped, non-empty stories of one local file (format by suffix).

  Args:
    path: a ``.txt``, ``.jsonl``/``.json`` or ``.parquet`` file.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  reader = {".txt": _iter_txt, ".jsonl": _iter_jsonl, ".json": _iter_jsonl,
            ".parquet": _iter_parquet}.get(suffix)
  if reader is None:
    raise UnknownDataSpecError(
        f"unsupported data file {path}: expected one of {list(SUPPORTED_SUFFIXES)}")
  stories = reader(path)
  while True:
    try:
      story = next(stories)
    except StopIteration:
      return
    except UnicodeDecodeError as e:
      raise ValueError(f"{path} is not UTF-8 text ({e.reason}: {e.object[e.start:e.end]!r}); "
                       "convert it, e.g. with iconv -f latin1 -t utf-8") from e
    story = story.strip()
    if story:
      yield story


def _chain(paths: Sequence[pathlib.Path]) -> Iterator[str]:
  for p in paths:
    yield from iter_file_stories(p)


def _is_held_out(i: int, n: int, n_valid: int) -> bool:
  """Whether story ``i`` of ``n`` is one of ``n_valid`` evenly spaced picks."""
  return (i + 1) * n_valid // n > i * n_valid // n


def _holdout(paths: Sequence[pathlib.Path], valid_fraction: float, where: str):
  """Train/valid callables that split ``paths`` deterministically."""
  if not 0.0 < valid_fraction < 1.0:
    raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
  counts = {}

  def sizes() -> tuple[int, int]:
    if "n" not in counts:
      n = sum(1 for _ in _chain(paths))
      if n < 2:
        raise EmptyDataError(
            f"{where} holds {n} stories; at least 2 are needed to hold out validation "
            "stories (or provide a separate validation file)")
      counts["n"] = n
    n = counts["n"]
    return n, min(n - 1, max(1, round(valid_fraction * n)))

  def pick(keep_valid: bool) -> Iterator[str]:
    n, n_valid = sizes()
    for i, story in enumerate(_chain(paths)):
      if _is_held_out(i, n, n_valid) == keep_valid:
        yield story

  return (lambda: pick(False)), (lambda: pick(True))


def _classify(root: pathlib.Path):
  files = sorted(p for p in root.rglob("*")
                 if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
                 and not any(part.startswith(".") for part in p.relative_to(root).parts))
  if not files:
    raise DataNotFoundError(
        f"data directory {root} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
  def words(p):  # trailing digits dropped: "val1", "train2", "test01" are keywords too
    rel = p.relative_to(root)
    parts = re.split(r"[^a-z0-9]+", "/".join(rel.parts[:-1] + (rel.stem,)).lower())
    return {x.rstrip("0123456789") for x in parts}

  w = {p: words(p) for p in files}
  valid = [p for p in files if w[p] & _VALID_WORDS]
  held_out = [p for p in files if w[p] & _HELD_OUT_WORDS and p not in valid]
  rest = [p for p in files if p not in valid and p not in held_out]
  train = [p for p in rest if w[p] & _TRAIN_WORDS] or rest
  if not train:
    raise DataNotFoundError(
        f"data directory {root} holds only validation or test files "
        f"({[p.relative_to(root).as_posix() for p in valid + held_out]}); name the training "
        "files (or their folder) with the word 'train'")
  ignored = [p for p in files if p not in train and p not in valid]
  return train, valid, ignored


def local_source(path: str | pathlib.Path, *, valid_fraction: float = 0.05) -> StorySource:
  """A ``StorySource`` for a local file or directory (conventions in the module doc).

  Args:
    path: a supported file, or a directory of them.
    valid_fraction: share of stories held out when there is no validation file.

  Raises:
    DataNotFoundError: the path does not exist or holds no supported files.
    UnknownDataSpecError: a file with an unsupported suffix.
  """
  if not 0.0 < valid_fraction < 1.0:  # also where a validation file makes it unused
    raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
  root = pathlib.Path(path).expanduser().resolve()
  if not root.exists():
    raise DataNotFoundError(f"data path {root} does not exist")
  ignored = []
  if root.is_dir():
    train_files, valid_files, ignored = _classify(root)
  else:
    if root.suffix.lower() not in SUPPORTED_SUFFIXES:
      raise UnknownDataSpecError(
          f"unsupported data file {root}: expected one of {list(SUPPORTED_SUFFIXES)}")
    train_files, valid_files = [root], []
  base = root if root.is_dir() else root.parent
  # Content hashes (plus names relative to the PATH, which fix the order) key the cache.
  def hashes() -> dict:
    out = {"kind": "local"}
    for split, paths in (("train", train_files), ("valid", valid_files)):
      out[split] = [[p.relative_to(base).as_posix(), file_sha256(p)] for p in paths]
    if not valid_files:
      out["valid_fraction"] = valid_fraction
    # Files whose leading BOM is dropped (tokens differ from those cached before that
    # was done, so their key changes; every other source keeps its key).
    bom = [p.relative_to(base).as_posix() for p in (*train_files, *valid_files)
           if p.suffix.lower() != ".parquet" and _starts_with_bom(p)]
    if bom:
      out["utf8_bom_dropped"] = bom
    return out

  identity = hashes()
  def names(paths):  # the first three, so that a misnamed file shows in the log
    out = ", ".join(p.relative_to(base).as_posix() for p in paths[:3])
    return out + (", ..." if len(paths) > 3 else "")

  if valid_files:
    def train():
      return _chain(train_files)

    def valid():
      return _chain(valid_files)

    how = (f"{len(train_files)} train file(s): {names(train_files)} / "
           f"{len(valid_files)} validation file(s): {names(valid_files)}")
  else:
    train, valid = _holdout(train_files, valid_fraction, str(root))
    how = (f"{len(train_files)} file(s): {names(train_files)}, {valid_fraction:g} of the "
           "stories held out for validation")
  if ignored:
    how += f"; ignored {len(ignored)} file(s): {names(ignored)}"
  return StorySource(name=f"path:{root}", description=f"local data {root} ({how})",
                     identity=identity, train=train, valid=valid, recheck=hashes)
