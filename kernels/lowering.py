"""Cross-lowering of the Pallas kernels for CUDA on a host without a GPU.

Kernels spec §3.4: exporting a jitted function for the ``cuda`` platform under
an abstract H100 device runs the Pallas -> Triton IR lowering on CPU. It catches
non-power-of-two tiles, value slicing and unsupported primitives that interpret
mode accepts; Triton's own TTIR -> PTX compile (register pressure, shared memory)
only happens on a GPU.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import triton as plgpu

# Exposed by jax >= 0.11 as plgpu.CUSTOM_CALL_TARGET_NAME; the same string on 0.10.
TRITON_CALL_TARGET = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
H100 = dict(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)


def export_for_cuda(fn, *arg_structs):
  """Exports ``jax.jit(fn)`` for CUDA with an abstract H100 (spec §3.4).

  Args:
    fn: the function to lower (e.g. a forward, or a ``value_and_grad``).
    *arg_structs: ``jax.ShapeDtypeStruct`` for each positional argument.

  Returns:
    The ``jax.export.Exported``; its ``mlir_module()`` holds one Triton custom
    call per ``pallas_call``.
  """
  dev = jax.sharding.AbstractDevice(**H100)
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=dev)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)],
    )(*arg_structs)


def count_triton_calls(exported) -> int:
  """How many Triton custom calls an exported module contains."""
  return exported.mlir_module().count(TRITON_CALL_TARGET)
