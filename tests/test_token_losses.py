"""Per-token validation cross entropies, outliers and unseen inputs (token_losses)."""

import os

import jax
import numpy as np
import pytest

from conftest import init_compiled
from qsf_jax import data as qdata
from qsf_jax.models.config import get_config
from qsf_jax.models.lm import build_model
from qsf_jax.training import token_losses as tlm
from qsf_jax.training.evaluation import evaluate_split

pytestmark = pytest.mark.usefixtures("fast_compiles")

V, EOT = 16, 15


def _split(stories):
  """A TokenSplit from lists of ids (each story gets its EOT)."""
  seqs = [list(s) + [EOT] for s in stories]
  offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
  return qdata.TokenSplit(tokens=np.concatenate(seqs).astype(np.uint16), offsets=offsets,
                          eot_id=EOT)


@pytest.mark.parametrize("blocks", [None, (2, 5)])  # (stories, tokens) per block
def test_training_tokens_are_the_ids_of_the_training_rows(blocks, monkeypatch):
  if blocks:  # blocks that split the stories and the stream
    monkeypatch.setattr(tlm, "_STORY_BLOCK", blocks[0])
    monkeypatch.setattr(tlm, "_TOKEN_BLOCK", blocks[1])
  train = _split([[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]])
  # story mode, T = 2: rows hold the first 3 tokens of each story
  assert np.flatnonzero(tlm.training_tokens(train, seq_len=2, mode="story", vocab_size=V)
                        ).tolist() == [1, 2, 3, 7, 8, 9, 10, 11, EOT]
  # a story shorter than a row keeps all its tokens, and the next row starts at the next
  # story's first token
  short = _split([[1, 2, 3, 4, 5, 6], [7], [9, 10, 11, 12]])
  assert np.flatnonzero(tlm.training_tokens(short, seq_len=2, mode="story", vocab_size=V)
                        ).tolist() == [1, 2, 3, 7, 9, 10, 11, EOT]
  # packed mode: the whole stream
  assert np.flatnonzero(tlm.training_tokens(train, seq_len=2, mode="packed", vocab_size=V)
                        ).tolist() == list(range(1, 13)) + [EOT]
  with pytest.raises(ValueError, match="token id 15, outside the vocabulary of 12"):
    tlm.training_tokens(train, seq_len=2, mode="story", vocab_size=12)
  with pytest.raises(ValueError, match="mode must be one of"):
    tlm.training_tokens(train, seq_len=2, mode="rows", vocab_size=V)


@pytest.fixture(scope="module")
def tiny_model():
  cfg = get_config("koopman", "tiny", vocab_size=V)
  model = build_model(cfg)
  params, coll = init_compiled(model, 3, 8)
  return model, params, coll


