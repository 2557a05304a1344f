"""The training loop in-process: learning, accumulation, NaN stop, refusal, hand-off."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_compiled
from qsf_jax import data as qdata
from story_corpus import story_corpus
from qsf_jax.models.config import get_config
from qsf_jax.models.lm import build_model
from qsf_jax.training import checkpoint as ck
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.errors import CheckpointMismatchError, NonFiniteLossError, TrainConfigError
from qsf_jax.training.loop import train_and_evaluate
from qsf_jax.training.optim import make_optimizer, onecycle_schedule
from qsf_jax.training.progressive import flatten_named, init_from_checkpoint
from qsf_jax.training.restore import load_run
from qsf_jax.training.state import create_train_state
from qsf_jax.training.step import make_train_step


pytestmark = pytest.mark.usefixtures("fast_compiles")

@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A small .txt corpus (synthetic stories) and a private token cache."""
  root = tmp_path_factory.mktemp("loop")
  with story_corpus(root, 240, seed=3) as corpus:
    yield root, corpus


def _cfg(corpus, **kw):
  base = dict(stage="koopman", preset="tiny", data=str(corpus), tokenizer="bytes", steps=30,
              batch_size=8, checkpoint_every=15, eval_every=15, eval_batches=2, log_every=1,
              sample_tokens=0)
  base.update(kw)
  return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(env):
  """One 30-step Stage-II run shared by several tests (read-only for them)."""
  root, corpus = env
  wd = root / "koopman"
  result = train_and_evaluate(_cfg(corpus), wd)
  return wd, result


