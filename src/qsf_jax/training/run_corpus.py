"""The tokenizer and corpus of a run: the ``--data`` check, loading, story-mode
coverage (QSF spec D13), and the check of a restored run's data against the
data it was trained on."""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging

from qsf_jax import data as qdata
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.errors import DataChangedError


def check_data_path(data: str) -> None:
  """Raises the data layer's error for a ``--data`` that names nothing, without reading it.

  Names (auto, tinystories, synthetic) and existing paths pass: they are resolved
  (hub, file hashes) when the corpus is loaded.
  """
  if data in qdata.DATA_NAMES:
    return
  if not (isinstance(data, str) and data.strip() and pathlib.Path(data).expanduser().exists()):
    qdata.resolve_source(data)  # raises DataNotFoundError / UnknownDataSpecError


def load_tokenizer(cfg: TrainConfig):
  return qdata.get_tokenizer(cfg.tokenizer, tokenizer_file=cfg.tokenizer_file)


def load_corpus(cfg: TrainConfig, tokenizer, data: str | None = None):
  """The corpus of a run (``data`` overrides ``cfg.data``, e.g. for evaluation)."""
  return qdata.load_corpus(data if data is not None else cfg.data, tokenizer,
                           cache_dir=cfg.cache_dir, max_train_stories=cfg.max_train_stories)


def story_mode_coverage(split, seq_len: int) -> float:
  """The share of a split's tokens that story mode (QSF spec D13) can show the model.

  Each row is one story + EOT truncated to ``seq_len + 1`` tokens, so a story of
  L tokens contributes min(L, seq_len + 1) of them.

  Args:
    split: a ``TokenSplit``.
    seq_len: the run's sequence length T.
  """
  lengths = np.diff(np.asarray(split.offsets))
  return float(np.minimum(lengths, seq_len + 1).sum() / max(1, split.n_tokens))


def warn_if_story_mode_wastes_data(cfg: TrainConfig, split, seq_len: int, log) -> None:
  """Warns when story mode would train on under half of the training tokens.

  That happens with stories much longer than T + 1 tokens, e.g. a ``.txt`` file
  without ``<|endoftext|>`` separators, which is one story: every row of every
  batch is then its first T + 1 tokens.
  """
  if cfg.data_mode != "story":
    return
  cover = story_mode_coverage(split, seq_len)
  if cover < 0.5:
    mean = split.n_tokens / max(split.n_stories, 1)
    why = (f"the stories (mean {mean:.0f} tokens) are much longer than a row; a .txt file "
           "without <|endoftext|> separators is one story" if mean > 20 * (seq_len + 1) else
           f"the stories (mean {mean:.0f} tokens) are longer than a row; a longer --seq_len "
           "shows more of each")
    log(f"warning: --data_mode=story shows the model {100 * cover:.2g}% of the training "
        f"tokens ({split.n_stories} stories, {split.n_tokens} tokens, rows of "
        f"{seq_len + 1}): {why}; --data_mode=packed uses every token")


def load_run_corpus(run, *, data: str | None = None, cache_dir: str | None = None,
                    where: str = "the run", needed_for: str | None = None):
  """The corpus to evaluate or analyse a restored run on, checked against its training data.

  The token-cache key stored with the run covers the source's contents (file
  hashes), the tokenizer, ``max_train_stories`` and the cache format. With
  ``data`` None (the run's own data) a different key means the files changed
  since training (or ``data="auto"`` now reaches the hub where training fell back
  to the synthetic corpus), so the validation stories may now include training
  stories, and every figure would silently be on other data: ``DataChangedError``.
  A given ``data`` (the user's choice) is used as it is, with a warning when it
  is the run's source with other contents. Runs stored without a key are only
  warned about when the source's name differs.

  ``needed_for`` names a figure that needs the run's own training split even
  when another ``data`` is evaluated (the unseen-input counts, the unigram
  baseline): a change is then refused with a message that says so, since
  ``--data`` cannot help.

  Args:
    run: a ``restore.LoadedRun``.
    data: data to use instead of the run's own (``TrainConfig.data`` syntax).
    cache_dir: token-cache folder instead of the run's.
    where: the run folder, for messages.
    needed_for: what needs the run's own data, for the refusal's message.

  Returns:
    ``(cfg, corpus)``: the run's ``TrainConfig`` (with ``cache_dir``) and the corpus.
  """
  cfg = run.cfg if cache_dir is None else run.cfg.replace(cache_dir=cache_dir)
  trained_on = (run.meta.get("data") or {}).get("source")
  if (data is None and isinstance(trained_on, str) and trained_on.startswith("path:")
      and cfg.data not in qdata.DATA_NAMES):
    # --data as typed may be relative to where training ran; the files it named are
    # recorded with their absolute path, so a run folder works from any folder
    cfg = cfg.replace(data=trained_on[len("path:"):])
  try:
    corpus = load_corpus(cfg, run.tokenizer, data=data)
  except qdata.DataNotFoundError as e:
    if data is not None:
      raise
    hint = (f"{needed_for} needs the training split, so move the files back" if needed_for
            else "move the files back, or pass --data to evaluate on data where they are now")
    raise qdata.DataNotFoundError(f"{e}: {where} was trained on {cfg.data}; {hint}") from e
  stored_key = (run.meta.get("data_source") or {}).get("cache_key")
  source, key = corpus.metadata.get("source"), corpus.metadata.get("cache_key")
  changed = bool(stored_key and key and key != stored_key)
  what = f"{source}" if source == trained_on else f"{source} (trained on {trained_on})"
  msg = (f"the data {what} differ from those {where} was trained on (token-cache key "
         f"{str(key)[:12]}, stored {str(stored_key)[:12]}): the files, the token-cache format "
         "or what the data name resolves to changed since")
  if data is None and changed and needed_for is not None:
    raise DataChangedError(f"{msg}; {needed_for} needs the training split as it was, "
                           "whatever --data evaluates: restore the files it was trained on")
  msg += ", so the validation stories may now include training stories"
  if data is None and changed:
    raise DataChangedError(f"{msg}; pass --data={cfg.data} to use the data as they are now")
  if data is None and trained_on and source != trained_on:
    # a run stored without its cache key: e.g. data="auto" fell back to the synthetic
    # corpus when the run was trained and reaches the hub now (or the other way round)
    logging.warning("evaluating %s on %s, but it was trained on %s; pass --data to choose",
                    where, source, trained_on)
  elif data is not None and changed and source == trained_on:
    logging.warning("%s", msg)
  return cfg, corpus
