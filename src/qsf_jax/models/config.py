"""Model configuration: stages, presets and the spec's ambiguity flags.

One frozen dataclass, :class:`ModelConfig`, describes every model of the zoo.
Each ambiguity of the QSF spec (§5, decisions D2-D8) has a field whose default is
the spec's decision; the alternatives listed in the spec are the other values.

Stages (QSF spec §3):

=====================  ======================================================
``fnet``               Stage I, causal Fourier mixing + FFN (§3.2, D3)
``koopman``            Stage II, Koopman K with causal cosine mixing (§3.3, D2)
``koopman_attn``       Stage III, eq. 60: K + linear attention (§3.4)
``hamiltonian_attn``   Stage IV, orthogonal K = expm(S - S^T) (§3.5, D8)
``transformer``        softmax baseline (§3.6)
``wave``               Cayley wave-function LM (wave-function spec §1, §4)
``gla``                gated linear attention (Yang et al.), scalar gate per head
=====================  ======================================================

Presets: ``paper`` (d=320, L=32, 8 heads, T=512, V=50257; QSF spec §4.1),
``small`` (d=128, L=4, 4 heads, T=128; trains on a 2-core CPU in minutes) and
``tiny`` (d=32, L=2, 2 heads, T=32, V=257; for tests).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

from qsf_jax import _checks
from qsf_jax.kernels.designs import resolve_design

STAGES = ("fnet", "koopman", "koopman_attn", "hamiltonian_attn", "transformer", "wave", "gla")
PRESETS = ("tiny", "small", "paper")

# Stages whose norms anneal from LayerNorm to linear scaling (QSF §3.4, D5).
ANNEALED_STAGES = ("koopman_attn", "hamiltonian_attn")
# Stages that go through the shared linear-attention op.
LINEAR_ATTENTION_STAGES = ("koopman_attn", "hamiltonian_attn", "gla")

_CHOICES = {
    "stage": STAGES,
    "preset": PRESETS,
    "dtype": ("float32", "bfloat16"),
    "attn_impl": ("auto", "reference", "scan", "xla", "pallas"),
    "koopman_mixer": ("cosine", "none", "recurrent"),
    "attn_scale": ("position", "none"),
    "ls_scale": ("ema", "sqrt_d", "one"),
    "ls_stats_positions": ("loss", "all"),
    "anneal_shape": ("linear", "cosine"),
    "attn_form": ("add", "pull"),
    "hamiltonian_param": ("expm", "cayley"),
    "wave_readout": ("born_logit", "born"),
    "wave_bias_init": ("zeros", "unigram"),
}


# Float fields where +inf is a setting (every other float must be finite: an
# infinite init_std or alpha_init gave NaN logits, an infinite ln_eps zero ones).
_INF_ALLOWED = ("recurrent_radius",)  # inf: no Frobenius clamp on K


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Hyperparameters of one model (static, hashable: usable as a jit static arg).

  Attributes:
    stage: one of ``STAGES``.
    preset: one of ``PRESETS`` (informational once built).
    vocab_size: V, the tokenizer's vocabulary (50257 for gpt2, 257 for bytes).
    d_model: d, the embedding (hidden) dimension.
    n_layers: L, the depth (the wave stage uses ``wave_layers`` instead).
    n_heads: H; the head dimension is d_h = d / H.
    max_seq_len: T_max, the context length; also the fixed DFT length of the
      causal Fourier mixing (D3), so position t never depends on the actual
      sequence length.
    ffn_dim: FFN width (QSF spec: 512). 1280 with ``ffn_bias=False`` reproduces
      the paper's 42.5M Stage-I count (§3.7).
    ffn_bias: whether the FFN has biases.
    tie_embeddings: output head tied to the embedding (QSF §3.4 "Output").
    attn_impl: ``impl`` passed to ``qsf_jax.kernels.linear_attention``
      (an ``EXECUTION_FIELDS`` entry: a run may resume or load with another).
    attn_chunk_size: ``chunk_size`` passed to the linear-attention op (an
      ``EXECUTION_FIELDS`` entry).
    attn_pallas_design: ``pallas_design`` passed to the linear-attention op:
      how its Pallas kernels run on a GPU ("default", or a name from
      ``qsf_jax.kernels.PALLAS_DESIGNS`` or the kernel benchmark); every
      design computes the same values.
    dtype: compute dtype of the matmul inputs ("float32" or "bfloat16"):
      with "bfloat16" the projections, the Koopman product u K^T (K itself is
      rounded, so Stage IV's K is orthogonal to bf16 precision there), the
      feature maps, the output head and the Stage I/II Fourier and cosine
      mixing (the DFT matrices too) take bf16 inputs with float32
      accumulation. Parameters, gradients, norms, the residual stream, K's
      construction (expm / Cayley), the "recurrent" Koopman mixer (S2-c) and
      the logits stay in float32 (conventions §2.4).
    init_std: std of the normal initialiser of matrices (QSF §3.3: 0.02).
    ln_eps: LayerNorm epsilon.
    koopman_mixer: D2, Stage II token mixing: "cosine" (S2-a, default),
      "none" (S2-b, per-token K: bigram-bounded), "recurrent" (S2-c). Stages
      III/IV ignore it: their K acts per token (QSF §3.4) unless
      ``stage3_keep_fourier``.
    recurrent_radius: S2-c only: K is rescaled so that its Frobenius norm (an
      upper bound of its spectral radius) is at most this value.
    fnet_postnorm: D3 alternative: original-FNet post-norm without row scale.
    attn_scale: D4 (Stages III/IV's measurement attention only), "position"
      (c_i = 1/((i+1) d_h), default) or "none"
      (c_i = 1, paper-literal).
    ls_scale: D5, the frozen scale s-bar of the linear scaling: "ema" (EMA of
      the per-token std of the norm input, default), "sqrt_d" or "one".
    ls_ema_decay: D5 EMA decay (0.99).
    ls_stats_positions: D5, the positions whose per-token std the EMA averages:
      "loss" (those the loss counts, the model's ``stats_mask``; default, so that
      LS matches LN on real tokens) or "all" (padding included).
    anneal_frac: D5, the fraction of steps over which beta ramps 0 -> 1.
    anneal_hold_frac: the final fraction of steps held at beta = 1 after the
      ramp, so the model trains in its exactly linear form (not in the spec,
      whose ramp ends at the last step: 0, the default). The ramp then spans
      [(1 - f - h) S, (1 - h) S]; see ``norms.anneal_beta``.
    anneal_shape: D5 ramp shape, "linear" (default) or "cosine".
    stats_steps: D5, steps before the anneal during which s-bar is collected.
    attn_form: D6, "add" (alpha x_tgt, default) or "pull" (alpha (x_tgt - v)).
    causal_include_self: D7 (Stages III/IV's measurement attention only), True
      for j <= i (default), False for j < i.
    hamiltonian_param: D8, Stage IV K = "expm"(S - S^T) (default) or "cayley".
    stage3_keep_ffn: QSF §3.4 flag: keep the FFN sub-block in Stages III/IV.
    stage3_keep_fourier: QSF §3.4 flag: in Stages III/IV, the K term uses the
      Stage-II causal cosine sequence mixing instead of acting per token.
    alpha_init: initial measurement strength alpha_l (QSF §3.4: 1.0).
    gla_gate_temp: GLA gate temperature tau: g_t = log sigmoid(x w + c) / tau.
    wave_dim: N, the Hilbert-space dimension of the wave-function LM.
    wave_generators: M, the number of Hermitian generators of the input
      Hamiltonian mixture (wave-function spec §1.2 option 2).
    wave_layers: number of stacked Cayley cells (spec §1.6 "Deep": layer l+1's
      mixture weights are a linear map of (Re psi, Im psi) of layer l).
    wave_readout: "born_logit" (softmax(beta |W psi|^2 + b), default for
      large-V LMs) or "born" (POVM isometry, log(|M psi|^2 (1-eta) + eta/V)).
    wave_dt: Cayley step Delta t (spec §1.2: fixed 1.0).
    wave_eta: unsharpness eta of the "born" readout (spec §1.4).
    wave_bias_init: the Born-logit bias b at the start of training: "zeros"
      (the spec is silent; the default) or "unigram", the log frequencies of
      the training tokens (counts + 1/2), set by the training loop before the
      first step (``training.setup.initial_params``). With "zeros" and the QSF
      schedule, Adam moves b by about the learning rate per step, too little to
      reach the unigram (docs/RESULTS.md).
  """
  stage: str
  preset: str = "small"
  vocab_size: int = 50257
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  max_seq_len: int = 128
  ffn_dim: int = 512
  ffn_bias: bool = True
  tie_embeddings: bool = True
  attn_impl: str = "auto"
  attn_chunk_size: int = 64
  attn_pallas_design: str = "default"
  dtype: str = "float32"
  init_std: float = 0.02
  ln_eps: float = 1e-5
  # D2 (Stage II mixer)
  koopman_mixer: str = "cosine"
  recurrent_radius: float = 1.0
  # D3 (Stage I)
  fnet_postnorm: bool = False
  # D4 (attention scale)
  attn_scale: str = "position"
  # D5 (LayerNorm -> linear scaling anneal)
  ls_scale: str = "ema"
  ls_ema_decay: float = 0.99
  ls_stats_positions: str = "loss"
  anneal_frac: float = 0.15
  anneal_hold_frac: float = 0.0
  anneal_shape: str = "linear"
  stats_steps: int = 500
  # D6, D7, D8
  attn_form: str = "add"
  causal_include_self: bool = True
  hamiltonian_param: str = "expm"
  stage3_keep_ffn: bool = False
  stage3_keep_fourier: bool = False
  alpha_init: float = 1.0
  # GLA
  gla_gate_temp: float = 16.0
  # wave-function LM
  wave_dim: int = 32
  wave_generators: int = 16
  wave_layers: int = 1
  wave_readout: str = "born_logit"
  wave_dt: float = 1.0
  wave_eta: float = 0.1
  wave_bias_init: str = "zeros"

  def __post_init__(self):
    _checks.plain_numbers(self)  # np.int64(32) -> 32, np.float32(0.02) -> 0.02 (JSON metadata)
    for f in dataclasses.fields(self):  # types first: "false" would pass as a truthy bool
      v = getattr(self, f.name)
      if f.type == "bool" and not isinstance(v, bool):
        raise ValueError(f"{f.name} must be True or False, got {v!r}")
      if f.type == "float" and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                                or not (math.isfinite(v) or (v == math.inf
                                                             and f.name in _INF_ALLOWED))):
        raise ValueError(f"{f.name} must be a finite real number, got {v!r}")
      if f.type == "str" and not isinstance(v, str):
        raise ValueError(f"{f.name} must be a string, got {v!r}")
    for name, choices in _CHOICES.items():
      _checks.check_choice(name, getattr(self, name), choices)
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len",
                 "ffn_dim", "attn_chunk_size", "wave_dim", "wave_generators",
                 "wave_layers", "stats_steps"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    resolve_design(self.attn_pallas_design, self.attn_chunk_size,  # raises if unknown
                   design_arg="attn_pallas_design", chunk_arg="attn_chunk_size")
    c = self.attn_chunk_size
    if self.attn_impl == "pallas" and (c < 16 or c & (c - 1)):  # else the first apply fails
      raise ValueError(f"attn_impl='pallas' needs attn_chunk_size a power of two >= 16 "
                       f"(Triton tile sizes), got {c}")
    for name in ("init_std", "ln_eps", "recurrent_radius", "gla_gate_temp", "wave_dt"):
      _checks.check_positive(name, getattr(self, name))
    if self.d_model % self.n_heads:
      raise ValueError(
          f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
    if not 0.0 < self.anneal_frac <= 1.0:
      raise ValueError(f"anneal_frac must be in (0, 1], got {self.anneal_frac}")
    if not (0.0 <= self.anneal_hold_frac < 1.0
            and self.anneal_frac + self.anneal_hold_frac <= 1.0):
      raise ValueError(f"anneal_hold_frac must be in [0, 1 - anneal_frac] = "
                       f"[0, {1.0 - self.anneal_frac:g}], got {self.anneal_hold_frac}")
    if not 0.0 < self.ls_ema_decay < 1.0:
      raise ValueError(f"ls_ema_decay must be in (0, 1), got {self.ls_ema_decay}")
    if not 0.0 <= self.wave_eta < 1.0:
      raise ValueError(f"wave_eta must be in [0, 1), got {self.wave_eta}")
    if self.wave_bias_init != "zeros" and self.wave_readout != "born_logit":
      raise ValueError(
          f"wave_bias_init={self.wave_bias_init!r} needs wave_readout='born_logit' (the "
          f"'born' readout has no bias), got wave_readout={self.wave_readout!r}")
    if self.wave_readout == "born" and self.vocab_size < self.wave_dim:
      raise ValueError(
          f"wave_readout='born' needs vocab_size >= wave_dim (an isometry), got "
          f"vocab_size={self.vocab_size}, wave_dim={self.wave_dim}")

  @property
  def head_dim(self) -> int:
    """d_h = d / H."""
    return self.d_model // self.n_heads

  @property
  def annealed(self) -> bool:
    """Whether the norms anneal LayerNorm -> linear scaling (Stages III, IV)."""
    return self.stage in ANNEALED_STAGES

  def replace(self, **overrides) -> "ModelConfig":
    """A copy with some fields changed (validated like ``get_config``)."""
    _check_override_names(overrides)
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    """The fields as a JSON-serialisable dict (for checkpoint metadata)."""
    return dataclasses.asdict(self)


_PRESETS = {
    "paper": dict(vocab_size=50257, d_model=320, n_layers=32, n_heads=8,
                  max_seq_len=512, ffn_dim=512, wave_dim=64, wave_generators=32),
    "small": dict(vocab_size=50257, d_model=128, n_layers=4, n_heads=4,
                  max_seq_len=128, ffn_dim=512, wave_dim=32, wave_generators=16),
    "tiny": dict(vocab_size=257, d_model=32, n_layers=2, n_heads=2,
                 max_seq_len=32, ffn_dim=64, wave_dim=8, wave_generators=4,
                 attn_chunk_size=16),
}

_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))

