"""Resolving a ``TrainConfig`` into a tokenizer, corpus, model and run metadata."""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qsf_jax import data as qdata
from qsf_jax.models import lm as model_lm
from qsf_jax.models import config as model_config
from qsf_jax.training.checkpoint import git_sha
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.errors import DataChangedError, TrainConfigError, WorkdirInUseError

try:
  import fcntl
except ImportError:  # not on POSIX: no lock
  fcntl = None


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds an exclusive ``flock`` on the folder ``workdir`` while a run trains there.

  A second ``train`` (or ``progressive`` stage) on the same folder, e.g. one
  launched twice by mistake, is refused with ``WorkdirInUseError`` instead of
  both writing checkpoints and ``metrics.jsonl`` into it. The lock is on the
  folder itself, so nothing is written for it; it goes with the process (a
  killed run holds nothing). Where the file system has no ``flock`` (some
  network mounts), nothing is locked.
  """
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(workdir, os.O_RDONLY)
  try:
    if fcntl is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise WorkdirInUseError(
            f"{workdir} is in use by another training process (it holds the folder's lock); "
            "wait for it to end, or use another --workdir") from None
      except OSError:  # no flock here: train unlocked, as before
        pass
    yield
  finally:
    os.close(fd)  # releases the flock


def check_output_folder(name: str, path) -> None:
  """Raises ``ValueError`` before any work when ``path`` cannot be a folder to write in.

  ``path`` may not exist yet (it is made later); then its nearest existing
  ancestor must be a writable folder. Writability is tried, not only read from
  the permission bits (which pass everything for root, even on a read-only file
  system): an empty folder is made there and removed at once. Nothing else is
  created.

  Args:
    name: the argument or flag, for the message (e.g. "--workdir").
    path: the folder.
  """
  p = pathlib.Path(path)
  if not str(path):
    raise ValueError(f"{name} must name a folder, got an empty path")
  if p.exists() and not p.is_dir():
    raise ValueError(f"{name}={path} is a file, not a folder")
  ancestor = p.absolute()
  while not ancestor.exists():
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise ValueError(f"{name}={path}: {ancestor} is a file, not a folder")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise ValueError(f"{name}={path}: the folder {ancestor} is not writable")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".qsf-write-check-", dir=ancestor))
  except OSError as e:
    raise ValueError(f"{name}={path}: cannot write in the folder {ancestor} "
                     f"({e.strerror or e})") from e


def check_stage_and_preset(stage: str, preset: str) -> None:
  """Raises ``TrainConfigError`` naming the choices for an unknown stage/preset."""
  if stage not in model_config.STAGES:
    raise TrainConfigError(
        f"unknown stage {stage!r}; choose one of {list(model_config.STAGES)}")
  if preset not in model_config.PRESETS:
    raise TrainConfigError(
        f"unknown preset {preset!r}; choose one of {list(model_config.PRESETS)}")


def make_model_config(cfg: TrainConfig, vocab_size: int) -> model_config.ModelConfig:
  """The ``ModelConfig`` of a run: preset + overrides, vocabulary from the tokenizer.

  Args:
    cfg: the run configuration.
    vocab_size: the tokenizer's vocabulary size V.

  Raises:
    TrainConfigError: unknown stage/preset, an invalid override, an explicit
      ``vocab_size`` override smaller than the tokenizer's vocabulary, or a
      ``dtype`` override that disagrees with ``cfg.dtype``.
  """
  check_stage_and_preset(cfg.stage, cfg.preset)
  overrides = dict(cfg.model_overrides)
  if overrides.get("vocab_size", vocab_size) < vocab_size:
    raise TrainConfigError(
        f"model override vocab_size={overrides['vocab_size']} is smaller than the "
        f"{cfg.tokenizer} tokenizer's vocabulary ({vocab_size})")
  overrides.setdefault("vocab_size", vocab_size)
  if cfg.dtype is not None:
    if overrides.get("dtype", cfg.dtype) != cfg.dtype:
      raise TrainConfigError(f"--dtype={cfg.dtype} and --override=dtype={overrides['dtype']} "
                             f"disagree; give one of them")
    overrides["dtype"] = cfg.dtype
  try:
    return model_config.get_config(cfg.stage, cfg.preset, **overrides)
  except (TypeError, ValueError) as e:
    raise TrainConfigError(f"invalid model configuration: {e}") from e


def check_attn_backend(mcfg: model_config.ModelConfig) -> None:
  """Refuses ``attn_impl="pallas"`` for a linear-attention stage off the GPU.

  The Pallas kernels compile for GPUs only; "auto" picks them on a GPU and the
  "xla" path elsewhere, computing the same function.

  Raises:
    TrainConfigError: ``attn_impl="pallas"`` while the JAX backend is not "gpu".
  """
  backend = jax.default_backend()
  if (mcfg.stage in model_config.LINEAR_ATTENTION_STAGES and mcfg.attn_impl == "pallas"
      and backend != "gpu"):
    raise TrainConfigError(
        f"attn_impl='pallas' runs the Pallas GPU kernels, but the JAX backend is "
        f"{backend!r}; use attn_impl='auto' (Pallas on a GPU, 'xla' elsewhere) or 'xla'")


def resolve_seq_len(cfg: TrainConfig, mcfg: model_config.ModelConfig) -> int:
  """``--seq_len`` or the model's ``max_seq_len``; refuses lengths beyond it."""
  seq_len = cfg.seq_len if cfg.seq_len is not None else mcfg.max_seq_len
  if seq_len > mcfg.max_seq_len:
    raise TrainConfigError(
        f"--seq_len={seq_len} exceeds the {cfg.stage}/{cfg.preset} model's maximum "
        f"context of {mcfg.max_seq_len} tokens (raise it with --override=max_seq_len=N)")
  return seq_len


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