def _jsonl(wd):
  return [json.loads(x) for x in (pathlib.Path(wd) / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_records(trained):
  wd, result = trained
  assert result.step == 30 and not result.interrupted
  recs = _jsonl(wd)
  train = [r for r in recs if r["kind"] == "train"]
  evals = [r for r in recs if r["kind"] == "eval"]
  assert [r["step"] for r in train] == list(range(1, 31))
  first, last = np.mean([r["loss"] for r in train[:3]]), np.mean([r["loss"] for r in train[-3:]])
  assert first > np.log(257) - 0.3  # starts near uniform over the byte vocabulary
  assert last < first - 0.5, (first, last)
  assert [e["step"] for e in evals] == [15, 30]
  assert evals[1]["val_loss"] < evals[0]["val_loss"]
  assert evals[1]["perplexity"] == pytest.approx(np.exp(evals[1]["val_loss"]), rel=1e-6)
  assert result.eval["val_loss"] == pytest.approx(evals[1]["val_loss"])
  # lr follows OneCycle; metadata records the run
  sched = onecycle_schedule(30, 1e-3)
  assert train[0]["lr"] == pytest.approx(float(sched(0)), rel=1e-6)
  c = ck.Checkpointer(wd, read_only=True)
  assert c.all_steps() == [15, 30]
  meta = c.meta()
  c.close()
  assert meta["stage"] == "koopman" and meta["seed"] == 0 and meta["steps"] == 30
  assert meta["tokenizer"] == {"name": "bytes", "sha256": qdata.BYTES_SHA256}
  assert meta["model_config"]["d_model"] == 32 and meta["train_config"]["batch_size"] == 8
  assert meta["data"]["source"].startswith("path:") and meta["data_source"]["cache_key"]
  (event_file,) = (pathlib.Path(wd) / "tb").iterdir()
  from qsf_jax.training.tensorboard import read_scalars
  scalars = read_scalars(event_file)
  assert (30, "eval/val_loss", pytest.approx(evals[1]["val_loss"], rel=1e-6)) in scalars


@pytest.fixture(scope="module")
def stage3_hold(env):
  """A 4-step Stage-III run whose anneal ramp ends early (anneal_hold_frac), shared by
  the Stage-III tests (read-only for them)."""
  root, corpus = env
  wd = root / "hold"
  overrides = {"anneal_frac": 0.25, "anneal_hold_frac": 0.5}
  train_and_evaluate(_cfg(corpus, stage="koopman_attn", steps=4, checkpoint_every=0,
                          eval_every=0, model_overrides=overrides), wd)
  return wd


def test_stage_three_logs_alpha_per_layer(stage3_hold, trained):
  """QSF Fig. 1: the learned alpha of every layer is in metrics.jsonl as alpha/<l>."""
  wd = stage3_hold
  train = [r for r in _jsonl(wd) if r["kind"] == "train"]
  c = ck.Checkpointer(wd, read_only=True)
  params, _ = c.restore_params()
  alpha = np.ravel(params["layers"]["alpha"])
  c.close()
  assert len(alpha) == 2 and all(f"alpha/{l}" in train[0] for l in range(2))
  np.testing.assert_allclose([train[-1][f"alpha/{l}"] for l in range(2)], alpha, rtol=1e-6)
  assert "alpha/0" not in _jsonl(trained[0])[0]  # Stage II has no measurement


def test_anneal_hold_trains_at_beta_one(stage3_hold):
  """anneal_hold_frac: the ramp ends early and the last updates run at beta = 1,
  as does the evaluation of the finished run."""
  wd = stage3_hold
  recs = _jsonl(wd)
  # S = 4: ramp over [1, 2] (one step), then beta = 1 for steps 2 and 3
  assert [r["beta"] for r in recs if r["kind"] == "train"] == [0.0, 0.0, 1.0, 1.0]
  assert load_run(wd).beta == 1.0


def _tree_snapshot(wd):
  return sorted((str(p.relative_to(wd)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in pathlib.Path(wd).rglob("*"))


def test_other_stage_in_same_workdir_is_refused_untouched(trained, env):
  wd, _ = trained
  _, corpus = env
  before = _tree_snapshot(wd)
  with pytest.raises(CheckpointMismatchError, match="stage: stored 'koopman', requested 'fnet'"):
    train_and_evaluate(_cfg(corpus, stage="fnet"), wd)
  with pytest.raises(CheckpointMismatchError, match="model_config.d_model"):
    train_and_evaluate(_cfg(corpus, model_overrides=(("d_model", 16),)), wd)
  with pytest.raises(CheckpointMismatchError, match="steps") as e:
    train_and_evaluate(_cfg(corpus, steps=40), wd)
  # a finished run cannot be extended in place (its OneCycle schedule has its length)
  assert str(e.value).endswith(f"use a new --workdir with --init_from={wd}")
  with pytest.raises(CheckpointMismatchError) as e:
    train_and_evaluate(_cfg(corpus, stage="fnet"), wd)
  assert "--init_from" not in str(e.value)
  assert _tree_snapshot(wd) == before


def test_completed_run_resumes_as_a_no_op(trained, env):
  wd, _ = trained
  _, corpus = env
  before = len(_jsonl(wd))
  result = train_and_evaluate(_cfg(corpus, eval_every=0), wd)
  assert result.step == 30 and result.resumed_from == 30
  assert len(_jsonl(wd)) == before


def test_resume_drops_the_repeated_records_and_redoes_a_lost_evaluation(trained, env,
                                                                        tmp_path):
  """A run killed after checkpoint 15 had logged steps past it (and a torn line): the
  resume drops those records before it logs the steps again, and TensorBoard gets a
  restart mark at step 16. A run killed during its final evaluation (checkpoint 30
  saved, no eval record) evaluates on resume, with the same result."""
  import shutil  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.tensorboard import session_starts  # pylint: disable=import-outside-toplevel
  wd, _ = trained
  _, corpus = env
  orig = _jsonl(wd)
  killed = tmp_path / "killed"
  shutil.copytree(wd, killed)
  shutil.rmtree(killed / "tb")
  shutil.rmtree(ck.checkpoint_dir(killed) / "30")
  with open(killed / "metrics.jsonl", "a") as f:
    f.write('{"step": 31, "kind": "tr')  # a write cut off by the kill
  result = train_and_evaluate(_cfg(corpus), killed)
  assert result.resumed_from == 15 and result.step == 30
  recs = _jsonl(killed)
  assert [(r["step"], r["kind"]) for r in recs] == [(r["step"], r["kind"]) for r in orig]
  (event_file,) = (killed / "tb").iterdir()
  assert session_starts(event_file) == [16]

  lost = tmp_path / "lost_eval"
  shutil.copytree(wd, lost)
  (lost / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in orig if (r["step"], r["kind"]) != (30, "eval")))
  result = train_and_evaluate(_cfg(corpus), lost)
  assert result.resumed_from == 30 and result.step == 30
  (redone,) = [r for r in _jsonl(lost) if (r["step"], r["kind"]) == (30, "eval")]
  (first,) = [r for r in orig if (r["step"], r["kind"]) == (30, "eval")]
  assert redone["val_loss"] == first["val_loss"] and result.eval == pytest.approx(
      {k: v for k, v in first.items() if k not in ("step", "kind", "time")})


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(env):
  root, corpus = env
  wd = root / "nan"
  # lr 1e30: update 0 is finite but drives the weights to ~1e28, so loss 1 overflows;
  # the message counts updates from 1, as the progress lines ("step 2/10") do
  with pytest.raises(NonFiniteLossError, match="training loss .* at step 2;") as info:
    train_and_evaluate(_cfg(corpus, lr=1e30, steps=10, checkpoint_every=1, eval_every=0), wd)
  assert info.value.step == 1 and info.value.last_checkpoint == 1
  c = ck.Checkpointer(wd, read_only=True)
  assert c.all_steps() == [1]
  params, _ = c.restore_params()
  c.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  # The same command resumes from step 1 and diverges again: the error names the
  # checkpoint it resumed from, not "no checkpoint had been written yet".
  with pytest.raises(NonFiniteLossError, match=r"checkpoint \(step 1\) is kept") as info:
    train_and_evaluate(_cfg(corpus, lr=1e30, steps=10, checkpoint_every=1, eval_every=0), wd)
  assert info.value.step == 1 and info.value.last_checkpoint == 1


def test_bad_settings_raise_before_touching_workdir(env, tmp_path):
  _, corpus = env
  wd = tmp_path / "never"
  with pytest.raises(TrainConfigError, match="exceeds"):
    train_and_evaluate(_cfg(corpus, seq_len=33), wd)
  with pytest.raises(TrainConfigError, match="divisible"):
    train_and_evaluate(_cfg(corpus, batch_size=6, grad_accum=4), wd)
  with pytest.raises(TrainConfigError, match="unknown stage 'stage9'.*koopman_attn"):
    train_and_evaluate(_cfg(corpus, stage="stage9"), wd)
  with pytest.raises(TrainConfigError, match="unknown preset 'huge'.*tiny"):
    train_and_evaluate(_cfg(corpus, preset="huge"), wd)
  with pytest.raises(qdata.DataNotFoundError):
    train_and_evaluate(_cfg(corpus, data=str(tmp_path / "missing.txt")), wd)
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n<|endoftext|>\n ")
  with pytest.raises(qdata.EmptyDataError):
    train_and_evaluate(_cfg(corpus, data=str(empty)), wd)
  assert not wd.exists()
  for bad in (dict(steps=1), dict(batch_size=0), dict(lr=0.0), dict(dtype="float16"),
              dict(batch_size=6, grad_accum=4)):
    with pytest.raises(TrainConfigError):
      TrainConfig(stage="koopman", **bad)
  # The D14 sample settings fail at construction, not at the first evaluation.
  for bad, msg in ((dict(sample_temperature=float("inf")), "sample_temperature must be finite"),
                   (dict(sample_temperature=-1.0), "sample_temperature must be finite"),
                   (dict(sample_top_k=0), "sample_top_k must be an integer >= 1"),
                   (dict(sample_top_k=2.5), "sample_top_k must be an integer >= 1")):
    with pytest.raises(TrainConfigError, match=msg):
      TrainConfig(stage="koopman", **bad)
  # Values that used to pass here and fail later: deep in jax, at the first batch
  # (leaving a run folder behind), or after the whole run at the final evaluation.
  for bad, msg in ((dict(seed=1.5), "--seed must be a non-negative integer, got 1.5"),
                   (dict(seed=-1), "--seed must be a non-negative integer"),
                   (dict(seq_len=2.5), "--seq_len must be a positive integer"),
                   (dict(eval_batches=1.5), "--eval_batches must be a positive integer"),
                   (dict(max_train_stories=True), "--max_train_stories must be a positive"),
                   (dict(checkpoint_every=True), "--checkpoint_every must be a non-negative"),
                   (dict(steps="10"), "--steps must be a positive integer"),
                   (dict(lr=float("inf")), "--lr must be a finite number > 0, got inf"),
                   (dict(weight_decay=float("nan")), "--weight_decay must be a finite number"),
                   (dict(clip_norm=0.0), "--clip_norm must be a finite number > 0"),
                   (dict(sample_prompt=5), "--sample_prompt must be a string, got 5"),
                   (dict(data=None), "--data must be a string"),
                   (dict(init_from=3), "--init_from must be a string or None"),
                   (dict(preset="huge"), r"unknown preset 'huge'; choose one of \['paper'"),
                   (dict(model_overrides="abc"), "model_overrides must be a mapping")):
    with pytest.raises(TrainConfigError, match=msg):
      TrainConfig(stage="koopman", **bad)


@pytest.fixture(scope="module")
def full_batch_step(env):
  """One float32 Stage-II step on a whole batch of 8 padded rows (shared, read-only).

  Returns the batch, the initial variables, the optimizer and the step's (state,
  metrics); the accumulation and bfloat16 tests compare their steps with it.
  """
  _, corpus = env
  tok = qdata.get_tokenizer("bytes")
  c = qdata.load_corpus(str(corpus), tok)
  batch = qdata.get_batch(c.train, seed=0, step=0, batch_size=8, seq_len=32)
  # rows with different token counts (as short, padded stories have), unevenly
  # split between the two micro-batches of the accumulation test
  batch["mask"] = (np.arange(32)[None, :] < np.array([32, 30, 31, 29, 5, 9, 3, 12])[:, None]
                   ).astype(np.float32)
  model = build_model(get_config("koopman", "tiny"))
  params, coll = init_compiled(model, 0, 32)
  tx = make_optimizer(10)
  # fresh copies: the step donates (deletes) its input state
  st = create_train_state(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, coll), tx, 0)
  st, m = make_train_step(model, tx, schedule=onecycle_schedule(10), total_steps=10)(st, batch)
  return batch, (params, coll), tx, (st, m)


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch(full_batch_step):
  """A = 2 micro-batches give the update of the whole batch (summed-token loss)."""
  batch, (params, coll), tx, (s1, m1) = full_batch_step
  model = build_model(get_config("koopman", "tiny"))
  A = 2
  st = create_train_state(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, coll), tx, 0)
  b = {k: v.reshape((A, 8 // A) + v.shape[1:]) for k, v in batch.items()}
  s2, m2 = make_train_step(model, tx, grad_accum=A, schedule=onecycle_schedule(10),
                           total_steps=10)(st, b)
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
  assert float(m1["tokens"]) == float(m2["tokens"]) == batch["mask"].sum()
  # the gradient itself (Adam's first step is about lr * sign(g) and clipping
  # normalises it, so the parameters alone would hide a scale error)
  assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(s1.step) == int(s2.step) == 1


def _stats_batch_and_model(env):
  """A 4 x 32 byte batch whose rows have 32, 7, 20 and 3 loss positions, and a
  freshly initialised tiny Stage III model (params, collections)."""
  _, corpus = env
  c = qdata.load_corpus(str(corpus), qdata.get_tokenizer("bytes"))
  batch = qdata.get_batch(c.train, seed=0, step=0, batch_size=4, seq_len=32)
  batch["mask"] = (np.arange(32)[None, :] < np.array([32, 7, 20, 3])[:, None]).astype(np.float32)
  model = build_model(get_config("koopman_attn", "tiny"))
  params, coll = init_compiled(model, 0, 32)
  return batch, model, params, coll


def test_train_step_collects_norm_stats_over_the_loss_mask(env):
  """D5: the step's EMA update averages over the batch's loss mask, not the padding."""
  batch, model, params, coll = _stats_batch_and_model(env)
  # the references compiled whole (eager flax compiles every primitive on its own)
  _, want = jax.jit(lambda x, mask: model.apply(
      {"params": params, **coll}, x, update_stats=True, stats_mask=mask,
      mutable=["norm_stats"]))(jnp.asarray(batch["inputs"]), batch["mask"])
  _, unmasked = jax.jit(lambda x: model.apply(
      {"params": params, **coll}, x, update_stats=True, mutable=["norm_stats"]))(
          jnp.asarray(batch["inputs"]))
  tx = make_optimizer(10)
  st = create_train_state(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, coll), tx, 0)
  st, _ = make_train_step(model, tx, schedule=onecycle_schedule(10), total_steps=10,
                          stats_steps=100)(st, batch)
  got, ref, other = (jax.tree.leaves(t["norm_stats"]) for t in (st.collections, want, unmasked))
  for g, r, o in zip(got, ref, other):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6)
  assert any(not np.allclose(np.asarray(r), np.asarray(o), rtol=1e-3) for r, o in zip(ref, other))


def test_grad_accumulation_updates_norm_stats_as_the_whole_batch(env):
  """D5 with A = 2: one EMA step over the whole batch's loss mask, as without
  accumulation (the micro-batches hold 39 and 23 loss positions). Before, the EMA
  advanced once per micro-batch, and runs with and without accumulation parted."""
  batch, model, params, coll = _stats_batch_and_model(env)
  micro = {k: v.reshape((2, 2) + v.shape[1:]) for k, v in batch.items()}
  tx = make_optimizer(10)
  states = []
  for A, b in ((1, batch), (2, micro)):
    st = create_train_state(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, coll), tx, 0)
    st, m = make_train_step(model, tx, grad_accum=A, schedule=onecycle_schedule(10),
                            total_steps=10, stats_steps=100)(st, b)
    states.append((st, m))
  (s1, m1), (s2, m2) = states
  assert float(s2.collections["norm_stats"]["final_norm"]["count"]) == 1.0
  for g, r in zip(jax.tree.leaves(s2.collections), jax.tree.leaves(s1.collections)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6)
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_stats_window_matches_the_model_zoo():
  """D5: the jitted window test agrees with ``models.norms.stats_window``."""
  from qsf_jax.models.norms import stats_window
  from qsf_jax.training.step import in_stats_window
  for S, f, n, h in ((8, 0.15, 500, 0.0), (20000, 0.15, 500, 0.0), (1000, 0.3, 50, 0.0),
                     (7, 0.15, 2, 0.0), (1000, 0.15, 50, 0.15), (9, 0.3, 2, 0.2)):
    got = np.asarray(in_stats_window(jnp.arange(S), S, f, n, h)).tolist()
    want = [stats_window(t, S, anneal_frac=f, stats_steps=n, hold_frac=h) for t in range(S)]
    assert got == want, (S, f, n, h)


def test_init_from_maps_shared_parameters(trained):
  """D12: Stage III from Stage II copies E, P, norm1, K, b; attention and alpha are new."""
  wd, _ = trained
  target_model = build_model(get_config("koopman_attn", "tiny"))
  fresh, _ = init_compiled(target_model, 1, 32)
  logs = []
  params, report = init_from_checkpoint(fresh, str(wd), stage="koopman_attn", log=logs.append)
  c = ck.Checkpointer(wd, read_only=True)
  source, _ = c.restore_params()
  c.close()
  src, new, old = flatten_named(source), flatten_named(params), flatten_named(fresh)
  assert report.src_stage == "koopman" and report.src_step == 30
  for p in ("embed/embedding", "pos_embed/embedding", "layers/koopman/K", "layers/koopman/b"):
    assert p in report.copied, p
    np.testing.assert_array_equal(new[p], src[p])
    assert not np.array_equal(new[p], old[p])
  assert any(p.startswith("layers/attn") for p in report.new) and "layers/alpha" in report.new
  assert any(p.startswith("layers/ffn") for p in report.dropped)
  for p in report.new:  # new leaves keep their fresh values
    np.testing.assert_array_equal(new[p], old[p])
  assert set(new) == set(old) and all(new[p].dtype == old[p].dtype for p in new)
  assert not any(l.startswith("warning") for l in logs)  # a finished Stage II


def test_init_from_an_unfinished_run_warns(trained, monkeypatch):
  """A source run that stopped before its --steps (interrupted) is named in a warning."""
  from qsf_jax.training import progressive
  wd, _ = trained
  load = progressive.load_source_params

  def unfinished(path):
    source, meta = load(path)
    return source, dict(meta, train_config=dict(meta["train_config"], steps=100))

  monkeypatch.setattr(progressive, "load_source_params", unfinished)
  fresh, _ = init_compiled(build_model(get_config("koopman_attn", "tiny")), 1, 32)
  logs = []
  init_from_checkpoint(fresh, str(wd), stage="koopman_attn", log=logs.append)
  assert logs[-1].startswith("warning: the koopman run in ") and "step 30 of its 100" in logs[-1]
  assert any("copied" in line and "new" in line and "dropped" in line for line in logs)
  # Not a D12 hand-off: refused with the supported pairs listed
  with pytest.raises(TrainConfigError, match="koopman -> koopman_attn"):
    init_from_checkpoint(fresh, str(wd), stage="transformer")


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_loss(full_batch_step):
  """--dtype=bfloat16: matmuls in bf16, parameters, loss and updates in float32."""
  # the float32 step is the fixture's, on the same batch and from the same seed
  batch, _, tx, (_, m32) = full_batch_step
  model = build_model(get_config("koopman", "tiny", dtype="bfloat16"))
  params, coll = init_compiled(model, 0, 32)
  st = create_train_state(params, coll, tx, 0)
  s16, m16 = make_train_step(model, tx, schedule=onecycle_schedule(10), total_steps=10)(st, batch)
  assert m16["loss"].dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
  assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
  assert float(m16["loss"]) != float(m32["loss"])  # the bf16 path was really taken


def test_loss_and_step_reject_bad_shapes():
  from qsf_jax.training.step import check_batch, masked_xent_sum
  logits = jnp.zeros((2, 3, 5))
  t = jnp.zeros((2, 3), jnp.int32)
  m = jnp.ones((2, 3))
  l_sum, n = masked_xent_sum(logits, t, m)
  assert float(n) == 6 and float(l_sum) == pytest.approx(6 * np.log(5), rel=1e-6)
  # random logits, targets and a partial mask against float64 numpy: padding never counts
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 7, 11)) * 3
  y = rng.integers(0, 11, (3, 7))
  mask = (rng.random((3, 7)) < 0.6).astype(np.float32)
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  want = ((lse - np.take_along_axis(z, y[..., None], -1)[..., 0]) * mask).sum()
  l_sum, n = masked_xent_sum(jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(mask))
  assert float(n) == mask.sum() and float(l_sum) == pytest.approx(want, rel=1e-5)
  z2 = np.where(mask[..., None] > 0, z, 1e3 * rng.normal(size=z.shape))  # junk at padding
  assert float(masked_xent_sum(jnp.asarray(z2, jnp.float32), jnp.asarray(y),
                               jnp.asarray(mask))[0]) == pytest.approx(float(l_sum), rel=1e-6)
  with pytest.raises(ValueError, match=r"mask_BT must have shape \(2, 3\), got \(2, 4\)"):
    masked_xent_sum(logits, t, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="targets_BT must be integer"):
    masked_xent_sum(logits, t.astype(jnp.float32), m)
  with pytest.raises(ValueError, match="logits_BTV must be real"):
    masked_xent_sum(logits.astype(jnp.complex64), t, m)
  with pytest.raises(ValueError, match="logits_BTV must have 3"):
    masked_xent_sum(jnp.zeros((2, 3)), t, m)
  good = {"inputs": t, "targets": t, "mask": m}
  check_batch(good)
  with pytest.raises(ValueError, match="keys"):
    check_batch({"inputs": t, "targets": t})
  with pytest.raises(ValueError, match=r"batch\['mask'\] has shape \(2, 2\)"):
    check_batch(dict(good, mask=jnp.ones((2, 2))))
  with pytest.raises(ValueError, match="micro-batch axis of 2"):
    check_batch({k: v[None] for k, v in good.items()}, grad_accum=2)
  with pytest.raises(ValueError, match=r"batch\['inputs'\] must have 3"):
    check_batch(good, grad_accum=2)
  with pytest.raises(ValueError, match="integer token ids"):
    check_batch(dict(good, inputs=m))
  # Ids outside the vocabulary: optax scored -1 as class V-1 and V as NaN.
  for bad in (-1, 5):
    with pytest.raises(ValueError, match=r"targets_BT has ids in .*outside the vocabulary 0..4"):
      masked_xent_sum(logits, t.at[1, 2].set(bad), m)
  # A negative id where the mask is 0 is the usual ignore-index padding: allowed.
  pad = masked_xent_sum(logits, t.at[1, 2].set(-1), m.at[1, 2].set(0.0))
  assert float(pad[1]) == 5 and float(pad[0]) == pytest.approx(5 * np.log(5), rel=1e-6)
  with pytest.raises(ValueError, match="outside the vocabulary"):  # NaN * 0 is still NaN
    masked_xent_sum(logits, t.at[1, 2].set(5), m.at[1, 2].set(0.0))


