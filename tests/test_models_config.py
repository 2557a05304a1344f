"""Configs, parameter counts (QSF §3.7, Table 2), the progressive-init mapping, bad inputs."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.models import (
    PRESETS,
    STAGES,
    ModelConfig,
    anneal_beta,
    build_model,
    count_params,
    get_config,
    paper_param_counts,
    shared_param_paths,
    stats_window,
    transfer_params,
    weight_decay_mask,
)
from qsf_jax.models.config import complete_stored
from qsf_jax.models.params import flatten
from qsf_jax.training.config import TrainConfig

# QSF spec §3.7: shared pieces with V = 50257, d = 320, T = 512, L = 32.
V, D, TMAX, L = 50257, 320, 512, 32
E, P, FINAL_LN = V * D, TMAX * D, 2 * D
SHARED = E + P + FINAL_LN


def _abstract_params(cfg):
  model = build_model(cfg)
  tokens = jax.ShapeDtypeStruct((1, cfg.max_seq_len), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def _paper_count(stage, **overrides):
  return count_params(_abstract_params(get_config(stage, "paper", **overrides)))


# --- get_config ---------------------------------------------------------------------------


def test_presets():
  paper = get_config("koopman_attn", "paper")
  assert (paper.d_model, paper.n_layers, paper.n_heads, paper.max_seq_len, paper.vocab_size,
          paper.ffn_dim) == (320, 32, 8, 512, 50257, 512)
  assert paper.head_dim == 40
  for stage in STAGES:
    for preset in PRESETS:
      cfg = get_config(stage, preset)
      assert cfg.stage == stage and cfg.preset == preset
      assert cfg.d_model % cfg.n_heads == 0
  tiny, small = get_config("fnet", "tiny"), get_config("fnet", "small")
  assert tiny.d_model < small.d_model < paper.d_model
  assert get_config("fnet", "tiny", vocab_size=50257).vocab_size == 50257


def test_spec_defaults_of_the_ambiguity_flags():
  cfg = get_config("koopman", "paper")
  assert cfg.koopman_mixer == "cosine"            # D2: S2-a
  assert cfg.fnet_postnorm is False               # D3: pre-norm with row scale
  assert cfg.attn_scale == "position"             # D4: c_i = 1/((i+1) d_h)
  assert (cfg.ls_scale, cfg.anneal_frac, cfg.anneal_shape, cfg.ls_ema_decay,
          cfg.stats_steps) == ("ema", 0.15, "linear", 0.99, 500)   # D5
  assert cfg.attn_form == "add"                   # D6
  assert cfg.causal_include_self is True          # D7: j <= i
  assert cfg.hamiltonian_param == "expm"          # D8
  assert cfg.attn_impl == "auto" and cfg.dtype == "float32"
  assert (cfg.stage3_keep_ffn, cfg.stage3_keep_fourier) == (False, False)
  assert cfg.wave_readout == "born_logit"


def test_config_is_frozen_and_hashable():
  cfg = get_config("gla", "tiny")
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 64
  assert hash(cfg) == hash(get_config("gla", "tiny"))
  assert cfg.replace(d_model=64).d_model == 64
  assert ModelConfig(**cfg.to_dict()) == cfg


def test_numpy_scalars_become_python_numbers():
  # A sweep over np.arange(...) passes NumPy scalars; the configs hold Python numbers,
  # so their checks treat them as ints/floats and the run metadata is valid JSON.
  cfg = get_config("koopman_attn", "tiny", d_model=np.int64(32), init_std=np.float32(0.5),
                   tie_embeddings=np.bool_(False))
  assert type(cfg.d_model) is int and type(cfg.init_std) is float
  assert type(cfg.tie_embeddings) is bool and cfg.init_std == float(np.float32(0.5))
  assert json.loads(json.dumps(cfg.to_dict()))["d_model"] == 32
  with pytest.raises(ValueError, match="d_model must be a positive int, got 32.0"):
    get_config("koopman_attn", "tiny", d_model=np.float64(32.0))
  run = TrainConfig(stage="koopman_attn", steps=np.int64(10), lr=np.float32(0.5),
                    model_overrides={"d_model": np.int64(64)})
  assert type(run.steps) is int and type(run.lr) is float
  assert json.loads(json.dumps(run.to_dict()))["model_overrides"] == {"d_model": 64}


@pytest.mark.parametrize("args,kwargs,match", [
    (("nope",), {}, "stage must be one of .*'fnet'"),
    (("fnet", "huge"), {}, "preset must be one of .*'tiny'"),
    (("fnet",), {"d_modle": 8}, "unknown ModelConfig override.*d_modle.*valid fields"),
    (("fnet",), {"dtype": "float16"}, "dtype must be one of"),
    (("fnet",), {"attn_impl": "cuda"}, "attn_impl must be one of"),
    (("gla", "tiny"), {"attn_impl": "pallas", "attn_chunk_size": 24},
     r"attn_impl='pallas' needs attn_chunk_size a power of two >= 16.*24"),
    (("gla",), {"attn_pallas_design": "fastest"}, "unknown attn_pallas_design 'fastest'"),
    (("gla", "tiny"), {"attn_pallas_design": "c64_bv64_w8_s3_chunkbwd"},
     "chunk-64 candidate, but attn_chunk_size=16; pass attn_chunk_size=64"),
    (("koopman",), {"koopman_mixer": "fft"}, "koopman_mixer must be one of"),
    (("fnet",), {"d_model": 30, "n_heads": 4}, "divisible"),
    (("fnet",), {"vocab_size": 0}, "vocab_size must be a positive int"),
    (("fnet",), {"n_layers": 2.0}, "n_layers must be a positive int"),
    (("fnet",), {"anneal_frac": 1.5}, "anneal_frac"),
    (("koopman_attn",), {"anneal_hold_frac": -0.1}, "anneal_hold_frac"),
    (("koopman_attn",), {"anneal_hold_frac": 0.9},
     r"anneal_hold_frac must be in \[0, 1 - anneal_frac\] = \[0, 0.85\]"),
    (("fnet",), {"init_std": -1.0}, "init_std"),
    (("fnet",), {"tie_embeddings": "false"}, "tie_embeddings must be True or False"),
    (("fnet",), {"fnet_postnorm": 1}, "fnet_postnorm must be True or False"),
    (("koopman_attn",), {"anneal_frac": "0.2"}, "anneal_frac must be a finite real number"),
    (("koopman_attn",), {"alpha_init": True}, "alpha_init must be a finite real number"),
    # Non-finite floats gave NaN (init_std, alpha_init) or all-zero (ln_eps) logits.
    (("fnet",), {"init_std": float("inf")}, "init_std must be a finite real number, got inf"),
    (("koopman_attn",), {"alpha_init": float("nan")}, "alpha_init must be a finite real"),
    (("fnet",), {"ln_eps": float("inf")}, "ln_eps must be a finite real number"),
    (("wave",), {"wave_dt": float("inf")}, "wave_dt must be a finite real number"),
    (("fnet",), {"attn_scale": None}, "attn_scale must be a string"),
    (("wave", "tiny"), {"wave_readout": "born", "vocab_size": 4}, "isometry"),
])
def test_get_config_rejects_bad_inputs(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    get_config(*args, **kwargs)


def test_infinite_recurrent_radius_means_no_clamp():
  cfg = get_config("koopman", "tiny", koopman_mixer="recurrent", recurrent_radius=float("inf"))
  assert cfg.recurrent_radius == float("inf")
  with pytest.raises(ValueError, match="recurrent_radius must be a finite real number"):
    get_config("koopman", "tiny", recurrent_radius=float("nan"))


def test_replace_rejects_unknown_field():
  with pytest.raises(ValueError, match="unknown ModelConfig override"):
    get_config("fnet", "tiny").replace(width=3)


# --- parameter counts (QSF §3.7) -----------------------------------------------------------


def test_paper_table2_is_self_consistent():
  """QSF spec §4.2 (Table 2, copied verbatim): ppl = e^loss for every row, up to the
  table's rounding (loss to 0.01, ppl to 0.1), and the text's two ratios: 19% fewer
  parameters than the baseline (29.4 / 36.3 = 0.81) and 80% degradation of Stage IV
  against Stage III (3.76 / 2.08 = 1.81)."""
  import math  # pylint: disable=g-import-not-at-top
  from qsf_jax.models.params import PAPER_TABLE2  # pylint: disable=g-import-not-at-top
  assert set(PAPER_TABLE2) == {"transformer", "fnet", "koopman", "koopman_attn",
                               "hamiltonian_attn"}
  for stage, row in PAPER_TABLE2.items():
    lo, hi = math.exp(row["val_loss"] - 0.005) - 0.05, math.exp(row["val_loss"] + 0.005) + 0.05
    assert lo <= row["ppl"] <= hi, stage
  t2 = PAPER_TABLE2
  assert round(t2["koopman_attn"]["params"] / t2["transformer"]["params"], 2) == 0.81
  assert round(t2["hamiltonian_attn"]["val_loss"] / t2["koopman_attn"]["val_loss"], 2) == 1.81


def test_stage3_and_stage4_paper_counts_are_exact():
  """The spec fixes III/IV: E + P + 640 + 32 (K+b, 3 (W+b), LN, alpha) = 29,415,392."""
  per_layer = (D * D + D) + 3 * (D * D + D) + 2 * D + 1
  assert SHARED + L * per_layer == 29_415_392
  assert _paper_count("koopman_attn") == 29_415_392
  assert _paper_count("hamiltonian_attn") == 29_415_392
  # Table 2 says 29.4M for both.
  assert round(_paper_count("koopman_attn") / 1e5) == paper_param_counts()["koopman_attn"] / 1e5


def test_stage1_paper_counts():
  """42.5M is reproduced by FFN 4d without FFN biases; the stated FFN 512 gives 26.80M."""
  assert _paper_count("fnet", ffn_dim=4 * D, ffn_bias=False) == SHARED + L * (2 * D * 4 * D + 4 * D)
  assert _paper_count("fnet", ffn_dim=4 * D, ffn_bias=False) == 42_502_080
  ffn512 = 2 * D * 512 + 512 + D
  assert _paper_count("fnet") == SHARED + L * (ffn512 + 4 * D)
  assert round(_paper_count("fnet") / 1e4) == 2680                  # spec: 26.80M tied
  assert round(_paper_count("fnet", tie_embeddings=False) / 1e4) == 4288   # 42.88M untied


def test_stage2_and_baseline_counts_are_ours_not_the_papers():
  """S2-a gives 30.09M (paper 36.0M) and the L=32 baseline 39.95M (paper 36.3M): unexplained (§3.7)."""
  ffn512 = 2 * D * 512 + 512 + D
  stage2 = _paper_count("koopman")
  assert stage2 == SHARED + L * (D * D + D + ffn512 + 4 * D)
  assert round(stage2 / 1e4) == 3009
  base = _paper_count("transformer")
  assert base == SHARED + L * (4 * (D * D + D) + ffn512 + 4 * D)
  assert round(base / 1e4) == 3995
  paper = paper_param_counts()
  assert paper["koopman"] == 36_000_000 and paper["transformer"] == 36_300_000
  assert abs(stage2 - paper["koopman"]) > 1e6 and abs(base - paper["transformer"]) > 1e6


def test_paper_table2():
  paper = paper_param_counts()
  assert set(paper) == {"transformer", "fnet", "koopman", "koopman_attn", "hamiltonian_attn"}
  # "19% fewer parameters": 29.4 / 36.3 = 0.81.
  assert round(paper["koopman_attn"] / paper["transformer"], 2) == 0.81


def test_count_params_counts_every_leaf():
  assert count_params({"a": np.zeros((3, 4)), "b": {"c": np.zeros(5), "d": np.zeros(())}}) == 18
  assert count_params({"a": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": [1.5, 2]}) == 8
  for bad, where in (({"a": np.zeros(2), "b": {"c": "w"}}, r"\['b'\]\['c'\] is str"),
                     ([True], r"\[0\] is bool")):
    with pytest.raises(ValueError, match=r"count_params takes a pytree of arrays; the leaf at "
                       + where):
      count_params(bad)


# --- progressive init (QSF D12) -----------------------------------------------------------


def _init(stage, **overrides):
  """Random parameters with the model's tree and shapes (no compilation needed)."""
  cfg = get_config(stage, "tiny", **overrides)
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), tokens)["params"]
  rng = np.random.default_rng(len(stage))
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_transfer_params_between_stages():
  p1, p2 = _init("fnet"), _init("koopman")
  merged, report = transfer_params(p1, p2, "fnet", "koopman")
  assert {p.split("/")[0] for p in report["copied"]} == {"embed", "pos_embed", "layers",
                                                         "final_norm"}
  assert "layers/koopman/K" in report["new"] and "layers/koopman/b" in report["new"]
  assert report["dropped"] == []
  flat, f1, f2 = flatten(merged), flatten(p1), flatten(p2)
  for p in report["copied"]:
    np.testing.assert_array_equal(flat[p], f1[p])
  np.testing.assert_array_equal(flat["layers/koopman/K"], f2["layers/koopman/K"])
  assert set(flat) == set(f2)

  p3 = _init("koopman_attn")
  merged3, report3 = transfer_params(merged, p3, "koopman", "koopman_attn")
  assert "layers/koopman/K" in report3["copied"] and "layers/norm1/scale" in report3["copied"]
  assert "layers/attn/query/kernel" in report3["new"] and "layers/alpha" in report3["new"]
  assert "layers/ffn/wi/kernel" in report3["dropped"]
  np.testing.assert_array_equal(flatten(merged3)["layers/koopman/K"], flat["layers/koopman/K"])

  p4 = _init("hamiltonian_attn")
  _, report4 = transfer_params(merged, p4, "koopman", "hamiltonian_attn")
  assert "layers/koopman/S" in report4["new"] and "layers/koopman/K" in report4["dropped"]
  assert "layers/koopman/b" in report4["copied"]


