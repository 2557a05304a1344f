"""Exact resume after SIGKILL and graceful SIGTERM, with real subprocesses (tiny preset)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from qsf_jax.data.synthetic import synthetic_stories
from qsf_jax.training import checkpoint as ck

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs experiments.train's own flag parsing and config, then trains with a
# callback that SIGKILLs the process at step KILL_AT, once checkpoint CKPT is
# committed (orbax renames the finished checkpoint into place last).
KILLER = textwrap.dedent("""
    import os, pathlib, signal, sys, time
    from absl import flags
    from experiments import train as T
    from qsf_jax.training.loop import train_and_evaluate
    kill_at, ckpt_step, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    fv = flags.FlagValues(); T.define_flags(fv); fv(["train"] + argv)
    done = pathlib.Path(fv.workdir) / "checkpoints" / str(ckpt_step)
    def cb(step, metrics):
      if step == kill_at:
        deadline = time.time() + 120
        while not done.is_dir() and time.time() < deadline:
          time.sleep(0.05)
        print("killing at step", step, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    train_and_evaluate(T.config_from_flags(fv), fv.workdir, step_callback=cb)
""")


# Trains with a callback that sends this process SIGINT at step STOP_AT: the stop
# comes after the loop decided whether to checkpoint (as Ctrl-C during a metrics
# read or an evaluation does), so the loop must save on its way out.
INTERRUPTER = textwrap.dedent("""
    import os, signal, sys
    from absl import flags
    from experiments import train as T
    from qsf_jax.training.loop import train_and_evaluate
    stop_at, argv = int(sys.argv[1]), sys.argv[2:]
    fv = flags.FlagValues(); T.define_flags(fv); fv(["train"] + argv)
    def cb(step, metrics):
      if step == stop_at:
        os.kill(os.getpid(), signal.SIGINT)
    r = train_and_evaluate(T.config_from_flags(fv), fv.workdir, step_callback=cb)
    print("result", r.step, r.interrupted, flush=True)
""")


def subprocess_env(tmp, compile_cache=None):
  """Environment of the child processes: CPU, offline, fast compiles.

  ``compile_cache`` (a folder shared by the children of one pytest run)
  enables JAX's persistent compilation cache, so a child whose computation
  another child already compiled loads the executable instead.
  """
  # XLA_FLAGS is inherited: the test processes' compile flags (tests/conftest.py).
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1", QSF_CACHE_DIR=str(tmp / "cache"),
             PYTHONUNBUFFERED="1")
  if compile_cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def compile_cache_dir(tmp_path_factory):
  """One persistent-compilation-cache folder per pytest run."""
  return tmp_path_factory.getbasetemp() / "qsf_jax_compile_cache"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  path = root / "stories.txt"
  path.write_text("\n<|endoftext|>\n".join(synthetic_stories(200, seed=5)))
  return root, path, compile_cache_dir(tmp_path_factory)


def _flags(path, wd, **kw):
  f = dict(stage="koopman_attn", preset="tiny", data=path, tokenizer="bytes", workdir=wd,
           steps=8, batch_size=8, checkpoint_every=4, eval_every=0, eval_batches=1,
           log_every=1, sample_tokens=0)
  f.update(kw)
  return [f"--{k}={v}" for k, v in f.items()]


def _run(args, env, timeout=240):
  return subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _final_state(wd):
  c = ck.Checkpointer(wd, read_only=True)
  step = c.latest_step()
  params, coll = c.restore_params(step)
  c.close()
  return step, params, coll


def _train_losses(wd):
  return {r["step"]: r["loss"] for r in map(json.loads, (wd / "metrics.jsonl").read_text()
                                            .splitlines()) if r["kind"] == "train"}


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(corpus):
  """2N steps uninterrupted == N steps, SIGKILL, resume to 2N (bitwise on CPU)."""
  root, path, cache = corpus
  env = subprocess_env(root, cache)
  wd_a, wd_b = root / "straight", root / "killed"
  a = _run(["-m", "experiments.train"] + _flags(path, wd_a), env)
  assert a.returncode == 0, a.stderr[-3000:]
  b = _run(["-c", KILLER, "6", "4"] + _flags(path, wd_b), env)
  assert b.returncode == -signal.SIGKILL, (b.returncode, b.stderr[-3000:])
  assert "killing at step 6" in b.stdout
  assert ck.Checkpointer(wd_b, read_only=True).latest_step() == 4
  c = _run(["-m", "experiments.train"] + _flags(path, wd_b), env)  # the same command
  assert c.returncode == 0, c.stderr[-3000:]
  assert "resumed from step 4" in c.stdout
  assert "training koopman_attn/tiny from step 4 to 8 in" in c.stdout, c.stdout
  assert "training koopman_attn/tiny for 8 steps in" in a.stdout, a.stdout
  # D5: beta ramps over the last 15% of the 8 steps: 0 at step 6.8, 1 at step 8
  assert "LayerNorm -> linear scaling from step 7 to 8;" in a.stdout, a.stdout

  step_a, params_a, coll_a = _final_state(wd_a)
  step_c, params_c, coll_c = _final_state(wd_b)
  assert step_a == step_c == 8
  import jax
  la, ta = jax.tree.flatten((params_a, coll_a))
  lc, tc = jax.tree.flatten((params_c, coll_c))
  assert ta == tc
  for x, y in zip(la, lc):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The resumed run replays steps 5-8 with the same losses.
  losses_a, losses_b = _train_losses(wd_a), _train_losses(wd_b)
  assert all(losses_a[s] == losses_b[s] for s in range(1, 9))
  # ... and logs them once: the killed run's records of steps 5-6 were dropped
  logged = [(r["step"], r["kind"]) for r in map(json.loads, (wd_b / "metrics.jsonl")
                                                 .read_text().splitlines())]
  assert logged == [(r["step"], r["kind"]) for r in map(
      json.loads, (wd_a / "metrics.jsonl").read_text().splitlines())]
  # D5: the norm statistics were collected in the window [0, floor(0.85 * 8)) = [0, 6)
  counts = [np.asarray(v) for k, v in ck_flat(coll_a).items() if k.endswith("count")]
  assert counts and all(np.all(c == 6) for c in counts)
  # An earlier checkpoint loads with its own step's anneal weight (D5: beta is 0 until
  # step 6.8), and the run's last evaluation (step 8, beta 1) is the one evaluate gives.
  from qsf_jax.training.evaluation import evaluate_workdir  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.restore import load_run  # pylint: disable=import-outside-toplevel
  run4 = load_run(wd_a, step=4)
  assert (run4.step, run4.beta, load_run(wd_a).beta) == (4, 0.0, 1.0)
  (last_eval,) = [r for r in map(json.loads, (wd_a / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "eval"]
  ev = evaluate_workdir(wd_a, max_batches=1, cache_dir=str(root / "cache"))
  assert last_eval["step"] == 8
  assert last_eval["val_loss"] == pytest.approx(ev["val_loss"], rel=1e-5)


def ck_flat(tree):
  from qsf_jax.training.progressive import flatten_named
  return flatten_named(tree)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(corpus):
  root, path, cache = corpus
  env = subprocess_env(root, cache)
  wd = root / "term"
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.train"]
      + _flags(path, wd, steps=100000, checkpoint_every=0, stage="koopman"),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    metrics = wd / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        break
      time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, err[-3000:]  # stopped early, as experiments.progressive
  assert "Traceback" not in err
  assert "SIGTERM received: stopped at step" in out
  stopped = int(out.split("stopped at step ")[1].split(",")[0])
  assert 3 <= stopped < 100000
  c = ck.Checkpointer(wd, read_only=True)
  assert c.latest_step() == stopped
  c.close()


@pytest.mark.slow
def test_a_stop_after_the_save_decision_still_saves(corpus):
  root, path, cache = corpus
  env = subprocess_env(root, cache)
  wd = root / "late_stop"
  r = _run(["-c", INTERRUPTER, "3"] + _flags(path, wd, checkpoint_every=0), env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "result 3 True" in r.stdout and "SIGINT received: stopped at step 3" in r.stdout
  c = ck.Checkpointer(wd, read_only=True)
  assert c.latest_step() == 3  # no periodic checkpoint was due: the stop wrote this one
  c.close()


def test_stop_requested_flags_the_first_signal_and_passes_on_the_second():
  """The first SIGINT/SIGTERM only sets the flag; a second one reaches the handler that
  was installed before (a second Ctrl-C interrupts at once); leaving restores it."""
  from qsf_jax.training.signals import StopRequested  # pylint: disable=import-outside-toplevel
  seen = []
  original = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
  try:
    previous = signal.getsignal(signal.SIGINT)
    with StopRequested() as stop:
      assert not stop.requested
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)  # the handler runs in the main thread between bytecodes
      assert stop.requested and stop.signal_name == "SIGINT" and seen == []
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
      assert seen == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is previous
  finally:
    signal.signal(signal.SIGINT, original)


def test_a_stop_is_agreed_across_processes(monkeypatch):
  """With several processes, one that got SIGTERM used to save (a collective) and leave
  the loop while the others trained on: the stop is now the same on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from qsf_jax.training import loop_helpers  # pylint: disable=import-outside-toplevel
  assert loop_helpers._stop_agreed(False) is False and loop_helpers._stop_agreed(True) is True
  gathered = []

  def allgather(x):  # this process's flag, and another process's that got the signal
    gathered.append(int(x))
    return np.array([int(x), 1], np.int32)
  monkeypatch.setattr(loop_helpers.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  assert loop_helpers._stop_agreed(False) is True and gathered == [0]