def test_eval_step_checks_its_batch_ids_and_beta():
  from qsf_jax.models.config import get_config
  from qsf_jax.models.lm import build_model
  from qsf_jax.training.step import eval_step
  model = build_model(get_config("fnet", "tiny"))
  params, coll = init_compiled(model, 0, 8)
  ids = jnp.ones((2, 8), jnp.int32)
  good = {"inputs": ids, "targets": ids, "mask": jnp.ones((2, 8))}
  l_sum, n = eval_step(model, params, coll, good, 0.0)
  assert float(n) == 16 and np.isfinite(float(l_sum))
  with pytest.raises(ValueError, match="batch must be a dict with keys"):
    eval_step(model, params, coll, {"inputs": ids, "targets": ids}, 0.0)
  with pytest.raises(ValueError, match=r"batch\['inputs'\] has ids in \[1, 300\]"):
    eval_step(model, params, coll, dict(good, inputs=ids.at[0, 0].set(300)), 0.0)
  with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
    eval_step(model, params, coll, good, float("nan"))


def test_run_length_defaults_follow_the_preset():
  from qsf_jax.training.config import PRESET_RUN_DEFAULTS
  small = TrainConfig(stage="koopman_attn")
  assert (small.steps, small.batch_size) == (500, 16)
  paper = TrainConfig(stage="koopman_attn", preset="paper", batch_size=4)
  assert (paper.steps, paper.batch_size, paper.eval_every) == (20000, 4, 1000)
  assert set(PRESET_RUN_DEFAULTS) == {"tiny", "small", "paper"}