@pytest.mark.parametrize("src, dst", [("fnet", "koopman"), ("koopman", "koopman_attn"),
                                      ("koopman", "hamiltonian_attn")])
def test_transfer_params_carries_an_untied_head(src, dst):
  # With tie_embeddings=False the trained output head is part of every hand-off.
  p_src, p_dst = _init(src, tie_embeddings=False), _init(dst, tie_embeddings=False)
  merged, report = transfer_params(p_src, p_dst, src, dst)
  assert "lm_head" in report["copied"] and "lm_head" not in report["new"] + report["dropped"]
  np.testing.assert_array_equal(flatten(merged)["lm_head"], flatten(p_src)["lm_head"])
  # Only one side untied: nothing to copy, the head is new (or dropped).
  _, report = transfer_params(_init(src), p_dst, src, dst)
  assert "lm_head" in report["new"]
  _, report = transfer_params(p_src, _init(dst), src, dst)
  assert "lm_head" in report["dropped"]


def test_transfer_params_rejects_bad_pairs_and_shapes():
  p1, p2 = _init("fnet"), _init("koopman")
  # A whole variables dict copied nothing, without an error.
  with pytest.raises(ValueError, match="src_params looks like a whole variables dict"):
    transfer_params({"params": p1}, p2, "fnet", "koopman")
  with pytest.raises(ValueError, match="dst_params looks like a whole variables dict"):
    transfer_params(p1, {"params": p2}, "fnet", "koopman")
  with pytest.raises(ValueError, match="no parameter of the koopman model is shared"):
    transfer_params({"other": p1}, p2, "fnet", "koopman")
  with pytest.raises(ValueError, match="supported"):
    shared_param_paths("transformer", "koopman_attn")
  with pytest.raises(ValueError, match="src_stage must be one of"):
    shared_param_paths("stage1", "koopman")
  assert shared_param_paths("gla", "gla") == ("",)
  p1 = _init("fnet")
  p2 = _init("koopman", d_model=16)
  with pytest.raises(ValueError, match="embed/embedding.*shape"):
    transfer_params(p1, p2, "fnet", "koopman")


