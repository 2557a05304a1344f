"""End-to-end analysis of tiny checkpoints made here (``experiments.analyze``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_compiled
from experiments import analyze as analyze_cli
from qsf_jax.analysis import forward, layer_operators, modes, validation
from qsf_jax.analysis.pipeline import analyze_workdir
from story_corpus import story_corpus
from qsf_jax.training import setup
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.evaluation import evaluate_split, evaluate_workdir
from qsf_jax.training.loop import train_and_evaluate
from qsf_jax.training.restore import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("spectrum", "log_abs_hist", "layers", "alpha", "loss", "occupancy", "propagation",
           "sse")


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A small synthetic .txt corpus (114 train / 6 validation stories), private cache."""
  root = tmp_path_factory.mktemp("analysis")
  with story_corpus(root, 120, seed=5) as corpus:
    yield root, corpus


def _train(env, stage, steps, **kw):
  root, corpus = env
  wd = root / stage
  cfg = TrainConfig(stage=stage, preset="tiny", data=str(corpus), tokenizer="bytes",
                    steps=steps, batch_size=2, checkpoint_every=kw.pop("checkpoint_every", steps),
                    eval_every=steps, eval_batches=1, log_every=steps, sample_tokens=0,
                    max_to_keep=5, **kw)
  train_and_evaluate(cfg, wd)
  return wd


@pytest.fixture(scope="module")
def stage3(env):
  """Stage III, 3 steps, a checkpoint at every step (alpha history of 3 points)."""
  return _train(env, "koopman_attn", 3, checkpoint_every=1)


@pytest.fixture(scope="module")
def stage4(env):
  return _train(env, "hamiltonian_attn", 2)


def _png_ok(path):
  data = path.read_bytes()
  return data[:8] == PNG_SIGNATURE and len(data) > 5000


@pytest.mark.slow
def test_cli_end_to_end_stage3(stage3, tmp_path, capsys):
  out = tmp_path / "report"
  rc = analyze_cli.run(["analyze", f"--workdir={stage3}", f"--out={out}", "--max_sequences=4",
                        "--sse_paths=8", "--sse_steps=50", "--sentence_tokens=20"])
  assert rc == 0, capsys.readouterr().err
  for name in FIGURES:
    assert _png_ok(out / f"{name}.png"), name
  report = (out / "report.md").read_text()
  for needle in ("## Spectrum", "### Energy budget", "**Verdict:**", "## Measurement strength",
                 "## Hidden-state norms", "## Which tokens", "## Propagators", "### SSE",
                 "(spectrum.png)", "(sse.png)",
                 "Gamma_decay and Gamma_growth sum over the sign of gamma"):
    assert needle in report, needle
  res = json.loads((out / "spectrum.json").read_text())
  spec = res["spectrum"]
  n = spec["n_eigenvalues"]
  assert n == 2 * 32
  for counts in spec["counts_by_tol"].values():
    assert sum(counts.values()) == n
  K = layer_operators(load_run(stage3).params, load_run(stage3).model_config).K
  logdet = sum(np.linalg.slogdet(k)[1] for k in K)
  assert spec["gamma_net"] == pytest.approx(logdet, rel=1e-9)
  assert spec["slogdet_consistent"]
  assert res["validation"]["sequences"] == 4
  assert res["validation"]["z_rms"]["sequences"] == 4
  alpha = res["alpha"]
  assert alpha["source"] == "checkpoints" and alpha["steps"] == [1, 2, 3]
  run = load_run(stage3)
  np.testing.assert_allclose(alpha["alpha"][-1], np.asarray(run.params["layers"]["alpha"]),
                             rtol=1e-6)
  prop = res["propagation"]
  assert prop["variant"] in ("continuous", "discrete") and prop["tokens"] == 20
  assert res["sse"]["n_paths"] == 8 and res["sse"]["finite"]
  assert f"Layer {prop['layer']} (0-based)" in report
  assert "dt = 1, sigma_m = 1, sigma_K = 1 on the layer's own (unscaled) states" in report
  assert f"(||x0|| = {res['sse']['scale']:.4g}) and sigma_m = 1 in those units" in report
  # the discrete variant's paper and exact forms coincide: no ratio to compare
  assert ("Ratio of mean shifts paper/exact: n/a (discrete variant" in report) == (
      prop["variant"] == "discrete")
  assert ("Median ratio of mean shifts" in report) == (prop["variant"] == "continuous")