def test_train_config_defaults_follow_the_spec():
  """QSF spec §4.1 and D10 (max LR 1e-3, OneCycle with PyTorch's defaults, which cycle
  the momentum; batch 32 at the paper preset), D11 (weight decay 0.1), §4.1 (clip 1.0)
  and D14 (the sample settings); the command-line flags take these defaults."""
  d = TrainConfig(stage="koopman_attn")
  assert (d.lr, d.weight_decay, d.clip_norm, d.cycle_momentum) == (1e-3, 0.1, 1.0, True)
  assert (d.sample_prompt, d.sample_temperature, d.sample_top_k, d.sample_tokens) == (
      "Once upon a time,", 0.8, 50, 40)
  paper = TrainConfig(stage="koopman_attn", preset="paper")
  assert (paper.steps, paper.batch_size) == (20000, 32)


def test_load_run_of_an_earlier_step(trained):
  """``load_run(step=...)`` restores that checkpoint's parameters, not the latest."""
  wd, _ = trained
  run15, run30 = load_run(wd, step=15), load_run(wd)
  assert (run15.step, run30.step) == (15, 30) and run15.meta["step"] == 15
  c = ck.Checkpointer(wd, read_only=True)
  params15, _ = c.restore_params(15)
  c.close()
  for x, y in zip(jax.tree.leaves(run15.params), jax.tree.leaves(params15)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(run15.params), jax.tree.leaves(run30.params)))


