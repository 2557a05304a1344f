"""The absl entry points: train / evaluate / sample, and one-line errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import analyze as analyze_cli
from experiments import context_use as context_cli
from experiments import evaluate as evaluate_cli
from experiments import sample as sample_cli
from experiments import train as train_cli
from qsf_jax import data as qdata
from qsf_jax.data.synthetic import synthetic_stories
from story_corpus import story_corpus
from qsf_jax.training import checkpoint as ck
from qsf_jax.training import setup
from qsf_jax.training.cli import parse_overrides, prepare_output_file
from qsf_jax.training.errors import DataChangedError
from qsf_jax.training.evaluation import evaluate_workdir
from qsf_jax.training.restore import load_run
from test_train_resume import REPO, compile_cache_dir, subprocess_env


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  with story_corpus(root, 150, seed=7) as corpus:
    yield root, corpus, compile_cache_dir(tmp_path_factory)


def _train_args(corpus, wd, **kw):
  f = dict(stage="koopman", preset="tiny", data=corpus, tokenizer="bytes", workdir=wd,
           steps=6, batch_size=4, checkpoint_every=3, eval_every=6, eval_batches=2,
           log_every=2, sample_tokens=6)
  f.update(kw)
  return ["train"] + [f"--{k}={v}" for k, v in f.items()]


@pytest.fixture(scope="module")
def run_dir(env):
  """A finished 6-step run made through the train entry point."""
  root, corpus, _ = env
  wd = root / "run"
  assert train_cli.run(_train_args(corpus, wd)) == 0
  return wd


def test_train_entry_point_writes_a_run(run_dir, capsys):
  assert ck.Checkpointer(run_dir, read_only=True).all_steps() == [3, 6]
  recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
  kinds = [r["kind"] for r in recs]
  assert kinds.count("eval") == 1 and kinds.count("sample") == 1
  sample = [r for r in recs if r["kind"] == "sample"][0]["text"]
  assert sample.startswith("Once upon a time,") and len(sample) > len("Once upon a time,")



def test_rerunning_a_finished_run_says_there_is_nothing_to_train(run_dir, env, tmp_path, capsys):
  _, corpus, _ = env
  wd = tmp_path / "copy"
  shutil.copytree(run_dir, wd)
  capsys.readouterr()
  assert train_cli.run(_train_args(corpus, wd)) == 0
  out = capsys.readouterr().out
  assert "resumed from step 6" in out
  assert "nothing to train: the run in" in out and "already reached its 6 steps" in out, out
  assert "training koopman/tiny" not in out
  assert ck.Checkpointer(wd, read_only=True).all_steps() == [3, 6]


def test_a_stored_config_that_cannot_be_rebuilt_names_the_fields(run_dir, tmp_path):
  wd = tmp_path / "edited"
  shutil.copytree(run_dir, wd)
  for meta_file in (wd / "checkpoints").glob("*/meta/metadata"):
    meta = json.loads(meta_file.read_text())
    meta["model_config"]["ffn_dim"] += 1
    meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"cannot be rebuilt .* \(ffn_dim: stored \d+, rebuilt "
                     r"\d+\)$"):
    load_run(wd)

def _expect_error(capsys, argv, *needles, main=train_cli.run):
  rc = main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1, err
  assert len(err) == 1 and "Traceback" not in err[0], err
  for n in needles:
    assert n in err[0], err[0]
  return err[0]


def test_bad_inputs_are_one_line_errors(env, tmp_path, capsys, monkeypatch):
  _, corpus, _ = env
  wd = tmp_path / "wd"
  _expect_error(capsys, _train_args(corpus, wd, stage="stage5"), "unknown stage 'stage5'",
                "fnet", "koopman_attn", "hamiltonian_attn")
  _expect_error(capsys, _train_args(corpus, wd, preset="xl"), "unknown preset 'xl'", "tiny",
                "paper")
  _expect_error(capsys, _train_args(corpus, wd, data=tmp_path / "nope.txt"), "does not exist")
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  _expect_error(capsys, _train_args(corpus, wd, data=empty), "stories")
  bad_vocab = tmp_path / "r50k_base.tiktoken"
  bad_vocab.write_text("aGVsbG8= 0\n")
  _expect_error(capsys, _train_args(corpus, wd, tokenizer="gpt2", tokenizer_file=bad_vocab),
                "wrong sha256")
  _expect_error(capsys, _train_args(corpus, wd, seq_len=64), "--seq_len=64 exceeds", "32",
                "--override=max_seq_len=N")
  _expect_error(capsys, _train_args(corpus, wd, data_mode="foo"), "--data_mode must be one of")
  _expect_error(capsys, _train_args(corpus, wd, eval_batches=-2), "eval_batches")
  _expect_error(capsys, _train_args(corpus, wd, batch_size=6, grad_accum=4), "divisible")
  _expect_error(capsys, _train_args(corpus, wd, override="no_such_field=3"), "no_such_field")
  _expect_error(capsys, _train_args(corpus, wd, dtype="float8"), "--dtype")
  _expect_error(capsys, ["train", "--stage=koopman"], "--workdir is required")
  _expect_error(capsys, _train_args(corpus, wd) + ["--no_such_flag=1"], "no_such_flag")
  _expect_error(capsys, _train_args(corpus, wd, num_processes=2), "--coordinator_address")
  assert not wd.exists()
  # a file where the run folder should be: refused before the data are read, kept
  afile = tmp_path / "notes.txt"
  afile.write_text("x")
  _expect_error(capsys, _train_args(corpus, afile), f"--workdir={afile} is a file, not a folder")
  _expect_error(capsys, _train_args(corpus, afile / "run"), f"{afile} is a file, not a folder")
  assert afile.read_text() == "x"
  # a folder the permission bits allow but writes fail in (root on a read-only mount)
  import errno  # pylint: disable=import-outside-toplevel
  from qsf_jax.training import run_folder  # pylint: disable=import-outside-toplevel
  def read_only(**_):
    raise OSError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(run_folder.tempfile, "mkdtemp", read_only)
  _expect_error(capsys, _train_args(corpus, wd), f"--workdir={wd}: cannot write in the folder "
                f"{tmp_path} (Read-only file system)")
  monkeypatch.undo()
  assert not wd.exists()


def test_a_second_trainer_in_a_busy_workdir_is_refused_and_untouched(run_dir, env, capsys):
  # Two `train` commands on one --workdir (launched twice by mistake, even with another
  # seed) both trained, interleaved metrics.jsonl and saved over each other's checkpoints;
  # the second reported "done" for checkpoints holding the first one's weights.
  from qsf_jax.training import setup  # pylint: disable=import-outside-toplevel
  _, corpus, _ = env
  before = sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
  with setup.workdir_lock(run_dir):  # what a running trainer holds
    _expect_error(capsys, _train_args(corpus, run_dir),
                  f"{run_dir} is in use by another training process", "another --workdir")
  assert sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before
  with setup.workdir_lock(run_dir):  # released when its holder ends
    pass


def test_a_run_that_stopped_before_its_first_checkpoint_starts_with_clean_metrics(
    env, tmp_path, capsys):
  # A first attempt that failed before its first checkpoint (disk full on that save, a
  # kill) left metrics.jsonl records; the next attempt starts from step 0 and used to
  # append the same steps again, so metrics.jsonl held steps 1, 2, ... twice.
  _, corpus, _ = env
  wd = tmp_path / "restarted"
  wd.mkdir()
  (wd / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "kind": "train", "loss": 9.0}) + "\n" for s in (1, 2)))
  assert train_cli.run(_train_args(corpus, wd, steps=2, checkpoint_every=2, eval_every=2,
                                   sample_tokens=0, log_every=1)) == 0
  capsys.readouterr()
  recs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["kind"]) for r in recs] == [(1, "train"), (2, "train"), (2, "eval")]
  assert all(r["loss"] != 9.0 for r in recs if r["kind"] == "train")


def test_a_run_folder_removed_during_training_stops_the_run(env, tmp_path, capsys):
  # `rm -rf` of the run folder mid-run: orbax made a new folder with the later
  # checkpoints, metrics.jsonl and tb/ went into the removed files, and train said "done".
  import shutil  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.errors import RunFolderGoneError  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  _, corpus, _ = env
  wd = tmp_path / "gone"
  fv = flags.FlagValues()
  train_cli.define_flags(fv)
  fv(_train_args(corpus, wd, steps=4, checkpoint_every=2, eval_every=0, sample_tokens=0))

  def remove(step, _):
    if step == 3:
      for _ in range(1200):  # the step-2 checkpoint committed (at most a minute)
        if (wd / "checkpoints" / "2").is_dir():
          break
        time.sleep(0.05)
      shutil.rmtree(wd)

  with pytest.raises(RunFolderGoneError, match=f"{wd} was moved, removed or replaced .* "
                     "step 4 .*last checkpoint saved there was step 2"):
    train_and_evaluate(train_cli.config_from_flags(fv), wd, step_callback=remove)
  capsys.readouterr()
  assert not wd.exists()


def test_wrong_stage_workdir_is_refused_and_untouched(run_dir, env, capsys):
  _, corpus, _ = env
  before = sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
  _expect_error(capsys, _train_args(corpus, run_dir, stage="fnet"),
                "holds a checkpoint of a different run", "stage: stored 'koopman'")
  _expect_error(capsys, _train_args(corpus, run_dir, max_train_stories=20),
                "holds a checkpoint of a different run", "data_source.cache_key",
                "--max_train_stories: stored None, requested 20")
  assert sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


def test_evaluate_prints_json_last_line(run_dir, capsys, caplog):
  caplog.set_level("WARNING", logger="absl")
  assert evaluate_cli.run(["evaluate", f"--workdir={run_dir}"]) == 0
  assert not [r for r in caplog.records if "read only" in r.getMessage()]  # keep_log_record
  last = capsys.readouterr().out.strip().splitlines()[-1]
  rec = json.loads(last)
  assert rec["step"] == 6 and rec["stage"] == "koopman"
  assert rec["tokens"] > 0 and rec["perplexity"] == pytest.approx(2.718281828 ** rec["val_loss"])
  # same numbers as the end-of-training evaluation when restricted to the same batches
  assert evaluate_cli.run(["evaluate", f"--workdir={run_dir}", "--eval_batches=2"]) == 0
  rec2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in x][-1]
  assert rec2["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-6)
  assert rec2["tokens"] == logged["tokens"]
  # --data evaluates the run on another corpus (same tokenizer)
  other = run_dir.parent / "other.txt"
  other.write_text("\n<|endoftext|>\n".join(synthetic_stories(40, seed=99, split="validation")))
  assert evaluate_cli.run(["evaluate", f"--workdir={run_dir}", f"--data={other}"]) == 0
  rec3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rec3["data"] == f"path:{other}" and rec3["tokens"] != rec["tokens"]
  # --beta applies to the annealed stages only; this is Stage II (its own 0 is allowed).
  _expect_error(capsys, ["evaluate", f"--workdir={run_dir}", "--beta=0.5"],
                "beta=0.5: the koopman stage has no normalisation anneal", main=evaluate_cli.run)
  assert evaluate_cli.run(["evaluate", f"--workdir={run_dir}", "--beta=0"]) == 0
  capsys.readouterr()
  _expect_error(capsys, ["evaluate", f"--workdir={run_dir.parent / 'none'}"], "no checkpoint",
                main=evaluate_cli.run)
  for flag in ("--batch_size=0", "--batch_size=-4", "--eval_batches=-2"):
    _expect_error(capsys, ["evaluate", f"--workdir={run_dir}", flag], flag.split("=")[0],
                  main=evaluate_cli.run)


def test_evaluate_per_token(run_dir, tmp_path, capsys):
  out = tmp_path / "tok.npz"
  assert evaluate_cli.run(["evaluate", f"--workdir={run_dir}", "--eval_batches=2",
                           f"--per_token_out={out}", "--outlier_nats=2.5"]) == 0
  rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  pt = rec["per_token"]
  assert pt["tokens"] == rec["tokens"] and pt["threshold_nats"] == 2.5
  assert pt["mean"] == pytest.approx(rec["val_loss"], rel=1e-6)
  with np.load(out) as f:
    x = f["xent"]
    assert x.size == rec["tokens"] and int((x > 2.5).sum()) == pt["above"]
    # byte tokens of synthetic stories: training shows every byte the validation uses
    assert not f["unseen_so_far"].any() and pt["unseen_input_types"] == 0
  assert pt["above_unseen_so_far_frac"] in (0.0, None) and pt["all_seen_mean"] == pt["mean"]
  # bad requests fail before the evaluation
  _expect_error(capsys, ["evaluate", f"--workdir={run_dir}", "--per_token",
                         "--outlier_nats=0"], "finite number of nats", main=evaluate_cli.run)
  _expect_error(capsys, ["evaluate", f"--workdir={run_dir}",
                         f"--per_token_out={tmp_path / 'no' / 'x.npz'}"], "does not exist",
                main=evaluate_cli.run)
  _expect_error(capsys, ["evaluate", f"--workdir={run_dir}",
                         f"--per_token_out={tmp_path / 'x.json'}"],
                "per_token_out must be an .npz file", main=evaluate_cli.run)


def test_context_use_prints_a_table_and_json(run_dir, tmp_path, capsys):
  out = tmp_path / "ctx.npz"
  assert context_cli.run(["context_use", f"--workdir={run_dir}", "--contexts=4,1",
                          "--positions=4:12", "--eval_batches=2", f"--out={out}"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  rec = json.loads(lines[-1])
  assert lines[-4].startswith("| context k | 1 | 4 | whole row | unigram |")
  assert rec["stage"] == "koopman" and rec["step"] == 6 and rec["positions"] == [4, 11]
  assert list(rec["restart"]) == ["1", "4"] and rec["targets"] == 2 * 4 * 8
  with np.load(out) as f:
    assert f["restart"].shape == (2, rec["targets"]) and f["contexts"].tolist() == [1, 4]
    assert f["restart"][1].mean() == pytest.approx(rec["restart"]["4"])
    assert f["whole_row"].mean() == pytest.approx(rec["whole_row"])
    assert f["unigram"].mean() == pytest.approx(rec["unigram"])
    # the unigram model is the one wave_bias_init=unigram uses: the run's training split
    run = load_run(run_dir)
    log_p = setup.unigram_log_probs(setup.load_corpus(run.cfg, run.tokenizer).train,
                                    run.tokenizer.vocab_size)
    np.testing.assert_allclose(f["unigram"], -log_p[f["target"]], rtol=1e-6)
  # the whole row agrees with evaluate's per-token losses at the same targets
  tok = tmp_path / "tok.npz"
  assert evaluate_cli.run(["evaluate", f"--workdir={run_dir}", "--eval_batches=2",
                           f"--per_token_out={tok}"]) == 0
  with np.load(tok) as f:
    sel = (f["position"] >= 4) & (f["position"] < 12)
    assert f["xent"][sel].mean() == pytest.approx(rec["whole_row"], rel=1e-6)
  # bad requests fail before the run is loaded
  for argv, needle in [(["--contexts=1,x"], "--contexts expects integers"),
                       (["--positions=4"], "--positions expects lo:hi"),
                       (["--contexts=8", "--positions=4:12"], "does not fit before position 4"),
                       ([f"--out={tmp_path / 'x.json'}"], "error: out must be an .npz file"),
                       ([f"--out={tmp_path / 'no' / 'x.npz'}"], "error: out: the folder")]:
    _expect_error(capsys, ["context_use", f"--workdir={run_dir}", *argv], needle,
                  main=context_cli.run)
  _expect_error(capsys, ["context_use", f"--workdir={tmp_path / 'none'}"], "checkpoint",
                main=context_cli.run)
  # a range past the rows is refused, not cut; lo: runs to the end of the row
  _expect_error(capsys, ["context_use", f"--workdir={run_dir}", "--contexts=1",
                         "--positions=4:999"], "positions end at 999, but rows have only",
                main=context_cli.run)
  assert context_cli.parse_positions("4:") == (4, None)
  assert context_cli.parse_positions(" 4 : 12 ") == (4, 12)


def test_evaluate_json_is_strict(monkeypatch, capsys):
  # An overflowing perplexity prints as null: strict JSON parsers reject Infinity.
  monkeypatch.setattr(evaluate_cli, "evaluate_workdir", lambda *a, **kw: dict(
      val_loss=800.0, perplexity=float("inf"), tokens=3, step=1,
      per_token={"max": float("inf"), "above": 3}))
  assert evaluate_cli.run(["evaluate", "--workdir=unused"]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert "Infinity" not in last and json.loads(last)["perplexity"] is None
  assert json.loads(last)["per_token"] == {"max": None, "above": 3}


def test_flags_reach_the_library_calls(monkeypatch, tmp_path, capsys):
  """Each flag of evaluate / context_use / sample is passed on (library calls stubbed)."""
  seen = {}

  def stub(name, result):
    def f(*args, **kw):
      seen[name] = (args, kw)
      return result
    return f

  monkeypatch.setattr(evaluate_cli, "evaluate_workdir", stub("evaluate", {"val_loss": 1.0}))
  monkeypatch.setattr(context_cli, "context_use_workdir", stub("context_use", {}))
  monkeypatch.setattr(context_cli, "markdown_table", lambda rec: "table")
  monkeypatch.setattr(sample_cli, "sample_workdir", stub("sample", " more"))
  common = ["--workdir=W", "--data=D", "--step=3", "--eval_batches=5", "--batch_size=7",
            "--tokenizer_file=TF", "--cache_dir=C", "--beta=0", "--attn_impl=xla"]
  want = dict(data="D", step=3, max_batches=5, batch_size=7, tokenizer_file="TF",
              cache_dir="C", beta=0.0, attn_impl="xla")
  assert evaluate_cli.run(["evaluate", *common, "--outlier_nats=3"]) == 0
  args, kw = seen["evaluate"]
  assert args == ("W",) and kw == dict(want, per_token=False, outlier_nats=3.0,
                                       per_token_out=None)
  assert context_cli.run(["context_use", *common, "--contexts=2,1", "--positions=4:9",
                          f"--out={tmp_path / 'c.npz'}"]) == 0
  args, kw = seen["context_use"]
  assert args == ("W",) and kw == dict(want, contexts=[2, 1], positions=(4, 9),
                                       out=str(tmp_path / "c.npz"))
  # defaults: all batches, the checkpoint's own beta and step (0 batches means all)
  assert evaluate_cli.run(["evaluate", "--workdir=W", "--eval_batches=0"]) == 0
  kw = seen["evaluate"][1]
  assert (kw["max_batches"], kw["beta"], kw["step"], kw["data"]) == (None, None, None, None)
  assert sample_cli.run(["sample", "--workdir=W", "--prompt=P", "--max_new_tokens=9",
                         "--temperature=0.5", "--top_k=4", "--seed=2", "--step=3",
                         "--tokenizer_file=TF", "--attn_impl=xla", "--beta=0.5"]) == 0
  assert seen["sample"] == (("W", "P"), dict(max_new_tokens=9, temperature=0.5, top_k=4, seed=2,
                                             step=3, tokenizer_file="TF", attn_impl="xla",
                                             beta=0.5))
  assert capsys.readouterr().out.splitlines()[-1] == "P more"
  assert sample_cli.run(["sample", "--workdir=W"]) == 0  # D14: temperature 0.8, top-k 50
  assert seen["sample"] == (("W", "Once upon a time,"), dict(
      max_new_tokens=40, temperature=0.8, top_k=50, seed=0, step=None, tokenizer_file=None,
      attn_impl=None, beta=None))


def test_train_flags_reach_the_train_config(tmp_path, capsys):
  from absl import flags as absl_flags
  fv = absl_flags.FlagValues()
  train_cli.define_flags(fv)
  fv(["train", "--stage=fnet", "--preset=tiny", "--data=D", "--tokenizer=bytes",
      "--tokenizer_file=TF", "--cache_dir=C", "--data_mode=packed", "--max_train_stories=11",
      f"--workdir={tmp_path}", "--steps=13", "--batch_size=6", "--seq_len=16", "--seed=5",
      "--init_from=R", "--eval_batches=0", "--sample_tokens=3", "--lr=0.002"])
  cfg = train_cli.config_from_flags(fv)
  assert (cfg.stage, cfg.preset, cfg.data, cfg.tokenizer, cfg.tokenizer_file, cfg.cache_dir,
          cfg.data_mode, cfg.max_train_stories, cfg.steps, cfg.batch_size, cfg.seq_len,
          cfg.seed, cfg.init_from, cfg.eval_batches, cfg.sample_tokens, cfg.lr) == (
              "fnet", "tiny", "D", "bytes", "TF", "C", "packed", 11, 13, 6, 16, 5, "R",
              None, 3, 0.002)
  # a stray positional argument is refused before anything runs (the bad stage makes a
  # parser that let it through stop at the stage check instead of training)
  _expect_error(capsys, ["train", f"--workdir={tmp_path / 'x'}", "--stage=nope", "extra"],
                "unexpected positional arguments")
  assert not (tmp_path / "x").exists()


def test_evaluate_warns_when_the_run_data_resolves_elsewhere(run_dir, tmp_path, caplog):
  # E.g. data="auto" fell back to the synthetic corpus at training time and reaches the
  # hub now: the run's own data is then another corpus, which evaluate says.
  import shutil
  wd = tmp_path / "moved"
  shutil.copytree(run_dir, wd)
  for meta in (wd / "checkpoints").glob("*/meta/metadata"):
    rec = json.loads(meta.read_text())
    rec["data"]["source"] = "synthetic(seed=0)"
    meta.write_text(json.dumps(rec))
  caplog.set_level("WARNING", logger="absl")
  from qsf_jax.training.evaluation import evaluate_workdir
  out = evaluate_workdir(wd, max_batches=1)
  assert out["trained_on"] == "synthetic(seed=0)" and out["data"] != out["trained_on"]
  assert [r for r in caplog.records if "but it was trained on synthetic(seed=0)" in
          r.getMessage()]
  assert evaluate_workdir(run_dir, max_batches=1)["trained_on"] == out["data"]


def test_damaged_checkpoints_are_one_line_errors(run_dir, tmp_path, capsys):
  # A checkpoint folder without its items (e.g. copied half-way) or with a truncated
  # JSON file is reported with its path and the step to fall back to; nothing is moved.
  for damage in ("missing_state", "empty_step", "truncated_meta", "truncated_array"):
    wd = tmp_path / damage
    shutil.copytree(run_dir, wd)
    step = wd / "checkpoints" / "6"
    if damage == "missing_state":
      shutil.rmtree(step / "state")
    elif damage == "empty_step":
      step = wd / "checkpoints" / "9"
      step.mkdir()
    elif damage == "truncated_meta":
      meta = next(p for p in (step / "meta").rglob("*") if p.is_file())
      meta.write_text(meta.read_text()[:7])
    else:  # the largest array file, cut in half (an interrupted copy)
      big = max((p for p in (step / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
      with open(big, "r+b") as f:
        f.truncate(big.stat().st_size // 2)
    before = sorted(str(p) for p in wd.rglob("*"))
    line = _expect_error(capsys, ["evaluate", f"--workdir={wd}"],
                         f"checkpoint {step} cannot be read", "use step", main=evaluate_cli.run)
    assert "bound method" not in line, line  # orbax's TensorStore repr is cut off
    assert sorted(str(p) for p in wd.rglob("*")) == before


def test_a_truncated_array_leaves_no_noise(run_dir, tmp_path, capsys, caplog):
  """orbax's failed restore leaves the other arrays' reads running; they reported from
  TensorStore's threads and at collection ("Event loop is closed", coroutines never
  awaited, futures never retrieved): up to a thousand lines after the error line."""
  import gc
  import sys
  import time
  wd = tmp_path / "run"
  shutil.copytree(run_dir, wd)
  big = max((p for p in (wd / "checkpoints" / "6" / "state").rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size)
  with open(big, "r+b") as f:
    f.truncate(big.stat().st_size // 2)
  seen, original = [], sys.unraisablehook
  sys.unraisablehook = seen.append  # below the checkpoint module's filter, once installed
  try:
    for _ in range(3):  # the leftovers' timing varies from run to run
      _expect_error(capsys, ["evaluate", f"--workdir={wd}"], "cannot be read",
                    main=evaluate_cli.run)
    for _ in range(10):  # the abandoned reads finish on TensorStore's threads
      time.sleep(0.05)
      gc.collect()
  finally:
    sys.unraisablehook = original
  assert not seen, [f"{a.exc_type.__name__}: {str(a.exc_value)[:100]}" for a in seen]
  assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_evaluating_on_changed_data_is_refused(env, run_dir, tmp_path, capsys, caplog):
  """A run's data file edited after training (stories added: the held-out validation
  stories shift, and some were trained on) is not silently evaluated; --data uses it."""
  _, corpus, _ = env
  data = tmp_path / "stories.txt"
  shutil.copyfile(corpus, data)  # same name and contents: run_dir's token-cache entry
  wd = tmp_path / "run"
  assert train_cli.run(_train_args(data, wd, steps=2, checkpoint_every=0, eval_every=0,
                                   sample_tokens=0)) == 0
  stored = load_run(wd).meta["data"]
  assert stored["source"] == f"path:{data}"  # this run's path, not the cached entry's
  assert stored["cache_key"] == load_run(run_dir).meta["data"]["cache_key"]
  assert evaluate_cli.run(["evaluate", f"--workdir={wd}", "--eval_batches=1"]) == 0
  capsys.readouterr()
  with open(data, "a") as f:
    f.write("\n<|endoftext|>\nA new story about a red ball.\n")
  line = _expect_error(capsys, ["evaluate", f"--workdir={wd}", "--eval_batches=1"],
                       f"differ from those {wd} was trained on", "token-cache key",
                       "may now include training stories", f"--data={data}",
                       main=evaluate_cli.run)
  assert "DataChangedError" not in line
  with pytest.raises(DataChangedError):
    evaluate_workdir(wd, max_batches=1)
  _expect_error(capsys, ["analyze", f"--workdir={wd}", "--max_sequences=2"],
                f"differ from those {wd} was trained on", main=analyze_cli.run)
  caplog.set_level("WARNING", logger="absl")
  assert evaluate_cli.run(["evaluate", f"--workdir={wd}", "--eval_batches=1",
                           f"--data={data}"]) == 0
  assert any("was trained on" in r.getMessage() for r in caplog.records)
  rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rec["data"] == rec["trained_on"] == f"path:{data}"
  # --per_token's unseen-input counts need the training split as it was: omitted, with
  # the reason (no --data hint: it cannot help); the rest of the summary is given.
  caplog.clear()
  rec = evaluate_workdir(wd, data=str(data), max_batches=1, per_token=True)["per_token"]
  assert "unseen_input_count" not in rec and rec["tokens"] > 0
  assert "unseen-input counts of the per-token summary needs" in rec["unseen_inputs_omitted"]
  assert "--data=" not in rec["unseen_inputs_omitted"]
  assert any("unseen-input counts omitted" in r.getMessage() for r in caplog.records)
  # context_use's unigram baseline likewise, and there it is refused.
  _expect_error(capsys, ["context_use", f"--workdir={wd}", "--eval_batches=1", f"--data={data}",
                         "--contexts=2"],
                "the unigram baseline needs the training split as it was",
                "restore the files it was trained on", main=context_cli.run)


def test_a_run_trained_on_a_relative_path_works_from_any_folder(env, tmp_path, monkeypatch,
                                                               capsys):
  """--data is stored as typed; evaluate from another folder looked for the relative path
  there ("data path /shared/... does not exist"), and context_use could not be helped
  with --data. The run's files are now found by the absolute path it recorded."""
  root, corpus, _ = env
  train_dir = tmp_path / "a"
  (train_dir / "data").mkdir(parents=True)
  shutil.copy(corpus, train_dir / "data" / "stories.txt")
  monkeypatch.chdir(train_dir)
  wd = tmp_path / "run"
  assert train_cli.run(_train_args("data/stories.txt", wd, steps=2, checkpoint_every=0,
                                   eval_every=0, sample_tokens=0)) == 0
  monkeypatch.chdir(tmp_path)  # where data/stories.txt names nothing
  rec = evaluate_workdir(wd, max_batches=1)
  assert rec["data"] == rec["trained_on"] == f"path:{train_dir / 'data' / 'stories.txt'}"
  (train_dir / "data" / "stories.txt").rename(tmp_path / "moved.txt")
  capsys.readouterr()
  _expect_error(capsys, ["evaluate", f"--workdir={wd}", "--eval_batches=1"],
                "does not exist", f"was trained on {train_dir / 'data' / 'stories.txt'}",
                "pass --data to evaluate on data where they are now",
                main=evaluate_cli.run)


