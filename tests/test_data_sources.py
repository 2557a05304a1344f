"""Story sources: local files, directory convention, hold-out, synthetic, auto."""

import collections
import json
import logging
import math
import re
import time

import pytest

from qsf_jax.data import (
    DataNotFoundError,
    DataUnavailableError,
    EmptyDataError,
    UnknownDataSpecError,
    iter_file_stories,
    local_source,
    resolve_source,
    synthetic_stories,
    synthetic_story,
)

STORIES = ["Lily had a red ball.\nShe liked it.", "Tom saw a cat.", "The end  came. “Yes!”"]


def write_txt(path, stories, sep="\n<|endoftext|>\n"):
  path.write_text(sep.join(stories) + sep, encoding="utf-8")
  return path


def write_jsonl(path, stories):
  path.write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(stories)),
                  encoding="utf-8")
  return path


def write_parquet(path, stories):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": stories, "n": list(range(len(stories)))}), path)
  return path


def test_txt_stories_are_split_and_stripped(tmp_path):
  p = tmp_path / "s.txt"
  p.write_text("  \n" + "\n<|endoftext|>\n".join(STORIES) + "<|endoftext|>\n \n<|endoftext|>",
               encoding="utf-8")
  assert list(iter_file_stories(p)) == STORIES


def test_txt_reading_in_chunks_matches_one_split(tmp_path):
  """Separators straddling chunk boundaries, long stories without one, empty pieces."""
  from qsf_jax.data.local_files import _iter_txt  # pylint: disable=import-outside-toplevel
  rng = __import__("random").Random(0)
  for trial in range(20):
    pieces = ["".join(rng.choice("ab<|>\n") for _ in range(rng.randrange(0, 60)))
              for _ in range(rng.randrange(1, 8))]
    text = "<|endoftext|>".join(pieces)
    p = tmp_path / f"t{trial}.txt"
    p.write_text(text, encoding="utf-8")
    for chunk in (1, 3, 7, 12, 13, 64):
      assert list(_iter_txt(p, chunk)) == text.split("<|endoftext|>"), (trial, chunk)


def test_a_utf8_byte_order_mark_is_not_text(tmp_path):
  """A leading BOM stayed on the first story (.txt) or failed the first line (.jsonl);
  only such files change the source's identity (and so their token-cache key)."""
  bom = "\ufeff"
  txt = write_txt(tmp_path / "bom.txt", [bom + STORIES[0]] + STORIES[1:])
  jsonl = tmp_path / "bom.jsonl"
  jsonl.write_text(bom + write_jsonl(tmp_path / "plain.jsonl", STORIES).read_text(), "utf-8")
  for p in (txt, jsonl):
    assert list(iter_file_stories(p)) == STORIES
  assert local_source(txt).identity["utf8_bom_dropped"] == ["bom.txt"]
  plain = local_source(write_txt(tmp_path / "plain.txt", STORIES)).identity
  assert "utf8_bom_dropped" not in plain and set(plain) == {"kind", "train", "valid",
                                                            "valid_fraction"}


def test_jsonl_and_parquet(tmp_path):
  assert list(iter_file_stories(write_jsonl(tmp_path / "s.jsonl", STORIES))) == STORIES
  assert list(iter_file_stories(write_parquet(tmp_path / "s.parquet", STORIES))) == STORIES