# Fields that choose how the model is computed, not what it computes: every
# linear-attention impl, chunk size and Pallas design gives the same function up
# to float rounding. A run may resume, and a checkpoint may be loaded, with other
# values (e.g. trained on a GPU with "pallas", evaluated on a laptop with "xla").
EXECUTION_FIELDS = ("attn_impl", "attn_chunk_size", "attn_pallas_design")

# Fields added to ModelConfig after runs were first stored, each with the value that
# reproduces the earlier behaviour: a stored configuration without one had that value.
ADDED_FIELDS = {"attn_pallas_design": "default", "wave_bias_init": "zeros",
                "anneal_hold_frac": 0.0, "ls_stats_positions": "all"}


def complete_stored(stored: Mapping[str, Any]) -> dict[str, Any]:
  """A stored ``ModelConfig.to_dict()`` with the fields added since then filled in.

  Runs stored before a field of ``ADDED_FIELDS`` existed then still match the
  configuration this version rebuilds for them (resume, evaluate, sample).
  """
  return {**ADDED_FIELDS, **stored}


def legacy_overrides(stored: Mapping[str, Any]) -> dict[str, Any]:
  """The ``ADDED_FIELDS`` a stored configuration lacks whose earlier value is not the default.

  A run stored before such a field existed must be rebuilt with that value
  (e.g. ``ls_stats_positions="all"``: its D5 statistics counted padding), so
  the caller adds these to the run's model overrides.
  """
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  return {k: v for k, v in ADDED_FIELDS.items() if k not in stored and v != defaults[k]}


def _check_override_names(overrides) -> None:
  bad = sorted(set(overrides) - set(_FIELDS) - {"stage", "preset"})
  if bad:
    raise ValueError(
        f"unknown ModelConfig override(s) {bad}; valid fields are {list(_FIELDS)}")


def get_config(stage: str, preset: str = "small", **overrides) -> ModelConfig:
  """The configuration of ``stage`` at ``preset`` size, with overrides.

  Args:
    stage: one of ``STAGES``.
    preset: one of ``PRESETS``.
    **overrides: any ``ModelConfig`` field (e.g. ``vocab_size=257``).

  Returns:
    A validated, frozen ``ModelConfig``.

  Raises:
    ValueError: unknown stage, preset or override name (the message lists the
      choices), or an invalid value.
  """
  _checks.check_choice("stage", stage, STAGES)
  _checks.check_choice("preset", preset, PRESETS)
  _check_override_names(overrides)
  fields = dict(_PRESETS[preset])
  fields.update(overrides)
  return ModelConfig(stage=stage, preset=preset, **fields)
