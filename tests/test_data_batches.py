"""Batches: pure in (seed, step), story-mode padding and masks, packed windows, eval."""

import numpy as np
import pytest

from qsf_jax.data import TokenSplit, get_batch, iter_eval_batches, num_eval_batches
from qsf_jax.data import batches as batches_mod

EOT = 99


def make_split(lengths, eot=EOT):
  """Story i holds tokens (i, i+1, ...) mod eot of the given length, then EOT."""
  stories = [[(i + j) % eot for j in range(n)] for i, n in enumerate(lengths)]
  tokens = np.array([t for s in stories for t in s + [eot]], np.uint16)
  offsets = np.cumsum([0] + [n + 1 for n in lengths]).astype(np.int64)
  return TokenSplit(tokens=tokens, offsets=offsets, eot_id=eot), stories


def test_story_mode_rows_masks_and_truncation():
  split, stories = make_split([3, 10, 6])
  T = 6
  b = get_batch(split, seed=0, step=0, batch_size=3, seq_len=T)
  assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
  assert b["mask"].dtype == np.float32
  assert all(v.shape == (3, T) for v in b.values())
  for r in range(3):
    i = b["inputs"][r, 0]  # story i is the only one that starts with token i
    full = stories[i] + [EOT]
    window = (full + [EOT] * (T + 1))[:T + 1]  # story + EOT, truncated to T+1, EOT-padded
    np.testing.assert_array_equal(b["inputs"][r], window[:T])
    np.testing.assert_array_equal(b["targets"][r], window[1:])
    n_real = min(len(full), T + 1) - 1
    np.testing.assert_array_equal(b["mask"][r], [1.0] * n_real + [0.0] * (T - n_real))
  assert sorted(b["inputs"][:, 0].tolist()) == [0, 1, 2]  # one epoch = each story once
  # story 0 (3 tokens + EOT): targets 1, 2, EOT are real; the rest is padding
  r0 = list(b["inputs"][:, 0]).index(0)
  np.testing.assert_array_equal(b["targets"][r0], [1, 2, EOT, EOT, EOT, EOT])
  np.testing.assert_array_equal(b["mask"][r0], [1, 1, 1, 0, 0, 0])


def test_get_batch_is_a_pure_function_of_seed_and_step():
  split, _ = make_split(list(range(2, 30)))
  for mode in ("story", "packed"):
    kw = dict(batch_size=5, seq_len=8, mode=mode)
    run = [get_batch(split, seed=7, step=s, **kw) for s in range(12)]
    batches_mod._epoch_order.cache_clear()  # a resumed run starts from a cold cache
    resumed = [get_batch(split, seed=7, step=s, **kw) for s in range(6, 12)]
    for a, b in zip(run[6:], resumed):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(run[0]["inputs"], run[1]["inputs"])
    other_seed = get_batch(split, seed=8, step=0, **kw)
    assert not np.array_equal(run[0]["inputs"], other_seed["inputs"])


