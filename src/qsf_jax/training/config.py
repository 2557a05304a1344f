"""The training configuration: one frozen dataclass, JSON-serialisable."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from qsf_jax import _checks
from qsf_jax.data.batches import MODES as DATA_MODES
from qsf_jax.training.errors import TrainConfigError

# Run-length defaults per model preset, used for any of these left as None.
# paper: the paper's protocol (20k steps, D10 batch 32). small: about 15 minutes
# on 2 CPU cores with GPT-2 tokens (~1.7 s per 16 x 128 step, measured).
# tiny: seconds, for tests and smoke runs.
PRESET_RUN_DEFAULTS = {
    "paper": dict(steps=20000, batch_size=32, checkpoint_every=1000, eval_every=1000),
    "small": dict(steps=500, batch_size=16, checkpoint_every=100, eval_every=100),
    "tiny": dict(steps=100, batch_size=8, checkpoint_every=50, eval_every=50),
}


# Fields added to TrainConfig after runs were first stored, each with the value that
# reproduces the earlier behaviour (a stored configuration without one had it).
ADDED_FIELDS = {"cycle_momentum": False}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Settings of one training run (QSF spec §4.1, D10-D14).

  Attributes:
    stage: model stage (``qsf_jax.models.config.STAGES``).
    preset: model size preset (``qsf_jax.models.config.PRESETS``).
    model_overrides: extra ``ModelConfig`` fields, as ``((name, value), ...)``.
    data: ``"auto"``, ``"tinystories"``, ``"synthetic"`` or a local path.
    tokenizer: ``"gpt2"`` or ``"bytes"``.
    tokenizer_file: local ``r50k_base.tiktoken`` for gpt2 (None: environment/default).
    cache_dir: token-cache folder (None: the data module's default).
    data_mode: how batches are cut from the token stream (passed to ``get_batch``).
    max_train_stories: keep only the first N training stories (D13: 500,000).
    steps: S, optimizer updates in the stage (spec: 20,000); None: the
      preset's default (``PRESET_RUN_DEFAULTS``).
    batch_size: global batch size in sequences (D10: 32); None: the preset's.
    seq_len: tokens per sequence; None uses the model's ``max_seq_len``.
    seed: run seed: parameter init, step RNG and the batch order.
    lr: OneCycle peak learning rate (D10: 1e-3).
    weight_decay: AdamW decay on matrices (D11: 0.1).
    clip_norm: global gradient-norm clip (spec: 1.0).
    cycle_momentum: D10, cycle Adam's b1 0.95 -> 0.85 -> 0.95 against the
      learning rate, as PyTorch's ``OneCycleLR`` does by default (True).
    grad_accum: micro-batches per update.
    dtype: compute dtype override ("float32"/"bfloat16"), None keeps the preset's.
    init_from: a previous stage's run folder for the progressive hand-off (D12).
    checkpoint_every: save every this many steps (0: only at the end; None: the preset's).
    eval_every: validation every this many steps (0: only at the end; None: the preset's).
    eval_batches: validation batches per evaluation (None: the whole split).
    log_every: progress-line period in steps.
    max_to_keep: checkpoints kept on disk.
    sample_prompt: D14 prompt for the sample printed at each evaluation.
    sample_tokens: D14: 40 new tokens.
    sample_temperature: D14: 0.8.
    sample_top_k: D14: 50.
  """
  stage: str
  preset: str = "small"
  model_overrides: tuple = ()
  data: str = "auto"
  tokenizer: str = "gpt2"
  tokenizer_file: str | None = None
  cache_dir: str | None = None
  data_mode: str = "story"
  max_train_stories: int | None = None
  steps: int | None = None
  batch_size: int | None = None
  seq_len: int | None = None
  seed: int = 0
  lr: float = 1e-3
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  cycle_momentum: bool = True
  grad_accum: int = 1
  dtype: str | None = None
  init_from: str | None = None
  checkpoint_every: int | None = None
  eval_every: int | None = None
  eval_batches: int | None = 20
  log_every: int = 50
  max_to_keep: int = 3
  sample_prompt: str = "Once upon a time,"
  sample_tokens: int = 40
  sample_temperature: float = 0.8
  sample_top_k: int = 50

  def __post_init__(self):
    _checks.plain_numbers(self)  # NumPy scalars -> Python numbers (checks, JSON metadata)
    # Types first, so that a bad value fails here and not after training has run.
    for name in ("stage", "preset", "data", "tokenizer", "data_mode", "sample_prompt"):
      if not isinstance(getattr(self, name), str):
        raise TrainConfigError(f"--{name} must be a string, got {getattr(self, name)!r}")
    for name in ("tokenizer_file", "cache_dir", "init_from", "dtype"):
      if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
        raise TrainConfigError(
            f"--{name} must be a string or None, got {getattr(self, name)!r}")
    if self.preset not in PRESET_RUN_DEFAULTS:
      raise TrainConfigError(
          f"unknown preset {self.preset!r}; choose one of {list(PRESET_RUN_DEFAULTS)}")
    defaults = PRESET_RUN_DEFAULTS[self.preset]
    for name, value in defaults.items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    for name in ("steps", "batch_size", "grad_accum", "log_every", "max_to_keep"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise TrainConfigError(f"--{name} must be a positive integer, got {v!r}")
    if self.steps < 2:
      raise TrainConfigError(f"--steps must be >= 2 (OneCycle schedule), got {self.steps}")
    for name in ("checkpoint_every", "eval_every", "sample_tokens", "seed"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise TrainConfigError(f"--{name} must be a non-negative integer, got {v!r}")
    if self.seed >= 1 << 32:  # a PRNG key holds 32 bits: larger seeds repeat smaller ones
      raise TrainConfigError(f"--seed must be < 2^32 = {1 << 32}, got {self.seed}")
    for name in ("max_train_stories", "seq_len", "eval_batches"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise TrainConfigError(
            f"--{name} must be a positive integer (or unset for the default), got {v!r}")
      if v is not None and v < 1:
        raise TrainConfigError(f"--{name} must be >= 1 (or unset for the default), got {v}")
    for name, lo, closed in (("lr", 0.0, False), ("weight_decay", 0.0, True),
                             ("clip_norm", 0.0, False)):
      v = getattr(self, name)
      inf_ok = name == "clip_norm" and v == math.inf  # --clip_norm=inf: no clipping
      if (isinstance(v, bool) or not isinstance(v, (int, float))
          or not (math.isfinite(v) or inf_ok) or (v < lo if closed else v <= lo)):
        raise TrainConfigError(
            f"--{name} must be a finite number {'>=' if closed else '>'} {lo:g}, got {v!r}")
    # The D14 sample settings, checked here so a bad one fails before training, not at
    # the first evaluation.
    t = self.sample_temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (
        math.isfinite(t) and t >= 0):
      raise TrainConfigError(f"sample_temperature must be finite and >= 0, got {t!r}")
    k = self.sample_top_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise TrainConfigError(f"sample_top_k must be an integer >= 1, got {k!r}")
    if not isinstance(self.cycle_momentum, bool):
      raise TrainConfigError(f"--cycle_momentum must be True or False, got "
                             f"{self.cycle_momentum!r}")
    if self.data_mode not in DATA_MODES:
      raise TrainConfigError(
          f"--data_mode must be one of {list(DATA_MODES)}, got {self.data_mode!r}")
    if self.dtype not in (None, "float32", "bfloat16"):
      raise TrainConfigError(
          f"--dtype must be one of ['float32', 'bfloat16'], got {self.dtype!r}")
    if self.batch_size % self.grad_accum:
      raise TrainConfigError(
          f"--batch_size={self.batch_size} must be divisible by --grad_accum={self.grad_accum}")
    try:
      overrides = dict(self.model_overrides)
    except (TypeError, ValueError):
      raise TrainConfigError(
          f"model_overrides must be a mapping or (name, value) pairs, got "
          f"{self.model_overrides!r}") from None
    object.__setattr__(self, "model_overrides",
                       tuple(sorted((str(k), _checks.plain_number(v)) for k, v in overrides.items())))

  def replace(self, **changes) -> "TrainConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["model_overrides"] = dict(self.model_overrides)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    d = dict(d)
    for name, value in ADDED_FIELDS.items():  # runs stored before the field existed
      d.setdefault(name, value)
    d["model_overrides"] = tuple(dict(d.get("model_overrides", {})).items())
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})
