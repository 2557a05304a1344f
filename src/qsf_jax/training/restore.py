"""Loading a trained run folder: its configuration, model and parameters."""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
from typing import Any

import jax
from absl import logging

from qsf_jax.models import config as model_config
from qsf_jax.models.norms import anneal_beta
from qsf_jax.training import setup
from qsf_jax.training.checkpoint import (Checkpointer, has_checkpoint,
                                         missing_checkpoint_error)
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.errors import CorruptCheckpointError, TrainConfigError


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A checkpointed model ready for evaluation or sampling.

  Attributes:
    cfg: the run's ``TrainConfig``.
    model_config: its ``ModelConfig``, with the ``attn_impl`` it was loaded with.
    model: the Flax module.
    params: parameters.
    collections: the model's other collections (e.g. norm statistics).
    tokenizer: the run's tokenizer (sha256 checked against the checkpoint).
    meta: the checkpoint's JSON metadata.
    step: the checkpoint's step.
    seq_len: the training sequence length.
    beta: the normalisation-anneal weight at ``step`` (D5; 0 for other stages).
  """
  cfg: TrainConfig
  model_config: Any
  model: Any
  params: Any
  collections: Any
  tokenizer: Any
  meta: dict
  step: int
  seq_len: int
  beta: float


def check_beta(beta: float | None) -> None:
  """Raises ValueError unless ``beta`` is None or a number in [0, 1] (D5)."""
  if beta is not None and (isinstance(beta, bool) or not isinstance(beta, numbers.Real)
                           or not 0.0 <= beta <= 1.0):
    raise ValueError(f"beta must be a number in [0, 1] or None, got {beta!r}")


def run_beta(run: LoadedRun, beta: float | None = None) -> float:
  """The normalisation-anneal weight to run a loaded model at (QSF §3.4, D5).

  Args:
    run: the loaded run.
    beta: the weight asked for, in [0, 1], or None for the checkpoint's own
      (``run.beta``). ``beta=0`` runs an annealed stage's weights with plain
      LayerNorm.

  Returns:
    ``beta`` as a float, or ``run.beta``.

  Raises:
    ValueError: for a beta that is not a number in [0, 1], or one other than the
      checkpoint's own for a stage without the anneal.
  """
  check_beta(beta)
  if beta is None:
    return run.beta
  if not run.model_config.annealed and beta != run.beta:
    raise ValueError(f"beta={beta}: the {run.cfg.stage} stage has no normalisation anneal "
                     "(D5 applies to koopman_attn and hamiltonian_attn); drop --beta")
  return float(beta)


def _loaded_attn_impl(mcfg, attn_impl: str | None, workdir: str):
  """The run's ``ModelConfig`` with the linear-attention impl to load it with."""
  if attn_impl is None:
    if (mcfg.stage in model_config.LINEAR_ATTENTION_STAGES and mcfg.attn_impl == "pallas"
        and jax.default_backend() != "gpu"):
      logging.info("%s was trained with attn_impl='pallas'; the JAX backend is %r, so it is "
                   "loaded with attn_impl='auto' (the same function through the 'xla' path)",
                   workdir, jax.default_backend())
      return mcfg.replace(attn_impl="auto")
    return mcfg
  try:
    mcfg = mcfg.replace(attn_impl=attn_impl)
  except ValueError as e:
    raise TrainConfigError(f"invalid attn_impl: {e}") from e
  setup.check_attn_backend(mcfg)
  return mcfg


@functools.lru_cache(maxsize=32)
def _variable_shapes(model) -> tuple[dict, dict]:
  """``({name: shape}, {name: shape})`` of the model's parameters and other variables.

  From ``jax.eval_shape`` of ``model.init`` (a trace, no arrays), cached per model
  (a Linen module of a frozen config is hashable).
  """
  from qsf_jax.training.progressive import flatten_named  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.state import split_variables  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), "int32"))
  return tuple({k: tuple(v.shape) for k, v in flatten_named(tree).items()}
               for tree in split_variables(shapes))