def test_sample_prints_text(run_dir, capsys):
  argv = ["sample", f"--workdir={run_dir}", "--prompt=Once upon", "--max_new_tokens=12",
          "--seed=3"]
  assert sample_cli.run(argv) == 0
  out = capsys.readouterr().out
  text = out.rstrip("\n")
  assert text.startswith("Once upon") and len(text.encode()) >= len("Once upon") + 6
  assert sample_cli.run(argv) == 0
  assert capsys.readouterr().out == out  # same seed, same text
  _expect_error(capsys, ["sample", f"--workdir={run_dir}", "--max_new_tokens=40"],
                "exceeds the model's context of 32", main=sample_cli.run)


def test_parse_overrides():
  assert parse_overrides(["max_seq_len=64", "attn_scale=none", "ffn_bias=False", "x=1e-3"]) == (
      ("max_seq_len", 64), ("attn_scale", "none"), ("ffn_bias", False), ("x", 1e-3))
  with pytest.raises(ValueError):
    parse_overrides(["novalue"])
  # lower-case booleans are booleans, not the (truthy) string "false"
  assert parse_overrides(["tie_embeddings=false", "ffn_bias=TRUE", "x= False"]) == (
      ("tie_embeddings", False), ("ffn_bias", True), ("x", False))


def test_dtype_flag_and_a_dtype_override_must_agree():
  # --dtype used to win over --override=dtype=... without a word.
  from qsf_jax.training.config import TrainConfig  # pylint: disable=g-import-not-at-top
  from qsf_jax.training.errors import TrainConfigError  # pylint: disable=g-import-not-at-top
  both = lambda over: TrainConfig(stage="koopman", preset="tiny", dtype="bfloat16",
                                  model_overrides=(("dtype", over),))
  with pytest.raises(TrainConfigError, match=r"--dtype=bfloat16 and --override=dtype=float32 "
                                             r"disagree; give one of them"):
    setup.make_model_config(both("float32"), 256)
  assert setup.make_model_config(both("bfloat16"), 256).dtype == "bfloat16"
  assert setup.make_model_config(TrainConfig(stage="koopman", preset="tiny", model_overrides=(
      ("dtype", "bfloat16"),)), 256).dtype == "bfloat16"


