"""The GPU suite runner: its plan is valid for the tools it calls, and its budget,
dependencies, timeouts and summary work (with small stand-in steps on the CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qsf_jax.kernels import bench, gpu_check, gpu_suite, report, suite_runner
from qsf_jax.kernels.suite_runner import Step


@pytest.mark.parametrize("step", [s for s in gpu_suite.PLAN if s.argv[0] == "-m"],
                         ids=lambda s: s.name)
def test_plan_steps_parse_with_their_tools(step, tmp_path):
  """Every flag and config name in the plan is accepted by the tool it runs
  (a typo would otherwise surface only on a GPU)."""
  tool = {"qsf_jax.kernels.bench": bench, "qsf_jax.kernels.gpu_check": gpu_check}[step.argv[1]]
  cmd = suite_runner.step_command(step, str(tmp_path))
  assert cmd[0] == sys.executable and "{out}" not in " ".join(cmd)
  parser = tool.build_parser()
  tool.check_args(parser, parser.parse_args(cmd[3:]))
  for arg in cmd:  # every output lands in the suite's folder
    if arg.startswith("--out="):
      assert arg == f"--out={tmp_path}/{step.name}.json"


def test_plan_order_and_needs():
  names = [s.name for s in gpu_suite.PLAN]
  assert names[:3] == ["env", "check", "goals"]  # what the kernels are judged on, first
  for i, s in enumerate(gpu_suite.PLAN):
    assert set(s.needs) <= set(names[:i])
  assert all(s.needs == ("check",) for s in gpu_suite.PLAN if "--out=" in " ".join(s.argv))
  # Goals 1-2 are judged only on device time (goals module): the goals step times with CUPTI.
  goals = next(s for s in gpu_suite.PLAN if s.name == "goals")
  assert "--timing=cupti" in goals.argv and "--goals" in goals.argv


def test_every_timed_design_has_its_values_checked():
  """A design is timed only after gpu_check compared its values with the reference:
  the default in the "check" step, every other design in "check_designs"."""
  from qsf_jax.kernels.designs import DEFAULT_DESIGN
  timed = gpu_suite.DESIGNS.split(",")
  checked = gpu_suite.CHECKED_DESIGNS.split(",")
  assert gpu_suite.DEFAULT in timed
  assert len(set(checked)) == len(checked) == len(timed) - 1
  assert set(timed) - set(checked) == {f"c64_{DEFAULT_DESIGN}"}
  # without decay a _pairs design is its base design: the no-decay step leaves it out
  no_decay = next(s for s in gpu_suite.PLAN if s.name == "no_decay")
  configs = next(a for a in no_decay.argv if a.startswith("--configs=")).split("=")[1].split(",")
  assert configs == [d for d in timed if not d.endswith("_pairs")] and len(configs) < len(timed)


def test_main_exit_status_says_whether_every_step_ended_well(monkeypatch, tmp_path):
  # A step that failed or was cut off by its limit makes the suite exit 1; skipped steps do not.
  monkeypatch.setattr(gpu_suite.signal, "signal", lambda *a: None)  # keep pytest's SIGTERM
  for statuses, rc in ((("passed", "skipped"), 0), (("passed", "timed_out"), 1),
                       (("failed", "passed"), 1)):
    summary = dict(started="s", finished="f", budget_s=None, commit=None,
                   steps=[dict(name=f"s{i}", status=st, rc=None, wall_s=0.0, limit_s=None,
                               reason=None, outputs=[]) for i, st in enumerate(statuses)])
    monkeypatch.setattr(gpu_suite, "run_suite", lambda *a, summary=summary: summary)
    assert gpu_suite.main([f"--out={tmp_path}"]) == rc


def test_gpu_check_passes_every_design_keyword(monkeypatch):
  # check_case must run the candidate it names: a keyword it drops (decay_grad,
  # split_sweeps, ...) would check the default form instead.
  seen = []

  class Seen(Exception):
    pass

  def spy(*args, **kw):
    seen.append(kw)
    raise Seen

  monkeypatch.setattr(gpu_check, "pallas_linear_attention", spy)
  for name in ("c64_bv64_w4_s2_pairs", "c64_bv64_w8_s3_chunkbwd_pairs",
               "c64_bv64_w8_s3_chunkbwd_split"):
    kw = gpu_check.PALLAS_CONFIGS[name].kwargs()
    with pytest.raises(Seen):
      gpu_check.check_case(1, 16, 1, 16, 16, "float32", "medium", interpret=True,
                           chunk=kw["chunk_size"], **{n: v for n, v in kw.items()
                                                      if n != "chunk_size"})
    want = dict(kw, return_final_state=True, interpret=True)
    assert {n: seen[-1].get(n) for n in want} == want, name


def test_tools_reject_bad_flags():
  for tool, argv in ((bench, ["--configs=c64_nope"]), (bench, ["--modes=fwd,bwd"]),
                     (bench, ["--impls=pallas,cudnn"]), (bench, ["--T=4096,x"]),
                     (bench, ["--dtype=bf17"]), (gpu_check, ["--configs=c64_nope"])):
    parser = tool.build_parser()
    with pytest.raises(SystemExit):
      tool.check_args(parser, parser.parse_args(argv))


def _py(code):
  return ("-c", code)


def test_run_suite_statuses_needs_and_outputs(tmp_path, capsys):
  steps = (
      Step("ok", _py("print('hello from ok')"), 30),
      Step("writes", _py("import sys; open(sys.argv[1].split('=')[1], 'w').write('{}')")
           + ("--out={out}/writes.json",), 30, ("ok",)),
      Step("fails", _py("import sys; print('broken'); sys.exit(3)"), 30),
      Step("after_fail", _py("print('never')"), 30, ("fails",)),
      Step("after_ok", _py("print('runs')"), 30, ("ok",)),
      Step("stale", _py("import sys; sys.exit(1)") + ("--out={out}/stale.json",), 30),
  )
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "stale.json").write_text("{}")  # left by an earlier run
  os.utime(tmp_path / "out" / "stale.json", (time.time() - 3600,) * 2)
  summary = suite_runner.run_suite(str(tmp_path / "out"), steps)
  got = {r["name"]: r for r in summary["steps"]}
  assert [r["status"] for r in summary["steps"]] == [
      "passed", "passed", "failed", "skipped", "passed", "failed"]
  assert got["stale"]["outputs"] == []  # not written by this run
  assert got["fails"]["rc"] == 3
  assert got["writes"]["outputs"] == [str(tmp_path / "out" / "writes.json")]
  assert "fails" in got["after_fail"]["reason"] and got["after_ok"]["limit_s"] is None
  log = (tmp_path / "out" / "suite.log").read_text()
  assert "hello from ok" in log and "broken" in log and "never" not in log
  assert "hello from ok" in capsys.readouterr().out  # streamed to the console too
  on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert on_disk["finished"] is not None and on_disk["steps"] == summary["steps"]
  table = suite_runner.markdown(summary)
  assert "| after_fail | skipped |" in table and "writes.json" in table


def test_run_suite_cuts_off_a_step_and_respects_the_budget(tmp_path, monkeypatch):
  monkeypatch.setattr(suite_runner, "MIN_STEP_S", 1.0)
  steps = (
      Step("slow", _py("import time; print('started', flush=True); time.sleep(60)"), 1.5),
      Step("needs_slow", _py("print('x')"), 30, ("slow",)),
      Step("eats_budget", _py("import time; time.sleep(60)"), 30),
      Step("late", _py("print('late')"), 30),
  )
  summary = suite_runner.run_suite(str(tmp_path), steps, budget_s=3.5)
  got = {r["name"]: r for r in summary["steps"]}
  assert got["slow"]["status"] == "timed_out" and got["slow"]["wall_s"] < 15
  assert got["slow"]["limit_s"] == 1.5
  assert got["needs_slow"]["status"] == "skipped" and "timed_out" in got["needs_slow"]["reason"]
  # the third step gets what is left of the budget (about 2 s), then nothing is left
  assert got["eats_budget"]["status"] == "timed_out" and got["eats_budget"]["limit_s"] < 2.5
  assert got["late"]["status"] == "skipped" and got["late"]["reason"].startswith("budget")
  assert "started" in (tmp_path / "suite.log").read_text()


def test_main_lists_selects_and_rejects(tmp_path, capsys):
  assert gpu_suite.main(["--list", "--steps=goals,check"]) == 0
  out = capsys.readouterr().out
  assert out.index("check:") < out.index("goals:") and "designs" not in out
  for bad in (["--steps=check,nope"], ["--steps=,"], ["--budget_s=0", "--out=x"],
              ["--steps=check"], [f"--out={tmp_path / 'f'}", "--steps=env"]):
    if bad[0].startswith("--out"):
      (tmp_path / "f").write_text("a file, not a folder")
    with pytest.raises(SystemExit):
      gpu_suite.main(bad)
  assert (tmp_path / "f").read_text() == "a file, not a folder"  # left as it was
  with pytest.raises(ValueError, match="unique"):
    suite_runner.run_suite(str(tmp_path / "o"), (Step("a", _py("1"), 1), Step("a", _py("1"), 1)))


def test_sigterm_stops_the_running_step_and_records_it(tmp_path):
  """A suite stopped from outside (SIGTERM) leaves no step process running."""
  pid_file = tmp_path / "child.pid"
  step = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
  script = "\n".join([
      "import sys",
      "from qsf_jax.kernels import gpu_suite as g",
      f"g.PLAN = (g.Step('sleepy', ('-c', {step!r}), 300),)",
      f"sys.exit(g.main(['--out={tmp_path / 'out'}']))"])
  suite = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 60
  while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
    assert suite.poll() is None, suite.communicate()[0]
    time.sleep(0.05)
  child = int(pid_file.read_text())
  suite.send_signal(signal.SIGTERM)
  out, _ = suite.communicate(timeout=30)
  assert suite.returncode == 130, out
  with pytest.raises(ProcessLookupError):  # the step was stopped with the suite
    for _ in range(100):
      os.kill(child, 0)
      time.sleep(0.05)
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert [r["status"] for r in summary["steps"]] == ["interrupted"]


def test_report_renders_a_finished_run_from_anywhere(tmp_path, capsys, monkeypatch):
  """--report rebuilds the markdown of a run from its folder, also after a move."""
  # The step's process inherits this: its programs compile several times faster without
  # XLA's heavy passes, and this checks its rows and the report, not its times.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  step = Step("goals", ("-m", "qsf_jax.kernels.bench", "--goals", "--T=32", "--D=16",
                        "--modes=fwd", "--impls=xla", "--out={out}/goals.json"), 120)
  run_dir = tmp_path / "run"
  summary = suite_runner.run_suite(str(run_dir), (step,))
  assert summary["steps"][0]["status"] == "passed", (run_dir / "suite.log").read_text()
  moved = tmp_path / "fetched"
  run_dir.rename(moved)
  assert gpu_suite.main([f"--report={moved}"]) == 0
  text = capsys.readouterr().out
  assert "| goals | passed |" in text and "### goals" in text
  assert "| xla | fwd | 32 | 16 |" in text
  assert "judged on c64_bv64_w4_s2" in text and "| unmeasured |" in text  # no Pallas on CPU
  assert "PARTIAL" not in text
  data = json.loads((moved / "goals.json").read_text())
  assert "PARTIAL" in report.results_markdown(dict(data, partial=True))
  # bad folders and files: a clear error, nothing written
  with pytest.raises(ValueError, match="cannot read"):
    suite_runner.report(str(tmp_path / "nowhere"))
  (moved / "goals.json").write_text('{"rows": []}')
  with pytest.raises(ValueError, match="not a benchmark JSON"):
    suite_runner.report(str(moved))
  (moved / "goals.json").unlink()
  with pytest.raises(ValueError, match="cannot read .*goals.json"):
    suite_runner.report(str(moved))
  with pytest.raises(SystemExit):
    gpu_suite.main([f"--report={tmp_path / 'nowhere'}"])
