"""load_corpus and the uint16 token cache: counts, reuse, keys, atomicity, errors."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from qsf_jax.data import (
    BYTES_SHA256,
    R50K_SHA256,
    DataChangedWhileReadingError,
    EmptyDataError,
    Tokenizer,
    VocabTooLargeError,
    get_batch,
    get_tokenizer,
    load_corpus,
)

STORIES = [f"Story {i}: Lily had {i} red balls and gave one to Tom." for i in range(40)]


def write_txt(path, stories):
  path.write_text("".join(s + "\n<|endoftext|>\n" for s in stories), encoding="utf-8")
  return path


def counting(tok):
  """The tokenizer with an ``encode_batch`` that counts the texts it encodes."""
  count = {"texts": 0}

  def encode_batch(texts):
    count["texts"] += len(texts)
    return tok.encode_batch(texts)

  return tok._replace(encode_batch=encode_batch), count


def entries(cache_dir):
  return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.fixture
def gpt2(shared_data_dir):
  return get_tokenizer("gpt2", tokenizer_file=shared_data_dir / "gpt2" / "r50k_base.tiktoken")


def test_shared_tinystories_with_gpt2(shared_data_dir, gpt2, tmp_path):
  corpus = load_corpus(str(shared_data_dir / "tinystories"), gpt2, cache_dir=tmp_path)
  m = corpus.metadata
  # Story and token counts from ../shared/data/README.md (GPT-2 tokens + 1 EOT per story).
  assert (m["train_stories"], m["valid_stories"]) == (2316, 1000)
  assert (m["train_tokens"], m["valid_tokens"]) == (502585, 194559)
  assert (m["tokenizer"], m["tokenizer_sha256"], m["vocab_size"], m["eot_id"]) == (
      "gpt2", R50K_SHA256, 50257, 50256)
  assert m["source"] == f"path:{(shared_data_dir / 'tinystories').resolve()}"
  assert not m["cache_hit"]
  json.dumps(m)  # serialisable, for checkpoint metadata
  for split, n in ((corpus.train, 502585), (corpus.valid, 194559)):
    assert split.tokens.dtype == np.uint16 and isinstance(split.tokens, np.memmap)
    assert split.n_tokens == n and split.offsets[0] == 0 and split.offsets[-1] == n
    assert np.all(np.diff(split.offsets) >= 2)
    ends = split.tokens[split.offsets[1:] - 1]
    assert np.all(ends == 50256)
    assert np.sum(split.tokens == 50256) == split.n_stories  # EOT only as separator
  assert gpt2.decode(corpus.valid.story(0)).startswith("Spot. Spot saw the shiny car")
  assert gpt2.decode(corpus.valid.story(0)).endswith("<|endoftext|>")


def test_cache_is_reused_without_retokenizing(tmp_path):
  data = write_txt(tmp_path / "stories.txt", STORIES)
  tok, count = counting(get_tokenizer("bytes"))
  cache = tmp_path / "cache"
  first = load_corpus(str(data), tok, cache_dir=cache)
  assert count["texts"] == 40 and not first.metadata["cache_hit"]
  bin_path = os.path.join(first.metadata["cache_path"], "train.bin")
  mtime = os.stat(bin_path).st_mtime_ns
  second = load_corpus(str(data), tok, cache_dir=cache)
  assert count["texts"] == 40 and second.metadata["cache_hit"]
  assert os.stat(bin_path).st_mtime_ns == mtime
  assert second.metadata["cache_path"] == first.metadata["cache_path"]
  np.testing.assert_array_equal(second.train.tokens, first.train.tokens)
  np.testing.assert_array_equal(second.valid.offsets, first.valid.offsets)
  assert len(entries(cache)) == 1
  # Stories round-trip through the cache (38 train + 2 held out).
  decoded = [tok.decode(s[:-1]) for s in map(second.train.story, range(second.train.n_stories))]
  held = [tok.decode(s[:-1]) for s in map(second.valid.story, range(second.valid.n_stories))]
  assert sorted(decoded + held) == sorted(STORIES) and len(held) == 2


def test_a_copy_shares_the_cache_entry_but_names_itself(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  first = write_txt(tmp_path / "a" / "stories.txt", STORIES)
  copy = write_txt(tmp_path / "b" / "stories.txt", STORIES)
  cache = tmp_path / "cache"
  one = load_corpus(str(first), "bytes", cache_dir=cache)
  two = load_corpus(str(copy), "bytes", cache_dir=cache)
  assert two.metadata["cache_hit"] and two.metadata["cache_key"] == one.metadata["cache_key"]
  assert one.metadata["source"] == f"path:{first}" and two.metadata["source"] == f"path:{copy}"
  assert str(copy) in two.metadata["source_description"]


def test_files_changed_while_read_are_not_cached(tmp_path):
  """A file rewritten between its hashing and its tokenization (a copy still being
  written) is refused, and no cache entry holds its new stories under the old hash."""
  data = write_txt(tmp_path / "stories.txt", STORIES)
  tok = get_tokenizer("bytes")

  def encode_batch(texts):  # the copy finishes while the first stories are encoded
    if data.read_text(encoding="utf-8").startswith("Story 0"):
      write_txt(data, ["Another story."] + STORIES[1:])
    return tok.encode_batch(texts)

  cache = tmp_path / "cache"
  with pytest.raises(DataChangedWhileReadingError, match="changed while they were read"):
    load_corpus(str(data), tok._replace(encode_batch=encode_batch), cache_dir=cache)
  assert entries(cache) == []  # neither an entry nor a temporary folder
  again = load_corpus(str(data), tok, cache_dir=cache)  # the completed file is read afresh
  assert not again.metadata["cache_hit"]
  stories = [tok.decode(split.story(i)[:-1]) for split in (again.train, again.valid)
             for i in range(split.n_stories)]
  assert sorted(stories) == sorted(["Another story."] + STORIES[1:])


def test_cache_key_tracks_tokenizer_content_and_limits(tmp_path, gpt2):
  data = write_txt(tmp_path / "stories.txt", STORIES)
  cache = tmp_path / "cache"
  paths = {load_corpus(str(data), "bytes", cache_dir=cache).metadata["cache_path"]}
  paths.add(load_corpus(str(data), gpt2, cache_dir=cache).metadata["cache_path"])
  other_bytes = get_tokenizer("bytes")._replace(sha256="0" * 64)
  paths.add(load_corpus(str(data), other_bytes, cache_dir=cache).metadata["cache_path"])
  c = load_corpus(str(data), "bytes", cache_dir=cache, max_train_stories=5)
  assert c.train.n_stories == 5 and c.metadata["key_inputs"]["max_train_stories"] == 5
  # D13's "first N training stories": the uncapped corpus's first five, in order, and
  # the same validation split
  full = load_corpus(str(data), "bytes", cache_dir=cache)
  first5 = full.train.tokens[:full.train.offsets[5]]
  np.testing.assert_array_equal(c.train.tokens, first5)
  np.testing.assert_array_equal(c.valid.tokens, full.valid.tokens)
  assert get_tokenizer("bytes").decode(c.train.story(0)[:-1]) == STORIES[0]
  paths.add(c.metadata["cache_path"])
  write_txt(data, STORIES[:-1] + ["A different last story."])
  changed = load_corpus(str(data), "bytes", cache_dir=cache)
  assert not changed.metadata["cache_hit"]
  paths.add(changed.metadata["cache_path"])
  assert len(paths) == 5 and len(entries(cache)) == 5
  assert changed.metadata["key_inputs"]["tokenizer"]["sha256"] == BYTES_SHA256


def test_cache_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("QSF_CACHE_DIR", str(tmp_path / "envcache"))
  c = load_corpus("synthetic", "bytes", synthetic_train_stories=20, synthetic_valid_stories=3)
  assert c.metadata["cache_path"].startswith(str(tmp_path / "envcache"))
  assert (c.metadata["source"], c.train.n_stories, c.valid.n_stories) == ("synthetic", 20, 3)


def test_interrupted_tokenization_leaves_no_entry(tmp_path):
  data = write_txt(tmp_path / "stories.txt", STORIES * 60)  # > one encode chunk
  bytes_tok = get_tokenizer("bytes")
  calls = []

  def flaky(texts):
    calls.append(len(texts))
    if len(calls) == 2:
      raise KeyboardInterrupt
    return bytes_tok.encode_batch(texts)

  cache = tmp_path / "cache"
  with pytest.raises(KeyboardInterrupt):
    load_corpus(str(data), bytes_tok._replace(encode_batch=flaky), cache_dir=cache)
  assert entries(cache) == []  # neither a partial entry nor a temporary directory
  c = load_corpus(str(data), bytes_tok, cache_dir=cache)
  assert not c.metadata["cache_hit"] and c.train.n_stories + c.valid.n_stories == 2400


def test_a_build_removes_what_killed_builders_left(tmp_path):
  """A SIGKILLed build leaves its temporary folder (no finally runs); the next build on
  this host removes those whose builder no longer runs, and nothing else."""
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  dead_pid = int(dead.stdout)
  cache = tmp_path / "cache"
  host = socket.gethostname()
  left = {}
  for name, builder in [("killed", {"host": host, "pid": dead_pid}),
                        ("running", {"host": host, "pid": os.getpid()}),
                        ("elsewhere", {"host": host + "-other", "pid": dead_pid}),
                        ("unknown", None)]:
    folder = cache / f".bytes-{name}.tmp-abc123"
    folder.mkdir(parents=True)
    (folder / "train.bin").write_bytes(b"\0" * 64)
    if builder is not None:
      (folder / "builder.json").write_text(json.dumps(builder))
    left[name] = folder
  data = write_txt(tmp_path / "stories.txt", STORIES)
  c = load_corpus(str(data), "bytes", cache_dir=cache)
  assert not left["killed"].exists()
  assert all(left[n].exists() for n in ("running", "elsewhere", "unknown"))
  entry = pathlib.Path(c.metadata["cache_path"])
  assert json.loads((entry / "builder.json").read_text()) == {"host": host, "pid": os.getpid()}
  assert sorted(entries(cache)) == sorted([entry.name] + [left[n].name for n in
                                                            ("running", "elsewhere", "unknown")])


def test_a_locked_build_is_never_removed(tmp_path):
  """A builder in another process namespace (a container with this host's name) has a
  process id this process cannot see; its lock on builder.json keeps its folder."""
  import fcntl  # pylint: disable=import-outside-toplevel
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  cache = tmp_path / "cache"
  folder = cache / ".bytes-container.tmp-abc123"
  folder.mkdir(parents=True)
  (folder / "builder.json").write_text(json.dumps({"host": socket.gethostname(),
                                                   "pid": int(dead.stdout)}))
  data = write_txt(tmp_path / "stories.txt", STORIES)
  with open(folder / "builder.json", "rb") as held:
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)
    load_corpus(str(data), "bytes", cache_dir=cache)
    assert folder.exists()
  load_corpus(str(data), "bytes", cache_dir=cache, max_train_stories=5)  # another build
  assert not folder.exists()  # lock released: the builder is gone


def test_entries_follow_the_umask(tmp_path):
  """mkdtemp makes 0700 folders: an entry other users of a shared cache could not read."""
  data = write_txt(tmp_path / "stories.txt", STORIES)
  old = os.umask(0o022)
  try:
    c = load_corpus(str(data), "bytes", cache_dir=tmp_path / "cache")
  finally:
    os.umask(old)
  assert os.stat(c.metadata["cache_path"]).st_mode & 0o777 == 0o755


@pytest.mark.parametrize("damage", ["empty_bin", "odd_bin", "no_offsets", "pickled_offsets",
                                    "unsorted_offsets", "empty_story", "no_meta", "bad_meta"])
def test_a_damaged_entry_is_rebuilt(tmp_path, damage):
  data = write_txt(tmp_path / "stories.txt", STORIES)
  cache = tmp_path / "cache"
  first = load_corpus(str(data), "bytes", cache_dir=cache)
  want = np.array(first.train.tokens), np.array(first.train.offsets)
  entry = pathlib.Path(first.metadata["cache_path"])
  del first
  if damage == "empty_bin":
    (entry / "train.bin").write_bytes(b"")
  elif damage == "odd_bin":
    (entry / "train.bin").write_bytes(b"\0" * 7)
  elif damage == "no_offsets":
    (entry / "valid_offsets.npy").unlink()
  elif damage == "pickled_offsets":
    np.save(entry / "train_offsets.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
  elif damage == "unsorted_offsets":
    offsets = want[1].copy()
    offsets[[1, 2]] = offsets[[2, 1]]
    np.save(entry / "train_offsets.npy", offsets)
  elif damage == "empty_story":  # every story has its EOT at least
    np.save(entry / "train_offsets.npy", np.insert(want[1], 2, want[1][1]))
  elif damage == "no_meta":
    (entry / "meta.json").unlink()
  else:
    (entry / "meta.json").write_text("{not json")
  tok, count = counting(get_tokenizer("bytes"))
  again = load_corpus(str(data), tok, cache_dir=cache)
  assert count["texts"] == 40 and not again.metadata["cache_hit"]
  np.testing.assert_array_equal(again.train.tokens, want[0])
  np.testing.assert_array_equal(again.train.offsets, want[1])
  assert entries(cache) == [entry.name]  # the damaged copy is gone
  assert load_corpus(str(data), "bytes", cache_dir=cache).metadata["cache_hit"]


def test_vocab_too_large_for_uint16(tmp_path):
  data = write_txt(tmp_path / "stories.txt", STORIES)
  big = get_tokenizer("bytes")._replace(name="big", vocab_size=70000)
  with pytest.raises(VocabTooLargeError, match="70000.*65536"):
    load_corpus(str(data), big, cache_dir=tmp_path / "cache")
  liar = get_tokenizer("bytes")._replace(encode_batch=lambda texts: [[1, 300] for _ in texts])
  with pytest.raises(VocabTooLargeError, match="300"):
    load_corpus(str(data), liar, cache_dir=tmp_path / "cache")
  assert entries(tmp_path / "cache") == []


def test_empty_data(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n<|endoftext|>\n   \n<|endoftext|>\n")
  with pytest.raises(EmptyDataError, match="0 stories"):
    load_corpus(str(empty), "bytes", cache_dir=tmp_path / "cache")
  d = tmp_path / "d"
  d.mkdir()
  write_txt(d / "train.txt", STORIES)
  (d / "valid.txt").write_text("")
  with pytest.raises(EmptyDataError, match="valid split holds no stories"):
    load_corpus(str(d), "bytes", cache_dir=tmp_path / "cache")
  assert entries(tmp_path / "cache") == []


def test_bad_tokenizer_argument(tmp_path):
  with pytest.raises(ValueError, match="Tokenizer or a name"):
    load_corpus("synthetic", 3, cache_dir=tmp_path)
  with pytest.raises(ValueError, match="unknown tokenizer"):
    load_corpus("synthetic", "sentencepiece", cache_dir=tmp_path)
  with pytest.raises(ValueError, match="max_train_stories"):
    load_corpus("synthetic", "bytes", cache_dir=tmp_path, max_train_stories=0)


@pytest.mark.parametrize("err", ["ENOSPC", "EFBIG"])
def test_a_full_disk_during_a_cache_build_names_the_cache_and_leaves_nothing(tmp_path, err):
  # A file-size limit (ulimit -f, EFBIG) printed a bare "[Errno 27] File too large",
  # naming neither the token cache nor its folder.
  import errno  # pylint: disable=import-outside-toplevel
  data = write_txt(tmp_path / "stories.txt", STORIES)
  tok = get_tokenizer("bytes")
  code = getattr(errno, err)

  def encode_batch(texts):
    raise OSError(code, os.strerror(code))

  cache = tmp_path / "cache"
  with pytest.raises(OSError, match=f"cannot write the token cache in {cache} .*free space"):
    load_corpus(str(data), tok._replace(encode_batch=encode_batch), cache_dir=cache)
  assert entries(cache) == []  # neither an entry nor a temporary folder


def test_cache_dir_that_is_a_file(tmp_path):
  blocker = tmp_path / "cache"
  blocker.write_text("notes")
  for cache_dir in (blocker, blocker / "sub"):
    with pytest.raises(ValueError, match=f"{blocker} is a file .*QSF_CACHE_DIR"):
      load_corpus("synthetic", "bytes", cache_dir=cache_dir, synthetic_train_stories=5,
                  synthetic_valid_stories=2)
  assert blocker.read_text() == "notes"


def test_auto_offline_end_to_end(tmp_path):
  c = load_corpus("auto", "bytes", cache_dir=tmp_path, synthetic_train_stories=30,
                  synthetic_valid_stories=4)
  assert c.metadata["source"] == "synthetic" and isinstance(c.tokenizer, Tokenizer)
  b = get_batch(c.train, seed=0, step=0, batch_size=4, seq_len=32)
  assert b["inputs"].shape == (4, 32) and b["mask"].sum() == 4 * 32  # stories > 33 bytes


def test_hub_dataset_through_load_corpus(monkeypatch, tmp_path):
  import datasets

  def fake_load_dataset(name, split, revision=None):
    texts = [f"{split} story {i}" for i in range(6 if split == "train" else 2)]
    return datasets.Dataset.from_dict({"text": texts})

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  c = load_corpus("tinystories", "bytes", cache_dir=tmp_path, hub_revision="v1")
  m = c.metadata
  assert (m["source"], m["train_stories"], m["valid_stories"]) == ("tinystories", 6, 2)
  assert m["key_inputs"]["source"]["revision"] == "v1"
  assert m["key_inputs"]["source"]["num_rows"] == {"train": 6, "validation": 2}
  assert c.tokenizer.decode(c.valid.story(1)) == "validation story 1<|endoftext|>"
