"""``wave_bias_init="unigram"``: the wave LM's Born-logit bias starts at the log unigram."""

import numpy as np
import pytest

from qsf_jax import data as qdata
from qsf_jax.models.config import complete_stored, get_config
from qsf_jax.training import load_run, setup
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.loop import train_and_evaluate
from story_corpus import story_corpus

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_unigram_log_probs_counts_with_an_add_half_prior():
  lp = setup.unigram_log_probs(np.array([[0, 0], [1, 3]], np.uint16), 5)
  counts = np.array([2.5, 1.5, 0.5, 1.5, 0.5])
  np.testing.assert_allclose(lp, np.log(counts / counts.sum()), rtol=1e-6)
  assert lp.dtype == np.float32 and lp.shape == (5,)
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\), got \[0, 5\]"):
    setup.unigram_log_probs(np.array([0, 5]), 5)
  # A TokenSplit counts its token stream.
  split = qdata.TokenSplit(tokens=np.array([0, 0, 1, 3], np.uint16),
                           offsets=np.array([0, 4]), eot_id=4)
  np.testing.assert_array_equal(setup.unigram_log_probs(split, 5), lp)
  with pytest.raises(ValueError, match="integer ids, got dtype float64"):
    setup.unigram_log_probs(np.array([0.0, 1.0]), 5)
  with pytest.raises(ValueError, match="an integer array or a TokenSplit, got a tuple"):
    setup.unigram_log_probs(([0, 1], [2]), 5)


def test_config_choices_and_old_runs():
  assert get_config("wave", "tiny").wave_bias_init == "zeros"
  assert get_config("wave", "tiny", wave_bias_init="unigram").wave_bias_init == "unigram"
  with pytest.raises(ValueError, match="wave_bias_init must be one of"):
    get_config("wave", "tiny", wave_bias_init="ones")
  with pytest.raises(ValueError, match="needs wave_readout='born_logit'"):
    get_config("wave", "tiny", wave_bias_init="unigram", wave_readout="born")
  stored = get_config("wave", "tiny").to_dict()
  del stored["wave_bias_init"]  # a run stored before the field existed
  assert complete_stored(stored)["wave_bias_init"] == "zeros"


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
  root = tmp_path_factory.mktemp("wave_bias")
  with story_corpus(root, 120, seed=5) as corpus:
    yield corpus


def _train(corpus, workdir, init):
  cfg = TrainConfig(stage="wave", preset="tiny", data=str(corpus), tokenizer="bytes", steps=2,
                    batch_size=4, eval_every=2, eval_batches=1, log_every=1, sample_tokens=0,
                    model_overrides=(("wave_bias_init", init),))
  train_and_evaluate(cfg, workdir)
  return load_run(workdir)


def test_training_starts_from_the_unigram(corpus_path, tmp_path):
  run = _train(corpus_path, tmp_path / "unigram", "unigram")
  train_tokens = setup.load_corpus(run.cfg, run.tokenizer).train.tokens
  want = setup.unigram_log_probs(train_tokens, run.model_config.vocab_size)
  assert want.max() - want.min() > 5.0  # the unigram spans several nats
  bias = np.asarray(run.params["readout"]["bias"])
  # Two Adam steps at a peak rate of 1e-3 move each entry by at most ~2e-3.
  assert np.max(np.abs(bias - want)) < 5e-3
  assert run.meta["model_config"]["wave_bias_init"] == "unigram"
  zeros = _train(corpus_path, tmp_path / "zeros", "zeros")
  assert np.max(np.abs(np.asarray(zeros.params["readout"]["bias"]))) < 5e-3