def _check_variables_fit(model, params, collections, workdir: str, step: int) -> None:
  """Refuses restored arrays that are not the stored configuration's model's.

  The checkpoint's metadata and arrays are written together; arrays of another
  run (a copied or swapped ``state`` folder) would otherwise fail deep inside
  ``model.apply`` with an error about the module, after the data had loaded.
  """
  from qsf_jax.training.progressive import flatten_named  # pylint: disable=import-outside-toplevel
  for what, want, got in zip(("parameter", "variable"), _variable_shapes(model),
                             (params, collections)):
    got = flatten_named(got)
    for name in sorted(set(want) | set(got)):
      a = want[name] if name in want else None
      b = tuple(getattr(got[name], "shape", ())) if name in got else None
      if a != b:
        raise CorruptCheckpointError(
            f"{workdir}: checkpoint step {step} does not hold the model its metadata "
            f"describes: {what} {name} is "
            + (f"shaped {b}" if b is not None else "missing")
            + (f", the model's is {a}" if a is not None else " from the model")
            + " (its state folder from another run?)")


def load_run(workdir: str | os.PathLike, *, step: int | None = None,
             tokenizer_file: str | None = None, attn_impl: str | None = None) -> LoadedRun:
  """Restores the checkpoint ``step`` (default: latest) of a run folder.

  Args:
    workdir: the run folder written by ``train_and_evaluate``.
    step: which checkpoint; None for the latest.
    tokenizer_file: local vocabulary for gpt2 runs (default: the one recorded
      at training time, or ``$QSF_TOKENIZER_FILE``).
    attn_impl: the linear-attention impl to run the model with ("auto",
      "reference", "scan", "xla", "pallas"; every impl computes the same
      function). Default: the run's own, except that a run trained with
      "pallas" loads with "auto" where the JAX backend has no GPU.

  Raises:
    NoCheckpointError: no checkpoint in ``workdir``.
    TrainConfigError: the tokenizer differs from the one the run used, or
      ``attn_impl`` is unknown or "pallas" without a GPU backend.
  """
  workdir = os.fspath(workdir)
  if not has_checkpoint(workdir):
    raise missing_checkpoint_error(workdir)
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    meta = ckpt.meta(step)
    params, collections = ckpt.restore_params(meta["step"])
  finally:
    ckpt.close()
  cfg = TrainConfig.from_dict(meta["train_config"])
  if tokenizer_file is not None:
    cfg = cfg.replace(tokenizer_file=tokenizer_file)
  elif cfg.tokenizer_file is not None and not os.path.exists(cfg.tokenizer_file):
    cfg = cfg.replace(tokenizer_file=None)  # fall back to $QSF_TOKENIZER_FILE
  tokenizer = setup.load_tokenizer(cfg)
  want = meta["tokenizer"]
  if (tokenizer.name, tokenizer.sha256) != (want["name"], want["sha256"]):
    raise TrainConfigError(
        f"{workdir} was trained with tokenizer {want['name']} (sha256 {want['sha256']}), "
        f"but {tokenizer.name} (sha256 {tokenizer.sha256}) was loaded")
  mcfg = setup.make_model_config(cfg, tokenizer.vocab_size)
  if mcfg.to_dict() != meta["model_config"]:
    built, stored = mcfg.to_dict(), dict(meta["model_config"])
    diff = [f"{k}: stored {stored.get(k, '<absent>')!r}, rebuilt {built.get(k, '<absent>')!r}"
            for k in sorted(set(built) | set(stored)) if built.get(k) != stored.get(k)]
    raise TrainConfigError(
        f"{workdir}: the stored model configuration cannot be rebuilt by this version "
        f"of the code from the run's train config ({'; '.join(diff)})")
  mcfg = _loaded_attn_impl(mcfg, attn_impl, workdir)
  model = setup.build_model(mcfg)
  _check_variables_fit(model, params, collections, workdir, int(meta["step"]))
  beta = 0.0
  if mcfg.annealed:
    beta = float(anneal_beta(meta["step"], cfg.steps, anneal_frac=mcfg.anneal_frac,
                             shape=mcfg.anneal_shape, hold_frac=mcfg.anneal_hold_frac))
  return LoadedRun(cfg=cfg, model_config=mcfg, model=model, params=params,
                   collections=collections, tokenizer=tokenizer, meta=meta,
                   step=int(meta["step"]), seq_len=int(meta["seq_len"]), beta=beta)