def test_weight_decay_mask_by_name():
  """D11: decay on E, K, S, W_*, FFN matrices; not on biases, norms, alpha."""
  mask = flatten(weight_decay_mask(_init("koopman_attn")))
  assert mask["embed/embedding"] and mask["layers/koopman/K"]
  assert mask["layers/attn/query/kernel"]
  assert not mask["layers/koopman/b"] and not mask["layers/attn/query/bias"]
  assert not mask["layers/norm1/scale"] and not mask["layers/alpha"]
  assert not mask["final_norm/scale"]
  wave = flatten(weight_decay_mask(_init("wave")))
  assert wave["readout/W_re"] and not wave["cell_0/hamiltonian/G_X"] and not wave["readout/beta"]


# --- anneal schedule (D5) -----------------------------------------------------------------


def test_anneal_beta_and_stats_window():
  S = 1000
  assert float(anneal_beta(0, S)) == 0.0 and float(anneal_beta(850, S)) == 0.0
  np.testing.assert_allclose(float(anneal_beta(925, S)), 0.5, rtol=1e-6)
  assert float(anneal_beta(1000, S)) == 1.0
  np.testing.assert_allclose(float(anneal_beta(925, S, shape="cosine")), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(anneal_beta(870, S, shape="cosine")),
                             0.5 * (1 - np.cos(np.pi * 20 / 150)), rtol=1e-5)
  assert [stats_window(t, S) for t in (349, 350, 849, 850)] == [False, True, True, False]
  for S in (7, 100, 500, 20000):  # a finished run evaluates at exactly beta = 1
    assert float(anneal_beta(S, S)) == 1.0 and float(anneal_beta(S, S, shape="cosine")) == 1.0
    assert float(jax.jit(anneal_beta, static_argnums=1)(S, S)) == 1.0
  assert float(anneal_beta(85, 100)) == 0.0
  with pytest.raises(ValueError, match="shape"):
    anneal_beta(1, S, shape="step")
  # total_steps = 0 gave NaN; fractions outside the run gave a ramp that never ends.
  for kw, match in ((dict(total_steps=0), "total_steps must be >= 1"),
                    (dict(total_steps=float("nan")), "total_steps must be >= 1"),
                    (dict(anneal_frac=-0.5), r"anneal_frac must be in \(0, 1\]"),
                    (dict(anneal_frac=2.0), r"anneal_frac must be in \(0, 1\]"),
                    (dict(hold_frac=1.0), r"hold_frac must be in \[0, 1 - anneal_frac\]"),
                    (dict(anneal_frac="0.1"), "anneal_frac must be a real number")):
    with pytest.raises(ValueError, match=match):
      anneal_beta(**{"step": 1, "total_steps": S, **kw})
  # Traced arguments are not checked (jit over all of them, as before the checks).
  assert float(jax.jit(anneal_beta)(925, 1000)) == pytest.approx(0.5, rel=1e-6)
  assert float(anneal_beta(925, jnp.int32(1000))) == pytest.approx(0.5, rel=1e-6)



