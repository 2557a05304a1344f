"""Pallas kernel calls that XLA partitions over batch rows and heads.

To XLA's SPMD partitioner a ``pallas_call`` is an opaque custom call. Under
``jit`` with inputs sharded over devices (the data parallelism of
``qsf_jax.training``) it would gather the whole batch onto every device and run
the full kernel there: every device doing all devices' work. Every kernel of
this package is independent across batch rows and heads, so
``batch_head_partitioned`` wraps a kernel call in
``jax.experimental.custom_partitioning``: each device runs the same kernel on
its own rows and heads, while time and feature axes stay whole (the sharding
rule marks them as needing replication). On one device, or inside
``shard_map``, it lowers to the plain call.

``custom_partitioning`` has no batching rule, so the wrapper is also a
``jax.custom_batching.custom_vmap`` whose rule folds the mapped axis into the
batch axis (every operand has the batch first): ``vmap`` keeps working.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

# Factor names of the sharding rules: b batch, h heads (may be sharded); t time,
# k key features, v value features (kept whole on every device).
WHOLE_FACTORS = ("t", "k", "v")


def _spec(factors: str, batch_axes, head_axes) -> PartitionSpec:
  """The PartitionSpec of one operand: batch and head axes, the rest whole."""
  return PartitionSpec(*(batch_axes if f == "b" else head_axes if f == "h" else None
                         for f in factors.split()))


def operand_shardings(mesh, first_sharding, in_factors: Sequence[str],
                      out_factors: Sequence[str]):
  """Shardings of every operand and result, from the first operand's sharding.

  The mesh axes that shard the first operand's batch and head dimensions shard
  those dimensions of every operand and result; every other dimension is whole.

  Args:
    mesh: the ``jax.sharding.Mesh``.
    first_sharding: the ``NamedSharding`` XLA chose for the first operand.
    in_factors, out_factors: one factor string per operand / result, e.g.
      "b t h k" for a (B, T, H, Dk) array (``b`` and ``h`` must occur in each).

  Returns:
    (operand shardings, result shardings), tuples of ``NamedSharding``.
  """
  first = in_factors[0].split()
  spec = tuple(first_sharding.spec) + (None,) * (len(first) - len(first_sharding.spec))
  batch_axes, head_axes = spec[first.index("b")], spec[first.index("h")]
  named = lambda f: NamedSharding(mesh, _spec(f, batch_axes, head_axes))
  return tuple(map(named, in_factors)), tuple(map(named, out_factors))


def _fold(x, size: int, batched: bool):
  """(E, B, ...) -> (E B, ...); an unbatched operand is broadcast to E first."""
  if not batched:
    x = jnp.broadcast_to(x[None], (size,) + x.shape)
  return x.reshape((size * x.shape[1],) + x.shape[2:])


def batch_head_partitioned(fn: Callable, in_factors: Sequence[str],
                           out_factors: Sequence[str]) -> Callable:
  """``fn`` as a call that XLA runs per device on that device's rows and heads.

  Args:
    fn: ``fn(*arrays) -> tuple of arrays``, independent across batch rows and
      heads; every operand and result has the batch axis first.
    in_factors: one factor string per operand ("b t h k": batch, time, heads,
      key features; see ``WHOLE_FACTORS``).
    out_factors: one factor string per result.

  Returns:
    A function with ``fn``'s signature and values.
  """
  in_factors, out_factors = tuple(in_factors), tuple(out_factors)
  for f in in_factors + out_factors:
    names = f.split()
    if names[0] != "b" or "h" not in names or set(names) - {"b", "h", *WHOLE_FACTORS}:
      raise ValueError(f"factor strings start with 'b', contain 'h' and use only "
                       f"b, h, {', '.join(WHOLE_FACTORS)}; got {f!r}")

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return operand_shardings(mesh, arg_shapes[0].sharding, in_factors, out_factors)[1]

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    ins, outs = operand_shardings(mesh, arg_shapes[0].sharding, in_factors, out_factors)
    return mesh, fn, outs, ins

  partitioned = custom_partitioning(fn)
  partitioned.def_partition(
      infer_sharding_from_operands=infer, partition=partition,
      sharding_rule=f"{', '.join(in_factors)} -> {', '.join(out_factors)}",
      need_replication_factors=WHOLE_FACTORS)

  @jax.custom_batching.custom_vmap
  def call(*args):
    return partitioned(*args)

  @call.def_vmap
  def _vmap_rule(axis_size, in_batched, *args):
    outs = call(*(_fold(x, axis_size, bat) for x, bat in zip(args, in_batched)))
    return (tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs),
            tuple(True for _ in outs))

  return call
