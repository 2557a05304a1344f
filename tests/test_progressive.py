"""The progressive protocol runner and its Table-2 report (QSF spec D12, §4.2)."""

import json

import pytest

from experiments import progressive as prog_cli
from qsf_jax.models.params import count_params
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
            "--sample_tokens=4", f"--stages={','.join(STAGES)}"]
    assert prog_cli.run(argv) == 0
    yield root / "runs", argv


def test_tables_have_every_stage_and_true_parameter_counts(ran):
  out, _ = ran
  table = json.loads((out / "table2.json").read_text())
  rows = {r["stage"]: r for r in table["rows"]}
  assert list(rows) == STAGES
  assert [rows[s]["init_from"] for s in STAGES] == [None, "fnet", "koopman"]
  for s in STAGES:
    assert rows[s]["params"] == count_params(load_run(out / s).params)
    assert rows[s]["steps"] == 3 and rows[s]["tokens"] > 0
    assert rows[s]["perplexity"] == pytest.approx(2.718281828 ** rows[s]["val_loss"], rel=1e-6)
  assert rows["koopman_attn"]["paper_params"] == 29_400_000
  assert rows["koopman_attn"]["paper_val_loss"] == 2.08
  md = (out / "table2.md").read_text()
  assert "| koopman_attn | koopman |" in md and "29,400,000" in md and "Samples" in md


def test_rerun_resumes_without_retraining(ran):
  out, argv = ran
  ckpts = {s: sorted(p.name for p in (out / s / "checkpoints").iterdir()) for s in STAGES}
  before = json.loads((out / "table2.json").read_text())["rows"]
  assert prog_cli.run(argv) == 0
  after = json.loads((out / "table2.json").read_text())["rows"]
  assert [r["val_loss"] for r in after] == [r["val_loss"] for r in before]
  assert {s: sorted(p.name for p in (out / s / "checkpoints").iterdir()) for s in STAGES} == ckpts


def test_plan_orders_and_validates_stages():
  assert table2.plan() == list(table2.PROTOCOL)
  assert table2.plan(["koopman_attn", "hamiltonian_attn"], include=["gla"]) == [
      ("koopman_attn", None), ("hamiltonian_attn", None), ("gla", None)]
  with pytest.raises(TrainConfigError, match="unknown progressive stage 'stage5'.*fnet"):
    table2.plan(["stage5"])
  with pytest.raises(TrainConfigError, match="--include"):
    table2.plan(include=["transformer"])


def test_bad_flags_exit_nonzero_with_one_line(tmp_path, capsys):
  assert prog_cli.run(["progressive", f"--workdir={tmp_path}", "--stages=nope"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown progressive stage" in err[0]
  assert prog_cli.run(["progressive"]) == 1
  assert "--workdir is required" in capsys.readouterr().err
