"""The training benchmark entry point at tiny sizes (it measures, it does not assert speed)."""

import json

import jax
import pytest

from conftest import FakeClock
from experiments import bench_train
from qsf_jax.models.config import get_config
from qsf_jax.models.lm import build_model
from qsf_jax.models.params import count_params
from qsf_jax.training import bench
from qsf_jax.training.state import init_variables

pytestmark = pytest.mark.usefixtures("fast_compiles")

TRAIN_KEYS = {"stage", "preset", "seq_len", "batch_size", "step_s", "tokens_per_s", "compile_s",
              "params", "memory_bytes", "memory_measure", "xla_temp_bytes",
              "xla_argument_bytes", "xla_output_bytes", "xla_alias_bytes", "device_peak_bytes"}
DECODE_KEYS = {"stage", "preset", "context", "max_len", "reps", "rounds", "ms_per_token",
               "ms_min", "ms_round_medians"}


def _check_train_row(r):
  assert set(r) == TRAIN_KEYS
  assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(
      r["batch_size"] * r["seq_len"] / r["step_s"])
  assert r["params"] > 0
  if r["device_peak_bytes"] is None:  # CPU: XLA's analysis of the compiled step
    assert r["memory_bytes"] == (r["xla_temp_bytes"] + r["xla_argument_bytes"]
                                 + r["xla_output_bytes"] - r["xla_alias_bytes"]) > 0
    assert r["memory_measure"].startswith("XLA memory_analysis")


@pytest.mark.slow
def test_writes_rows_for_every_stage_length_and_context(tmp_path, capsys):
  # Train rows of one stage at two lengths (each row compiles a train step; a
  # koopman_attn row, with its norm statistics, is checked by
  # test_train_rows_take_model_overrides), decode rows of two stages at two contexts.
  out = tmp_path / "b.json"
  argv = ["bench_train", f"--out={out}", "--preset=tiny", "--stages=transformer",
          "--seq_lens=16,32", "--decode_stages=koopman_attn,transformer",
          "--decode_contexts=4,16", "--decode_reps=3", "--decode_rounds=2", "--steps=2",
          "--vocab_size=257"]
  assert bench_train.run(argv) == 0
  res = json.loads(out.read_text())
  assert {"device", "date", "jax", "load_avg_at_start", "train", "decode", "targets"} <= set(res)
  assert {(r["stage"], r["seq_len"]) for r in res["train"]} == {
      ("transformer", T) for T in (16, 32)}
  for r in res["train"]:
    _check_train_row(r)
  # the activations grow with T
  mem = {(r["stage"], r["seq_len"]): r["xla_temp_bytes"] for r in res["train"]}
  assert mem[("transformer", 32)] > mem[("transformer", 16)]
  assert {(r["stage"], r["context"]) for r in res["decode"]} == {
      (s, C) for s in ("koopman_attn", "transformer") for C in (4, 16)}
  for r in res["decode"]:
    assert set(r) == DECODE_KEYS and r["max_len"] == r["context"] + 5 + 2 * 3
    assert len(r["ms_round_medians"]) == 2
    assert 0 < r["ms_min"] <= r["ms_per_token"] and r["ms_min"] <= min(r["ms_round_medians"])
  assert res["targets"] == {}  # the targets are defined at T=4096 and contexts 256/4096 only
  printed = capsys.readouterr().out
  assert "| stage | T | batch | step (s) | tokens/s | memory (MiB) |" in printed
  assert "| stage | context | ms / token (median) | min |" in printed


def test_targets_are_ratios_of_measured_rows():
  train = [dict(stage="koopman_attn", seq_len=4096, step_s=1.0),
           dict(stage="transformer", seq_len=4096, step_s=4.0)]
  dec = [dict(stage="koopman_attn", context=256, ms_per_token=2.0),
         dict(stage="koopman_attn", context=4096, ms_per_token=2.6)]
  tg = bench.targets(train, dec)
  assert tg["koopman_attn_step_T4096_over_transformer"] == 0.25
  assert tg["koopman_attn_step_T4096_le_0.5x"] is True
  assert tg["koopman_attn_decode_4096_over_256"] == pytest.approx(1.3)
  assert tg["koopman_attn_decode_4096_le_1.2x"] is False
  assert "transformer_decode_4096_over_256" not in tg
  # the targets are "at most": a ratio equal to the bound meets them
  train[0]["step_s"], dec[1]["ms_per_token"] = 2.0, 2.4
  tg = bench.targets(train, dec)
  assert tg["koopman_attn_step_T4096_le_0.5x"] is True
  assert tg["koopman_attn_decode_4096_le_1.2x"] is True