def build_model(mcfg: model_config.ModelConfig):
  return model_lm.build_model(mcfg)


def unigram_log_probs(tokens, vocab_size: int) -> np.ndarray:
  """Log unigram frequencies of a token array, log((n_v + 1/2) / sum_u (n_u + 1/2)).

  Args:
    tokens: token ids (any shape), integers in [0, vocab_size), or a
      ``TokenSplit`` (e.g. ``corpus.train``), whose token stream is counted.
    vocab_size: V.

  Returns:
    (V,) float32; every entry finite (the 1/2 is an add-half prior).
  """
  if isinstance(tokens, qdata.TokenSplit):
    tokens = tokens.tokens
  try:
    ids = np.asarray(tokens).reshape(-1)
  except ValueError as e:
    raise ValueError(f"tokens must be an integer array or a TokenSplit, got a "
                     f"{type(tokens).__name__} that is not a rectangular array") from e
  if ids.dtype.kind not in "iu":
    raise ValueError(f"tokens must hold integer ids, got dtype {ids.dtype}")
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
  counts = np.bincount(ids, minlength=vocab_size).astype(np.float64) + 0.5
  return np.log(counts / counts.sum()).astype(np.float32)


def initial_params(params, mcfg: model_config.ModelConfig, corpus, log=None):
  """Freshly initialised parameters with the data-dependent parts set.

  ``wave_bias_init="unigram"`` (wave stage): the Born-logit bias b of
  softmax(beta |W psi|^2 + b) starts at ``unigram_log_probs`` of the training
  split, so the head starts from the unigram distribution tilted by the Born
  term. Everything else is returned unchanged.

  Args:
    params: the model's ``params`` from ``init_variables``.
    mcfg: its ``ModelConfig``.
    corpus: the run's corpus (its ``train`` split is counted).
    log: optional callable taking one message string.

  Returns:
    The parameters (a new tree where something was set).
  """
  if mcfg.stage != "wave" or mcfg.wave_bias_init == "zeros":
    return params
  bias = unigram_log_probs(corpus.train, mcfg.vocab_size)
  readout = dict(params["readout"])
  if readout["bias"].shape != bias.shape:
    raise ValueError(f"readout/bias has shape {readout['bias'].shape}, the vocabulary "
                     f"{bias.shape}")
  readout["bias"] = jnp.asarray(bias, readout["bias"].dtype)
  if log is not None:
    log(f"wave_bias_init=unigram: Born-logit bias set to the log unigram of "
        f"{int(np.asarray(corpus.train.tokens).size)} training tokens")
  return {**params, "readout": readout}


def keep_provenance(meta: dict, stored: dict) -> dict:
  """``meta`` of a resumed run with the stored run's origin (``init_source``, ``init_from``).

  A resume ignores ``--init_from``, so the checkpoints it writes keep saying
  where the parameters first came from. A run stored before ``init_source``
  was recorded keeps it absent (unknown), not None (scratch).
  """
  out = dict(meta, train_config=dict(meta["train_config"], init_from=(
      stored.get("train_config") or {}).get("init_from")))
  if "init_source" in stored:
    out["init_source"] = stored["init_source"]
  else:
    out.pop("init_source", None)
  return out


def run_metadata(cfg: TrainConfig, mcfg: model_config.ModelConfig, corpus,
                 seq_len: int, num_devices: int) -> dict[str, Any]:
  """The JSON record stored with every checkpoint.

  ``IDENTITY_KEYS`` (checkpoint.py) are compared on resume; the rest is
  provenance (data description, git sha, versions, device count).
  """
  meta = corpus.metadata
  return {
      "stage": cfg.stage,
      "preset": cfg.preset,
      "model_config": mcfg.to_dict(),
      "train_config": cfg.to_dict(),
      # {"path", "stage", "step"} of the --init_from checkpoint (set by the loop),
      # None for a run from scratch; absent in runs stored before it was kept.
      "init_source": None,
      "tokenizer": {"name": corpus.tokenizer.name, "sha256": corpus.tokenizer.sha256},
      "data_source": {"cache_key": meta.get("cache_key")},
      "data": {k: meta.get(k) for k in (
          "source", "source_description", "train_stories", "train_tokens",
          "valid_stories", "valid_tokens", "cache_key")},
      "seed": cfg.seed,
      "steps": cfg.steps,
      "batch_size": cfg.batch_size,
      "seq_len": seq_len,
      "lr": cfg.lr,
      "weight_decay": cfg.weight_decay,
      "clip_norm": cfg.clip_norm,
      "cycle_momentum": cfg.cycle_momentum,
      "grad_accum": cfg.grad_accum,
      "data_mode": cfg.data_mode,
      "git_sha": git_sha(),
      "jax_version": jax.__version__,
      "num_devices": num_devices,
      "num_processes": jax.process_count(),
      "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