def test_replay_matches_the_model(stage3):
  """The layer-by-layer replay gives the model's logits and each layer's eq. 60 terms."""
  run = load_run(stage3)
  cfg = run.model_config
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
  ops = layer_operators(run.params, cfg)
  steps = list(forward.iter_layers(run.params, run.collections, cfg, tokens, run.beta))
  assert [s.layer for s in steps] == list(range(cfg.n_layers))
  for s in steps:
    l = s.layer
    rebuilt = (np.asarray(s.k_in) @ ops.K[l].T + ops.b[l] + ops.alpha[l] * np.asarray(s.x_tgt))
    np.testing.assert_allclose(np.asarray(s.h_out - s.h_in), rebuilt, atol=1e-5)
  z = forward.final_states(run.params, run.collections, cfg, steps[-1].h_out, run.beta)
  logits = z @ jnp.asarray(run.params["embed"]["embedding"]).T
  # compiled whole: eager flax compiles every primitive on its own
  ref = jax.jit(lambda x: run.model.apply({"params": run.params, **run.collections}, x,
                                          beta=run.beta))(jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5)


def test_validation_gain_and_top_mode_occupancy_per_layer(stage3):
  """Per layer, G_eff = sum_k |lambda_k| w_k and the top-pair occupancy of the Koopman
  input u (not h) at the real input positions, against numpy eig: w = |V^{-1} u|^2 / sum."""
  run = load_run(stage3)
  cfg = run.model_config
  ops = layer_operators(run.params, cfg)
  bases = [modes.mode_basis(K) for K in ops.K]
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16))
  mask = np.ones((2, 16), np.float32)
  mask[1, 9:] = 0.0  # row 1: 10 real inputs, 6 padding
  val = validation.validation_statistics(run.params, run.collections, cfg, bases,
                                         [{"inputs": tokens, "mask": mask}], beta=run.beta)
  valid = validation.valid_inputs(mask)
  assert val["tokens"] == int(valid.sum()) == 26
  checked = 0
  for s in forward.iter_layers(run.params, run.collections, cfg, tokens, run.beta):
    if bases[s.layer] is None:
      continue
    lam, V = np.linalg.eig(ops.K[s.layer])
    w = np.abs(np.linalg.solve(V, np.asarray(s.k_in, np.float64)[valid].T).T) ** 2
    w /= w.sum(axis=1, keepdims=True)
    k = int(np.argmax(np.abs(lam)))
    top = [k] if lam[k].imag == 0 else [k, int(np.argmin(np.abs(lam - np.conj(lam[k]))))]
    rec = val["layers"][s.layer]
    assert rec["tokens"] == 26
    assert rec["g_eff_mean"] == pytest.approx(float(np.mean(w @ np.abs(lam))), rel=1e-6)
    assert rec["mean_occupancy"] == pytest.approx(float(np.mean(w[:, top].sum(axis=1))),
                                                  rel=1e-6)
    checked += 1
  assert checked > 0


@pytest.mark.parametrize("stage, mixer, extra", [
    ("koopman", "cosine", {}), ("koopman", "recurrent", {}), ("hamiltonian_attn", None, {}),
    ("hamiltonian_attn", None, {"hamiltonian_param": "cayley"}),
    ("koopman_attn", "cosine", {"stage3_keep_fourier": True})],
    ids=["koopman-cosine", "koopman-recurrent", "hamiltonian_attn", "hamiltonian_attn-cayley",
         "koopman_attn-keep_fourier"])