def test_anneal_hold_ends_the_ramp_early():
  """anneal_hold_frac h: the ramp spans [(1-f-h)S, (1-h)S], then beta = 1; h = 0 is D5."""
  S, f, h = 1000, 0.15, 0.1
  beta = lambda t, **kw: float(anneal_beta(t, S, anneal_frac=f, hold_frac=h, **kw))
  assert beta(750) == 0.0 and beta(900) == 1.0 and beta(1000) == 1.0
  np.testing.assert_allclose(beta(825), 0.5, rtol=1e-6)
  np.testing.assert_allclose(beta(825, shape="cosine"), 0.5, rtol=1e-6)
  assert [stats_window(t, S, hold_frac=h) for t in (249, 250, 749, 750)] == [
      False, True, True, False]
  for t in (0, 850, 925, 999, 1000):  # h = 0 is bit for bit the spec's schedule
    assert float(anneal_beta(t, S, hold_frac=0.0)) == float(anneal_beta(t, S))
  for S in (7, 100, 20000):  # the hold starts at exactly beta = 1
    assert float(anneal_beta(round(0.8 * S), S, anneal_frac=0.2, hold_frac=0.2)) == 1.0
  cfg = get_config("koopman_attn", "tiny", anneal_hold_frac=0.85)  # f + h = 1 is allowed
  assert cfg.anneal_hold_frac == 0.85


