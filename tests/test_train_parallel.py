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
    try:  # 12 rows cannot be split into 2 micro-batches over 4 devices
      train_and_evaluate(TrainConfig(**dict(base, batch_size=12, grad_accum=2)), f"{root}/bad")
      out["bad"] = "accepted"
    except TrainConfigError as e:
      out["bad"] = str(e)
    print("RESULT", json.dumps(out))
""")


@pytest.mark.slow
def test_four_fake_devices_match_one(tmp_path):
  import numpy as np
  data = tmp_path / "stories.txt"
  data.write_text("\n<|endoftext|>\n".join(synthetic_stories(120, seed=9)))
  env = subprocess_env(tmp_path)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  p = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(tmp_path)], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-4000:]
  line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
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
