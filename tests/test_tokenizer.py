"""Tokenizers: GPT-2 offline from a verified local file, and the bytes fallback."""

import hashlib
import logging
import shutil

import pytest

from qsf_jax.data import (
    BYTES_SHA256,
    R50K_SHA256,
    TokenizerHashError,
    TokenizerUnavailableError,
    UnknownTokenizerError,
    file_sha256,
    get_tokenizer,
)

ONCE_IDS = [7454, 2402, 257, 640]  # "Once upon a time" (../shared/data/README.md)


@pytest.fixture
def r50k_file(shared_data_dir):
  return shared_data_dir / "gpt2" / "r50k_base.tiktoken"


@pytest.fixture(autouse=True)
def _no_tokenizer_env(monkeypatch):
  monkeypatch.delenv("QSF_TOKENIZER_FILE", raising=False)


def test_gpt2_from_local_file(r50k_file):
  tok = get_tokenizer("gpt2", tokenizer_file=r50k_file)
  assert tok.name == "gpt2"
  assert tok.encode("Once upon a time") == ONCE_IDS
  assert tok.vocab_size == 50257 and tok.eot_id == 50256
  assert tok.sha256 == R50K_SHA256 == file_sha256(r50k_file)
  text = "Lily had a red ball. “Thank you!” said Tom."
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch([text, "Once upon a time"]) == [tok.encode(text), ONCE_IDS]
  assert tok.decode([7454, 50256, 2402]) == "Once<|endoftext|> upon"
  for bad in (50257, -1):  # tiktoken raised KeyError / OverflowError
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the gpt2 vocabulary"):
      tok.decode([7454, bad])


def test_gpt2_from_env_var_and_folder(r50k_file, monkeypatch):
  monkeypatch.setenv("QSF_TOKENIZER_FILE", str(r50k_file.parent))  # a folder holding the file
  tok = get_tokenizer("gpt2")
  assert tok.encode("Once upon a time") == ONCE_IDS
  assert tok.sha256 == R50K_SHA256


def test_env_var_file_is_used_not_the_fallback(tmp_path, monkeypatch):
  # A bad $QSF_TOKENIZER_FILE is an error, not a silent switch to tiktoken or the bundle.
  monkeypatch.setenv("QSF_TOKENIZER_FILE", str(tmp_path / "missing.tiktoken"))
  with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
    get_tokenizer("gpt2")


def test_literal_endoftext_is_plain_text(r50k_file):
  for tok in (get_tokenizer("gpt2", tokenizer_file=r50k_file), get_tokenizer("bytes")):
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"
    # the batch path, which tokenizes corpora, reads it as text too
    assert tok.encode_batch(["a <|endoftext|> b", "c"]) == [tok.encode("a <|endoftext|> b"),
                                                           tok.encode("c")]


def test_wrong_hash_is_rejected(r50k_file, tmp_path):
  bad = tmp_path / "r50k_base.tiktoken"
  shutil.copyfile(r50k_file, bad)
  data = bytearray(bad.read_bytes())
  data[-2:-1] = b"4"  # last rank 50255 -> 50254
  bad.write_bytes(bytes(data))
  actual = hashlib.sha256(bytes(data)).hexdigest()
  with pytest.raises(TokenizerHashError) as info:
    get_tokenizer("gpt2", tokenizer_file=bad)
  msg = str(info.value)
  assert str(bad) in msg and R50K_SHA256 in msg and actual in msg
  err = info.value
  assert (err.path, err.expected, err.actual) == (str(bad), R50K_SHA256, actual)
  assert isinstance(info.value, ValueError)


def test_missing_tokenizer_file(tmp_path, r50k_file, monkeypatch):
  with pytest.raises(FileNotFoundError, match="does not exist.*r50k_base.tiktoken"):
    get_tokenizer("gpt2", tokenizer_file=tmp_path / "nope.tiktoken")
  (tmp_path / "r50k_base.tiktoken").mkdir()  # a folder where the file should be
  with pytest.raises(FileNotFoundError, match="is not a regular file"):
    get_tokenizer("gpt2", tokenizer_file=tmp_path)
  # an empty --tokenizer_file= means unset, as an empty $QSF_TOKENIZER_FILE does
  monkeypatch.setenv("QSF_TOKENIZER_FILE", str(r50k_file))
  assert get_tokenizer("gpt2", tokenizer_file="").sha256 == R50K_SHA256


def test_unknown_tokenizer_name():
  with pytest.raises(UnknownTokenizerError, match="'gpt3'.*gpt2.*bytes"):
    get_tokenizer("gpt3")
  with pytest.raises(ValueError):
    get_tokenizer("")


