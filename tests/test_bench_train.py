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
              "xla_argument_bytes", "xla_output_bytes", "xla_alias_bytes", "device_peak_bytes",
              "device_peak_is_this_call"}
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
    assert set(r) == DECODE_KEYS and r["max_len"] == r["context"] + 1
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


def test_decode_timer_steps_stay_at_the_context():
  """Every step decodes position C with C tokens cached: the transformer's KV cache is
  C + 1 slots, not C plus the warm-up and timed steps (which grew its work with them)."""
  timer = bench.DecodeTimer("transformer", "tiny", 8, warmup=2, vocab_size=257)
  assert timer.max_len == 9
  assert int(timer._cache["index"]) == 8
  assert len(timer.time_steps(20)) == 20  # more steps than the cache has free slots
  assert int(timer._cache["index"]) == 8
  with pytest.raises(ValueError, match="context and warmup must be >= 1"):
    bench.DecodeTimer("koopman_attn", "tiny", 8, warmup=0, vocab_size=257)
  with pytest.raises(ValueError, match="reps and rounds must be >= 1"):
    bench.decode_latencies([("koopman_attn", 8)], "tiny", rounds=0, vocab_size=257)


def test_device_peak_is_marked_where_an_earlier_row_set_it(monkeypatch):
  """On a GPU the process-wide peak never falls: a short row after a long one showed the
  long row's peak as its own memory. The headline is now XLA's analysis of the row's own
  step, and the peak column says where it is an earlier row's."""
  class Compiled:
    def memory_analysis(self):
      return type("M", (), dict(temp_size_in_bytes=3 << 20, argument_size_in_bytes=2 << 20,
                                output_size_in_bytes=2 << 20, alias_size_in_bytes=1 << 20))()
  monkeypatch.setattr(bench, "device_peak_bytes", lambda: 100 << 20)
  rose, kept = bench.memory_measures(Compiled(), 50 << 20), bench.memory_measures(Compiled(),
                                                                                   100 << 20)
  for m in (rose, kept):
    assert m["memory_bytes"] == 6 << 20 and m["memory_measure"].startswith("XLA memory_analysis")
    assert m["device_peak_bytes"] == 100 << 20
  assert rose["device_peak_is_this_call"] is True and kept["device_peak_is_this_call"] is False
  rows = [dict(stage="gla", seq_len=T, batch_size=1, step_s=1.0, tokens_per_s=T, **m)
          for T, m in ((4096, rose), (256, kept))]
  md = bench.as_markdown(rows, [], {}, "gpu", "today").splitlines()
  assert "| device peak (MiB) |" in md[2]
  assert md[4].endswith("| 6.0 | 100.0 |")
  assert md[5].endswith("| 6.0 | <= 100.0 (earlier row's) |")


def test_json_is_kept_after_each_train_row(tmp_path, monkeypatch, capsys):
  """A failure late in a long run (e.g. out of memory at the largest T) kept no row."""
  calls = []

  def fake(stage, preset, T, **kw):
    calls.append(T)
    if T == 64:
      raise MemoryError("out of memory at T=64")
    return dict(stage=stage, preset=preset, seq_len=T, batch_size=1, step_s=0.5,
                tokens_per_s=2 * T, compile_s=0.1, params=1, memory_bytes=1,
                memory_measure="m")
  monkeypatch.setattr(bench, "train_throughput", fake)
  out = tmp_path / "b.json"
  with pytest.raises(MemoryError):
    bench_train.run(["bench_train", f"--out={out}", "--preset=tiny", "--stages=gla",
                     "--seq_lens=16,32,64", "--decode_stages="])
  assert calls == [16, 32, 64]
  assert [r["seq_len"] for r in json.loads(out.read_text())["train"]] == [16, 32]
  assert not list(tmp_path.glob("*.tmp"))


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
                                       ("--override=vocab_size=100",
                                        "--override=vocab_size=...: the benchmark sets it"),
                                       ("--override=max_seq_len=8", "sets it itself"),
                                       ("--override=d_model", "expects name=value")])
def test_bad_flags_exit_nonzero(tmp_path, capsys, flag, msg):
  assert bench_train.run(["bench_train", f"--out={tmp_path / 'x.json'}", flag]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and msg in err[0], err
  assert not (tmp_path / "x.json").exists()


def test_overrides_without_train_rows_are_refused(tmp_path, capsys):
  # they were never validated then, and the header listed them as applied
  assert bench_train.run(["bench_train", f"--out={tmp_path / 'x.json'}", "--stages=",
                          "--override=attn_pallas_design=bogus"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--stages is empty" in err[0], err


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


def test_library_refuses_overrides_it_would_replace():
  with pytest.raises(ValueError, match="--override=max_seq_len=...: the benchmark sets it"):
    bench.train_throughput("gla", "tiny", 16, steps=1, vocab_size=257,
                           overrides={"max_seq_len": 8})