def test_per_token_losses_match_an_independent_log_softmax(tiny_model):
  model, params, coll = tiny_model
  rng = np.random.default_rng(0)
  valid = _split([rng.integers(0, 12, n) for n in (3, 9, 5, 12, 1, 7, 4)])
  T, B = 6, 3
  seen = np.zeros(V, bool)
  seen[[0, 1, 2, 3, 4, 5, 6, 7, 8, EOT]] = True  # 9, 10 and 11 unseen
  tl = tlm.token_losses(model, params, coll, valid, batch_size=B, seq_len=T, seen=seen)
  # the reference: full logits from model.apply, log-softmax in float64 numpy
  apply = jax.jit(lambda x: model.apply({"params": params, **coll}, x, beta=0.0))
  xent, row, pos, unseen = [], [], [], []
  for k, batch in enumerate(qdata.iter_eval_batches(valid, batch_size=B, seq_len=T)):
    z = np.asarray(apply(batch["inputs"]), np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - z.max(-1, keepdims=True)
    for b in range(B):
      for t in range(T):
        if batch["mask"][b, t]:
          xent.append(-logp[b, t, batch["targets"][b, t]])
          row.append(k * B + b)
          pos.append(t)
          unseen.append(any(not seen[i] for i in batch["inputs"][b, :t + 1]))
  np.testing.assert_allclose(tl.xent, xent, rtol=2e-6, atol=2e-6)
  assert tl.row.tolist() == row and tl.position.tolist() == pos
  assert tl.unseen_so_far.tolist() == unseen and 0 < sum(unseen) < len(unseen)
  real_inputs = [i for k, batch in enumerate(qdata.iter_eval_batches(valid, batch_size=B,
                                                                     seq_len=T))
                 for i in batch["inputs"][batch["mask"] > 0]]
  assert tl.unseen_input_count == sum(not seen[i] for i in real_inputs)
  assert tl.unseen_input_types == len({i for i in real_inputs if not seen[i]})
  # the same batches as the validation loss
  rec = evaluate_split(model, params, coll, valid, batch_size=B, seq_len=T)
  assert tl.xent.size == rec["tokens"]
  assert tl.xent.mean() == pytest.approx(rec["val_loss"], rel=1e-6)
  two = tlm.token_losses(model, params, coll, valid, batch_size=B, seq_len=T, max_batches=2)
  assert two.unseen_so_far is None and two.xent.size == evaluate_split(
      model, params, coll, valid, batch_size=B, seq_len=T, max_batches=2)["tokens"]
  with pytest.raises(ValueError, match="seen must be a bool"):
    tlm.token_losses(model, params, coll, valid, batch_size=B, seq_len=T, seen=seen[None])


def test_unseen_inputs_count_only_real_positions(monkeypatch):
  """Padding and the EOT that ends a row are no inputs: with every training story longer
  than a row, EOT is never a training input, and still only the real inputs count."""
  monkeypatch.setattr(tlm, "_batch_xent", lambda p, c, x, y, b, model: np.zeros(x.shape))
  seen = tlm.training_tokens(_split([[1, 2, 3, 4, 5]]), seq_len=2, mode="story", vocab_size=V)
  assert np.flatnonzero(seen).tolist() == [1, 2, 3]  # no EOT
  tl = tlm.token_losses(None, None, {}, _split([[1, 2], [3, 4, 5]]), batch_size=3, seq_len=4,
                        seen=seen)
  # rows: inputs 1 2 | 3 4 5 (the EOTs are targets only; the rest is padding)
  assert (tl.unseen_input_count, tl.unseen_input_types) == (2, 2)
  assert tl.unseen_so_far.tolist() == [False, False, False, True, True]


def test_validation_totals_are_exact_past_float32_integers(monkeypatch):
  """The token count and loss sum are totalled in float64: three batches of 2^23 + 1
  tokens sum to 3 * 2^23 + 3, odd and above 2^24, which a float32 total rounds."""
  from qsf_jax.training import evaluation  # pylint: disable=import-outside-toplevel
  n = 2.0**23 + 1
  losses = iter([1.5 * 2**23, 2.5 * 2**23, 3.25 * 2**23])  # exact in float32
  monkeypatch.setattr(evaluation, "_eval_step", lambda *a, **k: (
      jax.numpy.float32(next(losses)), jax.numpy.float32(n)))
  valid = _split([[1, 2, 3]] * 3)  # three story rows, one per batch
  rec = evaluate_split(object(), None, {}, valid, batch_size=1, seq_len=4)
  assert rec["batches"] == 3 and rec["tokens"] == 3 * 2**23 + 3
  assert rec["val_loss"] == pytest.approx(7.25 * 2**23 / (3 * n), rel=1e-15)


def test_summary_counts_outliers_and_unseen_inputs(tmp_path):
  x = np.array([1.0, 2.0, 25.0, 3.0, 30.0, 4.0])
  u = np.array([False, True, True, False, False, False])
  tl = tlm.TokenLosses(xent=x, row=np.array([0, 0, 0, 1, 2, 2]), position=np.arange(6),
                       unseen_so_far=u, unseen_input_types=1, unseen_input_count=2)
  s = tlm.summarize(tl, threshold=20.0)
  assert s["tokens"] == 6 and s["above"] == 2 and s["above_frac"] == pytest.approx(2 / 6)
  assert s["rows_with_above"] == 2 and s["max"] == 30.0 and s["median"] == 3.5
  assert s["mean"] == pytest.approx(65 / 6) and s["mean_at_or_below"] == pytest.approx(2.5)
  assert s["above_unseen_so_far_frac"] == 0.5 and s["rest_unseen_so_far_frac"] == 0.25
  assert s["all_seen_mean"] == pytest.approx(38 / 4) and s["all_seen_above_frac"] == 0.25
  assert s["unseen_so_far_frac"] == pytest.approx(2 / 6) and s["unseen_input_types"] == 1
  # two outliers in one row are one row; a loss equal to the threshold is not above it
  same_row = tlm.summarize(tlm.TokenLosses(xent=np.array([25.0, 30.0, 20.0]),
                                           row=np.array([3, 3, 4]), position=np.array([0, 1, 0])),
                           threshold=20.0)
  assert same_row["above"] == 2 and same_row["rows_with_above"] == 1
  assert same_row["mean_at_or_below"] == 20.0
  none_above = tlm.summarize(tl, threshold=100.0)
  assert none_above["above"] == 0 and none_above["above_unseen_so_far_frac"] is None
  assert "unseen_so_far_frac" not in tlm.summarize(
      tlm.TokenLosses(xent=x, row=tl.row, position=tl.position))
  for bad in (0.0, -1.0, float("nan"), float("inf"), True, "20"):
    with pytest.raises(ValueError, match="finite number of nats"):
      tlm.summarize(tl, threshold=bad)
  tlm.save(tl, tmp_path / "t.npz")
  with np.load(tmp_path / "t.npz") as f:
    assert sorted(f.files) == ["position", "row", "unseen_input_count", "unseen_input_types",
                               "unseen_so_far", "xent"]
    np.testing.assert_array_equal(f["xent"], x)
  with pytest.raises(ValueError, match="must be an .npz file"):
    tlm.save(tl, tmp_path / "t.txt")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tlm.save(tl, tmp_path / "missing" / "t.npz")
  # A write that fails part-way leaves the earlier file whole and no temporary file.
  class Unsaveable:
    def __array__(self, *args, **kwargs):
      raise RuntimeError("interrupted")

  with pytest.raises(RuntimeError, match="interrupted"):
    tlm.save_npz(tmp_path / "t.npz", {"xent": x, "bad": Unsaveable()})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]
  mask = os.umask(0)
  os.umask(mask)
  assert (tmp_path / "t.npz").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
  with np.load(tmp_path / "t.npz") as f:
    np.testing.assert_array_equal(f["xent"], x)


def test_an_output_path_that_is_a_folder_is_refused_before_the_work(tmp_path):
  """It failed only at the final rename, after the whole evaluation."""
  from qsf_jax.training.token_losses import check_output_path  # pylint: disable=import-outside-toplevel
  (tmp_path / "dir.npz").mkdir()
  with pytest.raises(ValueError, match="out='.*dir.npz' is a folder, not a file"):
    check_output_path(tmp_path / "dir.npz", "out")
  check_output_path(tmp_path / "file.npz", "out")  # a new file is fine
