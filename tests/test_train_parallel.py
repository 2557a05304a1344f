"""Data parallelism on 4 fake CPU devices matches one device (subprocess: XLA_FLAGS
must be set before jax initialises)."""

import json
import subprocess
import sys
import textwrap

import pytest

from qsf_jax.data.synthetic import synthetic_stories
from test_train_resume import REPO, subprocess_env

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from qsf_jax.training.config import TrainConfig
    from qsf_jax.training.loop import train_and_evaluate
    from qsf_jax.training.checkpoint import Checkpointer
    from qsf_jax.training.errors import TrainConfigError
    data, root = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 4, jax.devices()
    base = dict(stage="koopman", preset="tiny", data=data, tokenizer="bytes", steps=4,
                batch_size=8, checkpoint_every=0, eval_every=0, eval_batches=2,
                log_every=1, sample_tokens=0)
    out = {}
    for name, devices, accum in (("one", jax.devices()[:1], 1), ("four", None, 1),
                                 ("four_accum", None, 2)):
      cfg = TrainConfig(grad_accum=accum, **base)
      res = train_and_evaluate(cfg, f"{root}/{name}", devices=devices)
      c = Checkpointer(f"{root}/{name}", read_only=True)
      params, _ = c.restore_params()
      meta = c.meta()
      c.close()
      out[name] = {"val_loss": res.eval["val_loss"], "loss": res.loss,
                   "devices": meta["num_devices"], "grad_accum": meta["grad_accum"],
                   "leaves": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(params)]}
    # a 1-device run evaluated on 4 devices (its arrays were stored on one), and a
    # batch of 6 rows, which 4 devices do not divide
    from qsf_jax.training.evaluation import evaluate_workdir
    out["one_on_four"] = evaluate_workdir(f"{root}/one", max_batches=2)
    out["one_on_four_b6"] = evaluate_workdir(f"{root}/one", max_batches=2, batch_size=6)
    try:  # 12 rows cannot be split into 2 micro-batches over 4 devices
      train_and_evaluate(TrainConfig(**dict(base, batch_size=12, grad_accum=2)), f"{root}/bad")
      out["bad"] = "accepted"
    except TrainConfigError as e:
      out["bad"] = str(e)
    print("RESULT", json.dumps(out))
""")


LOAD_ON_ONE = textwrap.dedent("""
    import json, sys
    import jax
    from qsf_jax.training.evaluation import evaluate_workdir
    from qsf_jax.training.sampling import sample_workdir
    root = sys.argv[1]
    assert jax.device_count() == 1, jax.devices()
    out = {"four_on_one": evaluate_workdir(f"{root}/four", max_batches=2),
           "one_b6": evaluate_workdir(f"{root}/one", max_batches=2, batch_size=6),
           "sample": sample_workdir(f"{root}/four", "Once", max_new_tokens=4,
                                    temperature=0.0)}
    print("RESULT", json.dumps(out))
