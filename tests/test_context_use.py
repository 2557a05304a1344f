"""The restart test: losses from the last k inputs alone (context_use)."""

import jax
import numpy as np
import pytest

from conftest import init_compiled
from qsf_jax import data as qdata
from qsf_jax.models.config import get_config
from qsf_jax.models.lm import build_model
from qsf_jax.training import context_use as cu
from test_token_losses import V, _split

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _tiny(stage):
  model = build_model(get_config(stage, "tiny", vocab_size=V))
  return (model, *init_compiled(model, 5, 10))


@pytest.fixture(scope="module", params=["wave", "gla", "transformer"])
def model_and_vars(request):
  # the wave LM restarts from psi_0, GLA from a zero state, the transformer at
  # position 0 of its learned position embeddings
  return _tiny(request.param)


@pytest.fixture(scope="module")
def gla():
  return _tiny("gla")


def test_restart_losses_match_each_window_fed_alone(model_and_vars):
  model, params, coll = model_and_vars
  rng = np.random.default_rng(1)
  valid = _split([rng.integers(0, 14, n) for n in (12, 4, 9, 14, 6, 11, 2)])
  T, B, ks, (lo, hi) = 10, 3, (1, 3, 5), (4, 9)
  log_p = np.log(rng.dirichlet(np.ones(V)))
  # a budget of 3 windows per call at k = 5 (and 5 at k = 3): calls with padding
  cl = cu.context_losses(model, params, coll, valid, batch_size=B, seq_len=T, contexts=ks,
                         positions=(lo, hi), unigram_log_p=log_p,
                         token_budget=3 * 5 + 1)
  apply = jax.jit(lambda x: model.apply({"params": params, **coll}, x, beta=0.0))
  whole, uni, row, pos, windows = [], [], [], [], {k: [] for k in ks}
  ys = []
  for b_k, batch in enumerate(qdata.iter_eval_batches(valid, batch_size=B, seq_len=T)):
    logp_full = _log_softmax64(apply(batch["inputs"]))
    for b in range(B):
      for t in range(lo, hi):
        if not batch["mask"][b, t]:
          continue
        y = batch["targets"][b, t]
        for k in ks:
          windows[k].append(batch["inputs"][b, t - k + 1:t + 1])
        ys.append(y)
        whole.append(-logp_full[b, t, y])
        uni.append(-log_p[y])
        row.append(b_k * B + b)
        pos.append(t)
  restart = []
  for k in ks:  # each window as its own row of length k, all of them in one batch
    w = np.stack(windows[k])
    assert w.shape == (len(ys), k)
    logp = _log_softmax64(apply(w))[:, -1]
    restart.append(-logp[np.arange(len(ys)), ys])
  assert cl.contexts == ks and cl.restart.shape == (3, len(whole))
  np.testing.assert_allclose(cl.restart, np.array(restart), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(cl.whole_row, whole, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(cl.unigram, uni, rtol=1e-12)
  assert cl.row.tolist() == row and cl.position.tolist() == pos and cl.target.tolist() == ys
  # the restart changes the prediction (else the test above could not see a wrong window)
  assert np.abs(cl.restart[0] - cl.whole_row).max() > 1e-3
  s = cu.summarize(cl)
  assert s["targets"] == len(whole) and s["positions"] == [lo, hi - 1]
  assert s["restart"] == {str(k): pytest.approx(np.mean(r)) for k, r in zip(ks, restart)}
  assert s["whole_row"] == pytest.approx(np.mean(whole))
  assert s["unigram"] == pytest.approx(np.mean(uni))


def test_the_whole_prefix_as_window_is_the_whole_row(model_and_vars):
  # causality: at t = lo the window of k = lo + 1 inputs is the row's whole prefix
  model, params, coll = model_and_vars
  rng = np.random.default_rng(2)
  valid = _split([rng.integers(0, 14, n) for n in (12, 9, 14, 11)])
  cl = cu.context_losses(model, params, coll, valid, batch_size=2, seq_len=10,
                         contexts=[7], positions=(6, 7))
  assert cl.unigram is None and (cl.position == 6).all() and cl.whole_row.size == 4
  np.testing.assert_allclose(cl.restart[0], cl.whole_row, rtol=2e-5, atol=2e-5)


def test_default_positions_and_packed_mode(gla):
  model, params, coll = gla
  rng = np.random.default_rng(3)
  valid = _split([rng.integers(0, 14, n) for n in (12, 9, 14, 11)])
  cl = cu.context_losses(model, params, coll, valid, batch_size=2, seq_len=8, contexts=[2, 5],
                         mode="packed", max_batches=2)
  # default: from the largest k to the end of the row; packed rows are all real
  assert cl.contexts == (2, 5) and sorted(set(cl.position.tolist())) == [5, 6, 7]
  assert cl.whole_row.size == 2 * 2 * 3 and sorted(set(cl.row.tolist())) == [0, 1, 2, 3]
  # hi None is the end of the row, as the default
  to_end = cu.context_losses(model, params, coll, valid, batch_size=2, seq_len=8,
                             contexts=[2, 5], positions=(5, None), mode="packed", max_batches=2)
  np.testing.assert_array_equal(to_end.position, cl.position)
  np.testing.assert_array_equal(to_end.restart, cl.restart)
  # a context as long as the row: the message names the positions that fit it
  with pytest.raises(ValueError, match=r"fits the targets from position 7 on \(--positions=7:\)"):
    cu.context_losses(model, params, coll, valid, batch_size=2, seq_len=8, contexts=[8],
                      mode="packed", max_batches=2)


def test_a_large_vocabulary_bounds_the_windows_per_call(gla, monkeypatch):
  """At k = 1 the token budget allowed 16384 windows, each with V logits (3.3 GB at the
  GPT-2 vocabulary); LOGIT_BUDGET / V caps them, with the same losses."""
  model, params, coll = gla
  rng = np.random.default_rng(3)
  valid = _split([rng.integers(0, 14, n) for n in (12, 9, 14, 11)])
  kw = dict(batch_size=2, seq_len=8, contexts=[1, 2], mode="packed", max_batches=2)
  one_call = cu.context_losses(model, params, coll, valid, **kw)
  calls = []
  real = cu._last_xent
  def counting(*a, **k):
    calls.append(a[2].shape[0])
    return real(*a, **k)
  monkeypatch.setattr(cu, "_last_xent", counting)
  monkeypatch.setattr(cu, "LOGIT_BUDGET", 3 * V)
  capped = cu.context_losses(model, params, coll, valid, **kw)
  assert max(calls) == 3
  np.testing.assert_allclose(capped.restart, one_call.restart, rtol=1e-6)


@pytest.mark.parametrize("contexts, positions, match", [
    ([], (4, 8), "non-empty list of ints"),
    ([0, 2], (4, 8), "ints >= 1"),
    ([1.5], (4, 8), "ints >= 1"),
    ([True], (4, 8), "ints >= 1"),
    (3, (4, 8), "non-empty list"),
    ([1, 6], (4, 8), "context 6 does not fit before position 4"),
    ([1], (4,), "pair"),
    ([1], (4, 4), "0 <= lo < hi"),
    ([1], (-1, 4), "0 <= lo < hi"),
    ([1], (1.0, 4), "pair"),
    ([1], (None, 4), "pair"),
    ([1], (4, 2.0), "pair"),
    ([1], (-1, None), "0 <= lo < hi"),
])
def test_bad_contexts_and_positions(contexts, positions, match):
  with pytest.raises(ValueError, match=match):
    cu.check_contexts(contexts, positions)


def test_bad_requests_fail_before_any_model_call():
  valid = _split([[1, 2, 3], [4, 5]])

  class NoModel:  # any call fails loudly
    def apply(self, *a, **k):
      raise AssertionError("called")

  kw = dict(batch_size=2, seq_len=4)
  with pytest.raises(ValueError, match="rows have only 4 positions"):
    cu.context_losses(NoModel(), {}, {}, valid, contexts=[1], positions=(4, 8), **kw)
  with pytest.raises(ValueError, match="rows have only 4 positions"):
    cu.context_losses(NoModel(), {}, {}, valid, contexts=[8], **kw)  # default positions
  with pytest.raises(ValueError, match=r"positions end at 8, but rows have only 4 positions; "
                     r"pass hi <= 4, or hi None \(--positions=2:\)"):
    cu.context_losses(NoModel(), {}, {}, valid, contexts=[1], positions=(2, 8), **kw)
  with pytest.raises(ValueError, match="token_budget"):
    cu.context_losses(NoModel(), {}, {}, valid, contexts=[1], positions=(0, 4),
                      token_budget=0, **kw)
  with pytest.raises(ValueError, match="max_batches"):
    cu.context_losses(NoModel(), {}, {}, valid, contexts=[1], positions=(0, 4),
                      max_batches=0, **kw)
  with pytest.raises(ValueError, match=r"unigram_log_p must be a \(V,\) array"):
    cu.context_losses(NoModel(), {}, {}, valid, contexts=[1], positions=(0, 4),
                      unigram_log_p=np.zeros((2, 3)), **kw)


def test_no_targets_in_the_range_is_an_error(gla):
  model, params, coll = gla
  valid = _split([[1, 2, 3], [4, 5]])  # rows of at most 3 targets
  with pytest.raises(ValueError, match="no real target tokens at positions 5..7"):
    cu.context_losses(model, params, coll, valid, batch_size=2, seq_len=8, contexts=[1],
                      positions=(5, 8))
