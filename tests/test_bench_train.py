"""The training benchmark entry point at tiny sizes (it measures, it does not assert speed)."""

import json

import pytest

from experiments import bench_train
from qsf_jax.training import bench

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_writes_rows_for_every_stage_length_and_context(tmp_path):
  out = tmp_path / "b.json"
  argv = ["bench_train", f"--out={out}", "--preset=tiny", "--stages=koopman_attn,transformer",
          "--seq_lens=16,32", "--decode_contexts=4,16", "--steps=2", "--vocab_size=257"]
  assert bench_train.run(argv) == 0
  res = json.loads(out.read_text())
  assert {(r["stage"], r["seq_len"]) for r in res["train"]} == {
      (s, T) for s in ("koopman_attn", "transformer") for T in (16, 32)}
  for r in res["train"]:
    assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["seq_len"] / r["step_s"])
    assert r["memory_bytes"] is None or r["memory_bytes"] > 0
  assert {(r["stage"], r["context"]) for r in res["decode"]} == {
      (s, C) for s in ("koopman_attn", "transformer") for C in (4, 16)}
  assert res["targets"] == {}  # the targets are defined at T=4096 and contexts 256/4096 only


def test_targets_are_ratios_of_measured_rows():
  train = [dict(stage="koopman_attn", seq_len=4096, step_s=1.0),
           dict(stage="transformer", seq_len=4096, step_s=4.0)]
  dec = [dict(stage="koopman_attn", context=256, ms_per_token=2.0),
         dict(stage="koopman_attn", context=4096, ms_per_token=2.2)]
  tg = bench.targets(train, dec)
  assert tg["koopman_attn_step_T4096_over_transformer"] == 0.25
  assert tg["koopman_attn_step_T4096_le_0.5x"] is True
  assert tg["koopman_attn_decode_4096_over_256"] == pytest.approx(1.1)
  assert tg["koopman_attn_decode_4096_le_1.2x"] is True


@pytest.mark.parametrize("flag, msg", [("--stages=bogus", "unknown stage 'bogus'"),
                                       ("--seq_lens=12,x", "--seq_lens takes integers"),
                                       ("--decode_contexts=0", "positive integers")])
def test_bad_flags_exit_nonzero(tmp_path, capsys, flag, msg):
  assert bench_train.run(["bench_train", f"--out={tmp_path / 'x.json'}", flag]) == 1
  assert msg in capsys.readouterr().err