def test_step_time_and_decode_latency_are_medians(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(bench, "time", clock)
  costs = iter([3.0, 1.0, 2.0, 100.0, 2.0])

  def step():
    clock.now += next(costs)

  assert bench._median_seconds(step, 5) == 2.0  # not the min (1) or the mean (21.6)

  class FakeTimer:  # per round, the seconds of each timed step
    def __init__(self, stage, preset, context, **kw):
      self.stage, self.context, self.max_len = stage, context, context + 1
      self.rounds = iter([[0.001, 0.001, 0.009], [0.004, 0.005, 0.006]])

    def time_steps(self, n):
      return next(self.rounds)[:n]

  monkeypatch.setattr(bench, "DecodeTimer", FakeTimer)
  (r,) = bench.decode_latencies([("koopman_attn", 8)], "tiny", reps=3, rounds=2)
  # the median of all six steps (not the median of the round medians, 3 ms)
  assert r["ms_per_token"] == pytest.approx(4.5) and r["ms_min"] == pytest.approx(1.0)
  assert r["ms_round_medians"] == pytest.approx([1.0, 5.0])


def test_decode_timer_keeps_to_its_capacity():
  timer = bench.DecodeTimer("koopman_attn", "tiny", 8, capacity=3, warmup=1, vocab_size=257)
  assert timer.max_len == 8 + 1 + 3
  assert len(timer.time_steps(2)) == 2
  with pytest.raises(ValueError, match="2 more steps exceed the timer's capacity \\(1 left\\)"):
    timer.time_steps(2)
  with pytest.raises(ValueError, match="context, capacity and warmup must be >= 1"):
    bench.DecodeTimer("koopman_attn", "tiny", 8, capacity=0, vocab_size=257)
  with pytest.raises(ValueError, match="reps and rounds must be >= 1"):
    bench.decode_latencies([("koopman_attn", 8)], "tiny", rounds=0, vocab_size=257)


@pytest.mark.parametrize("flag, msg", [("--stages=bogus", "unknown stage 'bogus'; choose from"),
                                       ("--decode_stages=gpt", "unknown stage 'gpt'"),
                                       ("--seq_lens=12,x", "--seq_lens takes integers"),
                                       ("--decode_contexts=0", "positive integers"),
                                       ("--steps=0", "must be >= 1"),
                                       ("--decode_rounds=0", "--decode_rounds must be >= 1"),
                                       ("--preset=huge", "unknown preset 'huge'"),
                                       ("--override=attn_pallas_design=fastest",
                                        "unknown attn_pallas_design 'fastest'"),
                                       ("--override=d_modle=8", "unknown ModelConfig override"),
                                       ("--override=d_model", "expects name=value")])
def test_bad_flags_exit_nonzero(tmp_path, capsys, flag, msg):
  assert bench_train.run(["bench_train", f"--out={tmp_path / 'x.json'}", flag]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and msg in err[0], err
  assert not (tmp_path / "x.json").exists()


def test_output_folder_is_checked_before_timing(tmp_path, capsys):
  assert bench_train.run(["bench_train", f"--out={tmp_path}", "--stages=koopman_attn"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"--out={tmp_path} is a folder" in err[0], err


def test_train_rows_take_model_overrides():
  overrides = {"d_model": 16, "attn_pallas_design": "bv64_w8_s3_chunkbwd"}
  r = bench.train_throughput("koopman_attn", "tiny", 16, batch_size=2, steps=1, vocab_size=257,
                             overrides=overrides)

  def n_params(**kw):  # from the shapes alone: no second train step to compile
    model = build_model(get_config("koopman_attn", "tiny", vocab_size=257, **kw))
    return count_params(jax.eval_shape(lambda: init_variables(model, 0, 16))[0])
  # the row's model is the overridden one, smaller than the preset's
  assert r["seq_len"] == 16 and r["batch_size"] == 2
  assert r["params"] == n_params(**overrides) < n_params()
  _check_train_row(r)
  md = bench.as_markdown([r], [], {}, "cpu", "today", None,
                         {"attn_pallas_design": "bv64_w8_s3_chunkbwd"})
  assert md.splitlines()[0] == ("device: cpu; date: today; train overrides: "
                                "attn_pallas_design=bv64_w8_s3_chunkbwd")