def test_bad_jsonl_and_parquet(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"text": "ok"}\n{"story": "no text field"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
    list(iter_file_stories(p))
  p.write_text('{"text": "ok"}\nnot json\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    list(iter_file_stories(p))
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
  with pytest.raises(ValueError, match="no 'text' column"):
    list(iter_file_stories(tmp_path / "bad.parquet"))


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_non_utf8_text_names_the_file(tmp_path, name):
  p = tmp_path / name
  body = "caf\u00e9 story".encode("latin-1")
  p.write_bytes(body if name.endswith(".txt") else b'{"text": "' + body + b'"}\n')
  with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text \(invalid .*b'\\xe9'"):
    list(iter_file_stories(p))


def test_directory_convention(tmp_path):
  write_txt(tmp_path / "TinyStories-train.txt", ["a1", "a2"])
  (tmp_path / "sub").mkdir()
  write_jsonl(tmp_path / "sub" / "train-00001.jsonl", ["b1"])
  write_parquet(tmp_path / "validation-00000.parquet", ["v1", "v2"])
  write_txt(tmp_path / "test.txt", ["ignored"])
  write_txt(tmp_path / "interval.txt", ["ignored too"])  # "val" must be a whole word
  (tmp_path / ".hidden").mkdir()
  write_txt(tmp_path / ".hidden" / "train.txt", ["hidden"])
  src = local_source(tmp_path)
  assert list(src.train()) == ["a1", "a2", "b1"]
  assert list(src.valid()) == ["v1", "v2"]
  assert src.name == f"path:{tmp_path.resolve()}"
  assert [f[0] for f in src.identity["train"]] == ["TinyStories-train.txt", "sub/train-00001.jsonl"]
  assert "valid_fraction" not in src.identity


def test_directory_convention_reads_folder_names(tmp_path):
  # Split folders with the same file names: the folder decides, validation never leaks.
  for split, stories in (("train", ["t1", "t2"]), ("valid", ["v1"])):
    (tmp_path / split).mkdir()
    write_txt(tmp_path / split / "part0.txt", stories)
  src = local_source(tmp_path)
  assert (list(src.train()), list(src.valid())) == (["t1", "t2"], ["v1"])
  assert "valid_fraction" not in src.identity


def test_test_and_eval_files_are_never_training_data(tmp_path):
  write_txt(tmp_path / "stories.txt", ["s1", "s2", "s3"])
  write_txt(tmp_path / "eval.txt", ["e1"])
  (tmp_path / "test").mkdir()
  write_jsonl(tmp_path / "test" / "part0.jsonl", ["x1"])
  src = local_source(tmp_path, valid_fraction=0.34)
  assert sorted(list(src.train()) + list(src.valid())) == ["s1", "s2", "s3"]
  # the held-out count rounds (30 x 0.05 = 1.5 -> 2), evenly spaced picks
  many = tmp_path / "many"
  many.mkdir()
  write_txt(many / "stories.txt", [f"story {i}" for i in range(30)])
  assert list(local_source(many, valid_fraction=0.05).valid()) == ["story 14", "story 29"]
  assert "ignored 2 file(s): eval.txt, test/part0.jsonl" in src.description
  # numbered and compound names are the same words: val1, train2, testset, training
  numbered = tmp_path / "numbered"
  numbered.mkdir()
  for name, stories in (("train1.txt", ["t1"]), ("train2.txt", ["t2"]), ("val1.txt", ["v1"]),
                        ("testset.txt", ["x"]), ("training-extra.txt", ["t3"])):
    write_txt(numbered / name, stories)
  src = local_source(numbered)
  assert sorted(src.train()) == ["t1", "t2", "t3"] and list(src.valid()) == ["v1"]
  assert "ignored 1 file(s): testset.txt" in src.description
  with pytest.raises(ValueError, match="valid_fraction"):  # unused here, still checked
    local_source(numbered, valid_fraction=5.0)
  only = tmp_path / "only"
  only.mkdir()
  write_txt(only / "test.txt", ["x"])
  with pytest.raises(DataNotFoundError, match=r"only validation or test files \(\['test.txt'\]\)"):
    local_source(only)


def test_directory_without_train_names_uses_all_non_validation_files(tmp_path):
  write_txt(tmp_path / "a.txt", ["x1"])
  write_jsonl(tmp_path / "b.jsonl", ["x2"])
  write_txt(tmp_path / "dev.txt", ["d1"])
  src = local_source(tmp_path)
  assert (list(src.train()), list(src.valid())) == (["x1", "x2"], ["d1"])
  # the log line names the files, so that a misnamed held-out file shows as trained on
  assert "2 train file(s): a.txt, b.jsonl / 1 validation file(s): dev.txt" in src.description
  write_txt(tmp_path / "heldout.txt", ["h1"])
  for i in range(2):
    write_txt(tmp_path / f"c{i}.txt", [f"c{i}"])
  assert "5 train file(s): a.txt, b.jsonl, c0.txt, ... /" in local_source(tmp_path).description
  (tmp_path / "dev.txt").unlink()
  src = local_source(tmp_path)
  assert "5 file(s): a.txt, b.jsonl, c0.txt, ..., 0.05 of the stories held out" in src.description


def test_single_file_holds_out_a_deterministic_fraction(tmp_path):
  stories = [f"story number {i}" for i in range(200)]
  p = write_txt(tmp_path / "all.txt", stories)
  src = local_source(p, valid_fraction=0.05)
  train, valid = list(src.train()), list(src.valid())
  assert len(valid) == 10 and len(train) == 190
  assert sorted(train + valid) == sorted(stories) and not set(train) & set(valid)
  # evenly spaced, in file order, and the same on every call
  idx = [stories.index(v) for v in valid]
  assert idx == sorted(idx) and all(b - a == 20 for a, b in zip(idx, idx[1:]))
  assert list(local_source(p, valid_fraction=0.05).valid()) == valid
  assert src.identity["valid_fraction"] == 0.05
  assert len(list(local_source(p, valid_fraction=0.2).valid())) == 40


def test_holdout_needs_two_stories(tmp_path):
  src = local_source(write_txt(tmp_path / "one.txt", ["only story"]))
  with pytest.raises(EmptyDataError, match="1 stories"):
    list(src.train())
  with pytest.raises(ValueError, match="valid_fraction"):
    local_source(tmp_path / "one.txt", valid_fraction=1.5).train()


def test_shared_tinystories_sample(shared_data_dir):
  src = resolve_source(str(shared_data_dir / "tinystories"))
  train, valid = list(src.train()), list(src.valid())
  assert (len(train), len(valid)) == (2316, 1000)
  assert valid[0].startswith("Spot. Spot saw the shiny car")
  assert all("<|endoftext|>" not in s and s == s.strip() and s for s in train + valid)


def test_bad_data_specs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UnknownDataSpecError, match="unknown data spec 'tinystory'.*auto"):
    resolve_source("tinystory")
  with pytest.raises(UnknownDataSpecError):
    resolve_source("")
  with pytest.raises(UnknownDataSpecError):
    resolve_source(None)
  with pytest.raises(DataNotFoundError, match="does not exist"):
    resolve_source(str(tmp_path / "missing"))
  with pytest.raises(DataNotFoundError, match="does not exist"):
    resolve_source("stories.jsonl")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataNotFoundError, match="holds no"):
    resolve_source(str(tmp_path / "empty"))
  (tmp_path / "notes.csv").write_text("text\nhello\n")
  with pytest.raises(UnknownDataSpecError, match="unsupported data file"):
    resolve_source(str(tmp_path / "notes.csv"))
  (tmp_path / "onlyval").mkdir()
  write_txt(tmp_path / "onlyval" / "valid.txt", ["v"])
  with pytest.raises(DataNotFoundError, match="only validation"):
    resolve_source(str(tmp_path / "onlyval"))


# sha256 of the first 500 train and 100 validation stories at seed 0, per version.
SYNTHETIC_FINGERPRINTS = {1: "4c45d3c46fe4fdf43695a9cae43183b3287ecdf610dc364df1a0b270aa8b01af"}


def test_synthetic_stories_change_only_with_their_version():
  """The synthetic source's cache key (and a run's resume and evaluation checks) knows
  the generator only by SYNTHETIC_VERSION: new stories under the old version would be
  served from old caches and let a run resume on other data."""
  import hashlib
  from qsf_jax.data.synthetic import SYNTHETIC_VERSION
  h = hashlib.sha256()
  for split, n in (("train", 500), ("validation", 100)):
    for story in synthetic_stories(n, seed=0, split=split):
      h.update(story.encode() + b"\0")
  assert h.hexdigest() == SYNTHETIC_FINGERPRINTS.get(SYNTHETIC_VERSION), (
      "the synthetic stories changed: bump SYNTHETIC_VERSION and record the new "
      f"fingerprint {h.hexdigest()} for it")


def test_synthetic_is_deterministic_and_varied():
  a = list(synthetic_stories(2000, seed=0))
  assert a == list(synthetic_stories(2000, seed=0))
  assert a[:5] != list(synthetic_stories(5, seed=1))
  assert a[:5] != list(synthetic_stories(5, seed=0, split="validation"))
  assert synthetic_story(1234, seed=0) == a[1234]
  assert len(set(a)) >= 1990
  assert 200 < sum(map(len, a)) / len(a) < 1000
  with pytest.raises(ValueError, match="index must be >= 0"):
    synthetic_story(-1)
  # Another split name used to give an unrelated third stream.
  with pytest.raises(ValueError, match=r"split must be one of \['train', 'validation'\]"):
    list(synthetic_stories(5, split="valid"))
  with pytest.raises(ValueError, match="index must be an int, got 1.5"):
    synthetic_story(1.5)
  from qsf_jax.data.sources import synthetic_source
  for kw, match in ((dict(n_train="5"), "n_train must be an int"),
                    (dict(n_valid=2.5), "n_valid must be an int"),
                    (dict(n_train=0), "n_train and n_valid must be >= 1")):
    with pytest.raises(ValueError, match=match):
      synthetic_source(**kw)


def test_synthetic_source_validation_is_not_training_data():
  from qsf_jax.data.sources import synthetic_source
  src = synthetic_source(seed=3, n_train=200, n_valid=50)
  train, valid = list(src.train()), list(src.valid())
  assert len(train) == 200 and len(valid) == 50
  assert not set(train) & set(valid)
  assert valid == list(synthetic_stories(50, seed=3, split="validation"))


def test_synthetic_stories_require_remembering_entities():
  """The name after 'Thank you,' is the hero of sentence one: fixed by the story,
  unpredictable from the previous word (a bigram model cannot know it)."""
  after_thanks = collections.Counter()
  for story in synthetic_stories(2000, seed=3):
    hero = re.match(r"[^.]*(?:named|called) (\w+)", story).group(1)
    thanked = re.search(r"Thank you, (\w+)!", story).group(1)
    assert thanked == hero
    color, obj = re.match(r"[^.]*\. (?:\w+'s favorite toy was|\w+ had) a (\w+) ([a-z ]+?)"
                          r"(?: and loved it very much)?\.", story).groups()
    found = re.search(r"They found the (\w+) ([\w ]+?) (?:under|behind|in|near) ", story)
    if found:
      assert found.groups() == (color, obj)
    after_thanks[thanked] += 1
  n = sum(after_thanks.values())
  entropy_bits = -sum(c / n * math.log2(c / n) for c in after_thanks.values())
  assert len(after_thanks) == 32 and entropy_bits > 4.5


def test_auto_falls_back_to_synthetic_offline(caplog):
  t0 = time.perf_counter()
  with caplog.at_level(logging.INFO, logger="absl"):
    src = resolve_source("auto", synthetic_train_stories=50, synthetic_valid_stories=5)
  assert time.perf_counter() - t0 < 10.0
  assert src.name == "synthetic"
  lines = [r.getMessage() for r in caplog.records if "data=auto" in r.getMessage()]
  assert len(lines) == 1
  for words in ("synthetic", "--data=PATH", "roneneldan/TinyStories", "OfflineModeIsEnabled"):
    assert words in lines[0]
  assert len(list(src.train())) == 50 and len(list(src.valid())) == 5


def test_explicit_tinystories_offline_is_a_clear_error():
  with pytest.raises(DataUnavailableError, match=r"roneneldan/TinyStories.*--data=PATH"):
    resolve_source("tinystories")


def test_auto_uses_the_hub_when_it_answers(monkeypatch, caplog):
  import datasets
  calls = []

  def fake_load_dataset(name, split, revision=None):
    calls.append((name, split, revision))
    return datasets.Dataset.from_dict({"text": [f" {split} story 0 ", "  "]})

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  with caplog.at_level(logging.INFO, logger="absl"):
    src = resolve_source("auto")
  assert calls == [("roneneldan/TinyStories", "train", None),
                   ("roneneldan/TinyStories", "validation", None)]
  assert src.name == "tinystories" and src.identity["kind"] == "hub"
  assert list(src.train()) == ["train story 0"] and list(src.valid()) == ["validation story 0"]
  assert any("data=auto: using roneneldan/TinyStories" in r.getMessage() for r in caplog.records)