""")


def _result(p):
  assert p.returncode == 0, p.stderr[-4000:]
  line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_four_fake_devices_match_one(tmp_path):
  import numpy as np
  data = tmp_path / "stories.txt"
  data.write_text("\n<|endoftext|>\n".join(synthetic_stories(120, seed=9)))
  env = subprocess_env(tmp_path)
  flags = env.get("XLA_FLAGS", "")
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
  p = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(tmp_path)], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  out = _result(p)
  one = out["one"]
  assert (one["devices"], out["four"]["devices"], out["four_accum"]["devices"]) == (1, 4, 4)
  assert out["four_accum"]["grad_accum"] == 2
  for name in ("four", "four_accum"):
    other = out[name]
    assert other["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert other["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    for a, b in zip(one["leaves"], other["leaves"]):
      np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-6)
  assert "divisible by the number of devices (4) x --grad_accum (2) = 8" in out["bad"]
  assert not (tmp_path / "bad").exists()
  # Checkpoints load on another device count: a 4-device run on 1 device (orbax refused
  # the stored topology, reported as a damaged checkpoint), a 1-device run on 4 (its
  # arrays stayed on device 0 while the batch was sharded over 4). Evaluation keeps the
  # rows per batch on any device count (6 rows were cut to 4 on 4 devices).
  env["XLA_FLAGS"] = flags
  p = subprocess.run([sys.executable, "-c", LOAD_ON_ONE, str(tmp_path)], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  on_one = _result(p)
  assert on_one["four_on_one"]["val_loss"] == pytest.approx(out["four"]["val_loss"], rel=1e-5)
  assert out["one_on_four"]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
  b6_four, b6_one = out["one_on_four_b6"], on_one["one_b6"]
  assert b6_four["batch_size"] == b6_one["batch_size"] == 6
  assert b6_four["tokens"] == b6_one["tokens"]
  assert b6_four["val_loss"] == pytest.approx(b6_one["val_loss"], rel=1e-5)
  assert isinstance(on_one["sample"], str) and on_one["sample"]


def test_shard_batch_splits_micro_batches_into_consecutive_rows():
  """grad_accum = A: micro-batch a holds rows a*B/A ... (a+1)*B/A - 1 (the documented
  layout; it fixes the order in which the micro-batches update the D5 norm statistics)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from qsf_jax.training import sharding as shd  # pylint: disable=import-outside-toplevel
  mesh = shd.make_mesh(jax.devices()[:1])
  x = np.arange(6 * 3, dtype=np.int32).reshape(6, 3)
  out = shd.shard_batch({"inputs": x}, mesh, grad_accum=2)["inputs"]
  np.testing.assert_array_equal(np.asarray(out), x.reshape(2, 3, 3))
  np.testing.assert_array_equal(np.asarray(shd.shard_batch({"inputs": x}, mesh)["inputs"]), x)


def test_multi_host_flags_are_all_or_none(monkeypatch):
  from absl import logging  # pylint: disable=import-outside-toplevel
  from qsf_jax.training import sharding as shd  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.errors import TrainConfigError  # pylint: disable=import-outside-toplevel
  with pytest.raises(TrainConfigError, match="needs all of --coordinator_address"):
    shd.maybe_initialize_distributed("host:1234", 2, None)
  with pytest.raises(TrainConfigError, match=r"--process_id must be in \[0, 2\), got 2"):
    shd.maybe_initialize_distributed("host:1234", 2, 2)
  warned = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warned.append(msg % a))
  for name in shd.LAUNCHER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  assert shd.maybe_initialize_distributed(None, None, None) is False and warned == []
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert shd.maybe_initialize_distributed(None, None, None) is False and warned == []
  # a launcher started 4 processes, each of which would train alone into one workdir
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert shd.maybe_initialize_distributed(None, None, None) is False
  assert len(warned) == 1 and "SLURM_NTASKS=4 says 4 processes were launched" in warned[0]


def test_mesh_devices_are_checked():
  import jax  # pylint: disable=import-outside-toplevel
  from qsf_jax.training import sharding as shd  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.errors import TrainConfigError  # pylint: disable=import-outside-toplevel
  with pytest.raises(TrainConfigError, match="at least one device"):
    shd.make_mesh([])
  d = jax.devices()[0]
  with pytest.raises(TrainConfigError, match="must be distinct"):
    shd.make_mesh([d, d])


def test_eval_batches_pad_to_the_device_count(monkeypatch):
  """6 rows on a mesh of 4 would not split; the 2 added rows are masked copies."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from qsf_jax.training import sharding as shd  # pylint: disable=import-outside-toplevel
  mesh = shd.make_mesh(jax.devices()[:1])
  batch = {"inputs": np.arange(12, dtype=np.int32).reshape(6, 2),
           "mask": np.ones((6, 2), np.float32)}
  out = shd.shard_eval_batch(batch, mesh)  # one device: nothing to add
  assert out["inputs"].shape == (6, 2)

  class Four:  # the padding rule alone, on a stand-in mesh of 4 devices
    devices = np.zeros(4)
  monkeypatch.setattr(shd, "shard_batch", lambda b, m: b)
  out = shd.shard_eval_batch(batch, Four())
  assert out["inputs"].shape == (8, 2) and out["mask"].shape == (8, 2)
  np.testing.assert_array_equal(out["inputs"][6:], np.repeat(batch["inputs"][-1:], 2, 0))
  assert out["mask"][:6].all() and not out["mask"][6:].any()
  assert batch["mask"].all()  # the caller's batch is not changed
