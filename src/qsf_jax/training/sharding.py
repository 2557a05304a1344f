"""Data parallelism: a 1-D ``("data",)`` mesh, replicated state, sharded batches.

Every process computes the same global batch (a pure function of
``(seed, step)``) and contributes the rows that belong to its local devices,
so single-host and multi-host runs see identical data. Parameters and
optimizer state are replicated; XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qsf_jax.training.errors import TrainConfigError

DATA_AXIS = "data"


def maybe_initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                                 process_id: int | None) -> bool:
  """Calls ``jax.distributed.initialize`` when multi-host flags are given.

  Args:
    coordinator_address: ``host:port`` of process 0, or None for single host.
    num_processes: total number of processes.
    process_id: this process's index.

  Returns:
    Whether the distributed runtime was initialised.
  """
  given = [coordinator_address, num_processes, process_id]
  if all(v is None for v in given):
    launched = launcher_process_count()
    if launched is not None and launched[1] > 1:
      logging.warning(
          "%s=%d says %d processes were launched, but without --coordinator_address, "
          "--num_processes and --process_id each trains alone, on its own devices and into "
          "the same --workdir; give the three flags for one multi-host run",
          launched[0], launched[1], launched[1])
    return False
  if any(v is None for v in given):
    raise TrainConfigError(
        "multi-host training needs all of --coordinator_address, --num_processes and "
        f"--process_id (got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
  if not 0 <= process_id < num_processes:
    raise TrainConfigError(
        f"--process_id must be in [0, {num_processes}), got {process_id}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


LAUNCHER_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE")


def launcher_process_count() -> tuple[str, int] | None:
  """(variable, count) of the first launcher variable set to an integer, or None."""
  for name in LAUNCHER_VARIABLES:
    try:
      return name, int(os.environ[name])
    except (KeyError, ValueError):
      continue
  return None


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices).

  Raises:
    TrainConfigError: for an empty device list or one that names a device twice.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise TrainConfigError("the data mesh needs at least one device, got an empty list")
  if len(set(devices)) != len(devices):
    raise TrainConfigError(f"the data mesh's devices must be distinct, got {devices}")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) axis over ``"data"``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
  """Raises ``TrainConfigError`` unless ``batch_size`` splits into micro-batches
  whose rows divide evenly over the mesh's devices."""
  n_dev = mesh.devices.size
  if batch_size <= 0 or grad_accum <= 0:
    raise TrainConfigError(
        f"--batch_size and --grad_accum must be positive, got {batch_size} and {grad_accum}")
  if batch_size % (n_dev * grad_accum):
    raise TrainConfigError(
        f"--batch_size={batch_size} must be divisible by the number of devices "
        f"({n_dev}) x --grad_accum ({grad_accum}) = {n_dev * grad_accum}")


def replicate(tree, mesh: Mesh):
  """Places a pytree on every device of ``mesh`` (replicated)."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: dict, mesh: Mesh, grad_accum: int = 1) -> dict:
  """Turns a host global batch into global arrays sharded over ``"data"``.

  With ``grad_accum = A`` each (B, ...) array is first reshaped to
  (A, B / A, ...) (micro-batch a holds rows ``a * B/A ...``) and the second axis
  is sharded. Each process passes the full global batch and keeps only the rows
  its devices own.

  Args:
    batch: dict of host arrays, each (B, ...).
    mesh: the data mesh.
    grad_accum: number of micro-batches A.
  """
  def put(x):
    x = np.asarray(x)
    if grad_accum > 1:
      x = x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:])
      spec = P(None, DATA_AXIS)
    else:
      spec = P(DATA_AXIS)
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return {k: put(v) for k, v in batch.items()}


def shard_eval_batch(batch: dict, mesh: Mesh) -> dict:
  """``shard_batch`` for an evaluation batch of any number of rows.

  Rows are added, copies of the last row with an all-zero ``"mask"``, up to a
  multiple of the mesh's device count, so the batch splits over the devices
  and the added rows change no masked sum: every device count evaluates the
  same rows per batch, and the same figures.

  Args:
    batch: dict of host arrays, each (B, ...), with a ``"mask"`` entry.
    mesh: the data mesh.
  """
  pad = -batch["mask"].shape[0] % mesh.devices.size
  if pad:
    batch = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[-1:], pad, axis=0)])
             for k, v in batch.items()}
    batch["mask"][-pad:] = 0
  return shard_batch(batch, mesh)