# --- model input validation ---------------------------------------------------------------


def test_model_rejects_bad_inputs():
  cfg = get_config("koopman_attn", "tiny")
  model = build_model(cfg)
  ok = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="integer token ids"):
    model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="tokens_BT must have 2"):
    model.init(jax.random.key(0), jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="max_seq_len=32"):
    model.init(jax.random.key(0), jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match=r"\(B, 1\)"):
    model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), decode=True)
  with pytest.raises(ValueError, match="beta"):
    model.init(jax.random.key(0), ok, beta=jnp.zeros(2))
  with pytest.raises(ValueError, match="ModelConfig"):
    build_model({"stage": "fnet"})


def test_attn_pallas_design_names_and_stored_configs():
  cfg = get_config("koopman_attn", "tiny", attn_pallas_design="c16_bv64_w4_s3_chunkfwd")
  assert ModelConfig(**cfg.to_dict()) == cfg
  assert get_config("koopman_attn").attn_pallas_design == "default"
  # A configuration stored before the field existed rebuilds as the default design.
  stored = get_config("koopman_attn").to_dict()
  del stored["attn_pallas_design"]
  assert complete_stored(stored) == get_config("koopman_attn").to_dict()
  assert complete_stored(cfg.to_dict()) == cfg.to_dict()  # stored values win
  # So does one stored before anneal_hold_frac existed: no hold, the spec's schedule.
  stored = get_config("koopman_attn").to_dict()
  del stored["anneal_hold_frac"]
  assert complete_stored(stored) == get_config("koopman_attn").to_dict()


def test_stages_iii_and_iv_anneal_their_norms():
  """QSF §3.4 and D8 ("LN anneal as Stage III"): Stages III and IV, and only they, anneal;
  their final norm keeps the D5 statistics."""
  assert {s for s in STAGES if get_config(s, "tiny").annealed} == {"koopman_attn",
                                                                    "hamiltonian_attn"}
  for stage in STAGES:
    shapes = jax.eval_shape(build_model(get_config(stage, "tiny")).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 4), jnp.int32))
    has_stats = "final_norm" in shapes.get("norm_stats", {})
    assert has_stats == (stage in ("koopman_attn", "hamiltonian_attn")), stage


def test_legacy_overrides_name_only_fields_whose_old_value_is_not_the_default():
  from qsf_jax.models.config import legacy_overrides
  stored = get_config("koopman_attn", "tiny").to_dict()
  assert legacy_overrides(stored) == {}
  for name in ("attn_pallas_design", "wave_bias_init", "anneal_hold_frac", "ls_stats_positions"):
    del stored[name]
  assert legacy_overrides(stored) == {"ls_stats_positions": "all"}