def test_replay_gives_the_vector_k_multiplies(stage, mixer, extra):
  """k_in for Stage II's S2-a (the causal cosine mixing of u) and S2-c (s_{t-1}, with
  s_t = K_c s_{t-1} + u_t), computed here from u = LN(h_in); for Stage IV the layer
  identity h_out - h_in = u K^T + b + alpha x_tgt, with K orthogonal (from expm or, with
  ``hamiltonian_param="cayley"``, the Cayley map); for Stage III with
  ``stage3_keep_fourier`` (QSF §3.4) the cosine mixing of u, and the same identity with it."""
  from qsf_jax.models import build_model, get_config  # pylint: disable=g-import-not-at-top
  from qsf_jax.models.fourier import causal_cosine_mix  # pylint: disable=g-import-not-at-top
  cfg = get_config(stage, "tiny", **({"koopman_mixer": mixer} if stage == "koopman" else {}),
                   **extra)
  params, coll = init_compiled(build_model(cfg), 0, 16)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: p + 0.2 * rng.normal(size=p.shape).astype(p.dtype), params)
  tokens = rng.integers(0, cfg.vocab_size, (2, 12))
  ops = layer_operators(params, cfg)
  steps = list(forward.iter_layers(params, coll, cfg, tokens, 0.0))
  for s in steps:
    l, h = s.layer, np.asarray(s.h_in, np.float64)
    n1 = jax.tree.map(lambda x: np.asarray(x, np.float64)[l], params["layers"]["norm1"])
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    u = (h - mu) / np.sqrt(var + cfg.ln_eps) * n1["scale"] + n1["bias"]
    if stage == "hamiltonian_attn":
      np.testing.assert_allclose(ops.K[l] @ ops.K[l].T, np.eye(cfg.d_model), atol=1e-5)
      # the float32 matrix the model uses is the same map, rounded
      np.testing.assert_allclose(ops.K_model[l], ops.K[l], atol=1e-5)
      rebuilt = u @ ops.K[l].T + ops.b[l] + ops.alpha[l] * np.asarray(s.x_tgt)
      np.testing.assert_allclose(np.asarray(s.h_out - s.h_in), rebuilt, atol=2e-5)
      want = u
    elif mixer == "cosine":
      want = np.asarray(causal_cosine_mix(jnp.asarray(u, jnp.float32), t_max=cfg.max_seq_len))
      if stage == "koopman_attn":
        rebuilt = want @ ops.K[l].T + ops.b[l] + ops.alpha[l] * np.asarray(s.x_tgt)
        np.testing.assert_allclose(np.asarray(s.h_out - s.h_in), rebuilt, atol=2e-5)
    else:
      want, s_prev = np.zeros_like(u), np.zeros_like(u[:, 0])
      for t in range(u.shape[1]):
        want[:, t] = s_prev
        s_prev = s_prev @ ops.K[l].T + u[:, t]  # ops.K is the clamped K_c
    np.testing.assert_allclose(np.asarray(s.k_in), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
  z = forward.final_states(params, coll, cfg, steps[-1].h_out, 0.0)
  ref = jax.jit(lambda x: build_model(cfg).apply({"params": params, **coll}, x, beta=0.0))(
      jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(z @ jnp.asarray(params["embed"]["embedding"]).T),
                             np.asarray(ref), atol=2e-5)


@pytest.mark.slow
def test_stage4_is_all_neutral_in_float64(stage4, tmp_path):
  res = analyze_workdir(stage4, out=tmp_path, max_sequences=2, sse_paths=4, sse_steps=20,
                        sentence_tokens=8, commutator=True, log=None)
  # Stage IV: D = 0 up to rounding, so H and D commute (not the noise of two tiny norms)
  for rec in res["spectrum"]["layers"]:
    gen = rec["generator"]
    assert gen["logm_real"] and gen["norm_D"] < 1e-10 * gen["norm_H"]
    assert gen["commutator"] == 0.0
  assert res["spectrum"]["commutator_max"] == 0.0
  assert res["spectrum"]["commutator_layers"] == 2
  text = (tmp_path / "report.md").read_text()
  assert "### Generator split A = logm(K) / dt = -iH + D" in text
  assert "| 1 | yes |" in text and "layer(s) with a real logarithm: max 0," in text
  uc = res["spectrum"]["unit_circle"]
  assert uc["tol"] == 1e-6 and uc["all_on_unit_circle"]
  assert uc["neutral"] == uc["n_eigenvalues"] == 64
  assert uc["max_abs_log_abs"] < 1e-12  # float64 round-off, not float32's ~1e-7
  for counts in res["spectrum"]["counts_by_tol"].values():
    assert counts["neutral"] == 64
  assert res["spectrum"]["verdict"].startswith("balanced")
  assert "unit-circle check" in (tmp_path / "report.md").read_text()
  assert _png_ok(tmp_path / "spectrum.png")
  # A failure part-way (here the data) leaves the folder as the last analysis made it.
  for p in tmp_path.iterdir():
    p.write_bytes(b"earlier " + p.name.encode())
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  from qsf_jax.data import DataNotFoundError
  with pytest.raises(DataNotFoundError, match="nonexistent.txt does not exist"):
    analyze_workdir(stage4, out=tmp_path, data=str(tmp_path.parent / "nonexistent.txt"),
                    max_sequences=2, log=None)
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
  assert not list(tmp_path.parent.glob(f".{tmp_path.name}.partial-*"))
  # ... and a new --out under missing folders leaves none of them behind
  with pytest.raises(DataNotFoundError):
    analyze_workdir(stage4, out=tmp_path / "a" / "b" / "out", max_sequences=2, log=None,
                    data=str(tmp_path.parent / "nonexistent.txt"))
  assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_stage2_has_no_measurement(env, tmp_path):
  wd = _train(env, "koopman", 2)
  for name in ("alpha.png", "sse.png"):  # an earlier analysis's figures this one lacks
    (tmp_path / name).write_bytes(b"stale")
  res = analyze_workdir(wd, out=tmp_path, max_sequences=2, log=None)
  assert res["alpha"] is None and "propagation" not in res
  assert not (tmp_path / "alpha.png").exists() and not (tmp_path / "sse.png").exists()
  assert any("Stage II" in n for n in res["notes"])
  assert sum(res["spectrum"]["counts"].values()) == 64
  assert (tmp_path / "report.md").exists() and _png_ok(tmp_path / "spectrum.png")


def _error_line(capsys):
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("analyze: error:")]
  assert len(err) == 1
  return err[0]