def test_story_mode_visits_every_story_once_per_epoch():
  S, B = 28, 4
  split, _ = make_split([5] * S)
  firsts = [get_batch(split, seed=1, step=s, batch_size=B, seq_len=4)["inputs"][:, 0]
            for s in range(2 * S // B)]
  epoch0 = np.concatenate(firsts[:S // B])
  epoch1 = np.concatenate(firsts[S // B:])
  assert sorted(epoch0.tolist()) == list(range(S)) == sorted(epoch1.tolist())
  assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
  assert not np.array_equal(epoch0, np.arange(S))


def test_story_batches_straddle_epochs():
  split, _ = make_split([4] * 5)
  b = get_batch(split, seed=0, step=1, batch_size=3, seq_len=3)  # examples 3, 4 | 5
  order0 = batches_mod._epoch_order(0, 0, 5)
  order1 = batches_mod._epoch_order(0, 1, 5)
  np.testing.assert_array_equal(b["inputs"][:, 0], [order0[3], order0[4], order1[0]])


def test_packed_mode_windows_of_the_stream():
  split, _ = make_split([7, 3, 12, 5, 9])
  T = 10
  stream = np.asarray(split.tokens, np.int32)
  b = get_batch(split, seed=3, step=2, batch_size=6, seq_len=T, mode="packed")
  assert np.all(b["mask"] == 1.0) and b["mask"].dtype == np.float32
  for r in range(6):
    starts = [s for s in range(len(stream) - T) if np.array_equal(stream[s:s + T], b["inputs"][r])]
    assert starts, "row is not a window of the stream"
    assert any(np.array_equal(stream[s + 1:s + T + 1], b["targets"][r]) for s in starts)
  assert EOT in b["inputs"]  # windows cross story boundaries (EOT separators)


def test_packed_needs_enough_tokens():
  split, _ = make_split([3])
  with pytest.raises(ValueError, match="seq_len \\+ 1 = 5 tokens.*holds 4"):
    get_batch(split, seed=0, step=0, batch_size=1, seq_len=4, mode="packed")
  assert get_batch(split, seed=0, step=0, batch_size=1, seq_len=3, mode="packed")["mask"].sum() == 3


def test_empty_split():
  empty, _ = make_split([])
  with pytest.raises(ValueError, match="story mode needs at least one story; the split holds none"):
    get_batch(empty, seed=0, step=0, batch_size=2, seq_len=4)
  assert list(iter_eval_batches(empty, batch_size=2, seq_len=4)) == []
  assert num_eval_batches(empty, batch_size=2, seq_len=4) == 0


def test_eval_story_mode_covers_all_stories_in_order():
  lengths = [3, 9, 1, 6, 4, 2, 8]
  split, stories = make_split(lengths)
  T, B = 5, 3
  got = list(iter_eval_batches(split, batch_size=B, seq_len=T))
  assert len(got) == num_eval_batches(split, batch_size=B, seq_len=T) == 3
  assert all(g[k].shape == (B, T) for g in got for k in g)
  rows = np.concatenate([g["inputs"] for g in got])
  masks = np.concatenate([g["mask"] for g in got])
  assert rows[:7, 0].tolist() == list(range(7))  # story i starts with token i
  np.testing.assert_array_equal(masks.sum(1), [min(n + 1, T + 1) - 1 for n in lengths] + [0, 0])
  assert np.all(rows[7:] == EOT)
  assert got[0]["targets"].tolist() == list(iter_eval_batches(split, batch_size=B, seq_len=T))[0][
      "targets"].tolist()


@pytest.mark.parametrize("T", [8, 7])  # 40 targets: 5 full windows of 8; or 5 of 7 + 5 left
def test_eval_packed_mode_predicts_every_token_once(T):
  split, _ = make_split([7, 3, 12, 5, 9])
  B = 2
  got = list(iter_eval_batches(split, batch_size=B, seq_len=T, mode="packed"))
  n = split.n_tokens
  assert len(got) == num_eval_batches(split, batch_size=B, seq_len=T, mode="packed")
  assert len(got) == -(-(-(-(n - 1) // T)) // B)
  # one row per window, the last one partial (open_evaluation counts rows this way)
  assert num_eval_batches(split, batch_size=1, seq_len=T, mode="packed") == -(-(n - 1) // T)
  targets = np.concatenate([g["targets"].reshape(-1) for g in got])
  mask = np.concatenate([g["mask"].reshape(-1) for g in got])
  assert mask.sum() == n - 1
  np.testing.assert_array_equal(targets[mask == 1], np.asarray(split.tokens[1:], np.int32))


def test_bad_batch_arguments():
  split, _ = make_split([5, 6])
  ok = dict(seed=0, step=0, batch_size=2, seq_len=4)
  with pytest.raises(ValueError, match="mode must be one of"):
    get_batch(split, **ok, mode="pack")
  for name, bad in (("seed", -1), ("step", -3), ("batch_size", 0), ("seq_len", 0),
                    ("seq_len", 4.0), ("step", True), ("batch_size", None)):
    with pytest.raises(ValueError, match=name):
      get_batch(split, **dict(ok, **{name: bad}))
  with pytest.raises(ValueError, match="TokenSplit"):
    get_batch(np.zeros(10, np.uint16), **ok)
  with pytest.raises(ValueError, match="batch_size"):
    list(iter_eval_batches(split, batch_size=0, seq_len=4))
  with pytest.raises(ValueError, match="mode"):
    num_eval_batches(split, batch_size=1, seq_len=4, mode="stories")