def test_prepare_output_file_makes_its_folder_or_refuses(tmp_path):
  out = tmp_path / "a" / "b" / "bench.json"
  assert prepare_output_file("--out", out) == out and out.parent.is_dir() and not out.exists()
  with pytest.raises(ValueError, match=r"--out=.* is a folder; give a file path such as"):
    prepare_output_file("--out", tmp_path)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match=r"--out=.*file/x.json: cannot create the folder"):
    prepare_output_file("--out", tmp_path / "file" / "x.json")
  assert (tmp_path / "file").read_text() == "x"  # nothing lost


@pytest.mark.parametrize("flags,message", [
    (["--repeats=0"], "bench_core.py: error: --repeats must be >= 1"),
    (["--out={tmp}"], "bench_core.py: error: --out={tmp} is a folder"),
    (["--repeats=x"], "bench_core.py: error: flag --repeats=x: invalid literal for int()"),
    (["--quick", "extra"], "bench_core.py: error: unexpected positional arguments ['extra']"),
])
def test_bench_core_prints_one_error_line(tmp_path, flags, message, capsys):
  """No usage text or module docstring before the error, as the other entry points.
  In-process here; ``test_bench_core_runs_as_a_module`` runs the module's own main."""
  import experiments.bench_core as b
  assert b.run(["bench_core.py"] + [f.format(tmp=tmp_path) for f in flags]) == 1
  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert out == "" and len(lines) == 1, err
  assert lines[0].startswith(message.format(tmp=tmp_path)), err