def test_max_to_keep_reaches_the_checkpointer(env):
  root, corpus = env
  wd = root / "keep"
  train_and_evaluate(_cfg(corpus, steps=4, checkpoint_every=1, eval_every=0, max_to_keep=2),
                     wd)
  c = ck.Checkpointer(wd, read_only=True)
  assert c.all_steps() == [3, 4]
  c.close()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_parameters_are_never_saved(env):
  root, corpus = env
  wd = root / "inf"
  # lr 1e40 is inf in float32: update 0 (finite loss and gradient) leaves non-finite
  # weights, which the step-1 checkpoint must refuse to store
  with pytest.raises(NonFiniteLossError, match="parameters after the update .* at step 1;") as info:
    train_and_evaluate(_cfg(corpus, lr=1e40, steps=10, checkpoint_every=1, eval_every=0), wd)
  assert info.value.step == 0 and info.value.last_checkpoint is None
  assert not ck.has_checkpoint(wd)


@pytest.mark.parametrize("steps,frac,hold", [(8, 0.15, 0.0), (20, 0.15, 0.0), (4, 0.15, 0.0),
                                             (4, 0.25, 0.5), (100, 0.15, 0.15), (2, 0.5, 0.0)])
def test_anneal_span_names_the_steps_of_the_ramp(steps, frac, hold):
  """The log's anneal span agrees with anneal_beta: beta is 0 before its first step,
  below 1 before its last and 1 at its last; one step is named as one."""
  from qsf_jax.models.norms import anneal_beta
  from qsf_jax.training.loop import anneal_span
  span = anneal_span(steps, frac, hold)
  words = span.split()
  if words[0] == "at":
    first = last = int(words[2])
  else:
    first, last = int(words[2]), int(words[4])
    assert first < last
  beta = lambda t: float(anneal_beta(t, steps, anneal_frac=frac, hold_frac=hold))
  assert beta(first - 1) == 0.0 and beta(last - 1) < 1.0 and beta(last) == 1.0, span
  assert (first == last) == (span == f"at step {last}")