def test_tiktoken_cache_route_matches_file(shared_data_dir, tmp_path, monkeypatch):
  # tiktoken.get_encoding("gpt2") reads its cache dir (files named sha1(url)), no network.
  base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
  for name in ("vocab.bpe", "encoder.json"):
    url = base + name
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).symlink_to(shared_data_dir / "gpt2" / name)
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
  tok = get_tokenizer("gpt2")
  # The ranks re-serialised in r50k format hash to the r50k file's sha256.
  assert tok.sha256 == R50K_SHA256
  assert tok.encode("Once upon a time") == ONCE_IDS and tok.eot_id == 50256


@pytest.fixture(autouse=True)
def _fresh_tiktoken_state(monkeypatch):
  """Each test starts as a new process: tiktoken not yet tried."""
  from qsf_jax.data import tokenizer as tk
  monkeypatch.setattr(tk, "_tiktoken_failure", None)


def _offline(monkeypatch):
  import tiktoken
  calls = []

  def fail(name):
    calls.append(name)
    raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

  monkeypatch.setattr(tiktoken, "get_encoding", fail)
  return calls


def test_offline_falls_back_to_the_bundled_vocabulary(monkeypatch, caplog, tmp_path):
  from qsf_jax.data import tokenizer as tk
  calls = _offline(monkeypatch)
  assert tk.file_sha256(tk.BUNDLED_R50K) == R50K_SHA256
  with caplog.at_level(logging.WARNING):
    tok = get_tokenizer("gpt2")
    assert tok.encode("Once upon a time") == ONCE_IDS and tok.sha256 == R50K_SHA256
    # Later loads in the process take the bundled copy at once: no second download
    # attempt and no second warning.
    again = get_tokenizer("gpt2")
  assert again.encode("Once upon a time") == ONCE_IDS and again.sha256 == R50K_SHA256
  assert calls == ["gpt2"]
  warned = [r.getMessage() for r in caplog.records
            if "not available from tiktoken" in r.getMessage()]
  assert len(warned) == 1 and "ConnectionError: Failed to resolve" in warned[0], warned
  # If the bundled copy then goes missing, the error still says what to do.
  monkeypatch.setattr(tk, "BUNDLED_R50K", tmp_path / "missing.tiktoken")
  with pytest.raises(TokenizerUnavailableError, match="ConnectionError.*QSF_TOKENIZER_FILE"):
    get_tokenizer("gpt2")


def test_offline_error_says_how_to_use_a_local_file(monkeypatch, tmp_path):
  from qsf_jax.data import tokenizer as tk
  _offline(monkeypatch)
  monkeypatch.setattr(tk, "BUNDLED_R50K", tmp_path / "missing.tiktoken")
  with pytest.raises(TokenizerUnavailableError,
                     match="QSF_TOKENIZER_FILE.*r50k_base.tiktoken") as info:
    get_tokenizer("gpt2")
  assert "tokenizer_file=" in str(info.value) and R50K_SHA256 in str(info.value)


def test_tampered_bundled_vocabulary_is_rejected(monkeypatch, tmp_path):
  from qsf_jax.data import tokenizer as tk
  _offline(monkeypatch)
  bad = tmp_path / "r50k_base.tiktoken"
  bad.write_bytes(tk.BUNDLED_R50K.read_bytes()[:-10])
  monkeypatch.setattr(tk, "BUNDLED_R50K", bad)
  with pytest.raises(TokenizerHashError):
    get_tokenizer("gpt2")


def test_bytes_tokenizer_round_trip():
  tok = get_tokenizer("bytes")
  assert (tok.name, tok.vocab_size, tok.eot_id) == ("bytes", 257, 256)
  assert tok.sha256 == BYTES_SHA256 and len(tok.sha256) == 64
  assert get_tokenizer("bytes").sha256 == tok.sha256  # a fixed identifier
  for text in ("Once upon a time", "", "naïve café — 猫 🐈", "line\nbreak\ttab"):
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
  assert tok.encode("hi") == [104, 105]
  assert tok.decode([104, 256, 105]) == "h<|endoftext|>i"
  assert tok.encode_batch(["a", "bc"]) == [[97], [98, 99]]
  # a lone surrogate (half an emoji from a "\ud83d" JSON escape) becomes U+FFFD, as in gpt2
  assert tok.decode(tok.encode("hi \ud83d!")) == "hi \ufffd!"
  assert tok.encode_batch(["\udc00"]) == [list("\ufffd".encode("utf-8"))]


def test_bytes_decode_rejects_out_of_range_ids():
  tok = get_tokenizer("bytes")
  with pytest.raises(ValueError, match="257"):
    tok.decode([1, 257])
  with pytest.raises(ValueError, match="-1"):
    tok.decode([-1])