def test_bench_core_rows_say_how_many_calls_they_time(monkeypatch, capsys):
  """The Cayley scan at N >= 256 is timed over fewer calls; its row said "median of 10"
  while it was the median (the mean) of 2."""
  import experiments.bench_core as b
  n_calls = []

  def fake_time(fn, *args, repeats):
    n_calls.append(repeats)
    return 1e-3
  monkeypatch.setattr(b, "_time", fake_time)
  rows = b.run_cases(3, 4, (4, 256), 2, 10)
  assert [r["calls"] for r in rows] == n_calls
  calls = {(r["case"], r["size"]): r["calls"] for r in rows}
  assert calls[("cayley_scan (lax.scan)", "N=256 T=2")] == 2
  assert calls[("cayley_scan (lax.scan)", "N=4 T=2")] == 10
  assert calls[("chain_mean (associative)", "d=3 N=4")] == 10
  assert "(median of 2)" in capsys.readouterr().out


def test_bench_core_runs_as_a_module(tmp_path):
  """``python -m``: the module's own main prints the same single error line."""
  p = subprocess.run([sys.executable, "-m", "experiments.bench_core", "--repeats=x"],
                     cwd=REPO, capture_output=True, text=True, timeout=120)
  assert p.returncode == 1 and p.stdout == ""
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1, p.stderr
  assert lines[0].startswith("bench_core.py: error: flag --repeats=x: invalid literal"), p.stderr


