"""The Pallas kernels under data parallelism (batch and heads sharded) and vmap.

A ``pallas_call`` is opaque to XLA's partitioner; without ``kernels.partitioning``
XLA gathers the sharded inputs and every device computes the whole batch (in
interpret mode: 70 all-gathers and replicated outputs in the case below). The
sharded case runs in a subprocess on 4 fake CPU devices (XLA_FLAGS must be set
before jax initialises).
"""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsf_jax.kernels import partitioning
from qsf_jax.kernels.pallas_op import pallas_linear_attention
from qsf_jax.kernels.testing import random_inputs
from test_train_resume import REPO, subprocess_env

# Interpret mode is a test device, not what users run: its programs compile several
# times faster without XLA's heavy passes (the `fast_compiles` fixture).
pytestmark = pytest.mark.usefixtures("fast_compiles")

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from qsf_jax.kernels import pallas_op
    from qsf_jax.kernels.pallas_op import pallas_linear_attention
    assert jax.device_count() == 4, jax.devices()
    seen = []
    def spy(name, fn):
      def wrapped(q, *a, **kw):
        seen.append([name, list(q.shape)])
        return fn(q, *a, **kw)
      return wrapped
    for name in ("fwd_call_fused", "bwd_call_fused", "fwd_call_chunked", "bwd_call_chunked"):
      setattr(pallas_op, name, spy(name, getattr(pallas_op, name)))
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    B, T, H, D = 4, 40, 2, 16
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(kk, (B, T, H, D)) * 0.3 for kk in ks[:3])
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)))
    h0 = jax.random.normal(ks[4], (B, H, D, D)) * 0.1
    spec = {4: P("data", None, "model", None), 3: P("data", None, "model"),
            "state": P("data", "model")}
    out = {}
    for case, kw, decay, state in (
        ("fused", {}, True, True),
        ("chunked_no_decay", dict(forward="chunked", backward="chunked"), False, False),
        ("segments", dict(num_segments=2), True, True)):
      def loss(q, k, v, g, h0, kw=kw, decay=decay, state=state):
        o, S = pallas_linear_attention(q, k, v, g if decay else None, h0 if state else None,
                                       chunk_size=16, interpret=True,
                                       return_final_state=state, **kw)
        return jnp.sum(o * o) + (jnp.sum(S * S) if state else 0.0)
      f = jax.jit(jax.value_and_grad(loss, argnums=range(5)))
      ref = f(q, k, v, g, h0)
      seen.clear()
      args = [jax.device_put(x, NamedSharding(mesh, spec["state" if x is h0 else x.ndim]))
              for x in (q, k, v, g, h0)]
      compiled = f.lower(*args).compile()
      got = compiled(*args)
      out[case] = {
          "seen": list(seen),
          "grads_equal": [bool(np.array_equal(a, b)) for a, b in zip(got[1], ref[1])],
          "grads_rel": [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                        for a, b in zip(got[1], ref[1])],
          "loss_rel": abs(float(got[0]) - float(ref[0])) / abs(float(ref[0])),
          "grad_specs": [list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
                         for x in got[1]],
          "all_gathers": compiled.as_text().count("all-gather"),
      }
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_sharded_batch_and_heads_run_per_device(tmp_path):
  env = subprocess_env(tmp_path)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
  res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  local = [2, 48, 1, 16]  # B/2 rows and H/2 heads per device; T padded to 48, D whole
  kernels = {"fused": ["fwd_call_fused", "bwd_call_fused"],
             "chunked_no_decay": ["fwd_call_chunked", "bwd_call_chunked"]}
  for case, names in kernels.items():
    r = out[case]
    # traced once on global shapes (jit's abstract pass), then per device on local ones
    assert [name for name, shape in r["seen"] if shape == local] == names, r["seen"]
    assert r["all_gathers"] == 0, r
  for case in kernels:
    assert all(out[case]["grads_equal"]), out[case]  # each device runs the same kernels
  # The segments' XLA state passing runs on local shapes too (float32 rounding), and
  # the scalar loss is summed across devices.
  assert max(out["segments"]["grads_rel"]) < 1e-6, out["segments"]
  for case, r in out.items():
    assert r["loss_rel"] < 1e-5, (case, r)
  assert out["fused"]["grad_specs"] == [["data", None, "model", None]] * 3 + [
      ["data", None, "model"], ["data", "model", None, None]]


def test_vmap_folds_into_the_batch():
  q, k, v, g, h0 = random_inputs(3, 2, 40, 2, 16, 16, gate="medium")
  f = lambda q, k, v, g: pallas_linear_attention(q, k, v, g, chunk_size=16, interpret=True)[0]
  qe, ge = jnp.stack([q, 0.5 * q, -q]), jnp.stack([g, g, 0.5 * g])
  got = jax.vmap(f, in_axes=(0, None, None, 0))(qe, k, v, ge)
  # The rows share one shape: each per-row function is compiled once, not per row.
  f_row = jax.jit(f)
  want = jnp.stack([f_row(qe[i], k, v, ge[i]) for i in range(3)])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  loss = lambda qe, ge: jnp.sum(jax.vmap(f, in_axes=(0, None, None, 0))(qe, k, v, ge) ** 2)
  dq, dg = jax.grad(loss, argnums=(0, 1))(qe, ge)
  grad_row = jax.jit(jax.grad(lambda q, g: jnp.sum(f(q, k, v, g) ** 2), argnums=(0, 1)))
  for i in range(3):
    dqi, dgi = grad_row(qe[i], ge[i])
    np.testing.assert_allclose(np.asarray(dq[i]), np.asarray(dqi), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dg[i]), np.asarray(dgi), rtol=1e-6, atol=1e-6)


def test_operand_shardings_follow_the_first_operand():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  first = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "model"))
  ins, outs = partitioning.operand_shardings(mesh, first, ["b t h k", "b t h", "b h k v"],
                                             ["b t h v"])
  assert [tuple(s.spec) for s in ins] == [("data", None, "model", None),
                                          ("data", None, "model"), ("data", "model", None, None)]
  assert [tuple(s.spec) for s in outs] == [("data", None, "model", None)]
  with pytest.raises(ValueError, match="factor strings"):
    partitioning.batch_head_partitioned(lambda x: (x,), ["t b h k"], ["b t h k"])