def test_non_koopman_stage_is_a_clear_error(env, tmp_path, capsys):
  wd = _train(env, "fnet", 2)
  assert analyze_cli.run(["analyze", f"--workdir={wd}", f"--out={tmp_path}"]) == 1
  line = _error_line(capsys)
  assert "stage 'fnet' has no Koopman operator" in line and "koopman_attn" in line
  assert not (tmp_path / "report.md").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  for wd in (empty, tmp_path / "does_not_exist"):
    assert analyze_cli.run(["analyze", f"--workdir={wd}"]) == 1
    assert "no checkpoint found in" in _error_line(capsys)
  assert analyze_cli.run(["analyze"]) == 1
  assert "--workdir is required" in _error_line(capsys)


def test_bad_flags_are_clear_errors(stage4, capsys):
  assert analyze_cli.run(["analyze", f"--workdir={stage4}", "--layer=7"]) == 1
  assert "--layer must be in [0, 2)" in _error_line(capsys)
  assert analyze_cli.run(["analyze", f"--workdir={stage4}", "--max_sequences=0"]) == 1
  assert "--max_sequences must be >= 1" in _error_line(capsys)
  assert analyze_cli.run(["analyze", f"--workdir={stage4}", "--sse_steps=-1"]) == 1
  assert "--sse_steps must be >= 0 (0: automatic)" in _error_line(capsys)
  afile = stage4.parent / "stage4_report.md"
  afile.write_text("x")
  assert analyze_cli.run(["analyze", f"--workdir={stage4}", f"--out={afile}"]) == 1
  assert f"--out={afile} is a file, not a folder" in _error_line(capsys)
  assert afile.read_text() == "x"
  afile.unlink()