ENTRY_POINTS = ["analyze", "bench_core", "bench_train", "context_use", "evaluate",
                "progressive", "sample", "separation", "train"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_help_flag_lists_the_flags(name, capsys):
  """absl's parse errors suggest --helpshort: each help flag prints this entry
  point's own flags and exits 0."""
  import importlib
  module = importlib.import_module(f"experiments.{name}")
  own = {"analyze": "--workdir:", "bench_core": "--repeats:", "bench_train": "--stages:",
         "context_use": "--contexts:", "evaluate": "--per_token_out:",
         "progressive": "--stages:", "sample": "--prompt:",
         "separation": "--readout_ranks:", "train": "--stage:"}[name]
  from qsf_jax.training.cli import HELP_FLAGS
  for flag in HELP_FLAGS:
    assert module.run([name, flag]) == 0, flag
    out = capsys.readouterr().out
    assert own in out and "--[no]traceback:" in out, (flag, out[:500])


def test_bench_core_times_the_median_call(monkeypatch):
  import experiments.bench_core as b

  class Clock:
    now = 0.0

    def perf_counter(self):
      return Clock.now

  monkeypatch.setattr(b, "time", Clock())
  costs = iter([50.0, 3.0, 1.0, 2.0, 100.0, 2.0])  # the compiling call, then five timed ones

  def call():
    Clock.now += next(costs)

  # the median of the timed calls: not their min (1) or mean (21.6), nor the compiling call
  assert b._time(call, repeats=5) == 2.0


@pytest.mark.slow
def test_real_processes_exit_codes(run_dir, env):
  """The modules run as scripts: clean one-line failure, JSON on evaluate's last line."""
  root, corpus, cache = env
  penv = subprocess_env(root, cache)
  p = subprocess.run([sys.executable, "-m", "experiments.train", "--stage=nope",
                      f"--workdir={root / 'x'}"], cwd=REPO, env=penv, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert p.stderr.strip().splitlines()[-1].startswith("train.py: error: unknown stage 'nope'")
  p = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={run_dir}"],
                     cwd=REPO, env=penv, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-3000:]
  rec = json.loads(p.stdout.strip().splitlines()[-1])
  assert {"val_loss", "perplexity", "tokens", "step"} <= set(rec)


@pytest.mark.slow
def test_gpt2_run_and_hand_off_from_shared_files(env, shared_data_dir, capsys):
  """GPT-2 BPE from the local r50k file; Stage III initialised from Stage II (D12)."""
  root, _, _ = env
  vocab = shared_data_dir / "gpt2" / "r50k_base.tiktoken"
  data = shared_data_dir / "tinystories" / "TinyStories-valid-sample.txt"
  s2 = root / "gpt2_s2"
  common = dict(preset="tiny", data=data, tokenizer="gpt2", tokenizer_file=vocab, steps=3,
                batch_size=2, checkpoint_every=0, eval_every=0, eval_batches=1, sample_tokens=0)
  assert train_cli.run(_train_args(data, s2, stage="koopman", **common)) == 0
  meta = ck.Checkpointer(s2, read_only=True).meta()
  assert meta["tokenizer"] == {"name": "gpt2", "sha256": qdata.R50K_SHA256}
  assert meta["model_config"]["vocab_size"] == 50257
  s3 = root / "gpt2_s3"
  capsys.readouterr()
  assert train_cli.run(_train_args(data, s3, stage="koopman_attn", init_from=s2, **common)) == 0
  out = capsys.readouterr().out
  assert f"init_from {s2} (stage koopman, step 3)" in out and "copied" in out
  assert sample_cli.run(["sample", f"--workdir={s3}", "--prompt=Once upon a time,",
                         "--max_new_tokens=5", f"--tokenizer_file={vocab}"]) == 0
  text = capsys.readouterr().out
  assert text.startswith("Once upon a time,") and len(text.strip()) > len("Once upon a time,")


def test_log_filter_drops_orbax_chatter_only():
  import logging
  from qsf_jax.training.cli import keep_log_record

  def rec(path, level, msg):
    return logging.LogRecord("absl", level, path, 1, msg, (), None)

  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not keep_log_record(rec(orbax, logging.INFO, "Saving step 3"))
  assert not keep_log_record(rec(orbax, logging.WARNING, "Given directory is read only=/r"))
  assert not keep_log_record(rec(
      orbax, logging.WARNING, "CheckpointManagerOptions.read_only=True, setting max_to_keep"))
  assert keep_log_record(rec(orbax, logging.WARNING, "Found incomplete checkpoint at 7"))
  assert keep_log_record(rec(orbax, logging.ERROR, "directory is read only"))
  assert keep_log_record(rec("/src/qsf_jax/data/corpus.py", logging.INFO, "data: local"))
  # a failed background save (disk full) logged a traceback from each of its threads,
  # over 300 lines; the error reaches the main thread and is printed there once
  try:
    raise ValueError("RESOURCE_EXHAUSTED: No space left on device")
  except ValueError:
    failed = logging.LogRecord("absl", logging.ERROR, orbax, 1, "Save Finalize failed.", (),
                               sys.exc_info())
  assert not keep_log_record(failed)
