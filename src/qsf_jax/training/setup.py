"""Resolving a ``TrainConfig`` into a tokenizer, corpus, model and run metadata.

This module holds the model side (configuration, parameters, metadata); the run
folder's lock and output-folder check live in ``run_folder``, the tokenizer and
corpus loading in ``run_corpus``, both re-exported here.
"""

from __future__ import annotations

import datetime
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qsf_jax import data as qdata
from qsf_jax.models import lm as model_lm
from qsf_jax.models import config as model_config
from qsf_jax.training.checkpoint import git_sha
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.errors import TrainConfigError
from qsf_jax.training.run_corpus import (  # noqa: F401 (re-exported)
    check_data_path, load_corpus, load_run_corpus, load_tokenizer, story_mode_coverage,
    warn_if_story_mode_wastes_data)
from qsf_jax.training.run_folder import (  # noqa: F401 (re-exported)
    check_output_folder, workdir_lock)


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

  ``IDENTITY_KEYS`` (resume_identity.py) are compared on resume; the rest is
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
