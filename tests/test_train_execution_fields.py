"""Execution-only model fields: resuming and loading a run with another attention impl.

``attn_impl``, ``attn_chunk_size`` and ``attn_pallas_design`` choose how the linear
attention is computed, not what it computes, so a run trained one way resumes,
evaluates and samples another way (e.g. trained on a GPU with "pallas", analysed on
a laptop).
"""

import json
import logging
import shutil

import pytest

from experiments import evaluate as evaluate_cli
from experiments import train as train_cli
from story_corpus import story_corpus
from qsf_jax.training import checkpoint as ck
from qsf_jax.training.config import TrainConfig
from qsf_jax.training.errors import TrainConfigError
from qsf_jax.training.loop import train_and_evaluate
from qsf_jax.training.restore import load_run


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("execution")
  with story_corpus(root, 150, seed=11) as corpus:
    yield root, corpus


def _train_args(corpus, wd, impl, **kw):
  f = dict(stage="gla", preset="tiny", data=corpus, tokenizer="bytes", workdir=wd, steps=6,
           batch_size=4, checkpoint_every=3, eval_every=6, eval_batches=2, log_every=1,
           sample_tokens=0, override=f"attn_impl={impl}")
  f.update(kw)
  return ["train"] + [f"--{k}={v}" for k, v in f.items()]


def _losses(wd):
  recs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def xla_run(env):
  """A finished 6-step gla run trained with attn_impl="xla"."""
  root, corpus = env
  wd = root / "xla"
  assert train_cli.run(_train_args(corpus, wd, "xla")) == 0
  return wd


def test_resume_with_another_impl_continues_the_run(xla_run, env, capsys):
  root, corpus = env
  wd = root / "resumed"
  shutil.copytree(xla_run, wd)
  shutil.rmtree(wd / "checkpoints" / "6")  # as if stopped after the step-3 checkpoint
  before = _losses(xla_run)
  (wd / "metrics.jsonl").write_text("")
  capsys.readouterr()
  assert train_cli.run(_train_args(corpus, wd, "scan")) == 0
  out = capsys.readouterr().out
  assert "resuming with attn_impl='scan' (the run used 'xla'" in out, out
  after = _losses(wd)
  assert sorted(after) == [4, 5, 6]
  # Step 4 runs from the step-3 checkpoint both times: the same parameters through
  # another impl of the same function (float32 rounding only).
  assert after[4] == pytest.approx(before[4], rel=1e-5)
  c = ck.Checkpointer(wd, read_only=True)
  try:
    meta = c.meta()
  finally:
    c.close()
  assert meta["step"] == 6 and meta["model_config"]["attn_impl"] == "scan"


def test_identity_keys_leave_out_execution_fields():
  base = {"stage": "gla", "model_config": {"attn_impl": "xla", "attn_pallas_design": "default",
                                           "attn_chunk_size": 64, "d_model": 32}, "seed": 0}
  other = {"stage": "gla", "model_config": {"attn_impl": "pallas", "attn_chunk_size": 128,
                                            "attn_pallas_design": "bv64_w8_s3", "d_model": 64},
           "seed": 0}
  assert ck.identity_differences(base, other) == {"model_config.d_model": (32, 64)}
  assert ck.execution_differences(base, other) == {
      "model_config.attn_impl": ("xla", "pallas"),
      "model_config.attn_chunk_size": (64, 128),
      "model_config.attn_pallas_design": ("default", "bv64_w8_s3")}


def _as_if_trained_with_pallas(src, dst):
  """A copy of ``src`` whose metadata says it was trained with attn_impl="pallas"."""
  shutil.copytree(src, dst)
  for meta_file in (dst / "checkpoints").glob("*/meta/metadata"):
    meta = json.loads(meta_file.read_text())
    meta["model_config"]["attn_impl"] = "pallas"
    meta["train_config"]["model_overrides"]["attn_impl"] = "pallas"
    meta_file.write_text(json.dumps(meta))
  return dst


def test_pallas_run_loads_with_auto_off_the_gpu(xla_run, env, capsys, caplog):
  root, _ = env
  wd = _as_if_trained_with_pallas(xla_run, root / "pallas")
  caplog.set_level(logging.INFO, logger="absl")
  run = load_run(wd)
  assert run.model_config.attn_impl == "auto"
  assert dict(run.cfg.model_overrides)["attn_impl"] == "pallas"
  seen = [r.getMessage() for r in caplog.records]
  assert any("trained with attn_impl='pallas'" in m and "'auto'" in m for m in seen), seen
  assert load_run(wd, attn_impl="scan").model_config.attn_impl == "scan"
  with pytest.raises(TrainConfigError, match="Pallas GPU kernels.*backend is 'cpu'"):
    load_run(wd, attn_impl="pallas")
  with pytest.raises(TrainConfigError, match="invalid attn_impl"):
    load_run(wd, attn_impl="cuda")
  # evaluate: the same numbers as the run it was copied from, through every impl
  assert evaluate_cli.run(["evaluate", f"--workdir={xla_run}", "--eval_batches=2"]) == 0
  want = _last_json(capsys)
  assert evaluate_cli.run(["evaluate", f"--workdir={wd}", "--eval_batches=2"]) == 0
  assert _last_json(capsys)["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
  assert evaluate_cli.run(["evaluate", f"--workdir={wd}", "--eval_batches=2",
                           "--attn_impl=scan"]) == 0
  assert _last_json(capsys)["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
  for flag, needle in (("--attn_impl=pallas", "Pallas GPU kernels"),
                       ("--attn_impl=cuda", "--attn_impl")):
    assert evaluate_cli.run(["evaluate", f"--workdir={wd}", flag]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_training_with_pallas_off_the_gpu_is_refused_untouched(env, tmp_path):
  _, corpus = env
  wd = tmp_path / "never"
  cfg = TrainConfig(stage="koopman_attn", preset="tiny", data=str(corpus), tokenizer="bytes",
                    steps=4, batch_size=4, model_overrides={"attn_impl": "pallas"})
  with pytest.raises(TrainConfigError, match="attn_impl='pallas'.*use attn_impl='auto'"):
    train_and_evaluate(cfg, wd)
  assert not wd.exists()