def test_story_mode_warns_when_it_would_waste_the_data():
  """A .txt file without separators is one story: story mode would train on its first
  T + 1 tokens only."""
  from qsf_jax.data.cache import TokenSplit  # pylint: disable=import-outside-toplevel
  from qsf_jax.training import setup  # pylint: disable=import-outside-toplevel
  book = TokenSplit(tokens=np.zeros(10_000, np.uint16), offsets=np.array([0, 10_000]),
                    eot_id=256)
  stories = TokenSplit(tokens=np.zeros(1000, np.uint16), offsets=np.arange(0, 1001, 20),
                       eot_id=256)
  assert setup.story_mode_coverage(book, 32) == pytest.approx(33 / 10_000)
  assert setup.story_mode_coverage(stories, 32) == 1.0
  said = []
  setup.warn_if_story_mode_wastes_data(_cfg("x"), book, 32, said.append)
  assert len(said) == 1 and "0.33% of the training tokens" in said[0]
  assert "--data_mode=packed" in said[0] and "without <|endoftext|> separators" in said[0]
  setup.warn_if_story_mode_wastes_data(_cfg("x", data_mode="packed"), book, 32, said.append)
  setup.warn_if_story_mode_wastes_data(_cfg("x"), stories, 32, said.append)
  assert len(said) == 1
  # stories a few rows long (TinyStories at the tiny preset's 33-token rows): the hint
  # about separators does not apply, the row length does
  long_rows = TokenSplit(tokens=np.zeros(2000, np.uint16), offsets=np.arange(0, 2001, 200),
                         eot_id=256)
  setup.warn_if_story_mode_wastes_data(_cfg("x"), long_rows, 32, said.append)
  assert len(said) == 2 and "mean 200 tokens" in said[1] and "--seq_len" in said[1]
  assert "separators" not in said[1]


def test_restored_arrays_must_fit_the_stored_model(trained):
  """A checkpoint whose arrays are another run's (a swapped state folder) failed inside
  model.apply after the data had loaded; load_run now names the first misfit."""
  from qsf_jax.training import restore  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.errors import CorruptCheckpointError  # pylint: disable=import-outside-toplevel
  wd, _ = trained
  run = load_run(wd)
  restore._check_variables_fit(run.model, run.params, run.collections, str(wd), run.step)
  narrow = build_model(get_config("koopman", "tiny", vocab_size=257, d_model=16))
  params16 = jax.eval_shape(narrow.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]
  with pytest.raises(CorruptCheckpointError, match=r"parameter .* is shaped \(.*16.*\), the "
                                                   r"model's is .*another run"):
    restore._check_variables_fit(run.model, params16, run.collections, str(wd), run.step)
  missing = dict(run.params)
  missing.pop(sorted(missing)[0])
  with pytest.raises(CorruptCheckpointError, match="is missing"):
    restore._check_variables_fit(run.model, missing, run.collections, str(wd), run.step)
