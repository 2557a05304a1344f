"""The progressive protocol runner and its Table-2 report (QSF spec D12, §4.2)."""

import json
import shutil

import pytest

from experiments import progressive as prog_cli
from qsf_jax.analysis.plots_dynamics import plot_stage_losses
from qsf_jax.models.params import count_params, paper_param_counts
from qsf_jax.training import table2
from qsf_jax.training.errors import TrainConfigError
from qsf_jax.training.restore import load_run
from story_corpus import story_corpus

pytestmark = pytest.mark.usefixtures("fast_compiles")

STAGES = ["fnet", "koopman", "koopman_attn"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  root = tmp_path_factory.mktemp("progressive")
  with story_corpus(root, 120, seed=11) as corpus:
    argv = ["progressive", f"--workdir={root / 'runs'}", "--preset=tiny", f"--data={corpus}",
            "--tokenizer=bytes", "--steps=3", "--batch_size=2", "--eval_batches=1",
            "--sample_tokens=40", "--max_train_stories=100", f"--stages={','.join(STAGES)}"]
    assert prog_cli.run(argv) == 0
    yield root / "runs", argv


@pytest.mark.slow
def test_tables_have_every_stage_and_true_parameter_counts(ran):
  out, _ = ran
  table = json.loads((out / "table2.json").read_text())
  assert table["interrupted"] is None
  rows = {r["stage"]: r for r in table["rows"]}
  assert list(rows) == STAGES
  assert [rows[s]["init_from"] for s in STAGES] == [None, "fnet", "koopman"]
  for s in STAGES:
    r = rows[s]
    assert set(r) == set(table2.COLUMNS)
    assert r["params"] == count_params(load_run(out / s).params)
    assert r["paper_params"] == paper_param_counts()[s]
    assert r["steps"] == 3 and r["tokens"] > 0 and r["train_wall_s"] > 0
    assert load_run(out / s).cfg.max_train_stories == 100
    assert r["perplexity"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6)
    run = load_run(out / s)
    # D14 asks for 40 tokens; the tiny model's context leaves room for fewer (the model
    # reads the prompt and every new token but the last)
    room = run.model_config.max_seq_len - len(run.tokenizer.encode("Once upon a time,")) + 1
    assert 0 < room < 40 and r["sample_tokens"] == room
    assert isinstance(r["sample"], str) and r["sample"]
    # log_every (50) does not divide the 3 steps: the last step is logged all the same
    recs = [json.loads(x) for x in (out / s / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if x["kind"] == "train"] == [3]
  # QSF spec §3.7 fixes Stage III at the paper preset: 29,415,392 parameters.
  assert rows["koopman_attn"]["params_paper_preset"] == 29_415_392
  assert rows["koopman_attn"]["paper_params"] == 29_400_000
  assert (rows["koopman_attn"]["paper_val_loss"], rows["koopman_attn"]["paper_ppl"]) == (2.08, 8.0)
  assert table["settings"]["max_train_stories"] == 100
  md = (out / "table2.md").read_text()
  assert "first 100 training stories, 3 steps x batch 2" in md
  png = (out / "loss_curves.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 5000
  assert ("| stage | init from | params | params @ paper | paper params | val loss | ppl | "
          "paper val loss | paper ppl | val tokens | steps | train wall (s) |") in md
  assert (f"| koopman_attn | koopman | {rows['koopman_attn']['params']:,} | 29,415,392 | "
          "29,400,000 |") in md
  assert "## Samples (D14: temperature 0.8, top-k 50, 40 tokens)" in md
  assert "- **fnet**: Once upon a time," in md
  assert f"*({rows['fnet']['sample_tokens']} tokens: the model's context)*" in md


@pytest.mark.slow
def test_rerun_resumes_without_retraining(ran):
  out, argv = ran
  ckpts = {s: sorted(p.name for p in (out / s / "checkpoints").iterdir()) for s in STAGES}
  walls = json.loads((out / table2.WALL_TIMES).read_text())
  before = json.loads((out / "table2.json").read_text())["rows"]
  assert prog_cli.run(argv) == 0
  after = json.loads((out / "table2.json").read_text())["rows"]
  assert [r["val_loss"] for r in after] == [r["val_loss"] for r in before]
  assert [r["train_wall_s"] for r in after] == [r["train_wall_s"] for r in before]
  assert json.loads((out / table2.WALL_TIMES).read_text()) == walls
  assert {s: sorted(p.name for p in (out / s / "checkpoints").iterdir()) for s in STAGES} == ckpts


@pytest.mark.slow
def test_a_lone_stage_starts_from_its_parents_run_folder(ran, tmp_path, capsys):
  out, argv = ran
  runs = tmp_path / "runs"
  shutil.copytree(out, runs)
  argv = [a for a in argv if not a.startswith(("--workdir", "--stages", "--steps"))]
  assert prog_cli.run(argv + [f"--workdir={runs}", "--stages=hamiltonian_attn",
                              "--steps=3"]) == 0
  log = capsys.readouterr().out
  assert "== hamiltonian_attn (init from koopman)" in log
  assert f"init_from {runs / 'koopman'} (stage koopman, step 3)" in log
  rows = json.loads((runs / "table2.json").read_text())["rows"]
  assert [(r["stage"], r["init_from"]) for r in rows] == [("hamiltonian_attn", "koopman")]
  # without the parent's run folder it trains from scratch, and says so as a warning
  alone = tmp_path / "alone"
  assert prog_cli.run(argv + [f"--workdir={alone}", "--stages=koopman", "--steps=2"]) == 0
  assert ("warning: koopman trains from scratch: fnet was not selected and "
          f"{alone / 'fnet'} holds no checkpoint") in capsys.readouterr().out


def test_plan_orders_and_validates_stages():
  assert table2.plan() == list(table2.PROTOCOL)
  assert table2.plan(["koopman_attn", "hamiltonian_attn", "koopman"], include=["gla", "gla"]) == [
      ("koopman", None), ("koopman_attn", "koopman"), ("hamiltonian_attn", "koopman"),
      ("gla", None)]
  with pytest.raises(TrainConfigError, match="unknown progressive stage 'stage5'.*fnet"):
    table2.plan(["stage5"])
  with pytest.raises(TrainConfigError, match="--include"):
    table2.plan(include=["transformer"])
  with pytest.raises(TrainConfigError, match="no stage"):
    table2.plan([])


def test_markdown_of_an_interrupted_run_says_how_to_resume():
  settings = dict(preset="tiny", data="synthetic", tokenizer="bytes", steps=3, batch_size=2,
                  seed=0, eval_batches=None, sample_prompt="Once upon a time,",
                  sample_temperature=0.8, sample_top_k=50, sample_tokens=40)
  md = table2.render_markdown(dict(rows=[], settings=settings, interrupted="koopman"))
  assert "Interrupted during `koopman`: re-run the same command to resume." in md
  assert "the whole validation split" in md
  assert "## Samples (D14: temperature 0.8, top-k 50, 40 tokens)" in md
  md = table2.render_markdown(dict(rows=[], settings=dict(settings, sample_tokens=0),
                                   interrupted=None))
  assert "Samples" not in md and "Interrupted" not in md  # --sample_tokens=0 drew none


@pytest.mark.parametrize("flag, msg", [
    ("--stages=nope", "unknown progressive stage 'nope'; choose from ['fnet'"),
    ("--include=transformer", "--include takes ['wave', 'gla']"),
    ("--steps=1", "--steps must be >= 2"),
    ("--max_train_stories=0", "--max_train_stories must be >= 1"),
    ("--preset=huge", "unknown preset 'huge'"),
    ("--stages=wave", "'wave' is not a protocol stage: add it with --include=wave"),
    # checks that only a later stage's training made: now before the first stage
    ("--override=attn_impl=pallas", "attn_impl='pallas' runs the Pallas GPU kernels"),
    ("--override=nope=1", "nope"),
    ("--seq_len=1000", "--seq_len=1000 exceeds the fnet/tiny model's maximum"),
    ("--data=/nonexistent/stories.txt", "does not exist")])
def test_bad_flags_exit_nonzero_with_one_line(tmp_path, capsys, flag, msg):
  wd = tmp_path / "run"
  # tiny and 2 steps (the case's own flag comes last and wins): a check that came only
  # after the first stages trained would cost seconds, not the small preset's hours
  assert prog_cli.run(["progressive", f"--workdir={wd}", "--tokenizer=bytes",
                       "--data=synthetic", "--preset=tiny", "--steps=2", flag]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and msg in err[0], err
  assert not wd.exists()  # nothing is left behind


def test_missing_workdir_is_an_error(capsys, tmp_path):
  assert prog_cli.run(["progressive"]) == 1
  assert "--workdir is required" in capsys.readouterr().err
  afile = tmp_path / "table.md"
  afile.write_text("x")
  assert prog_cli.run(["progressive", f"--workdir={afile}", "--tokenizer=bytes",
                       "--data=synthetic"]) == 1
  assert f"--workdir={afile} is a file, not a folder" in capsys.readouterr().err
  assert afile.read_text() == "x"


def test_a_single_runs_folder_or_bad_wall_times_are_refused(ran, tmp_path, capsys):
  out, argv = ran
  argv = [a for a in argv if not a.startswith("--workdir")]
  single = tmp_path / "single"
  shutil.copytree(out / "fnet", single)
  before = sorted(p.name for p in single.iterdir())
  assert prog_cli.run(argv + [f"--workdir={single}"]) == 1
  assert "holds a single run's checkpoint" in capsys.readouterr().err
  assert sorted(p.name for p in single.iterdir()) == before
  runs = tmp_path / "runs"
  shutil.copytree(out, runs)
  for garbage in ("garbage", "[1, 2]"):
    (runs / "wall_times.json").write_text(garbage)
    assert prog_cli.run(argv + [f"--workdir={runs}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wall_times.json is not a JSON object of stage -> seconds" in err[0]


def test_paper_preset_count_keeps_the_runs_architecture_overrides():
  """QSF §3.7: Stage I with FFN 1280 and no FFN bias is the paper's 42.5M model; the
  column used the preset's FFN whatever --override said."""
  over = table2.paper_overrides((("ffn_dim", 1280), ("ffn_bias", False), ("d_model", 48),
                                 ("attn_impl", "scan"), ("dtype", "bfloat16")))
  assert over == (("ffn_bias", False), ("ffn_dim", 1280))
  assert table2.paper_preset_count("fnet", over) == 42_502_080
  assert table2.paper_preset_count("fnet") == 26_800_064
  settings = dict(preset="tiny", data="synthetic", tokenizer="bytes", steps=3, batch_size=2,
                  seed=0, eval_batches=None, sample_tokens=0,
                  model_overrides=[["ffn_dim", 1280], ["d_model", 48]])
  md = table2.render_markdown(dict(rows=[], settings=settings, interrupted=None))
  assert "at the `paper` preset (V = 50257) with this run's `ffn_dim=1280`," in md


def test_stage_loss_plot_needs_a_run():
  with pytest.raises(ValueError, match="no run to plot"):
    plot_stage_losses({})


@pytest.mark.slow
def test_table_and_wall_times_follow_the_stored_runs(ran, tmp_path, capsys):
  out, argv = ran
  runs = tmp_path / "runs"
  shutil.copytree(out, runs)
  shutil.rmtree(runs / "koopman_attn")
  walls = json.loads((runs / table2.WALL_TIMES).read_text())
  (runs / table2.WALL_TIMES).write_text(json.dumps(dict(walls, koopman_attn=1e6)))
  (runs / "koopman").rename(runs / "parked")  # no parent folder: Stage III from scratch
  argv = [a for a in argv if not a.startswith(("--workdir", "--stages"))]
  assert prog_cli.run(argv + [f"--workdir={runs}", "--stages=koopman_attn"]) == 0
  # A stage trained afresh does not add to the time of the run it replaced.
  assert json.loads((runs / table2.WALL_TIMES).read_text())["koopman_attn"] < 1e3
  (runs / "parked").rename(runs / "koopman")
  capsys.readouterr()
  assert prog_cli.run(argv + [f"--workdir={runs}", "--stages=koopman,koopman_attn"]) == 0
  log = capsys.readouterr().out
  assert "koopman_attn resumed a run initialised from scratch, not koopman" in log
  rows = json.loads((runs / "table2.json").read_text())["rows"]
  # The table says how each run was trained, not what this command asked for.
  assert [(r["stage"], r["init_from"]) for r in rows] == [("koopman", "fnet"),
                                                          ("koopman_attn", None)]
  assert "| koopman_attn | scratch |" in (runs / "table2.md").read_text()
  src = load_run(runs / "koopman").meta["init_source"]
  assert src == {"path": str(out / "fnet"), "stage": "fnet", "step": 3}


def test_init_label_of_stored_metadata():
  assert table2.init_label({"init_source": None}) is None
  assert table2.init_label({"init_source": {"path": "/r/koopman", "stage": "koopman",
                                            "step": 5}}) == "koopman"
  # Runs stored before init_source: the folder of the stored --init_from.
  assert table2.init_label({"train_config": {"init_from": "runs/small/koopman/"}}) == "koopman"
  assert table2.init_label({"train_config": {"init_from": None}}) is None


@pytest.mark.slow
def test_init_from_refuses_another_tokenizer(ran):
  from qsf_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.progressive import init_from_checkpoint  # pylint: disable=import-outside-toplevel
  out, _ = ran
  ckpt = Checkpointer(out / "fnet", read_only=True)
  try:
    stored = ckpt.meta()["tokenizer"]
  finally:
    ckpt.close()
  params = load_run(out / "koopman").params
  merged, rep = init_from_checkpoint(params, str(out / "fnet"), stage="koopman",
                                     tokenizer=stored, log=lambda _: None)
  assert rep.src_stage == "fnet" and rep.copied
  with pytest.raises(TrainConfigError, match="tokenizer 'bytes'.*this run uses 'gpt2'"):
    init_from_checkpoint(params, str(out / "fnet"), stage="koopman",
                         tokenizer={"name": "gpt2", "sha256": "0" * 64})
  # another corpus is allowed (fine-tuning), with a warning: D12 hands off along one
  logs = []
  init_from_checkpoint(params, str(out / "fnet"), stage="koopman", log=logs.append,
                       data={"cache_key": "0" * 64, "source": "synthetic"})
  assert any(x.startswith("warning: the fnet run") and "other data" in x for x in logs)
  logs.clear()
  same = load_run(out / "fnet").meta["data"]
  init_from_checkpoint(params, str(out / "fnet"), stage="koopman", log=logs.append, data=same)
  assert not any("warning" in x for x in logs)


def test_run_flags_reach_every_stage(tmp_path, monkeypatch):
  seen = {}

  def fake(base, workdir, **kw):
    seen["base"] = base
    return dict(rows=[], settings={}, interrupted=None)

  monkeypatch.setattr(prog_cli, "run_progressive", fake)
  assert prog_cli.run(["progressive", f"--workdir={tmp_path}", "--nocycle_momentum",
                       "--override=ls_stats_positions=all", "--weight_decay=0.05",
                       "--clip_norm=0.5", "--grad_accum=2", "--dtype=bfloat16",
                       "--checkpoint_every=7", "--eval_every=9", "--lr=3e-4"]) == 0
  b = seen["base"]
  assert (b.cycle_momentum, b.model_overrides, b.weight_decay, b.clip_norm, b.grad_accum,
          b.dtype, b.checkpoint_every, b.eval_every, b.lr) == (
              False, (("ls_stats_positions", "all"),), 0.05, 0.5, 2, "bfloat16", 7, 9, 3e-4)


def test_a_resume_keeps_the_stored_origin():
  from qsf_jax.training import setup  # pylint: disable=import-outside-toplevel
  meta = {"train_config": {"init_from": "runs/other", "seed": 0}, "init_source": None}
  src = {"path": "/r/koopman", "stage": "koopman", "step": 5}
  stored = {"train_config": {"init_from": "/r/koopman"}, "init_source": src}
  out = setup.keep_provenance(meta, stored)
  assert out["init_source"] == src and out["train_config"]["init_from"] == "/r/koopman"
  assert out["train_config"]["seed"] == 0 and meta["init_source"] is None  # not mutated
  # A run stored before init_source: unknown stays unknown (the label falls back).
  legacy = setup.keep_provenance(meta, {"train_config": {"init_from": "runs/s/koopman"}})
  assert "init_source" not in legacy and table2.init_label(legacy) == "koopman"
  scratch = setup.keep_provenance(meta, {"train_config": {"init_from": None},
                                         "init_source": None})
  assert table2.init_label(scratch) is None