def test_evaluate_at_another_anneal_weight(stage3):
  """evaluate_workdir(beta=...) overrides the checkpoint's anneal weight (QSF §3.4, D5)."""
  default = evaluate_workdir(stage3, max_batches=1)
  assert default["beta"] == pytest.approx(1.0, abs=1e-6)  # a finished Stage III: linear
  with_ln = evaluate_workdir(stage3, max_batches=1, beta=0.0)
  assert with_ln["beta"] == 0.0 and with_ln["tokens"] == default["tokens"]
  run = load_run(stage3)
  corpus = setup.load_corpus(run.cfg, run.tokenizer)
  direct = evaluate_split(run.model, run.params, run.collections, corpus.valid,
                          batch_size=run.cfg.batch_size, seq_len=run.seq_len, max_batches=1,
                          beta=0.0)
  assert with_ln["val_loss"] == pytest.approx(direct["val_loss"], rel=1e-6)
  assert with_ln["val_loss"] != pytest.approx(default["val_loss"], rel=1e-6)
  for bad in (-0.1, 1.5, float("nan"), "1", True):
    with pytest.raises(ValueError, match="beta must be a number in"):
      evaluate_workdir(stage3, max_batches=1, beta=bad)
  with pytest.raises(ValueError, match="per_token must be a bool.*'yes'"):
    evaluate_workdir(stage3, max_batches=1, per_token="yes")
  # A batch larger than the split is cut to the split's rows (the rest would be
  # all-masked padding: same figures, but 10**6 rows ran out of memory).
  from qsf_jax import data as qdata
  from qsf_jax.training.evaluation import open_evaluation
  ev = open_evaluation(stage3, batch_size=10**6)
  rows = qdata.num_eval_batches(ev.corpus.valid, batch_size=1, seq_len=ev.run.seq_len,
                                mode=ev.cfg.data_mode)
  assert ev.batch_size == rows < 10**6
  big = evaluate_workdir(stage3, batch_size=10**6)
  assert big["batches"] == 1
  assert big["val_loss"] == pytest.approx(evaluate_workdir(stage3)["val_loss"], rel=1e-5)
  # Fractional counts failed deep in itertools, or were rounded in the message.
  for kw, match in ((dict(max_batches=1.5), "max_batches must be an int >= 1"),
                    (dict(max_batches=1, batch_size=2.5), "batch_size must be an int >= 1")):
    with pytest.raises(ValueError, match=match):
      evaluate_workdir(stage3, **kw)


def test_bad_seed_is_refused_before_the_restore(tmp_path, capsys):
  """jax.random.key wraps 2^32 to seed 0's noise and takes -1: refused, as train and sample do."""
  missing = tmp_path / "does_not_exist"  # the seed is checked before the checkpoint is looked for
  for seed, message in ((-1, "seed must be >= 0, got -1"),
                        (1 << 32, "seed must be < 2^32 = 4294967296 (the SSE noise key holds "
                                  "32 bits), got 4294967296")):
    assert analyze_cli.run(["analyze", f"--workdir={missing}", f"--seed={seed}"]) == 1
    assert message in _error_line(capsys)
  for bad in (-1, 1.0, True):
    with pytest.raises(ValueError, match="seed must be"):
      analyze_workdir(missing, seed=bad)


@pytest.mark.parametrize("err", ["ENOSPC", "EFBIG"])
def test_a_full_disk_during_the_analysis_names_its_folder(tmp_path, err):
  # matplotlib's or json's write failing on a full disk gave a bare
  # "[Errno 28] No space left on device", naming neither the output nor its fate.
  import errno  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  from qsf_jax.analysis.pipeline import _staged_output  # pylint: disable=import-outside-toplevel
  out = tmp_path / "analysis"
  out.mkdir()
  (out / "report.md").write_text("earlier")
  code = getattr(errno, err)
  with pytest.raises(OSError, match=f"cannot write the analysis in {tmp_path} .*{out} was "
                     "left as it was"):
    with _staged_output(out) as work:
      (work / "report.md").write_text("new")
      raise OSError(code, os.strerror(code))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]
  assert (out / "report.md").read_text() == "earlier"
